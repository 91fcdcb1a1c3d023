"""``save`` and ``load``: a folded sparse model as a ``torch.export`` archive that loads without pickle.

The file is the ``.pt2`` zip archive that ``torch.export.save`` writes: the
graph as JSON and every weight as raw bytes. Beside it, ``extra/granet_fx.json``
holds the metadata: the GraNet config, per-layer density, multiply-accumulates,
and the example inputs with the outputs they gave (the reference for parity
checks), as raw little-endian bytes in base64.

``torch.export.load`` itself would unpickle parts of an archive that ask for
it (pickled weights and constants, sample inputs, compiled AOTInductor
libraries). ``load`` therefore reads the file once, accepts only the entries
that ``save`` writes, all of them plain data, and only then lets
``torch.export.load`` parse those bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..config import GraNetConfig
from ..fold import fold
from ..passes.trace import training_mode
from ..report import LayerReport
from ..sparsify import count_macs, sparse_info, unwrap
from .console import first_line
from .files import atomic_write

FORMAT = "granet_fx.archive"
FORMAT_VERSION = 1
METADATA = "granet_fx.json"
MODEL = "model"  # the program's name inside the archive, as torch.export.save names it


@dataclass(frozen=True)
class _Layout:
    """Entry names of the archive, relative to its root folder."""

    metadata: str
    sample_inputs: str
    payload_configs: tuple[str, ...]  # JSON lists of weights and constants, each saying if it is pickled
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
        sample_inputs=pt2.SAMPLE_INPUTS_FILENAME_FORMAT.format(MODEL),
        payload_configs=(pt2.WEIGHTS_CONFIG_FILENAME_FORMAT.format(MODEL),
                         pt2.CONSTANTS_CONFIG_FILENAME_FORMAT.format(MODEL)),
        allowed=re.compile("|".join(f"(?:{p})" for p in patterns)),
    )


class ArchiveError(ValueError):
    """A file that is not a readable granet_fx archive; the message says why."""


@dataclass
class SavedModel:
    """What ``load`` returns: the exported program and the metadata that ``save`` stored."""

    program: torch.export.ExportedProgram
    config: GraNetConfig
    layers: list[LayerReport]
    example_inputs: tuple[torch.Tensor, ...]
    reference_outputs: list[torch.Tensor]   # the model's outputs on example_inputs, flattened
    dynamic_batch: bool                      # whether the program takes any batch size

    def module(self) -> nn.Module:
        """The program as a module to call (inference only)."""
        return self.program.module()


def save(model: nn.Module, path: str | os.PathLike, *, example_inputs: Any) -> None:
    """Fold ``model``'s masks and write it to ``path`` as a ``torch.export`` archive plus metadata.

    ``model`` is a model returned by ``sparsify`` (it is not changed);
    ``example_inputs`` is a tensor or a tuple of tensors that it takes. The file
    loads with ``load`` without unpickling anything, and is written under a
    temporary name and then renamed, so an existing file at ``path`` is replaced
    whole or not at all. The batch dimension is exported as dynamic when the
    model allows it.
    """
    info = sparse_info(model)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors")
    model = unwrap(model)
    inputs = tuple(t.detach().cpu() for t in inputs)
    folded = fold(model).eval()
    with torch.no_grad():   # on the model's device: CPU and GPU kernels do not agree to the bit
        on_device = tuple(t.to(_device(model)) for t in inputs)
        outputs = flat_tensors(folded(*on_device))
        with training_mode(model, False):
            masked = flat_tensors(model(*on_device))
    if len(masked) != len(outputs) or not all(torch.equal(a, b) for a, b in zip(masked, outputs)):
        raise RuntimeError("granet_fx: the folded model computes something else than the masked model")
    folded = folded.cpu()

    program, dynamic = export_program(folded, inputs, dynamic_batch=None)
    program.example_inputs = None  # torch would pickle them; the metadata keeps them as raw bytes
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "torch": torch.__version__,
        "config": info.config.to_dict(),
        "layers": [dataclasses.asdict(layer) for layer in _layer_reports(model, folded, inputs)],
        "dynamic_batch": dynamic,
        "example_inputs": [tensor_to_json(t) for t in inputs],
        "reference_outputs": [tensor_to_json(t) for t in outputs],
    }
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={METADATA: json.dumps(metadata)})
    atomic_write(path, buffer.getvalue())


def load(path: str | os.PathLike) -> SavedModel:
    """Read a file written by ``save``; raises ``ArchiveError`` naming the problem for any other file.

    Nothing in the file is unpickled: entries that ``save`` does not write,
    including every pickled payload, are refused before the archive is parsed.
    """
    return load_bytes(read_file(path), path)


def load_bytes(data: bytes, path: str | os.PathLike) -> SavedModel:
    """``load`` for the bytes of the file at ``path`` (named in errors), already read."""
    metadata = _checked_metadata(path, data)
    try:
        program = torch.export.load(io.BytesIO(data))
        result = SavedModel(
            program=program,
            config=GraNetConfig.from_dict(metadata["config"]),
            layers=[LayerReport(**{**d, "shape": tuple(d["shape"])}) for d in metadata["layers"]],
            example_inputs=tuple(tensor_from_json(t) for t in metadata["example_inputs"]),
            reference_outputs=[tensor_from_json(t) for t in metadata["reference_outputs"]],
            dynamic_batch=bool(metadata["dynamic_batch"]),
        )
    except Exception as e:  # any failure here means a damaged archive
        raise ArchiveError(f"{path} is a damaged granet_fx archive: {first_line(e)}") from None
    return result


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``; ``ArchiveError`` for a missing, unreadable or empty file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ArchiveError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ArchiveError(f"{path} is a folder, not a file") from None
    except OSError as e:
        raise ArchiveError(f"cannot read {path}: {e.strerror}") from None
    if not data:
        raise ArchiveError(f"{path} is empty")
    return data


def is_archive(data: bytes) -> bool:
    """Whether ``data`` is a zip file holding granet_fx metadata (the file may still be damaged)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(n.endswith("/" + _layout().metadata) for n in z.namelist())
    except zipfile.BadZipFile:
        return False


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


def tensor_from_json(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d['dtype']!r}")
    raw = bytearray(base64.b64decode(d["data"], validate=True))
    flat = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    return flat.reshape(d["shape"])


def _checked_metadata(path, data: bytes) -> dict:
    """The archive's granet_fx metadata, once every entry is known to be plain data that ``save`` writes."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        names = z.namelist()
        damaged = z.testzip()
    except zipfile.BadZipFile:
        raise ArchiveError(
            f"{path} is not a granet_fx archive (not a complete zip file: truncated, or another kind of file)"
        ) from None
    with z:
        if damaged is not None:
            raise ArchiveError(f"{path} is a damaged granet_fx archive: entry {damaged} fails its checksum")
        root = names[0].split("/", 1)[0] if names else ""
        relative = [n[len(root) + 1:] for n in names if n.startswith(root + "/")]
        layout = _layout()
        if len(relative) != len(names) or layout.metadata not in relative:
            raise ArchiveError(
                f"{path} is not a granet_fx archive (a zip file without {METADATA}; write one with granet_fx.save)"
            )
        for name in relative:
            if not layout.allowed.fullmatch(name):
                raise ArchiveError(f"{path} holds {name!r}, which granet_fx.save never writes; refusing to load it")
        if z.read(f"{root}/{layout.sample_inputs}"):
            raise ArchiveError(f"{path} holds pickled sample inputs, which granet_fx.save never writes; refusing to load it")
        for config in layout.payload_configs:
            entries = _json(path, z, f"{root}/{config}").get("config", {})
            if any(e.get("use_pickle", True) for e in entries.values()):
                raise ArchiveError(f"{path} holds pickled tensors, which granet_fx.save never writes; refusing to load it")
        metadata = _json(path, z, f"{root}/{layout.metadata}")
    if metadata.get("format") != FORMAT:
        raise ArchiveError(f"{path} is not a granet_fx archive (its {METADATA} is not granet_fx metadata)")
    if metadata.get("version") != FORMAT_VERSION:
        raise ArchiveError(
            f"{path} is a granet_fx archive of version {metadata.get('version')!r}; this granet_fx reads version {FORMAT_VERSION}"
        )
    return metadata


def _json(path, z: zipfile.ZipFile, name: str) -> dict:
    try:
        value = json.loads(z.read(name))
    except (KeyError, ValueError):
        raise ArchiveError(f"{path} is a damaged granet_fx archive: {name} is missing or not JSON") from None
    if not isinstance(value, dict):
        raise ArchiveError(f"{path} is a damaged granet_fx archive: {name} is not a JSON object")
    return value


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


def flat_tensors(outputs: Any) -> list[torch.Tensor]:
    leaves, _ = pytree.tree_flatten(outputs)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError("the model's outputs must be tensors (or lists, tuples and dicts of tensors)")
    return [t.detach().cpu() for t in leaves]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
