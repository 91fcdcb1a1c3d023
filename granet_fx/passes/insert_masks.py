"""The mask pass: put a straight-through mask node on every masked weight operand."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import fx

from .ops import weight_uses


class _StraightThroughMask(torch.autograd.Function):
    """Forward ``weight * mask``; backward passes the full, dense gradient to the weight.

    GraNet regrows the inactive connections with the largest gradient, so the
    gradient of pruned weights must exist. The backward pass computes it anyway;
    this node only keeps autograd from zeroing it.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return weight * mask

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def mask_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mask node: ``weight * mask`` with a dense straight-through gradient."""
    return _StraightThroughMask.apply(weight, mask)


# Re-tracing a rewritten module keeps mask_weight as one node.
torch.fx.wrap("mask_weight")


def insert_masks(gm: fx.GraphModule, mask_targets: Mapping[str, str]) -> fx.GraphModule:
    """Feed each conv/linear op whose weight is in ``mask_targets`` through a mask node.

    ``mask_targets`` maps a weight's get_attr target to its mask buffer's target
    (the buffer must already exist in ``gm``). Rewrites ``gm`` in place and returns it.
    """
    masked: dict[fx.Node, fx.Node] = {}
    for use in weight_uses(gm):
        mask_target = mask_targets.get(use.weight.target)
        if mask_target is None:
            continue
        if use.weight not in masked:
            with gm.graph.inserting_after(use.weight):
                mask_node = gm.graph.get_attr(mask_target)
            with gm.graph.inserting_after(mask_node):
                masked[use.weight] = gm.graph.call_function(mask_weight, (use.weight, mask_node))
        use.op.replace_input_with(use.weight, masked[use.weight])
    gm.graph.lint()
    gm.recompile()
    return gm


def is_mask_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is mask_weight
