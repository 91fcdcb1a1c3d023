"""Which graph operations carry a prunable weight, and where it sits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

# call_function targets whose weight operand gets a mask: target -> op kind.
WEIGHT_OPS = {
    F.conv1d: "conv1d",
    F.conv2d: "conv2d",
    F.conv3d: "conv3d",
    F.linear: "linear",
}
# The modules whose forward is one of the ops above; fx traces into them.
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class WeightUse:
    """One conv/linear op of a graph and the get_attr node that feeds its weight."""

    op: fx.Node
    weight: fx.Node
    kind: str


def weight_operand(node: fx.Node) -> fx.Node | None:
    """The weight argument of a conv/linear call node, or None."""
    if len(node.args) > 1:
        return node.args[1] if isinstance(node.args[1], fx.Node) else None
    w = node.kwargs.get("weight")
    return w if isinstance(w, fx.Node) else None


def weight_uses(gm: fx.GraphModule) -> list[WeightUse]:
    """Every conv/linear op in ``gm`` whose weight is a parameter read by get_attr."""
    uses = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in WEIGHT_OPS:
            continue
        w = weight_operand(node)
        if w is None or w.op != "get_attr":
            continue
        try:
            param = gm.get_parameter(w.target)
        except AttributeError:
            continue
        if isinstance(param, nn.Parameter):
            uses.append(WeightUse(node, w, WEIGHT_OPS[node.target]))
    return uses


def is_weight_op(func) -> bool:
    return func in WEIGHT_OPS


def macs_of(output: torch.Tensor, weight: torch.Tensor) -> int:
    """Multiply-accumulates of a conv/linear call: one per output element per weight feeding it."""
    return output.numel() * (weight.numel() // weight.shape[0])
