"""The compaction pass: exact outputs, what is removed and what is kept, on every reference block."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import granet_fx as gf
from granet_fx.passes.channel_groups import named_tensors
from granet_fx.models import BottleneckResNet, InvertedResidual, MLP, Mnist1dCNN, MobileNetV2, TransformerBlock

from helpers import Branchy, batches, granet_export, train
from test_channel_groups import Mobile, TwoBlocks
from test_layer_norms import Stream, _pruned


def eval_out(model, x):
    model.eval()
    with torch.no_grad():
        return model(x)


def test_mlp_removes_unread_and_constant_channels_exactly():
    model = MLP((12, 16, 16, 4)).eval()
    l0, l1, l2 = model.layers
    with torch.no_grad():
        l0.weight[[1, 5]] = 0           # zero rows: channel 1 carries relu(0.7), channel 5 relu(-0.3) = 0
        l0.bias[1], l0.bias[5] = 0.7, -0.3
        l1.weight[:, [2, 9]] = 0        # nothing reads channels 2 and 9
        l1.weight[3] = 0                # layer 1's channel 3 carries relu(b), folded into layer 2's bias
    x = torch.randn(5, 12)
    expected = eval_out(model, x)
    small = gf.compact(model, x)
    assert small.layers[0].weight.shape == (12, 12) and small.layers[0].bias.shape == (12,)
    assert small.layers[1].weight.shape == (15, 12) and small.layers[2].weight.shape == (4, 15)
    assert small.layers[1].in_features == 12 and small.layers[2].in_features == 15
    assert torch.allclose(eval_out(small, x), expected, atol=1e-5)
    report = gf.compaction_report(small)
    assert report.removed == 5 and report.channels == 16 + 16 + 4
    # MACs per sample: 12*12 + 12*15 + 15*4 instead of 12*16 + 16*16 + 16*4, on 5 samples
    assert (report.macs_before, report.macs_after) == (5 * 512, 5 * 384)
    assert report.max_abs_error < 1e-5 and "max abs error" in str(report)
    assert torch.equal(eval_out(model, x), expected), "the model itself is left alone"


class PaddedCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv2(F.relu(self.conv1(x)))), 1).flatten(1))


def test_constant_into_a_padded_conv_is_kept():
    model = PaddedCNN().eval()
    with torch.no_grad():
        model.conv1.weight[[0, 1]] = 0
        model.conv1.bias[0], model.conv1.bias[1] = 1.0, -1.0   # relu: a constant 1 (kept) and 0 (removed)
    x = torch.randn(2, 3, 6, 6)
    small = gf.compact(model, x)
    assert small.conv1.weight.shape[0] == 7 and small.conv2.weight.shape[1] == 7
    assert gf.compaction_report(small).kept == {"a non-zero constant feeds a zero-padded convolution": 1}
    assert torch.allclose(eval_out(small, x), eval_out(model, x), atol=1e-5)


class PadBetween(nn.Module):
    """Two unpadded convolutions with an explicit padding of the image between them."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.conv2(F.pad(F.relu(self.conv1(x)), (1, 1, 1, 1), mode=self.mode))


def _constant_and_unread_channels(model):
    with torch.no_grad():
        model.conv1.weight[[0, 1]] = 0
        model.conv1.bias[0], model.conv1.bias[1] = 1.0, -1.0   # relu: a constant 1 and a constant 0
        model.conv2.weight[:, 2] = 0                             # nothing reads channel 2
    return model


@pytest.mark.parametrize("mode, kept", [("constant", 6), ("reflect", 5), ("replicate", 5)])
def test_padding_between_layers_keeps_the_channels_followed(mode, kept):
    """The padding leaves the channels alone: channel 1 (a constant 0, padded with 0 or itself) and the unread
    channel 2 go in every mode; channel 0 (a constant 1) goes where the padding copies it (reflect, replicate)
    and stays where zeros border it, since the next layer then sees it vary."""
    model = _constant_and_unread_channels(PadBetween(mode).eval())
    x = torch.randn(2, 3, 8, 8)
    small = gf.compact(model, x)
    assert small.conv1.weight.shape[0] == kept and small.conv2.weight.shape[1] == kept
    assert torch.allclose(eval_out(small, x), eval_out(model, x), atol=1e-5)


def test_granet_export_compacts_through_a_reflection_padding(tmp_path):
    """The exported graph (the model's code) pads with ``pad``: followed the same way, through the command."""
    import onnxruntime

    model = _constant_and_unread_channels(PadBetween("reflect").eval())
    x = torch.randn(2, 3, 8, 8)
    gf.save(model, tmp_path / "m.pt", example_inputs=(x,))
    run = granet_export(tmp_path / "m.pt", tmp_path / "m.onnx", "--compact")
    assert "removed 3 of" in run.stdout, run.stdout
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), eval_out(model, x), atol=1e-5, rtol=1e-5)


class BatchNormInto1x1(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 4, 1, bias=False)

    def forward(self, x):
        return self.conv2(F.relu(self.bn(self.conv1(x))))


@pytest.mark.parametrize("sparsified", [False, True])
def test_batch_norm_constant_folds_into_a_new_bias(sparsified):
    model = BatchNormInto1x1()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
        model.bn.weight.uniform_(0.5, 2)
        model.bn.bias.uniform_(0.5, 1)                      # positive: relu passes the constant on
        model.conv1.weight[[2, 4]] = 0
    x = torch.randn(2, 3, 7, 7)
    expected = eval_out(model, x)
    if sparsified:
        model = gf.sparsify(model, gf.GraNetConfig(total_steps=10), example_inputs=x)
    small = gf.compact(model, x)
    assert small.conv1.weight.shape[0] == 4 and small.bn.running_mean.shape == (4,) and small.bn.num_features == 4
    # channel c's constant relu(beta - mean * gamma / sqrt(var + eps)) times conv2's column, summed
    bn = model.bn
    const = F.relu(bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps))[[2, 4]]
    assert torch.allclose(small.conv2.bias, model.conv2.weight[:, [2, 4], 0, 0] @ const, atol=1e-6)
    assert torch.allclose(eval_out(small, x), expected, atol=1e-5)


def randomize(model, seed=0):
    """Non-zero biases and batch-norm statistics, and about a third of rows and columns set to zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(generator=g)
                m.running_var.uniform_(0.5, 2, generator=g)
                m.weight.normal_(generator=g)
                m.bias.normal_(generator=g)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                m.weight[torch.rand(m.weight.shape[0], generator=g) < 0.3] = 0
                if m.weight.shape[1] > 1:
                    m.weight[:, torch.rand(m.weight.shape[1], generator=g) < 0.3] = 0
                if m.bias is not None:
                    m.bias.normal_(generator=g)
    return model


class Bottlenecks(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = BottleneckResNet(blocks=(1, 1), width=4)

    def forward(self, x):
        return self.net(x)


MODELS = {
    "resnet basic": (TwoBlocks, (2, 3, 8, 8)),
    "resnet bottleneck": (Bottlenecks, (2, 3, 8, 8)),
    "mobilenet v2": (lambda: MobileNetV2(width=4), (2, 3, 8, 8)),
    "mlp": (lambda: MLP((10, 24, 24, 3)), (3, 10)),
    "transformer": (lambda: TransformerBlock(16, 2), (2, 3, 16)),
    "plain 1d cnn": (lambda: Mnist1dCNN(8), (2, 1, 40)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_compaction_is_exact_on_reference_models(name):
    make, shape = MODELS[name]
    model = randomize(make()).eval()
    x = torch.randn(*shape)
    expected = eval_out(model, x)
    small = gf.compact(model, x)
    report = gf.compaction_report(small)
    assert report.removed > 0 and report.macs_after < report.macs_before
    n_before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in small.parameters()) < n_before
    error = (eval_out(small, x) - expected).abs().max().item()
    print(f"{name}: {report}")
    assert error < 1e-4 and report.max_abs_error == pytest.approx(error, abs=1e-6)
    # on other inputs too
    x2 = torch.randn(*shape)
    assert torch.allclose(eval_out(small, x2), eval_out(model, x2), atol=1e-4)


def test_depthwise_groups_follow_the_removed_channels():
    model = randomize(InvertedResidual(4, 6, stride=2, expand=3)).eval()
    x = torch.randn(2, 4, 8, 8)
    small = gf.compact(model, x)
    dw = small.depthwise[0]
    assert dw.groups == dw.out_channels == dw.in_channels == dw.weight.shape[0] < 12
    assert small.expand[0].weight.shape[0] == dw.groups == small.project[0].weight.shape[1]
    assert torch.allclose(eval_out(small, x), eval_out(model, x), atol=1e-5)


def test_compacting_channel_granet_removes_exactly_the_pruned_channels():
    x = torch.randn(4, 3, 8, 8)
    model = gf.sparsify(TwoBlocks(), gf.GraNetConfig(granularity="channel", final_sparsity=0.5, total_steps=6,
                                                     update_every=2, prune_end=4), example_inputs=x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(model, opt)
    train(model, opt, granet, batches(6, (4, 3, 8, 8), 5))
    kept = [int(k.sum()) for k in granet._structured.keeps()]
    masked = copy.deepcopy(model.state_dict())
    small = gf.compact(model, x)
    assert [small.stem.weight.shape[0], small.block1.conv1.weight.shape[0], small.block2.conv1.weight.shape[0],
            small.block2.conv2.weight.shape[0]] == kept
    assert not any(k.endswith("_mask") for k in small.state_dict())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in masked.items()), "the masked model is unchanged"
    report = gf.compaction_report(small)
    assert report.kept == {}
    # the controller's FLOPs count (masks and unread rows) and the compacted model's MACs agree
    assert report.flops_ratio == pytest.approx(granet.report().inference_flops, rel=1e-9)
    assert torch.allclose(eval_out(small, x), eval_out(model, x), atol=1e-5)


def _state(model):
    """What compaction must leave as it is: every tensor, the code of every graph, each module's class and sizes."""
    sizes = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features", "normalized_shape")
    return ({k: v.clone() for k, v in named_tensors(model).items()},
            [m.code for m in model.modules() if isinstance(m, fx.GraphModule)],
            [(name, type(m), [getattr(m, a, None) for a in sizes]) for name, m in model.named_modules()])


@pytest.mark.parametrize("make, shape", [(Mobile, (2, 4, 8, 8)), (lambda: Stream(traceable=False), (8, 6)),
                                         (Stream, (8, 6))], ids=["depthwise", "norm-module", "norm-in-graph"])
def test_compaction_leaves_the_masked_model_alone_and_shares_no_tensor_with_it(make, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = _pruned(make(), x)
    expected = eval_out(model, x)
    before = _state(model)
    small = gf.compact(model, x)
    assert gf.compaction_report(small).removed > 0
    after = _state(model)
    assert after[0].keys() == before[0].keys() and all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert after[1:] == before[1:]
    assert torch.equal(eval_out(model, x), expected)
    theirs = {t.untyped_storage().data_ptr() for t in named_tensors(model).values()}
    assert not [name for name, t in named_tensors(small).items() if t.untyped_storage().data_ptr() in theirs]


def test_compacts_the_module_of_an_exported_program():
    model = randomize(InvertedResidual(4, 6, stride=2, expand=4), seed=1).eval()
    x = torch.randn(2, 4, 8, 8)
    direct = gf.compaction_report(gf.compact(model, x))
    exported = torch.export.export(model, (x,), strict=False).module()   # what a saved program gives back
    small = gf.compact(exported, x)
    report = gf.compaction_report(small)
    assert (report.removed, report.macs_after) == (direct.removed, direct.macs_after)
    assert torch.allclose(small(x), eval_out(model, x), atol=1e-5)


def test_report_needs_a_compacted_model():
    with pytest.raises(ValueError, match="compact"):
        gf.compaction_report(MLP())


def test_untraceable_model_gets_a_clear_error():
    with pytest.raises(ValueError, match="torch.export cannot capture Branchy"):
        gf.compact(Branchy(), torch.ones(1, 8))


@pytest.mark.slow
def test_compacted_model_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    import onnxruntime as ort

    model = randomize(TwoBlocks()).eval()
    x = torch.randn(2, 3, 8, 8)
    small = gf.compact(model, x)
    path = str(tmp_path / "small.onnx")
    torch.onnx.export(small, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},))
    out = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), eval_out(model, x), atol=1e-4)
