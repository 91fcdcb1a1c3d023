"""torch.fx passes: trace a model, insert mask nodes, fold them; channel groups and compaction."""

from .fold_masks import fold_mask, fold_masks
from .insert_masks import insert_masks, is_mask_node, mask_weight
from .ops import WEIGHT_MODULES, WEIGHT_OPS, WeightUse, weight_uses
from .trace import Piece, trace_pieces

__all__ = [
    "Piece", "WEIGHT_MODULES", "WEIGHT_OPS", "WeightUse",
    "insert_masks", "is_mask_node", "mask_weight", "trace_pieces", "weight_uses",
    "fold_mask", "fold_masks",
]
