"""The passes over memory of a mask update as compiled loops: the selection pass (``criteria._pass``),
a whole selection on one process around it (``select``), the re-masking (zeroing where a mask is
False), every layer's drop, growth and re-masking in one call (``regrow``) and the counts of a
mask's active entries.

An eager pass costs several aten ops per slice of a tensor, each a trip
through memory; the loops in ``update_passes.c`` read each score and pool entry
once and write the marks once, and zero every tensor shaped like a mask in one
read of the mask. They are compiled with the machine's C compiler on first use
and cached (``cache_dir()``, keyed by the source); without a compiler, or with
``GRANET_FX_NATIVE=0``, the eager passes run instead, with the same results.
CPU tensors only: float32 scores, bool pools and masks.

The passes run on ``torch.get_num_threads()`` OpenMP threads: with torch's
libgomp that is torch's own thread pool, whose threads spin for a while after
each op and would slow a second pool's threads down by half. Built without
OpenMP (a compiler that lacks it), they run on one thread.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..export.files import cache_dir

SOURCE = Path(__file__).with_name("update_passes.c")
FLAGS = ("-O3", "-shared", "-fPIC")         # IEEE comparisons kept: no -ffast-math
OPENMP = ("-fopenmp",)                      # tried first
MAGNITUDE, LARGEST, UPPER_INF, LOWER_NINF, HAS_TIE, LOWER_IS_TIE, COMPLEMENT, KEEP_REST, REMOVE = 1, 2, 4, 8, 16, 32, 64, 128, 256
MISSED = 512    # granet_select: the bracket taken as missed, so that tests reach the fallback


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The compiled library (the ``granet_*`` functions of ``update_passes.c``), built with OpenMP where the
    compiler has it, or None (disabled, or no compiler that builds it)."""
    if os.environ.get("GRANET_FX_NATIVE", "1") == "0":
        return None
    lib = None
    for flags in (FLAGS + OPENMP, FLAGS):
        try:
            lib = ctypes.CDLL(str(_built(flags)))
            break
        except (OSError, subprocess.SubprocessError):
            continue
    if lib is None:
        return None
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
    lib.granet_select_jobs.argtypes = [p, i32, f32, f32, f32, i32, i64, i32]
    lib.granet_select_jobs.restype = None
    lib.granet_zero_where_not.argtypes = [p, p, p, i64, p, p, i32, i64, i32]
    lib.granet_zero_where_not.restype = None
    lib.granet_slice_tops.argtypes = [p, p, i64, i64, i32, p, i32]
    lib.granet_slice_tops.restype = None
    lib.granet_last_equal.argtypes = [p, p, i64, f32, i32]
    lib.granet_last_equal.restype = i64
    lib.granet_select.argtypes = [p, i32, i64, i64, i32, i32, i64, i32]
    lib.granet_select.restype = i32
    lib.granet_regrow.argtypes = [p, i32, i32, i32, i64, i64, i64, i32]
    lib.granet_regrow.restype = None
    lib.granet_count.argtypes = [p, i64, i64, i32]
    lib.granet_count.restype = i64
    lib.granet_openmp.restype = i32
    lib.granet_avx2.restype = i32
    return lib


def _built(flags: tuple[str, ...]) -> Path:
    """The library built from ``SOURCE`` with ``flags``, from the cache or compiled into it now."""
    compiler = os.environ.get("CC", "cc")
    tag = hashlib.sha256(SOURCE.read_bytes() + repr((compiler, flags, platform.machine())).encode()).hexdigest()[:16]
    library = cache_dir() / f"update_passes-{tag}.so"
    if not library.exists():
        library.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=library.parent, prefix=".update_passes.", suffix=".so")
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(tmp, library)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return library


class _Job(ctypes.Structure):
    """One range of a tensor for the selection pass (``select_job`` in the C source)."""

    _fields_ = [("score", ctypes.c_void_p), ("pool", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("base", ctypes.c_int64), ("marked", ctypes.c_void_p), ("ties", ctypes.c_void_p),
                ("tie_counts", ctypes.c_void_p), ("out_index", ctypes.c_void_p), ("out_key", ctypes.c_void_p),
                ("capacity", ctypes.c_int64), ("totals", ctypes.c_int64 * 2), ("done", ctypes.c_int64)]


def _threads() -> int:
    """The passes' threads: torch's."""
    return max(1, torch.get_num_threads())


def eligible(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor],
             out: Sequence[torch.Tensor] | None = None) -> bool:
    """Whether the compiled pass can take these tensors (and is there)."""
    flags = [p for p in pools] + (list(out) if out is not None else [])
    return (all(s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous() and s.numel() == p.numel()
                for s, p in zip(scores, pools))
            and all(f.device.type == "cpu" and f.dtype == torch.bool and f.is_contiguous() for f in flags)
            and (out is None or all(o.numel() == p.numel() for o, p in zip(out, pools)))
            and kernel() is not None)


def whole(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor],
          out: Sequence[torch.Tensor] | None = None) -> bool:
    """Whether a whole selection can run compiled (``select``, on one process): what the pass takes."""
    return eligible(scores, pools, out)


def select_pass(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], lower: float, upper: float,
                tie: float | None, largest: bool, magnitude: bool, chunk: int, complement: bool = False,
                keep_rest: bool = False, out: Sequence[torch.Tensor] | None = None, remove: bool = False):
    """``criteria._pass`` compiled: per tensor (marked, n_marked, index, key, ties or None, tie_counts).
    ``out``: flat bool tensors to write ``marked`` in.

    Each tensor is cut into ranges of whole ``chunk`` slices, one a thread,
    run in one call (ctypes lets go of the GIL); a range whose gathered
    entries outgrow their buffers goes on in a larger one, in the next call.
    """
    flags = ((MAGNITUDE if magnitude else 0) | (LARGEST if largest else 0)
             | (UPPER_INF if upper == math.inf else 0) | (LOWER_NINF if lower == -math.inf else 0)
             | (HAS_TIE if tie is not None else 0) | (LOWER_IS_TIE if tie is not None and lower == upper else 0)
             | (COMPLEMENT if complement else 0) | (KEEP_REST if keep_rest else 0) | (REMOVE if remove else 0))
    clip = lambda x: 0.0 if math.isinf(x) else x      # an infinite end is a flag, not a value
    lower_f, upper_f, tie_f = clip(lower), clip(upper), 0.0 if tie is None else tie
    threads = _threads()
    outs, ranges = [], []    # per tensor: [marked, ties, tie_counts, (start, index, key) pieces, n_marked]; (tensor, start, stop)
    for u, (s, p) in enumerate(zip(scores, pools)):
        n = s.numel()
        slices = -(-n // chunk)
        marked = out[u] if out is not None else torch.empty(n, dtype=torch.bool)
        ties = torch.empty(n, dtype=torch.bool) if tie is not None else None
        outs.append([marked, ties, torch.zeros(slices, dtype=torch.int64), [], 0])
        per = max(1, -(-slices // threads))
        ranges += [(u, first * chunk, min(n, (first + per) * chunk)) for first in range(0, slices, per)]
    capacity = {r: (r[2] - r[1]) // 20 + 4096 for r in ranges}
    at = {r: r[1] for r in ranges}
    while ranges:
        jobs = (_Job * len(ranges))()
        buffers = []
        for job, r in zip(jobs, ranges):
            u, start, stop = r
            s, p = scores[u], pools[u]
            marked, ties, tie_counts = outs[u][:3]
            index = torch.empty(capacity[r], dtype=torch.int64)
            key = torch.empty(capacity[r], dtype=torch.float32)
            a = at[r]
            buffers.append((index, key, a))
            job.score, job.pool, job.n, job.base = s.data_ptr() + 4 * a, p.data_ptr() + a, stop - a, a
            job.marked = marked.data_ptr() + a
            job.ties = ties.data_ptr() + a if ties is not None else None
            job.tie_counts, job.out_index, job.out_key = tie_counts.data_ptr(), index.data_ptr(), key.data_ptr()
            job.capacity = capacity[r]
        kernel().granet_select_jobs(jobs, len(jobs), lower_f, upper_f, tie_f, flags, chunk, threads)
        left = []
        for job, r, (index, key, a) in zip(jobs, ranges, buffers):
            kept = outs[r[0]]
            gathered = job.totals[1]
            kept[3].append((a, index[:gathered], key[:gathered]))
            kept[4] += job.totals[0]
            at[r] += job.done
            if at[r] < r[2]:
                capacity[r] *= 2
                left.append(r)
        ranges = left
    found = []
    for marked, ties, tie_counts, pieces, n_marked in outs:
        pieces.sort(key=lambda piece: piece[0])       # in flat order: a range that went on comes later
        found.append((marked, n_marked, _joined([i for _, i, _ in pieces], torch.long),
                      _joined([k for _, _, k in pieces], torch.float32), ties,
                      tie_counts.tolist() if tie is not None else []))
    return found


class _Tensor(ctypes.Structure):
    """One tensor of a whole selection (``select_tensor`` in the C source)."""

    _fields_ = [("score", ctypes.c_void_p), ("pool", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("picked", ctypes.c_int64)]


SLICE = 1 << 15             # entries of a slice of a whole selection: a tensor's ranges are whole slices, so
                            # that a tensor of a few slices is still cut into one range a thread


def select(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], k: int, count: int, largest: bool,
           magnitude: bool, complement: bool, keep_rest: bool, remove: bool, out: Sequence[torch.Tensor],
           sample: bool, chunk: int = SLICE, missed: bool = False) -> list[int] | None:
    """``criteria._pick`` on one process, compiled: the marks written in ``out`` (flat bool tensors, not
    the pools), and how many each tensor picks; None where ``_pick``'s own steps must run (a k-th key that
    is NaN). ``sample``: whether a sample brackets the k-th (else every pool entry is gathered);
    ``missed``: go on as if the bracket had missed (for tests)."""
    flags = ((MAGNITUDE if magnitude else 0) | (LARGEST if largest else 0) | (COMPLEMENT if complement else 0)
             | (KEEP_REST if keep_rest else 0) | (REMOVE if remove else 0) | (MISSED if missed else 0))
    tensors = (_Tensor * max(1, len(scores)))()
    for t, s, p, o in zip(tensors, scores, pools, out):
        t.score, t.pool, t.out, t.n = s.data_ptr(), p.data_ptr(), o.data_ptr(), s.numel()
    if kernel().granet_select(tensors, len(scores), k, count, flags, int(sample), chunk, _threads()):
        return None
    return [t.picked for t in tensors[:len(scores)]]


class _Layer(ctypes.Structure):
    """One layer of ``regrow`` (``regrow_layer`` in the C source)."""

    _fields_ = [("weight", ctypes.c_void_p), ("grad", ctypes.c_void_p), ("mask", ctypes.c_void_p),
                ("dropped", ctypes.c_void_p), ("grown", ctypes.c_void_p), ("dest", ctypes.c_void_p),
                ("tensors", ctypes.c_void_p), ("sizes", ctypes.c_void_p), ("n_tensors", ctypes.c_int32),
                ("failed", ctypes.c_int32), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("active", ctypes.c_int64)]


@dataclass
class RegrowLayer:
    """One layer's drop, growth and re-masking for ``regrow``: ``k`` of the ``active`` entries of ``mask``
    with the smallest ``|weight|`` dropped (into ``dropped``), then the ``k`` entries outside what is left
    with the largest ``|grad|`` grown (into ``grown``; ``k`` = 0: neither), then ``tensors`` zeroed where
    ``mask`` and the growth are not both True and the growth copied into ``dest``. ``dropped``, ``grown``:
    flat bool tensors of the mask's size, not ``mask``; None for a buffer of the pass's own (one of them)."""

    weight: torch.Tensor
    grad: torch.Tensor | None     # None: k is 0
    mask: torch.Tensor
    dropped: torch.Tensor | None
    grown: torch.Tensor | None
    dest: torch.Tensor | None
    tensors: Sequence[torch.Tensor]
    k: int
    active: int


def regrow(layers: Sequence[RegrowLayer], sample_above: int) -> list[bool]:
    """The controller's drop, growth and re-masking of each layer on one process, compiled, in one call:
    whether each layer was done (not where a k-th key is NaN: its mask, tensors and ``dest`` are as they
    were). Each layer's selections are ``select``'s (a sample brackets the k-th where the layer has more
    than ``sample_above`` entries) and its zeroing ``zero_where_not``'s, with their results; a layer is done
    whole by one thread, the layers side by side (one of at least 1/threads of all entries on all threads)."""
    order = sorted(range(len(layers)), key=lambda u: -layers[u].mask.numel())
    rows = (_Layer * max(1, len(layers)))()
    kept = []       # the pointer arrays, alive through the call
    for row, u in zip(rows, order):
        l = layers[u]
        pointers, sizes = _pointers_and_sizes(l.tensors)
        kept += [pointers, sizes]
        row.weight, row.grad, row.mask, row.dropped, row.grown, row.dest = (
            None if t is None else t.data_ptr() for t in (l.weight, l.grad, l.mask, l.dropped, l.grown, l.dest))
        row.tensors, row.sizes = ctypes.cast(pointers, ctypes.c_void_p), ctypes.cast(sizes, ctypes.c_void_p)
        row.n_tensors, row.n, row.k, row.active = len(l.tensors), l.mask.numel(), l.k, l.active
    kernel().granet_regrow(rows, len(layers), MAGNITUDE | REMOVE, MAGNITUDE | LARGEST | COMPLEMENT | KEEP_REST,
                           sample_above, SLICE, SPAN, _threads())
    done = [True] * len(layers)
    for row, u in zip(rows, order):
        done[u] = not row.failed
    return done


def _joined(pieces: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The pieces one after the other (the one piece itself, without a copy)."""
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype)


def slice_tops(score: torch.Tensor, pool: torch.Tensor, chunk: int, magnitude: bool) -> list[float]:
    """The largest key among the pool entries of each slice of ``chunk`` entries (NaN where one is NaN,
    -inf where there are none): ``torch.where(pool, key, -inf).amax()`` slice by slice, in one call."""
    tops = torch.empty(-(-score.numel() // chunk), dtype=torch.float32)
    kernel().granet_slice_tops(score.data_ptr(), pool.data_ptr(), score.numel(), chunk,
                               MAGNITUDE if magnitude else 0, tops.data_ptr(), _threads())
    return tops.tolist()


def last_equal(score: torch.Tensor, pool: torch.Tensor, top: float, magnitude: bool) -> int:
    """The flat index of the last pool entry whose key is ``top`` (-1: none)."""
    return kernel().granet_last_equal(score.data_ptr(), pool.data_ptr(), score.numel(), top,
                                      MAGNITUDE if magnitude else 0)


def count(mask: torch.Tensor) -> int:
    """``torch.count_nonzero`` of a bool mask, compiled where it can be (a CPU contiguous bool tensor, the
    library there): one read at the memory's speed, where ``count_nonzero`` takes several times longer."""
    if not (type(mask) is torch.Tensor and mask.device.type == "cpu" and mask.dtype == torch.bool
            and mask.is_contiguous() and kernel() is not None):      # not a subclass (a DTensor shard)
        return int(torch.count_nonzero(mask))
    return kernel().granet_count(mask.data_ptr(), mask.numel(), SPAN, _threads())


ZERO_SIZES = (2, 4, 8)      # bytes of a value that the zeroing pass takes
SPAN = 1 << 16              # entries of a job of the zeroing pass: a mid-sized mask on every thread too


def can_zero(tensors: Sequence[torch.Tensor], keep: torch.Tensor, also: torch.Tensor | None = None,
             dest: torch.Tensor | None = None) -> bool:
    """Whether the compiled zeroing pass can take these (and is there): CPU, contiguous, shaped like a bool mask."""
    masks = [keep] + [m for m in (also, dest) if m is not None]
    return (all(m.device.type == "cpu" and m.dtype == torch.bool and m.is_contiguous() and m.numel() == keep.numel()
                for m in masks)
            and all(t.device.type == "cpu" and t.is_contiguous() and t.numel() == keep.numel()
                    and t.element_size() in ZERO_SIZES for t in tensors)
            and kernel() is not None)


def zero_where_not(tensors: Sequence[torch.Tensor], keep: torch.Tensor, also: torch.Tensor | None = None,
                   dest: torch.Tensor | None = None) -> None:
    """Set each of ``tensors`` to +0.0 where ``keep`` (and ``also``, when given) is False, in place; a kept
    value keeps its bits. ``dest``: then write ``also`` (or ``keep``) there, ``keep`` itself too. One read
    of the masks for all tensors, in spans on the passes' threads."""
    pointers, sizes = _pointers_and_sizes(tensors)
    kernel().granet_zero_where_not(keep.data_ptr(), also.data_ptr() if also is not None else None,
                                   dest.data_ptr() if dest is not None else None, keep.numel(),
                                   pointers, sizes, len(tensors), SPAN, _threads())


def _pointers_and_sizes(tensors: Sequence[torch.Tensor]):
    """C arrays of the tensors' data pointers and element sizes, as the zeroing pass takes them."""
    n = max(1, len(tensors))
    return ((ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors]),
            (ctypes.c_int32 * n)(*[t.element_size() for t in tensors]))
