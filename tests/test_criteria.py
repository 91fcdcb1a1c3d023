"""ERK, apportioning, pruning and regrowth against hand-worked or brute-force references."""

import math

import numpy as np
import pytest
import torch

from granet_fx import criteria
from granet_fx.criteria import (
    apportion, drop_smallest, erk_densities, grow_largest, prune_global, random_mask, uniform_densities,
)


@pytest.fixture(autouse=True, params=["compiled", "passes", "eager"])
def selection_pass(request, monkeypatch):
    """Every test here runs with the compiled selection (one call a selection), with the compiled passes
    and _pick's steps between them in Python (the path of FSDP2), and with the eager passes."""
    if request.param == "eager":
        monkeypatch.setattr(criteria.native, "eligible", lambda *a: False)
    elif criteria.native.kernel() is None:
        pytest.skip("no C compiler builds granet_fx/native/update_passes.c here")
    elif request.param == "passes":
        monkeypatch.setattr(criteria.native, "whole", lambda *a: False)
    return request.param


# conv1d 16x1x5, conv1d 32x16x3, linear 10x32. ERK's raw score sum(shape)/prod(shape)
# times numel is sum(shape): 22, 51 and 42, so eps = density * N / 115.
SHAPES = {"conv1": (16, 1, 5), "conv2": (32, 16, 3), "fc": (10, 32)}
N = 80 + 1536 + 320


def test_erk_without_dense_layers():
    eps = 0.1 * N / 115
    expected = {"conv1": eps * 22 / 80, "conv2": eps * 51 / 1536, "fc": eps * 42 / 320}
    got = erk_densities(SHAPES, 0.1)
    assert got == pytest.approx(expected)
    assert sum(got[k] * math.prod(s) for k, s in SHAPES.items()) == pytest.approx(0.1 * N)


def test_erk_makes_small_layers_dense_first():
    # At density 0.5: eps = 968/115 puts conv1 above 1 -> dense; then eps = 888/93 puts
    # fc above 1 -> dense; conv2 takes the rest: 968 - 80 - 320 = 568 of 1536.
    got = erk_densities(SHAPES, 0.5)
    assert got == pytest.approx({"conv1": 1.0, "fc": 1.0, "conv2": 568 / 1536})


def test_uniform():
    assert uniform_densities(SHAPES, 0.2) == {"conv1": 0.2, "conv2": 0.2, "fc": 0.2}


def test_apportion_adds_up_and_stays_within_layers():
    numels = [80, 1536, 320]
    counts = apportion(numels, [0.4629, 0.0559, 0.2209], 194)
    assert sum(counts) == 194
    assert counts == [37, 86, 71]  # floors 37, 85, 70 plus the two largest remainders
    assert apportion([10, 10], [1.0, 1.0], 20) == [10, 10]


def test_random_mask_exact_count():
    g = torch.Generator().manual_seed(1)
    m = random_mask((7, 9), 20, g)
    assert m.dtype == torch.bool and m.shape == (7, 9) and int(m.sum()) == 20


def test_prune_global_matches_plain_topk():
    torch.manual_seed(0)
    weights = [torch.randn(8, 4, 3), torch.randn(16, 8), torch.randn(5, 16)]
    masks = [torch.rand(w.shape) > 0.3 for w in weights]
    keep = 100
    new = prune_global([w.abs() for w in weights], masks, keep)
    # Reference: top-k over all active magnitudes at once, in numpy.
    flat = np.concatenate([(w.abs() * m).flatten().numpy() for w, m in zip(weights, masks)])
    active = np.concatenate([m.flatten().numpy() for m in masks])
    flat[~active] = -1.0
    order = np.argsort(-flat, kind="stable")[:keep]
    expected = np.zeros_like(active)
    expected[order] = True
    got = np.concatenate([m.flatten().numpy() for m in new])
    assert got.sum() == keep
    assert (got == expected).all()


def test_prune_global_breaks_ties_and_keeps_count():
    weights = [torch.zeros(10), torch.ones(10)]
    masks = [torch.ones(10, dtype=torch.bool), torch.ones(10, dtype=torch.bool)]
    new = prune_global([w.abs() for w in weights], masks, 13)
    assert int(new[1].sum()) == 10 and int(new[0].sum()) == 3


def test_drop_smallest_brute_force():
    torch.manual_seed(1)
    w = torch.randn(6, 7)
    mask = torch.rand(6, 7) > 0.4
    new = drop_smallest(w.abs(), mask, 5)
    idx = [i for i in np.argsort(w.abs().flatten().numpy()) if mask.flatten()[i]][:5]
    expected = mask.clone().flatten()
    expected[idx] = False
    assert torch.equal(new.flatten(), expected)


def test_grow_largest_brute_force():
    torch.manual_seed(2)
    grad = torch.randn(6, 7)
    mask = torch.rand(6, 7) > 0.5
    new = grow_largest(grad.abs(), mask, 4)
    idx = [i for i in np.argsort(-grad.abs().flatten().numpy()) if not mask.flatten()[i]][:4]
    expected = mask.clone().flatten()
    expected[idx] = True
    assert torch.equal(new.flatten(), expected)
    assert not torch.equal(new, mask)


def test_drop_and_grow_break_ties_by_lowest_index():
    t, f = True, False
    score = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 0.0])
    mask = torch.tensor([t, t, f, t, t, t])
    # the active zeros sit at 1, 3 and 5: dropping two takes 1 and 3
    assert drop_smallest(score, mask, 2).tolist() == [t, f, f, f, t, t]
    grad = torch.tensor([9.0, 3.0, 3.0, 9.0, 3.0, 3.0])
    mask = torch.tensor([t, f, f, t, f, f])
    # the inactive entries 1, 2, 4, 5 tie at 3: growing two takes 1 and 2
    assert grow_largest(grad, mask, 2).tolist() == [t, t, t, t, f, f]
    assert grow_largest(grad, mask, 9).all() and not drop_smallest(score, mask, 9).any()


def reference_prune(scores, masks, keep):
    """prune_global's rule written out with numpy's stable sort."""
    flat = np.concatenate([s.numpy().ravel() for s in scores]).astype(np.float64)
    active = np.concatenate([m.numpy().ravel() for m in masks])
    layer = np.concatenate([np.full(m.numel(), i) for i, m in enumerate(masks)])
    nonempty = [i for i, m in enumerate(masks) if m.any()]
    keep = max(keep, len(nonempty))

    def drop_earliest_smallest(candidates, n):
        order = np.argsort(np.where(candidates, flat, np.inf), kind="stable")[:n]
        kept = candidates.copy()
        kept[order] = False
        return kept

    n_drop = int(active.sum()) - keep
    kept = drop_earliest_smallest(active, n_drop)
    if all(kept[layer == i].any() for i in nonempty):
        return kept
    best = []
    for i in nonempty:
        where = np.flatnonzero((layer == i) & active)
        values = flat[where]
        best.append(where[np.flatnonzero(values == values.max())[-1]])
    rest = active.copy()
    rest[best] = False
    kept = drop_earliest_smallest(rest, n_drop)
    kept[best] = True
    return kept


@pytest.mark.parametrize("decimals", [None, 1])          # 1 decimal: many ties at the threshold
def test_large_inputs_select_exactly_through_the_sampled_bracket(decimals, monkeypatch):
    # More entries than criteria.SAMPLE: the threshold comes from a sampled bracket, and must be exact.
    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(300, 400, generator=g), torch.randn(200, 100, generator=g),
               1e-3 * torch.rand(50, 40, generator=g)]     # the last layer is emptied unless protected
    if decimals is not None:
        weights = [torch.round(w, decimals=decimals) + 0.0 for w in weights[:2]] + weights[2:]
    scores = [w.abs() for w in weights]
    masks = [torch.rand(w.shape, generator=g) < 0.7 for w in weights]
    assert sum(m.numel() for m in masks) > criteria.SAMPLE
    for keep in (30_000, 60_000):
        got = np.concatenate([m.numpy().ravel() for m in prune_global(scores, masks, keep)])
        assert (got == reference_prune(scores, masks, keep)).all()
    s, m = scores[0].numpy().ravel(), masks[0].numpy().ravel()
    for n in (2_000, 20_000, 60_000):    # the threshold in the lower or the upper half of the candidates
        dropped = np.argsort(np.where(m, s, np.inf), kind="stable")[:n]
        expected = m.copy()
        expected[dropped] = False
        assert (drop_smallest(scores[0], masks[0], n).numpy().ravel() == expected).all()
        grown = np.argsort(-np.where(m, -np.inf, s), kind="stable")[:n]
        expected = m.copy()
        expected[grown] = True
        assert (grow_largest(scores[0], masks[0], n).numpy().ravel() == expected).all()
    # A bracket that misses the answer falls back to selecting among every candidate.
    monkeypatch.setattr(criteria, "_bracket", lambda *a: (10.0, 11.0, None))
    got = np.concatenate([m.numpy().ravel() for m in prune_global(scores, masks, 30_000)])
    assert (got == reference_prune(scores, masks, 30_000)).all()


@pytest.mark.parametrize("chunk", [criteria.CHUNK, 1000])     # 1000: several slices per tensor
def test_pools_of_many_exact_zeros_select_like_a_stable_sort(chunk, monkeypatch):
    # Exact zeros (regrown weights, gradients of dead units) make ties of most of a pool: they are
    # counted apart, not gathered, and the earliest are still the ones taken.
    monkeypatch.setattr(criteria, "CHUNK", chunk)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(300, 200, generator=g) * (torch.rand(300, 200, generator=g) < 0.2)   # 80% zeros
    mask = torch.rand(300, 200, generator=g) < 0.6
    s, m = w.abs().numpy().ravel(), mask.numpy().ravel()
    for n in (500, 5_000, 30_000, 34_000):      # the k-th in the zeros, or among the nonzero ones
        dropped = np.argsort(np.where(m, s, np.inf), kind="stable")[:n]
        expected = m.copy()
        expected[dropped] = False
        assert (drop_smallest(w, mask, n, magnitude=True).numpy().ravel() == expected).all()
        grown = np.argsort(-np.where(m, -np.inf, s), kind="stable")[:n]
        expected = m.copy()
        expected[grown] = True
        assert (grow_largest(-w, mask, n, magnitude=True).numpy().ravel() == expected).all()
    weights = [w, torch.randn(100, 100, generator=g) * (torch.rand(100, 100, generator=g) < 0.5)]
    masks = [mask, torch.rand(100, 100, generator=g) < 0.9]
    for keep in (1_000, 20_000, 30_000):
        got = np.concatenate([x.numpy().ravel() for x in prune_global(weights, masks, keep, magnitude=True)])
        assert (got == reference_prune([x.abs() for x in weights], masks, keep)).all()


@pytest.mark.parametrize("keep", [5, 30_000, 90_000])    # 5: every layer keeps its best one
def test_prune_global_counted_counts_what_it_keeps(keep):
    g = torch.Generator().manual_seed(7)
    weights = [torch.randn(300, 400, generator=g), 1e-3 * torch.rand(50, 40, generator=g), torch.randn(7, 3, generator=g)]
    masks = [torch.rand(w.shape, generator=g) < 0.8 for w in weights]
    new, counts = criteria.prune_global_counted(weights, masks, keep, magnitude=True)
    assert counts == [int(m.sum()) for m in new]
    assert sum(counts) == max(keep, 3) and all(c >= 1 for c in counts)
    got = np.concatenate([m.numpy().ravel() for m in new])
    assert (got == reference_prune([w.abs() for w in weights], masks, keep)).all()


@pytest.mark.parametrize("n", [10, 70_000, 300_000])
def test_kth_is_the_sorted_keys_rth(n):
    # Against a sort: keys with many repeats and NaNs (after every number), ranks at the ends and inside.
    g = torch.Generator().manual_seed(n)
    keys = torch.round(torch.randn(n, generator=g), decimals=2)
    keys[torch.rand(n, generator=g) < 0.01] = math.nan
    ordered = keys.sort().values          # NaN last
    for r in {1, 2, n // 3, n // 2, n - int(keys.isnan().sum()), n - 1, n}:
        got, want = criteria._kth(keys, r), ordered[r - 1].item()
        assert got == want or (math.isnan(got) and math.isnan(want))


@pytest.mark.parametrize("keep", [5, 30_000, 90_000])    # 5: every layer keeps its best one (the retry)
def test_selections_written_in_given_buffers_are_the_same(keep):
    # ``out`` buffers that hold stale values: the new masks are still the reference's, the inputs untouched.
    g = torch.Generator().manual_seed(11)
    weights = [torch.randn(300, 400, generator=g), 1e-3 * torch.rand(50, 40, generator=g), torch.randn(7, 3, generator=g)]
    masks = [torch.rand(w.shape, generator=g) < 0.8 for w in weights]
    before = [m.clone() for m in masks]
    stale = lambda m: torch.rand(m.numel(), generator=g) < 0.5
    new, counts = criteria.prune_global_counted(weights, masks, keep, magnitude=True, out=[stale(m) for m in masks])
    got = np.concatenate([m.numpy().ravel() for m in new])
    assert (got == reference_prune([w.abs() for w in weights], masks, keep)).all()
    assert counts == [int(m.sum()) for m in new]
    s, m = weights[0].abs().numpy().ravel(), masks[0].numpy().ravel()
    n = min(keep, 20_000)
    dropped = np.argsort(np.where(m, s, np.inf), kind="stable")[:n]
    expected = m.copy()
    expected[dropped] = False
    kept = drop_smallest(weights[0], masks[0], n, magnitude=True, out=stale(masks[0]))
    assert (kept.numpy().ravel() == expected).all()
    grown = np.argsort(-np.where(expected, -np.inf, s), kind="stable")[:n]
    expected[grown] = True
    assert (grow_largest(weights[0], kept, n, magnitude=True, out=stale(kept)).numpy().ravel() == expected).all()
    assert all(torch.equal(a, b) for a, b in zip(masks, before))


@pytest.mark.parametrize("lone", [1e-4, 10.0])      # a layer's one entry: below the threshold, or far above
def test_a_layer_down_to_one_entry_selects_like_the_reference(lone):
    # With a mask of one active entry the selection sets every mask's best aside from the start; the
    # masks are still the reference's, whether or not that entry would have been taken, and the
    # masks given are left as they were.
    g = torch.Generator().manual_seed(13)
    weights = [torch.randn(300, 400, generator=g), torch.randn(20, 30, generator=g), torch.randn(64, 64, generator=g)]
    weights[1][3, 4] = lone
    masks = [torch.rand(w.shape, generator=g) < 0.6 for w in weights]
    masks[1].zero_()
    masks[1][3, 4] = True
    before = [m.clone() for m in masks]
    for keep in (10, 20_000, 60_000):
        new, counts = criteria.prune_global_counted(weights, masks, keep, magnitude=True)
        got = np.concatenate([m.numpy().ravel() for m in new])
        assert (got == reference_prune([w.abs() for w in weights], masks, keep)).all()
        assert counts == [int(m.sum()) for m in new] and counts[1] == 1
        assert all(torch.equal(a, b) for a, b in zip(masks, before))


def test_keeping_one_layer_that_would_empty_can_empty_the_next_and_both_keep_their_best():
    # Layer 1's three entries go first and would empty it; keeping its best takes one more, which
    # empties layer 2; keeping that one's best too takes the largest layer's smallest entry.
    big = 1.0 + torch.rand(40, 50, generator=torch.Generator().manual_seed(17))
    weights = [big, torch.full((3,), 1e-4), torch.tensor([2e-4, 3e-4]), torch.tensor([5.0, 6.0, 7.0])]
    masks = [torch.ones(w.shape, dtype=torch.bool) for w in weights]
    total = sum(m.numel() for m in masks)
    for n_drop in (4, 5, 9):
        new, counts = criteria.prune_global_counted(weights, masks, total - n_drop, magnitude=True)
        got = np.concatenate([m.numpy().ravel() for m in new])
        assert (got == reference_prune([w.abs() for w in weights], masks, total - n_drop)).all()
        assert counts[1:3] == [1, 1] and counts[0] == big.numel() - (n_drop - 3)
        assert new[1].tolist() == [False, False, True] and new[2].tolist() == [False, True]
