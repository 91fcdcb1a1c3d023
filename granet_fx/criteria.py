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


def prune_global(scores: Sequence[torch.Tensor], masks: Sequence[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Keep the ``keep`` active entries with the largest score over all layers together.

    No layer is emptied: every layer with an active entry keeps at least its
    largest one (``keep`` is raised to the number of such layers if smaller).
    Ties at the threshold are broken by position (layer order, then flat index).
    """
    device = masks[0].device
    parts, tops = [], []
    for s, m in zip(scores, masks):
        active = s.detach()[m].float().to(device)
        top = None
        if active.numel():
            i = int(active.argmax())
            top = active[i].item()
            active[i] = math.inf    # the layer's largest entry is never below the threshold
        parts.append(active)
        tops.append(top)
    active = torch.cat(parts)
    keep = max(keep, sum(top is not None for top in tops))
    n_drop = active.numel() - keep
    if n_drop <= 0:
        return [m.clone() for m in masks]
    threshold = torch.kthvalue(active, n_drop).values.item()
    ties_kept = int(torch.count_nonzero(active <= threshold)) - n_drop
    del active, parts
    result = []
    for s, m, top in zip(scores, masks, tops):
        kept = m & (s.detach().float() > threshold)
        if top is not None and top <= threshold:    # put back the layer's first largest entry
            kept.view(-1)[int((m & (s.detach().float() == top)).flatten().nonzero()[0])] = True
        result.append(kept)
    for s, m, kept in reversed(list(zip(scores, masks, result))):
        if ties_kept <= 0:      # ties at the threshold: the last ones in position order stay
            break
        ties = (m & ~kept & (s.detach().float() == threshold)).flatten().nonzero().squeeze(1)
        back = ties[max(ties.numel() - ties_kept, 0):]
        kept.view(-1)[back] = True
        ties_kept -= back.numel()
    return result


def drop_smallest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Deactivate the ``n`` active entries with the smallest score."""
    return mask & ~_extreme(score, mask, n, largest=False)


def grow_largest(score: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Activate the ``n`` inactive entries with the largest score."""
    return mask | _extreme(score, ~mask, n, largest=True)


def _extreme(score: torch.Tensor, candidates: torch.Tensor, n: int, largest: bool) -> torch.Tensor:
    """The ``n`` candidate entries with the smallest (or largest) score, as a bool mask.

    Selects by a threshold found with ``kthvalue`` (linear time, no sort and no
    index list); ties at the threshold go to the lowest flat indices.
    """
    s = score.detach().float()
    values = s[candidates]
    n = min(n, values.numel())
    if n <= 0:
        return torch.zeros_like(candidates)
    threshold = torch.kthvalue(values, values.numel() - n + 1 if largest else n).values
    extra = int(torch.count_nonzero(values >= threshold if largest else values <= threshold)) - n
    del values
    chosen = candidates & (s >= threshold if largest else s <= threshold)
    if extra > 0:               # too many ties at the threshold: give back those with the highest indices
        ties = (chosen & (s == threshold)).flatten().nonzero().squeeze(1)
        chosen.view(-1)[ties[ties.numel() - extra:]] = False
    return chosen
