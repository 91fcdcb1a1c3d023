"""Which weights get a mask: linear subclasses with their own forward, raw matmul-family ops,
parametrized weights, mixture-of-experts stacks (traced, or read by code fx cannot trace), and
the one warning about the weights that stay dense. Checked against plain-torch references."""

import copy
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes import is_mask_node

from helpers import sparsify_warned


def static(sparsity=0.5, **kw):
    """Random masks at ``sparsity`` that stay put: the masks to check the forward pass with."""
    return gf.GraNetConfig(method="static", final_sparsity=sparsity, distribution="uniform", **kw)


def masks_of(model):
    """Mask buffers by the name of their weight (the state_dict naming: ``<weight>_mask``)."""
    sd = model.state_dict()
    return {k[: -len("_mask")]: v for k, v in sd.items() if k.endswith("_mask")}


def check_masks_act(sparse, reference, inputs, out=lambda y: y):
    """With dense weights put back, the sparse model must compute what ``reference`` computes with
    each weight zeroed where its mask is: only then does every mask sit on every path."""
    masks = masks_of(sparse)
    assert masks and all(not m.all() for m in masks.values())
    sparse.load_state_dict(reference.state_dict(), strict=False)
    assert all((sparse.get_parameter(n)[~m] != 0).any() for n, m in masks.items())
    sparse.eval()
    reference.eval()
    with torch.no_grad():
        dense_out = out(reference(*inputs))
        for n, m in masks.items():
            reference.get_parameter(n).mul_(m)
        want = out(reference(*inputs))
        got = out(sparse(*inputs))
    torch.testing.assert_close(got, want)
    assert (got - dense_out).abs().max() > 1e-4 * want.abs().max()


# Hand-written modules ----------------------------------------------------------------------------


class TransposedLinear(nn.Linear):
    """Falcon's FalconLinear: an nn.Linear whose own forward computes ``x @ self.weight.T``."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class RawOps(nn.Module):
    """Raw parameters read by matmul-family ops, some through views."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(6, 8))        # torch.matmul(x, a): (in, out)
        self.b = nn.Parameter(torch.randn(3, 8, 2))     # torch.bmm(x, b): one matrix per group
        self.c = nn.Parameter(torch.randn(5, 6))        # einsum "bi,oi->bo": (out, in)
        self.d = nn.Parameter(torch.randn(4, 6))        # x.mm(d.t())
        self.scale = nn.Parameter(torch.randn(1, 6))    # read by mul: not a weight

    def forward(self, x):
        h = torch.matmul(x * self.scale, self.a)                               # (n, 8)
        g = torch.bmm(h.view(1, -1, 8).expand(3, -1, -1), self.b).sum(0)       # (n, 2)
        e = torch.einsum("bi,oi->bo", x, self.c)                               # (n, 5)
        d = x.mm(self.d.t())                                                   # (n, 4)
        return torch.cat([g, e, d], dim=1)


def test_linear_subclass_with_its_own_forward_is_masked():
    model = nn.Sequential(TransposedLinear(6, 5), nn.ReLU(), TransposedLinear(5, 3))
    reference = copy.deepcopy(model)
    sparse = gf.sparsify(model, static())
    assert set(masks_of(sparse)) == {"0.weight", "2.weight"}
    # the mask node sits between the weight and its transpose
    for node in sparse.graph.nodes:
        if is_mask_node(node):
            assert [u.op + ":" + str(u.args[1] if len(u.args) > 1 else "") for u in node.users] == ["call_function:T"]
    check_masks_act(sparse, reference, (torch.randn(4, 6),))


def test_raw_matmul_family_weights_are_masked_and_counted():
    model = RawOps()
    reference = copy.deepcopy(model)
    x = torch.randn(4, 6)
    sparse, warned = sparsify_warned(model, static(), example_inputs=x)
    assert set(masks_of(sparse)) == {"a", "b", "c", "d"}
    kinds = {l.name: l.kind for l in gf.sparse_info(sparse).layers}
    assert kinds == {"a": "matmul", "b": "bmm", "c": "einsum", "d": "mm"}
    # multiply-accumulates, by hand for 4 rows: matmul 4*8 outputs of 6 inputs; bmm 3 groups of
    # 4*2 outputs of 8 inputs; einsum 4*5 outputs of 6; mm 4*4 outputs of 6
    macs = {l.name: l.macs for l in gf.sparse_info(sparse).layers}
    assert macs == {"a": 4 * 8 * 6, "b": 3 * 4 * 2 * 8, "c": 4 * 5 * 6, "d": 4 * 4 * 6}
    # the 3-D weight of bmm is a stack: one unit per matrix
    assert gf.sparse_info(sparse).layers[1].experts == 3
    assert len(warned) == 1 and "scale stays dense: not a conv/linear/matmul weight (read by mul)" in warned[0]
    check_masks_act(sparse, reference, (x,))


class OtherLayers(nn.Module):
    """A transposed conv, a bilinear layer and a matrix-vector product."""

    def __init__(self):
        super().__init__()
        self.ct = nn.ConvTranspose1d(4, 6, 3, stride=2, groups=2)
        self.bl = nn.Bilinear(6, 6, 3)
        self.v = nn.Parameter(torch.randn(3, 6))

    def forward(self, x):
        h = self.ct(x).mean(-1)
        return self.bl(h, h) + torch.mv(self.v, h[0])


def test_transposed_conv_bilinear_and_mv_weights_are_masked_and_counted():
    model = OtherLayers()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 4, 5)
    sparse = gf.sparsify(model, static(), example_inputs=x)
    layers = {l.name: (l.kind, l.experts, l.macs) for l in gf.sparse_info(sparse).layers}
    # by hand: each of the 2*4*5 inputs feeds 6/2 channels x 3 taps; 2*3 bilinear outputs of 6*6
    # products; 3 outputs of 6 for mv. The 3-D bilinear weight is one layer, not a stack.
    assert layers == {"ct.weight": ("conv_transpose1d", 0, 40 * 3 * 3), "bl.weight": ("bilinear", 0, 6 * 36),
                      "v": ("mv", 0, 3 * 6)}
    check_masks_act(sparse, reference, (x,))


def test_attention_projections_are_found_by_running_and_masked_on_both_paths():
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 4)
    sparse, warned = sparsify_warned(model, static(), example_inputs=x)
    attention = {l.name: l.macs for l in gf.sparse_info(sparse).layers if "self_attn" in l.name}
    # 6 tokens: the packed q/k/v projection 24x8, the output projection 8x8
    assert attention == {"1.self_attn.in_proj_weight": 6 * 24 * 8, "1.self_attn.out_proj.weight": 6 * 8 * 8}
    assert not warned
    check_masks_act(sparse, reference, (x,))          # eval, no grad: nn.MultiheadAttention's fused path
    sparse.train()
    with torch.no_grad():
        reference.train()
        torch.testing.assert_close(sparse(x), reference(x))   # (reference holds w * m by now)


def test_gradient_reaches_masked_weights_densely():
    model = nn.Sequential(TransposedLinear(6, 5), nn.Tanh(), TransposedLinear(5, 3))
    sparse = gf.sparsify(model, static(0.6))
    x = torch.randn(7, 6)
    sparse(x).square().sum().backward()
    # plain torch: the same loss with the masked weights as leaves
    w0 = (sparse.get_parameter("0.weight") * sparse.get_buffer("0.weight_mask")).detach().requires_grad_()
    w2 = (sparse.get_parameter("2.weight") * sparse.get_buffer("2.weight_mask")).detach().requires_grad_()
    b0, b2 = sparse.get_parameter("0.bias"), sparse.get_parameter("2.bias")
    (torch.tanh(x @ w0.T + b0) @ w2.T + b2).square().sum().backward()
    for name, w in (("0.weight", w0), ("2.weight", w2)):
        grad, mask = sparse.get_parameter(name).grad, sparse.get_buffer(name + "_mask")
        torch.testing.assert_close(grad, w.grad)     # the dense gradient, pruned entries included
        assert (grad[~mask] != 0).any(), "pruned weights need their gradient for regrowth"


class WeightNormConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.parametrizations.weight_norm(nn.Conv1d(4, 6, 3, padding=1, groups=2), dim=2)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(F.gelu(self.conv(x)).mean(-1))


def test_weight_norm_conv_is_masked_on_its_direction_and_folds_exactly():
    model = WeightNormConv()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 4, 10)
    sparse, warned = sparsify_warned(model, static(), example_inputs=x)
    v = "conv.parametrizations.weight.original1"
    assert set(masks_of(sparse)) == {v, "fc.weight"}
    assert not warned      # the norms (original0) are part of the masked weight, not a weight of their own
    check_masks_act(sparse, reference, (x,))
    # the computed weight has exactly the mask's zeros, and the folded model computes the same
    mask = sparse.get_buffer(v + "_mask")
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1)).apply_masks()
    assert (sparse.conv.weight[~mask] == 0).all() and (sparse.conv.weight[mask] != 0).all()
    folded = gf.fold(sparse)
    assert torch.equal(folded(x), sparse(x))
    assert not [k for k in folded.state_dict() if k.endswith("_mask")]


# Mixture of experts ----------------------------------------------------------------------------


class TracedExperts(nn.Module):
    """Experts as one 3-D parameter, each used through an int index (fx traces the loop)."""

    def __init__(self, experts=3, dim=4, hidden=6):
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, hidden, dim))
        self.down = nn.Parameter(torch.randn(experts, dim, hidden))
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = experts

    def forward(self, x):
        gates = torch.softmax(self.router(x), -1)
        out = 0
        for e in range(self.experts):
            out = out + gates[:, e:e + 1] * F.linear(F.relu(F.linear(x, self.up[e])), self.down[e])
        return out


class RoutedExperts(nn.Module):
    """Experts chosen by the data: fx cannot trace ``for e in chosen.unique()``; the weights are found
    by running the model on the example inputs and masked while this code runs."""

    def __init__(self, experts=3, dim=4, hidden=6):
        super().__init__()
        self.up = nn.Parameter(torch.randn(experts, hidden, dim))
        self.down = nn.Parameter(torch.randn(experts, dim, hidden))

    def forward(self, x, chosen):
        out = torch.zeros_like(x)
        for e in chosen.unique():
            rows = chosen == e
            out[rows] = torch.bmm(self.down[e].expand(int(rows.sum()), -1, -1),
                                  F.relu(x[rows] @ self.up[e].T).unsqueeze(-1)).squeeze(-1)
        return out


class RoutedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 3)
        self.experts = RoutedExperts()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.experts(x, self.router(x).argmax(-1)))


class GatheredExperts(nn.Module):
    """One expert per token, gathered as transformers' batched_mm experts do, behind a test of the
    device that fx cannot trace (a Proxy has no truth value) and dynamo specializes on."""

    def __init__(self, experts=3, dim=4, hidden=6):
        super().__init__()
        self.router = nn.Linear(dim, experts)
        self.up = nn.Parameter(torch.randn(experts, hidden, dim))
        self.down = nn.Parameter(torch.randn(experts, dim, hidden))

    def forward(self, x):
        chosen = self.router(x).argmax(-1)
        h = x.float() if x.device.type == "cpu" else x
        h = F.relu(torch.bmm(self.up[chosen], h.unsqueeze(-1)))
        return torch.bmm(self.down[chosen], h).squeeze(-1)


def moe_inputs():
    return (torch.randn(12, 4, generator=torch.Generator().manual_seed(5)),)


def test_traced_expert_stack_gets_one_mask_and_a_unit_per_expert():
    model = TracedExperts()
    reference = copy.deepcopy(model)
    sparse = gf.sparsify(model, static(0.5))
    info = {l.name: l for l in gf.sparse_info(sparse).layers}
    assert info["up"].experts == 3 and info["down"].experts == 3 and info["router.weight"].experts == 0
    assert sparse.get_buffer("up_mask").shape == (3, 6, 4)
    # uniform initial density: each expert keeps exactly half of its own 24 weights
    assert [int(m.sum()) for m in sparse.get_buffer("up_mask")] == [12, 12, 12]
    check_masks_act(sparse, reference, (torch.randn(5, 4),))
    granet = gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.1))
    rows = [l.name for l in granet.report().layers]
    assert rows == ["router.weight"] + [f"{w}[{e}]" for w in ("up", "down") for e in range(3)]
    assert [r.shape for r in granet.report().layers][1:] == [(6, 4)] * 3 + [(4, 6)] * 3
    assert set(granet.masks()) == set(rows)


def test_experts_are_ranked_with_everything_else_in_global_pruning():
    model = TracedExperts()
    with torch.no_grad():       # expert 0 large, expert 2 tiny, the router in between
        model.up[0].mul_(100.0)
        model.up[2].mul_(0.01)
    config = gf.GraNetConfig(method="gmp", final_sparsity=0.6, total_steps=2, prune_start=1, prune_end=1)
    sparse = gf.sparsify(model, config)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.0)
    granet = gf.GraNet(sparse, opt)
    sparse(torch.randn(5, 4)).sum().backward()
    assert granet.step()
    # reference: plain top-k of |w| over every masked weight together
    weights = [sparse.router.weight, sparse.up, sparse.down]
    flat = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = round(0.4 * flat.numel())
    expected = torch.zeros(flat.numel(), dtype=torch.bool)
    expected[torch.topk(flat, keep).indices] = True
    got = torch.cat([sparse.router.weight_mask.flatten(), sparse.up_mask.flatten(), sparse.down_mask.flatten()])
    assert torch.equal(got, expected)
    density = granet.report().layer_density
    assert density["up[0]"] == 1.0 and density["up[2]"] < 0.1


def test_regrowth_keeps_each_experts_own_count():
    config = gf.GraNetConfig(method="rigl", final_sparsity=0.5, total_steps=100, update_every=1)
    sparse = gf.sparsify(TracedExperts(), config)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.1)
    granet = gf.GraNet(sparse, opt)
    before = granet.masks()
    loss = sparse(torch.randn(8, 4)).square().mean()
    loss.backward()
    opt.step()
    assert granet.step()
    after = granet.masks()
    experts = [f"{w}[{e}]" for w in ("up", "down") for e in range(3)]
    assert all(int(after[k].sum()) == int(before[k].sum()) for k in experts)
    assert any(not torch.equal(after[k], before[k]) for k in experts)


def test_untraceable_experts_are_found_by_running_and_masked_while_they_run():
    model = RoutedMoE()
    reference = copy.deepcopy(model)
    (x,) = moe_inputs()
    sparse, warned = sparsify_warned(model, static(0.5), example_inputs=(x,))
    assert set(masks_of(sparse)) == {"router.weight", "experts.up", "experts.down", "head.weight"}
    assert not warned
    layers = {l.name: l for l in gf.sparse_info(sparse).layers}
    assert layers["experts.up"].experts == 3 and layers["experts.down"].kind == "bmm"
    check_masks_act(sparse, reference, (x,))
    # the gradient of the experts is dense (straight through the mask) and the parameters stay parameters
    sparse.train()
    sparse(x).square().sum().backward()
    up, mask = sparse.experts.up, sparse.experts.up_mask
    assert isinstance(up, nn.Parameter) and (up.grad[~mask] != 0).any()
    # copies, pickles and the folded model (which loses the hooks with the masks) compute the same
    sparse.eval()
    folded = gf.fold(sparse)
    assert not folded.experts._forward_pre_hooks and not hasattr(folded.experts, "up_mask")
    for other in (copy.deepcopy(sparse), folded):
        assert torch.equal(other(x), sparse(x))


def test_untraceable_experts_without_example_inputs_are_reported():
    _, warned = sparsify_warned(RoutedMoE(), static(0.5))
    assert len(warned) == 1
    for name in ("experts.up", "experts.down"):
        assert f"{name} stays dense: in no traced graph" in warned[0]
    assert "example_inputs" in warned[0]


def test_hook_masks_compile_without_break_or_recompile():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    sparse = gf.sparsify(nn.Sequential(GatheredExperts(), nn.Linear(4, 2)),
                         gf.GraNetConfig(final_sparsity=0.7, total_steps=6, update_every=2, prune_end=4),
                         example_inputs=moe_inputs())
    assert {"0.up", "0.down"} <= set(masks_of(sparse)) and sparse.get_submodule("0")._forward_pre_hooks
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05)
    granet = gf.GraNet(sparse, opt)
    step_fn = torch.compile(sparse, backend="aot_eager")
    g = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(6):
            x = torch.randn(12, 4, generator=g)
            loss = step_fn(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            granet.step()
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    total = sum(l.numel for l in granet.report().layers if l.masked)
    assert abs(granet.report().global_sparsity - 0.7) <= 1 / total


# The warning about dense weights ---------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)        # an embedding table: dense by design, not listed
        self.tok = nn.Embedding(10, 6)
        self.pos = nn.Parameter(torch.randn(5, 6))
        self.mid = nn.Linear(6, 6)
        self.skip = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.tok.weight    # tied to an embedding

    def forward(self, idx):
        h = self.emb(idx) + self.tok(idx) + self.pos
        return self.head(self.skip(torch.relu(self.mid(h))))


def test_one_warning_lists_every_dense_weight_with_its_reason():
    for inputs in (None, (torch.randint(0, 10, (2, 5)),)):
        sparse, warned = sparsify_warned(Mixed(), gf.GraNetConfig(total_steps=10, exclude=("skip",)),
                                         example_inputs=inputs)
        assert len(warned) == 1
        lines = warned[0].splitlines()[1:]
        assert len(lines) == 3
        text = "\n".join(lines)
        assert "tok.weight stays dense: tied to an embedding" in text
        assert "skip.weight stays dense: excluded by 'skip'" in text
        assert "pos stays dense: not a conv/linear/matmul weight (read by add)" in text
        assert [l.name for l in gf.sparse_info(sparse).masked] == ["mid.weight"]


def test_nothing_to_mask_is_the_no_prunable_layer_error():
    class Lookup(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, idx):
            return self.norm(self.emb(idx))

    with pytest.raises(ValueError, match="no prunable layer"):
        gf.sparsify(Lookup(), gf.GraNetConfig(total_steps=10))


def test_a_model_whose_weights_all_stay_dense_steps_without_the_gradient_error():
    model = gf.sparsify(nn.Sequential(nn.Linear(4, 4)), gf.GraNetConfig(total_steps=4, update_every=1,
                                                                        exclude=("0",)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    granet = gf.GraNet(model, opt)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        assert not granet.step()


# transformers models from tiny configs (random weights, no download) --------------------------------

transformers = pytest.importorskip("transformers")


def falcon():
    config = transformers.FalconConfig(vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                       new_decoder_architecture=False, bias=False)
    return transformers.FalconModel(config), (torch.randint(0, 100, (2, 8)),)


def mixtral(implementation="grouped_mm"):
    config = transformers.MixtralConfig(vocab_size=100, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=32,
                                        experts_implementation=implementation)
    return transformers.MixtralModel(config), (torch.randint(0, 100, (2, 8)),)


def wav2vec2():
    config = transformers.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=32, conv_dim=(8, 8), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2)
    return transformers.Wav2Vec2Model(config), (torch.randn(2, 400),)


HF = {"falcon": falcon, "mixtral": mixtral, "mixtral-batched_mm": lambda: mixtral("batched_mm"),
      "wav2vec2": wav2vec2}


def build(name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HF[name]()


def expected_weights(model, inputs):
    """Reference, from forward hooks and the modules' types: the weights of the linear and conv modules
    that run (a weight-norm conv's direction ``original1``), of the MoE routers (``F.linear(x,
    self.weight)``) and the 3-D stacks of the expert modules."""
    ran, handles = set(), []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv1d)) or type(m).__name__.endswith(("Experts", "Router")):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: ran.add(name)))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    names = set()
    for name in ran:
        m = model.get_submodule(name)
        if type(m).__name__.endswith("Experts"):
            names |= {f"{name}.{p}" for p, w in m.named_parameters(recurse=False) if w.dim() == 3}
        elif "weight" in getattr(m, "parametrizations", {}):
            names.add(f"{name}.parametrizations.weight.original1")
        else:
            names.add(f"{name}.weight")
    return names


def first(out):
    return out[0] if not isinstance(out, torch.Tensor) else out


@pytest.mark.parametrize("name", list(HF))
def test_transformers_models_mask_every_matmul_and_conv_weight(name):
    model, inputs = build(name)
    model.eval()
    reference = copy.deepcopy(model)
    expected = expected_weights(reference, inputs)
    assert expected
    sparse, warned = sparsify_warned(model, static(0.5), example_inputs=inputs)
    assert set(masks_of(sparse)) == expected
    assert not warned
    if name.startswith("mixtral"):
        experts = [l for l in gf.sparse_info(sparse).masked if l.experts]
        assert len(experts) == 4 and all(l.experts == 4 for l in experts)
    check_masks_act(sparse, reference, inputs, out=first)


@pytest.mark.parametrize("name", ["falcon", "mixtral", "wav2vec2"])
def test_transformers_models_train_a_few_granet_steps_to_the_target(name):
    model, inputs = build(name)
    config = gf.GraNetConfig(final_sparsity=0.8, prune_end=4, update_every=2)
    sparse, _ = sparsify_warned(model, config, example_inputs=inputs)
    opt = torch.optim.SGD(sparse.parameters(), lr=0.01)
    granet = gf.GraNet(sparse, opt, total_steps=6)
    sparse.train()
    for _ in range(6):
        out = first(sparse(*inputs))
        loss = out.square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        granet.step()
    report = granet.report()
    total = sum(l.numel for l in report.layers if l.masked)
    assert abs(report.global_sparsity - 0.8) <= 1 / total
    if name == "mixtral":
        assert "layers.0.mlp.experts.gate_up_proj[3]" in report.layer_density
    for n, m in masks_of(sparse).items():
        assert (sparse.get_parameter(n)[~m] == 0).all()
