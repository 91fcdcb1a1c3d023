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


def remove_mask_nodes(graph: fx.Graph) -> dict[str, str]:
    """Replace every mask node of ``graph`` by its weight, and drop the mask's get_attr node; returns
    mask target -> weight target. The graph only: the caller folds the masks into the weights."""
    folds: dict[str, str] = {}
    for node in list(graph.nodes):
        if not is_mask_node(node):
            continue
        weight, mask = node.args
        folds[mask.target] = weight.target
        node.replace_all_uses_with(weight)
        graph.erase_node(node)
        if not mask.users:
            graph.erase_node(mask)
    graph.lint()
    return folds


def fold_masks(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every mask node of ``gm`` by its weight, folding the mask into the weight.

    The mask's get_attr node and buffer go too. Rewrites ``gm`` in place and returns it.
    """
    for mask, weight in remove_mask_nodes(gm.graph).items():
        fold_mask(gm, weight, mask)
    gm.recompile()
    return gm
