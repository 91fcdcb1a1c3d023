"""torch.compile: one graph, no break, no recompilation when masks change, same masks as eager."""

import pytest
import torch
import torch._dynamo

import granet_fx as gf

from helpers import SmallCNN, batches, train


def make(seed=0):
    torch.manual_seed(seed)
    config = gf.GraNetConfig(final_sparsity=0.8, total_steps=24, update_every=4, prune_end=16)
    model = gf.sparsify(SmallCNN(), config)
    model.drop.p = 0.0  # no randomness, so eager and compiled runs see the same numbers
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    return model, opt, gf.GraNet(model, opt)


def test_no_graph_break():
    torch._dynamo.reset()
    model, _, _ = make()
    explanation = torch._dynamo.explain(model)(torch.randn(8, 1, 12))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_compiled_matches_eager_without_recompiling():
    torch._dynamo.reset()
    data = batches(24, (8, 1, 12), 4)
    eager, opt_e, granet_e = make()
    losses_e, masks_e = [], []
    compiled, opt_c, granet_c = make()
    step_fn = torch.compile(compiled)
    losses_c, masks_c = [], []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(0, 24, 4):   # six mask updates, the masks change at each
            losses_e += train(eager, opt_e, granet_e, data[i:i + 4])
            losses_c += train(compiled, opt_c, granet_c, data[i:i + 4], forward=step_fn)
            masks_e.append(granet_e.masks())
            masks_c.append(granet_c.masks())
    changed = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(masks_c, masks_c[1:])]
    assert any(changed), "the masks should change between updates"
    for a, b in zip(masks_e, masks_c):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses_c == pytest.approx(losses_e, rel=1e-4, abs=1e-5)
    assert granet_c.report().global_sparsity == pytest.approx(0.8, abs=0.01)
