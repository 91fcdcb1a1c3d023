"""The fx pass: where mask nodes go, what stays the same, and which inputs are refused."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes import is_mask_node

from helpers import MLP, Block, Net, SmallCNN


def cfg(**kw):
    kw.setdefault("total_steps", 100)
    return gf.GraNetConfig(**kw)


def test_mask_nodes_feed_every_conv_and_linear():
    model = gf.sparsify(SmallCNN(), cfg())
    assert "mask_weight" in model.code
    masked_ops = [
        n for n in model.graph.nodes
        if n.op == "call_function" and any(isinstance(a, torch.fx.Node) and is_mask_node(a) for a in n.args)
    ]
    assert [n.target.__name__ for n in masked_ops] == ["conv1d", "conv1d", "linear"]


def test_state_dict_keys_are_original_plus_bool_masks():
    original = SmallCNN()
    keys = list(original.state_dict())
    model = gf.sparsify(original, cfg())
    sd = model.state_dict()
    assert [k for k in sd if not k.endswith("_mask")] == keys
    masks = {k: v for k, v in sd.items() if k.endswith("_mask")}
    assert set(masks) == {"conv1.weight_mask", "conv2.weight_mask", "fc.weight_mask"}
    for k, m in masks.items():
        assert m.dtype == torch.bool and m.element_size() == 1
        assert m.shape == sd[k[: -len("_mask")]].shape


def test_dense_to_sparse_starts_dense_and_computes_the_same():
    original = SmallCNN()
    reference = copy.deepcopy(original)
    model = gf.sparsify(original, cfg(initial_sparsity=0.0))
    x = torch.randn(4, 1, 12)
    # Train mode: dropout draws the same numbers, batch norm updates the same statistics.
    torch.manual_seed(3)
    a = reference(x)
    torch.manual_seed(3)
    b = model(x)
    assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(reference.bn.running_mean, model.bn.running_mean)
    reference.eval()
    model.eval()
    assert torch.allclose(reference(x), model(x), atol=1e-6)
    assert torch.equal(model(x), model(x))


def test_initial_masks_follow_erk_with_exact_counts():
    model = gf.sparsify(SmallCNN(), cfg(method="granet", initial_sparsity=0.5, final_sparsity=0.9))
    # Hand-worked ERK at density 0.5 for 8x1x5 (40), 16x8x3 (384), 4x16 (64), N = 488:
    # raw*numel = sum(shape) = 14, 27, 20; eps = 244/61 = 4 puts conv1 (14/40*4 = 1.4) above 1,
    # so conv1 is dense; eps = 204/47 then puts fc (20/64*4.34 = 1.36) above 1, so fc is dense;
    # conv2 keeps the rest: 244 - 40 - 64 = 140.
    expected = {"conv1.weight": 40, "conv2.weight": 140, "fc.weight": 64}
    counts = {k[: -len("_mask")]: int(v.sum()) for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert counts == expected
    # the pruned weights are exactly zero already
    for name, p in model.named_parameters():
        if name.endswith("weight") and name + "_mask" in model.state_dict():
            assert (p[~model.get_buffer(name + "_mask")] == 0).all()


def test_exclude_keeps_layers_dense():
    model = gf.sparsify(SmallCNN(), cfg(initial_sparsity=0.5, final_sparsity=0.9, exclude=("conv1", "f*")))
    info = gf.sparse_info(model)
    dense = {l.name for l in info.layers if l.mask_name is None}
    assert dense == {"conv1.weight", "fc.weight"}
    assert "conv1.weight_mask" not in model.state_dict()


class Gate(nn.Module):
    """Data-dependent control flow: symbolic tracing fails here."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class ModeDependent(nn.Module):
    """Functional dropout reading self.training: a single trace would freeze one mode."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5, training=self.training)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.gate = Gate()
        self.md = ModeDependent()
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.md(self.gate(self.inp(x)))
        return self.out(self.enc(h.unsqueeze(1)).squeeze(1))


def test_piecewise_tracing_masks_every_linear():
    original = Mixed()
    linears = {n + ".weight" for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    linears.add("enc.self_attn.in_proj_weight")   # read by nn.MultiheadAttention's code: found by running it
    keys = set(original.state_dict())
    reference = copy.deepcopy(original).eval()
    model = gf.sparsify(original, cfg(), example_inputs=torch.randn(3, 4))
    masked = {l.name for l in gf.sparse_info(model).masked}
    assert masked == linears
    assert set(model.state_dict()) == keys | {n + "_mask" for n in linears}
    assert "mask_weight" in model.code  # the root traced, with gate/md/enc as leaves
    assert "mask_weight" in model.gate.a.code and "mask_weight" in model.enc.linear1.code
    model.eval()
    x = torch.randn(5, 4)
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    # the mode-dependent dropout still follows train/eval
    model.train()
    torch.manual_seed(0)
    y1 = model(x)
    torch.manual_seed(1)
    y2 = model(x)
    assert not torch.allclose(y1, y2)


def test_tied_weight_with_embedding_stays_dense():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mid = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(torch.relu(self.mid(self.emb(idx))))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = gf.sparsify(Tied(), cfg(initial_sparsity=0.5, final_sparsity=0.8))
    assert any("stays dense" in str(w.message) for w in caught)
    info = {l.name: l for l in gf.sparse_info(model).layers}
    assert info["emb.weight"].mask_name is None
    assert info["mid.weight"].mask_name == "mid.weight_mask"


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"final_sparsity": 1.0}, "final_sparsity"),
        ({"final_sparsity": -0.1}, "final_sparsity"),
        ({"initial_sparsity": 1.2}, "initial_sparsity"),
        ({"initial_sparsity": 0.95, "final_sparsity": 0.9}, "initial_sparsity"),
        ({"update_every": 0}, "update_every"),
        ({"prune_end": 200}, "prune_end"),
        ({"method": "magic"}, "method"),
        ({"distribution": "normal"}, "distribution"),
        ({"scope": "model"}, "scope"),
        ({"granularity": "3:2"}, "granularity"),
        ({"granularity": "2:4"}, "granularity"),
        ({"granularity": "blocks"}, "granularity"),
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 2.5}, "total_steps"),
        ({"regrow_fraction": 1.5}, "regrow_fraction"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        cfg(**kwargs)


def test_sparsify_without_config_uses_the_defaults_and_the_controller_gives_total_steps():
    model = gf.sparsify(MLP())
    info = gf.sparse_info(model)
    assert (info.config.method, info.config.final_sparsity, info.config.total_steps) == ("granet", 0.9, None)
    assert [l.name for l in info.masked] == ["fc1.weight", "fc2.weight"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt, total_steps=40)
    assert granet.config.total_steps == 40 and granet.report().total_steps == 40
    # GraNet's default schedule: prune from step 0 to total_steps // 2 = 20, every 100 steps -> at step 20 only
    assert granet.target_sparsity(20) == pytest.approx(0.9)
    x, y = torch.randn(8, 20), torch.randint(0, 10, (8,))
    for _ in range(20):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        granet.step()
    total = 20 * 30 + 30 * 10
    assert granet.report().global_sparsity == pytest.approx(0.9, abs=1 / total)


def test_total_steps_missing_everywhere_is_a_clear_error_naming_both_ways():
    model = gf.sparsify(MLP(), gf.GraNetConfig(method="rigl", final_sparsity=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"total_steps is required.*GraNetConfig\(total_steps=T\).*"
                                         r"GraNet\(model, optimizer, total_steps=T\)"):
        gf.GraNet(model, opt)


def test_total_steps_given_twice_must_agree_and_is_validated():
    model = gf.sparsify(MLP(), cfg(total_steps=100))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert gf.GraNet(model, opt, total_steps=100).config.total_steps == 100
    with pytest.raises(ValueError, match="total_steps is given twice"):
        gf.GraNet(model, opt, total_steps=50)
    other = gf.sparsify(MLP(), gf.GraNetConfig(prune_end=30))
    with pytest.raises(ValueError, match="prune_end"):
        gf.GraNet(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=20)
    with pytest.raises(ValueError, match="total_steps"):
        gf.GraNet(other, torch.optim.SGD(other.parameters(), lr=0.1), total_steps=0)


def test_methods_without_a_schedule_need_no_total_steps():
    for method in ("static", "dense"):
        model = gf.sparsify(MLP(), gf.GraNetConfig(method=method, final_sparsity=0.5))
        granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.1))
        assert not granet.step()


def test_bad_config_mutated_later_is_caught_by_sparsify():
    config = cfg()
    config.final_sparsity = 1.5
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="final_sparsity"):
        gf.sparsify(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_allowed_values_are_listed():
    with pytest.raises(ValueError, match="'granet', 'gmp', 'fggp', 'rigl', 'set', 'static', 'dense'"):
        cfg(method="GraNet!")


def test_model_without_prunable_layer():
    with pytest.raises(ValueError, match="no prunable layer"):
        gf.sparsify(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), cfg())


def test_sparsify_twice_is_refused():
    model = gf.sparsify(MLP(), cfg())
    with pytest.raises(ValueError, match="already sparsified"):
        gf.sparsify(model, cfg())


def test_controller_needs_a_sparsified_model():
    model = MLP()
    with pytest.raises(ValueError, match="sparsify"):
        gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_deepcopy_and_whole_model_pickle_keep_a_working_sparse_model(tmp_path):
    model = gf.sparsify(SmallCNN(), cfg(initial_sparsity=0.5, final_sparsity=0.8))
    copied = copy.deepcopy(model)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    x = torch.randn(3, 1, 12)
    model.eval()
    for other in (copied, loaded):
        other.eval()
        assert torch.equal(other(x), model(x))
        assert [l.name for l in gf.sparse_info(other).masked] == ["conv1.weight", "conv2.weight", "fc.weight"]
        gf.GraNet(other, torch.optim.SGD(other.parameters(), lr=0.1))  # the controller accepts the copy


def test_keep_modules_stay_module_calls_and_are_still_masked():
    torch.manual_seed(0)
    original = Net()
    x = torch.randn(4, 12)
    expected = original(x)
    model = gf.sparsify(original, gf.GraNetConfig(total_steps=10, initial_sparsity=0.0), keep_modules=[Block])
    calls = [n.target for n in model.graph.nodes if n.op == "call_module"]
    assert calls == ["blocks.0", "blocks.1"]
    masks = sorted(n for n, _ in model.named_buffers() if n.endswith("_mask"))
    assert masks == sorted(f"{m}.weight_mask" for m in
                           ["inp", "out", "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"])
    torch.testing.assert_close(model(x), expected)
    by_name = gf.sparsify(Net(), gf.GraNetConfig(total_steps=10), keep_modules=["blocks.1"])
    assert [n.target for n in by_name.graph.nodes if n.op == "call_module"] == ["blocks.1"]


def test_keep_modules_names_what_is_wrong():
    with pytest.raises(ValueError, match="does not have: blocks.7"):
        gf.sparsify(MLP(), gf.GraNetConfig(total_steps=10), keep_modules=["blocks.7"])
    with pytest.raises(TypeError, match="module classes or module names"):
        gf.sparsify(MLP(), gf.GraNetConfig(total_steps=10), keep_modules=[3])
