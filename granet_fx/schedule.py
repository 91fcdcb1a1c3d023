"""The schedules of GraNet as pure functions of the step number."""

from __future__ import annotations

import math


def cubic_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta's gradual pruning target at ``step``.

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0)) ** 3``, held at
    ``s_i`` before ``t0`` and at ``s_f`` after ``t_end``.
    """
    if step <= start:
        return initial if end > start or step < start else final
    if step >= end:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_fraction(step: int, total: int, start: float, minimum: float) -> float:
    """Regrowth fraction r_t, decayed by cosine from ``start`` to ``minimum`` over ``total`` steps."""
    progress = min(max(step / total, 0.0), 1.0)
    return minimum + 0.5 * (start - minimum) * (1.0 + math.cos(math.pi * progress))


def rigl_fraction(step: int, total: int, start: float) -> float:
    """RigL's drop fraction: cosine decay from ``start`` to zero at 75% of training."""
    end = 0.75 * total
    if step >= end:
        return 0.0
    return 0.5 * start * (1.0 + math.cos(math.pi * step / end))


def is_update_step(step: int, start: int, every: int) -> bool:
    """True at ``start``, ``start + every``, ...; steps count from 1."""
    return step >= max(start, 1) and (step - start) % every == 0
