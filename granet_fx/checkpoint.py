"""Crash-safe training checkpoints: model, optimizer, controller and random state in one file.

The file (version 2) is one header line and the payload::

    GRANET_FX CHECKPOINT\\n
    {"format":"granet_fx.checkpoint","payload_bytes":N,"sha256":"...","version":2}\\n
    <N bytes: the torch.save zip of the state>

``load_checkpoint`` accepts the header only in exactly that form and the
payload only when its length and SHA-256 match, so any damaged byte is an
error, not silently different weights. The payload's zip is then checked entry
by entry (``safe_zip``) and rebuilt from the checked bytes before
``torch.load(weights_only=True)`` parses it. Version 1 files (a bare
``torch.save`` zip, without a checksum) are still read the same safe way; every
zip entry's CRC is checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .controller import GraNet
from .export.console import first_line
from .export.files import FileReadError, atomic_write, check_writable, read_bounded
from .export.safe_zip import ZipProblem, read_entries, write_entries
from .sparsify import unwrap

FORMAT = "granet_fx.checkpoint"
VERSION = 2
MAGIC = b"GRANET_FX CHECKPOINT\n"
_MAX_HEADER = 512
_KEYS = ("format", "version", "model", "optimizer", "granet", "rng", "extra")


class CheckpointError(ValueError):
    """A file that ``load_checkpoint`` cannot use; the message names the file and the problem, in one line."""


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet, **extra: Any) -> None:
    """Save what a run needs to resume exactly, atomically, with a checksum.

    Holds the model's state dict (masks included), the optimizer's, the
    controller's, and the random states of torch (CPU and CUDA), Python and
    NumPy. ``extra`` (the step, the epoch, ...) must be tensors and plain Python
    values; ``load_checkpoint`` returns it. The file is written under a
    temporary name, flushed to disk and renamed: a crash at any moment leaves
    the previous file or the new one at ``path``, never a partial file. A
    temporary file left by a writer that was killed is removed here.
    """
    problem = check_writable(path)
    if problem:
        raise OSError(f"cannot write the checkpoint {os.fspath(path)}: {problem}")
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "granet": granet.state_dict(),
        "rng": _rng_state(),
        "extra": extra,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    atomic_write(path, MAGIC + _header(payload) + b"\n" + payload)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet) -> dict[str, Any]:
    """Restore a run saved by ``save_checkpoint`` into fresh objects built as before; returns ``extra``.

    Nothing in the file can run code (``weights_only=True`` on checked bytes).
    Any other file, or a damaged one, raises ``CheckpointError`` naming it and
    the problem, before the objects are touched. Should a state dict not fit
    (objects built differently), ``CheckpointError`` says so and the objects
    loaded before it are already changed: build them afresh.
    """
    state = read_checkpoint(path)
    name = os.fspath(path)
    for key, target in (("model", unwrap(model)), ("optimizer", optimizer), ("granet", granet)):
        try:
            target.load_state_dict(state[key])
        except Exception as e:
            raise CheckpointError(f"{name}: its {key} state does not fit the {key} given "
                                  f"(built differently?): {_one_line(e)}") from None
    try:
        _set_rng_state(state["rng"])
    except Exception as e:
        raise CheckpointError(f"{name}: its random state cannot be restored: {first_line(e)}") from None
    return state["extra"]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict stored in a checkpoint file, checked (checksum, zip, weights only, layout)."""
    name = os.fspath(path)
    try:
        data = read_bounded(path, what="checkpoint")
    except FileReadError as e:
        raise CheckpointError(str(e)) from None
    if data.startswith(MAGIC):
        payload, version = _checked_payload(name, data), VERSION
    elif data.startswith(b"PK\x03\x04"):
        payload, version = data, 1     # version 1: torch.save's zip, no checksum
    else:
        raise CheckpointError(f"{name} is not a granet_fx checkpoint (no checkpoint header; another kind of file)")
    try:
        entries = read_entries(payload)
    except ZipProblem as e:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its zip {e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(io.BytesIO(write_entries(entries)), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{name} is not a readable granet_fx checkpoint: {first_line(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{name} is not a granet_fx checkpoint (a torch file of another kind)")
    if state.get("version") != version:
        raise CheckpointError(f"{name} has checkpoint version {state.get('version')!r} inside a version {version} "
                              "file; this granet_fx reads versions 1 and 2")
    problem = _layout_problem(state)
    if problem:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: {problem}")
    return state


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message on one line (torch's state-dict errors list the keys on later lines)."""
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(e).__name__


def _header(payload: bytes) -> bytes:
    fields = {"format": FORMAT, "payload_bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
              "version": VERSION}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("ascii")


def _checked_payload(name: str, data: bytes) -> bytes:
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its header line is cut off or too long")
    line = data[len(MAGIC):end]
    try:
        header = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its header is not JSON") from None
    if not isinstance(header, dict) or set(header) != {"format", "payload_bytes", "sha256", "version"}:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its header does not have the keys "
                              "format, payload_bytes, sha256 and version")
    if header["format"] != FORMAT:
        raise CheckpointError(f"{name} is not a granet_fx checkpoint (header format {header['format']!r})")
    if header["version"] != VERSION:
        raise CheckpointError(f"{name} has checkpoint version {header['version']!r}; "
                              f"this granet_fx reads versions 1 and {VERSION}")
    size, digest = header["payload_bytes"], header["sha256"]
    if type(size) is not int or size < 1 or not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its header's payload_bytes or sha256 "
                              "is malformed")
    payload = data[end + 1:]
    if len(payload) != size:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: it holds {len(payload):,} payload bytes, "
                              f"its header says {size:,} (truncated or appended to)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its contents do not match their "
                              "SHA-256 checksum")
    if line != _header(payload):
        raise CheckpointError(f"{name} is a damaged granet_fx checkpoint: its header is not in the form "
                              "save_checkpoint writes")
    return payload


def _layout_problem(state: dict) -> str | None:
    """What is wrong with the shape of a loaded checkpoint state (None when it has the expected layout)."""
    missing = [k for k in _KEYS if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return "its model state is not a dict of named tensors"
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        return "its optimizer state lacks state or param_groups"
    if not isinstance(state["granet"], dict):
        return "its controller state is not a dict"
    if not isinstance(state["extra"], dict):
        return "its extra values are not a dict"
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) \
            or rng["torch"].dtype != torch.uint8 or not isinstance(rng.get("python"), tuple) \
            or not isinstance(rng.get("numpy"), tuple) or len(rng["numpy"]) != 5 \
            or not isinstance(rng["numpy"][1], torch.Tensor):
        return "its random state is malformed"
    try:   # on throwaway generators, so that a bad state fails before anything is changed
        torch.Generator().set_state(rng["torch"])
        random.Random().setstate(rng["python"])
        name, keys, pos, has_gauss, gauss = rng["numpy"]
        np.random.RandomState().set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    except Exception as e:
        return f"its random state is malformed ({first_line(e)})"
    return None


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
