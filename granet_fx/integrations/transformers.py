"""GraNetCallback: GraNet sparse training inside ``transformers.Trainer``.

::

    from granet_fx.integrations.transformers import GraNetCallback

    callback = GraNetCallback(gf.GraNetConfig(final_sparsity=0.9))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()

The callback sparsifies the model when the Trainer is built (or takes a model
that ``gf.sparsify`` already returned), builds the controller on the Trainer's
optimizer when training begins (``total_steps`` defaults to the Trainer's
``max_steps``), and calls ``granet.step()`` in ``on_optimizer_step``: after
``optimizer.step()``, before the Trainer zeroes the gradients, which regrowth
needs. The controller's state goes to ``checkpoint-N/granet_fx.pt`` beside
every Trainer checkpoint and comes back on ``resume_from_checkpoint``; the
masks themselves are buffers of the model, saved and loaded with its weights.
"""

from __future__ import annotations

import dataclasses
import io
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..config import GraNetConfig
from ..controller import GraNet
from ..distributed import is_sharded
from ..export.console import first_line
from ..export.files import atomic_write
from ..sparsify import INFO_ATTR, sparse_info, sparsify, unwrap

STATE_FILE = "granet_fx.pt"
FORMAT = "granet_fx.trainer_callback"
VERSION = 1


class GraNetCallback(TrainerCallback):
    """Drives a ``GraNet`` controller from ``transformers.Trainer`` events.

    ``config`` is used to sparsify a model that is not sparsified yet (default
    ``GraNetConfig()``); for a model already returned by ``gf.sparsify`` leave
    it out, or give the same config. ``callback.granet`` is the controller once
    training has begun (``callback.granet.report()`` for the per-layer view).
    """

    def __init__(self, config: GraNetConfig | None = None):
        if config is not None and not isinstance(config, GraNetConfig):
            raise TypeError(f"config must be a granet_fx.GraNetConfig; got {type(config).__name__}")
        self.config = config
        self.granet: GraNet | None = None

    # Trainer events ----------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        # Sparsify now, before train() loads a checkpoint: its mask buffers must exist to be loaded.
        self._sparsify(model)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                       **kwargs: Any) -> None:
        resuming = state.global_step > 0
        if resuming and not _is_sparsified(model):
            raise RuntimeError(
                "granet_fx: resuming a Trainer checkpoint with a model that was not sparsified when the checkpoint "
                "was loaded, so its masks were not restored: pass GraNetCallback in Trainer(callbacks=[...]) "
                "(not trainer.add_callback), or sparsify the model before building the Trainer"
            )
        if optimizer is None:
            raise RuntimeError("granet_fx: the Trainer has no optimizer at on_train_begin")
        model = self._sparsify(model)
        if _is_sharded(model):
            raise NotImplementedError(
                "granet_fx: the model's weights are sharded (FSDP2 DTensors), and GraNetCallback does not drive a "
                "sharded model yet: train with DDP (leave fsdp out of TrainingArguments)"
            )
        if args.fsdp:
            warnings.warn("granet_fx: TrainingArguments asks for FSDP but the model's weights are not sharded "
                          "(on CPU, accelerate trains with DDP instead); GraNet runs as under DDP", stacklevel=2)
        _set_total_steps(model, state.max_steps)
        self.granet = GraNet(model, optimizer)
        if resuming:
            self._resume(args, state)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          **kwargs: Any) -> None:
        # After optimizer.step(), before zero_grad(): re-mask, and prune/regrow with this step's gradients.
        self.granet.step()

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if self.granet is None or logs is None:
            return
        values = self.metrics()
        logs.update(values)   # seen by the callbacks after this one (progress bar, reporters listed later)
        # The Trainer appended a copy of ``logs`` to the history before calling on_log: add them there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                **kwargs: Any) -> None:
        if self.granet is None or not args.should_save:
            return
        folder = checkpoint_folder(args, state.global_step)
        if not os.path.isdir(folder):
            warnings.warn(f"granet_fx: no checkpoint folder {folder}; the controller state was not saved",
                          stacklevel=2)
            return
        save_state(os.path.join(folder, STATE_FILE), self.granet)

    # Helpers -------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """What ``on_log`` adds: measured global sparsity of the masked weights, the schedule's target
        sparsity and regrowth fraction at the current step. Empty before training begins."""
        if self.granet is None:
            return {}
        report = self.granet.report()
        return {
            "granet/global_sparsity": float(report.global_sparsity),
            "granet/target_sparsity": float(report.target_sparsity),
            "granet/regrow_fraction": float(report.regrow_fraction),
        }

    def _sparsify(self, model: nn.Module | None) -> nn.Module:
        if model is None:
            raise RuntimeError("granet_fx: the Trainer passed no model to GraNetCallback")
        model = unwrap(model)
        if _is_sparsified(model):
            if self.config is not None:
                _check_same_config(self.config, sparse_info(model).config)
            return model
        new = sparsify(model, self.config if self.config is not None else GraNetConfig())
        if new is not model:
            raise ValueError(
                f"granet_fx: {type(model).__name__} traces whole, so sparsify returns a new module that the "
                "Trainer does not hold: sparsify it before building the Trainer, "
                "model = gf.sparsify(model, config), and pass that model to Trainer(model=model, ...)"
            )
        return model

    def _resume(self, args: TrainingArguments, state: TrainerState) -> None:
        """Load the controller state saved with the checkpoint that the Trainer resumed from."""
        folders = []
        if isinstance(args.resume_from_checkpoint, str):
            folders.append(args.resume_from_checkpoint)
        folders.append(checkpoint_folder(args, state.global_step))
        for folder in folders:
            path = os.path.join(folder, STATE_FILE)
            if not os.path.isfile(path):
                continue
            data = load_state(path)
            if data["granet"].get("step") != state.global_step:
                continue
            self.granet.load_state_dict(data["granet"])
            _check_masks(self.granet, data["active"], path)
            return
        raise FileNotFoundError(
            f"granet_fx: resuming at step {state.global_step}, but found no {STATE_FILE} saved at that step in "
            + " or ".join(folders)
            + ": resume from a checkpoint that GraNetCallback saved; for one outside output_dir also set "
            "TrainingArguments(resume_from_checkpoint=<its folder>)"
        )


# The controller state beside a Trainer checkpoint -------------------------------
def checkpoint_folder(args: TrainingArguments, step: int) -> str:
    """The folder where the Trainer saves its checkpoint of ``step``."""
    return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def save_state(path: str | os.PathLike, granet: GraNet) -> None:
    """Write the controller state and each mask's count of kept weights (a check on resume), atomically."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "granet": granet.state_dict(),
                "active": _active(granet)}, buffer)
    atomic_write(path, buffer.getvalue())


def load_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file written by ``save_state`` (plain tensors and values only: ``weights_only=True``)."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch raises several types for a damaged or foreign file
        raise ValueError(f"{os.fspath(path)}: not a readable granet_fx controller state ({first_line(e)})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("granet"), dict):
        raise ValueError(f"{os.fspath(path)}: not a granet_fx controller state")
    if data.get("version") != VERSION:
        raise ValueError(f"{os.fspath(path)}: controller state version {data.get('version')!r}; "
                         f"this granet_fx reads version {VERSION}")
    return data


def _active(granet: GraNet) -> dict[str, int]:
    return {name: int(torch.count_nonzero(mask)) for name, mask in granet.masks().items()}


def _check_masks(granet: GraNet, saved: dict[str, int], path: str) -> None:
    now = _active(granet)
    differ = sorted(n for n in set(now) | set(saved) if now.get(n) != saved.get(n))
    if differ:
        raise RuntimeError(
            f"granet_fx: the model's masks do not match {path} ({', '.join(differ[:3])}"
            f"{', ...' if len(differ) > 3 else ''}): the checkpoint's weights did not restore the mask buffers"
        )


def _is_sparsified(model: nn.Module | None) -> bool:
    return model is not None and getattr(unwrap(model), INFO_ATTR, None) is not None


def _is_sharded(model: nn.Module) -> bool:
    """True when a parameter is a DTensor (what FSDP2's ``fully_shard`` turns the weights into)."""
    return any(is_sharded(p) for p in model.parameters())


def _check_same_config(mine: GraNetConfig, model_config: GraNetConfig) -> None:
    a, b = mine.to_dict(), model_config.to_dict()
    differ = sorted(k for k in a if a[k] != b[k] and not (k == "total_steps" and None in (a[k], b[k])))
    if differ:
        raise ValueError(
            f"granet_fx: the model was sparsified with another config than GraNetCallback's "
            f"({', '.join(differ)} differ): leave GraNetCallback's config out for a sparsified model"
        )


def _set_total_steps(model: nn.Module, max_steps: int) -> None:
    """Give the model's config the Trainer's step count when it has none; warn when they differ."""
    info = sparse_info(model)
    total = info.config.total_steps
    if total is None:
        info.config = dataclasses.replace(info.config, total_steps=max_steps)   # validates it
    elif total != max_steps:
        warnings.warn(f"granet_fx: the config's total_steps ({total}) differs from the Trainer's max_steps "
                      f"({max_steps}); the schedules follow total_steps", stacklevel=3)
