"""Shared bits of the benchmark scripts: machine description, medians, output files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from granet_fx.export import bench
from granet_fx.export.files import atomic_write

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    cpu = bench.machine()["cpu"]
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write(name: str, text: str, data: dict) -> None:
    """Write results/<name>.txt and results/<name>.json, atomically."""
    RESULTS.mkdir(exist_ok=True)
    for suffix, content in ((".txt", text), (".json", json.dumps(data, indent=2) + "\n")):
        atomic_write(RESULTS / (name + suffix), content.encode())
