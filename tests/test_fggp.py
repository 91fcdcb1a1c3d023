"""FGGP's gradient-first pruning step against a hand-worked case and a brute-force reference."""

import torch

from granet_fx.criteria import prune_gradient_first


def test_hand_worked_case():
    w = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.8, 0.2])
    g = torch.tensor([0.05, 0.4, 0.01, 0.03, 0.02, 0.5])
    mask = torch.ones(6, dtype=torch.bool)
    # candidates: the 3 smallest |g| (positions 2, 4, 3); of those the 2 smallest |w| (3, 2) go
    (kept,) = prune_gradient_first([w], [g], [mask], keep=4, select_ratio=0.5)
    assert kept.tolist() == [True, True, False, False, True, True]
    # magnitude alone would drop 1 and 5; gradient alone 2 and 4: FGGP is neither
    assert kept.tolist() != [True, False, True, True, True, False]
    assert kept.tolist() != [True, True, False, True, False, True]


def brute_force(scores, grads, masks, keep, ratio):
    """Sort every active entry by (|g|, layer, index), take the first m, drop the n smallest (|w|, layer, index)."""
    active = [(float(g.flatten()[i].abs()), layer, i, float(s.flatten()[i]))
              for layer, (s, g, m) in enumerate(zip(scores, grads, masks))
              for i in m.flatten().nonzero().flatten().tolist()]
    n_drop = len(active) - keep
    m = max(int(ratio * len(active)), n_drop)
    candidates = sorted(active)[:m]
    gone = sorted(candidates, key=lambda e: (e[3], e[1], e[2]))[:n_drop]
    out = [mk.clone() for mk in masks]
    for _, layer, i, _ in gone:
        out[layer].view(-1)[i] = False
    return out


def test_matches_brute_force_on_random_layers():
    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        shapes = [(4, 5), (7,), (3, 3, 2)]
        scores = [torch.rand(s, generator=generator) for s in shapes]
        grads = [torch.randn(s, generator=generator) for s in shapes]
        masks = [torch.rand(s, generator=generator) < 0.8 for s in shapes]
        total = sum(int(m.sum()) for m in masks)
        keep = total - 1 - trial % 7
        ratio = [0.3, 0.5, 0.9][trial % 3]
        got = prune_gradient_first(scores, grads, masks, keep, ratio)
        want = brute_force(scores, grads, masks, keep, ratio)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), trial
        assert sum(int(k.sum()) for k in got) == keep


def test_ties_go_by_position_and_no_layer_is_emptied():
    scores = [torch.ones(4), torch.ones(2)]
    grads = [torch.zeros(4), torch.zeros(2)]
    masks = [torch.ones(4, dtype=torch.bool), torch.ones(2, dtype=torch.bool)]
    got = prune_gradient_first(scores, grads, masks, keep=3, select_ratio=0.5)
    assert got[0].tolist() == [False, False, False, True] and got[1].tolist() == [True, True]
    # keep=1 would empty a layer: each keeps one entry
    got = prune_gradient_first(scores, grads, masks, keep=1, select_ratio=1.0)
    assert [int(k.sum()) for k in got] == [1, 1]
