"""``save`` and ``load``: a model as a ``torch.export`` archive that loads without running code from the file.

The file is a zip archive in the layout that ``torch.export.save`` writes: the
graph as JSON and every weight as raw bytes. Beside it, ``extra/granet_fx.json``
holds the metadata: what kind of model it is (sparse, compacted or dense), the
GraNet config, per-layer density and multiply-accumulates, the example inputs
with the outputs they gave (the reference for parity checks) as raw
little-endian bytes in base64, the outputs' names, and a SHA-256 digest of
every other entry.

Outputs are stored flat: the program returns a tuple of tensors, and their
names (a ``ModelOutput``'s keys, or the path in nested tuples and dicts) are in
the metadata, so loading never needs the package that defined the model.

``torch.export.load`` would run code from a crafted archive (pickled
payloads, ``sympy`` evaluation of symbolic sizes, guard code, targets looked up
by name). ``load`` therefore checks the bytes first: the zip's structure
(``safe_zip``), the metadata against its schema, every entry against its
digest, each weight against its declared dtype, shape and strides, and the
graph's symbolic sizes, targets and pytree specs (``program_check``). Only then
does ``torch.export.load`` parse a zip rebuilt from exactly the checked entries.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..config import GraNetConfig
from ..distributed import is_sharded
from ..fold import fold
from ..passes.compact import REPORT_ATTR
from ..passes.ops import WEIGHT_MODULES
from ..passes.trace import training_mode
from ..report import LayerReport
from ..sparsify import INFO_ATTR, count_macs, sparse_info, unwrap
from .console import first_line
from .files import FileReadError, atomic_write, read_bounded
from .program_check import ProgramProblem, check_payloads, check_program, parse_json
from .safe_zip import ZipProblem, read_entries, write_entries

FORMAT = "granet_fx.archive"
FORMAT_VERSION = 2
METADATA = "granet_fx.json"
MODEL = "model"  # the program's name inside the archive, as torch.export.save names it
KINDS = ("sparse", "compacted", "dense")
MAX_TENSOR_BYTES = 1 << 30   # one example input or reference output
MAX_NAME = 1000              # characters of a layer's name or kind
MAX_LAYERS = 100_000


@dataclass(frozen=True)
class _Layout:
    """Entry names of the archive, relative to its root folder."""

    metadata: str
    model: str
    sample_inputs: str
    weights_config: str
    constants_config: str
    allowed: re.Pattern               # every entry that save() writes; nothing else is accepted


@functools.cache
def _layout() -> _Layout:
    from torch.export.pt2_archive import constants as pt2  # here, not at import time: it loads torch._dynamo

    fixed = (pt2.ARCHIVE_FORMAT_PATH, pt2.ARCHIVE_VERSION_PATH, "byteorder", ".data/version",
             ".data/serialization_id", pt2.MODELS_FILENAME_FORMAT.format(MODEL),
             pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL), pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL),
             pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL), pt2.EXTRA_DIR + METADATA)
    numbered = (pt2.WEIGHTS_DIR + pt2.WEIGHT_FILENAME_PREFIX, pt2.CONSTANTS_DIR + pt2.TENSOR_CONSTANT_FILENAME_PREFIX)
    patterns = [re.escape(name) for name in fixed] + [re.escape(prefix) + r"\d+" for prefix in numbered]
    return _Layout(
        metadata=pt2.EXTRA_DIR + METADATA,
        model=pt2.MODELS_FILENAME_FORMAT.format(MODEL),
        sample_inputs=pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL),
        weights_config=pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL),
        constants_config=pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL),
        allowed=re.compile("|".join(f"(?:{p})" for p in patterns)),
    )


class ArchiveError(ValueError):
    """A file that is not a readable granet_fx archive; the message says why."""


@dataclass
class SavedModel:
    """What ``load`` returns: the exported program and the metadata that ``save`` stored."""

    program: torch.export.ExportedProgram
    kind: str                                # "sparse", "compacted" or "dense"
    config: GraNetConfig | None              # the GraNet config of a sparse model, else None
    layers: list[LayerReport]
    example_inputs: tuple[torch.Tensor, ...]
    reference_outputs: list[torch.Tensor]   # the model's outputs on example_inputs, flattened
    output_names: list[str]                  # one per output: the ModelOutput key or pytree path
    dynamic_batch: bool                      # whether the program takes any batch size

    def module(self) -> nn.Module:
        """The program as a module to call (inference only); it returns a tuple of tensors."""
        return self.program.module()


def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any) -> None:
    """Write ``model`` to ``path`` as a ``torch.export`` archive plus metadata.

    ``model`` is any module: one returned by ``sparsify`` (its masks are folded
    into the weights; it is not changed), by ``compact``, or a dense one.
    ``example_inputs`` is a tensor or a tuple of tensors that it takes. The
    outputs are stored flat, with their names, so the file loads (``load``,
    ``granet-export``) in a process that has never imported the model's
    package, and without unpickling anything. The file is written under a
    temporary name and renamed, so an existing file at ``path`` is replaced
    whole or not at all. The batch dimension is dynamic when the model allows it.
    """
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a non-empty tuple of tensors")
    model = unwrap(model)
    if any(is_sharded(p) for p in model.parameters()):
        raise ValueError(
            "granet_fx: the model's weights are sharded (FSDP2); gather them first, on every rank: "
            "state = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True, cpu_offload=True)); then on rank 0 load it into "
            "the unsharded model (sparsify the same architecture with the same config) and save that"
        )
    kind = "sparse" if getattr(model, INFO_ATTR, None) is not None else (
        "compacted" if getattr(model, REPORT_ATTR, None) is not None else "dense")
    inputs = tuple(t.detach().cpu() for t in inputs)
    plain = (fold(model) if kind == "sparse" else copy.deepcopy(model)).eval()
    # On the model's device (CPU and GPU kernels do not agree to the bit), with gradients on: torch chooses
    # some kernels by whether a weight requires grad, even under no_grad (F.linear on a strided input); under
    # no_grad a masked weight (weight * mask) does not, its folded copy does; with gradients on both do.
    with torch.enable_grad():
        on_device = tuple(t.to(_device(model)) for t in inputs)
        names, outputs = named_outputs(plain(*on_device))
        outputs = [t.detach() for t in outputs]
        if kind == "sparse":
            with training_mode(model, False):
                masked = [t.detach() for t in flat_tensors(model(*on_device))]
            if not _same(masked, outputs):
                raise RuntimeError("granet_fx: the folded model computes something else than the masked model")
    if not all(torch.isfinite(t).all() for t in outputs if t.is_floating_point() or t.is_complex()):
        raise ValueError("the model's outputs on example_inputs are not all finite (NaN or inf); "
                         "save needs finite reference outputs to check exports against")
    plain = plain.cpu()
    layers = (_layer_reports(model, plain, inputs) if kind == "sparse" else plain_layer_reports(plain, inputs))
    _flatten_outputs(plain)
    program, dynamic = export_program(plain, inputs, dynamic_batch=None)
    if _custom_ops(program) and hasattr(plain, "set_experts_implementation"):
        # transformers' mixture-of-experts layers dispatch to a custom operator by default;
        # their "batched_mm" implementation computes the same with standard batched matmuls.
        plain.set_experts_implementation("batched_mm")
        with torch.no_grad():
            again = plain(*inputs)
        if all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(again, outputs)):
            program, dynamic = export_program(plain, inputs, dynamic_batch=None)
    program = _standard_ops_only(program)
    program.example_inputs = None  # torch would pickle them; the metadata keeps them as raw bytes
    program._guards_code = []      # torch would exec them when loading; shapes are checked by the graph itself
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    entries = read_entries(buffer.getvalue())
    root = next(iter(entries)).split("/", 1)[0]
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch": torch.__version__,
        "kind": kind,
        "config": sparse_info(model).config.to_dict() if kind == "sparse" else None,
        "layers": [dataclasses.asdict(layer) for layer in layers],
        "dynamic_batch": dynamic,
        "example_inputs": [tensor_to_json(t) for t in inputs],
        "reference_outputs": [tensor_to_json(t) for t in outputs],
        "output_names": names,
        "entries": {name[len(root) + 1:]: _digest(value) for name, value in entries.items()},
    }
    entries[f"{root}/{_layout().metadata}"] = json.dumps(metadata).encode()
    atomic_write(path, write_entries(entries))


def load(path: str | os.PathLike) -> SavedModel:
    """Read a file written by ``save``; raises ``ArchiveError`` naming the problem for any other file.

    Nothing from the file is unpickled, evaluated or executed: the file is
    checked whole (see the module's docstring) before torch parses it.
    """
    return load_bytes(read_file(path), path)


def load_bytes(data: bytes, path: str | os.PathLike) -> SavedModel:
    """``load`` for the bytes of the file at ``path`` (named in errors), already read."""
    entries, metadata = _checked(path, data)
    try:
        with _quiet_torch_export():
            program = _load_program(write_entries(entries))
    except Exception as e:
        raise ArchiveError(f"{path} is a damaged granet_fx archive: torch.export.load failed: {first_line(e)}") from None
    saved = SavedModel(
        program=program,
        kind=metadata["kind"],
        config=metadata["config"],
        layers=metadata["layers"],
        example_inputs=tuple(metadata["example_inputs"]),
        reference_outputs=metadata["reference_outputs"],
        output_names=metadata["output_names"],
        dynamic_batch=metadata["dynamic_batch"],
    )
    n_outputs = len(program.graph_signature.user_outputs)
    if n_outputs != len(saved.output_names):
        raise ArchiveError(f"{path} is a damaged granet_fx archive: the program has {n_outputs} outputs, "
                           f"its metadata names {len(saved.output_names)}")
    n_inputs = len(program.graph_signature.user_inputs)
    if n_inputs != len(saved.example_inputs):
        raise ArchiveError(f"{path} is a damaged granet_fx archive: the program takes {n_inputs} inputs, "
                           f"its metadata has {len(saved.example_inputs)} example inputs")
    return saved


def _load_program(data: bytes) -> torch.export.ExportedProgram:
    """The program in the checked zip ``data``: torch.export.load's reader without its fallback to the
    pre-2.8 format (which this archive never is), so that its own error, not a generic one, is raised."""
    try:
        from torch.export.pt2_archive._package import load_pt2
    except ImportError:
        return torch.export.load(io.BytesIO(data))
    return load_pt2(io.BytesIO(data)).exported_programs[MODEL]


@contextlib.contextmanager
def _quiet_torch_export():
    """Keep torch.export's deserializer from logging a traceback of its own: the error says what failed."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export.serde.serialize")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``; ``ArchiveError`` for a missing, special, empty or too large file."""
    try:
        return read_bounded(path, what="model file")
    except FileReadError as e:
        raise ArchiveError(str(e)) from None


def is_archive(data: bytes) -> bool:
    """Whether ``data`` looks like a granet_fx archive: a zip naming its metadata (checked later, whole)."""
    return data[:4] == b"PK\x03\x04" and ("/" + _layout().metadata).encode() in data[-(1 << 20):]


def export_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], *,
                   dynamic_batch: bool | None) -> tuple[torch.export.ExportedProgram, bool]:
    """``torch.export`` ``module`` on ``inputs``; returns the program and whether its batch is dynamic.

    Put ``module`` in eval mode first: the program keeps the mode it was traced in.

    ``dynamic_batch``: True requires a dynamic first dimension, False fixes it,
    None tries dynamic and falls back to fixed. A batch of 1 would be
    specialized by the tracer, so the dynamic export traces a batch of 2.
    """
    if dynamic_batch is not False:
        batch = torch.export.Dim("batch", min=1)
        wide = tuple(t.expand(max(t.shape[0], 2), *t.shape[1:]).contiguous() if t.dim() else t for t in inputs)
        spec = tuple({0: batch} if t.dim() else None for t in inputs)
        try:
            return torch.export.export(module, wide, dynamic_shapes=spec), True
        except Exception as e:
            if dynamic_batch:
                raise ValueError(f"the model does not take a variable batch size: {first_line(e)}") from None
    return torch.export.export(module, inputs), False


def tensor_to_json(t: torch.Tensor) -> dict:
    """A tensor as JSON: dtype, shape and its raw little-endian bytes in base64 (no pickle)."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode("ascii")}


TENSOR_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool)}


def tensor_from_json(d: Any, where: str = "tensor") -> torch.Tensor:
    """The tensor ``tensor_to_json`` wrote; ``ValueError`` naming ``where`` for anything else."""
    if not isinstance(d, dict) or set(d) != {"dtype", "shape", "data"}:
        raise ValueError(f"{where} is not a tensor (dtype, shape, data)")
    dtype = TENSOR_DTYPES.get(d["dtype"]) if isinstance(d["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"{where} has an unknown dtype {str(d['dtype'])[:40]!r}")
    shape = d["shape"]
    if not isinstance(shape, list) or not all(type(n) is int and 0 <= n < 2 ** 31 for n in shape):
        raise ValueError(f"{where} has a malformed shape")
    size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if not isinstance(d["data"], str) or size > MAX_TENSOR_BYTES or len(d["data"]) != 4 * math.ceil(size / 3):
        raise ValueError(f"{where}: its data does not hold the {size:,} bytes its dtype and shape need")
    try:
        raw = bytearray(base64.b64decode(d["data"], validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"{where}: its data is not base64") from None
    if len(raw) != size:
        raise ValueError(f"{where}: its data does not hold the {size:,} bytes its dtype and shape need")
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.reshape(shape)


def _digest(value: bytes) -> str:
    return hashlib.sha256(value).hexdigest()


def _checked(path, data: bytes) -> tuple[dict[str, bytes], dict]:
    """The archive's entries and its metadata (parsed, validated), or ``ArchiveError`` saying what is wrong."""
    try:
        entries = read_entries(data)
    except ZipProblem as e:
        raise ArchiveError(f"{path} is not a valid granet_fx archive: {e}") from None
    names = list(entries)
    root = names[0].split("/", 1)[0] if names else ""
    relative = {n[len(root) + 1:]: v for n, v in entries.items() if n.startswith(root + "/")}
    layout = _layout()
    if len(relative) != len(names) or layout.metadata not in relative:
        raise ArchiveError(
            f"{path} is not a granet_fx archive (a zip file without {METADATA}; write one with granet_fx.save)"
        )
    try:
        raw = parse_json(relative[layout.metadata], METADATA)
    except ProgramProblem as e:
        raise ArchiveError(f"{path} is a damaged granet_fx archive: {e}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ArchiveError(f"{path} is not a granet_fx archive (its {METADATA} is not granet_fx metadata)")
    version = raw.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        if type(version) is int and version < FORMAT_VERSION:
            raise ArchiveError(f"{path} was written by an older granet_fx (archive version {version}); "
                               f"this one reads version {FORMAT_VERSION}: re-save the model with granet_fx.save")
        raise ArchiveError(f"{path} is a granet_fx archive of version {str(version)[:20]}; "
                           f"this granet_fx reads version {FORMAT_VERSION}")
    for name in relative:
        if not layout.allowed.fullmatch(name):
            raise ArchiveError(f"{path} holds {name[:100]!r}, which granet_fx.save never writes; refusing to load it")
    missing = [n for n in (layout.model, layout.weights_config, layout.constants_config) if n not in relative]
    if missing:
        raise ArchiveError(f"{path} is a damaged granet_fx archive: it lacks {missing[0]}")
    try:
        metadata = _validated_metadata(raw)
        _check_digests(relative, raw["entries"], layout.metadata)
        if relative.get(layout.sample_inputs):
            raise ProgramProblem("it holds pickled sample inputs, which granet_fx.save never writes")
        for config, folder in ((layout.weights_config, "data/weights/"), (layout.constants_config, "data/constants/")):
            records = {n[len(folder):]: len(v) for n, v in relative.items() if n.startswith(folder) and n != config}
            check_payloads(parse_json(relative[config], config), records, config)
        check_program(parse_json(relative[layout.model], layout.model))
    except (ProgramProblem, ValueError) as e:
        raise ArchiveError(f"{path} is a damaged or foreign granet_fx archive: {e}") from None
    return entries, metadata


def _check_digests(relative: dict[str, bytes], digests: dict[str, str], metadata_name: str) -> None:
    stored = set(relative) - {metadata_name}
    if set(digests) != stored:
        odd = sorted(set(digests) ^ stored)[0]
        raise ProgramProblem(f"its entries and the metadata's list of entries differ ({odd[:100]!r})")
    for name in sorted(stored):
        if _digest(relative[name]) != digests[name]:
            raise ProgramProblem(f"entry {name} does not match its SHA-256 digest (the file is damaged)")


def _validated_metadata(d: dict) -> dict:
    """The metadata with its tensors, config and layers decoded; ``ProgramProblem`` naming the bad key."""
    def need(key, types, where=d, prefix=""):
        if key not in where:
            raise ProgramProblem(f"its metadata lacks the key {prefix + key!r}")
        value = where[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in _tuple(types)):
            raise ProgramProblem(f"metadata key {prefix + key!r} has the wrong type ({type(value).__name__})")
        return value

    out: dict[str, Any] = {}
    out["kind"] = need("kind", str)
    if out["kind"] not in KINDS:
        raise ProgramProblem(f"metadata key 'kind' must be one of {', '.join(KINDS)}; got {out['kind'][:40]!r}")
    config = need("config", (dict, type(None)))
    if (config is None) != (out["kind"] != "sparse"):
        raise ProgramProblem("metadata key 'config' must be set for a sparse model, and only for one")
    if config is not None and not all(abs(v) < 2 ** 63 for v in config.values()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)):
        raise ProgramProblem("metadata key 'config' holds a number out of range")
    try:
        out["config"] = None if config is None else GraNetConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ProgramProblem(f"metadata key 'config' is not a valid GraNetConfig: {first_line(e)}") from None
    out["dynamic_batch"] = need("dynamic_batch", bool)
    need("torch", str)
    digests = need("entries", dict)
    if not all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)
               for k, v in digests.items()):
        raise ProgramProblem("metadata key 'entries' must map entry names to SHA-256 digests")
    layers = []
    for i, layer in enumerate(need("layers", list)):
        where = f"layers[{i}]."
        if not isinstance(layer, dict):
            raise ProgramProblem(f"metadata key 'layers[{i}]' is not an object")
        extra = set(layer) - {f.name for f in dataclasses.fields(LayerReport)}
        if extra:
            raise ProgramProblem(f"metadata key '{where}{sorted(extra)[0][:40]}' is unknown")
        shape = need("shape", list, layer, where)
        if not all(type(n) is int and n >= 0 for n in shape):
            raise ProgramProblem(f"metadata key '{where}shape' must hold non-negative integers")
        numel, active = need("numel", int, layer, where), need("active", int, layer, where)
        if numel != math.prod(shape) or not 0 <= active <= numel:
            raise ProgramProblem(f"metadata keys '{where}numel' and '{where}active' do not fit the shape {shape}")
        macs = need("macs", (int, type(None)), layer, where)
        if macs is not None and macs < 0:
            raise ProgramProblem(f"metadata key '{where}macs' is negative")
        name, kind = need("name", str, layer, where), need("kind", str, layer, where)
        if not 0 < len(name) <= MAX_NAME or not 0 < len(kind) <= MAX_NAME:
            raise ProgramProblem(f"metadata keys '{where}name' and '{where}kind' must be 1 to {MAX_NAME} characters")
        layers.append(LayerReport(name, kind, tuple(shape),
                                  numel, active, need("masked", bool, layer, where), macs))
        if len(layers) > MAX_LAYERS:
            raise ProgramProblem(f"metadata key 'layers' lists more than {MAX_LAYERS:,} layers")
    out["layers"] = layers
    for key in ("example_inputs", "reference_outputs"):
        items = need(key, list)
        if not items:
            raise ProgramProblem(f"metadata key {key!r} is empty")
        try:
            out[key] = [tensor_from_json(t, f"metadata key '{key}[{i}]'") for i, t in enumerate(items)]
        except ValueError as e:
            raise ProgramProblem(str(e)) from None
    for i, t in enumerate(out["reference_outputs"]):
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise ProgramProblem(f"metadata key 'reference_outputs[{i}]' is not finite (NaN or inf)")
    names = need("output_names", list)
    if (not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names) or len(set(names)) != len(names)
            or len(names) != len(out["reference_outputs"])):
        raise ProgramProblem("metadata key 'output_names' must hold one short, distinct name per reference output")
    out["output_names"] = names
    return out


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _layer_reports(model: nn.Module, folded: nn.Module, inputs: tuple) -> list[LayerReport]:
    """Each conv/linear weight: its shape, kept weights (the mask's count) and dense MACs on ``inputs``."""
    info = sparse_info(model)
    macs_by_id = count_macs(folded, inputs)
    reports = []
    for layer in info.layers:
        active = layer.numel
        if layer.mask_name is not None:
            active = int(model.get_buffer(layer.mask_name).sum())
        macs = macs_by_id.get(id(folded.get_parameter(layer.name)))
        reports.append(LayerReport(layer.name, layer.kind, layer.shape, layer.numel, active,
                                   layer.mask_name is not None, macs))
    return reports


def plain_layer_reports(module: nn.Module, inputs: tuple) -> list[LayerReport]:
    """Conv/linear weights of a module without masks, their density counted by nonzeros."""
    macs = count_macs(module, inputs)
    reports = []
    for name, m in module.named_modules():
        if isinstance(m, WEIGHT_MODULES):
            w = m.weight
            reports.append(LayerReport(f"{name}.weight" if name else "weight", type(m).__name__.lower(),
                                       tuple(w.shape), w.numel(), int(torch.count_nonzero(w)), True, macs.get(id(w))))
    return reports


def flat_tensors(outputs: Any) -> list[torch.Tensor]:
    """The tensors in a model's outputs (tuples, lists, dicts, ModelOutputs), in pytree order, on the CPU."""
    return named_outputs(outputs)[1]


def named_outputs(outputs: Any) -> tuple[list[str], list[torch.Tensor]]:
    """The tensors in a model's outputs with a name each: the key path (``logits``,
    ``hidden_states.1``), ``output`` for a lone tensor, ``output_<i>`` for positions."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names, tensors = [], []
    for keys, leaf in leaves:
        if leaf is None:
            continue
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys]
        name = ".".join(parts) if parts else "output"
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"the model's output {name} is a {type(leaf).__name__}, not a tensor: outputs must be "
                            "tensors (or tuples, lists, dicts and ModelOutputs of tensors); for a transformers "
                            "model that returns a cache, build it with use_cache=False")
        names.append(f"output_{name}" if name[0].isdigit() else name)
        tensors.append(leaf.detach().cpu())
    return names, tensors


def _tensor_leaves(tree: Any) -> tuple[torch.Tensor, ...]:
    """The tensors in ``tree`` in pytree order (the flat outputs that ``named_outputs`` names)."""
    return tuple(t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor))


torch.fx.wrap("_tensor_leaves")


def _flatten_outputs(module: nn.Module) -> None:
    """Make ``module`` (a private copy) return its output tensors as a flat tuple, keeping its parameter names."""
    if isinstance(module, torch.fx.GraphModule):   # torch.export runs a GraphModule's graph, not its class
        graph = module.graph
        output = next(n for n in reversed(graph.nodes) if n.op == "output")
        with graph.inserting_before(output):
            flat = graph.call_function(_tensor_leaves, (output.args[0],))
        output.args = (flat,)
        module.recompile()
        return
    cls = type(module)

    @functools.wraps(cls.forward)   # the same signature, which torch.export matches dynamic shapes against
    def forward(self, *args, **kwargs):
        return _tensor_leaves(super(flat, self).forward(*args, **kwargs))

    flat = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    module.__class__ = flat


def _custom_ops(program: torch.export.ExportedProgram) -> list[str]:
    """The operators in ``program`` outside ATen, prims and granet_fx's own (``namespace::name``;
    ``granet_fx::masked_layer_norm`` is defined by the package that loads the file)."""
    return sorted({f"{n.target.namespace}::{n.target._opname}" for n in program.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
                   and n.target.namespace not in ("aten", "prims", "granet_fx")})


def _standard_ops_only(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with only ATen/prims operators, decomposing what can be; else a ValueError naming the rest."""
    if not _custom_ops(program):
        return program
    try:
        program = program.run_decompositions({})
    except Exception:
        pass
    left = _custom_ops(program)
    if left:
        raise ValueError(
            f"the model calls the custom operator{'s' if len(left) > 1 else ''} {', '.join(left)}, which a saved "
            "file cannot hold (loading it would need the package that defines it) and which does not decompose "
            "into standard operators; make the model use standard PyTorch operators instead")
    return program


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
