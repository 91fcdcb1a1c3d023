"""HuggingFace transformers models, built from small configs with random weights (no download).

None of them traces whole with ``torch.fx.symbolic_trace``; piecewise tracing
must still reach every conv/linear (and GPT-2's ``Conv1D``, an addmm with an
(in, out) weight). The ``trained`` fixture returns each model sparsified and
trained for a few steps under ``torch.compile``, with example inputs; the
chain ends with ``gf.save``, ``granet-export`` and onnxruntime.
"""

import copy
import math
import os
import warnings
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.export import cli
from granet_fx.export.onnx_export import run_onnxruntime

import transformers
from transformers.pytorch_utils import Conv1D

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D)


def _tokens(g):
    return (torch.randint(0, 100, (2, 8), generator=g),), None


def _lm_tokens(g):                  # the labels of a language model are its input ids
    (ids,), _ = _tokens(g)
    return (ids,), ids


def _images(g):
    return (torch.randn(2, 3, 32, 32, generator=g),), None


def _text(width=32):
    return dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * width)


# name -> (build the model, make (inputs, labels) from a generator)
MODELS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16, use_cache=False,
        bos_token_id=0, eos_token_id=0)), _lm_tokens),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        vocab_size=100, max_position_embeddings=16, **_text())), _tokens),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, **_text())), _images),
    "resnet": (lambda: transformers.ResNetModel(transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")), _images),
    "mobilenetv2": (lambda: transformers.MobileNetV2Model(transformers.MobileNetV2Config(
        depth_multiplier=0.35, image_size=32)), _images),
    "convnext": (lambda: transformers.ConvNextModel(transformers.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), _images),
}


def build(name, seed=0):
    torch.manual_seed(seed)
    make, data = MODELS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make(), data


def first_output(out):
    return out[0] if not isinstance(out, torch.Tensor) else out


def loss_of(out, labels):
    y = first_output(out)
    if labels is not None:      # GPT-2: next-token cross entropy
        return F.cross_entropy(y[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    return F.mse_loss(y, torch.zeros_like(y))


def used_layer_weights(model, inputs):
    """Reference: names of the conv/linear/Conv1D weights whose module runs in a forward pass (hooks)."""
    ran, handles = set(), []
    for name, m in model.named_modules():
        if isinstance(m, LAYER_TYPES):
            handles.append(m.register_forward_hook(lambda mod, i, o, name=name: ran.add(name + ".weight")))
    with torch.no_grad():
        model(*inputs)
    for h in handles:
        h.remove()
    return ran


def sparsify_quietly(model, config, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = gf.sparsify(model, config, **kw)
    return sparse, [str(w.message) for w in caught if "granet_fx" in str(w.message)]


# MobileNetV2's 52 convolutions each fail to trace in their parent and take seconds to trace piecewise.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "mobilenetv2" else n
                                  for n in MODELS])
def test_every_used_layer_is_masked_and_the_masks_act(name):
    model, data = build(name)
    model.eval()
    inputs, _ = data(torch.Generator().manual_seed(1))
    reference = copy.deepcopy(model)
    expected = used_layer_weights(reference, inputs)
    tied = {"lm_head.weight"} if name == "gpt2" else set()
    config = gf.GraNetConfig(initial_sparsity=0.5, final_sparsity=0.8, total_steps=10)
    sparse, warned = sparsify_quietly(model, config, example_inputs=inputs)
    info = gf.sparse_info(sparse)
    masked = {l.name for l in info.masked}
    assert masked == expected - tied
    if name == "gpt2":
        # lm_head shares its weight with the token embedding: one parameter, no mask at all
        assert sparse.lm_head.weight is sparse.transformer.wte.weight
        assert [l.name for l in info.layers if l.mask_name is None] == ["transformer.wte.weight"]
        assert any("transformer.wte.weight stays dense" in w for w in warned)
        tied_masks = [k for k in sparse.state_dict() if k.startswith(("lm_head", "transformer.wte")) and "mask" in k]
        assert not tied_masks

    # Put the dense weights back under the masks: the output must be the reference's with w * m,
    # which holds only if a mask node sits on every masked weight's path.
    masks = {l.name: sparse.get_buffer(l.mask_name) for l in info.masked}
    sparse.load_state_dict(reference.state_dict(), strict=False)
    sparse_layers = [n for n, m in masks.items() if not m.all()]      # ERK keeps some small layers dense
    assert sparse_layers and all((sparse.get_parameter(n)[~masks[n]] != 0).any() for n in sparse_layers)
    sparse.eval()
    with torch.no_grad():
        dense_out = first_output(reference(*inputs))
        for n, m in masks.items():
            reference.get_parameter(n).mul_(m)
        masked_out = first_output(reference(*inputs))
        got = first_output(sparse(*inputs))
    scale = masked_out.abs().max()     # tiny random MobileNetV2 outputs are around 1e-26
    assert scale > 0
    torch.testing.assert_close(got / scale, masked_out / scale)
    assert (got - dense_out).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("name", ["gpt2", "resnet", pytest.param("bert", marks=pytest.mark.slow)])
def test_dense_masks_change_nothing_in_train_and_eval_mode(name):
    model, data = build(name)
    inputs, _ = data(torch.Generator().manual_seed(2))
    reference = copy.deepcopy(model)
    sparse, _ = sparsify_quietly(model, gf.GraNetConfig(total_steps=10))
    for mode in (True, False):
        reference.train(mode)
        sparse.train(mode)
        torch.manual_seed(3)            # dropout draws the same numbers in both
        a = first_output(reference(*inputs))
        torch.manual_seed(3)
        b = first_output(sparse(*inputs))
        assert torch.equal(a, b), f"train={mode}"


class Addmm(nn.Module):
    """A linear layer computed as HF's Conv1D does: addmm with the weight stored (in, out)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


def test_addmm_weight_is_masked_with_its_own_layout_and_flops():
    model = nn.Sequential(Addmm(6, 4), nn.ReLU(), Addmm(4, 3))
    x = torch.randn(5, 6)
    sparse = gf.sparsify(model, gf.GraNetConfig(initial_sparsity=0.5, final_sparsity=0.8, total_steps=10),
                         example_inputs=x)
    layers = gf.sparse_info(sparse).layers
    assert [(l.name, l.kind, l.shape) for l in layers] == [("0.weight", "addmm", (6, 4)), ("2.weight", "addmm", (4, 3))]
    # 5 rows: 5*4 outputs of 6 inputs each, 5*3 outputs of 4 inputs each
    assert [l.macs for l in layers] == [5 * 4 * 6, 5 * 3 * 4]
    p = dict(sparse.named_parameters())
    m0, m2 = sparse.get_buffer("0.weight_mask"), sparse.get_buffer("2.weight_mask")
    assert int(m0.sum()) + int(m2.sum()) == round(0.5 * (24 + 12))
    with torch.no_grad():
        p["0.weight"].fill_(1.0)        # dense again: only the mask node can hide the pruned entries
        expected = torch.relu(x @ (p["0.weight"] * m0) + p["0.bias"]) @ p["2.weight"] + p["2.bias"]
    torch.testing.assert_close(sparse(x), expected)


class ReadsStride(nn.Module):
    """Like HF's MobileNetV2 layers: code that fx cannot trace reads its conv's ``stride``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        pad = int(x.shape[-1]) % self.conv.stride[0]    # int() of a traced value: traced piecewise
        return self.conv(F.pad(x, (0, pad, 0, pad)))


def test_a_copy_keeps_what_code_outside_the_graph_reads():
    sparse = gf.sparsify(ReadsStride(), gf.GraNetConfig(initial_sparsity=0.5, final_sparsity=0.8, total_steps=10))
    assert isinstance(sparse.conv, torch.fx.GraphModule) and sparse.conv.stride == (2, 2)
    x = torch.randn(2, 3, 9, 9)
    copied = copy.deepcopy(sparse)
    assert copied.conv.stride == (2, 2) and copied.conv.weight is not sparse.conv.weight
    torch.testing.assert_close(copied(x), sparse(x))
    torch.testing.assert_close(gf.fold(sparse)(x), sparse(x))      # fold works on a deep copy


# The chain: a few steps of GraNet under torch.compile, save, export, onnxruntime ----------------


@dataclass
class Trained:
    """A sparsified model after training, for the tests below and for export tests."""

    name: str
    model: nn.Module
    granet: gf.GraNet
    example_inputs: tuple
    losses: list = field(default_factory=list)
    masks: list = field(default_factory=list)       # after each mask update
    graph_breaks: int = 0


STEPS, EVERY, FINAL = 8, 2, 0.7


def train_compiled(name, backend):
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model, data = build(name)
    config = gf.GraNetConfig(final_sparsity=FINAL, total_steps=STEPS, update_every=EVERY, prune_end=6)
    model, _ = sparsify_quietly(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    granet = gf.GraNet(model, opt)
    step_fn = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(4)
    run = Trained(name, model, granet, ())
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(STEPS):
            inputs, labels = data(g)
            loss = loss_of(step_fn(*inputs), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if granet.step():
                run.masks.append(granet.masks())
            run.losses.append(loss.item())
    run.example_inputs = inputs
    run.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return run


# The default run compiles GPT-2 with the aot_eager backend (dynamo and AOT autograd, no code
# generation); the slow run compiles every model with inductor.
@pytest.fixture(scope="module", params=[("gpt2", "aot_eager")] +
                [pytest.param((n, "inductor"), marks=pytest.mark.slow) for n in MODELS])
def trained(request) -> Trained:
    return train_compiled(*request.param)


def test_trains_under_compile_without_break_or_recompile(trained):
    r = trained
    assert r.graph_breaks == 0
    assert all(math.isfinite(x) for x in r.losses)
    assert len(r.masks) == 3                        # updates at steps 2, 4 and 6
    for before, after in zip(r.masks, r.masks[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before), "masks change at every update"
    report = r.granet.report()
    total = sum(l.numel for l in report.layers if l.masked)
    assert abs(report.global_sparsity - FINAL) <= 1 / total
    for l in gf.sparse_info(r.model).masked:
        w, m = r.model.get_parameter(l.name), r.model.get_buffer(l.mask_name)
        assert (w[~m] == 0).all()
    r.model.eval()
    with torch.no_grad():
        assert torch.isfinite(first_output(r.model(*r.example_inputs))).all()


def test_saves_exports_to_onnx_and_matches_in_onnxruntime(trained, tmp_path, capsys):
    r = trained
    r.model.eval()
    archive, onnx_file = tmp_path / "model.pt2", tmp_path / "model.onnx"
    gf.save(r.model, archive, example_inputs=r.example_inputs)
    code = cli.main([str(archive), "-o", str(onnx_file)])   # checks onnxruntime against the saved outputs
    assert code == 0, capsys.readouterr().err
    with torch.no_grad():
        want = first_output(r.model(*r.example_inputs))
    got = torch.from_numpy(run_onnxruntime(onnx_file.read_bytes(), list(r.example_inputs))[0])
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-4 * max(1.0, float(want.abs().max()))
