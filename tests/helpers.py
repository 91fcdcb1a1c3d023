"""Small models and a training loop shared by the tests."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf


class MLP(nn.Module):
    def __init__(self, sizes=(20, 30, 10)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(1, 8, 5, padding=2)
        self.bn = nn.BatchNorm1d(8)
        self.conv2 = nn.Conv1d(8, 16, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).mean(-1)
        return self.fc(self.drop(x))


class Branchy(nn.Module):
    """A linear layer behind data-dependent control flow: neither symbolic_trace nor torch.export captures it."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


class Block(nn.Module):
    def __init__(self, d=18, h=27):
        super().__init__()
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Two residual blocks; row counts 18, 27, 18, 27, 18, 5 (uneven shards over 2 and 4 ranks, one empty)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 18)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(18, 5)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def batches(n, shape, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0],), generator=g)) for _ in range(n)]


def train(model, optimizer, granet, data, forward=None):
    """One optimizer step and one granet.step() per batch; returns the losses."""
    forward = model if forward is None else forward
    losses = []
    for x, y in data:
        loss = F.cross_entropy(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        granet.step()
        losses.append(loss.item())
    return losses


def sparsify_warned(model, config, **kw):
    """``gf.sparsify`` and the granet_fx warnings it gave (their messages)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = gf.sparsify(model, config, **kw)
    return sparse, [str(w.message) for w in caught if "granet_fx" in str(w.message)]


def near(printed: str, low: float, high: float) -> bool:
    """Whether a number printed with 2 decimals can be the rounding of a value in [low, high]."""
    value = float(printed.rstrip("x"))
    return low - 0.005 <= value <= high + 0.005


def quotient(a: str, b: str) -> tuple[float, float]:
    """The range of a / b for a and b printed with 2 decimals (b > 0)."""
    a, b = float(a.rstrip("x")), float(b.rstrip("x"))
    high = (a + 0.005) / (b - 0.005) if b > 0.005 else float("inf")
    return max(a - 0.005, 0) / (b + 0.005), high


def run_benchmark(script, args, out):
    """Run a benchmark script as a command (``args`` end with ``--out out``); its text and JSON outputs."""
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out.with_suffix(".txt").read_text(), json.loads(out.with_suffix(".json").read_text())


def granet_export(source, out, *options, timeout: int = 600) -> subprocess.CompletedProcess:
    """``granet-export SOURCE -o OUT [options]``, the installed command in a fresh process, as users run it;
    asserts that it succeeded."""
    exe = os.path.join(os.path.dirname(sys.executable), "granet-export")
    run = subprocess.run([exe, str(source), "-o", str(out), *map(str, options)], capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, run.stderr
    return run
