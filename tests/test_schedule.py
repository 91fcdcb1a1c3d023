"""The schedules against values worked out by hand."""

import math

import pytest

from granet_fx.schedule import cosine_fraction, cubic_sparsity, is_update_step, rigl_fraction


@pytest.mark.parametrize(
    "step, expected",
    [
        (0, 0.0),          # t0: initial sparsity
        (25, 0.5203125),   # 0.9 - 0.9 * 0.75**3
        (50, 0.7875),      # 0.9 - 0.9 * 0.5**3
        (75, 0.8859375),   # 0.9 - 0.9 * 0.25**3
        (100, 0.9),        # t_end
        (150, 0.9),        # held after t_end
    ],
)
def test_cubic_dense_to_sparse(step, expected):
    assert cubic_sparsity(step, 0.0, 0.9, 0, 100) == pytest.approx(expected, abs=1e-12)


def test_cubic_sparse_to_sparse_with_offset():
    # s_i = 0.5, s_f = 0.98, t0 = 200, t_end = 600; at t = 400 progress is 1/2:
    # 0.98 + (0.5 - 0.98) * 0.125 = 0.92
    assert cubic_sparsity(400, 0.5, 0.98, 200, 600) == pytest.approx(0.92)
    assert cubic_sparsity(100, 0.5, 0.98, 200, 600) == pytest.approx(0.5)


def test_cubic_one_shot_when_start_equals_end():
    assert cubic_sparsity(9, 0.0, 0.8, 10, 10) == 0.0
    assert cubic_sparsity(10, 0.0, 0.8, 10, 10) == 0.8


def test_cosine_fraction():
    assert cosine_fraction(0, 1000, 0.5, 0.005) == pytest.approx(0.5)
    assert cosine_fraction(500, 1000, 0.5, 0.005) == pytest.approx(0.2525)  # midpoint
    assert cosine_fraction(1000, 1000, 0.5, 0.005) == pytest.approx(0.005)
    # a quarter of the way: 0.005 + 0.495 * (1 + cos(pi/4)) / 2
    assert cosine_fraction(250, 1000, 0.5, 0.005) == pytest.approx(0.005 + 0.495 * (1 + math.sqrt(0.5)) / 2)


def test_rigl_fraction_reaches_zero_at_three_quarters():
    assert rigl_fraction(0, 1000, 0.3) == pytest.approx(0.3)
    assert rigl_fraction(375, 1000, 0.3) == pytest.approx(0.15)
    assert rigl_fraction(750, 1000, 0.3) == 0.0
    assert rigl_fraction(900, 1000, 0.3) == 0.0


def test_update_steps():
    steps = [t for t in range(1, 60) if is_update_step(t, 10, 20)]
    assert steps == [10, 30, 50]
    assert [t for t in range(1, 35) if is_update_step(t, 0, 10)] == [10, 20, 30]
