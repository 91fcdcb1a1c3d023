"""Shared bits of the benchmark scripts: machine description, medians, output files."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from granet_fx.export import bench

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


def choices(known) -> "Callable[[str], list[str]]":
    """An argparse type: comma-separated names, each one of ``known``."""
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown model {', '.join(unknown) or repr(text)}; choose from "
                                             f"{', '.join(known)}")
        return names
    return parse


def command() -> str:
    """The command line, quoted so that it can be pasted back (arguments may hold spaces and parentheses)."""
    return "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:])


def write_outputs(out: str, text: str, data: dict) -> None:
    """Print ``text`` and write it to ``out``.txt, and ``data`` to ``out``.json, atomically."""
    print(text)
    bench.write_json(data, out + ".json")
    bench.write_atomic(out + ".txt", text)


def write(name: str, text: str, data: dict) -> None:
    """Write results/<name>.txt and results/<name>.json, atomically."""
    RESULTS.mkdir(exist_ok=True)
    bench.write_atomic(str(RESULTS / (name + ".txt")), text)
    bench.write_json(data, str(RESULTS / (name + ".json")))
