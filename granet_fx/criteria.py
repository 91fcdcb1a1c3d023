"""Pure functions that decide which weights are kept: layer densities (ERK,
uniform), random masks, magnitude pruning, dropping and regrowth.

Masks are bool tensors; scores are tensors of the same shape (|w|, |grad|, or
random numbers). Every function returns new masks and leaves its inputs alone.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch


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

    Largest-remainder rounding, never above a layer's size.
    """
    ideal = [d * n for d, n in zip(densities, numels)]
    counts = [min(int(math.floor(x)), n) for x, n in zip(ideal, numels)]
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
        take = min(counts[i], -left)
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


def prune_global(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Keep the ``keep`` active entries with the largest score over all layers together.

    Ties at the threshold are broken by position (layer order, then flat index).
    """
    device = masks[0].device
    active = torch.cat([s.detach()[m].float().to(device) for s, m in zip(scores, masks)])
    n_drop = active.numel() - keep
    if n_drop <= 0:
        return [m.clone() for m in masks]
    threshold = torch.kthvalue(active, n_drop).values.item()
    ties_to_drop = n_drop - int((active < threshold).sum())
    result = []
    for s, m in zip(scores, masks):
        s = s.detach().float()
        drop = m & (s < threshold)
        if ties_to_drop > 0:
            ties = (m & (s == threshold)).flatten().nonzero().squeeze(1)[:ties_to_drop]
            drop.view(-1)[ties] = True
            ties_to_drop -= ties.numel()
        result.append(m & ~drop)
    return result


def drop_smallest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Deactivate the ``n`` active entries with the smallest score."""
    new = mask.clone()
    n = min(n, int(mask.sum()))
    if n <= 0:
        return new
    s = score.detach().float().masked_fill(~mask, math.inf).flatten()
    new.view(-1)[torch.topk(s, n, largest=False).indices] = False
    return new


def grow_largest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Activate the ``n`` inactive entries with the largest score."""
    new = mask.clone()
    n = min(n, int((~mask).sum()))
    if n <= 0:
        return new
    s = score.detach().float().masked_fill(mask, -math.inf).flatten()
    new.view(-1)[torch.topk(s, n).indices] = True
    return new


# Structured granularities: whole channels, N:M ---------------------------------


def channel_norms(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each channel's weights: dimension 0 of every tensor in ``rows`` indexes the channels.

    A channel made by several layers (the channels of a residual stream) scores
    the root mean square of its row norms, so that it compares with channels
    made by one layer.
    """
    return torch.stack([r.detach().float().flatten(1).pow(2).sum(1) for r in rows]).mean(0).sqrt()


def prune_channels(scores: Sequence[torch.Tensor], keeps: Sequence[torch.Tensor], costs: Sequence[int],
                   budget: int) -> list[torch.Tensor]:
    """Keep the active channels with the largest score over all groups, at most ``budget`` in cost.

    Group g's channels each cost ``costs[g]`` (the rows that make them). Every
    group keeps its best active channel whatever the budget: a group with no
    channel would cut the network. Ties are broken by group order, then index.
    """
    flat, cost, best, start = [], [], [], 0
    for s, k, c in zip(scores, keeps, costs):
        s = s.detach().float().masked_fill(~k, -math.inf)
        if k.any():
            best.append(start + int(s.argmax()))
        flat.append(s)
        cost.append(torch.full_like(s, float(c)))
        start += len(s)
    s, c = torch.cat(flat), torch.cat(cost)
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
