"""The mask pass: put a straight-through mask node on every masked weight (or a hook, outside graphs)."""

from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import fx, nn

from ..distributed import is_sharded
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
    """The mask node: ``weight * mask`` with a dense straight-through gradient.

    Under FSDP2 the mask is sharded (this rank's rows) while the weight arrives
    whole: the controller has already zeroed the pruned weights on their
    shards after the optimizer step, so the weight is used as it is.
    """
    if is_sharded(mask):
        if is_sharded(weight):
            raise RuntimeError(
                "granet_fx: a masked weight is still sharded when the model reads it: its module was "
                "fully_shard-ed, but sparsify traced that module into its parent's graph, so its forward "
                "(where FSDP2 gathers the weight) never runs; pass the modules you shard to "
                "sparsify(..., keep_modules=[...]) so that their calls stay calls"
            )
        return weight
    return _StraightThroughMask.apply(weight, mask)


# Re-tracing a rewritten module keeps mask_weight as one node.
torch.fx.wrap("mask_weight")


def insert_masks(gm: fx.GraphModule, mask_targets: Mapping[str, str]) -> fx.GraphModule:
    """Put a mask node right after the get_attr of each weight in ``mask_targets``.

    ``mask_targets`` maps a weight's get_attr target to its mask buffer's target
    (the buffer must already exist in ``gm``). Every use of the weight, views
    and expert slices included, then reads ``weight * mask``. Rewrites ``gm``
    in place and returns it.
    """
    masked: dict[fx.Node, fx.Node] = {}
    for use in weight_uses(gm):
        mask_target = mask_targets.get(use.weight.target)
        if mask_target is None or use.weight in masked:
            continue
        with gm.graph.inserting_after(use.weight):
            mask_node = gm.graph.get_attr(mask_target)
        with gm.graph.inserting_after(mask_node):
            masked[use.weight] = gm.graph.call_function(mask_weight, (use.weight, mask_node))
        use.weight.replace_all_uses_with(masked[use.weight], delete_user_cb=lambda n: n is not masked[use.weight])
    gm.graph.lint()
    gm.recompile()
    return gm


# Weights read by code that fx could not trace: swapped for ``weight * mask`` while that code runs.

_SAVED = "_granet_fx_unmasked"


def _swap_in_masked(pairs: tuple[tuple[str, str], ...], module: nn.Module, args) -> None:
    """Forward pre-hook: each (weight, mask) pair of ``module`` reads ``mask_weight(weight, mask)``."""
    if _SAVED in vars(module):      # a re-entrant call already sees the masked weights
        return
    saved = []
    for weight, mask in pairs:
        owner, _, name = weight.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        param = holder._parameters[name]
        saved.append((holder, name, param))
        holder._parameters[name] = mask_weight(param, module.get_buffer(mask))
    vars(module)[_SAVED] = saved


def _restore(pairs: tuple[tuple[str, str], ...], module: nn.Module, args, output) -> None:
    """Forward hook (also on error): put the parameters back."""
    for holder, name, param in vars(module).pop(_SAVED, ()):
        holder._parameters[name] = param


def add_mask_hooks(module: nn.Module, pairs: list[tuple[str, str]]) -> None:
    """Make the code of ``module`` read ``weight * mask`` for each (weight, mask) name pair (relative
    to ``module``), with the straight-through gradient of the mask node. For weights that a graph
    cannot reach: an op fx could not trace reads them (Mixtral's grouped-matmul experts)."""
    pairs = tuple(pairs)
    module.register_forward_pre_hook(functools.partial(_swap_in_masked, pairs))
    module.register_forward_hook(functools.partial(_restore, pairs), always_call=True)


def remove_mask_hooks(root: nn.Module) -> None:
    """Take the hooks of ``add_mask_hooks`` off every module of ``root``."""
    for m in root.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, functools.partial) and hook.func in (_swap_in_masked, _restore):
                    del hooks[key]
                    m._forward_hooks_always_called.pop(key, None)


def mask_hook_pairs(root: nn.Module) -> list[tuple[str, str]]:
    """Every (weight, mask) pair, by name from ``root``, that a mask hook masks."""
    pairs = []
    for prefix, m in root.named_modules():
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, functools.partial) and hook.func is _swap_in_masked:
                join = (lambda n: f"{prefix}.{n}" if prefix else n)
                pairs += [(join(w), join(k)) for w, k in hook.args[0]]
    return pairs


def is_mask_node(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is mask_weight
