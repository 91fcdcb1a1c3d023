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
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .config import GraNetConfig
from .criteria import layer_densities, apportion, random_mask
from .passes.insert_masks import insert_masks
from .passes.ops import WEIGHT_MODULES, is_weight_op, macs_of, weight_argument, weight_uses
from .passes.trace import Piece, trace_pieces, training_mode
from .structured import init_structured_masks

INFO_ATTR = "_granet_fx"
MASK_SUFFIX = "_mask"


@dataclass
class SparseLayer:
    """One conv/linear weight of a sparsified model."""

    name: str                 # parameter name, as in state_dict
    kind: str                 # "conv2d", "linear", ...
    shape: tuple[int, ...]
    mask_name: str | None     # buffer name of its mask; None when the layer stays dense
    macs: int | None = None   # dense multiply-accumulates for the example inputs
    dense_reason: str = ""    # why the layer has no mask

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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


def initial_counts(config: GraNetConfig, shapes: Sequence[Sequence[int]], sparsity: float) -> list[int]:
    """Weights kept per layer at ``sparsity``, spread by ``config.distribution``, adding up exactly."""
    numels = [math.prod(s) for s in shapes]
    if sparsity == 0.0:
        return numels
    named = {str(i): s for i, s in enumerate(shapes)}
    densities = layer_densities(named, sparsity, config.distribution)
    total = max(round((1.0 - sparsity) * sum(numels)), len(numels))   # at least one weight per layer
    return apportion(numels, [densities[str(i)] for i in range(len(shapes))], total)


def sparsify(model: nn.Module, config: GraNetConfig, *, example_inputs: Any = None) -> nn.Module:
    """Rewrite ``model`` so that every conv/linear weight passes through a mask node.

    Returns the rewritten module (a ``torch.fx.GraphModule`` when the model
    traces whole). It shares parameters with ``model``; use the returned module
    from now on. ``example_inputs`` (a tensor or a tuple of positional inputs)
    is optional: with it the report gives FLOPs, and the rewritten model is
    checked to compute what the original computes.
    """
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

    owners = _owner_types(model)
    macs = count_macs(model, example_inputs) if example_inputs is not None else {}
    reference = _run(model, example_inputs) if example_inputs is not None else None

    new, pieces = trace_pieces(model)
    if reference is not None:
        _check_same_outputs(reference, _run(new, example_inputs))

    layers, targets = _choose_layers(new, pieces, config, owners, macs)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no prunable layer: sparsify masks the weights of "
            "conv1d/conv2d/conv3d and linear ops, and found none"
        )
    masked = [layer for layer in layers if layer.mask_name is not None]
    counts = initial_counts(config, [l.shape for l in masked], config.start_sparsity)
    generator = torch.Generator().manual_seed(config.seed)
    for layer, keep in zip(masked, counts):
        weight = new.get_parameter(layer.name)
        if keep == layer.numel or config.granularity != "unstructured":
            mask = torch.ones(layer.shape, dtype=torch.bool)
        else:
            mask = random_mask(layer.shape, keep, generator)
        owner, _, buffer = layer.mask_name.rpartition(".")
        (new.get_submodule(owner) if owner else new).register_buffer(buffer, mask.to(weight.device))
        with torch.no_grad():
            weight.mul_(mask.to(weight.device))
    for piece in pieces:
        insert_masks(piece.module, targets.get(piece.prefix, {}))
    info = SparseModelInfo(config, layers)
    if config.granularity != "unstructured":
        init_structured_masks(new, info, example_inputs, generator)
    set_info(new, info)
    return new


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


def _choose_layers(root, pieces: list[Piece], config, owners, macs):
    """One SparseLayer per distinct weight, and per piece the get_attr -> mask targets."""
    names = {}
    for name, p in root.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    found: dict[int, dict] = {}
    for piece in pieces:
        for use in weight_uses(piece.module):
            param = piece.module.get_parameter(use.weight.target)
            entry = found.setdefault(
                id(param),
                {"param": param, "kind": use.kind, "uses": [], "pieces": set()},
            )
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
        layers.append(SparseLayer(name, entry["kind"], tuple(entry["param"].shape), mask_name, macs.get(pid), reason))
        if mask_name is None:
            continue
        rel_mask = mask_name[len(first_prefix) + 1:] if first_prefix else mask_name
        for prefix, target in entry["uses"]:
            targets.setdefault(prefix, {})[target] = rel_mask
    for layer in layers:
        if layer.dense_reason.startswith("shared"):
            warnings.warn(f"granet_fx: {layer.name} stays dense: {layer.dense_reason}", stacklevel=3)
    return layers, targets


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
            return "shared with a module that is not conv/linear (" + ", ".join(sorted({k.__name__ for k in kinds})) + ")"
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


class _MacCounter(TorchFunctionMode):
    """Adds up the multiply-accumulates of every conv/linear call, per weight parameter."""

    def __init__(self):
        super().__init__()
        self.macs: dict[int, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if is_weight_op(func):
            weight = weight_argument(func, args, kwargs)
            if isinstance(weight, nn.Parameter) and isinstance(out, torch.Tensor):
                self.macs[id(weight)] = self.macs.get(id(weight), 0) + macs_of(out, weight, func)
        return out


def _run(model: nn.Module, inputs: tuple) -> Any:
    with training_mode(model, False), torch.no_grad():
        return model(*inputs)


def count_macs(model: nn.Module, inputs: tuple) -> dict[int, int]:
    """Multiply-accumulates of each conv/linear weight (by ``id``) in one eval-mode forward on ``inputs``."""
    counter = _MacCounter()
    with training_mode(model, False), torch.no_grad(), counter:
        model(*inputs)
    return counter.macs


def _check_same_outputs(expected: Any, actual: Any) -> None:
    exp, _ = pytree.tree_flatten(expected)
    act, _ = pytree.tree_flatten(actual)
    pairs = [(e, a) for e, a in zip(exp, act) if isinstance(e, torch.Tensor)]
    if len(exp) != len(act) or any(not torch.equal(e, a) for e, a in pairs):
        raise RuntimeError(
            "granet_fx: the traced model computes something else than the original on the example "
            "inputs; please report this model. Excluding its untraceable part is not possible yet."
        )
