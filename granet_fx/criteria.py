"""Pure functions that decide which weights are kept: layer densities (ERK,
uniform), random masks, magnitude pruning, dropping and regrowth.

Masks are bool tensors; scores are tensors of the same shape (|w|, |grad|, or
random numbers). Every function returns new masks and leaves its inputs alone;
where it takes ``out`` (flat bool tensors, one per mask), the new masks may be
written there instead of in new tensors, so that a caller that updates often
reuses its memory (fresh memory costs a page fault every 4 KiB).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from . import native
from .distributed import LOCAL, Comm, allot_last


# Layer densities ------------------------------------------------------------


def erk_densities(shapes: Mapping[str, Sequence[int]], density: float, power: float = 1.0) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities (RigL, GraNet) with the given overall density.

    Layer l gets ``eps * (sum(shape_l) / prod(shape_l)) ** power``; ``eps`` is
    chosen so that the kept weights add up to ``density * N``. A layer whose
    density would exceed 1 is made dense and ``eps`` is solved again for the rest.
    """
    numel = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: (sum(s) / math.prod(s)) ** power for k, s in shapes.items()}
    budget = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        rest = [k for k in shapes if k not in dense]
        if not rest:
            break
        divisor = sum(raw[k] * numel[k] for k in rest)
        eps = (budget - sum(numel[k] for k in dense)) / divisor
        top = max(raw[k] for k in rest)
        if eps * top <= 1.0:
            break
        dense.update(k for k in rest if raw[k] == top)
    return {k: 1.0 if k in dense else eps * raw[k] for k in shapes}


def uniform_densities(shapes: Mapping[str, Sequence[int]], density: float) -> dict[str, float]:
    """The same density for every layer."""
    return {k: density for k in shapes}


def layer_densities(shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str) -> dict[str, float]:
    """Per-layer densities at overall ``sparsity`` by ``distribution`` ("erk" or "uniform")."""
    if distribution == "erk":
        return erk_densities(shapes, 1.0 - sparsity)
    if distribution == "uniform":
        return uniform_densities(shapes, 1.0 - sparsity)
    raise ValueError(f"unknown distribution {distribution!r}")


def apportion(numels: Sequence[int], densities: Sequence[float], total: int) -> list[int]:
    """Whole weight counts per layer, close to ``density * numel``, that add up to ``total``.

    Largest-remainder rounding, never above a layer's size, and never below one
    weight per layer when ``total`` has that many.
    """
    ideal = [d * n for d, n in zip(densities, numels)]
    least = 1 if total >= len(numels) else 0
    counts = [min(max(int(math.floor(x)), least), n) for x, n in zip(ideal, numels)]
    left = total - sum(counts)
    by_remainder = sorted(range(len(counts)), key=lambda i: counts[i] - ideal[i])
    while left > 0:
        progressed = False
        for i in by_remainder:
            if left == 0:
                break
            if counts[i] < numels[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            break
    for i in reversed(by_remainder):
        if left >= 0:
            break
        take = min(counts[i] - min(least, numels[i]), -left)
        counts[i] -= take
        left += take
    return counts


def random_mask(shape: Sequence[int], keep: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask with exactly ``keep`` True entries at random positions."""
    n = math.prod(shape)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask.view(*shape)


# Pruning, dropping, growing ---------------------------------------------------
#
# Every selection takes a ``comm``: with the default ``LOCAL`` the tensors are
# whole; under FSDP2 they are this rank's rows of each tensor, and the result
# is the one a single process holding the whole tensors would get (the same
# entries, ties included: the global order is tensor by tensor, rank by rank).
# ``magnitude=True`` ranks by ``|score|``, computed slice by slice on the way
# instead of in a copy of the whole tensor.


def prune_global(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int,
                 comm: Comm = LOCAL, counts: Sequence[int] | None = None,
                 magnitude: bool = False) -> list[torch.Tensor]:
    """Keep the ``keep`` active entries with the largest score over all layers together.

    Ties at the threshold are broken by position: the earliest (layer order,
    then flat index) are dropped first. No layer is emptied: should the
    ``keep`` best leave a layer without any entry, every layer keeps its best
    one (largest score, the last among equals) and the rest compete for what is
    left; ``keep`` is raised to the number of layers with an active entry if smaller.
    ``counts``: the active entries of each mask over all ranks, when already known.
    """
    return prune_global_counted(scores, masks, keep, comm, counts, magnitude)[0]


def prune_global_counted(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int,
                         comm: Comm = LOCAL, counts: Sequence[int] | None = None,
                         magnitude: bool = False, out: Sequence[torch.Tensor] | None = None
                         ) -> tuple[list[torch.Tensor], list[int]]:
    """``prune_global``, and the active entries each new mask keeps over all ranks (not counted again).
    ``out``: where the new masks may be written (not ``masks``); a mask left as it was (empty, or down to
    one entry, which it keeps) is then returned itself."""
    counts = _counts(masks, comm) if counts is None else list(counts)
    keep = max(keep, sum(c > 0 for c in counts))
    n_drop = sum(counts) - keep
    if n_drop <= 0:
        return [m.clone() for m in masks], counts
    return _drop_keeping_every_layer(
        scores, masks, counts,
        lambda layers, pool, n: _pick([scores[u] for u in layers], pool, n_drop, n, comm, magnitude=magnitude,
                                      out=None if out is None else [out[u] for u in layers], remove=True),
        comm, magnitude, counted=True, removed=True, prefix=True, fresh=out is None)


def prune_gradient_first(scores: Sequence[torch.Tensor], gradients: Sequence[torch.Tensor],
                         masks: Sequence[torch.Tensor], keep: int, select_ratio: float = 0.5,
                         comm: Comm = LOCAL) -> list[torch.Tensor]:
    """FGGP's pruning step: keep ``keep`` active entries, choosing what goes gradient first, then by magnitude.

    The candidates are the ``select_ratio`` share of all active entries with
    the smallest ``|gradient|`` (over all layers together: a fixed rate, not
    annealed); of those, the ones with the smallest ``scores`` go. Should the
    candidates be fewer than the entries to drop, they are widened to that
    many. Ties go by position and no layer is emptied, as in ``prune_global``:
    should the choice empty a layer, every layer keeps its best-scored entry
    and the others are chosen from the rest.
    """
    counts = _counts(masks, comm)
    total = sum(counts)
    n_drop = total - max(keep, sum(c > 0 for c in counts))
    if n_drop <= 0:
        return [m.clone() for m in masks]
    size = max(int(select_ratio * total), n_drop)

    def dropped(layers: list[int], pool: Sequence[torch.Tensor], count: int) -> tuple[list[torch.Tensor], list[int]]:
        candidates = [p.nonzero().squeeze(1) for p in
                      _pick([gradients[u] for u in layers], pool, min(size, count), count, comm, magnitude=True)[0]]
        chosen = _pick([scores[u].detach().float().reshape(-1)[c] for u, c in zip(layers, candidates)],
                       [torch.ones(len(c), dtype=torch.bool, device=c.device) for c in candidates],
                       n_drop, min(size, count), comm)
        picked = [torch.zeros(p.numel(), dtype=torch.bool, device=p.device) for p in pool]
        for p, c, i in zip(picked, candidates, chosen[0]):
            p[c[i]] = True
        return picked, chosen[1]

    return _drop_keeping_every_layer(scores, masks, counts, dropped, comm)


def _counts(masks: Sequence[torch.Tensor], comm: Comm) -> list[int]:
    """Active entries per mask, over all ranks."""
    return comm.sum([native.count(m) for m in masks])


def _drop_keeping_every_layer(scores, masks, counts: Sequence[int], choose, comm: Comm,
                              magnitude: bool = False, counted: bool = False, removed: bool = False,
                              prefix: bool = False, fresh: bool = True):
    """``masks`` without the entries that ``choose(layers, pools, active count)`` picks among the masks
    at the indices ``layers`` (a flat bool mask each, and how many each marks on this rank; ``removed``:
    the pools without them already); should that empty a mask, every mask keeps its best-scored entry
    and ``choose`` picks from the others. ``counted``: also the active entries left in each, over all
    ranks. ``prefix``: ``choose`` picks the first entries of one order in which a mask's best comes
    after its others (magnitude pruning). A mask left as it was is returned itself where not ``fresh``."""
    # Choosing with every mask's best entry set aside gives the same masks when no mask would be emptied
    # (a mask's best goes only after all its others). For a prefix choice, setting aside the bests of the
    # masks it would empty gives them too: the other masks' bests come after all it picks. So only those
    # are found (a pass each), and the choice runs again should it then empty another. A mask down to one
    # entry, likely to lose it, starts set aside (all masks do, where the choice is not a prefix): with
    # nothing left to choose from, it is left out of the choice, as is an empty mask.
    lone = [c == 1 for c in counts]
    aside = lone if prefix else [c > 0 and any(lone) for c in counts]
    best: list[torch.Tensor | None] = [None] * len(masks)
    while True:
        layers = [u for u, (c, a) in enumerate(zip(counts, aside)) if c > 1 or (c == 1 and not a)]
        needed = [u for u in layers if aside[u] and best[u] is None]
        found = _best([scores[u] for u in needed], [masks[u] for u in needed], [counts[u] for u in needed], comm,
                      magnitude) if needed else []
        for u, b in zip(needed, found):
            best[u] = b if b is not None else torch.empty(0, dtype=torch.long)    # on another rank
        with _set_aside(masks, best):
            picked, mine = choose(layers, [masks[u] for u in layers],
                                  sum(counts[u] - aside[u] for u in layers))
        gone = [0] * len(masks)
        for u, g in zip(layers, comm.sum(mine)):
            gone[u] = g
        emptied = [c > 0 and not a and g >= c for c, a, g in zip(counts, aside, gone)]
        if not any(emptied):
            break
        aside = [a or e for a, e in zip(aside, emptied)] if prefix else [c > 0 for c in counts]
    chosen = dict(zip(layers, picked))
    new = []
    for u, m in enumerate(masks):
        p = chosen.get(u)
        if p is None:
            new.append(m.clone() if fresh else m)
        elif removed:           # what is left of the pool without the best entry: it goes back
            if best[u] is not None:
                p[best[u].to(p.device)] = True
            new.append(p.view(m.shape))
        else:
            new.append(_minus(m, p))
    return (new, [c - g for c, g in zip(counts, gone)]) if counted else new


def _minus(mask: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """``mask`` without the entries of the flat bool ``picked`` (which it reuses: a new tensor); for
    bools ``mask > picked`` is ``mask and not picked``, in one op."""
    return torch.gt(mask.reshape(-1), picked, out=picked).view(mask.shape)


def _best(scores, masks, counts: Sequence[int], comm: Comm, magnitude: bool = False) -> list[torch.Tensor | None]:
    """Per mask with an active entry, the flat index (a one-entry tensor, on the rank that holds it; None
    elsewhere) of the active entry with the largest score, the last one among equals."""
    longest = min(CHUNK, max((s.numel() for s in scores), default=0))
    buffer = torch.empty(longest, device=masks[0].device if masks else None)
    local = []
    for s, m in zip(scores, masks):
        s, m = s.detach().reshape(-1), m.reshape(-1)
        # Each slice's largest active key; the slice that holds the answer is the last one whose largest
        # is at least those before it (a slice without active entries: -inf at an inactive last entry).
        starts = range(0, s.numel(), CHUNK)
        compiled = native.eligible([s], [m])
        if compiled:
            tops = native.slice_tops(s, m, CHUNK, magnitude)
        else:
            tops = [torch.where(m[at:at + CHUNK], _key(s[at:at + CHUNK], magnitude, buffer), -math.inf).amax()
                    for at in starts]
            tops = torch.stack(tops).tolist() if tops else []
        top, chosen = -math.inf, None
        for at, value in zip(starts, tops):
            if value >= top and (value > -math.inf or bool(m[min(at + CHUNK, m.numel()) - 1])):
                top, chosen = value, at
        index = None
        if chosen is not None and compiled:     # the chosen slice holds no NaN: its top is found by equality
            last = native.last_equal(s[chosen:chosen + CHUNK], m[chosen:chosen + CHUNK], top, magnitude)
            index = torch.tensor([chosen + last], device=m.device)
        elif chosen is not None:
            key = torch.where(m[chosen:chosen + CHUNK], _key(s[chosen:chosen + CHUNK], magnitude, buffer), -math.inf)
            last = len(key) - 1 - int(key.flip(0).argmax())   # argmax: the first maximum of the flipped
            index = torch.tensor([chosen + last], device=m.device)
        local.append((torch.tensor(top), index))
    table = comm.table(torch.stack([t for t, _ in local]).double())   # (world, masks)
    best = []
    for u, ((_, index), c) in enumerate(zip(local, counts)):
        column = table[:, u]
        owner = int((column == column.max()).nonzero()[-1])
        best.append(index if c and owner == comm.rank else None)
    return best


@contextlib.contextmanager
def _set_aside(masks, entries):
    """``masks`` with the entries at the flat indices ``entries`` (None: none) set False, in place (a copy
    of every mask would cost more than the selection), and set True again afterwards."""
    for m, e in zip(masks, entries):
        if e is not None:
            m.view(-1)[e.to(m.device)] = False
    try:
        yield
    finally:
        for m, e in zip(masks, entries):
            if e is not None:
                m.view(-1)[e.to(m.device)] = True


def drop_smallest(score: torch.Tensor, mask: torch.Tensor, n: int, comm: Comm = LOCAL,
                  count: int | None = None, magnitude: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Deactivate the ``n`` active entries with the smallest score; among equals, the lowest flat
    indices go first. ``count``: the active entries, when already known; ``out``: where the new mask
    may be written (not ``mask``)."""
    count = _counts([mask], comm)[0] if count is None else count
    n = min(n, count)
    if n <= 0:
        return mask.clone()
    outs = None if out is None else [out]
    return _pick([score], [mask], n, count, comm, magnitude=magnitude, out=outs, remove=True)[0][0].view(mask.shape)


def grow_largest(score: torch.Tensor, mask: torch.Tensor, n: int, comm: Comm = LOCAL,
                 count: int | None = None, magnitude: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Activate the ``n`` inactive entries with the largest score; among equals, the lowest flat
    indices first. ``count``: the inactive entries, when already known; ``out``: where the new mask
    may be written (not ``mask``)."""
    count = comm.sum([mask.numel() - native.count(mask)])[0] if count is None else count
    n = min(n, count)
    if n <= 0:
        return mask.clone()
    return _pick([score], [mask], n, count, comm, largest=True, magnitude=magnitude, complement=True,
                 keep_rest=True, out=None if out is None else [out])[0][0].view(mask.shape)


# Exact selection without sorting --------------------------------------------------

SAMPLE = 1 << 14    # sampled positions that bracket a selection of 2**24 entries; smaller inputs are selected whole
LEAST_SAMPLE = 1 << 10
CHUNK = 1 << 18     # entries per slice of a pass: its temporaries stay in the processor's cache


@dataclass
class _Passed:
    """What one pass over a tensor found: pool entries with a key up to the bracket's upper end
    (``marked``: a flat bool tensor, ``n_marked`` of them), ``n_inside`` inside the bracket, the flat
    index and key of those inside that are not ``tie`` (ascending), and the entries equal to ``tie``
    (``ties``, a flat bool tensor; ``tie_counts``: how many in each slice)."""

    marked: torch.Tensor
    n_marked: int
    n_inside: int
    index: torch.Tensor
    key: torch.Tensor
    ties: torch.Tensor | None
    tie_counts: list[int]


def _pass(scores, pools, lower: float, upper: float, tie: float | None, largest: bool,
          magnitude: bool, complement: bool = False, keep_rest: bool = False, out=None,
          remove: bool = False) -> list[_Passed]:
    """One pass over each tensor: mark the pool entries with a key up to ``upper``, gather those from
    ``lower`` on, and mark apart (without gathering) those equal to ``tie``. ``complement``: the pool is
    where ``pools`` are False; ``keep_rest``: ``marked`` also holds every entry outside the pool (not counted);
    ``remove``: ``marked`` holds the pool entries that are not marked instead (``n_marked`` still counts the marks);
    ``out``: flat bool tensors that the compiled pass writes ``marked`` in (not the pools: a sample that
    misses passes over them again).

    Compiled (``granet_fx.native``) where it can be: float32 scores and bool pools on the CPU.
    Otherwise eager, slice by slice, in buffers that stay in cache. A comparison writes float 0/1 and is then
    converted to bool (a comparison that writes bool directly takes several times longer); with
    ``largest`` the score is compared the other way round instead of negated, and only the gathered
    keys are negated.
    """
    if native.eligible(scores, pools, out):
        return [_Passed(marked, n_marked, len(index) + sum(tie_counts), index, key, ties, tie_counts)
                for marked, n_marked, index, key, ties, tie_counts
                in native.select_pass(scores, pools, lower, upper, tie, largest, magnitude, CHUNK, complement,
                                      keep_rest, out, remove)]
    device = pools[0].device
    longest = min(CHUNK, max((s.numel() for s in scores), default=0))
    keys_buffer = torch.empty(longest, device=device)
    flags = torch.empty(longest, device=device)
    inside_buffer = torch.empty(longest, dtype=torch.bool, device=device)
    pool_buffer = torch.empty(longest if complement else 0, dtype=torch.bool, device=device)
    below, above = (torch.ge, torch.le) if largest else (torch.le, torch.ge)   # "key <= c", "key >= c"
    sign = -1.0 if largest else 1.0
    passed = []
    for s, p in zip(scores, pools):
        s, p = s.reshape(-1), p.reshape(-1)
        marked = torch.empty(p.numel(), dtype=torch.bool, device=p.device)
        ties = torch.empty_like(marked) if tie is not None else None
        n_marked = n_inside = 0
        index, keys, tie_counts = [], [], []
        for at in range(0, s.numel(), CHUNK):
            key = _key(s[at:at + CHUNK], magnitude, keys_buffer)
            n = len(key)
            pool, mark = p[at:at + n], marked[at:at + n]
            if complement:
                pool = torch.logical_not(pool, out=pool_buffer[:n])
            if upper == math.inf:
                mark.copy_(pool)
            else:
                mark.copy_(below(key, sign * upper, out=flags[:n])).logical_and_(pool)
            tied = None
            if tie is not None:
                tied = ties[at:at + n].copy_(torch.eq(key, sign * tie, out=flags[:n])).logical_and_(pool)
            n_mark = int(torch.count_nonzero(mark))
            n_tied = 0 if tied is None else int(torch.count_nonzero(tied))
            if lower == -math.inf:
                inside = mark
            elif lower == upper and tied is not None:      # then the bracket is the tie
                inside = tied
            else:
                inside = inside_buffer[:n].copy_(above(key, sign * lower, out=flags[:n])).logical_and_(mark)
            if tied is not None:
                tie_counts.append(n_tied)
                inside = torch.logical_xor(inside, tied, out=inside_buffer[:n])   # the ties are inside: the others
            i = inside.nonzero().squeeze(1)
            if keep_rest:
                mark.logical_or_(p[at:at + n] if complement else pool.logical_not())
            if remove:
                torch.gt(pool, mark, out=mark)      # on bools: pool and not mark
            n_marked += n_mark
            n_inside += len(i) + n_tied
            index.append(i + at)
            keys.append(key[i].neg_() if largest else key[i])
        passed.append(_Passed(marked, n_marked, n_inside,
                              torch.cat(index) if index else torch.zeros(0, dtype=torch.long, device=p.device),
                              torch.cat(keys) if keys else torch.zeros(0, device=p.device), ties, tie_counts))
    return passed


def _key(part: torch.Tensor, magnitude: bool, buffer: torch.Tensor) -> torch.Tensor:
    """``part`` as float32 keys (``|part|`` with ``magnitude``), in ``buffer`` when it has to be computed."""
    if part.dtype == torch.float32:
        return torch.abs(part, out=buffer[:len(part)]) if magnitude else part
    key = buffer[:len(part)].copy_(part)
    return key.abs_() if magnitude else key


def _pick(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], k: int, count: int,
          comm: Comm = LOCAL, largest: bool = False, magnitude: bool = False, complement: bool = False,
          keep_rest: bool = False, out: Sequence[torch.Tensor] | None = None,
          remove: bool = False) -> tuple[list[torch.Tensor], list[int]]:
    """The ``k`` smallest scores (``largest``: the largest; ``magnitude``: of ``|score|``) of the ``count``
    entries where ``pools`` is True (``complement``: False), over all tensors and ranks together; among
    equals, the earliest in the global order (tensor by tensor, rank by rank, flat index). Returns, per
    tensor, a flat bool tensor of this rank's rows marking the picked entries (``keep_rest``: and every
    entry outside the pool; ``remove``: the pool entries that are not picked instead; in ``out``, when
    given and the compiled pass runs), and how many entries it picks.

    Exact, without sorting and in one pass over each tensor (Floyd and Rivest's
    idea): a random sample brackets the ``k``-th score; the pass marks the pool
    entries up to the bracket's upper end and gathers those inside it, and
    ``kthvalue`` runs on the few inside; the marks of those inside that are not
    picked are then cleared. A score that the sample shows many times around
    the ``k``-th (a tie of many entries, such as exact zeros) is marked apart
    and counted, not gathered: should the ``k``-th be that score, the earliest
    of its entries are kept marked. Should the sample miss, the selection runs
    on all entries.

    On one process, where the compiled pass takes the tensors, the same steps run as one compiled call
    (``native.select``), with the same result. Keys that are NaN (a diverged model: the controller skips
    an update on a non-finite gradient) are not ranked exactly on either path.
    """
    device = pools[0].device
    if k <= 0:
        if keep_rest or remove:     # nothing picked: the entries outside the pool, or the pool
            none = [torch.logical_not(p.reshape(-1)) if complement else p.reshape(-1).clone() for p in pools]
        else:
            none = [torch.zeros(p.numel(), dtype=torch.bool, device=device) for p in pools]
        return none, [0] * len(pools)
    scores = [s.detach().reshape(-1) for s in scores]
    pools = [p.reshape(-1) for p in pools]
    out = None if out is None else [o.view(-1) for o in out]
    if comm.world == 1 and native.whole(scores, pools, out):
        marks = out if out is not None else [torch.empty(p.numel(), dtype=torch.bool, device=device) for p in pools]
        counts = native.select(scores, pools, k, count, largest, magnitude, complement, keep_rest, remove, marks,
                               sum(p.numel() for p in pools) > SAMPLE)
        if counts is not None:
            return marks, counts
    lower, upper, tie = _bracket(scores, pools, k, count, comm, largest, magnitude, complement)
    passed = _pass(scores, pools, lower, upper, tie, largest, magnitude, complement, keep_rest, out, remove)
    marked, inside, ties = comm.sum([sum(p.n_marked for p in passed), sum(p.n_inside for p in passed),
                                     sum(sum(p.tie_counts) for p in passed)])
    sure = marked - inside                  # marked below the bracket: picked, whatever the k-th is
    if not sure < k <= sure + inside:       # the sample missed: select among all entries
        tie, sure, ties = None, 0, 0
        passed = _pass(scores, pools, -math.inf, math.inf, None, largest, magnitude, complement, keep_rest, out,
                       remove)
    keys = comm.cat(torch.cat([p.key for p in passed]).to(device))    # those inside, but the ties
    j = k - sure                            # the k-th is the j-th smallest inside
    before = int(torch.count_nonzero(keys < tie)) if tie is not None else 0
    if tie is not None and before < j <= before + ties:
        value = tie
    else:
        value = _kth(keys, j - ties if j > before else j)
    # Of the entries equal to the k-th, the first ones in the global order are picked: ``left`` are not.
    if value == tie:
        equal, left = [sum(p.tie_counts) for p in passed], ties - (j - before)
    else:
        below = int(torch.count_nonzero(keys < value)) + (ties if tie is not None and tie < value else 0)
        equal, left = [int(torch.count_nonzero(p.key == value)) for p in passed], \
            int(torch.count_nonzero(keys == value)) - (j - below)
    picked, counts = [], []
    for p, later in zip(passed, allot_last(comm.table(torch.tensor(equal)), left, comm.rank)):
        gone = p.index[p.key > value]
        if value != tie and later:
            gone = torch.cat([gone, p.index[p.key == value][-later:]])
        p.marked[gone] = remove             # not picked after all: back in the pool, or unmarked
        cleared = len(gone)
        if tie is not None and value <= tie:        # ties above the k-th, or the last of those equal to it
            n_ties = sum(p.tie_counts)
            drop = later if value == tie else n_ties
            if drop:
                _clear_after(p.marked, p.ties, p.tie_counts, n_ties - drop, remove)
            cleared += drop
        picked.append(p.marked)
        counts.append(p.n_marked - cleared)
    return picked, counts


def _clear_after(marked: torch.Tensor, ties: torch.Tensor, tie_counts: Sequence[int], first: int,
                 restore: bool = False) -> None:
    """Clear in ``marked`` the entries of ``ties`` after its ``first`` ones (in flat order); ``restore``: set them."""
    start, seen = 0, 0
    for c, n in enumerate(tie_counts if first else []):
        if seen + n >= first:
            at = c * CHUNK
            start = at + int(ties[at:at + CHUNK].nonzero()[first - seen - 1]) + 1
            break
        seen += n
    if restore:
        marked[start:].logical_or_(ties[start:])
    else:
        marked[start:].logical_and_(ties[start:].logical_not_())


def _bracket(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], k: int, count: int,
             comm: Comm = LOCAL, largest: bool = False, magnitude: bool = False,
             complement: bool = False) -> tuple[float, float, float | None]:
    """Two keys that very likely enclose the ``k``-th smallest key of the pools, from a seeded random
    sample, and the key that the sample shows most often between them (None: none twice).

    The bracket reaches four standard deviations of the sampled rank either side (a larger sample
    narrows it, but costs a random read per position: more than it saves in the pass). The entries
    inside a bracket go as ``total / sqrt(sample)`` and the sample's cost as ``sample``, so the sample
    grows as ``total ** (2/3)``: ``SAMPLE`` positions at 2**24 entries, ``LEAST_SAMPLE`` at the least.
    """
    total = comm.sum([sum(p.numel() for p in pools)])[0]
    if total <= SAMPLE:
        return -math.inf, math.inf, None
    device = pools[0].device
    generator = torch.Generator().manual_seed(k * comm.world + comm.rank)
    size = min(SAMPLE, max(LEAST_SAMPLE, round(SAMPLE * (total / 2 ** 24) ** (2 / 3))))
    picked = [torch.empty(0, device=device)]
    for s, p in zip(scores, pools):
        if p.numel():
            at = torch.randint(p.numel(), (max(1, size * p.numel() // total),), generator=generator).to(p.device)
            key = s[at].float()
            key = key.abs() if magnitude else key
            picked.append((key.neg() if largest else key)[p[at] != complement].to(device))
    sample = comm.cat(torch.cat(picked))
    lower, upper = _enclose(sample, min(1.0, k / count))
    window = sample[(sample >= lower) & (sample <= upper)].sort().values
    tie = None
    if window.numel():
        values, repeats = torch.unique_consecutive(window, return_counts=True)
        if repeats.max() > 1:
            tie = values[repeats.argmax()].item()
    return lower, upper, tie


def _enclose(sample: torch.Tensor, q: float) -> tuple[float, float]:
    """Two keys of ``sample`` four standard deviations of the sampled rank either side of its ``q`` quantile
    (-inf, inf: past its ends)."""
    n = sample.numel()
    rank = q * n
    margin = 4.0 * math.sqrt(n * q * (1.0 - q)) + 3.0
    low, high = math.floor(rank - margin), math.ceil(rank + margin)
    lower = torch.kthvalue(sample, low + 1).values.item() if low >= 0 else -math.inf
    upper = torch.kthvalue(sample, high + 1).values.item() if high < n else math.inf
    return lower, upper


def _kth(keys: torch.Tensor, r: int) -> float:
    """The ``r``-th smallest of ``keys`` (from 1; NaN after every number), as ``torch.kthvalue`` gives it.

    ``kthvalue`` takes about 18 ns a key here: on many keys, a seeded sample
    brackets the ``r``-th first, and ``kthvalue`` runs on those inside (all of
    them should the sample miss).
    """
    n = keys.numel()
    if n > 4 * SAMPLE:
        at = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(r)).to(keys.device)
        lower, upper = _enclose(keys[at], r / n)
        below = int(torch.count_nonzero(keys < lower))
        inside = keys[(keys >= lower) & (keys <= upper)]
        if below < r <= below + inside.numel():
            return torch.kthvalue(inside, r - below).values.item()
    return torch.kthvalue(keys, r).values.item()


# Structured granularities: whole channels, N:M ---------------------------------


def channel_norms(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each channel's weights: dimension 0 of every tensor in ``rows`` indexes the channels.

    A channel made by several layers (the channels of a residual stream) scores
    the root mean square of its row norms, so that it compares with channels
    made by one layer.
    """
    return torch.stack([r.detach().float().flatten(1).pow(2).sum(1) for r in rows]).mean(0).sqrt()


def prune_channels(scores: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor], costs: Sequence[int],
                   budget: int, minimum: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Keep the active channels with the largest score over all groups, at most ``budget`` in cost.

    Group g's channels each cost ``costs[g]`` (the rows that make them). Every
    group keeps its ``minimum[g]`` best active channels (default, and never
    fewer than, 1) whatever the budget: a group with no channel would cut the
    network, and a floor keeps one stage from being starved by the others.
    Ties are broken by group order, then index.
    """
    flat, cost, forced, start = [], [], [], 0
    for g, (s, k, c) in enumerate(zip(scores, keeps, costs)):
        s = s.detach().float().masked_fill(~k, -math.inf)
        m = min(int(k.sum()), max(1, minimum[g] if minimum is not None else 1))
        forced.append(start + torch.sort(s, descending=True, stable=True).indices[:m])
        flat.append(s)
        cost.append(torch.full_like(s, float(c)))
        start += len(s)
    s, c = torch.cat(flat), torch.cat(cost)
    best = torch.cat(forced)
    s[best] = math.inf
    order = torch.sort(s, descending=True, stable=True).indices
    order = order[s[order] > -math.inf]
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[order[torch.cumsum(c[order], 0) <= budget]] = True
    keep[best] = True
    return list(torch.split(keep, [len(x) for x in flat]))


def round_kept(score: torch.Tensor, keep: torch.Tensor, multiple: int) -> torch.Tensor:
    """Keep the nearest multiple of ``multiple`` channels (at least one multiple, at most all of them):
    drop the kept ones with the smallest score, or add the others with the largest."""
    n, k = keep.numel(), int(keep.sum())
    target = min(n, max(multiple, multiple * round(k / multiple)))
    if target > k:
        return grow_largest(score, keep, target - k)
    return drop_smallest(score, keep, k - target)


def _groups_of(t: torch.Tensor, m: int) -> torch.Tensor:
    """Rows of ``m`` consecutive weights along the input dimension (dimension 1)."""
    return t.movedim(1, -1).reshape(-1, m)


def _from_groups(g: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    moved = (shape[0], *shape[2:], shape[1])
    return g.reshape(moved).movedim(-1, 1)


def nm_keep_largest(score: torch.Tensor, mask: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """In every group of ``m`` consecutive input weights, keep the ``k`` active ones with the largest score."""
    groups = _groups_of(mask, m)
    s = _groups_of(score.detach().float(), m).masked_fill(~groups, -math.inf)
    new = torch.zeros_like(groups)
    new.scatter_(1, torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k], True)
    return _from_groups(new & groups, mask.shape)


def nm_refill(score: torch.Tensor, mask: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """In every group of ``m`` with fewer than ``k`` active weights, activate the inactive ones with the largest score."""
    groups = _groups_of(mask, m)
    s = _groups_of(score.detach().float(), m).masked_fill(groups, -math.inf)
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(m).expand_as(order))
    need = (k - groups.sum(1, keepdim=True)).clamp(min=0)
    return _from_groups(groups | ((rank < need) & ~groups), mask.shape)
