"""Channel counts that onnxruntime runs fast on this machine: a small measured calibration, cached.

onnxruntime's CPU kernels compute channels in blocks (the NCHWc convolutions in
8 floats with AVX2 and 16 with AVX-512; matrix products in panels), so a
layer that keeps one channel past a block costs about as much as one with the
block full. ``GraNetConfig(channel_multiple="measured")`` asks, for each
channel group, how wide that step is for the group's own layers: every conv
and linear layer that writes or reads the group's channels, with its own
kernel and channels on the other side, at a fixed size (32x32 images, 256
rows of a linear layer's input, batch 1, one thread). The group's layers run
together in one onnxruntime session at the widths ``base + p``, ``p`` in
``PERIODS``, where ``base`` is the multiple of 32 below the width the group
keeps at the final sparsity. A width is *efficient* when every wider one
costs more than it by at least half a proportional share: none comes almost
for free, as the rest of a padded block does, or a width that a faster kernel
takes (onnxruntime runs a convolution whose channels do not fit its blocks on
another, slower path). The group's multiple is the smallest ``p`` from which
every measured width ``base + q``, ``q >= p``, is efficient.

A result is cached per CPU, onnxruntime version and shapes in
``$GRANET_FX_CACHE/channel_periods.json`` (default ``~/.cache/granet_fx``), so a
model is measured once per machine; the controller that resumes a run reads
the same multiples back. Another machine may measure others: the multiples,
like ``"auto"``, belong to the machine that trains.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from onnx import helper, numpy_helper

from .files import atomic_write, cache_dir
from .roofline import _float, _model, _random_feeds, _session

PERIODS = (1, 2, 4, 8, 16, 32)
GAIN = 0.5      # a wider width must cost at least half its proportional share more (``efficient``)
RUNS = 15
_IMAGE = {1: (1024,), 2: (32, 32), 3: (8, 8, 8)}  # the spatial size a conv is measured at, by kernel dimensions
_ROWS = 256                                        # rows of a linear layer's input
_measured: dict[str, int] = {}                     # this process's results, by cache key


@dataclass(frozen=True)
class LayerShape:
    """A conv or linear layer as the calibration sees it: the width it is measured at is the group's."""

    role: str                  # "row": it writes the group's channels; "column": it reads them
    other: int                 # channels on the other side: a row's inputs, a column's outputs
    rest: int                  # channels of its group side that are not the group's (a split, a concat)
    kernel: tuple[int, ...]    # () for a linear layer
    repeat: int = 1            # its channels per channel of the group (a head's rows, a flatten's features)
    depthwise: bool = False    # a depthwise conv (a row): its inputs are the group's channels too


def group_shapes(tensors: dict[str, torch.Tensor], group) -> tuple[LayerShape, ...]:
    """The conv and linear layers of a ``ChannelGroup`` (its rows and columns), each as a ``LayerShape``."""
    shapes = []
    for m in group.rows + group.columns:
        w = m.oriented(tensors[m.weight]).shape
        if len(w) - 2 not in _IMAGE and len(w) != 2:
            continue        # neither a linear layer nor a 1-3-D conv: left out of the timing
        side = w[0] if m.role == "row" else w[1]
        rest = side - group.size * m.repeat
        other = w[1] if m.role == "row" else w[0]
        shapes.append(LayerShape(m.role, int(other), int(rest), tuple(w[2:]), m.repeat, m.role == "row" and m.depthwise))
    return tuple(shapes)


def _layer(i: int, shape: LayerShape, width: int, rng: np.random.Generator):
    """(node, input, output, weight) of ``shape`` at ``width`` channels of the group."""
    side = width * shape.repeat + shape.rest
    x, y, name = f"x{i}", f"y{i}", f"w{i}"
    if not shape.kernel:
        inputs, outputs = (shape.other, side) if shape.role == "row" else (side, shape.other)
        weight = rng.standard_normal((inputs, outputs), dtype=np.float32)
        node = helper.make_node("MatMul", [x, name], [y])
        return node, _float(x, [_ROWS, inputs]), _float(y, [_ROWS, outputs]), numpy_helper.from_array(weight, name)
    image = list(_IMAGE[len(shape.kernel)])
    pads = [k // 2 for k in shape.kernel] * 2
    if shape.role == "row":
        inputs, outputs, group = (side, side, side) if shape.depthwise else (shape.other, side, 1)
    else:
        inputs, outputs, group = side, shape.other, 1
    weight = rng.standard_normal((outputs, inputs // group, *shape.kernel), dtype=np.float32)
    node = helper.make_node("Conv", [x, name], [y], pads=pads, group=group)
    out_image = [s + 2 * p - k + 1 for s, p, k in zip(image, pads, shape.kernel)]
    return (node, _float(x, [1, inputs, *image]), _float(y, [1, outputs, *out_image]),
            numpy_helper.from_array(weight, name))


def group_model(shapes: Sequence[LayerShape], width: int):
    """One ONNX model that runs every layer of ``shapes`` at ``width``, each on an input of its own."""
    rng = np.random.default_rng(0)
    parts = [_layer(i, s, width, rng) for i, s in enumerate(shapes)]
    return _model([p[0] for p in parts], [p[1] for p in parts], [p[2] for p in parts], [p[3] for p in parts])


def time_widths(shapes: Sequence[LayerShape], widths: Sequence[int], threads: int = 1,
                runs: int = RUNS) -> dict[int, float]:
    """Median seconds of one run of ``group_model(shapes, w)`` for each width, the widths run alternately."""
    sessions = {w: _session(group_model(shapes, w), threads) for w in widths}
    feeds = {w: _random_feeds(s) for w, s in sessions.items()}
    times: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(runs + 2):
        for w in (widths if r % 2 == 0 else widths[::-1]):
            start = time.perf_counter()
            sessions[w].run(None, feeds[w])
            if r >= 2:                         # two warm-up rounds
                times[w].append(time.perf_counter() - start)
    return {w: float(np.median(t)) for w, t in times.items()}


def efficient(times: dict[int, float], width: int, gain: float = GAIN) -> bool:
    """Whether every wider width of ``times`` takes more time than ``width`` by at least ``gain`` x a
    proportional share (``gain * t * extra / width``): no wider layer comes almost for free."""
    t = times[width]
    return all(times[w] - t > gain * t * (w - width) / width for w in times if w > width)


def period(times: dict[int, float], base: int, largest: int = PERIODS[-1], gain: float = GAIN) -> int:
    """The smallest ``p`` of ``PERIODS`` (at most ``largest``) such that the widths ``base + q`` measured
    for every ``q`` from ``p`` up are ``efficient``; ``largest`` if none is but the widest."""
    candidates = [p for p in PERIODS if p <= largest]
    found = candidates[-1]
    for p in reversed(candidates[:-1]):
        if not efficient(times, base + p, gain):
            break
        found = p
    return found


def _cache_file() -> Path:
    return cache_dir() / "channel_periods.json"


def _read_cache(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@functools.cache
def _cpu() -> str:
    from .bench import machine

    return machine()["cpu"]


def measured_widths(kept: int, size: int) -> tuple[int, int, list[int]]:
    """(base, largest period, widths) that ``measured_period`` times for a group keeping ``kept`` of its
    ``size`` channels: ``base`` the multiple of 32 below ``kept``, periods at most half the group."""
    base = 32 * (max(kept - 1, 0) // 32)
    largest = max(1, size // 2)
    return base, largest, [base + p for p in PERIODS if p <= largest]


def kept_channels(size: int, density: float) -> int:
    """The channels a group of ``size`` keeps at ``density`` (at least one)."""
    return max(1, round(density * size))


def measured_period(shapes: Sequence[LayerShape], kept: int, size: int, threads: int = 1) -> int:
    """The multiple of a group's channels that its layers ``shapes`` run best at near ``kept`` of its
    ``size`` channels: cached, else measured (``time_widths``, ``period``) and cached."""
    import onnxruntime as ort

    if not shapes:
        return 1
    base, largest, widths = measured_widths(kept, size)
    key = json.dumps([_cpu(), ort.__version__, threads, base, largest, [astuple(s) for s in shapes]])
    if key in _measured:
        return _measured[key]
    path = _cache_file()
    cached = _read_cache(path)
    if isinstance(cached.get(key), int):
        _measured[key] = cached[key]
        return cached[key]
    try:
        found = period(time_widths(shapes, widths, threads), base, largest)
    except Exception as e:   # onnxruntime refused a layer: the group keeps any number of channels
        warnings.warn(f"granet_fx: channel_multiple='measured' could not time a channel group's layers "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); it keeps a "
                      f"multiple of 1", stacklevel=2)
        return 1
    _measured[key] = found
    cached = _read_cache(path)                 # another process may have written meanwhile
    cached[key] = found
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cached, indent=0).encode())
    except OSError:
        pass                                   # a cache that cannot be written: measured again next time
    return found


def measured_multiples(tensors: dict[str, torch.Tensor], groups: Sequence, density: float,
                       threads: int = 1) -> list[int]:
    """Per ``ChannelGroup``, the multiple of its channels to keep: ``measured_period`` of its layers at
    ``density`` of its channels (counted in the group's channels: a head is one)."""
    return [measured_period(group_shapes(tensors, g), kept_channels(g.size, density), g.size, threads)
            for g in groups]
