"""Pure functions that decide which weights are kept: layer densities (ERK,
uniform), random masks, magnitude pruning, dropping and regrowth.

Masks are bool tensors; scores are tensors of the same shape (|w|, |grad|, or
random numbers). Every function returns new masks and leaves its inputs alone.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

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


def prune_global(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int,
                 comm: Comm = LOCAL) -> list[torch.Tensor]:
    """Keep the ``keep`` active entries with the largest score over all layers together.

    Ties at the threshold are broken by position: the earliest (layer order,
    then flat index) are dropped first. No layer is emptied: should the
    ``keep`` best leave a layer without any entry, every layer keeps its best
    one (largest score, the last among equals) and the rest compete for what is
    left; ``keep`` is raised to the number of layers with an active entry if smaller.
    """
    counts = _counts(masks, comm)
    keep = max(keep, sum(c > 0 for c in counts))
    n_drop = sum(counts) - keep
    if n_drop <= 0:
        return [m.clone() for m in masks]
    return _drop_keeping_every_layer(scores, masks, counts, lambda pool, n: _pick(scores, pool, n_drop, n, comm), comm)


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
    grads = [g.detach().abs() for g in gradients]
    size = max(int(select_ratio * total), n_drop)

    def dropped(pool: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
        candidates = _pick(grads, pool, min(size, count), count, comm)
        chosen = _pick([s.detach().float().reshape(-1)[c] for s, c in zip(scores, candidates)],
                       [torch.ones(len(c), dtype=torch.bool, device=c.device) for c in candidates],
                       n_drop, min(size, count), comm)
        return [c[i] for c, i in zip(candidates, chosen)]

    return _drop_keeping_every_layer(scores, masks, counts, dropped, comm)


def _counts(masks: Sequence[torch.Tensor], comm: Comm) -> list[int]:
    """Active entries per mask, over all ranks."""
    return comm.sum([int(torch.count_nonzero(m)) for m in masks])


def _drop_keeping_every_layer(scores, masks, counts: Sequence[int], choose, comm: Comm) -> list[torch.Tensor]:
    """``masks`` without the entries that ``choose(pool, active count)`` picks (flat indices per mask); should
    that empty a mask, every mask keeps its best-scored entry and ``choose`` picks from the others."""
    dropped = choose(masks, sum(counts))
    gone = comm.sum([len(d) for d in dropped])
    if all(g < c for g, c in zip(gone, counts) if c):
        return _without(masks, dropped)
    rest = _without(masks, _best(scores, masks, counts, comm))
    return _without(masks, choose(rest, sum(counts) - sum(c > 0 for c in counts)))


def _best(scores, masks, counts: Sequence[int], comm: Comm) -> list[torch.Tensor | None]:
    """Per mask with an active entry, the flat index (a one-entry tensor, on the rank that holds it; None
    elsewhere) of the active entry with the largest score, the last one among equals."""
    local = []
    for s, m in zip(scores, masks):
        flat = torch.where(m, s.detach().float(), -math.inf).flatten()
        top = flat.max() if flat.numel() else torch.tensor(-math.inf)
        local.append((top, (flat == top).nonzero()[-1] if m.any() else None))
    table = comm.table(torch.stack([t for t, _ in local]).double())   # (world, masks)
    best = []
    for u, ((_, index), c) in enumerate(zip(local, counts)):
        column = table[:, u]
        owner = int((column == column.max()).nonzero()[-1])
        best.append(index if c and owner == comm.rank else None)
    return best


def _without(masks, dropped) -> list[torch.Tensor]:
    """Copies of ``masks`` with the entries at the flat indices ``dropped`` (None: none) set False."""
    rest = [m.clone() for m in masks]
    for r, d in zip(rest, dropped):
        if d is not None:
            r.view(-1)[d.to(r.device)] = False
    return rest


def drop_smallest(score: torch.Tensor, mask: torch.Tensor, n: int, comm: Comm = LOCAL,
                  count: int | None = None) -> torch.Tensor:
    """Deactivate the ``n`` active entries with the smallest score; among equals, the lowest flat
    indices go first. ``count``: the active entries, when already known."""
    count = _counts([mask], comm)[0] if count is None else count
    n = min(n, count)
    if n <= 0:
        return mask.clone()
    return _without([mask], _pick([score], [mask], n, count, comm))[0]


def grow_largest(score: torch.Tensor, mask: torch.Tensor, n: int, comm: Comm = LOCAL,
                 count: int | None = None) -> torch.Tensor:
    """Activate the ``n`` inactive entries with the largest score; among equals, the lowest flat
    indices first. ``count``: the inactive entries, when already known."""
    candidates = ~mask
    count = _counts([candidates], comm)[0] if count is None else count
    n = min(n, count)
    if n <= 0:
        return mask.clone()
    grown = mask.clone()
    grown.view(-1)[_pick([score], [candidates], n, count, comm, largest=True)[0]] = True
    return grown


# Exact selection without sorting --------------------------------------------------

SAMPLE = 1 << 14    # sampled positions that bracket a selection; smaller inputs are selected whole


def _pick(scores: Sequence[torch.Tensor], pools: Sequence[torch.Tensor], k: int, count: int,
          comm: Comm = LOCAL, largest: bool = False) -> list[torch.Tensor]:
    """Flat indices, per tensor (this rank's rows), of the ``k`` smallest scores (``largest``: the
    largest) of the ``count`` entries where ``pools`` is True, over all tensors and ranks together;
    among equals, the earliest in the global order (tensor by tensor, rank by rank, flat index).

    Exact, without sorting or passing over the tensors more than once (Floyd and
    Rivest's idea): a random sample brackets the ``k``-th score, one pass over
    each tensor gathers the entries on the chosen side of the bracket (those
    sure to be picked and those inside it), and ``kthvalue`` runs on the few
    inside. Should the sample miss, the selection runs on all entries.
    """
    device = pools[0].device
    if k <= 0:
        return [torch.zeros(0, dtype=torch.long, device=device) for _ in pools]
    scores = [s.detach().float().reshape(-1) for s in scores]

    def gather(upper: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Flat indices and keys of the pool entries whose key is at most ``upper``: the one pass."""
        index, keys = [], []
        for s, p in zip(scores, pools):
            chosen = p.reshape(-1) if upper == math.inf else \
                (torch.ge(s, -upper) if largest else torch.le(s, upper)).logical_and_(p.reshape(-1))
            i = chosen.nonzero().squeeze(1)
            index.append(i)
            keys.append(s[i].neg_() if largest else s[i])
        return index, keys

    # keys: the score, or -score for the largest; the k smallest keys are picked
    lo, hi = _bracket(scores, pools, count - k + 1 if largest else k, count, comm)
    upper, lower = (-lo, -hi) if largest else (hi, lo)
    index, keys = gather(upper)
    sure = comm.sum([sum(int(torch.count_nonzero(key < lower)) for key in keys)])[0]
    inside = comm.cat(torch.cat([key[key >= lower] for key in keys]).to(device))
    if not sure < k <= sure + inside.numel():       # the sample missed: select among all entries
        if upper < math.inf:
            index, keys = gather(math.inf)
        sure, inside = 0, comm.cat(torch.cat(keys).to(device))
    value = torch.kthvalue(inside, k - sure).values
    below = [key < value for key in keys]
    ties = [key == value for key in keys]
    table = comm.table(torch.tensor([int(torch.count_nonzero(t)) for t in ties]))
    left = int(table.sum()) - (k - comm.sum([sum(int(torch.count_nonzero(b)) for b in below)])[0])
    picked = []
    for i, b, t, later in zip(index, below, ties, allot_last(table, left, comm.rank)):
        if later:
            t[t.nonzero().squeeze(1)[-later:]] = False
        picked.append(i[b.logical_or_(t)])     # in flat order
    return picked


def _bracket(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], k: int, count: int,
             comm: Comm = LOCAL) -> tuple[float, float]:
    """Two scores that very likely enclose the ``k``-th smallest candidate, from a seeded random sample."""
    total = comm.sum([sum(m.numel() for m in masks)])[0]
    if total <= SAMPLE:
        return -math.inf, math.inf
    generator = torch.Generator().manual_seed(k * comm.world + comm.rank)
    picked = [torch.empty(0, device=masks[0].device)]
    for s, m in zip(scores, masks):
        if m.numel():
            at = torch.randint(m.numel(), (max(1, SAMPLE * m.numel() // total),), generator=generator).to(m.device)
            picked.append(s.reshape(-1)[at][m.reshape(-1)[at]].to(masks[0].device))
    sample = comm.cat(torch.cat(picked)).sort().values
    rank = k / count * sample.numel()
    margin = 4.0 * math.sqrt(sample.numel()) + 2.0   # the rank's spread is at most sqrt(n) / 2
    low, high = math.floor(rank - margin), math.ceil(rank + margin)
    lo = sample[low].item() if low >= 0 else -math.inf
    hi = sample[high].item() if high < sample.numel() else math.inf
    return lo, hi


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
