"""Crash-safe training checkpoints: model, optimizer, controller and random state in one file."""

from __future__ import annotations

import io
import os
import random
from typing import Any

import numpy as np
import torch
from torch import nn

from .controller import GraNet
from .export.files import atomic_write, check_writable
from .sparsify import unwrap

FORMAT = "granet_fx.checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet, **extra: Any) -> None:
    """Save what a run needs to resume exactly, atomically.

    Holds the model's state dict (masks included), the optimizer's, the
    controller's, and the random states of torch (CPU and CUDA), Python and
    NumPy. ``extra`` (the step, the epoch, ...) must be tensors and plain Python
    values; ``load_checkpoint`` returns it. The file is written under a
    temporary name, flushed to disk and renamed: a crash at any moment leaves
    the previous file or the new one at ``path``, never a partial file.
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
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    granet: GraNet) -> dict[str, Any]:
    """Restore a run saved by ``save_checkpoint`` into fresh objects built as before; returns ``extra``.

    The file is read with ``weights_only=True``: it cannot run code. Should a
    state dict not fit (objects built differently), torch's error is raised and
    the objects loaded before it are already changed: build them afresh.
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
