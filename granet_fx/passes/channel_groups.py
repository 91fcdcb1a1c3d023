"""Which channels must be removed together: a networkx graph of channel spaces.

The model's aten graph is recorded while it runs once on the example inputs
(``capture``: a dispatch mode, about the cost of one forward pass; conv, linear,
norm and attention calls are kept whole, as ``torch.export`` keeps them), its
get_attr nodes named like the parameters; a model whose code reads tensor
values is captured by ``torch.export`` (non-strict) instead. A *channel space* is the output channels of one
conv/linear weight. Walking the graph, every tensor gets a *layout*: the
dimension that holds its channels and the spaces they come from (several after
a concatenation; each channel repeated over the trailing positions after a
flatten). Operations that make two spaces line up channel by channel (a
residual add, a depthwise convolution's input and output, one weight read by
two tensors) join them by an edge; each connected component is a
``ChannelGroup``, whose channel i is channel i of each of its spaces.

Everything indexed by a group's channels is one of its ``Member``\\ s: the
weight rows that produce them (conv/linear output channels, depthwise convs),
the batch and layer norms that normalize them, the weight columns of the
layers that read them, and the parameters added, multiplied or concatenated
into them (embedding tables, class tokens, position embeddings, layer
scales). An embedding lookup starts a space of its own. A space whose channels
reach the model output, a grouped convolution, or any operation this pass does
not follow, is *pinned*: its group's channels must all stay. A layer norm over
the channels (the last dimension) is followed: ``sparsify`` makes it take its
statistics over the kept channels only (``layer_norms``).
"""

from __future__ import annotations

import functools
import itertools
import linecache
import math
import operator
import os
import sys
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import networkx as nx
import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ..export.console import first_line
from .layer_norms import masked_layer_norm, masked_rms_norm
from .trace import training_mode

aten = torch.ops.aten

_CONVS = {
    aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
    aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding, aten.convolution.default,
}
_BATCH_NORMS = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                aten.native_batch_norm.default}
# Ops that keep every dimension and act on each channel separately.
_CHANNELWISE = {
    aten.dropout.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.feature_dropout.default, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout, aten.to.device, aten.to.other,
}
# Pooling and resizing over the last k dimensions: channel-wise too.
_SPATIAL = {
    aten.adaptive_avg_pool1d.default: 1, aten.adaptive_avg_pool2d.default: 2, aten.adaptive_avg_pool3d.default: 3,
    aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3,
    aten.max_pool1d.default: 1, aten.max_pool2d.default: 2, aten.max_pool3d.default: 3,
    aten.max_pool2d_with_indices.default: 2, aten.max_pool3d_with_indices.default: 3,
    aten.adaptive_max_pool1d.default: 1, aten.adaptive_max_pool2d.default: 2,
    aten.upsample_nearest2d.vec: 2, aten.upsample_bilinear2d.vec: 2,
    # the forms they take in a recorded graph (see ``capture``)
    aten._adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool3d.default: 3,
    aten.upsample_nearest1d.default: 1, aten.upsample_nearest2d.default: 2, aten.upsample_nearest3d.default: 3,
    aten.upsample_bilinear2d.default: 2,
}
# Paddings, each (input, amounts for the last dimensions, ...): see ``_Analysis.pad``.
_PADS = {aten.constant_pad_nd.default, aten.pad.default, aten.reflection_pad1d.default, aten.reflection_pad2d.default,
         aten.reflection_pad3d.default, aten.replication_pad1d.default, aten.replication_pad2d.default,
         aten.replication_pad3d.default}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
# Matrix products that are a linear layer when their second operand is a weight (see ``_matmul_weight``).
_MATMULS = {aten.addmm.default, aten.mm.default, aten.matmul.default}
# Splits into a tuple of pieces, read by getitem: (self, one size or a list of sizes, dim).
_SPLITS = {aten.split.Tensor, aten.unsafe_split.Tensor, aten.split_with_sizes.default,
           aten.unsafe_split_with_sizes.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default}
_REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default}
# Ops whose output 0 (read by getitem) carries the layout.
_TUPLE_OUTPUTS = {aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default, aten.max_pool2d_with_indices.default,
                  aten.max_pool3d_with_indices.default, aten.adaptive_max_pool1d.default,
                  aten.adaptive_max_pool2d.default}


@dataclass(frozen=True)
class Member:
    """Tensors indexed by a group's channels, named as in the model's state_dict.

    ``role`` is "row" (a conv/linear weight's output channels, dimension 0, with
    its bias and mask), "column" (the input channels of a layer that reads the
    group, dimension 1; the two swap for a ``transposed`` weight, stored (in, out)
    like that of HF's ``Conv1D``), "norm" (a batch norm's scale, shift and running stats;
    a layer norm's scale and shift, with its ``keep`` buffer as ``mask`` once
    ``sparsify`` has masked it) or "param" (a parameter or buffer indexed by the
    channels along dimension ``axis``: it is only sliced).
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
    layer_norm: bool = False  # a norm: a layer norm, whose statistics read every channel it keeps
    axis: int = 0             # a param: the dimension that holds the channels
    transposed: bool = False  # a row or column of a weight stored (in, out), read by addmm
    split: int = 0            # a row: the layer's output is split by the model's code into this many equal pieces

    @property
    def dim(self) -> int:
        """The dimension of the member's tensors that holds the channels."""
        if self.transposed:
            return 0 if self.role == "column" else 1
        return 1 if self.role == "column" else self.axis

    def oriented(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (the member's weight, mask or gradient) as a view laid out (out, in, ...), as conv and
        linear weights are: rows are its dimension 0, columns its dimension 1."""
        return t.t() if self.transposed else t

    def tensors(self) -> list[str]:
        return [t for t in (self.weight, self.bias, self.mask, self.mean, self.var) if t]

    def indices(self, channels: torch.Tensor) -> torch.Tensor:
        """Positions along ``dim`` of the given channels of the group."""
        within = torch.arange(self.repeat)
        return (self.offset + channels[:, None] * self.repeat + within[None, :]).flatten()

    def channels(self, t: torch.Tensor, size: int) -> torch.Tensor:
        """``t`` (this member's weight, mask or gradient) cut to the ``size`` channels of its group,
        one row per channel: a row's output channels, a column's input channels."""
        t = self.oriented(t)
        if self.role == "column":
            t = t.index_select(1, self.indices(torch.arange(size)).to(t.device)).movedim(1, 0)
        else:
            t = t.movedim(self.axis, 0).narrow(0, self.offset, size * self.repeat)   # a head's rows are consecutive
        return t.reshape(size, -1)


@dataclass
class ChannelGroup:
    """Channels that are kept or removed together."""

    size: int
    members: list[Member] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)  # why these channels must stay; empty if they may go
    # channel counts that a graph which is the model's code writes as numbers (``find_groups(literal=True)``):
    # (node, argument, position in it or None, by how much it shrinks per channel removed)
    literals: list[tuple[str, int, int | None, int]] = field(default_factory=list)

    @property
    def rows(self) -> list[Member]:
        return [m for m in self.members if m.role == "row"]

    @property
    def columns(self) -> list[Member]:
        return [m for m in self.members if m.role == "column"]


@dataclass(frozen=True)
class _Segment:
    """``size`` entries of a space, each repeated ``repeat`` times; an entry is ``unit`` consecutive
    channels of the space (more than one after a split into attention heads: an entry is a head)."""

    space: str
    size: int
    repeat: int = 1
    unit: int = 1


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

    def shape(self) -> tuple[tuple[int, int, int], ...]:
        return tuple((s.size, s.repeat, s.unit) for s in self.segments)


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``model`` by its state_dict name, shared ones under each name."""
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def export_graph(model: nn.Module, example_inputs: tuple, why: str = "") -> fx.GraphModule:
    """The model captured whole by ``torch.export`` (non-strict, eval mode), as a GraphModule.

    Its get_attr targets are the model's parameter and buffer names. ``why``: why the recording of
    ``capture`` could not stand for the model, said in the error should torch.export fail too.
    """
    try:
        with training_mode(model, False), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model, example_inputs, strict=False)
    except Exception as e:
        recorded = f"; it was needed because the model {why}" if why else ""
        raise ValueError(
            f"granet_fx: torch.export cannot capture {type(model).__name__} whole, which channel analysis "
            f"needs: {first_line(e)}{recorded}"
        ) from e
    return program.module()


class _NeedsExport(Exception):
    """The recording cannot stand for the model on other inputs (it read a tensor's value): use torch.export."""


@dataclass
class Capture:
    """A model's aten graph, recorded while it runs on the example inputs (see ``capture``).

    A node's ``meta["val"]`` is the tensor it made, for its shape and dtype (an in-place op may have
    changed its values since; ``values`` holds the inputs of conv/linear calls as those calls read them).
    """

    graph: fx.Graph
    outputs: Any = None                                    # what the model returned
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # inputs of conv/linear calls, by node name
    exported: fx.GraphModule | None = None                 # set when torch.export made the graph instead


# Layer functions recorded as one node (as torch.export records them), not as the aten ops they decompose into:
# torch function -> (aten op, its parameter names in the function's order).
_LAYER_FUNCTIONS = {
    torch.conv1d: (aten.conv1d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    torch.conv2d: (aten.conv2d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    torch.conv3d: (aten.conv3d, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")),
    torch._C._nn.linear: (aten.linear, ("input", "weight", "bias")),
    torch.nn.functional.batch_norm: (aten.batch_norm, ("input", "running_mean", "running_var", "weight", "bias",
                                                       "training", "momentum", "eps")),
    torch.batch_norm: (aten.batch_norm, ("input", "weight", "bias", "running_mean", "running_var", "training",
                                         "momentum", "eps", "cudnn_enabled")),
    torch.nn.functional.layer_norm: (aten.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps")),
    torch.layer_norm: (aten.layer_norm, ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")),
    torch.nn.functional.group_norm: (aten.group_norm, ("input", "num_groups", "weight", "bias", "eps")),
    torch.group_norm: (aten.group_norm, ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled")),
    masked_layer_norm: (torch.ops.granet_fx.masked_layer_norm, ("input", "keep", "weight", "bias", "eps")),
    masked_rms_norm: (torch.ops.granet_fx.masked_rms_norm, ("input", "keep", "weight", "eps")),
    torch._C._nn.scaled_dot_product_attention: (
        aten.scaled_dot_product_attention,
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")),
    # kept as written: their decomposition into view replaces a -1 or a flatten by numbers (see _inferred)
    torch.flatten: (aten.flatten, ("self", "start_dim", "end_dim")),
    torch.Tensor.flatten: (aten.flatten, ("self", "start_dim", "end_dim")),
    torch.reshape: (aten.reshape, ("self", "shape")),
    torch.Tensor.reshape: (aten.reshape, ("self", "shape")),
}
# The same ops called as aten ops (the code of an ExportedProgram's module does that).
_LAYER_FUNCTIONS.update({
    op: (packet, tuple(a.name for a in op._schema.arguments))
    for packet, op in {(packet, getattr(packet, overload)) for packet, _ in _LAYER_FUNCTIONS.values()
                       for overload in packet.overloads() if overload != "out"}
})
# Reads of a tensor's values into Python that no aten op shows (item and bool do: _local_scalar_dense).
_VALUE_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TORCH_MODULES = os.path.join(_TORCH_DIR, "nn", "modules") + os.sep


def _user_line(frame) -> str:
    """The innermost line of model code (torch.nn modules included, torch's machinery not), as a traceback
    shows it."""
    while frame is not None and ((frame.f_code.co_filename.startswith(_TORCH_DIR)
                                  and not frame.f_code.co_filename.startswith(_TORCH_MODULES))
                                 or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    if frame is None:
        return ""
    code = frame.f_code
    line = linecache.getline(code.co_filename, frame.f_lineno, frame.f_globals).strip()
    return f'File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n    {line}'


@functools.cache
def _arguments(op: torch._ops.OpOverload) -> tuple[tuple[str, Any], ...]:
    """(name, default) of each argument of ``op``: its schema, read once (building it takes microseconds)."""
    return tuple((a.name, a.default_value) for a in op._schema.arguments)


@functools.cache
def _written(op: torch._ops.OpOverload) -> tuple[tuple[int, str], ...]:
    """(position, name) of each argument that ``op`` writes to."""
    return tuple((i, a.name) for i, a in enumerate(op._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


class _Recorder(TorchDispatchMode):
    """Records every aten op the model runs as a node of an fx graph (tensors mapped to nodes by identity)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.graph = fx.Graph()
        # a tensor shared by several names (tied weights) goes by the last, as torch.export names it
        self.names = {id(t): name for name, t in named_tensors(model).items()}
        self.nodes: dict[int, fx.Node] = {}
        self.alive: list[torch.Tensor] = []   # every tensor seen stays alive, so that no id is reused
        self.values: dict[str, torch.Tensor] = {}
        self.saved: dict[int, list[str]] = {}  # storage -> names of values that live in it
        self.paused = False

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Nothing is compiled in here; wrapping __torch_dispatch__ in torch._dynamo.disable, the default,
        # would import torch._dynamo on the first call (seconds) and cost time at every op.
        return False

    def node(self, t: torch.Tensor) -> fx.Node:
        n = self.nodes.get(id(t))
        if n is None:
            name = self.names.get(id(t))
            n = self.graph.get_attr(name) if name is not None else self.graph.placeholder("input")
            n.meta["val"] = t
            self.nodes[id(t)] = n
            self.alive.append(t)
        return n

    def nodes_of(self, x: Any) -> Any:
        """``x`` (an op's argument) with its tensors replaced by their nodes."""
        if isinstance(x, torch.Tensor):
            return self.node(x)
        if isinstance(x, (tuple, list)):
            return type(x)([self.nodes_of(a) for a in x])
        if isinstance(x, dict):
            return {k: self.nodes_of(v) for k, v in x.items()}
        return x

    def record(self, target, args: tuple, kwargs: dict, out: Any) -> None:
        paused, self.paused = self.paused, True   # nothing done here is an op of the model
        try:
            node_args = self.nodes_of(args)
            # made empty, then given its arguments: create_node would walk them for symbolic sizes,
            # which a recording of real tensors has none of
            node = self.graph.call_function(target)
            node.args, node.kwargs = node_args, self.nodes_of(kwargs)
            node.meta["stack_trace"] = _user_line(sys._getframe(2))
            if target in _CONVS or target is aten.linear.default:
                self.save(node_args[0], args[0])
            if not isinstance(out, (tuple, list)):
                node.meta["val"] = out
                if isinstance(out, torch.Tensor):
                    self.nodes[id(out)] = node
                    self.alive.append(out)
                return
            for i, t in enumerate(out):
                if isinstance(t, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = t
                    self.nodes[id(t)] = item
                    self.alive.append(t)
            node.meta["val"] = out
        finally:
            self.paused = paused

    def save(self, node: Any, value: Any) -> None:
        if isinstance(node, fx.Node) and isinstance(value, torch.Tensor) and node.name not in self.values:
            self.values[node.name] = value
            self.saved.setdefault(value.untyped_storage().data_ptr(), []).append(node.name)

    def keep_saved(self, func, args: tuple, kwargs: dict) -> None:
        """Before ``func`` writes to a tensor, copy the saved values that share its storage."""
        for i, name in _written(func):
            t = args[i] if i < len(args) else kwargs.get(name)
            if isinstance(t, torch.Tensor):
                for name in self.saved.pop(t.untyped_storage().data_ptr(), []):
                    self.values[name] = self.values[name].clone()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.paused:
            return func(*args, **kwargs)
        if func is aten._local_scalar_dense.default:
            raise _NeedsExport(f"reads a tensor's value ({_user_line(sys._getframe(1))})")
        if func._schema.is_mutable:
            self.keep_saved(func, args, kwargs)
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out


class _LayerCalls(TorchFunctionMode):
    """Records the calls of ``_LAYER_FUNCTIONS`` as one node each, the aten ops inside them not at all."""

    def __init__(self, recorder: _Recorder):
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _VALUE_READS and not self.recorder.paused:
            raise _NeedsExport(f"reads a tensor's value ({_user_line(sys._getframe(1))})")
        layer = _LAYER_FUNCTIONS.get(func)
        if layer is None or self.recorder.paused:
            return func(*args, **kwargs)
        packet, names = layer
        if packet is aten.reshape and len(args) > 1 and not isinstance(args[1], (list, tuple, torch.Size)):
            bound = {"self": args[0], "shape": list(args[1:])}   # x.reshape(a, b, c)
        else:
            bound = dict(zip(names, args), **kwargs)
        if packet is aten.flatten:
            if any(isinstance(v, str) or isinstance(v, (list, tuple)) for v in bound.values()):
                return func(*args, **kwargs)                     # dimension names: recorded as aten ops
            op = packet.using_ints
        elif packet in (aten.conv1d, aten.conv2d, aten.conv3d) and isinstance(bound.get("padding"), str):
            op = packet.padding
        else:
            op = packet.default
        op_args = tuple(bound[name] if name in bound else default for name, default in _arguments(op))
        self.recorder.paused = True
        try:
            out = func(*args, **kwargs)
        finally:
            self.recorder.paused = False
        self.recorder.record(op, op_args, {}, out)
        return out


def capture(model: nn.Module, example_inputs: tuple, values: bool = False) -> Capture:
    """The aten graph of ``model`` (eval mode) on ``example_inputs``, recorded while it runs once.

    Much cheaper than ``torch.export`` (one forward pass). Its get_attr targets are the model's
    parameter and buffer names; other tensors (inputs, constants) are placeholders. With ``values``,
    the inputs of conv/linear calls are kept (``Capture.values``). A model whose code reads a tensor's
    value (data-dependent control flow), or that the recording cannot follow, is captured by
    ``torch.export`` instead (``export_graph``: the same graph, or its clear error).
    """
    recorder = _Recorder(model)
    try:
        with training_mode(model, False), torch.no_grad(), recorder, _LayerCalls(recorder):
            outputs = model(*example_inputs)
        leaves = pytree.tree_leaves(outputs)
        if not all(isinstance(t, (torch.Tensor, int, float, bool, str, type(None))) for t in leaves):
            raise _NeedsExport("returns objects that are not tensors")
    except Exception as e:
        gm = export_graph(model, example_inputs, str(e) if isinstance(e, _NeedsExport) else "")
        return Capture(gm.graph, exported=gm)
    recorder.graph.output(tuple(recorder.node(t) for t in leaves if isinstance(t, torch.Tensor)))
    return Capture(recorder.graph, outputs, recorder.values if values else {})


def find_groups(gm: fx.GraphModule | Capture, literal: bool = False) -> list[ChannelGroup]:
    """The channel groups of a captured or exported graph (see ``capture``, ``export_graph``).

    ``literal``: the graph is the model's code (an ExportedProgram's module), so every size written in a
    view or expand is a number the compacted model keeps, where the model's own code would compute it again.
    """
    return _Analysis(gm, literal).run()


def channel_groups(model: nn.Module, example_inputs: Any) -> list[ChannelGroup]:
    """The channel groups of ``model`` on ``example_inputs`` (a tensor or a tuple)."""
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    return pin_fixed_splits(model, find_groups(capture(model, example_inputs)))


def layer_positions(gm: fx.GraphModule | Capture) -> dict[str, float]:
    """For each conv/linear weight (a matmul's too) of a captured or exported graph, the output positions it
    computes (batch x spatial, summed over its calls): its multiply-accumulates are that times its number of
    elements. A call with a piece of the weight (rows of a split) counts that share of the positions."""
    positions: dict[str, float] = {}
    for node in gm.graph.nodes:
        share = 1.0
        if node.op == "call_function" and (node.target in _CONVS or node.target is aten.linear.default):
            piece, _ = _row_piece(node.args[1])
            weight = _weight_of(piece)
            if weight is not None and piece is not node.args[1]:
                share = _val(node.args[1]).shape[0] / _val(piece).shape[0]
        elif node.op == "call_function" and node.target in _MATMULS:
            found = _matmul_weight(node.args[2 if node.target is aten.addmm.default else 1])
            weight = found[0] if found else None
        else:
            continue
        if weight is not None and _is_tensor(node):
            out = _val(node)
            channels = out.shape[1 if node.target in _CONVS else -1]
            positions[weight[0]] = positions.get(weight[0], 0) + out.numel() // channels * share
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


def _row_piece(node: Any) -> tuple[Any, int]:
    """(tensor, first row) of ``node`` when it is one piece of a tensor split along dimension 0 by equal
    sizes (``nn.MultiheadAttention``'s query, key and value slices of ``in_proj_weight``); else (node, 0)."""
    split = _piece_split(node)
    return (split.args[0], node.args[1] * split.args[1]) if split is not None else (node, 0)


def _piece_split(node: Any) -> fx.Node | None:
    """The split of which ``node`` is a piece, when it splits a tensor along dimension 0 by equal sizes."""
    if isinstance(node, fx.Node) and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split = node.args[0]
        if split.target is aten.split.Tensor and _arg(split, 2, "dim", 0) == 0 and isinstance(split.args[1], int):
            return split
    return None


def _matmul_weight(node: Any) -> tuple[tuple[str, str | None], bool] | None:
    """((weight, mask), transposed) of the second operand of a 2-D matmul: a parameter stored (in, out)
    (transposed), or the transpose of one stored (out, in), as ``x @ w.T`` reads it; None otherwise."""
    found = _weight_of(node)
    if found is not None:
        return found, True
    if isinstance(node, fx.Node) and node.op == "call_function" and _is_tensor(node) and _val(node).dim() == 2 \
            and (node.target in (aten.t.default, aten.numpy_T.default)
                 or (node.target is aten.permute.default and [d % 2 for d in node.args[1]] == [1, 0])
                 or (node.target is aten.transpose.int and {d % 2 for d in node.args[1:3]} == {0, 1})):
        found = _weight_of(node.args[0])
        if found is not None:
            return found, False
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _inferred(node: fx.Node, dim: int) -> bool:
    """Whether a view or reshape leaves size ``dim`` to be inferred (-1, or a flatten), so that it
    follows when channels are removed; a number written in the model's code would not."""
    if node.target is aten.flatten.using_ints:
        return True
    sizes = node.args[1] if len(node.args) > 1 else None
    return isinstance(sizes, (list, tuple)) and len(sizes) > dim and isinstance(sizes[dim], int) and sizes[dim] == -1


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_tensor(node: Any) -> bool:
    return isinstance(_val(node), torch.Tensor)


class _Analysis:
    def __init__(self, gm: fx.GraphModule | Capture, literal: bool = False):
        self.gm = gm
        self.literal = literal
        self.graph = nx.Graph()
        self.layouts: dict[fx.Node, _Layout | None] = {}
        self.members: list[tuple[Member, _Layout]] = []
        self.indexed: dict[tuple[str, int], _Layout] = {}
        self.pieces: dict[fx.Node, list[_Layout | None]] = {}   # a split's node -> the layout of each piece
        # channel counts written as numbers, in literal mode: (node, argument, position or None, their layout)
        self.literals: list[tuple[fx.Node, int, int | None, _Layout]] = []
        self.split_widths: set[fx.Node] = set()   # splits of a weight or bias whose pieces' width is in literals

    # Spaces and their edges -------------------------------------------------
    def new_space(self, name: str, size: int, dim: int) -> _Layout:
        if name not in self.graph:
            self.graph.add_node(name, size=size, pinned=[], unit=1)
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
        key = (names[0] if names else None, member.dim, member.offset)   # pieces of one weight: apart
        if key[0] is not None and key in self.indexed:
            self.couple(self.indexed[key], layout, f"{key[0]} is used with different channels")
            return
        self.indexed[key] = layout
        self.members.append((member, layout))

    # The walk ----------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        self.live = _live(self.gm.graph)
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
        if t in _MATMULS:
            return self.matmul(node)
        if t in _BATCH_NORMS:
            return self.batch_norm(node)
        if t is aten.embedding.default:
            return self.embedding(node)
        if t is operator.getitem:
            source = node.args[0]
            if isinstance(source, fx.Node) and source.target in _TUPLE_OUTPUTS and node.args[1] == 0:
                return self.layouts.get(source)
            if source in self.pieces:
                return self.pieces[source][node.args[1]]
            return None
        if not _is_tensor(node) and not isinstance(_val(node), (tuple, list)):
            return None  # sizes and other non-tensor values
        inputs = [a for a in node.all_input_nodes if self.layouts.get(a) is not None]
        if not inputs:
            return None
        if t in _CHANNELWISE:
            return self.layouts[node.args[0]]
        if t in _SPLITS:
            return self.split_pieces(node)
        if t in _SPATIAL:
            layout = self.layouts[node.args[0]]
            if layout.dim < _val(node.args[0]).dim() - _SPATIAL[t]:
                return layout
        elif t in _RESHAPES:
            return self.reshape(node)
        elif t in _TRANSPOSES:
            return self.transpose(node)
        elif t is aten.unsqueeze.default:
            return self.unsqueeze(node)
        elif t is aten.expand.default:
            return self.expand(node)
        elif t is aten.slice.Tensor and _arg(node, 1, "dim", 0) % _val(node.args[0]).dim() != \
                self.layouts[node.args[0]].dim:
            return self.layouts[node.args[0]]          # a slice along another dimension (rotary embeddings)
        elif t is aten.select.int:
            return self.select(node)
        elif t in _PADS:
            return self.pad(node)
        elif t in (aten.layer_norm.default, masked_layer_norm, masked_rms_norm):
            return self.layer_norm(node)
        elif t is aten.scaled_dot_product_attention.default:
            return self.attention(node)
        elif t in _REDUCTIONS:
            return self.reduction(node)
        elif t is aten.cat.default:
            return self.cat(node)
        elif isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags:
            return self.pointwise(node)
        return self.unknown(node)

    def unknown(self, node: fx.Node, why: str = "feeds") -> None:
        if node not in self.live:
            return None          # nothing the model returns or writes depends on it: no channel need stay
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
        """``F.linear`` with a parameter for its weight, or with rows ``first...`` of one (a piece of a split)."""
        x, (piece, first) = node.args[0], _row_piece(node.args[1])
        weight = _weight_of(piece)
        bias, bias_first = _row_piece(_arg(node, 2, "bias"))
        if weight is None or (bias is not None and _weight_of(bias) is None):
            return self.unknown(node)
        bias_name = bias.target if bias is not None else None
        # a piece of a bias at other rows than the weight's (separate query, key and value weights, one bias):
        # its channels are only sliced; a folded constant goes only to a bias as long as the whole weight
        apart = bias_name is not None and bias_first != first
        whole = bias_name is not None and _val(bias).shape[0] == _val(piece).shape[0]
        layout = self.layouts.get(x)
        if layout is not None:
            if layout.dim == _val(x).dim() - 1:
                self.add_member(Member("column", weight[0], bias_name if whole else None, weight[1], node=x.name,
                                       node_dim=layout.dim), layout)
            else:
                self.pin(layout, f"feeds {_describe(node)} along another dimension")
        name = weight[0] if not first else f"{weight[0]} [{first}:]"
        out = self.layer_output(node, name, _val(node.args[1]).shape[0], _val(node).dim() - 1)
        self.add_member(Member("row", weight[0], None if apart else bias_name, weight[1], offset=first,
                               split=_pieces(out)), out)
        if apart:
            self.add_member(Member("param", bias_name, offset=bias_first), out)
        if self.literal:       # the width of the pieces of a split weight or bias: a number compact rewrites
            splits = {_piece_split(node.args[1]), _piece_split(_arg(node, 2, "bias"))} - {None}
            for split in splits - self.split_widths:
                self.split_widths.add(split)
                self.literals.append((split, 1, None, out))
        return out

    def matmul(self, node: fx.Node) -> _Layout | None:
        """``addmm(bias, x, w)``, ``mm(x, w)`` or ``matmul(x, w)`` with a parameter for ``w``: a linear layer, its
        weight stored (in, out) as in HF's ``Conv1D`` (GPT-2) or read transposed, ``x @ weight.T`` (Falcon)."""
        bias, x, mat2 = node.args[:3] if node.target is aten.addmm.default else (None, *node.args[:2])
        found, bias_name = _matmul_weight(mat2), _weight_of(bias)
        if found is None or (bias is not None and (bias_name is None or _val(bias).dim() != 1)) \
                or _val(x).dim() < 2 or (_val(x).dim() > 2 and node.target is not aten.matmul.default) \
                or any(_arg(node, i, k, 1) != 1 for i, k in ((3, "beta"), (4, "alpha"))):
            return self.unknown(node)
        last = _val(x).dim() - 1
        (weight, mask), transposed = found
        bias_name = bias_name[0] if bias_name else None
        layout = self.layouts.get(x)
        if layout is not None:
            if layout.dim == last:
                self.add_member(Member("column", weight, bias_name, mask, node=x.name, node_dim=last,
                                       transposed=transposed), layout)
            else:
                self.pin(layout, f"feeds {_describe(node)} along another dimension")
        out = self.layer_output(node, weight, _val(node).shape[-1], last)
        self.add_member(Member("row", weight, bias_name, mask, transposed=transposed, split=_pieces(out)), out)
        return out

    def layer_output(self, node: fx.Node, name: str, size: int, dim: int) -> _Layout:
        """A layer's output channels: one space, or one space per piece where the model's code splits them
        into equal pieces (a fused query-key-value projection), so that each piece finds its own partners."""
        cuts = _split_points(node, dim)
        if len(cuts) < 2 or cuts[-1] != size or len(set(b - a for a, b in zip([0, *cuts], cuts))) != 1:
            return self.new_space(name, size, dim)
        return _Layout(dim, tuple(self.new_space(f"{name} [{a}:{b}]", b - a, dim).segments[0]
                                  for a, b in zip([0, *cuts], cuts)))

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

    def layer_norm(self, node: fx.Node) -> _Layout | None:
        """A layer (or RMS) norm over the last dimension: over the channels, its scale and shift are members
        (and its ``keep`` buffer, for the masked ops), over another dimension it acts on each channel alone;
        the output has the input's channels."""
        layout = self.layouts.get(node.args[0])
        if node.target in (masked_layer_norm, masked_rms_norm):
            keep, weight = _arg(node, 1, "keep"), _arg(node, 2, "weight")
            bias = _arg(node, 3, "bias") if node.target is masked_layer_norm else None
            shape = [_val(node).shape[-1]]
        else:
            shape, weight, bias, keep = _arg(node, 1, "normalized_shape"), _arg(node, 2, "weight"), \
                _arg(node, 3, "bias"), None
        if layout is not None and len(shape) == 1 and layout.dim != _val(node).dim() - 1:
            return layout
        names = [_weight_of(t) if t is not None else None for t in (weight, bias, keep)]
        if layout is None or layout.dim != _val(node).dim() - 1 or len(shape) != 1 or weight is None \
                or any(t is not None and n is None for t, n in zip((weight, bias, keep), names)) \
                or any(s.repeat != 1 or s.unit != 1 for s in layout.segments):
            return self.unknown(node)
        weight, bias, keep = (n[0] if n else None for n in names)
        self.add_member(Member("norm", weight, bias, mask=keep, layer_norm=True), layout)
        return layout

    def embedding(self, node: fx.Node) -> _Layout | None:
        """An embedding lookup: a space of its own, the table's columns (dimension 1)."""
        table = _weight_of(node.args[0])
        if table is None or _val(node.args[0]).dim() != 2:
            return self.unknown(node)
        out = self.new_space(f"{table[0]} (embedding)", _val(node.args[0]).shape[1], _val(node).dim() - 1)
        self.add_member(Member("param", table[0], axis=1), out)
        return out

    def parameter(self, node: fx.Node, layout: _Layout, axis: int) -> bool:
        """Whether ``node`` is a parameter or buffer (or a broadcast or copy of one) with ``layout``'s channels
        along ``axis``; if so it becomes a member of them."""
        while node.op == "call_function" and (node.target in _CHANNELWISE or node.target is aten.expand.default):
            before, after = _val(node.args[0]).shape, _val(node).shape
            axis -= len(after) - len(before)
            if axis < 0 or before[axis] != after[axis + len(after) - len(before)]:
                return False
            node = node.args[0]
        width = sum(s.size * s.repeat for s in layout.segments)
        if node.op != "get_attr" or not 0 <= axis < _val(node).dim() or _val(node).shape[axis] != width \
                or any(s.repeat != 1 or s.unit != 1 for s in layout.segments):
            return False
        self.add_member(Member("param", node.target, axis=axis), layout)
        return True

    def split_pieces(self, node: fx.Node) -> None:
        """A split into pieces (read by getitem): along another dimension each piece has the channels;
        along the channels each piece must be whole segments (see ``layer_output``)."""
        layout = self.layouts[node.args[0]]
        d = _arg(node, 2, "dim", 0) % _val(node.args[0]).dim()
        widths = [t.shape[d] for t in _val(node)]
        if d != layout.dim:
            self.pieces[node] = [layout] * len(widths)
            return None
        starts = [0, *itertools.accumulate(widths)]
        pieces = [_piece(layout, a, b) for a, b in zip(starts, starts[1:])]
        if any(p is None for p in pieces):
            return self.unknown(node)
        if self.literal:
            if isinstance(node.args[1], int):      # one size for every piece: they lose the same channels
                for p in pieces[1:]:
                    self.couple(pieces[0], p, f"pieces of different channels in {_describe(node)}")
                self.literals.append((node, 1, None, pieces[0]))
            else:
                self.literals += [(node, 1, i, p) for i, p in enumerate(pieces)]
        self.pieces[node] = pieces
        return None

    def select(self, node: fx.Node) -> _Layout | None:
        """One position along another dimension (a class token): the channels stay."""
        layout = self.layouts[node.args[0]]
        d = _arg(node, 1, "dim") % _val(node.args[0]).dim()
        return self.unknown(node) if d == layout.dim else _Layout(layout.dim - (d < layout.dim), layout.segments)

    def pad(self, node: fx.Node) -> _Layout | None:
        """Padding along other dimensions (a key of zeros added to every head, a border of an image): the
        channels stay, each padded alike. (A recorded graph has ``constant_pad_nd`` or a reflection or
        replication pad; an exported one ``pad``, with its mode.)"""
        layout = self.layouts[node.args[0]]
        amounts = node.args[1]
        rank = _val(node.args[0]).dim()
        padded = {rank - 1 - i // 2 for i, a in enumerate(amounts) if a != 0}   # pairs from the last dimension
        return self.unknown(node) if layout.dim in padded else layout

    # Shapes ---------------------------------------------------------------------
    def reshape(self, node: fx.Node) -> _Layout | None:
        out = self._reshape(node)
        if out is not None and self.literal and not _inferred(node, out.dim):
            self.literals.append((node, 1, out.dim, out))     # a number compact rewrites
        return out

    def _reshape(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts[node.args[0]]
        before, after = tuple(_val(node.args[0]).shape), tuple(_val(node).shape)
        d = layout.dim
        if after[:d + 1] == before[:d + 1]:
            return layout                                            # only dimensions after the channels change
        if len(after) == d + 1 and after[:d] == before[:d] and after[d] == math.prod(before[d:]):
            inner = math.prod(before[d + 1:])                        # a flatten of the channels and what follows
            if any(s.unit > 1 for s in layout.segments) and not _inferred(node, d) and not self.literal:
                return self.unknown(node, "fixes the width of the merged heads in")
            return _Layout(d, tuple(replace(s, repeat=s.repeat * inner) for s in layout.segments))
        tail = before[d:]
        if len(after) >= len(tail) and after[len(after) - len(tail):] == tail:
            return _Layout(len(after) - len(tail), layout.segments)  # only dimensions before the channels change
        if len(after) == len(before) - 1 and d + 1 < len(before) and after[:d] == before[:d] \
                and after[d] == before[d] * before[d + 1] and after[d + 1:] == before[d + 2:]:
            # the channels merged with the dimension after them (grouped-query attention repeats key and
            # value heads so): each entry now repeats that many times
            return _Layout(d, tuple(replace(s, repeat=s.repeat * before[d + 1]) for s in layout.segments))
        if len(after) == len(before) + 1 and after[:d] == before[:d] and after[d + 2:] == before[d + 1:] \
                and after[d] * after[d + 1] == before[d] and len(layout.segments) == 1:
            return self.split(layout.segments[0], d, after[d], after[d + 1], node)
        return self.unknown(node)

    def split(self, segment: _Segment, dim: int, heads: int, width: int, node: fx.Node) -> _Layout | None:
        """Channels split into ``heads`` x ``width`` (attention heads): the heads carry the layout, and
        the space's channels can only go a head (``width`` channels) at a time."""
        space = self.graph.nodes[segment.space]
        if segment.repeat != 1 or segment.unit != 1 or space["unit"] not in (1, width):
            return self.unknown(node)
        if not _inferred(node, dim) and not self.literal:
            return self.unknown(node, "fixes the number of heads in")   # the compacted model would keep it
        space["unit"] = width
        return _Layout(dim, (replace(segment, size=heads, unit=width),))

    def transpose(self, node: fx.Node) -> _Layout | None:
        layout = self.layouts[node.args[0]]
        rank = _val(node.args[0]).dim()
        if node.target is aten.transpose.int:
            a, b = (d % rank for d in node.args[1:3])
            order = list(range(rank))
            order[a], order[b] = b, a
        else:
            order = [d % rank for d in node.args[1]]
        return _Layout(order.index(layout.dim), layout.segments)

    def unsqueeze(self, node: fx.Node) -> _Layout:
        layout = self.layouts[node.args[0]]
        at = node.args[1] % _val(node).dim()
        return _Layout(layout.dim + (at <= layout.dim), layout.segments)

    def expand(self, node: fx.Node) -> _Layout | None:
        """New or broadcast dimensions, not the channels: the layout moves by the new leading dimensions."""
        layout = self.layouts[node.args[0]]
        before, after = _val(node.args[0]).shape, _val(node).shape
        d = layout.dim + len(after) - len(before)
        if after[d] != before[layout.dim]:
            return self.unknown(node)
        out = _Layout(d, layout.segments)
        if self.literal and node.args[1][d] != -1:
            self.literals.append((node, 1, d, out))           # a number compact rewrites
        return out

    def attention(self, node: fx.Node) -> _Layout | None:
        """scaled_dot_product_attention: the heads of query, key and value line up, and the output's
        are those of value; the heads are dimension -3."""
        q, k, v = (self.layouts.get(a) for a in node.args[:3])
        mask = _arg(node, 3, "attn_mask")
        rank = _val(node).dim()
        if any(l is None or l.dim != rank - 3 for l in (q, k, v)) or self.layouts.get(mask) is not None \
                or _arg(node, 7, "enable_gqa", False):
            return self.unknown(node)
        if _is_tensor(mask) and _val(mask).dim() >= 3 and _val(mask).shape[-3] != 1:
            return self.unknown(node, "meets a bias per head of unknown origin in")   # relative position biases
        self.couple(k, v, f"key and value heads differ in {_describe(node)}")
        if q.shape() != k.shape() and len(q.segments) == len(k.segments) == 1 and q.segments[0].repeat == 1 \
                and q.segments[0].size == k.segments[0].size * k.segments[0].repeat \
                and q.segments[0].unit == k.segments[0].unit > 1:
            # grouped-query attention: each key/value head serves ``repeat`` query heads, which go with it
            space = self.graph.nodes[q.segments[0].space]
            width = q.segments[0].unit * k.segments[0].repeat
            if space["unit"] in (q.segments[0].unit, width):
                space["unit"] = width
                self.graph.add_edge(q.segments[0].space, k.segments[0].space)
                return v
        self.couple(q, k, f"query and key heads differ in {_describe(node)}")
        return v

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
        dim = _arg(node, 1, "dim", 0) % _val(node).dim()
        known = [(t, self.layouts.get(t)) for t in node.args[0]]
        known = [(t, l) for t, l in known if l is not None]
        first = known[0][1]
        # a parameter along the channels, concatenated along another dimension (a class token)
        tensors = [t for t in node.args[0] if self.layouts.get(t) is not None
                   or first.dim == dim or not self.parameter(t, first, first.dim)]
        layouts = [self.layouts.get(t) for t in tensors]
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
                if 0 <= position < v.dim() and v.shape[position] != 1 and not self.parameter(arg, result, position):
                    return self.unknown(node, "meets channels of unknown origin in")
        return result

    # Components --------------------------------------------------------------
    def literal_size(self, node: fx.Node, index: int, position: int | None, layout: _Layout,
                     by_space: dict[str, ChannelGroup], units_of: dict[str, int]) -> None:
        """A channel count written as a number: each group of its layout learns by how much it shrinks per
        channel removed; if the number is not what the groups add up to, they are pinned."""
        factors: dict[int, int] = {}
        for s in layout.segments:
            key = id(by_space[s.space])
            factors[key] = factors.get(key, 0) + s.repeat * units_of[s.space] // s.unit
        groups = {id(g): g for g in by_space.values()}
        value = _literal(node, index, position)
        exact = all(units_of[s.space] % s.unit == 0 for s in layout.segments) and isinstance(value, int) \
            and value == sum(f * groups[k].size for k, f in factors.items())
        for key, factor in factors.items():
            if exact:
                groups[key].literals.append((node.name, index, position, factor))
            elif f"fixes the number of channels in {_describe(node)}" not in groups[key].pinned:
                groups[key].pinned.append(f"fixes the number of channels in {_describe(node)}")

    def groups(self) -> list[ChannelGroup]:
        order = {space: i for i, space in enumerate(self.graph.nodes)}
        by_space: dict[str, ChannelGroup] = {}
        units_of: dict[str, int] = {}
        groups = []
        for component in sorted(nx.connected_components(self.graph), key=lambda c: min(order[s] for s in c)):
            spaces = sorted(component, key=order.get)
            # a space split into heads goes a head at a time (with grouped-query attention, a query
            # space a group of heads at a time); the spaces joined to it channel by channel, likewise
            heads = {self.graph.nodes[s]["unit"] for s in spaces} - {1}
            for s in spaces:
                units_of[s] = self.graph.nodes[s]["unit"] if self.graph.nodes[s]["unit"] > 1 else max(heads, default=1)
            sizes = [self.graph.nodes[s]["size"] // units_of[s] for s in spaces]
            group = ChannelGroup(size=sizes[0])
            if len(set(sizes)) > 1 or any(self.graph.nodes[s]["size"] % units_of[s] for s in spaces):
                group.pinned.append(f"attention heads of different widths ({sorted(heads)}) meet")
            groups.append(group)
            for s in spaces:
                group.pinned += [r for r in self.graph.nodes[s]["pinned"] if r not in group.pinned]
                by_space[s] = group
        for node, index, position, layout in self.literals:
            self.literal_size(node, index, position, layout, by_space, units_of)
        for member, layout in self.members:
            for offset, segment in layout.with_offsets():
                # a group's channel is ``unit`` channels of each space (a head): entries of the segment
                repeat = segment.repeat * units_of[segment.space] // segment.unit
                by_space[segment.space].members.append(replace(member, offset=member.offset + offset,
                                                               repeat=repeat))
        return groups


def _live(graph: fx.Graph) -> set[fx.Node]:
    """The nodes that the outputs or an op that writes to a tensor depend on (what ``nn.MultiheadAttention``
    computes for ``need_weights=True`` when the caller drops the weights is not)."""
    todo = [n for n in graph.nodes if n.op == "output" or (isinstance(n.target, torch._ops.OpOverload)
                                                         and n.target._schema.is_mutable)]
    live: set[fx.Node] = set()
    while todo:
        n = todo.pop()
        if n not in live:
            live.add(n)
            todo += n.all_input_nodes
    return live


def _literal(node: fx.Node, index: int, position: int | None) -> Any:
    value = node.args[index]
    return value if position is None else value[position]


def _split_points(node: fx.Node, dim: int) -> list[int]:
    """Where the model's code splits dimension ``dim`` of ``node`` into pieces (the ends of the pieces), through
    views that keep it the last dimension; [] if it does not."""
    for user in node.users:
        if user.target in _SPLITS and _is_tensor(node) and _arg(user, 2, "dim", 0) % _val(node).dim() == dim:
            return list(itertools.accumulate(t.shape[dim] for t in _val(user)))
        if user.target in _RESHAPES and _is_tensor(user) and dim == _val(node).dim() - 1 \
                and _val(user).shape[-1] == _val(node).shape[-1]:
            cuts = _split_points(user, _val(user).dim() - 1)
            if cuts:
                return cuts
    return []


def _pieces(layout: _Layout) -> int:
    """The number of pieces a layer's output is split into (see ``layer_output``), 0 for one space."""
    return len(layout.segments) if len(layout.segments) > 1 else 0


def _piece(layout: _Layout, start: int, end: int) -> _Layout | None:
    """Positions ``start`` to ``end`` along the channels of ``layout``, if they are whole segments."""
    inside = tuple(s for o, s in layout.with_offsets() if start <= o and o + s.size * s.repeat <= end)
    return _Layout(layout.dim, inside) if inside and sum(s.size * s.repeat for s in inside) == end - start else None


def split_owner(model: nn.Module, weight: str) -> nn.Module | None:
    """The module that splits the output of layer ``weight`` by its attribute ``split_size`` (one piece's
    width): the module holding the weight (``SplitHeadsAttention``'s ``in_proj_weight``), or else its parent,
    as HF's GPT-2 attention splits its fused ``c_attn``."""
    holder = weight.rpartition(".")[0]
    for name in (holder, holder.rpartition(".")[0]):
        try:
            owner = model.get_submodule(name)
        except AttributeError:
            return None
        # a traced module's code holds the size as a number
        if isinstance(getattr(owner, "split_size", None), int) and not isinstance(owner, fx.GraphModule):
            return owner
        if not name:
            return None
    return None


def pin_fixed_splits(model: nn.Module, groups: list[ChannelGroup]) -> list[ChannelGroup]:
    """Pin the groups of a split layer's pieces unless ``compact`` can rewrite the split: every piece must lose
    the same channels (all in one group) and the piece width must be an attribute it knows (``split_owner``)."""
    where: dict[str, set[int]] = {}
    for g in groups:
        for r in g.rows:
            if r.split:
                where.setdefault(r.weight, set()).add(id(g))
    for g in groups:
        for r in g.rows:
            if r.split and (len(where[r.weight]) > 1
                            or getattr(split_owner(model, r.weight), "split_size", None) != piece_width(model, r)):
                reason = f"the model's code splits the output of {r.weight} at sizes compaction cannot change"
                if reason not in g.pinned:
                    g.pinned.append(reason)
    return groups


def piece_width(model: nn.Module, row: Member) -> int:
    """The width of one piece of a split row's layer output, as its weight is now."""
    return model.get_parameter(row.weight).shape[row.dim] // row.split


def _describe(node: fx.Node) -> str:
    """An op and the line of model code it comes from, for pinning reasons."""
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    lines = [l.strip() for l in (node.meta.get("stack_trace") or "").splitlines() if l.strip()]
    return f"{name} at `{lines[-1]}`" if lines and not lines[-1].startswith("File ") else name
