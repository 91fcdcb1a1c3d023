"""The selection pass of mask updates (``criteria._pass``) as one compiled loop per tensor.

An eager pass costs several aten ops per slice of a tensor, each a trip
through memory; the loop in ``select_pass.c`` reads each score and pool entry
once and writes the marks once. It is compiled with the machine's C compiler
on first use and cached (``cache_dir()``, keyed by the source); without a
compiler, or with ``GRANET_FX_NATIVE=0``, the eager pass runs instead, with the
same results. Float32 scores and bool pools on the CPU only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from ..export.files import cache_dir

SOURCE = Path(__file__).with_name("select_pass.c")
FLAGS = ("-O3", "-shared", "-fPIC")         # IEEE comparisons kept: no -ffast-math
MAGNITUDE, LARGEST, UPPER_INF, LOWER_NINF, HAS_TIE, LOWER_IS_TIE = 1, 2, 4, 8, 16, 32


@functools.cache
def kernel():
    """The compiled ``granet_select_pass``, or None (disabled, or no compiler that builds it)."""
    if os.environ.get("GRANET_FX_NATIVE", "1") == "0":
        return None
    source = SOURCE.read_bytes()
    compiler = os.environ.get("CC", "cc")
    tag = hashlib.sha256(source + repr((compiler, FLAGS, platform.machine())).encode()).hexdigest()[:16]
    library = cache_dir() / f"select_pass-{tag}.so"
    try:
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=".select_pass.", suffix=".so")
            os.close(fd)
            try:
                subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                               timeout=120)
                os.replace(tmp, library)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        fn = ctypes.CDLL(str(library)).granet_select_pass
    except (OSError, subprocess.SubprocessError):
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn.argtypes = [p, p, i64, i64, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_int32,
                   p, p, i64, p, p, p, i64, p]
    fn.restype = i64
    return fn


@functools.cache
def _workers(n: int, pid: int) -> ThreadPoolExecutor:
    """The pass's threads, per process: a forked child does not inherit its parent's threads."""
    return ThreadPoolExecutor(n, thread_name_prefix="granet_fx_select")


def eligible(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor]) -> bool:
    """Whether the compiled pass can take these tensors (and is there)."""
    return all(s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous()
               and p.device.type == "cpu" and p.dtype == torch.bool and p.is_contiguous()
               and s.numel() == p.numel() for s, p in zip(scores, pools)) and kernel() is not None


def select_pass(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], lower: float, upper: float,
                tie: float | None, largest: bool, magnitude: bool, chunk: int):
    """``criteria._pass`` compiled: per tensor (marked, n_marked, index, key, ties or None, tie_counts).

    Each tensor is cut into ranges of whole ``chunk`` slices, run on
    ``torch.get_num_threads()`` threads (ctypes lets go of the GIL); a range
    whose gathered entries outgrow their buffers goes on in a larger one.
    """
    fn = kernel()
    flags = ((MAGNITUDE if magnitude else 0) | (LARGEST if largest else 0)
             | (UPPER_INF if upper == math.inf else 0) | (LOWER_NINF if lower == -math.inf else 0)
             | (HAS_TIE if tie is not None else 0) | (LOWER_IS_TIE if tie is not None and lower == upper else 0))
    clip = lambda x: 0.0 if math.isinf(x) else x      # an infinite end is a flag, not a value
    lower_f, upper_f, tie_f = clip(lower), clip(upper), 0.0 if tie is None else tie
    threads = max(1, torch.get_num_threads())
    outs, jobs = [], []
    for s, p in zip(scores, pools):
        n = s.numel()
        slices = -(-n // chunk)
        marked = torch.empty(n, dtype=torch.bool)
        ties = torch.empty(n, dtype=torch.bool) if tie is not None else None
        tie_counts = torch.zeros(slices, dtype=torch.int64)
        outs.append((marked, ties, tie_counts))
        per = max(1, -(-slices // threads))
        for first in range(0, slices, per):
            start, stop = first * chunk, min(n, (first + per) * chunk)
            jobs.append((len(outs) - 1, s, p, start, stop))

    def run(job):
        u, s, p, start, stop = job
        marked, ties, tie_counts = outs[u]
        pieces, n_marked, at = [], 0, start
        capacity = (stop - start) // 20 + 4096
        while at < stop:
            index = torch.empty(capacity, dtype=torch.int64)
            key = torch.empty(capacity, dtype=torch.float32)
            totals = torch.zeros(2, dtype=torch.int64)
            done = fn(s.data_ptr() + 4 * at, p.data_ptr() + at, stop - at, at, lower_f, upper_f, tie_f, flags,
                      marked.data_ptr() + at, ties.data_ptr() + at if ties is not None else None, chunk,
                      tie_counts.data_ptr(), index.data_ptr(), key.data_ptr(), capacity, totals.data_ptr())
            gathered = int(totals[1])
            pieces.append((index[:gathered], key[:gathered]))
            n_marked += int(totals[0])
            at += done
            capacity *= 2
        return u, n_marked, pieces

    results = list(_workers(threads, os.getpid()).map(run, jobs)) if len(jobs) > 1 else [run(j) for j in jobs]
    found = []
    for u, (marked, ties, tie_counts) in enumerate(outs):
        mine = [r for r in results if r[0] == u]
        index = [i for r in mine for i, _ in r[2]]
        key = [k for r in mine for _, k in r[2]]
        found.append((marked, sum(r[1] for r in mine),
                      torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
                      torch.cat(key) if key else torch.zeros(0),
                      ties, tie_counts.tolist() if tie is not None else []))
    return found
