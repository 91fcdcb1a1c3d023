"""Channel pruning through layer norms: a residual stream normalised by layer norms is one channel group,
trained with the statistics over its kept channels, and compacted exactly (checked against layer norms
computed by hand over the kept channels only)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes.channel_groups import channel_groups
from granet_fx.passes.layer_norms import MaskedLayerNorm, MaskedRMSNorm, masked_layer_norm

from helpers import granet_export


class Block(nn.Module):
    """Pre-norm residual block: the stream plus a layer-scaled MLP of its layer norm."""

    def __init__(self, width, hidden, traceable=True):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.scale = nn.Parameter(torch.rand(width) + 0.5)
        self.traceable = traceable

    def forward(self, h):
        if not self.traceable and h.shape[-1] < 0:   # a branch on a size: fx traces around this module
            h = -h
        return h + self.scale * self.down(torch.relu(self.up(self.norm(h))))


class Stream(nn.Module):
    """A residual stream of ``width`` channels: written by an input projection, read through layer norms."""

    def __init__(self, d_in=6, width=12, hidden=16, out=3, traceable=True):
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.block = Block(width, hidden, traceable)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.norm(self.block(self.inp(x))))


def by_hand(model, x, kept):
    """``Stream`` over the stream channels ``kept`` only, with plain layer norms over those channels."""
    k = kept.nonzero().squeeze(1)
    def ln(t, norm): return F.layer_norm(t, (len(k),), norm.weight[k], norm.bias[k], norm.eps)
    b = model.block
    h = x @ model.inp.weight[k].T + model.inp.bias[k]
    u = torch.relu(ln(h, b.norm) @ b.up.weight[:, k].T + b.up.bias)
    h = h + b.scale[k] * (u @ b.down.weight[k].T + b.down.bias[k])
    return ln(h, model.norm) @ model.head.weight[:, k].T + model.head.bias


def test_masked_layer_norm_is_a_layer_norm_over_the_kept_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 10, requires_grad=True)
    w, b = torch.randn(10), torch.randn(10)
    keep = torch.zeros(10, dtype=torch.bool)
    keep[[0, 2, 3, 7, 8, 9]] = True
    out = masked_layer_norm(x, keep, w, b, 1e-5)
    want = F.layer_norm(x[..., keep], (6,), w[keep], b[keep], 1e-5)
    torch.testing.assert_close(out[..., keep], want)
    out[..., keep].sum().backward()
    assert bool((x.grad[..., ~keep] == 0).all())     # the statistics do not read the other channels


def test_the_stream_is_one_group_with_its_layer_norms_and_layer_scale():
    groups = channel_groups(Stream(), torch.randn(2, 6))
    stream = [g for g in groups if any(m.weight == "inp.weight" for m in g.rows)]
    assert len(stream) == 1 and not stream[0].pinned and stream[0].size == 12
    members = {(m.role, m.weight, m.layer_norm) for m in stream[0].members}
    assert members == {("row", "inp.weight", False), ("row", "block.down.weight", False),
                       ("column", "block.up.weight", False), ("column", "head.weight", False),
                       ("norm", "block.norm.weight", True), ("norm", "norm.weight", True),
                       ("param", "block.scale", False)}


def _pruned(model, x, sparsity=0.5, scope="global"):
    """``model`` with ``sparsity`` of its removable channels masked by one controller step (the warnings
    about HF models' dense weights silenced)."""
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1,
                             prune_end=1, update_every=1, scope=scope)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = gf.sparsify(model, config, example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    return sparse


@pytest.mark.parametrize("traceable", [True, False], ids=["in-graph", "module"])
def test_compaction_narrows_the_stream_and_matches_layer_norms_by_hand(traceable):
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    sparse = _pruned(Stream(traceable=traceable), x)
    kept = sparse.get_buffer("head.weight_mask")[0].clone()
    assert 0 < int(kept.sum()) < 12
    assert torch.equal(sparse.get_buffer("norm.channel_keep"), kept)
    assert torch.equal(sparse.get_buffer("block.norm.channel_keep"), kept)
    assert any(isinstance(m, MaskedLayerNorm) for m in sparse.modules()) == (not traceable)
    with torch.no_grad():
        want = by_hand(gf.fold(sparse), x, kept)
        torch.testing.assert_close(sparse(x), want)
        small = gf.compact(sparse, x)
        torch.testing.assert_close(small(x), want)
    assert small.get_parameter("inp.weight").shape[0] == int(kept.sum())
    assert small.get_parameter("block.scale").shape == (int(kept.sum()),)
    assert small.get_parameter("norm.weight").shape == (int(kept.sum()),)
    assert not any(isinstance(m, MaskedLayerNorm) for m in small.modules())
    assert not any("channel_keep" in name for name, _ in small.named_buffers())


def test_a_plain_layer_norm_keeps_the_channels_it_normalises():
    """An ordinary model whose head and MLP ignore stream channels 0-3: a layer norm still reads them."""
    torch.manual_seed(0)
    model = Stream().eval()
    with torch.no_grad():
        model.head.weight[:, :4] = 0
        model.block.up.weight[:, :4] = 0
    small = gf.compact(model, torch.randn(4, 6))
    assert small.get_parameter("inp.weight").shape[0] == 12
    assert any("layer norm" in reason for reason in gf.compaction_report(small).kept)


def test_granet_trains_the_stream_with_statistics_over_the_kept_channels():
    torch.manual_seed(0)
    config = gf.GraNetConfig(method="granet", granularity="channel", final_sparsity=0.5, total_steps=12,
                             prune_end=8, update_every=2)
    sparse = gf.sparsify(Stream(), config, example_inputs=(torch.randn(2, 6),))
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05)
    granet = gf.GraNet(sparse, optimizer)
    seen = set()
    for _ in range(12):
        x = torch.randn(16, 6)
        loss = F.mse_loss(sparse(x), x[:, :3])
        loss.backward()
        optimizer.step()
        granet.step()
        optimizer.zero_grad()
        kept = sparse.get_buffer("head.weight_mask")[0]
        assert torch.isfinite(loss)
        assert torch.equal(sparse.get_buffer("norm.channel_keep"), kept)
        assert torch.equal(sparse.get_buffer("block.norm.channel_keep"), kept)
        seen.add(tuple(kept.tolist()))
    assert len(seen) > 1                                 # pruning and regrowth moved the stream's channels
    x = torch.randn(8, 6)
    with torch.no_grad():
        torch.testing.assert_close(gf.compact(sparse, x)(x), by_hand(gf.fold(sparse), x, kept))


def tiny_vit():
    import transformers

    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, intermediate_size=128, num_labels=10,
                                    attn_implementation="sdpa")
    return transformers.ViTForImageClassification(config).eval(), torch.randn(2, 3, 32, 32)


def test_vit_through_gf_save_and_granet_export_compact_narrows_its_residual_stream(tmp_path):
    pytest.importorskip("transformers")
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    model, x = tiny_vit()
    sparse = _pruned(model, x, scope="layer")    # every group at half its channels, the stream too
    width = int(sparse.get_buffer("classifier.weight_mask")[0].sum())
    assert width == 32
    gf.save(sparse, tmp_path / "vit.pt", example_inputs=(x,))
    granet_export(tmp_path / "vit.pt", tmp_path / "vit.onnx", "--compact")
    proto = onnx.load(str(tmp_path / "vit.onnx"))
    shapes = {tuple(i.dims) for i in proto.graph.initializer}
    assert (width, 3, 8, 8) in shapes and (64, 3, 8, 8) not in shapes       # the patch embedding's channels
    assert (1, 17, width) in shapes                                          # position embeddings
    assert sum(n.op_type == "LayerNormalization" for n in proto.graph.node) == 5
    session = ort.InferenceSession(str(tmp_path / "vit.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = sparse(x).logits
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-4, rtol=1e-4)


def test_convnext_compacts_every_stage_of_its_residual_stream():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1], num_labels=10)
    model, x = transformers.ConvNextForImageClassification(config).eval(), torch.randn(2, 3, 64, 64)
    sparse = _pruned(model, x, scope="layer")
    small = gf.compact(sparse, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, sparse(x).logits, atol=1e-5, rtol=1e-5)
    stem = small.get_parameter("convnext.embeddings.patch_embeddings.weight").shape[0]
    downs = [small.get_parameter(f"convnext.encoder.stages.{i}.downsampling_layer.1.weight").shape[0]
             for i in (1, 2, 3)]
    assert (stem, *downs) == (8, 16, 24, 32)


@pytest.mark.parametrize("traceable", [True, False], ids=["in-graph", "module"])
def test_compiled_stream_has_no_graph_break_and_follows_the_keep_buffers_without_recompiling(traceable):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    config = gf.GraNetConfig(method="granet", granularity="channel", final_sparsity=0.5, total_steps=12,
                             prune_end=8, update_every=2)
    sparse = gf.sparsify(Stream(traceable=traceable), config, example_inputs=(torch.randn(2, 6),))
    assert torch._dynamo.explain(sparse)(torch.randn(16, 6)).graph_break_count == 0
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05)
    granet = gf.GraNet(sparse, optimizer)
    compiled = torch.compile(sparse)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(12):
            x = torch.randn(16, 6)
            out = compiled(x)
            torch.testing.assert_close(out, sparse(x))      # the keep buffers as they are now
            F.mse_loss(out, x[:, :3]).backward()
            optimizer.step()
            granet.step()
            optimizer.zero_grad()
    assert int(sparse.get_buffer("norm.channel_keep").sum()) < 12


def test_granet_export_without_compaction_runs_the_masked_layer_norms(tmp_path):
    """The uncompacted file: the masked layer norms decompose into ONNX ops and give the masked model's output."""
    import onnxruntime as ort

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    sparse = _pruned(Stream(), x)
    gf.save(sparse, tmp_path / "stream.pt", example_inputs=(x,))
    granet_export(tmp_path / "stream.pt", tmp_path / "stream.onnx")
    session = ort.InferenceSession(str(tmp_path / "stream.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), by_hand(gf.fold(sparse), x,
                                                                  sparse.get_buffer("head.weight_mask")[0]))


def tiny_decoder(name):
    import transformers

    config = getattr(transformers, f"{name}Config")(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                    intermediate_size=64, use_cache=False)
    return getattr(transformers, f"{name}ForCausalLM")(config).eval(), torch.randint(0, 64, (2, 8))


def test_llama_rms_norms_take_the_stream_and_compact_exactly():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = tiny_decoder("Llama")
    sparse = _pruned(model, x, scope="layer")
    kept = sparse.get_buffer("model.norm.channel_keep")
    assert int(kept.sum()) == 16
    assert torch.equal(sparse.get_buffer("model.layers.1.input_layernorm.channel_keep"), kept)
    # the stream's RMS norms take their mean square over the kept channels, by hand on the final norm
    norm = sparse.get_submodule("model.norm")
    assert isinstance(norm, MaskedRMSNorm)
    h = torch.randn(2, 8, 32)
    k = kept.nonzero().squeeze(1)
    want = norm.weight[k] * h[..., k] * torch.rsqrt(h[..., k].pow(2).mean(-1, keepdim=True) + norm.rms_eps)
    torch.testing.assert_close(norm(h)[..., k], want)
    small = gf.compact(sparse, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, sparse(x).logits, atol=1e-5, rtol=1e-5)
    assert small.get_parameter("model.embed_tokens.weight").shape == (64, 16)
    assert small.get_parameter("model.norm.weight").shape == (16,)
    assert not any(isinstance(m, MaskedRMSNorm) for m in small.modules())


def test_rms_norms_of_another_form_stay_as_they_are():
    """Gemma's RMS norm scales by 1 + weight: not the form granet_fx masks, so its stream stays whole."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = tiny_decoder("Gemma")
    sparse = _pruned(model, x, scope="layer")
    assert not any(isinstance(m, MaskedRMSNorm) for m in sparse.modules())
    assert gf.compact(sparse, x).get_parameter("model.embed_tokens.weight").shape == (64, 32)
