"""MNIST-1D (generated locally by the ``mnist1d`` package) and a small training recipe.

Used by the end-to-end example and the accuracy benchmark, so that both train
the same way. Needs the ``examples`` extra: ``pip install granet-fx[examples]``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import GraNetConfig
from .controller import GraNet
from .report import SparsityReport
from .sparsify import sparsify


@dataclass
class Mnist1d:
    x_train: torch.Tensor  # (N, 1, 40) float32
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist1d(num_samples: int = 10_000, seed: int = 42) -> Mnist1d:
    """Generate MNIST-1D with ``num_samples`` samples (80% train, 20% test); no download."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install 'granet-fx[examples]'") from e
    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    d = make_dataset(args)

    def tensor(a, dtype):
        return torch.as_tensor(a, dtype=dtype)

    return Mnist1d(
        tensor(d["x"], torch.float32).unsqueeze(1), tensor(d["y"], torch.int64),
        tensor(d["x_test"], torch.float32).unsqueeze(1), tensor(d["y_test"], torch.int64),
    )


@dataclass
class TrainResult:
    accuracy: float
    report: SparsityReport
    model: nn.Module
    seconds: float


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train(was_training)
    return correct / len(x)


def train_mnist1d(
    model: nn.Module,
    config: GraNetConfig,
    data: Mnist1d,
    *,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    compile: bool = True,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[GraNet], None] | None = None,
) -> TrainResult:
    """Sparsify ``model`` and train it on MNIST-1D for ``config.total_steps`` steps.

    SGD with Nesterov momentum 0.9; the learning rate drops 10x at 50% and 75%
    of training (GraNet's CIFAR recipe, in steps instead of epochs).
    ``callback(granet)``, if given, is called once before the first step and
    after every step (for example a ``granet_fx.runs.RunRecorder``).
    ``seed`` seeds the masks, the batches' order and the controller; the
    initial weights are the caller's: for a run that repeats, seed torch
    before building ``model`` (as ``examples/train_mnist1d.py`` does).
    """
    steps = config.total_steps
    if not steps:
        raise ValueError("config.total_steps must be set")
    torch.manual_seed(seed)
    model = sparsify(model, dataclasses.replace(config, seed=seed), example_inputs=(data.x_train[:1],))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [steps // 2, steps * 3 // 4], 0.1)
    granet = GraNet(model, optimizer)
    if callback is not None:
        callback(granet)
    forward = torch.compile(model) if compile else model
    generator = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    order = torch.randperm(n, generator=generator)
    position = 0
    start = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if position + batch_size > n:
            order, position = torch.randperm(n, generator=generator), 0
        idx = order[position:position + batch_size]
        position += batch_size
        loss = F.cross_entropy(forward(data.x_train[idx]), data.y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        granet.step()
        schedule.step()
        if callback is not None:
            callback(granet)
        if progress and (step % max(steps // 20, 1) == 0 or step == steps):
            r = granet.report()
            print(f"\rstep {step}/{steps}  loss {loss.item():.3f}  sparsity {r.global_sparsity:.3f}",
                  end="" if step < steps else "\n", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    return TrainResult(accuracy(model, data.x_test, data.y_test), granet.report(), model, seconds)
