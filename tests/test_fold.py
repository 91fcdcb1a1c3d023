"""fold: masks multiplied into the weights, no mask nodes or buffers, the same outputs."""

import copy

import pytest
import torch
from torch import fx, nn

import granet_fx as gf
from granet_fx.passes import fold_masks, is_mask_node

from helpers import SmallCNN, batches, train
from test_sparsify import Gate  # data-dependent control flow: traced on its own


def trained(model, steps=6, shape=(8, 1, 12), classes=4):
    """A sparsified model after a few GraNet steps, so weights, masks and statistics are not at init."""
    config = gf.GraNetConfig(final_sparsity=0.8, initial_sparsity=0.5, total_steps=steps, update_every=2)
    model = gf.sparsify(model, config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(steps, shape, classes))
    return model, granet


def mask_nodes(module):
    return [n for m in module.modules() if isinstance(m, fx.GraphModule) for n in m.graph.nodes if is_mask_node(n)]


def test_fold_computes_what_the_masked_model_computes():
    model, granet = trained(SmallCNN())
    model.eval()
    x = torch.randn(5, 1, 12)
    masks = granet.masks()
    weights = {name: model.get_parameter(name).detach().clone() for name in masks}
    folded = gf.fold(model)

    assert torch.equal(folded(x), model(x))
    assert not mask_nodes(folded) and "mask_weight" not in folded.code
    assert not [k for k in folded.state_dict() if k.endswith("_mask")]
    assert set(folded.state_dict()) == {k for k in model.state_dict() if not k.endswith("_mask")}
    for name, mask in masks.items():
        assert torch.equal(folded.get_parameter(name), weights[name] * mask)
    theirs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not [t for t in [*folded.parameters(), *folded.buffers()] if t.untyped_storage().data_ptr() in theirs]
    # the training model keeps its masks and mask nodes
    assert len(mask_nodes(model)) == 3 and set(granet.masks()) == set(masks)


class Piecewise(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.gate = Gate()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)  # out_proj: a mask without a mask node
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.gate(self.inp(x)).unsqueeze(1)
        return self.out(self.attn(h, h, h)[0].squeeze(1))


def test_fold_reaches_every_traced_piece_and_masks_without_a_node():
    model, granet = trained(Piecewise(), shape=(8, 4), classes=3)
    assert isinstance(model.gate.a, fx.GraphModule) and isinstance(model.gate.b, fx.GraphModule)  # pieces
    assert "attn.out_proj.weight" in granet.masks()
    model.eval()
    folded = gf.fold(model)
    for x in (torch.randn(6, 4), -torch.rand(6, 4)):  # both branches of the gate
        assert torch.equal(folded(x), model(x))
    assert not mask_nodes(folded)
    assert not [k for k in folded.state_dict() if k.endswith("_mask")]
    for name, mask in granet.masks().items():
        assert torch.equal(folded.get_parameter(name) != 0, mask & (model.get_parameter(name) != 0))


def test_fold_masks_pass_on_one_graph():
    model = gf.sparsify(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
                        gf.GraNetConfig(method="static", final_sparsity=0.5, total_steps=1))
    w = torch.randn(4, 3)
    with torch.no_grad():
        model.get_parameter("0.weight").copy_(w)  # masked-out entries nonzero on purpose
    mask = model.get_buffer("0.weight_mask").clone()
    out = fold_masks(model)
    assert out is model
    assert [n.op for n in model.graph.nodes].count("get_attr") == 4  # two weights, two biases
    assert not hasattr(model.get_submodule("0"), "weight_mask")
    assert torch.equal(model.get_parameter("0.weight"), w * mask)


def test_fold_needs_a_sparsified_model():
    with pytest.raises(ValueError, match="sparsify"):
        gf.fold(SmallCNN())


def test_a_copy_of_a_folded_model_is_not_sparsified():
    model = gf.sparsify(nn.Sequential(nn.Linear(4, 4)), gf.GraNetConfig(total_steps=10))
    folded = gf.fold(model)
    assert isinstance(folded, fx.GraphModule)   # whose deepcopy restores the attributes it preserves
    for m in (folded, copy.deepcopy(folded)):
        with pytest.raises(ValueError, match="sparsify"):
            gf.fold(m)
