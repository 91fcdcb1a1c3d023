"""``sparsify``: trace a model, choose its masked weights, insert mask nodes and initial masks."""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.utils import _pytree as pytree

from .config import GraNetConfig
from .criteria import apportion, layer_densities, random_mask
from .passes.insert_masks import add_mask_hooks, insert_masks
from .passes.ops import VIEW_OPS, WEIGHT_MODULES, WeightFinder, op_name, run_finder, weight_uses
from .passes.attention import split_attention_heads
from .passes.layer_norms import recognise_rms_norms
from .passes.trace import Piece, trace_pieces, training_mode
from .structured import init_structured_masks

INFO_ATTR = "_granet_fx"
MASK_SUFFIX = "_mask"


@dataclass
class SparseLayer:
    """One conv/linear/matmul weight of a sparsified model."""

    name: str                 # parameter name, as in state_dict
    kind: str                 # "conv2d", "linear", "matmul", ...
    shape: tuple[int, ...]
    mask_name: str | None     # buffer name of its mask; None when the layer stays dense
    macs: int | None = None   # dense multiply-accumulates for the example inputs
    dense_reason: str = ""    # why the layer has no mask
    experts: int = 0          # a stack of this many experts (dimension 0), each ranked as its own layer

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class MaskUnit:
    """What the controller ranks as one layer: a masked weight, or one expert of a stack of them."""

    name: str                 # the weight's name, with ``[i]`` for expert i
    layer: SparseLayer
    index: int | None = None  # the expert

    @property
    def shape(self) -> tuple[int, ...]:
        return self.layer.shape if self.index is None else self.layer.shape[1:]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This unit's part of a tensor shaped like the whole weight (the weight, its mask, its gradient)."""
        return tensor if self.index is None else tensor[self.index]


def mask_units(layers: Sequence[SparseLayer]) -> list[MaskUnit]:
    """The masked layers as the controller ranks them: expert stacks split into one unit per expert."""
    units = []
    for layer in layers:
        if layer.mask_name is None:
            continue
        if layer.experts:
            units += [MaskUnit(f"{layer.name}[{i}]", layer, i) for i in range(layer.experts)]
        else:
            units.append(MaskUnit(layer.name, layer))
    return units


@dataclass
class SparseModelInfo:
    """What ``sparsify`` decided, kept on the model for the controller and the exporters."""

    config: GraNetConfig
    layers: list[SparseLayer] = field(default_factory=list)
    channel_groups: list = field(default_factory=list)  # granularity="channel": passes.channel_groups.ChannelGroup

    @property
    def masked(self) -> list[SparseLayer]:
        return [layer for layer in self.layers if layer.mask_name is not None]


def sparse_info(model: nn.Module) -> SparseModelInfo:
    """The ``SparseModelInfo`` of a model returned by ``sparsify``."""
    model = unwrap(model)
    info = getattr(model, INFO_ATTR, None)
    if info is None:
        raise ValueError(
            f"{type(model).__name__} has not been sparsified: call granet_fx.sparsify(model, config) first"
        )
    return info


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile`` and DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.parallel.DistributedDataParallel):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _keep_predicate(model: nn.Module, keep_modules: Sequence[type[nn.Module] | str]):
    """``keep_modules`` as the tracer's test (module, name) -> bool; None when empty. Unknown names are refused."""
    if isinstance(keep_modules, (str, type)):
        keep_modules = [keep_modules]
    types = tuple(k for k in keep_modules if isinstance(k, type))
    names = {k for k in keep_modules if isinstance(k, str)}
    wrong = [k for k in keep_modules if not isinstance(k, (str, type))]
    if wrong or any(not issubclass(t, nn.Module) for t in types):
        raise TypeError("keep_modules holds module classes or module names (str); got "
                        f"{', '.join(repr(k) for k in wrong or types)}")
    unknown = sorted(names - {n for n, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"keep_modules names modules that {type(model).__name__} does not have: {', '.join(unknown)}")
    if not (types or names):
        return None
    return lambda m, name: isinstance(m, types) or name in names


def initial_counts(config: GraNetConfig, shapes: Sequence[Sequence[int]], sparsity: float) -> list[int]:
    """Weights kept per layer at ``sparsity``, spread by ``config.distribution``, adding up exactly."""
    numels = [math.prod(s) for s in shapes]
    if sparsity == 0.0:
        return numels
    named = {str(i): s for i, s in enumerate(shapes)}
    densities = layer_densities(named, sparsity, config.distribution)
    total = max(round((1.0 - sparsity) * sum(numels)), len(numels))   # at least one weight per layer
    return apportion(numels, [densities[str(i)] for i in range(len(shapes))], total)




def sparsify(model: nn.Module, config: GraNetConfig | None = None, *, example_inputs: Any = None,
             keep_modules: Sequence[type[nn.Module] | str] = ()) -> nn.Module:
    """Rewrite ``model`` so that every conv/linear/matmul weight passes through a mask.

    ``config`` defaults to ``GraNetConfig()`` (GraNet, 90% final sparsity); its
    ``total_steps`` may then be given to the controller instead:
    ``GraNet(model, optimizer, total_steps=T)``.

    Returns the rewritten module (a ``torch.fx.GraphModule`` when the model
    traces whole). It shares parameters with ``model``; use the returned module
    from now on. ``example_inputs`` (a tensor or a tuple of positional inputs)
    is optional: with it the report gives FLOPs, the rewritten model is checked
    to compute what the original computes, and the weights that code fx cannot
    trace reads (Mixtral's grouped-matmul experts) are found by running the
    model, and masked there. Warns once about every weight (a parameter of two
    or more dimensions) that feeds computation but stays dense.

    ``keep_modules`` (module classes, or names as in ``named_modules``) are
    kept as module calls, each traced on its own, instead of being traced into
    their parent's graph: give it the modules you will ``fully_shard`` (FSDP2
    gathers a module's weights when that module is called) or checkpoint.
    """
    if config is None:
        config = GraNetConfig()
    if not isinstance(config, GraNetConfig):
        raise TypeError(f"config must be a granet_fx.GraNetConfig; got {type(config).__name__}")
    config.validate()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if getattr(unwrap(model), INFO_ATTR, None) is not None:
        raise ValueError("model is already sparsified")
    model = unwrap(model)
    if example_inputs is not None and not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)

    if config.granularity == "channel":
        split_attention_heads(model)   # nn.MultiheadAttention as ops whose heads channel analysis follows
    owners = _owner_types(model)
    macs = count_macs(model, example_inputs) if example_inputs is not None else {}
    reference = _run(model, example_inputs) if example_inputs is not None else None

    if config.granularity == "channel":
        recognise_rms_norms(model)     # RMS norms as one call each, which channel analysis can follow
    new, pieces = trace_pieces(model, keep=_keep_predicate(model, keep_modules))
    if reference is not None:
        _check_same_outputs(reference, _run(new, example_inputs))

    layers, targets = _choose_layers(new, pieces, config, owners, macs)
    for layer in layers:
        if layer.mask_name is not None:
            _register_mask(new, layer)
    for piece in pieces:
        insert_masks(piece.module, targets.get(piece.prefix, {}))
    finder = None
    if example_inputs is not None:
        finder = _find_untraced_weights(new, example_inputs, layers, config, owners, macs)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer: sparsify masks the weights of conv1d/conv2d/conv3d, "
            "linear and matmul-family ops (matmul, @, mm, bmm, addmm, einsum, grouped matmuls), and found none"
        )
    _warn_dense(new, pieces, layers, finder, config)
    masked = [layer for layer in layers if layer.mask_name is not None]

    units = mask_units(layers)
    counts = initial_counts(config, [u.shape for u in units], config.start_sparsity)
    generator = torch.Generator().manual_seed(config.seed)
    for unit, keep in zip(units, counts):
        if keep < unit.numel and config.granularity == "unstructured":
            mask = new.get_buffer(unit.layer.mask_name)
            unit.of(mask).copy_(random_mask(unit.shape, keep, generator).to(mask.device))
    with torch.no_grad():
        for layer in masked:
            new.get_parameter(layer.name).mul_(new.get_buffer(layer.mask_name))
    info = SparseModelInfo(config, layers)
    if config.granularity != "unstructured":
        init_structured_masks(new, info, example_inputs, generator)
    set_info(new, info)
    return new


def _register_mask(root: nn.Module, layer: SparseLayer) -> None:
    """An all-ones bool buffer shaped like the weight, named ``layer.mask_name``."""
    weight = root.get_parameter(layer.name)
    owner, _, buffer = layer.mask_name.rpartition(".")
    (root.get_submodule(owner) if owner else root).register_buffer(
        buffer, torch.ones(weight.shape, dtype=torch.bool, device=weight.device))


def set_info(model: nn.Module, info: SparseModelInfo | None) -> None:
    """Mark ``model`` as sparsified with ``info``, or (None) as not sparsified, so that copies agree."""
    if info is None:
        vars(model).pop(INFO_ATTR, None)
    else:
        setattr(model, INFO_ATTR, info)
    if isinstance(model, fx.GraphModule):  # GraphModule's deepcopy keeps only the attributes listed here
        preserved = model.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})
        if info is None:
            preserved.pop(INFO_ATTR, None)
        else:
            preserved[INFO_ATTR] = info


def _names_of(root: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def _is_expert_stack(param: torch.Tensor, kind: str) -> bool:
    """A 3-D weight that a matmul (not a conv or bilinear op) reads: one (out, in) matrix per expert."""
    return param.dim() == 3 and not kind.startswith("conv") and kind != "bilinear"


def _choose_layers(root, pieces: list[Piece], config, owners, macs):
    """One SparseLayer per distinct weight in the graphs, and per piece the get_attr -> mask targets."""
    names = _names_of(root)
    found: dict[int, dict] = {}
    for piece in pieces:
        for use in weight_uses(piece.module):
            param = piece.module.get_parameter(use.weight.target)
            entry = found.setdefault(
                id(param),
                {"param": param, "kind": use.kind, "uses": [], "pieces": set()},
            )
            if (piece.prefix, use.weight.target) not in entry["uses"]:
                entry["uses"].append((piece.prefix, use.weight.target))
            entry["pieces"].add(piece.prefix)

    layers, targets = [], {}
    for pid, entry in found.items():
        name = names[pid][0]
        first_prefix, first_target = entry["uses"][0]
        mask_name = (f"{first_prefix}.{first_target}" if first_prefix else first_target) + MASK_SUFFIX
        reason = _dense_reason(name, names[pid], entry, config, owners)
        if reason:
            mask_name = None
        param = entry["param"]
        experts = param.shape[0] if _is_expert_stack(param, entry["kind"]) else 0
        layers.append(SparseLayer(name, entry["kind"], tuple(param.shape), mask_name, macs.get(pid), reason, experts))
        if mask_name is None:
            continue
        rel_mask = mask_name[len(first_prefix) + 1:] if first_prefix else mask_name
        for prefix, target in entry["uses"]:
            targets.setdefault(prefix, {})[target] = rel_mask
    return layers, targets


_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_LOOKUPS = {"embedding", "embedding_bag"}


def _dense_reason(name: str, all_names: list[str], entry: dict, config: GraNetConfig, owners) -> str:
    if config.method == "dense":
        return "method='dense'"
    module_name = name.rpartition(".")[0]
    for pattern in config.exclude:
        if fnmatch.fnmatchcase(module_name, pattern) or fnmatch.fnmatchcase(name, pattern):
            return f"excluded by {pattern!r}"
    if len(all_names) > 1:
        kinds = owners.get(id(entry["param"]), [])
        if not all(issubclass(k, WEIGHT_MODULES) for k in kinds):
            tied = "tied to an embedding, " if any(issubclass(k, _EMBEDDINGS) for k in kinds) else ""
            return f"{tied}shared with a module that is not conv/linear (" + \
                ", ".join(sorted({k.__name__ for k in kinds})) + ")"
        if len(entry["pieces"]) > 1:
            return "shared between separately traced parts of the model"
    return ""


def _owner_types(model: nn.Module) -> dict[int, list[type]]:
    """For each parameter, the types of the modules that own it (more than one when tied)."""
    owners: dict[int, list[type]] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(type(m))
    return owners


def _find_untraced_weights(root: nn.Module, inputs: tuple, layers: list[SparseLayer], config, owners,
                           macs) -> WeightFinder:
    """Run the masked model once: each weight that an op outside the graphs reads gets a mask (a new
    layer, or the mask its graph already has) and a hook on the module whose code reads it."""
    with training_mode(root, False):
        finder = run_finder(root, inputs)
    names = _names_of(root)
    by_name = {layer.name: layer for layer in layers}
    module_names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    hooks: dict[str, set[tuple[str, str]]] = {}
    for use in finder.uses:
        if id(use.param) not in names:
            continue
        name = names[id(use.param)][0]
        layer = by_name.get(name)
        if layer is None:
            entry = {"param": use.param, "pieces": set()}
            reason = _dense_reason(name, names[id(use.param)], entry, config, owners)
            experts = use.param.shape[0] if _is_expert_stack(use.param, use.kind) else 0
            layer = SparseLayer(name, use.kind, tuple(use.param.shape), None if reason else name + MASK_SUFFIX,
                                macs.get(id(use.param)), reason, experts)
            layers.append(layer)
            by_name[name] = layer
            if layer.mask_name is not None:
                _register_mask(root, layer)
        if layer.mask_name is None:
            continue
        # the innermost running module that holds both the weight and its mask
        where = next((module_names[id(m)] for m in reversed(use.stack) if id(m) in module_names
                      and _inside(name, module_names[id(m)]) and _inside(layer.mask_name, module_names[id(m)])), "")
        rel = (lambda n: n[len(where) + 1:] if where else n)
        hooks.setdefault(where, set()).add((rel(name), rel(layer.mask_name)))
    for where, pairs in hooks.items():
        add_mask_hooks(root.get_submodule(where) if where else root, sorted(pairs))
    return finder


def _inside(name: str, module: str) -> bool:
    return not module or name.startswith(module + ".")


def _warn_dense(root: nn.Module, pieces: list[Piece], layers: list[SparseLayer], finder, config) -> None:
    """One warning listing every weight (two or more dimensions) that feeds computation but has no
    mask, with the reason. Weights read only by embedding lookups stay dense by design."""
    if config.method == "dense":
        return
    by_name = {layer.name: layer for layer in layers}
    readers: dict[int, set[str]] = {}              # the ops that read each parameter in the graphs
    for piece in pieces:
        for node in piece.module.graph.nodes:
            if node.op == "get_attr":
                try:
                    p = piece.module.get_parameter(node.target)
                except AttributeError:
                    continue
                readers.setdefault(id(p), set()).update(_reader_names(node))
    embedding_owned = {id(p) for m in root.modules() if isinstance(m, _EMBEDDINGS) for p in m.parameters()}
    # the other originals of a parametrized weight that is masked (weight_norm's norms, original0)
    parametrized = {l.name.rpartition(".")[0] + "." for l in layers if l.mask_name and ".parametrizations." in l.name}
    lines = []
    for pid, all_names in _names_of(root).items():
        name = all_names[0]
        p = root.get_parameter(name)
        layer = by_name.get(name)
        if p.dim() < 2 or (layer is not None and layer.mask_name is not None) \
                or name.rpartition(".")[0] + "." in parametrized:
            continue
        if layer is not None:
            reason = layer.dense_reason
        elif finder is not None or pid in readers:
            ops = readers.get(pid, set()) | (finder.other.get(pid, set()) if finder is not None else set())
            if (finder is not None and pid not in finder.params) or ops <= _LOOKUPS:
                continue                            # unused, or an embedding table
            reason = "not a conv/linear/matmul weight (read by " + ", ".join(sorted(ops)) + ")"
        elif pid in embedding_owned:
            continue
        else:
            reason = ("in no traced graph: read by code that fx cannot trace, or unused (pass example_inputs "
                      "to sparsify to find the weights that such code reads)")
        lines.append(f"  {name} stays dense: {reason}")
    if lines:
        warnings.warn(f"granet_fx: {len(lines)} weight(s) of two or more dimensions get no mask:\n"
                      + "\n".join(lines), stacklevel=3)


def _reader_names(node: fx.Node) -> set[str]:
    """The names of the ops that read ``node``, looking through view-like ops."""
    out = set()
    for user in node.users:
        name = op_name(user.target) if user.op in ("call_function", "call_method") else user.op
        if name == "getattr" and len(user.args) > 1:
            name = user.args[1]
        if name in VIEW_OPS:
            out |= _reader_names(user)
        elif user.op == "call_module" and ".parametrizations." in f".{user.target}":
            out.add("parametrization")
        elif name != "mask_weight":
            out.add(str(name))
    return out


def _run(model: nn.Module, inputs: tuple) -> Any:
    with training_mode(model, False), torch.no_grad():
        return model(*inputs)


def count_macs(model: nn.Module, inputs: tuple) -> dict[int, int]:
    """Multiply-accumulates of each conv/linear/matmul weight (by ``id``) in one eval-mode forward on
    ``inputs``. Autograd stays on, so that modules take their ordinary path (not fused inference kernels)."""
    with training_mode(model, False):
        finder = run_finder(model, inputs)
    macs: dict[int, int] = {}
    for use in finder.uses:
        macs[id(use.param)] = macs.get(id(use.param), 0) + use.macs
    return macs


def _check_same_outputs(expected: Any, actual: Any) -> None:
    exp, _ = pytree.tree_flatten(expected)
    act, _ = pytree.tree_flatten(actual)
    pairs = [(e, a) for e, a in zip(exp, act) if isinstance(e, torch.Tensor)]
    if len(exp) != len(act) or any(not torch.equal(e, a) for e, a in pairs):
        raise RuntimeError(
            "granet_fx: the traced model computes something else than the original on the example "
            "inputs; please report this model. Excluding its untraceable part is not possible yet."
        )
