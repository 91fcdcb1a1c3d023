"""``fold``: a copy of a sparse model with its masks multiplied into the weights."""

from __future__ import annotations

import copy

from torch import fx, nn

from .passes.fold_masks import fold_mask, fold_masks
from .passes.insert_masks import remove_mask_hooks
from .sparsify import set_info, sparse_info, unwrap


def fold(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (returned by ``sparsify``) with no masks: each weight is ``weight * mask``.

    The copy computes exactly what the masked model computes, has no mask nodes
    and no mask buffers, and is no longer sparsified: it is a model to export,
    not to train. ``model`` itself is left as it is.
    """
    info = sparse_info(model)
    folded = copy.deepcopy(unwrap(model))
    for gm in [m for m in folded.modules() if isinstance(m, fx.GraphModule)]:
        fold_masks(gm)
    # Masks without a mask node: a weight read outside its module's call, or by code fx cannot trace
    # (masked by a hook, which goes too).
    for layer in info.masked:
        try:
            folded.get_buffer(layer.mask_name)
        except AttributeError:
            continue
        fold_mask(folded, layer.name, layer.mask_name)
    remove_mask_hooks(folded)
    set_info(folded, None)
    return folded
