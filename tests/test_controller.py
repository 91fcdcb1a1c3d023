"""The controller: pruning, regrowth, optimizer state, final sparsity, FLOPs and resume."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import granet_fx as gf

from helpers import MLP, SmallCNN, batches, train


def one_step(model, optimizer, x, y):
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def masked_weights(model):
    return {l.name: (model.get_parameter(l.name), model.get_buffer(l.mask_name)) for l in gf.sparse_info(model).masked}


def test_global_pruning_keeps_the_largest_magnitudes_over_all_layers():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="gmp", final_sparsity=0.8, total_steps=10,
                                                prune_end=10, update_every=5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    data = batches(5, (16, 20), 10)
    train(model, opt, granet, data[:4])
    assert granet.report().global_sparsity == 0.0
    one_step(model, opt, *data[4])
    # Reference: plain torch top-k over |w| of all layers together, target 0.8 - 0.8 * 0.5**3 = 0.7.
    layers = masked_weights(model)
    flat = torch.cat([w.detach().abs().flatten() for w, _ in layers.values()])
    keep = round(0.3 * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.topk(flat, keep).indices] = True
    assert granet.step()
    got = torch.cat([m.flatten() for _, m in layers.values()])
    assert int(got.sum()) == keep
    assert torch.equal(got, expected)
    for w, m in layers.values():
        assert (w[~m] == 0).all()


def test_layer_scope_prunes_each_layer_to_its_own_target():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="gmp", final_sparsity=0.6, total_steps=4, prune_start=2,
                                                prune_end=2, update_every=1, scope="layer", distribution="uniform"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(2, (8, 20), 10))
    # one-shot at step 2: each layer keeps round(0.4 * numel) of its largest weights
    for name, (w, m) in masked_weights(model).items():
        assert int(m.sum()) == round(0.4 * m.numel()), name


def test_regrowth_drops_smallest_and_grows_largest_gradient():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", final_sparsity=0.7, total_steps=100,
                                                update_every=1, regrow_fraction=0.3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    granet = gf.GraNet(model, opt)
    x, y = batches(1, (16, 20), 10)[0]
    one_step(model, opt, x, y)
    layers = masked_weights(model)
    before = {}
    for name, (w, m) in layers.items():
        assert (w.grad[~m] != 0).any(), "the gradient of pruned weights must be dense"
        # what granet sees: weights masked again after the optimizer step
        before[name] = ((w.detach() * m).numpy().ravel(), m.numpy().ravel().copy(), w.grad.abs().numpy().ravel())
    r = 0.3 / 2 * (1 + math.cos(math.pi * 1 / 75))   # RigL's cosine at step 1 of 100
    assert granet.step()
    for name, (w, m) in layers.items():
        wv, mv, gv = before[name]
        n = math.ceil(r * mv.sum())
        active = np.flatnonzero(mv)
        dropped = active[np.argsort(np.abs(wv[active]), kind="stable")[:n]]
        after_drop = mv.copy()
        after_drop[dropped] = False
        candidates = np.flatnonzero(~after_drop)
        grown = candidates[np.argsort(-gv[candidates], kind="stable")[:n]]
        expected = after_drop.copy()
        expected[grown] = True
        got = m.numpy().ravel()
        assert got.sum() == mv.sum(), "regrowth keeps each layer's count"
        assert (got == expected).all()
        new = got & ~mv
        assert new.any()
        assert (w.detach().numpy().ravel()[new] == 0).all(), "regrown weights start at zero"
        momentum = opt.state[w]["momentum_buffer"].numpy().ravel()
        assert (momentum[new] == 0).all() and (momentum[~got] == 0).all()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    lambda p: torch.optim.Adam(p, lr=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
])
def test_pruned_weights_and_optimizer_state_are_zero_after_every_step(make_opt):
    model = gf.sparsify(SmallCNN(), gf.GraNetConfig(final_sparsity=0.8, total_steps=12, update_every=3))
    opt = make_opt(model.parameters())
    granet = gf.GraNet(model, opt)
    for x, y in batches(12, (8, 1, 12), 4):
        one_step(model, opt, x, y)
        granet.step()
        for w, m in masked_weights(model).values():
            assert (w[~m] == 0).all()
            shaped = [v for v in opt.state[w].values() if torch.is_tensor(v) and v.shape == w.shape]
            assert shaped
            for v in shaped:
                assert (v[~m] == 0).all()
    assert granet.report().global_sparsity > 0.5


@pytest.mark.parametrize("method, initial", [("granet", 0.0), ("granet", 0.5), ("gmp", 0.0), ("rigl", 0.0),
                                             ("set", 0.0), ("static", 0.0)])
def test_final_sparsity_within_one_weight(method, initial):
    final = 0.9
    config = gf.GraNetConfig(method=method, final_sparsity=final, initial_sparsity=initial, total_steps=40,
                             update_every=5, prune_end=30)
    model = gf.sparsify(SmallCNN(), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(40, (8, 1, 12), 4))
    report = granet.report()
    n = sum(l.numel for l in report.layers)
    active = sum(l.active for l in report.layers)
    assert abs(active - (1 - final) * n) <= 1
    assert abs(report.global_sparsity - final) <= 1 / n
    for w, m in masked_weights(model).values():
        assert (w[~m] == 0).all()


def test_dense_method_has_no_masks():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="dense"), example_inputs=torch.randn(2, 20))
    assert not any(k.endswith("_mask") for k in model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(3, (4, 20), 10))
    assert granet.report().inference_flops == 1.0


def test_flops_against_hand_count():
    # fc1 8->4 and fc2 4->2 on a batch of 3: 3*4*8 = 96 and 3*2*4 = 24 multiply-accumulates.
    model = gf.sparsify(MLP((8, 4, 2)), gf.GraNetConfig(method="gmp", final_sparsity=0.5, total_steps=4,
                                                         prune_start=2, prune_end=2, update_every=1,
                                                         scope="layer", distribution="uniform", exclude=("fc2",)),
                        example_inputs=torch.randn(3, 8))
    assert [l.macs for l in gf.sparse_info(model).layers] == [96, 24]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(4, (3, 8), 2))
    report = granet.report()
    assert report.layer_density == {"fc1.weight": 0.5, "fc2.weight": 1.0}
    sparse = (96 * 0.5 + 24) / 120
    assert report.inference_flops == pytest.approx(sparse)
    # steps 1 and 2 ran dense, steps 3 and 4 sparse
    assert report.training_flops == pytest.approx((1 + 1 + sparse + sparse) / 4)
    text = str(report)
    assert "fc1.weight" in text and "0.5000" in text and "(dense)" in text


def test_non_finite_gradient_skips_the_update():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", final_sparsity=0.5, total_steps=10, update_every=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    granet = gf.GraNet(model, opt)
    x, y = batches(1, (4, 20), 10)[0]
    one_step(model, opt, x, y)
    model.fc1.weight.grad[0, 0] = float("nan")
    before = granet.masks()
    with pytest.warns(UserWarning, match="non-finite"):
        assert not granet.step()
    assert all(torch.equal(before[k], v) for k, v in granet.masks().items())


def _run(model, opt, granet, data):
    return train(model, opt, granet, data)


def test_resume_continues_to_the_same_masks(tmp_path):
    config = gf.GraNetConfig(method="set", final_sparsity=0.8, total_steps=30, update_every=4)
    data = batches(30, (8, 1, 12), 4)

    def fresh():
        torch.manual_seed(5)
        model = gf.sparsify(SmallCNN(), config)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, gf.GraNet(model, opt)

    model, opt, granet = fresh()
    _run(model, opt, granet, data)
    straight = granet.masks()
    straight_weights = copy.deepcopy(model.state_dict())

    model, opt, granet = fresh()
    _run(model, opt, granet, data[:13])
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "granet": granet.state_dict(),
                "rng": torch.get_rng_state()}, path)  # dropout draws from the global generator
    del model, opt, granet

    model, opt, granet = fresh()
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    granet.load_state_dict(ckpt["granet"])
    torch.set_rng_state(ckpt["rng"])
    assert granet.step_count == 13
    _run(model, opt, granet, data[13:])
    resumed = granet.masks()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    for k, v in model.state_dict().items():
        assert torch.allclose(v.float(), straight_weights[k].float())


def test_resume_with_another_config_is_refused():
    a = gf.sparsify(MLP(), gf.GraNetConfig(final_sparsity=0.8, total_steps=30))
    b = gf.sparsify(MLP(), gf.GraNetConfig(final_sparsity=0.9, total_steps=30))
    ga = gf.GraNet(a, torch.optim.SGD(a.parameters(), lr=0.1))
    gb = gf.GraNet(b, torch.optim.SGD(b.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="final_sparsity"):
        gb.load_state_dict(ga.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("two_masks", [False, True])
@pytest.mark.parametrize("dest", [None, "mask", "other"])      # the new mask copied: over the first one too
def test_remasking_writes_zero_bit_for_bit_like_masked_fill(dtype, compiled, two_masks, dest, monkeypatch):
    from granet_fx import controller, native
    if compiled and native.kernel() is None:
        pytest.skip("no C compiler builds granet_fx/native here")
    if not compiled:
        monkeypatch.setattr(native, "can_zero", lambda *a: False)
    monkeypatch.setattr(controller, "_SLICE", 1000)      # several slices
    monkeypatch.setattr(native, "SPAN", 1000)            # several jobs on the threads
    g = torch.Generator().manual_seed(0)
    w = torch.randn(70, 90, generator=g).to(dtype)
    w[0, :5] = torch.tensor([float("nan"), float("inf"), -0.0, -1.0, 2.0])
    state = torch.randn(70, 90, generator=g)
    strided = torch.randn(90, 70, generator=g).t()           # not contiguous: masked_fill_ itself
    mask = torch.rand(70, 90, generator=g) < 0.3
    mask[0, :3] = False
    also = torch.rand(70, 90, generator=g) < 0.7 if two_masks else None
    kept = mask & also if two_masks else mask
    expected = [t.masked_fill(~kept, 0) for t in (w, state, strided)]
    new = (also if two_masks else mask).clone()
    target = {None: None, "mask": mask, "other": torch.zeros_like(mask)}[dest]
    controller._zero_where_not([w, state, strided], mask, also, target)
    if target is not None:
        assert torch.equal(target, new)
    for got, want in zip((w, state, strided), expected):
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))  # bits: +0.0


@pytest.mark.parametrize("method", ["granet", "rigl"])
def test_compiled_update_and_the_layer_loop_give_the_same_masks_weights_and_momentum(method, monkeypatch):
    # Updates that prune and regrow (granet) and that only regrow (rigl): all layers in native.regrow's one
    # call, some of them left to the loop of _update (as a layer whose k-th key is NaN is), and the eager
    # passes throughout; masks, weights and momentum the same bit for bit after every step.
    from granet_fx import native

    config = gf.GraNetConfig(method=method, final_sparsity=0.8, total_steps=24, update_every=3, prune_end=15)
    data = batches(24, (8, 1, 12), 4)
    real, calls = native.regrow, []

    def run(path):
        torch.manual_seed(3)
        model = gf.sparsify(SmallCNN(), config)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        granet = gf.GraNet(model, opt)
        states = []
        with monkeypatch.context() as m:
            if path == "eager":
                m.setattr(native, "eligible", lambda *a: False)
                m.setattr(native, "can_zero", lambda *a: False)
            elif path == "some":        # every other layer reported as not done, left as it was
                def some(layers, sample_above):
                    done = real(layers[::2], sample_above)
                    return [done[u // 2] if u % 2 == 0 else False for u in range(len(layers))]
                m.setattr(native, "regrow", some)
            else:
                m.setattr(native, "regrow", lambda *a: calls.append(1) or real(*a))
            for x, y in data:
                one_step(model, opt, x, y)
                granet.step()
                states.append([t.clone() for t in model.state_dict().values()]
                              + [v["momentum_buffer"].clone() for v in opt.state.values()])
        return states

    whole, some, eager = run("whole"), run("some"), run("eager")
    # one call an update: steps 3, 6, ..., 21 (GraNet regrows at each); RigL's stop at 3/4 of the steps (18)
    assert len(calls) == (7 if method == "granet" else 5)
    for a, b, c in zip(whole, some, eager):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
