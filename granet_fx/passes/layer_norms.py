"""Layer norms over the kept channels only: what lets channel pruning reach a residual stream.

A layer norm reads every channel of its input for its mean and variance, so a
channel that no layer reads still changes the others' output while a layer
norm sees it. ``mask_layer_norms`` (for ``sparsify``) replaces each layer norm
over a removable channel group by ``granet_fx::masked_layer_norm``, which takes
the mean and variance over the channels its ``keep`` buffer marks and nothing
else. Once ``compact`` has cut the other channels out, ``keep`` is all True
and ``unmask_layer_norms`` writes a plain ``layer_norm`` over the channels
left: the same numbers, and onnxruntime's fused LayerNormalization.

RMS norms are modules written out by hand (HF's ``LlamaRMSNorm``: pow, mean,
rsqrt), which a graph shows only as those ops: ``recognise_rms_norms`` (before
tracing) makes each module that computes ``weight * x / sqrt(mean(x^2) + eps)``
a ``MaskedRMSNorm`` leaf calling ``granet_fx::masked_rms_norm``, and those that
no removable group needs get their own class back (``restore_norms``).

The ops are composite (plain torch ops, so autograd, ``torch.compile`` and ONNX
export decompose it) and stays one node in ``torch.export`` programs, where
channel analysis and compaction find it by name.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import fx, nn

_LIBRARY = torch.library.Library("granet_fx", "DEF")
_LIBRARY.define("masked_layer_norm(Tensor input, Tensor keep, Tensor? weight, Tensor? bias, float eps) -> Tensor")


def _masked_layer_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Layer norm over the last dimension, its statistics over the entries where ``keep`` is True."""
    m = keep.to(x.dtype)
    n = m.sum()
    mean = (x * m).sum(-1, keepdim=True) / n
    centred = (x - mean) * m
    y = centred * torch.rsqrt((centred * centred).sum(-1, keepdim=True) / n + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


_LIBRARY.impl("masked_layer_norm", _masked_layer_norm, "CompositeImplicitAutograd")
masked_layer_norm = torch.ops.granet_fx.masked_layer_norm.default

_LIBRARY.define("masked_rms_norm(Tensor input, Tensor keep, Tensor? weight, float eps) -> Tensor")


def _masked_rms_norm(x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMS norm over the last dimension in float32 (as HF's Llama writes it), the mean square over ``keep``."""
    m = keep.to(torch.float32)
    x32 = x.to(torch.float32)
    y = (x32 * torch.rsqrt((x32 * x32 * m).sum(-1, keepdim=True) / m.sum() + eps)).to(x.dtype)
    return weight * y if weight is not None else y


_LIBRARY.impl("masked_rms_norm", _masked_rms_norm, "CompositeImplicitAutograd")
masked_rms_norm = torch.ops.granet_fx.masked_rms_norm.default

KEEP = "channel_keep"     # the buffer, on the layer norm's module, of the channels its statistics use
_LAYER_NORMS = {torch.nn.functional.layer_norm, torch.layer_norm, torch.ops.aten.layer_norm.default}


def _graphs(model: nn.Module) -> Iterator[tuple[str, fx.GraphModule]]:
    for prefix, gm in model.named_modules():
        if isinstance(gm, fx.GraphModule):
            yield prefix, gm


def _name(prefix: str, target: str) -> str:
    return f"{prefix}.{target}" if prefix else target


def _layer_norm_call(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, str, str | None, float] | None:
    """(input, weight target, bias target, eps) of a layer norm call over one (the last) dimension with
    a weight; None for other nodes."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) is nn.LayerNorm and len(module.normalized_shape) == 1 and module.weight is not None \
                and len(node.args) == 1 and not node.kwargs:
            bias = f"{node.target}.bias" if module.bias is not None else None
            return node.args[0], f"{node.target}.weight", bias, module.eps
        return None
    if node.op != "call_function" or node.target not in _LAYER_NORMS:
        return None
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    bound = dict(zip(names, node.args), **node.kwargs)
    weight, bias, shape = bound.get("weight"), bound.get("bias"), bound.get("normalized_shape")
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in (weight, bias) if t is not None) \
            or weight is None or shape is None or len(shape) != 1:
        return None
    return bound["input"], weight.target, bias.target if bias is not None else None, bound.get("eps", 1e-5)


class MaskedLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the channels its ``channel_keep`` buffer marks. A layer norm module outside
    the traced graphs becomes one (a subclass's own forward, calling ``super().forward``, still runs)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_layer_norm(input, getattr(self, KEEP), self.weight, self.bias, self.eps)


class MaskedRMSNorm(nn.Module):
    """An RMS norm module (HF's ``LlamaRMSNorm`` and the like, recognised by ``recognise_rms_norms``) whose mean
    square is over the channels its ``channel_keep`` buffer marks; its own forward no longer runs."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return masked_rms_norm(input, getattr(self, KEEP), self.weight, self.rms_eps)


_MASKED_CLASSES: dict[type, type] = {nn.LayerNorm: MaskedLayerNorm}


def _masked_class(cls: type, mixin: type = MaskedLayerNorm) -> type:
    """``cls`` (a norm class) with ``mixin``'s forward: under its own for a layer norm (whose forward calls
    ``super().forward``), instead of it for an RMS norm."""
    if cls not in _MASKED_CLASSES:
        bases = (cls, mixin) if mixin is MaskedLayerNorm else (mixin, cls)
        _MASKED_CLASSES[cls] = type(f"Masked{cls.__name__}", bases, {"__module__": __name__})
    return _MASKED_CLASSES[cls]


def _rms_eps(module: nn.Module) -> float | None:
    """The epsilon of a module that looks like an RMS norm (a 1-D weight and nothing else), else None."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if "rmsnorm" not in type(module).__name__.lower() or not isinstance(weight, nn.Parameter) or weight.dim() != 1 \
            or not isinstance(eps, float) or len(list(module.parameters())) != 1 or list(module.children()):
        return None
    return eps


@torch.no_grad()
def recognise_rms_norms(model: nn.Module) -> list[str]:
    """Make every RMS norm module of ``model`` that computes ``weight * x / sqrt(mean(x^2) + eps)`` over the last
    dimension (checked on a random input) a ``MaskedRMSNorm`` with an all-True ``keep``; returns their names.
    Others (Gemma's ``1 + weight``, norms of other forms) stay as they are."""
    found = []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        eps = _rms_eps(module)
        if eps is None or isinstance(module, MaskedRMSNorm):
            continue
        w = module.weight
        x = torch.randn(2, 3, w.shape[0], generator=generator).to(w)
        want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
        try:
            ok = torch.allclose(module(x), want, rtol=1e-4, atol=1e-5)
        except Exception:
            ok = False
        if ok:
            _add_keep(module, w)
            module.rms_eps = eps
            module.__class__ = _masked_class(type(module), MaskedRMSNorm)
            found.append(name)
    return found


def restore_norms(model: nn.Module, keep: set[str] = frozenset()) -> None:
    """Give the masked norm modules whose weight is not named in ``keep`` their own class and forward back."""
    for name, module in model.named_modules():
        if isinstance(module, (MaskedLayerNorm, MaskedRMSNorm)) and _name(name, "weight") not in keep:
            _unmask_module(module)


def _plain_class(cls: type) -> type:
    return next((plain for plain, masked in _MASKED_CLASSES.items() if masked is cls), cls)


def _add_keep(module: nn.Module, weight: torch.Tensor) -> None:
    """An all-True ``keep`` buffer on ``module``, one entry per entry of the norm's ``weight``."""
    if KEEP not in module._buffers:
        module.register_buffer(KEEP, torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device))


def _unmask_module(module: nn.Module) -> None:
    """A masked norm module back to its own class (and forward), without its ``keep`` buffer."""
    module.__class__ = _plain_class(type(module))
    del module._buffers[KEEP]


def mask_layer_norms(model: nn.Module, weights: set[str]) -> dict[str, str]:
    """Replace the layer norms whose weight is named in ``weights`` by ``masked_layer_norm`` with an
    all-True ``keep`` buffer beside the weight: the calls in traced graphs, and layer norm modules that
    run outside them. Returns weight name -> keep buffer name."""
    keeps: dict[str, str] = {}
    for prefix, gm in _graphs(model):
        changed = False
        for node in list(gm.graph.nodes):
            call = _layer_norm_call(gm, node)
            if call is None or _name(prefix, call[1]) not in weights:
                continue
            x, weight, bias, eps = call
            owner = weight.rpartition(".")[0]
            module = gm.get_submodule(owner)
            _add_keep(module, gm.get_parameter(weight))
            with gm.graph.inserting_before(node):
                operands = [gm.graph.get_attr(t) if t is not None else None
                            for t in (_name(owner, KEEP), weight, bias)]
                new = gm.graph.call_function(masked_layer_norm, (x, *operands, float(eps)))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            keeps[_name(prefix, weight)] = _name(prefix, _name(owner, KEEP))
            changed = True
        if changed:
            gm.graph.lint()
            gm.recompile()
    for weight in sorted(weights - keeps.keys()):
        owner, _, leaf = weight.rpartition(".")
        module = model.get_submodule(owner)
        if leaf == "weight" and isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1 \
                and not isinstance(module, MaskedLayerNorm):
            _add_keep(module, module.weight)
            module.__class__ = _masked_class(type(module))
            keeps[weight] = _name(owner, KEEP)
    return keeps


def unmask_layer_norms(model: nn.Module, recompile: bool = True) -> list[fx.GraphModule]:
    """Write every ``masked_layer_norm`` whose ``keep`` is all True as a plain layer norm (the same
    numbers): graph calls, and masked modules (layer and RMS norms get their own class back); those still
    ignoring a channel stay as they are, and so do ``masked_rms_norm`` calls in graphs (all True, they compute
    the RMS norm). Returns the GraphModules rewritten; without ``recompile`` the caller generates their code."""
    rewritten = []
    for module in model.modules():
        if isinstance(module, (MaskedLayerNorm, MaskedRMSNorm)) and bool(getattr(module, KEEP).all()):
            if isinstance(module, nn.LayerNorm):
                module.normalized_shape = tuple(getattr(module, KEEP).shape)
            _unmask_module(module)
    for _, gm in _graphs(model):
        changed = False
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is not masked_layer_norm:
                continue
            x, keep, weight, bias, eps = node.args
            values = gm.get_buffer(keep.target) if keep.op == "get_attr" else None
            if values is None or not bool(values.all()):
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.aten.layer_norm.default,
                                             (x, [int(values.numel())], weight, bias, eps))
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            changed = True
        if changed:
            gm.graph.eliminate_dead_code()
            used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
            for owner, module in gm.named_modules():
                if KEEP in module._buffers and _name(owner, KEEP) not in used:
                    del module._buffers[KEEP]
            gm.graph.lint()
            if recompile:
                gm.recompile()
            rewritten.append(gm)
    return rewritten
