"""The fold pass: multiply each mask into its weight and take the mask nodes out of the graph."""

from __future__ import annotations

import torch
from torch import fx, nn

from .insert_masks import is_mask_node


@torch.no_grad()
def fold_mask(root: nn.Module, weight: str, mask: str) -> None:
    """``weight <- weight * mask`` in place, then delete the mask buffer (names relative to ``root``).

    The product is the one the mask node computes, so the folded model computes
    exactly what the masked model computes.
    """
    root.get_parameter(weight).mul_(root.get_buffer(mask))
    owner, _, name = mask.rpartition(".")
    delattr(root.get_submodule(owner) if owner else root, name)


def fold_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every mask node of ``gm`` by its weight, folding the mask into the weight.

    The mask's get_attr node and buffer go too. Rewrites ``gm`` in place and returns it.
    """
    folds: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        if not is_mask_node(node):
            continue
        weight, mask = node.args
        folds[mask.target] = weight.target
        node.replace_all_uses_with(weight)
        gm.graph.erase_node(node)
        if not mask.users:
            gm.graph.erase_node(mask)
    for mask, weight in folds.items():
        fold_mask(gm, weight, mask)
    gm.graph.lint()
    gm.recompile()
    return gm
