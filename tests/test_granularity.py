"""Channel and N:M granularities: the pure selection functions and the controller, against references."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import granet_fx as gf
from granet_fx.criteria import channel_norms, nm_keep_largest, nm_refill, prune_channels, round_kept

from helpers import MLP, SmallCNN, batches, train


# Pure functions -------------------------------------------------------------------


def test_channel_norms_hand_worked():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]])
    assert channel_norms([a]).tolist() == [5.0, 0.0]
    # two layers make these channels: root mean square of the row norms, sqrt(25/2) and sqrt(9/2)
    assert torch.allclose(channel_norms([a, b]), torch.tensor([math.sqrt(12.5), math.sqrt(4.5)]))


@pytest.mark.parametrize("minimum", [None, [2, 3, 1], [9, 0, 2]])
def test_prune_channels_brute_force(minimum):
    g = torch.Generator().manual_seed(3)
    sizes, costs, budget = [5, 7, 4], [1, 2, 3], 14
    scores = [torch.rand(n, generator=g) for n in sizes]
    keeps = [torch.rand(n, generator=g) > 0.3 for n in sizes]
    got = prune_channels(scores, keeps, costs, budget, minimum)
    # Reference: each group's best max(1, minimum) active channels first (all of them if it has fewer),
    # then the other active ones by score, taken in that order while the running cost stays within the budget.
    entries = []
    for gi, (s, k) in enumerate(zip(scores, keeps)):
        active = [i for i in range(len(s)) if k[i]]
        floor = max(1, minimum[gi] if minimum else 1)
        best = sorted(active, key=lambda i: -s[i].item())[:floor]
        entries += [(0 if i in best else 1, -s[i].item(), gi, i) for i in active]
    kept, spent = set(), 0
    for forced, _, gi, i in sorted(entries):
        if spent + costs[gi] > budget and not forced == 0:
            break
        kept.add((gi, i))
        spent += costs[gi]
    expected = [[(gi, i) in kept for i in range(n)] for gi, n in enumerate(sizes)]
    assert [k.tolist() for k in got] == expected
    assert all(k.any() for k in got)


def test_prune_channels_floor_by_hand():
    scores = [torch.tensor([10.0, 9.0, 8.0, 7.0]), torch.tensor([1.0, 0.5, 0.2, 0.1])]
    keeps = [torch.ones(4, dtype=torch.bool)] * 2
    # budget 4: the global ranking leaves group 1 its best channel only
    assert [k.tolist() for k in prune_channels(scores, keeps, [1, 1], 4)] == [[True, True, True, False],
                                                                             [True, False, False, False]]
    # a floor of 2 in group 1: its two best, and the budget's rest to group 0's best
    assert [k.tolist() for k in prune_channels(scores, keeps, [1, 1], 4, [1, 2])] == [[True, True, False, False],
                                                                                     [True, True, False, False]]
    # a floor is taken among active channels only
    partial = [keeps[0], torch.tensor([False, True, False, False])]
    assert [k.tolist() for k in prune_channels(scores, partial, [1, 1], 4, [1, 3])] == [[True, True, True, False],
                                                                                       [False, True, False, False]]


def test_round_kept():
    score = torch.arange(10.0)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[9, 8, 7, 6, 5]] = True                  # 5 kept -> nearest multiple of 4 is 4: drop the weakest
    assert round_kept(score, keep, 4).nonzero().squeeze(1).tolist() == [6, 7, 8, 9]
    keep[4] = keep[3] = True                      # 7 kept -> 8: add the strongest of the others
    assert round_kept(score, keep, 4).nonzero().squeeze(1).tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    assert round_kept(score, torch.zeros(10, dtype=torch.bool) | (score == 9), 4).sum() == 4  # at least 4
    assert round_kept(score, keep, 16).all()      # never more than there are


def groups_of(a, m):
    """Reference grouping: for each output row and kernel position, consecutive runs of m inputs."""
    a = np.moveaxis(a, 1, -1)
    return a.reshape(-1, m)


def test_nm_keep_largest_brute_force():
    torch.manual_seed(0)
    w = torch.randn(3, 8, 2)
    mask = torch.rand(3, 8, 2) > 0.2
    got = nm_keep_largest(w.abs(), mask, 2, 4)
    for gw, gm, gg in zip(groups_of(w.abs().numpy(), 4), groups_of(mask.numpy(), 4), groups_of(got.numpy(), 4)):
        active = [i for i in np.argsort(-gw, kind="stable") if gm[i]][:2]
        assert set(np.flatnonzero(gg)) == set(active)


def test_nm_refill_brute_force():
    torch.manual_seed(1)
    score = torch.randn(4, 12)
    mask = nm_keep_largest(torch.rand(4, 12), torch.ones(4, 12, dtype=torch.bool), 1, 4)  # one per group
    got = nm_refill(score.abs(), mask, 2, 4)
    for gs, gm, gg in zip(groups_of(score.abs().numpy(), 4), groups_of(mask.numpy(), 4), groups_of(got.numpy(), 4)):
        grow = [i for i in np.argsort(-gs, kind="stable") if not gm[i]][:1]
        assert set(np.flatnonzero(gg)) == set(np.flatnonzero(gm)) | set(grow)


# Channel GraNet ----------------------------------------------------------------------


def one_step(model, opt, x, y):
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_channel_pruning_keeps_the_strongest_channels():
    x = torch.randn(4, 20)
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5,
                                                total_steps=1, prune_end=1), example_inputs=x)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    granet = gf.GraNet(model, opt)
    norms = model.fc1.weight.detach().norm(dim=1).numpy()
    assert granet.step()
    # fc1's 30 outputs are the only channels that can go (fc2's are the model output): keep the 15 largest,
    # by masking the columns of fc2 that read the others
    kept = np.sort(np.argsort(-norms, kind="stable")[:15])
    mask = model.fc2.weight_mask
    assert mask.all(0).nonzero().squeeze(1).tolist() == kept.tolist()
    assert (mask.all(0) | ~mask.any(0)).all(), "whole columns are kept or pruned"
    assert model.fc1.weight_mask.all()
    report = granet.report()
    # what still computes: 15 rows of fc1, 10 x 15 weights of fc2; FLOPs (15*20 + 10*15) / (30*20 + 10*30)
    assert report.layer_density == {"fc1.weight": 0.5, "fc2.weight": 0.5}
    assert report.inference_flops == pytest.approx((15 * 20 + 10 * 15) / (30 * 20 + 10 * 30))


def test_pruned_channels_are_read_by_nothing():
    x = torch.randn(8, 1, 12)
    model = gf.sparsify(SmallCNN(), gf.GraNetConfig(granularity="channel", final_sparsity=0.5, total_steps=8,
                                                    update_every=2, prune_end=4), example_inputs=x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(8, (8, 1, 12), 4))
    pruned = ~model.conv2.weight_mask.all(2).all(0)      # conv1's channels, as conv2 reads them
    assert pruned.any() and not pruned.all()
    assert (model.conv2.weight[:, pruned] == 0).all()
    assert (opt.state[model.conv2.weight]["momentum_buffer"][:, pruned] == 0).all()
    model.eval()
    before = model(x)
    with torch.no_grad():                                  # whatever the pruned channels compute
        model.conv1.weight[pruned] = torch.randn_like(model.conv1.weight[pruned])
        model.bn.bias[pruned] = 5.0
    assert torch.equal(model(x), before)


def test_channel_regrowth_drops_weakest_and_grows_largest_gradient():
    x, y = batches(1, (16, 20), 10)[0]
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", granularity="channel", final_sparsity=0.5,
                                                total_steps=100, update_every=1, regrow_fraction=0.3),
                        example_inputs=x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    granet = gf.GraNet(model, opt)
    before = model.fc2.weight_mask.all(0).numpy().copy()
    assert before.sum() == 15
    one_step(model, opt, x, y)
    norms = model.fc1.weight.detach().norm(dim=1).numpy()          # drop: the rows' norm
    grads = model.fc2.weight.grad.norm(dim=0).numpy()              # grow: the readers' dense gradient
    assert (grads[~before] > 0).all()
    assert granet.step()
    r = 0.3 / 2 * (1 + math.cos(math.pi * 1 / 75))
    n = math.ceil(r * 15)
    active = np.flatnonzero(before)
    after_drop = before.copy()
    after_drop[active[np.argsort(norms[active], kind="stable")[:n]]] = False
    candidates = np.flatnonzero(~after_drop)
    expected = after_drop.copy()
    expected[candidates[np.argsort(-grads[candidates], kind="stable")[:n]]] = True
    got = model.fc2.weight_mask.all(0).numpy()
    assert (got == expected).all() and got.sum() == 15
    grown = got & ~before
    assert grown.any() and (model.fc2.weight[:, grown] == 0).all(), "regrown columns start at zero"


def test_channel_masks_resume_from_the_state_dict():
    x = torch.randn(2, 1, 12)
    config = gf.GraNetConfig(granularity="channel", final_sparsity=0.5, total_steps=10)
    a = gf.sparsify(SmallCNN(), config, example_inputs=x)
    b = gf.sparsify(SmallCNN(), config, example_inputs=x)
    with torch.no_grad():
        a.conv2.weight_mask[:, :3] = False
    b.load_state_dict(a.state_dict())
    ga, gb = (gf.GraNet(m, torch.optim.SGD(m.parameters(), lr=0.1)) for m in (a, b))
    assert gb._structured.keeps()[0].tolist() == [False] * 3 + [True] * 5
    assert all(torch.equal(p, q) for p, q in zip(ga._structured.keeps(), gb._structured.keeps()))


def test_channel_granularity_needs_example_inputs():
    with pytest.raises(ValueError, match="example_inputs"):
        gf.sparsify(MLP(), gf.GraNetConfig(granularity="channel", total_steps=10))


def test_channel_multiple():
    x = torch.randn(2, 20)
    model = gf.sparsify(MLP((20, 32, 10)), gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.7,
                                                             total_steps=1, prune_end=1, channel_multiple=8),
                        example_inputs=x)
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0))
    granet.step()
    assert int(model.fc2.weight_mask.all(0).sum()) == 8  # 0.3 * 32 = 9.6 channels, rounded to a multiple of 8


@pytest.mark.parametrize("capability, multiple", [("AVX512", 16), ("AVX2", 8), ("DEFAULT", 8)])
def test_channel_multiple_auto_is_the_nchwc_block(monkeypatch, capability, multiple):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    x = torch.randn(2, 20)
    model = gf.sparsify(MLP((20, 64, 10)), gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.85,
                                                             total_steps=1, prune_end=1, channel_multiple="auto"),
                        example_inputs=x)
    gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0)).step()
    # 0.15 * 64 = 9.6 -> 10 channels: the nearest multiple of 8 is 8; of 16, the least multiple, 16
    assert int(model.fc2.weight_mask.all(0).sum()) == multiple


class ThreeLayers(torch.nn.Module):
    """20 -> 32 -> 32 -> 10: two groups of 32 removable channels (fc1's and fc2's outputs)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(20, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.mark.parametrize("floor, multiple, fc1_kept, fc2_kept", [
    (0.0, 1, 31, 1),     # fc2's weights are 100x smaller: the global ranking starves it
    (0.5, 1, 24, 8),     # half the density 0.5: 25 % of 32 = 8 channels
    (0.2, 1, 28, 4),     # 10 % of 32 = 3.2 channels, rounded up to 4
    (0.2, 8, 24, 8),     # 4, rounded up to the multiple of 8
    (1.0, 1, 16, 16),    # the whole density: every group keeps half, as scope="layer" would
    (None, 1, 24, 8),    # the default floor, 0.5
])
def test_channel_floor_keeps_a_starved_group_alive(floor, multiple, fc1_kept, fc2_kept):
    torch.manual_seed(0)
    model = ThreeLayers()
    with torch.no_grad():
        model.fc2.weight.mul_(0.01)
        model.fc2.bias.mul_(0.01)
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             channel_multiple=multiple, **({} if floor is None else {"channel_floor": floor}))
    model = gf.sparsify(model, config, example_inputs=torch.randn(2, 20))
    gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0)).step()
    # the channels kept are the columns that their readers keep
    assert int(model.fc2.weight_mask.all(0).sum()) == fc1_kept
    assert int(model.fc3.weight_mask.all(0).sum()) == fc2_kept


# N:M ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"granularity": "2:4", "final_sparsity": 0.9}, "final_sparsity=0.5"),
    ({"granularity": "4:2", "final_sparsity": 0.5}, "N < M"),
    ({"granularity": "0:4", "final_sparsity": 1.0}, "N < M"),
    ({"channel_multiple": 0}, "channel_multiple"),
    ({"channel_multiple": "fast"}, "channel_multiple must be an integer >= 1, 'auto' or 'measured'"),
    ({"channel_multiple": True}, "channel_multiple must be an integer >= 1, 'auto' or 'measured'"),
    ({"channel_floor": -0.1}, "channel_floor must be a number in"),
    ({"channel_floor": 1.5}, "channel_floor must be a number in"),
    ({"channel_floor": "0.1"}, "channel_floor must be a number in"),
    ({"channel_floor": True}, "channel_floor must be a number in"),
])
def test_structured_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gf.GraNetConfig(total_steps=10, **kwargs)


def test_nm_needs_inputs_divisible_by_m():
    with pytest.raises(ValueError, match=r"fc1.weight has 20 inputs, not a multiple of 8.*exclude=\('fc1',\)"):
        gf.sparsify(MLP(), gf.GraNetConfig(granularity="1:8", final_sparsity=0.875, total_steps=10))


def test_nm_follows_the_schedule_group_by_group():
    model = gf.sparsify(MLP((16, 8, 4)), gf.GraNetConfig(method="gmp", granularity="2:4", final_sparsity=0.5,
                                                          total_steps=8, prune_end=4, update_every=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    granet = gf.GraNet(model, opt)
    data = batches(4, (8, 16), 4)
    train(model, opt, granet, data[:2])
    # step 2: s = 0.5 - 0.5 * (1 - 2/4)^3 = 0.4375 -> round(4 * 0.5625) = 2 per group already
    counts = groups_of(model.fc1.weight_mask.numpy(), 4).sum(1)
    assert (counts == 2).all()
    train(model, opt, granet, data[2:])
    for layer in (model.fc1, model.fc2):
        m = layer.weight_mask.numpy()
        assert (groups_of(m, 4).sum(1) == 2).all()
        assert (layer.weight.detach().numpy()[~m] == 0).all()


def test_nm_prune_keeps_the_largest_in_each_group():
    model = gf.sparsify(MLP((8, 8, 4)), gf.GraNetConfig(method="gmp", granularity="1:4", final_sparsity=0.75,
                                                         total_steps=1, prune_end=1))
    w = model.fc1.weight.detach().abs().numpy().copy()
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0))
    granet.step()
    for gw, gm in zip(groups_of(w, 4), groups_of(model.fc1.weight_mask.numpy(), 4)):
        assert np.flatnonzero(gm).tolist() == [int(np.argmax(gw))]


def test_nm_regrowth_keeps_the_pattern_and_count():
    x, y = batches(1, (16, 16), 4)[0]
    model = gf.sparsify(MLP((16, 8, 4)), gf.GraNetConfig(method="rigl", granularity="2:4", final_sparsity=0.5,
                                                          total_steps=100, update_every=1, regrow_fraction=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    before = model.fc1.weight_mask.clone()
    one_step(model, opt, x, y)
    assert granet.step()
    after = model.fc1.weight_mask
    assert (groups_of(after.numpy(), 4).sum(1) == 2).all()
    assert not torch.equal(before, after)


@pytest.mark.slow
@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_structured_masks_change_without_recompiling(granularity):
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(8, 1, 12)
    config = gf.GraNetConfig(granularity=granularity, final_sparsity=0.5, total_steps=16, update_every=2,
                             prune_end=8, exclude=("conv1",))
    model = gf.sparsify(SmallCNN(), config, example_inputs=x[:1])
    model.drop.p = 0.0
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(model, opt)
    step_fn = torch.compile(model)
    masks = []
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(0, 16, 4):
            train(model, opt, granet, batches(4, (8, 1, 12), 4, seed=i), forward=step_fn)
            masks.append(granet.masks())
    assert any(not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(masks, masks[1:]))
    model.eval()
    assert torch.allclose(step_fn(x), model(x), atol=1e-5)


def test_channel_granularity_without_removable_channels_warns_and_trains():
    """A single Linear: its channels reach the output, so none can go; the model stays dense."""
    model = torch.nn.Linear(6, 4)
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=2, prune_end=2,
                             update_every=1)
    with pytest.warns(UserWarning, match="found no channel that can be removed.*reaches the model output"):
        sparse = gf.sparsify(model, config, example_inputs=(torch.randn(3, 6),))
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1)
    granet = gf.GraNet(sparse, optimizer)
    train(sparse, optimizer, granet, [(torch.randn(3, 6), torch.randint(0, 4, (3,))) for _ in range(2)])
    assert granet.report().global_sparsity == 0.0
