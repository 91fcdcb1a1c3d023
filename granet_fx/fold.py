"""``fold``: a copy of a sparse model with its masks multiplied into the weights."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import fx, nn

from .passes.fold_masks import fold_mask, remove_mask_nodes
from .passes.insert_masks import remove_mask_hooks
from .sparsify import set_info, sparse_info, unwrap


_EMPTY_COPIED = (dict, OrderedDict, set, list)


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (returned by ``sparsify``) with no masks: each weight is ``weight * mask``.

    The copy computes exactly what the masked model computes, has no mask nodes
    and no mask buffers, and is no longer sparsified: it is a model to export,
    not to train. ``model`` itself is left as it is.
    """
    info = sparse_info(model)
    model = unwrap(model)
    # One deep copy, handed what it would otherwise copy and then rewrite: each graph without its mask
    # nodes (so that each GraphModule generates its code once), each masked weight as its product with
    # the mask (written once), the masks (deleted) and the sparsify info (dropped) not at all.
    memo: dict[int, object] = {id(info): None}
    for module in model.modules():   # a module's hook dicts, mostly empty: copied without deepcopy's reconstruction
        memo.update((id(v), type(v)()) for v in vars(module).values() if type(v) in _EMPTY_COPIED and not v)
    folds: dict[str, str] = {}   # mask -> weight, by name from the root
    for prefix, gm in model.named_modules():
        if isinstance(gm, fx.GraphModule):
            graph = copy.deepcopy(gm.graph)
            memo[id(gm.graph)] = graph
            folds.update({_join(prefix, m): _join(prefix, w) for m, w in remove_mask_nodes(graph).items()})
    # Masks without a mask node: a weight read outside its module's call, or by code fx cannot trace
    # (masked by a hook, which goes too).
    buffers = dict(model.named_buffers(remove_duplicate=False))
    for layer in info.masked:
        if layer.mask_name in buffers:
            folds.setdefault(layer.mask_name, layer.name)
    later = []
    with torch.no_grad():
        for mask, weight in folds.items():
            w, m = model.get_parameter(weight), buffers[mask]
            memo[id(m)] = m
            if id(w) in memo:
                memo[id(w)].mul_(m)
            elif type(w) is nn.Parameter and type(m) is torch.Tensor:
                memo[id(w)] = nn.Parameter(torch.mul(w, m, out=torch.empty_like(w)), w.requires_grad)
            else:
                memo.pop(id(m))
                later.append((weight, mask))
    folded = copy.deepcopy(model, memo)
    for weight, mask in later:
        fold_mask(folded, weight, mask)
    for mask in folds.keys() - {m for _, m in later}:
        owner, _, name = mask.rpartition(".")
        delattr(folded.get_submodule(owner) if owner else folded, name)
    remove_mask_hooks(folded)
    set_info(folded, None)
    return folded


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
