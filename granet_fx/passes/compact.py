"""The compaction pass: physically remove the channels that compute nothing.

``compact(model, example_inputs)`` returns a smaller, ordinary (mask-free)
copy of a model for inference. It removes a channel of a ``ChannelGroup``
(see ``channel_groups``) wherever that is exact:

- *unread*: every layer that reads the channel has all-zero weights for it,
  so its value does not matter; or
- *constant*: every weight row that makes it is zero, so it carries a
  constant (its bias, through batch norm and activations) whatever the input.
  The constant is read off the graph on the example inputs (and on a second,
  random input, to be sure it does not vary), and added to the bias of each
  layer that reads it. That is exact for linear layers and unpadded
  convolutions, or when the constant is zero; a zero-padded convolution sees
  the constant only inside the image, so such a channel is kept.

A channel that a layer norm reads is neither: ``sparsify`` gives the layer
norms of a prunable group a ``keep`` buffer (``layer_norms``), and a channel
goes only where every one of them leaves it out; after the cut they are plain
layer norms over the channels left. A group normalised by a plain layer norm
keeps its channels.

Channels of pinned groups (reaching the model output, or an operation the
analysis does not follow) and one channel of every group are always kept.
What is removed is sliced out of every tensor indexed by it: weight rows and
biases, batch-norm parameters and running statistics, the columns of the
layers that read it, and the ``groups`` of depthwise convolutions. The
result is checked against the masked model on the example inputs; it is
exact in eval mode (batch norm uses its running statistics).
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..fold import fold
from ..sparsify import INFO_ATTR, _run, unwrap
from .channel_groups import (
    Capture, ChannelGroup, Member, capture, find_groups, layer_positions, named_tensors, piece_width,
    pin_fixed_splits, split_owner,
)
from .attention import SplitHeadsAttention
from .layer_norms import unmask_layer_norms
from .trace import is_conv1d
from .ops import WEIGHT_OPS, weight_operand

# Conv/linear calls whose arguments may need rewriting: torch-level (traced by sparsify) and aten-level
# (a graph from torch.export); both take (input, weight, bias, stride, padding, dilation, groups).
_LAYER_CALLS = set(WEIGHT_OPS) | {getattr(getattr(torch.ops.aten, op), overload)
                                  for op in ("conv1d", "conv2d", "conv3d") for overload in ("default", "padding")} \
    | {torch.ops.aten.linear.default}

REPORT_ATTR = "_granet_fx_compaction"


@dataclass
class CompactionReport:
    """What ``compact`` removed, what it had to keep, and how close the result is."""

    channels: int                      # channels in all groups before
    removed: int                       # channels removed
    kept: dict[str, int] = field(default_factory=dict)  # reason -> channels that compute nothing but stay
    macs_before: int = 0               # conv/linear multiply-accumulates on the example inputs
    macs_after: int = 0
    max_abs_error: float = 0.0         # largest output difference from the masked model, example inputs

    @property
    def flops_ratio(self) -> float:
        """FLOPs of the compacted model over those of the model before (1.0 = nothing removed)."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    def __str__(self) -> str:
        lines = [
            f"compaction: removed {self.removed} of {self.channels} channels; conv/linear FLOPs "
            f"{self.flops_ratio:.4f} x before ({self.macs_before:,} -> {self.macs_after:,} MACs)",
        ]
        for reason, n in self.kept.items():
            lines.append(f"  kept {n} channel{'s' if n != 1 else ''} computing nothing, because {reason}")
        lines.append(f"max abs error vs the masked model on the example inputs: {self.max_abs_error:.3g}")
        return "\n".join(lines)


def compaction_report(model: nn.Module) -> CompactionReport:
    """The report of a model returned by ``compact``."""
    report = getattr(unwrap(model), REPORT_ATTR, None)
    if report is None:
        raise ValueError(f"{type(model).__name__} was not made by granet_fx.compact")
    return report


def compact(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A smaller copy of ``model`` without the channels that compute nothing.

    ``model`` is any module: one from ``sparsify``, an ordinary one, or the
    ``module()`` of a ``torch.export`` program. ``example_inputs`` (a tensor or
    a tuple of positional inputs) is needed to capture the model's graph
    (``channel_groups.capture``) and to check the result. The copy has no masks (they are
    folded into the weights), is in eval mode, and carries a
    ``CompactionReport`` (``compaction_report(copy)``; ``print`` it).
    """
    model = unwrap(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    # fold() computes exactly what the masked model computes, so it is the reference.
    new = fold(model) if getattr(model, INFO_ATTR, None) is not None else _copy(model)
    for name in ("train", "eval"):  # ExportedProgram.module() refuses mode changes; its copy may have them
        vars(new).pop(name, None)
    new.eval()
    # a GraphModule not made by sparsify (an ExportedProgram's module) is its own code: its sizes are numbers,
    # which are rewritten where the graph analysed is that code (an aten graph with its values' shapes)
    code = isinstance(model, fx.GraphModule) and getattr(model, INFO_ATTR, None) is None
    graph = _with_values(new, inputs) if code and _typed(new) else capture(new, inputs, values=True)
    reference = graph.outputs if graph.exported is None else _run(new, inputs)
    groups = find_groups(graph, literal=code) if code else pin_fixed_splits(new, find_groups(graph))
    if graph.exported is not new:
        for g in groups:
            if g.literals:
                g.pinned.append("the model's code writes their number")
    tensors = named_tensors(new)
    positions = layer_positions(graph)
    macs_before = round(sum(n * tensors[w].numel() for w, n in positions.items()))
    values = _Probe(new, graph, inputs, {c.node for g in groups for c in g.columns})
    calls = _layer_calls(new)

    kept: Counter[str] = Counter()
    removals, folds = [], []
    nonzero = _NonZero(tensors)
    for group in groups:
        removed, group_folds = _plan(group, tensors, nonzero, values, new, calls, kept)
        if len(removed):
            removals.append((group, removed))
            folds += group_folds
    added: dict[str, str] = {}  # weight -> bias created to take a folded constant
    changed: dict[int, fx.GraphModule] = {}  # the graphs rewritten, whose code is generated once, at the end
    with torch.no_grad():
        for column, channel, constants in folds:
            _fold_constant(new, tensors, calls, column, channel, constants, added, changed)
        _slice(new, removals, added)
    _fix_sizes(new, removals, calls, changed)
    _rewrite_literals(new, removals, changed)
    changed.update((id(gm), gm) for gm in unmask_layer_norms(new, recompile=False))
    for gm in changed.values():
        gm.recompile()

    try:
        outputs = _run(new, inputs)
    except Exception as e:
        raise RuntimeError(f"granet_fx: the compacted model does not run ({e}); does the model's code "
                           "hard-code a channel count?") from e
    error = _max_abs_error(reference, outputs)
    scale = max([1.0] + [float(t.abs().max()) for t in pytree.tree_leaves(reference)
                         if isinstance(t, torch.Tensor) and t.numel()])
    if error > 1e-3 * scale:
        raise RuntimeError(f"granet_fx: compaction changed the outputs by {error:.3g}; please report this model")
    report = CompactionReport(
        channels=sum(g.size for g in groups), removed=sum(len(r) for _, r in removals), kept=dict(kept),
        macs_before=macs_before, macs_after=round(sum(n * new.get_parameter(w).numel() for w, n in positions.items())),
        max_abs_error=error,
    )
    setattr(new, REPORT_ATTR, report)
    return new


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model``. An ExportedProgram's module holds pytree specs whose copy makes torch warn
    of its own deprecated ``LeafSpec`` class, which the user can do nothing about: that warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec", category=FutureWarning)
        return copy.deepcopy(model)


# Deciding ---------------------------------------------------------------------


def _plan(group: ChannelGroup, tensors, nonzero: "_NonZero", values, model, calls, kept: Counter
          ) -> tuple[torch.Tensor, list]:
    """The channels of ``group`` to remove, and the constants to fold: [(column, channel, constants)]."""
    zero_rows = torch.ones(group.size, dtype=torch.bool)
    for r in group.rows:
        zero_rows &= ~nonzero(r, group.size)
    # No layer reads the channels: they are unread, unless pinned (read by the output or by unknown ops).
    unread = torch.full((group.size,), not group.pinned or bool(group.columns))
    for c in group.columns:
        unread &= ~nonzero(c, group.size)
    dead = zero_rows | unread
    pinned = group.pinned or [f"a layer norm takes its statistics over all of them ({m.weight})"
                              for m in group.members if m.layer_norm and m.mask is None][:1]
    if pinned:
        if dead.any():
            kept[f"the group is pinned: {pinned[0]}"] += int(dead.sum())
        return torch.zeros(0, dtype=torch.long), []
    # a masked layer norm reads the channels it keeps for its statistics: they are neither unread nor constant
    normalised = torch.zeros(group.size, dtype=torch.bool)
    for m in group.members:
        if m.layer_norm:
            normalised |= tensors[m.mask].detach()[m.indices(torch.arange(group.size))].cpu()
    unread &= ~normalised

    remove = unread.clone()
    folds = []
    for i in (zero_rows & ~unread & ~normalised).nonzero().squeeze(1).tolist():
        plan, reason = [], ""
        for c in group.columns:
            constants = _constants(values.get(c.node), c, i)
            if constants is None:
                reason = "the value varies with the input (zero rows but not a constant)"
            elif c.padded and bool((constants != 0).any()):
                reason = "a non-zero constant feeds a zero-padded convolution"
            elif bool((constants != 0).any()) and not _can_take_bias(model, calls, c):
                reason = "a constant feeds a layer without a bias to absorb it"
            else:
                plan.append((c, i, constants))
                continue
            break
        if reason:
            kept[reason] += 1
        else:
            remove[i] = True
            folds += [f for f in plan if bool((f[2] != 0).any())]
    if remove.all():
        first = int(remove.nonzero()[0])
        remove[first] = False
        folds = [f for f in folds if f[1] != first]
        kept["a group keeps at least one channel"] += 1
    return remove.nonzero().squeeze(1), folds


class _NonZero:
    """Which output channels (rows) and input channels (columns) of each weight have a non-zero entry
    (NaN counts as non-zero), both read off one pass over ``|weight|`` the first time a group asks."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self.seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def of(self, weight: str) -> tuple[torch.Tensor, torch.Tensor]:
        if weight not in self.seen:
            t = self.tensors[weight].detach()
            if t.numel():   # max |w| is 0 exactly where every entry is 0 or -0, NaN where one is NaN
                a = t.abs()
                rows, columns = a.reshape(t.shape[0], -1).amax(1) != 0, a.amax(0).reshape(t.shape[1], -1).amax(1) != 0
            else:
                rows, columns = (torch.zeros(t.shape[d], dtype=torch.bool, device=t.device) for d in (0, 1))
            self.seen[weight] = rows, columns
        return self.seen[weight]

    def __call__(self, member: Member, size: int) -> torch.Tensor:
        """For each of the group's ``size`` channels, whether ``member``'s weight has a non-zero entry for it."""
        rows, columns = self.of(member.weight)
        if member.transposed:      # a weight stored (in, out)
            rows, columns = columns, rows
        if member.role == "column":
            return columns[member.indices(torch.arange(size)).to(columns.device)].view(size, -1).any(1).cpu()
        return rows.narrow(0, member.offset, size * member.repeat).view(size, -1).any(1).cpu()


def _constants(value: tuple[torch.Tensor, torch.Tensor] | None, column: Member, channel: int) -> torch.Tensor | None:
    """The constant inputs that ``column`` reads for ``channel`` (one per position), or None if they vary."""
    if value is None:
        return None
    out = []
    for position in column.indices(torch.tensor([channel])).tolist():
        a, b = (v.narrow(column.node_dim, position, 1) for v in value)
        first = a.flatten()[0]
        if not (bool((a == first).all()) and bool((b == first).all())):
            return None
        out.append(first)
    return torch.stack(out)


class _Probe:
    """The values of the named nodes (see ``_probe``), found when first asked for: most models have no
    channel that needs them."""

    def __init__(self, model: nn.Module, graph: Capture, inputs: tuple, names: set[str]):
        self.args, self.values = (model, graph, inputs, names), None

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.values is None:
            self.values = _probe(*self.args)
        return self.values.get(name)


def _probe(model: nn.Module, graph: Capture, inputs: tuple, names: set[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Values of the named nodes on the example inputs and on a random input of the same shapes."""
    generator = torch.Generator().manual_seed(0)
    other = tuple(torch.randn(x.shape, generator=generator, dtype=x.dtype) if isinstance(x, torch.Tensor)
                  and x.is_floating_point() else x for x in inputs)
    if graph.exported is None:
        again = capture(model, other, values=True)
        if [(n.name, n.target) for n in again.graph.nodes] != [(n.name, n.target) for n in graph.graph.nodes]:
            return {}   # another path through the model's code: no value is known to be constant
        return {name: (graph.values[name], again.values[name]) for name in names if name in graph.values}
    runs = []
    for args in (inputs, other):
        seen: dict[str, torch.Tensor] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, node):
                result = super().run_node(node)
                if node.name in names:
                    seen[node.name] = result.detach()
                return result

        with torch.no_grad():
            Recorder(graph.exported).run(*args)
        runs.append(seen)
    return {name: (runs[0][name], runs[1][name]) for name in runs[0]}


# Rewriting ------------------------------------------------------------------------


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    owner, _, leaf = name.rpartition(".")
    return model.get_submodule(owner), leaf


_Calls = dict[str, list[tuple[fx.GraphModule, fx.Node, fx.Node]]]


def _layer_calls(model: nn.Module) -> _Calls:
    """Parameter name -> (graph module, call node, weight node) of each conv/linear call, in every
    GraphModule of ``model``, whose weight is that parameter."""
    calls: _Calls = {}
    for prefix, gm in model.named_modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in _LAYER_CALLS:
                continue
            w = weight_operand(node)
            if w is not None and w.op == "get_attr":
                calls.setdefault(f"{prefix}.{w.target}" if prefix else w.target, []).append((gm, node, w))
    return calls


def _can_take_bias(model: nn.Module, calls: _Calls, column: Member) -> bool:
    """Whether the layer of ``column`` has a bias, or one can be added that its calls will use."""
    if column.bias is not None:
        return True
    module, leaf = _owner(model, column.weight)
    if leaf != "weight" or getattr(module, "bias", None) is not None:
        return False
    return isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) or bool(calls.get(column.weight))


def _fold_constant(model: nn.Module, tensors, calls: _Calls, column: Member, channel: int, constants: torch.Tensor,
                   added: dict[str, str], changed: dict[int, fx.GraphModule]) -> None:
    """Add what ``column``'s layer computes from constant inputs at ``channel`` to its bias
    (creating the bias if the layer has none; ``added`` records it, ``changed`` the graphs rewritten)."""
    w = column.oriented(tensors[column.weight])
    cols = w.index_select(1, column.indices(torch.tensor([channel])).to(w.device))   # (out, repeat, *kernel)
    contribution = (cols.reshape(*cols.shape[:2], -1).sum(2) * constants.to(w)).sum(1)
    bias = column.bias or added.get(column.weight)
    if bias is None:
        module, _ = _owner(model, column.weight)
        module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        name = column.weight.rpartition(".")[0] + ".bias"
        for gm, node, weight in calls.get(column.weight, []):
            owner = weight.target.rpartition(".")[0]
            with gm.graph.inserting_before(node):
                bias = gm.graph.get_attr(f"{owner}.bias" if owner else "bias")
            if len(node.args) > 2:
                node.update_arg(2, bias)
            else:
                node.update_kwarg("bias", bias)
            changed[id(gm)] = gm
        tensors[name] = module.bias
        added[column.weight] = bias = name
    tensors[bias].add_(contribution)


def _slice(model: nn.Module, removals: list[tuple[ChannelGroup, torch.Tensor]], added: dict[str, str]) -> None:
    """Cut the removed channels out of every tensor indexed by them (``added``: biases created since)."""
    drop: dict[tuple[str, int], list[torch.Tensor]] = {}   # (tensor, dimension) -> positions removed
    for group, channels in removals:
        for m in group.members:
            names = [m.weight] if m.role == "column" else m.tensors() + [added.get(m.weight)] * (m.role == "row")
            positions = m.indices(channels)
            for name in filter(None, names):   # a bias is one-dimensional
                drop.setdefault((name, m.dim if name in (m.weight, m.mask) else 0), []).append(positions)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}   # a tied tensor is cut once, under all its names
    for module in model.modules():
        for leaf, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None:
                holders.setdefault(id(t), []).append((module, leaf))
    for (name, dim), gone in drop.items():
        module, leaf = _owner(model, name)
        old = getattr(module, leaf)
        keep = torch.ones(old.shape[dim], dtype=torch.bool)
        keep[torch.cat(gone)] = False
        new = old.detach().index_select(dim, keep.nonzero().squeeze(1).to(old.device))   # shares nothing with old
        if leaf in module._parameters:
            new = nn.Parameter(new, requires_grad=old.requires_grad)
        for module, leaf in holders.get(id(old), [(module, leaf)]):
            (module._parameters if leaf in module._parameters else module._buffers)[leaf] = new


def _fix_sizes(model: nn.Module, removals: list[tuple[ChannelGroup, torch.Tensor]], calls: _Calls,
               changed: dict[int, fx.GraphModule]) -> None:
    """Set ``groups`` of depthwise convs to their new channel count (``changed``: the graphs rewritten),
    the width of split pieces (``split_owner``), and the modules' size attributes."""
    for group, _ in removals:
        for r in group.rows:
            owner = split_owner(model, r.weight) if r.split else None
            if owner is not None:     # (in a graph that is the model's code, the split's sizes are literals)
                owner.split_size = piece_width(model, r)
            if not r.depthwise:
                continue
            channels = model.get_parameter(r.weight).shape[0]
            module, _ = _owner(model, r.weight)
            if hasattr(module, "groups"):
                module.groups = channels
            for gm, node, _ in calls.get(r.weight, []):
                if len(node.args) > 6:
                    node.update_arg(6, channels)
                else:
                    node.update_kwarg("groups", channels)
                changed[id(gm)] = gm
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.num_features = (m.running_mean if m.running_mean is not None else m.weight).shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None and len(m.normalized_shape) == 1:
            m.normalized_shape = tuple(m.weight.shape)
        elif is_conv1d(m):
            m.nx, m.nf = m.weight.shape
        elif isinstance(m, SplitHeadsAttention):
            m.resize()


def _typed(gm: fx.GraphModule) -> bool:
    """Whether every value of ``gm``'s graph has its shape recorded (``meta["val"]``), as export leaves it."""
    return all("val" in n.meta for n in gm.graph.nodes
               if n.op in ("placeholder", "get_attr", "call_function") and n.users)


def _with_values(gm: fx.GraphModule, inputs: tuple) -> Capture:
    """``gm``'s own graph, each value's ``meta["val"]`` replaced by the tensor it holds on ``inputs``
    (an exported graph's are symbolic where its batch is dynamic)."""

    class Values(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.op != "output":
                node.meta["val"] = out
            return out

    with torch.no_grad():
        Values(gm).run(*inputs)
    return Capture(gm.graph, exported=gm)


def _rewrite_literals(gm: nn.Module, removals: list[tuple[ChannelGroup, torch.Tensor]],
                      changed: dict[int, fx.GraphModule]) -> None:
    """Shrink the channel counts that the graph of ``gm``, the model's code, writes as numbers
    (``changed``: the graphs rewritten)."""
    shrink: Counter[tuple[str, int, int | None]] = Counter()
    for group, removed in removals:
        for name, index, position, factor in group.literals:
            shrink[name, index, position] += factor * len(removed)
    if not shrink:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    for (name, index, position), by in shrink.items():
        node = nodes[name]
        value = node.args[index]
        if position is None:
            node.update_arg(index, value - by)
        else:
            node.update_arg(index, [v - by if i == position else v for i, v in enumerate(value)])
    changed[id(gm)] = gm


def _max_abs_error(expected: Any, actual: Any) -> float:
    pairs = zip(pytree.tree_leaves(expected), pytree.tree_leaves(actual))
    return max([0.0] + [float((e.float() - a.float()).abs().max()) for e, a in pairs
                        if isinstance(e, torch.Tensor) and e.numel()])
