"""Trace a model into fx graphs whose conv/linear weights are visible.

Conv and linear modules are traced through, so their weight becomes a
``get_attr`` node feeding a ``conv2d``/``linear`` call that later passes can
rewrite (a subclass with its own forward, like Falcon's ``x @ self.weight.T``,
too). A parametrized weight (``nn.utils.parametrize``, e.g. ``weight_norm``)
shows its original parameters as get_attr nodes that feed the parametrization. Other torch.nn modules (batch norm, dropout, attention, ...) stay
``call_module`` leaves and keep their train/eval behaviour.

A model that does not trace whole is traced piecewise: a submodule whose code
fx cannot trace becomes an opaque leaf of its parent's graph and is then
traced on its own, down to single conv/linear layers if need be. Every
conv/linear that runs through ``Module.__call__`` ends up in some graph.

HF's ``Conv1D`` (GPT-2) is traced with a forward that reads its output width
off its weight: its own code reads the attribute ``nf``, which fx would write
into the graph as a number that compaction could not change.

``SplitHeadsAttention`` (``attention``) stays a call and is not traced: its
code reads ``split_size``, which fx would write into the graph as a number;
its weights are masked by hooks, as those of ``nn.MultiheadAttention`` are.

Modules chosen to be kept (``keep``) stay calls in their parent's graph and
are traced on their own, so that wrappers working on module calls (FSDP2's
``fully_shard``, activation checkpointing) still see them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import fx, nn
from torch.nn.utils import parametrize
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from .attention import SplitHeadsAttention
from .layer_norms import MaskedRMSNorm
from .ops import WEIGHT_MODULES, weight_uses


@dataclass
class Piece:
    """A traced region: the GraphModule now living at ``prefix`` in the rewritten model."""

    prefix: str
    module: fx.GraphModule

    def global_name(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target


# Modules whose own code fx traces, so that their weights show as get_attr nodes.
_TRACED_THROUGH = WEIGHT_MODULES + (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear,
                                    parametrize.ParametrizationList)


class _Tracer(fx.Tracer):
    """Traces through conv/linear modules; remembers the innermost module that failed."""

    def __init__(self, opaque: set[str] = frozenset(), keep: Callable[[nn.Module, str], bool] | None = None):
        super().__init__()    # (no arguments is how torch re-creates it when unpickling)
        self.opaque = opaque
        self.keep = keep
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque or (self.keep is not None and self.keep(m, qualname)):
            return True
        if isinstance(m, _TRACED_THROUGH):
            return False
        if isinstance(m, MaskedRMSNorm):    # a call, so that restoring its class restores its own forward
            return True
        if isinstance(m, SplitHeadsAttention):    # its code reads split_size, which compaction rewrites
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                qualname = self.path_of_module(m)
                if not self.is_leaf_module(m, qualname):
                    self.failed_in = qualname
            raise


def is_conv1d(m: nn.Module) -> bool:
    """Whether ``m`` is HF's ``Conv1D``: a linear layer with its weight stored (in, out), ``nx`` by ``nf``."""
    weight = getattr(m, "weight", None)
    return type(m).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
        and all(isinstance(getattr(m, a, None), int) for a in ("nx", "nf"))


def _conv1d_forward(self, x):
    """What HF's ``Conv1D.forward`` computes, with the output width read off the weight."""
    out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
    return out.view(x.size()[:-1] + (self.weight.size(1),))


@contextlib.contextmanager
def _conv1d_sized_by_weight(module: nn.Module) -> Iterator[None]:
    """While tracing, the ``Conv1D`` classes in ``module`` run ``_conv1d_forward``."""
    classes = {type(m) for m in module.modules() if is_conv1d(m)}
    saved = {c: c.__dict__["forward"] for c in classes if "forward" in c.__dict__}
    for c in classes:
        c.forward = _conv1d_forward
    try:
        yield
    finally:
        for c in classes:
            if c in saved:
                c.forward = saved[c]
            else:
                del c.forward


def has_weight_modules(module: nn.Module) -> bool:
    """True when ``module`` may run a weight op: it holds a parameter of two or more
    dimensions (a conv/linear weight, or one that ``addmm`` uses like HF's ``Conv1D``)."""
    return any(p.dim() >= 2 for p in module.parameters())


@contextlib.contextmanager
def training_mode(module: nn.Module, mode: bool) -> Iterator[None]:
    """Put every submodule in train or eval mode, then restore each one's own mode."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(mode)
    try:
        yield
    finally:
        for m, was_training in saved:
            m.training = was_training


def _trace_graph(module: nn.Module, keep=None) -> tuple[fx.Graph, set[str]] | None:
    """Trace ``module``, turning submodules that fx cannot trace into opaque leaves.

    A submodule fails when its code does not trace, or when its graph depends on
    train/eval mode (fx would freeze one branch of ``self.training``). Returns
    None when the module's own code is such a failure.
    """
    opaque: set[str] = set()
    n_modules = sum(1 for _ in module.modules())
    for _ in range(n_modules + 1):
        graphs = []
        for mode in (True, False):
            tracer = _Tracer(opaque, keep)
            try:
                with training_mode(module, mode), _conv1d_sized_by_weight(module):
                    graphs.append(tracer.trace(module))
            except Exception:
                culprit = tracer.failed_in
                break
        else:
            culprit = _first_difference(*graphs)
            if culprit == "":
                _drop_string_annotations(graphs[0])
                return graphs[0], opaque
        if culprit is None or culprit in opaque:
            return None
        opaque.add(culprit)
    return None


def _drop_string_annotations(graph: fx.Graph) -> None:
    """Forget type annotations that are strings (``from __future__ import annotations``).

    fx would write them into the generated code's globals as strings, which
    makes the GraphModule impossible to pickle with ``torch.save``.
    """
    for node in graph.nodes:
        if isinstance(node.type, str):
            node.type = None


def _first_difference(a: fx.Graph, b: fx.Graph) -> str | None:
    """"" when the graphs are the same, else the innermost module whose code made them differ
    (None when that is the traced module's own code)."""
    nodes_b = list(b.nodes)
    for i, x in enumerate(a.nodes):
        y = nodes_b[i] if i < len(nodes_b) else None
        if y is not None and (x.op, x.target, str(x.args), str(x.kwargs)) == (y.op, y.target, str(y.args), str(y.kwargs)):
            continue
        stack = x.meta.get("nn_module_stack") or {}
        return next(reversed(stack)) if stack else None
    return "" if len(nodes_b) == len(a.nodes) else None


def _graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that keeps ``module``'s own submodules, tensors and attributes.

    fx would copy only what the graph reads, into bare modules; keeping the
    original children preserves every state-dict key, module types and attributes.
    """
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        gm.add_module(name, child)
    for name, p in module._parameters.items():
        if name not in gm._parameters:
            gm.register_parameter(name, p)
    for name, b in module._buffers.items():
        if name not in gm._buffers:
            gm.register_buffer(name, b, persistent=name not in module._non_persistent_buffers_set)
    kept = dict(module.named_children())
    for key, value in vars(module).items():
        if not key.startswith("_") and key not in vars(gm) and not hasattr(type(gm), key):
            vars(gm)[key] = value
            kept[key] = value
    # GraphModule's deepcopy (gf.fold copies the model) rebuilds only what the graph reads;
    # it sets these again, so that code outside the graph still finds them (HF's conv.stride).
    gm.meta[_USER_PRESERVED_ATTRIBUTES_KEY] = kept
    gm.training = module.training
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
        getattr(gm, hooks).update(getattr(module, hooks))
    return gm


def _set_submodule(root: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, name = qualname.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, new)


def trace_pieces(module: nn.Module, prefix: str = "",
                 keep: Callable[[nn.Module, str], bool] | None = None) -> tuple[nn.Module, list[Piece]]:
    """Rewrite ``module`` into traced pieces; returns the new module and its pieces.

    The new module is a GraphModule when ``module`` traced (with its untraceable
    parts as leaves), else ``module`` itself with traced children. Submodules
    are replaced in place, so ``module`` should not be used afterwards.
    ``keep(submodule, name)`` (the name from the root) picks submodules that
    stay calls in their parent's graph and are traced on their own.
    """
    if isinstance(module, SplitHeadsAttention):
        return module, []       # stays Python (see _Tracer.is_leaf_module): its weights are masked by hooks
    join = (lambda name: f"{prefix}.{name}" if prefix else name)
    traced = _trace_graph(module, None if keep is None else (lambda m, name: keep(m, join(name))))
    if traced is None:
        pieces: list[Piece] = []
        for name, child in list(module.named_children()):
            if not has_weight_modules(child):
                continue
            new_child, sub = trace_pieces(child, join(name), keep)
            if new_child is not child:
                setattr(module, name, new_child)
            pieces += sub
        return module, pieces

    graph, _ = traced
    gm = _graph_module(module, graph)
    rewritten = bool(weight_uses(gm))
    pieces = [Piece(prefix, gm)] if rewritten else []
    leaves = [n.target for n in graph.nodes if n.op == "call_module"]
    for qualname in dict.fromkeys(leaves):
        child = module.get_submodule(qualname)
        if not has_weight_modules(child):
            continue
        new_child, sub = trace_pieces(child, join(qualname), keep)
        if new_child is not child:
            _set_submodule(module, qualname, new_child)
            _set_submodule(gm, qualname, new_child)
        pieces += sub
    return (gm if rewritten else module), pieces
