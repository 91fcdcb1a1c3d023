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
    torch.addmm: "addmm",
}
# Where an op takes its weight, when not as its second argument ``weight``:
# addmm(bias, x, weight) is how HF's GPT-2 ``Conv1D`` computes a linear layer
# with the weight laid out (in, out) instead of linear's (out, in).
WEIGHT_ARGS = {torch.addmm: (2, "mat2")}
# The modules whose forward is one of the ops above; fx traces into them.
WEIGHT_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class WeightUse:
    """One conv/linear op of a graph and the get_attr node that feeds its weight."""

    op: fx.Node
    weight: fx.Node
    kind: str


def weight_argument(target, args: tuple, kwargs: dict):
    """The weight argument of a call to the weight op ``target`` (a node or a tensor), or None."""
    index, keyword = WEIGHT_ARGS.get(target, (1, "weight"))
    return args[index] if len(args) > index else kwargs.get(keyword)


def weight_operand(node: fx.Node) -> fx.Node | None:
    """The weight argument of a conv/linear call node, or None."""
    w = weight_argument(node.target, node.args, node.kwargs)
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


def macs_of(output: torch.Tensor, weight: torch.Tensor, func) -> int:
    """Multiply-accumulates of a conv/linear call: one per output element per weight feeding it.

    Conv/linear weights are (out, in, ...); addmm's is (in, out).
    """
    fan_in = weight.shape[0] if func is torch.addmm else weight.numel() // weight.shape[0]
    return output.numel() * fan_in
