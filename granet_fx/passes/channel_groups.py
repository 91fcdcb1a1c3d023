"""Which channels must be removed together: a networkx graph of channel spaces.

The model is captured whole with ``torch.export`` (non-strict), whose graph
names every parameter. A *channel space* is the output channels of one
conv/linear weight. Walking the graph, every tensor gets a *layout*: the
dimension that holds its channels and the spaces they come from (several after
a concatenation; each channel repeated over the trailing positions after a
flatten). Operations that make two spaces line up channel by channel (a
residual add, a depthwise convolution's input and output, one weight read by
two tensors) join them by an edge; each connected component is a
``ChannelGroup``, whose channel i is channel i of each of its spaces.

Everything indexed by a group's channels is one of its ``Member``\\ s: the
weight rows that produce them (conv/linear output channels, depthwise convs),
the batch norms that normalize them, and the weight columns of the layers that
read them. A space whose channels reach the model output, a grouped
convolution, a layer norm, or any operation this pass does not follow, is
*pinned*: its group's channels must all stay.
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import networkx as nx
import torch
from torch import fx, nn

from ..export.console import first_line
from .trace import training_mode

aten = torch.ops.aten

_CONVS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
# Ops that keep every dimension and act on each channel separately.
_CHANNELWISE = {
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.feature_dropout.default, aten._to_copy.default, aten.to.dtype,
}
# Pooling and resizing over the last k dimensions: channel-wise too.
_SPATIAL = {
    aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool3d.default: 3,
    aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3,
    aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
    aten.max_pool2d_with_indices.default: 2, aten.max_pool3d_with_indices.default: 3,
    aten.adaptive_max_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2,
    aten.upsample_nearest2d.vec: 2, aten.upsample_bilinear2d.vec: 2,
}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
# Ops whose output 0 (read by getitem) carries the layout.
_TUPLE_OUTPUTS = {aten._native_batch_norm_legit_no_training.default, aten.max_pool2d_with_indices.default,
                  aten.max_pool3d_with_indices.default, aten.adaptive_max_pool1d.default,
                  aten.adaptive_max_pool2d.default}


@dataclass(frozen=True)
class Member:
    """Tensors indexed by a group's channels, named as in the model's state_dict.

    ``role`` is "row" (a conv/linear weight's output channels, dimension 0, with
    its bias and mask), "column" (the input channels of a layer that reads the
    group, dimension 1) or "norm" (a batch norm's scale, shift and running stats).
    Channel i of the group is entries ``offset + i * repeat ... + repeat - 1``.
    """

    role: str
    weight: str | None
    bias: str | None = None
    mask: str | None = None
    mean: str | None = None
    var: str | None = None
    offset: int = 0
    repeat: int = 1
    depthwise: bool = False   # a row of a depthwise conv: its input is the same channels
    padded: bool = False      # a column of a zero-padded conv: a constant input is not a constant contribution
    node: str = ""            # a column: the graph node whose values it reads
    node_dim: int = 1         # a column: the dimension of that node that holds the channels

    @property
    def dim(self) -> int:
        return 1 if self.role == "column" else 0

    def tensors(self) -> list[str]:
        return [t for t in (self.weight, self.bias, self.mask, self.mean, self.var) if t]

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` of the given channels of the group."""
        within = torch.arange(self.repeat)
        return (self.offset + channels[:, None] * self.repeat + within[None, :]).flatten()

    def channels(self, t: torch.Tensor, size: int) -> torch.Tensor:
        """``t`` (this member's weight, mask or gradient) cut to the ``size`` channels of its group,
        one row per channel: a row's output channels, a column's input channels."""
        if self.role == "column":
            t = t.index_select(1, self.indices(torch.arange(size)).to(t.device)).movedim(1, 0)
        else:
            t = t.narrow(0, self.offset, size)
        return t.reshape(size, -1)


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together."""

    size: int
    members: list[Member] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # why these channels must stay; empty if they may go

    @property
    def rows(self) -> list[Member]:
        return [m for m in self.members if m.role == "row"]

    @property
    def columns(self) -> list[Member]:
        return [m for m in self.members if m.role == "column"]


@dataclass(frozen=True)
class _Segment:
    space: str
    size: int
    repeat: int = 1


@dataclass(frozen=True)
class _Layout:
    """Which dimension of a tensor holds channels, and which spaces they belong to, in order."""

    dim: int
    segments: tuple[_Segment, ...]

    def with_offsets(self) -> Iterator[tuple[int, _Segment]]:
        offset = 0
        for s in self.segments:
            yield offset, s
            offset += s.size * s.repeat

    def shape(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.size, s.repeat) for s in self.segments)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its state_dict name, shared ones under each name."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def export_graph(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    """The model captured whole by ``torch.export`` (non-strict, eval mode), as a GraphModule.

    Its get_attr targets are the model's parameter and buffer names.
    """
    try:
        with training_mode(model, False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, example_inputs, strict=False)
    except Exception as e:
        raise ValueError(
            f"granet_fx: torch.export cannot capture {type(model).__name__} whole, which channel analysis "
            f"needs: {first_line(e)}"
        ) from e
    return program.module()


def find_groups(gm: fx.GraphModule) -> list[ChannelGroup]:
    """The channel groups of an exported graph (see ``export_graph``)."""
    return _Analysis(gm).run()


def channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The channel groups of ``model`` on ``example_inputs`` (a tensor or a tuple)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return find_groups(export_graph(model, example_inputs))


def layer_positions(gm: fx.GraphModule) -> dict[str, int]:
    """For each conv/linear weight of an exported graph, the output positions it computes (batch x
    spatial, summed over its calls): its multiply-accumulates are that times its number of elements."""
    positions: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and (node.target in _CONVS or node.target is aten.linear.default):
            weight = _weight_of(node.args[1])
            if weight is not None and _is_tensor(node):
                out = _val(node)
                channels = out.shape[-1 if node.target is aten.linear.default else 1]
                positions[weight[0]] = positions.get(weight[0], 0) + out.numel() // channels
    return positions


def _weight_of(node: Any) -> tuple[str, str | None] | None:
    """(weight name, mask name) of a weight operand: a parameter, or a parameter times its mask."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node.target, None
    if node.target is aten.mul.Tensor and len(node.args) == 2 and all(
            isinstance(a, fx.Node) and a.op == "get_attr" for a in node.args):
        w, m = node.args
        if _val(m).dtype == torch.bool:
            return w.target, m.target
        if _val(w).dtype == torch.bool:
            return m.target, w.target
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


class _Analysis:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.graph = nx.Graph()
        self.layouts: dict[fx.Node, _Layout | None] = {}
        self.members: list[tuple[Member, _Layout]] = []
        self.indexed: dict[tuple[str, int], _Layout] = {}

    # Spaces and their edges -------------------------------------------------
    def new_space(self, name: str, size: int, dim: int) -> _Layout:
        if name not in self.graph:
            self.graph.add_node(name, size=size, pinned=[])
        return _Layout(dim, (_Segment(name, size),))

    def pin(self, layout: _Layout | None, reason: str) -> None:
        if layout is None:
            return
        for s in layout.segments:
            if reason not in self.graph.nodes[s.space]["pinned"]:
                self.graph.nodes[s.space]["pinned"].append(reason)

    def couple(self, a: _Layout, b: _Layout, reason: str) -> None:
        """Join the spaces of two layouts channel by channel, or pin both if they do not line up."""
        if a.shape() != b.shape():
            self.pin(a, reason)
            self.pin(b, reason)
            return
        for x, y in zip(a.segments, b.segments):
            if x.space != y.space:
                self.graph.add_edge(x.space, y.space)

    def add_member(self, member: Member, layout: _Layout) -> None:
        """Record tensors indexed by ``layout``; a tensor indexed twice couples the two layouts."""
        names = member.tensors()
        key = (names[0] if names else None, member.dim)
        if key[0] is not None and key in self.indexed:
            self.couple(self.indexed[key], layout, f"{key[0]} is used with different channels")
            return
        self.indexed[key] = layout
        self.members.append((member, layout))

    # The walk ----------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        for node in self.gm.graph.nodes:
            if node.op == "output":
                for arg in node.all_input_nodes:
                    self.pin(self.layouts.get(arg), "reaches the model output")
            elif node.op == "call_function":
                self.layouts[node] = self.visit(node)
            elif node.op == "call_module":
                self.unknown(node)
        return self.groups()

    def visit(self, node: fx.Node) -> _Layout | None:
        t = node.target
        if t in _CONVS:
            return self.conv(node)
        if t is aten.linear.default:
            return self.linear(node)
        if t in _BATCH_NORMS:
            return self.batch_norm(node)
        if t is operator.getitem:
            source = node.args[0]
            if isinstance(source, fx.Node) and source.target in _TUPLE_OUTPUTS and node.args[1] == 0:
                return self.layouts.get(source)
            return None
        if not _is_tensor(node) and not isinstance(_val(node), (tuple, list)):
            return None  # sizes and other non-tensor values
        inputs = [a for a in node.all_input_nodes if self.layouts.get(a) is not None]
        if not inputs:
            return None
        if t in _CHANNELWISE:
            return self.layouts[node.args[0]]
        if t in _SPATIAL:
            layout = self.layouts[node.args[0]]
            if layout.dim < _val(node.args[0]).dim() - _SPATIAL[t]:
                return layout
        elif t in _RESHAPES:
            return self.reshape(node)
        elif t in _REDUCTIONS:
            return self.reduction(node)
        elif t is aten.cat.default:
            return self.cat(node)
        elif isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
            return self.pointwise(node)
        return self.unknown(node)

    def unknown(self, node: fx.Node, why: str = "feeds") -> None:
        for arg in node.all_input_nodes:
            self.pin(self.layouts.get(arg), f"{why} {_describe(node)}")
        return None

    # Layers --------------------------------------------------------------------
    def conv(self, node: fx.Node) -> _Layout | None:
        x, weight = node.args[0], _weight_of(node.args[1])
        bias = _arg(node, 2, "bias")
        if node.target is aten.convolution.default and _arg(node, 6, "transposed"):
            return self.unknown(node)
        padding = _arg(node, 4, "padding", 0)
        groups = _arg(node, 8 if node.target is aten.convolution.default else 6, "groups", 1)
        if weight is None or (bias is not None and _weight_of(bias) is None):
            return self.unknown(node)
        bias_name = bias.target if bias is not None else None
        shape = _val(node.args[1]).shape
        layout = self.layouts.get(x)
        padded = padding != "valid" and any(p != 0 for p in (padding if isinstance(padding, (list, tuple)) else [padding]))
        if groups == 1:
            if layout is not None:
                if layout.dim == 1 and all(s.repeat == 1 for s in layout.segments):
                    self.add_member(Member("column", weight[0], bias_name, weight[1], padded=padded, node=x.name),
                                    layout)
                else:
                    self.pin(layout, f"feeds {_describe(node)} along another dimension")
            out = self.new_space(weight[0], shape[0], 1)
            self.add_member(Member("row", weight[0], bias_name, weight[1]), out)
            return out
        if groups == shape[0] and shape[1] == 1 and layout is not None and layout.dim == 1 \
                and all(s.repeat == 1 for s in layout.segments) and sum(s.size for s in layout.segments) == shape[0]:
            self.add_member(Member("row", weight[0], bias_name, weight[1], depthwise=True), layout)
            return layout
        self.pin(layout, f"feeds a grouped convolution ({weight[0]})")
        out = self.new_space(weight[0], shape[0], 1)
        self.pin(out, f"made by a grouped convolution ({weight[0]})")
        self.add_member(Member("row", weight[0], bias_name, weight[1]), out)
        return out

    def linear(self, node: fx.Node) -> _Layout | None:
        x, weight, bias = node.args[0], _weight_of(node.args[1]), _arg(node, 2, "bias")
        if weight is None or (bias is not None and _weight_of(bias) is None):
            return self.unknown(node)
        bias_name = bias.target if bias is not None else None
        layout = self.layouts.get(x)
        if layout is not None:
            if layout.dim == _val(x).dim() - 1:
                self.add_member(Member("column", weight[0], bias_name, weight[1], node=x.name, node_dim=layout.dim),
                                layout)
            else:
                self.pin(layout, f"feeds {_describe(node)} along another dimension")
        out = self.new_space(weight[0], _val(node.args[1]).shape[0], _val(node).dim() - 1)
        self.add_member(Member("row", weight[0], bias_name, weight[1]), out)
        return out

    def batch_norm(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts.get(node.args[0])
        if layout is None:
            return None
        operands = [_arg(node, i, n) for i, n in enumerate(("weight", "bias", "running_mean", "running_var"), 1)]
        names = [_weight_of(a) if a is not None else None for a in operands]
        if layout.dim != 1 or any(s.repeat != 1 for s in layout.segments) or \
                any(a is not None and n is None for a, n in zip(operands, names)):
            return self.unknown(node)
        weight, bias, mean, var = (n[0] if n else None for n in names)
        self.add_member(Member("norm", weight, bias, mean=mean, var=var), layout)
        return layout

    # Shapes ---------------------------------------------------------------------
    def reshape(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts[node.args[0]]
        before, after = tuple(_val(node.args[0]).shape), tuple(_val(node).shape)
        d = layout.dim
        if after[:d + 1] == before[:d + 1]:
            return layout                                            # only dimensions after the channels change
        if len(after) == d + 1 and after[:d] == before[:d] and after[d] == math.prod(before[d:]):
            inner = math.prod(before[d + 1:])                        # a flatten of the channels and what follows
            return _Layout(d, tuple(replace(s, repeat=s.repeat * inner) for s in layout.segments))
        tail = before[d:]
        if len(after) >= len(tail) and after[len(after) - len(tail):] == tail:
            return _Layout(len(after) - len(tail), layout.segments)  # only dimensions before the channels change
        return self.unknown(node)

    def reduction(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts[node.args[0]]
        rank = _val(node.args[0]).dim()
        dims = _arg(node, 1, "dim")
        keepdim = _arg(node, 2, "keepdim", False)
        if dims is None or (isinstance(dims, (list, tuple)) and not dims):
            return self.unknown(node)
        dims = [d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if layout.dim in dims:
            return self.unknown(node)
        return _Layout(layout.dim if keepdim else layout.dim - sum(d < layout.dim for d in dims), layout.segments)

    def cat(self, node: fx.Node) -> _Layout | None:
        tensors = node.args[0]
        layouts = [self.layouts.get(t) for t in tensors]
        dim = _arg(node, 1, "dim", 0) % _val(node).dim()
        if any(l is None for l in layouts) or len({l.dim for l in layouts}) != 1:
            return self.unknown(node)
        if layouts[0].dim == dim:
            return _Layout(dim, tuple(s for l in layouts for s in l.segments))
        for other in layouts[1:]:
            self.couple(layouts[0], other, f"concatenated along another dimension in {_describe(node)}")
        return layouts[0]

    def pointwise(self, node: fx.Node) -> _Layout | None:
        """An elementwise op: operands with channels line up; others must not vary along the channels."""
        out_rank = _val(node).dim()
        result = None
        for arg in node.all_input_nodes:
            if not _is_tensor(arg):
                continue
            layout = self.layouts.get(arg)
            if layout is None:
                continue
            if _val(arg).dim() != out_rank:
                return self.unknown(node)
            if result is None:
                result = layout
            elif layout.dim != result.dim:
                return self.unknown(node)
            else:
                self.couple(result, layout, f"combined with other channels in {_describe(node)}")
        for arg in node.all_input_nodes:
            if _is_tensor(arg) and self.layouts.get(arg) is None:
                v = _val(arg)
                position = result.dim - (out_rank - v.dim())
                if 0 <= position < v.dim() and v.shape[position] != 1:
                    return self.unknown(node, "meets channels of unknown origin in")
        return result

    # Components --------------------------------------------------------------
    def groups(self) -> list[ChannelGroup]:
        order = {space: i for i, space in enumerate(self.graph.nodes)}
        by_space: dict[str, ChannelGroup] = {}
        groups = []
        for component in sorted(nx.connected_components(self.graph), key=lambda c: min(order[s] for s in c)):
            spaces = sorted(component, key=order.get)
            group = ChannelGroup(size=self.graph.nodes[spaces[0]]["size"])
            groups.append(group)
            for s in spaces:
                group.pinned += [r for r in self.graph.nodes[s]["pinned"] if r not in group.pinned]
                by_space[s] = group
        for member, layout in self.members:
            for offset, segment in layout.with_offsets():
                by_space[segment.space].members.append(replace(member, offset=offset, repeat=segment.repeat))
        return groups


def _describe(node: fx.Node) -> str:
    """An op and the line of model code it comes from, for pinning reasons."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    lines = [l.strip() for l in (node.meta.get("stack_trace") or "").splitlines() if l.strip()]
    return f"{name} at `{lines[-1]}`" if lines and not lines[-1].startswith("File ") else name
