"""Degenerate input: bad gradients, empty batches, tiny layers, tied weights, mixed dtypes."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.criteria import apportion, prune_global
from granet_fx.passes import is_mask_node

from helpers import MLP, Branchy, batches, train


def one_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


# Non-finite and empty gradients --------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_skips_the_update_and_pruning_catches_up(bad):
    config = gf.GraNetConfig(final_sparsity=0.8, total_steps=16, update_every=2, prune_end=8)
    model = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    granet = gf.GraNet(model, opt)
    data = batches(16, (8, 20), 10)
    train(model, opt, granet, data[:7])
    one_step(model, opt, *data[7])
    model.fc2.weight.grad[1, 2] = bad                   # after the optimizer step: the weights stay finite
    before = granet.masks()
    with pytest.warns(UserWarning, match="non-finite gradient at step 8; mask update skipped"):
        assert not granet.step()                        # step 8 is the last pruning step
    assert all(torch.equal(before[k], v) for k, v in granet.masks().items())
    # still at step 6's target: 0.8 - 0.8 * (1 - 6/8)**3 = 0.7875, i.e. round(0.2125 * 900) = 191 of 900 kept
    assert sum(int(m.sum()) for m in granet.masks().values()) == 191
    train(model, opt, granet, data[8:10])               # the next update (step 10) makes it up
    assert sum(int(m.sum()) for m in granet.masks().values()) == 180


def test_empty_batch_skips_regrowth_with_a_warning():
    # An empty batch gives a NaN mean loss but an all-zero gradient: nothing to regrow by.
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", final_sparsity=0.5, total_steps=10, update_every=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    before = granet.masks()
    loss = one_step(model, opt, torch.randn(0, 20), torch.zeros(0, dtype=torch.long))
    assert torch.isnan(loss)
    with pytest.warns(UserWarning, match="gradient zero everywhere .* regrowth skipped"):
        assert not granet.step()
    assert all(torch.equal(before[k], v) for k, v in granet.masks().items())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_empty_batch_still_prunes_on_schedule():
    config = gf.GraNetConfig(final_sparsity=0.5, total_steps=10, update_every=1, prune_start=1, prune_end=1)
    model = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    one_step(model, opt, torch.randn(0, 20), torch.zeros(0, dtype=torch.long))
    weights = torch.cat([model.fc1.weight.detach().abs().flatten(), model.fc2.weight.detach().abs().flatten()])
    with pytest.warns(UserWarning, match="regrowth skipped"):
        assert granet.step()
    # one-shot magnitude pruning to 50% of the 900 weights, nothing regrown
    masks = torch.cat([m.flatten() for m in granet.masks().values()])
    assert int(masks.sum()) == 450
    assert weights[masks].min() >= weights[~masks].max()


def test_no_gradient_at_an_update_is_a_clear_error_but_fine_between_updates():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", final_sparsity=0.5, total_steps=10, update_every=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    assert not granet.step()                            # step 1: no update due, no gradient needed
    with pytest.raises(RuntimeError, match="no gradients at a mask update"):
        granet.step()                                   # step 2: regrowth needs the gradient


# Tiny layers and layers that pruning would empty ---------------------------------------------


def test_prune_global_keeps_one_weight_per_layer_hand_worked():
    a, b = torch.tensor([0.1, 0.2]), torch.tensor([5.0, 6.0, 7.0, 8.0])
    ones = [torch.ones(2, dtype=torch.bool), torch.ones(4, dtype=torch.bool)]
    # Plain top-2 would keep 7 and 8 and empty the first layer; it keeps 0.2 and 8 instead.
    for keep in (0, 1, 2):
        new = prune_global([a, b], ones, keep)
        assert new[0].tolist() == [False, True] and new[1].tolist() == [False, False, False, True]
    new = prune_global([a, b], ones, 3)
    assert new[0].tolist() == [False, True] and new[1].tolist() == [False, False, True, True]
    # Ties: plain pruning would drop a's two 0.3s (the earliest go first) and empty it; so each layer
    # keeps its best entry, the last among equals (a[1], b[2]), and a[0], b[0], b[1] compete for the
    # one place left, which goes to the last of them, b[1].
    a, b = torch.full((2,), 0.3), torch.full((3,), 0.3)
    new = prune_global([a, b], [torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool)], 3)
    assert new[0].tolist() == [False, True] and new[1].tolist() == [False, True, True]
    # A layer that is already empty stays empty and does not count: keep is raised to 1, b keeps b[2].
    new = prune_global([a, b], [torch.zeros(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool)], 0)
    assert new[0].tolist() == [False, False] and new[1].tolist() == [False, False, True]


def test_apportion_gives_every_layer_at_least_one_weight():
    # Ideal counts 0.2 and 100: the small layer gets one, taken from the large one.
    assert apportion([2, 1000], [0.1, 0.1], 100) == [1, 99]
    assert apportion([2, 1000], [0.1, 0.1], 1) == [0, 1]     # fewer weights than layers: no floor


class Tiny(nn.Module):
    """A one-weight layer between two ordinary ones."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(20, 1)
        self.b = nn.Linear(1, 1)
        self.c = nn.Linear(1, 10)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.a(x))))


@pytest.mark.filterwarnings("ignore:granet_fx. gradient zero everywhere")   # a one-unit ReLU often dies
@pytest.mark.parametrize("method, distribution", [("granet", "erk"), ("gmp", "uniform"), ("set", "uniform")])
def test_tiny_layers_are_never_emptied(method, distribution):
    # 20 + 1 + 10 = 31 weights; at 95% the plain target keeps round(1.55) = 2 < 3 layers.
    config = gf.GraNetConfig(method=method, final_sparsity=0.95, total_steps=12, update_every=2, prune_end=8,
                             distribution=distribution)
    model = gf.sparsify(Tiny(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    for x, y in batches(12, (8, 20), 10):
        one_step(model, opt, x, y)
        granet.step()
        assert all(int(m.sum()) >= 1 for m in granet.masks().values())
    assert [int(m.sum()) for m in granet.masks().values()] == [1, 1, 1]


# Tied and shared weights --------------------------------------------------------------------


class SharedLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_weight_shared_by_two_linears_gets_one_mask_used_by_both():
    model = gf.sparsify(SharedLinear(), gf.GraNetConfig(initial_sparsity=0.5, final_sparsity=0.8, total_steps=10))
    assert [(l.name, l.mask_name) for l in gf.sparse_info(model).layers] == [("a.weight", "a.weight_mask")]
    assert [k for k in model.state_dict() if k.endswith("_mask")] == ["a.weight_mask"]
    mask_nodes = [n for n in model.graph.nodes if is_mask_node(n)]
    assert len(mask_nodes) == 1 and len(mask_nodes[0].users) == 2
    w, m = model.a.weight, model.a.weight_mask
    with torch.no_grad():
        w.copy_(torch.randn(8, 8))          # dense again: both uses must see w * m
        x = torch.randn(3, 8)
        expected = F.linear(torch.relu(F.linear(x, w * m, model.a.bias)), w * m, model.b.bias)
    torch.testing.assert_close(model(x), expected)


class SplitShared(nn.Module):
    """Two linears sharing a weight, one of them inside a part fx cannot trace."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.gate = Branchy()
        self.gate.fc.weight = self.a.weight

    def forward(self, x):
        return self.gate(self.a(x))


def test_weight_shared_across_separately_traced_parts_stays_dense():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = gf.sparsify(SplitShared(), gf.GraNetConfig(total_steps=10))
    layer, = gf.sparse_info(model).layers
    assert layer.mask_name is None and "separately traced" in layer.dense_reason
    assert any("a.weight stays dense" in str(w.message) for w in caught)


# Mixed dtypes and autocast ------------------------------------------------------------------


class MixedDtype(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 30)
        self.fc2 = nn.Linear(30, 10).to(torch.bfloat16)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)).to(torch.bfloat16)).float()


def test_global_pruning_across_a_bf16_and_an_fp32_layer():
    config = gf.GraNetConfig(method="gmp", final_sparsity=0.7, total_steps=4, prune_start=2, prune_end=2)
    model = gf.sparsify(MixedDtype(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    data = batches(2, (8, 20), 10)
    one_step(model, opt, *data[0])
    granet.step()
    one_step(model, opt, *data[1])
    # Reference in numpy float64: drop the 70% smallest |w| over both layers, ties by position.
    scores = np.concatenate([model.fc1.weight.detach().double().abs().numpy().ravel(),
                             model.fc2.weight.detach().double().abs().numpy().ravel()])
    keep = round(0.3 * scores.size)
    expected = np.ones(scores.size, dtype=bool)
    expected[np.argsort(scores, kind="stable")[: scores.size - keep]] = False
    assert granet.step()
    got = torch.cat([model.fc1.weight_mask.flatten(), model.fc2.weight_mask.flatten()]).numpy()
    assert (got == expected).all()
    assert model.fc2.weight.dtype == torch.bfloat16 and (model.fc2.weight[~model.fc2.weight_mask] == 0).all()


def test_bf16_autocast_training():
    config = gf.GraNetConfig(final_sparsity=0.8, total_steps=12, update_every=2, prune_end=8)
    model = gf.sparsify(MLP(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    granet = gf.GraNet(model, opt)
    updates = 0
    for x, y in batches(12, (16, 20), 10):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        updates += granet.step()
    assert updates == 5                     # steps 2, 4, 6, 8, 10
    assert model.fc1.weight.dtype == torch.float32 and model.fc1.weight.grad.dtype == torch.float32
    n = sum(m.numel() for m in granet.masks().values())
    assert sum(int(m.sum()) for m in granet.masks().values()) == round(0.2 * n)
    for w, m in ((model.fc1.weight, model.fc1.weight_mask), (model.fc2.weight, model.fc2.weight_mask)):
        assert (w[~m] == 0).all()
