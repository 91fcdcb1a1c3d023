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


def test_the_controller_prunes_gradient_first_at_a_pruning_step():
    import granet_fx as gf

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    config = gf.GraNetConfig(method="fggp", final_sparsity=0.6, total_steps=4, prune_start=1, prune_end=1,
                             update_every=1, select_ratio=0.7)
    sparse = gf.sparsify(model, config)
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.0)    # the weights stay as they are
    granet = gf.GraNet(sparse, optimizer)
    sparse(torch.randn(8, 6)).pow(2).sum().backward()
    optimizer.step()
    names = ["0.weight", "2.weight"]
    weights = [sparse.get_parameter(n).detach().abs().clone() for n in names]
    grads = [sparse.get_parameter(n).grad.clone() for n in names]
    masks = [torch.ones_like(w, dtype=torch.bool) for w in weights]
    keep = round(0.4 * sum(w.numel() for w in weights))
    assert granet.step()
    want = brute_force(weights, grads, masks, keep, 0.7)
    got = granet.masks()
    assert all(torch.equal(got[n], w) for n, w in zip(names, want))
    assert abs(granet.report().global_sparsity - (1 - keep / 45)) < 1e-9
    for _ in range(3):                                            # no regrowth: the masks only stay
        sparse(torch.randn(8, 6)).pow(2).sum().backward()
        optimizer.step()
        granet.step()
    assert all(torch.equal(granet.masks()[n], w) for n, w in zip(names, want))


def test_fggp_settings_are_checked():
    import pytest
    import granet_fx as gf

    with pytest.raises(ValueError, match="select_ratio"):
        gf.GraNetConfig(method="fggp", select_ratio=0.0)
    with pytest.raises(ValueError, match="unstructured"):
        gf.GraNetConfig(method="fggp", granularity="channel")
