"""HuggingFace transformers models: what the zoo's chain (tests/test_zoo.py) does not check.

The zoo (tests/zoo.py) takes 36 architectures through sparsify, mask coverage,
training, compile, save, export and onnxruntime. Here: GPT-2's tied head, dense
masks in train mode (dropout on), and the two graph shapes behind HF layers
that piecewise tracing must handle (an addmm weight laid out (in, out), code
outside the graph that reads a conv's attributes).
"""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf

from helpers import sparsify_warned
from zoo import ZOO, leaves


def build(name):
    torch.manual_seed(0)
    spec = ZOO[name]
    return spec.build(), spec.inputs(torch.Generator().manual_seed(1))


def test_gpt2_tied_head_stays_dense_with_a_warning():
    model, inputs = build("gpt2")
    config = gf.GraNetConfig(initial_sparsity=0.5, final_sparsity=0.8, total_steps=10)
    sparse, warned = sparsify_warned(model, config, example_inputs=inputs)
    info = gf.sparse_info(sparse)
    # lm_head shares its weight with the token embedding: one parameter, no mask at all
    assert sparse.lm_head.weight is sparse.transformer.wte.weight
    assert [l.name for l in info.layers if l.mask_name is None] == ["transformer.wte.weight"]
    assert any("transformer.wte.weight stays dense" in w for w in warned)
    assert not [k for k in sparse.state_dict() if k.startswith(("lm_head", "transformer.wte")) and "mask" in k]
    # every other weight matrix is masked: 4 Conv1D per block (c_attn, c_proj, c_fc, mlp.c_proj)
    assert len(info.masked) == 4 * model.config.n_layer


@pytest.mark.parametrize("name", ["gpt2", "resnet", pytest.param("bert", marks=pytest.mark.slow)])
def test_dense_masks_change_nothing_in_train_and_eval_mode(name):
    model, inputs = build(name)
    reference = copy.deepcopy(model)
    sparse, _ = sparsify_warned(model, gf.GraNetConfig(total_steps=10))
    for mode in (True, False):
        reference.train(mode)
        sparse.train(mode)
        torch.manual_seed(3)            # dropout draws the same numbers in both
        a = leaves(reference(*inputs))
        torch.manual_seed(3)
        b = leaves(sparse(*inputs))
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), f"train={mode}"


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
