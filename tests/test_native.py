"""The compiled selection pass gives what the eager one gives, field by field and bit for bit."""

import math

import numpy as np
import pytest
import torch

from granet_fx import criteria, native

pytestmark = pytest.mark.skipif(native.kernel() is None, reason="no C compiler builds the selection pass here")


def both(monkeypatch, scores, pools, *args):
    compiled = criteria._pass(scores, pools, *args)
    with monkeypatch.context() as m:
        m.setattr(criteria.native, "eligible", lambda *a: False)
        eager = criteria._pass(scores, pools, *args)
    return compiled, eager


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def assert_same(compiled, eager):
    assert len(compiled) == len(eager)
    for c, e in zip(compiled, eager):
        assert torch.equal(c.marked, e.marked)
        assert (c.n_marked, c.n_inside, c.tie_counts) == (e.n_marked, e.n_inside, e.tie_counts)
        assert torch.equal(c.index, e.index)
        assert torch.equal(bits(c.key), bits(e.key))       # NaN and -0.0 too
        assert (c.ties is None) == (e.ties is None)
        if c.ties is not None:
            assert torch.equal(c.ties, e.ties)


def tensors(seed):
    """Scores with ties (one decimal), exact zeros of both signs and NaNs; sizes off the slice boundaries."""
    g = torch.Generator().manual_seed(seed)
    scores = []
    for n in (0, 1, 999, 1000, 1001, 7_321, 40_000):
        s = torch.round(torch.randn(n, generator=g), decimals=1)
        s[torch.rand(n, generator=g) < 0.05] = -0.0
        s[torch.rand(n, generator=g) < 0.01] = math.nan
        scores.append(s)
    pools = [torch.rand(s.numel(), generator=g) < 0.6 for s in scores]
    return scores, pools


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("bracket", [(-math.inf, math.inf, None), (-0.3, 0.4, None), (-0.3, 0.4, 0.1),
                                     (0.0, 0.0, 0.0), (-math.inf, 0.2, 0.0), (0.5, math.inf, 0.5)])
@pytest.mark.parametrize("chunk", [criteria.CHUNK, 1000])     # 1000: many slices, split among threads
@pytest.mark.parametrize("complement, keep_rest, remove", [(False, False, False), (True, False, False),
                                                       (True, True, False), (False, True, False), (False, False, True)])
def test_compiled_pass_equals_eager(largest, magnitude, bracket, chunk, complement, keep_rest, remove, monkeypatch):
    monkeypatch.setattr(criteria, "CHUNK", chunk)
    scores, pools = tensors(chunk)
    lower, upper, tie = bracket
    compiled, eager = both(monkeypatch, scores, pools, lower, upper, tie, largest, magnitude, complement, keep_rest,
                           None, remove)
    assert_same(compiled, eager)
    # Independently of both: the pool, the marks and what keep_rest adds, from plain comparisons.
    for s, p, c in zip(scores, pools, compiled):
        pool = ~p if complement else p
        key = s.abs() if magnitude else s
        key = -key if largest else key
        marks = pool & (key <= upper) if upper != math.inf else pool
        assert c.n_marked == int(marks.sum())
        assert torch.equal(c.marked, pool & ~marks if remove else marks | ~pool if keep_rest else marks)


def test_a_full_pass_outgrows_its_first_buffers(monkeypatch):
    # Every entry gathered: over ten times what the first buffers hold (a twentieth of a range, and
    # 4096), so they grow on the way.
    s = torch.randn(300_000)
    pool = torch.ones(300_000, dtype=torch.bool)
    compiled, eager = both(monkeypatch, [s], [pool], -math.inf, math.inf, None, False, False)
    assert_same(compiled, eager)
    assert compiled[0].n_inside == 300_000 and torch.equal(compiled[0].key, s)


def test_tensors_it_cannot_take_go_eager():
    s, p = torch.randn(10), torch.ones(10, dtype=torch.bool)
    assert native.eligible([s], [p])
    assert not native.eligible([s.double()], [p])
    assert not native.eligible([torch.randn(10, 2)[:, 0]], [p])      # not contiguous
    assert not native.eligible([s], [p.to(torch.uint8)])


def test_disabled_by_the_environment(monkeypatch):
    native.kernel.cache_clear()
    try:
        monkeypatch.setenv("GRANET_FX_NATIVE", "0")
        assert native.kernel() is None and not native.eligible([torch.randn(3)], [torch.ones(3, dtype=torch.bool)])
    finally:
        monkeypatch.delenv("GRANET_FX_NATIVE")
        native.kernel.cache_clear()
    assert native.kernel() is not None


@pytest.mark.parametrize("magnitude", [False, True])
@pytest.mark.parametrize("with_nan", [False, True])
def test_slice_tops_are_torchs_amax_of_the_pool(magnitude, with_nan):
    scores, pools = tensors(17)
    for s, p in zip(scores, pools):
        if not with_nan:
            s = torch.nan_to_num(s, nan=0.25)
        p = p.clone()
        p[:1000] = False                       # a slice without pool entries: -inf
        key = s.abs() if magnitude else s
        want = [torch.where(p[a:a + 1000], key[a:a + 1000], -math.inf).amax().item() for a in range(0, s.numel(), 1000)]
        got = native.slice_tops(s, p, 1000, magnitude)
        assert len(got) == len(want)
        assert all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got, want))


def test_the_portable_loops_equal_the_eager_passes(monkeypatch, tmp_path):
    # Processors without AVX2 run the portable loops (here only the tails of blocks do): built without the
    # AVX2 path, the passes give what the eager ones give.
    monkeypatch.setenv("GRANET_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "FLAGS", native.FLAGS + ("-DGRANET_FX_PORTABLE",))
    native.kernel.cache_clear()
    try:
        assert native.kernel() is not None and native.kernel().granet_avx2() == 0
        scores, pools = tensors(23)
        for lower, upper, tie in [(-math.inf, math.inf, None), (-0.3, 0.4, 0.1), (0.0, 0.0, 0.0)]:
            for complement, keep_rest, remove in [(False, False, False), (True, True, False), (False, False, True)]:
                assert_same(*both(monkeypatch, scores, pools, lower, upper, tie, True, True, complement, keep_rest,
                                  None, remove))
        for s, p in zip(scores, pools):
            want = [torch.where(p[a:a + 1000], s[a:a + 1000].abs(), -math.inf).amax().item()
                    for a in range(0, s.numel(), 1000)]
            got = native.slice_tops(s, p, 1000, True)
            assert all(g == w or (math.isnan(g) and math.isnan(w)) for g, w in zip(got, want))
    finally:
        native.kernel.cache_clear()


def stable_pick(scores, pools, k, largest, magnitude, complement, keep_rest, remove):
    """``_pick``'s marks written out with numpy's stable sort over all tensors, one after the other."""
    keys = np.concatenate([(s.abs() if magnitude else s).numpy() * (-1.0 if largest else 1.0) for s in scores])
    pool = np.concatenate([(~p if complement else p).numpy() for p in pools])
    where = np.flatnonzero(pool)
    marks = np.zeros(len(keys), dtype=bool)
    marks[where[np.argsort(keys[where], kind="stable")[:k]]] = True
    if keep_rest:
        marks |= ~pool
    if remove:
        marks = pool & ~marks
    return marks


def selection_cases():
    """Several tensors at once or one, sizes on and off the slice and sample boundaries, scores with many
    ties (rounded, exact zeros of both signs), infinities; every mode of the marks."""
    modes = [(False, False, False), (True, False, False), (True, True, False), (False, False, True),
             (True, False, True)]
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        sizes = [[70_001], [20_000, 5, 3_000], [1_000, 300_000], [16_000]][seed % 4]
        scores = []
        for n in sizes:
            s = torch.randn(n, generator=g)
            if seed % 3:
                s = torch.round(s, decimals=seed % 3) + 0.0
            s[torch.rand(n, generator=g) < (0.4 if seed % 5 == 0 else 0.02)] = -0.0
            s[torch.rand(n, generator=g) < 0.005] = math.inf
            scores.append(s)
        pools = [torch.rand(n, generator=g) < (0.1, 0.5, 0.9)[seed % 3] for n in sizes]
        complement, keep_rest, remove = modes[seed % len(modes)]
        count = sum(int((~p if complement else p).sum()) for p in pools)
        for share in (0.001, 0.3, 0.97):
            yield scores, pools, max(1, int(share * count)), count, seed % 2 == 1, seed % 4 < 2, complement, \
                keep_rest, remove


@pytest.mark.parametrize("chunk", [criteria.CHUNK, 1000])     # 1000: many slices, several ranges a tensor
@pytest.mark.parametrize("missed", [False, True])             # True: the bracket taken as missed
def test_the_compiled_selection_is_a_stable_sort_and_the_steps(chunk, missed, monkeypatch):
    # native.select (the whole of _pick in one call) against numpy's stable sort, and against _pick's own
    # steps (compiled passes, Python between them: the path of FSDP2), marks and counts.
    monkeypatch.setattr(criteria, "CHUNK", chunk)
    for scores, pools, k, count, largest, magnitude, complement, keep_rest, remove in selection_cases():
        out = [torch.rand(p.numel()) < 0.5 for p in pools]      # stale contents
        sample = sum(p.numel() for p in pools) > criteria.SAMPLE
        counts = native.select(scores, pools, k, count, largest, magnitude, complement, keep_rest, remove, out,
                               sample, chunk, missed)
        assert counts is not None
        want = stable_pick(scores, pools, k, largest, magnitude, complement, keep_rest, remove)
        assert (np.concatenate([o.numpy() for o in out]) == want).all()
        with monkeypatch.context() as m:
            m.setattr(criteria.native, "whole", lambda *a: False)
            steps, step_counts = criteria._pick(scores, pools, k, count, largest=largest, magnitude=magnitude,
                                                complement=complement, keep_rest=keep_rest, remove=remove)
        assert all(torch.equal(o, s) for o, s in zip(out, steps)) and counts == step_counts
        assert sum(counts) == k


@pytest.mark.parametrize("n", [0, 1, 7, native.SPAN, native.SPAN + 1, 3 * native.SPAN + 5])
def test_counts_are_count_nonzero(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    assert native.count(mask) == int(torch.count_nonzero(mask)) == int(mask.numpy().sum())
    every_other = torch.rand(2 * n + 2, generator=g) < 0.5
    assert native.count(every_other[::2]) == int(every_other[::2].numpy().sum())    # not contiguous: torch's


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_a_sparse_pool_is_gathered_whole_past_its_first_buffers(share):
    # 12,600 pool entries in the first of two ranges of 163,840 (five slices each): a sample would read
    # about as many positions as there are entries, so all are gathered, more than the range's first
    # buffer holds (a twentieth of it and 4,096: 12,288), and the rest goes on in an overflow buffer.
    # Against numpy's stable sort.
    g = torch.Generator().manual_seed(21)
    n, size = 10 * native.SLICE, 12_600
    score = torch.round(torch.randn(n, generator=g), decimals=2) + 0.0
    pool = torch.zeros(n, dtype=torch.bool)
    pool[torch.randperm(n // 2, generator=g)[:size]] = True
    k = int(share * size)
    for remove in (False, True):
        out = [torch.rand(n, generator=g) < 0.5]
        counts = native.select([score], [pool], k, size, False, True, False, False, remove, out, True, native.SLICE)
        assert counts is not None
        assert (out[0].numpy() == stable_pick([score], [pool], k, False, True, False, False, remove)).all()
        assert counts == [k]                        # how many it picks, whichever marks it writes


def regrow_cases(seed):
    """Layers for native.regrow: one of most of the entries (run on all threads), others around the slice
    and sample sizes, a tiny one; rounded scores (ties, zeros of both signs); each buffer arrangement of the
    controller (the drop in the pass's own buffer and the growth given, or the other way round, the growth
    then copied into the mask itself), one layer with nothing to drop, one that drops every entry."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for u, (n, density) in enumerate([(300_000, 0.1), (70_001, 0.5), (20_000, 0.9), (5, 0.6), (16_385, 0.3),
                                      (3_000, 0.05)]):
        w = torch.round(torch.randn(n, generator=g), decimals=1) + 0.0
        w[torch.rand(n, generator=g) < 0.05] = -0.0
        grad = torch.round(torch.randn(n, generator=g), decimals=2)
        mask = torch.rand(n, generator=g) < density
        mask[0] = True
        active = int(mask.sum())
        k = 0 if u == 4 else active if u == 3 else math.ceil(0.3 * active)
        tensors = [w.clone(), torch.randn(n, generator=g), torch.randn(n, generator=g, dtype=torch.float64)]
        if u % 2:       # the drop given, the growth in the pass's buffer, then into the mask
            arrangement = (torch.rand(n, generator=g) < 0.5, None, "mask")
        else:           # the drop in the pass's buffer, the growth given (the mask's own, stale)
            arrangement = (None, torch.rand(n, generator=g) < 0.5, torch.rand(n, generator=g) < 0.5 if k == 0 else None)
        layers.append((w, grad, mask, arrangement, tensors, k, active))
    return layers


@pytest.mark.parametrize("threads", [1, 2, 4])     # 4: more threads than this machine has cores
def test_regrow_is_the_drop_the_growth_and_the_zeroing_by_stable_sort(threads):
    # Each layer, against numpy's stable sort: the k smallest |w| of the mask dropped, the k largest |grad|
    # outside what is left grown, the tensors zeroed (+0.0) where the mask and the growth are not both set,
    # the rest bit for bit, and the growth (the mask, with nothing dropped) in the destination.
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(3):
            cases = regrow_cases(seed)
            layers, before = [], []
            for w, grad, mask, (dropped, grown, dest), tensors, k, active in cases:
                dest = mask if isinstance(dest, str) else dest
                before.append((mask.clone(), [t.clone() for t in tensors]))
                layers.append(native.RegrowLayer(w, grad if k else None, mask, dropped, grown, dest, tensors, k,
                                                 active))      # nothing to drop: no gradient needed
            assert native.regrow(layers, criteria.SAMPLE) == [True] * len(layers)
            for l, (w, grad, *_), (mask, tensors) in zip(layers, cases, before):
                if l.k:
                    kept = stable_pick([w], [mask], l.k, False, True, False, False, True)
                    want = stable_pick([grad], [torch.from_numpy(kept)], l.k, True, True, True, True, False)
                    assert kept.sum() == mask.sum() - l.k and want.sum() == mask.sum()
                else:
                    want = mask.numpy()
                if l.k and l.grown is not None:      # with nothing dropped, no growth is written
                    assert (l.grown.numpy() == want).all()
                if l.dest is not None:
                    assert (l.dest.numpy() == want).all()
                both = mask.numpy() & want
                for t, old in zip(l.tensors, tensors):
                    assert (t.numpy()[~both] == 0).all() and not np.signbit(t.numpy()[~both]).any()
                    assert (t.numpy()[both].view(np.uint8) == old.numpy()[both].view(np.uint8)).all()
    finally:
        torch.set_num_threads(saved)


def test_regrow_leaves_a_layer_whose_kth_key_is_nan_as_it_was():
    # The drop's k-th |w| is NaN: that layer is reported, its mask, tensors and destination untouched;
    # the other layer is done.
    g = torch.Generator().manual_seed(5)
    n = 40_000
    layers = []
    for bad in (True, False):
        w = torch.full((n,), math.nan) if bad else torch.randn(n, generator=g)
        mask = torch.rand(n, generator=g) < 0.5
        layers.append(native.RegrowLayer(w, torch.randn(n, generator=g), mask, None, torch.zeros(n, dtype=torch.bool),
                                         torch.zeros(n, dtype=torch.bool), [torch.randn(n, generator=g)], 100,
                                         int(mask.sum())))
    before = [(l.mask.clone(), l.dest.clone(), l.tensors[0].clone()) for l in layers]
    assert native.regrow(layers, criteria.SAMPLE) == [False, True]
    mask, dest, t = before[0]
    assert torch.equal(layers[0].mask, mask) and torch.equal(layers[0].dest, dest)
    assert torch.equal(layers[0].tensors[0], t) and not torch.equal(layers[1].dest, before[1][1])
