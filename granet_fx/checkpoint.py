"""Crash-safe training checkpoints: model, optimizer, controller and random state in one file."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from typing import Any

import numpy as np
import torch
from torch import nn

from .controller import GraNet
from .sparsify import unwrap

FORMAT = "granet_fx.checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet, **extra: Any) -> None:
    """Save what a run needs to resume exactly, atomically.

    Holds the model's state dict (masks included), the optimizer's, the
    controller's, and the random states of torch (CPU and CUDA), Python and
    NumPy. ``extra`` (the step, the epoch, ...) must be tensors and plain Python
    values; ``load_checkpoint`` returns it. A crash at any moment leaves either
    the previous file or the new one at ``path``, never a partial file.
    """
    state = {
        "format": FORMAT,
        "version": VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "granet": granet.state_dict(),
        "rng": _rng_state(),
        "extra": extra,
    }
    atomic_save(state, path)


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet) -> dict[str, Any]:
    """Restore a run saved by ``save_checkpoint`` into fresh objects built as before; returns ``extra``.

    The file is read with ``weights_only=True``: it cannot run code.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"{os.fspath(path)} is not a readable granet_fx checkpoint: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)} is not a granet_fx checkpoint")
    if state.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)} has checkpoint version {state.get('version')!r}; "
                         f"this granet_fx reads version {VERSION}")
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    granet.load_state_dict(state["granet"])
    _set_rng_state(state["rng"])
    return state["extra"]


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, flushed to disk, then renamed over ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot save {path}: folder {folder} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):     # make the rename itself durable where the OS allows it
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


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
