"""nn.MultiheadAttention under channel pruning: sparsify gives it the class SplitHeadsAttention, which computes
what torch's module computes (checked against torch's module for each option) in a form whose heads channel
analysis follows; whole heads are pruned (self- and cross-attention, alone or in torch's Transformer layers),
compacted in Python and through granet-export, checked against attention computed by hand over the kept heads."""

import copy
import itertools
import math
import warnings
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes.attention import SplitHeadsAttention, SplitHeadsEncoderLayer, split_attention_heads

from helpers import granet_export
from test_heads import granet_on_heads


def channel_config(**kw):
    return gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                           update_every=1, **kw)


def masks(bool_mask, n, length, source, batched):
    """The mask arguments tried: none, bool and float attention masks, a padding mask, both, a 3-D mask per
    head, and the causal hint (no row or key fully masked, which gives NaN in torch too)."""
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(length, source, generator=g) > 0.3
    keep[:, 0] = True
    padding = torch.rand(*((n,) if batched else ()), source, generator=g) > 0.7
    padding[..., 0] = False
    yield {}
    yield {"attn_mask": ~keep if bool_mask else torch.randn(length, source, generator=g)}
    yield {"key_padding_mask": padding}
    yield {"attn_mask": ~keep, "key_padding_mask": padding}
    yield {"attn_mask": torch.randn((n if batched else 1) * 4, length, source, generator=g)}
    if length == source:
        yield {"attn_mask": nn.Transformer.generate_square_subsequent_mask(length), "is_causal": True}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["self", "shared key and value", "cross"])
def test_outputs_and_weights_equal_torchs_module(batch_first, inputs):
    """Every option combination, in eval (with and without grad: torch's module takes its fused inference
    path without) and in train mode with dropout 0, batched and unbatched, against torch's own module."""
    torch.manual_seed(0)
    for bias, batched, bool_mask in itertools.product([True, False], [True, False], [True, False]):
        reference = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first)
        ours = copy.deepcopy(reference)
        assert split_attention_heads(ours) == [""] and type(ours) is SplitHeadsAttention
        n, length, source = 3, 5, 5 if inputs == "self" else 7

        def shape(t):
            return ((n, t, 16) if batch_first else (t, n, 16)) if batched else (t, 16)

        q = torch.randn(shape(length))
        k = v = q if inputs == "self" else torch.randn(shape(source))
        if inputs == "cross":
            v = torch.randn(shape(source))
        for kw, train, grad, need, average in itertools.product(
                masks(bool_mask, n, length, source, batched), [False, True], [False, True], [True, False],
                [True, False]):
            reference.train(train), ours.train(train)
            with torch.set_grad_enabled(grad):
                want = reference(q, k, v, need_weights=need, average_attn_weights=average, **kw)
                got = ours(q, k, v, need_weights=need, average_attn_weights=average, **kw)
            assert (got[1] is None) == (want[1] is None)
            for g, w in zip(got, want):
                if w is not None:
                    torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("need_weights", [True, False])
def test_dropout_in_training_draws_what_torch_draws(need_weights):
    """With the same seed the dropout masks are torch's: the weights returned are those that made the output."""
    reference = nn.MultiheadAttention(16, 4, dropout=0.5, batch_first=True).train()
    ours = copy.deepcopy(reference)
    split_attention_heads(ours)
    x = torch.randn(2, 5, 16)
    torch.manual_seed(3)
    want = reference(x, x, x, need_weights=need_weights, average_attn_weights=False)
    torch.manual_seed(3)
    got = ours(x, x, x, need_weights=need_weights, average_attn_weights=False)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-5)
    if need_weights:
        torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-5)
        assert bool((got[1] == 0).any())                    # dropout did act


def kept_heads(sparse):
    """The heads of ``att`` (4 heads of 4 channels) that the masks keep: those whose out_proj columns are kept."""
    return sparse.get_buffer("att.out_proj.weight_mask")[0].view(4, 4)[:, 0].nonzero().squeeze(1).tolist()


OPTIONS = [{"add_bias_kv": True}, {"add_zero_attn": True}, {"add_bias_kv": True, "add_zero_attn": True}]


def assert_same_as_torchs_module(make, inputs: str, widths=(16, 16, 16)):
    """``make(batch_first)``, an ``nn.MultiheadAttention``, against its ``SplitHeadsAttention`` copy: outputs and
    weights per head, batch first or not, batched or not, with every mask, in eval and train mode;
    ``inputs``: "self" or "cross" (keys and values of ``widths[1:]`` channels)."""
    torch.manual_seed(0)
    for batch_first, batched, bool_mask in itertools.product([True, False], [True, False], [True, False]):
        reference = make(batch_first)
        ours = copy.deepcopy(reference)
        assert split_attention_heads(ours) == [""] and type(ours) is SplitHeadsAttention
        n, length, source = 3, 5, 5 if inputs == "self" else 7

        def shape(t, width):
            return ((n, t, width) if batch_first else (t, n, width)) if batched else (t, width)

        q = torch.randn(shape(length, widths[0]))
        k, v = (q, q) if inputs == "self" else (torch.randn(shape(source, w)) for w in widths[1:])
        for kw, train, need in itertools.product(masks(bool_mask, n, length, source, batched), [False, True],
                                                 [True, False]):
            reference.train(train), ours.train(train)
            want = reference(q, k, v, need_weights=need, average_attn_weights=False, **kw)
            got = ours(q, k, v, need_weights=need, average_attn_weights=False, **kw)
            for g, w in zip(got, want):
                if w is not None:
                    torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
@pytest.mark.parametrize("inputs", ["self", "cross"])
def test_bias_kv_and_zero_attn_equal_torchs_module(options, inputs):
    """The extra key and value (``bias_k``/``bias_v``, a key of zeros) are added as torch's module adds them,
    with every mask widened over them."""

    def make(batch_first):
        att = nn.MultiheadAttention(16, 4, batch_first=batch_first, **options)
        for b in (att.bias_k, att.bias_v):
            if b is not None:
                nn.init.normal_(b)
        return att

    assert_same_as_torchs_module(make, inputs)


class ExtraKeys(nn.Module):
    """A residual self-attention with torch's options that add keys, beside an MLP."""

    def __init__(self, **options):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True, **options)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.fc(h + self.att(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(o))
def test_bias_kv_and_zero_attn_lose_whole_heads(options):
    """The heads are one group (with the head's entries of bias_k and bias_v); compact cuts the pruned heads
    out of both biases too, and the result is what torch's module computes with the masked weights."""
    torch.manual_seed(0)
    model = ExtraKeys(**options)
    for b in (model.att.bias_k, model.att.bias_v):
        if b is not None:
            nn.init.normal_(b)
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # bias_k and bias_v get no mask (they are not weights of a layer)
        sparse = gf.sparsify(model, channel_config(), example_inputs=(x,))
    assert type(sparse.att) is SplitHeadsAttention
    (heads,) = [g for g in gf.sparse_info(sparse).channel_groups
                if any(m.weight == "att.in_proj_weight" and m.role == "row" for m in g.members)]
    assert heads.size == 4 and not heads.pinned
    if "add_bias_kv" in options:
        assert {(m.weight, m.repeat) for m in heads.members if m.role == "param"} == {("att.bias_k", 4),
                                                                                      ("att.bias_v", 4)}
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    kept = kept_heads(sparse)
    assert 0 < len(kept) < 4
    small = gf.compact(sparse.eval(), x)
    assert small.att.num_heads == len(kept) and small.att.in_proj_weight.shape[0] == 12 * len(kept)
    folded = gf.fold(sparse)
    torchs = nn.MultiheadAttention(16, 4, batch_first=True, **options)    # torch's module, the masked weights
    torchs.load_state_dict(folded.att.state_dict())
    if "add_bias_kv" in options:
        channels = [c for h in kept for c in range(4 * h, 4 * h + 4)]
        assert torch.equal(small.att.bias_k, folded.att.bias_k[..., channels])
        assert torch.equal(small.att.bias_v, folded.att.bias_v[..., channels])
    with torch.no_grad():
        h = folded.inp(x)
        torch.testing.assert_close(small(x), folded.fc(h + torchs.eval()(h, h, h)[0]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_kdim_and_vdim_equal_torchs_module(bias):
    """Keys and values of other widths than the queries: three weights, one bias."""
    assert_same_as_torchs_module(
        lambda batch_first: nn.MultiheadAttention(16, 4, kdim=12, vdim=10, bias=bias, batch_first=batch_first),
        "cross", widths=(16, 12, 10))


class KeyValueWidths(nn.Module):
    """Cross-attention whose keys (12 wide) and values (10 wide) come from their own linear layers."""

    def __init__(self, bias=True):
        super().__init__()
        self.inp, self.k_in, self.v_in = nn.Linear(8, 16), nn.Linear(6, 12), nn.Linear(6, 10)
        self.att = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, bias=bias, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x, memory):
        h = self.inp(x)
        return self.fc(h + self.att(h, self.k_in(memory), self.v_in(memory), need_weights=False)[0])


@pytest.mark.parametrize("bias", [True, False])
def test_kdim_and_vdim_lose_whole_heads(bias):
    """A head is rows of q_proj_weight, k_proj_weight and v_proj_weight and of each third of in_proj_bias, and
    columns of out_proj; the key and value widths are groups of their own. compact cuts heads and channels,
    and the result is what torch's module computes with the masked weights."""
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    sparse = gf.sparsify(KeyValueWidths(bias), channel_config(), example_inputs=(x, memory))
    assert type(sparse.att) is SplitHeadsAttention
    groups = gf.sparse_info(sparse).channel_groups
    (heads,) = [g for g in groups if any(m.weight == "att.q_proj_weight" and m.role == "row" for m in g.members)]
    assert heads.size == 4 and not heads.pinned
    expected = {("row", "att.q_proj_weight", 0), ("row", "att.k_proj_weight", 0), ("row", "att.v_proj_weight", 0),
                ("column", "att.out_proj.weight", 0)}
    if bias:
        expected |= {("param", "att.in_proj_bias", 16), ("param", "att.in_proj_bias", 32)}
    assert {(m.role, m.weight, m.offset) for m in heads.members} == expected
    assert all(m.repeat == 4 for m in heads.members)
    (keys,) = [g for g in groups if any(m.weight == "k_in.weight" for m in g.members)]
    assert keys.size == 12 and {(m.role, m.weight) for m in keys.members} == {("row", "k_in.weight"),
                                                                             ("column", "att.k_proj_weight")}
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    kept = kept_heads(sparse)
    assert 0 < len(kept) < 4
    small = gf.compact(sparse.eval(), (x, memory))
    att = small.att
    assert (att.num_heads, att.split_size) == (len(kept), 4 * len(kept))
    assert (att.embed_dim, att.kdim, att.vdim) == (small.inp.out_features, small.k_in.out_features,
                                                   small.v_in.out_features)
    assert att.kdim < 12 and att.vdim < 10
    folded = gf.fold(sparse)
    if bias:
        rows = [p * 16 + c for p in range(3) for h in kept for c in range(4 * h, 4 * h + 4)]
        assert torch.equal(att.in_proj_bias, folded.att.in_proj_bias[rows])
    torchs = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, bias=bias, batch_first=True)
    torchs.load_state_dict(folded.att.state_dict())
    with torch.no_grad():
        h = folded.inp(x)
        want = folded.fc(h + torchs.eval()(h, folded.k_in(memory), folded.v_in(memory))[0])
        torch.testing.assert_close(small(x, memory), want, atol=1e-5, rtol=1e-5)


class Block(nn.Module):
    """A residual self-attention block as nn.MultiheadAttention is mostly used, then an MLP and a head."""

    def __init__(self, dim=32, heads=4, batch_first=True, need_weights=True):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.inp = nn.Linear(8, dim)
        self.att = nn.MultiheadAttention(dim, heads, batch_first=batch_first)
        self.fc1, self.fc2, self.out = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim), nn.Linear(dim, 3)

    def forward(self, x):
        h = self.inp(x) if self.batch_first else self.inp(x).transpose(0, 1)
        a, _ = self.att(h, h, h, need_weights=self.need_weights)       # the weights, if any, are dropped
        h = h + a
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.out(h.mean(1 if self.batch_first else 0))


def assert_four_free_heads(groups, width):
    """``groups`` hold one free group of the 4 heads of ``att`` (``width`` wide): rows of each of the q, k and
    v pieces of its projection and columns of its out_proj, a head's channels at a time."""
    (heads,) = [g for g in groups if any(m.weight == "att.in_proj_weight" and m.role == "row" for m in g.members)]
    assert heads.size == 4 and not heads.pinned
    head = width // 4
    assert {(m.role, m.weight, m.offset, m.repeat) for m in heads.members} == {
        ("row", "att.in_proj_weight", 0, head), ("row", "att.in_proj_weight", width, head),
        ("row", "att.in_proj_weight", 2 * width, head), ("column", "att.out_proj.weight", 0, head)}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_heads_are_one_group_of_q_k_v_pieces_and_out_proj_columns(batch_first, need_weights):
    model = Block(batch_first=batch_first, need_weights=need_weights)
    keys = set(model.state_dict())
    sparse = gf.sparsify(model, channel_config(), example_inputs=(torch.randn(2, 5, 8),))
    assert type(sparse.att) is SplitHeadsAttention and sparse.att.split_size == 32
    assert set(sparse.state_dict()) == keys | {k + "_mask" for k in keys if k.endswith("weight")}
    groups = gf.sparse_info(sparse).channel_groups
    assert_four_free_heads(groups, width=32)
    # the residual stream (width 32) is read by the attention's projection and made by its output projection
    (stream,) = [g for g in groups if any(m.weight == "inp.weight" for m in g.members)]
    assert not stream.pinned and {("column", "att.in_proj_weight"), ("row", "att.out_proj.weight")} <= {
        (m.role, m.weight) for m in stream.members}


def test_attention_weights_that_reach_the_output_keep_the_heads():
    class Weights(Block):
        def forward(self, x):
            h = self.inp(x)
            a, w = self.att(h, h, h)
            return self.out(a.mean(1)), w           # the weights average every head

    sparse = gf.sparsify(Weights(), channel_config(), example_inputs=(torch.randn(2, 5, 8),))
    (heads,) = [g for g in gf.sparse_info(sparse).channel_groups
                if any(m.weight == "att.in_proj_weight" and m.role == "row" for m in g.members)]
    assert heads.pinned


class Attention(nn.Module):
    """nn.MultiheadAttention alone (16 wide, heads of 4), the shape test_heads.granet_on_heads trains."""

    def __init__(self, dim=16, heads=4):
        super().__init__()
        self.att = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        return self.att(x, x, x, need_weights=False)[0]


def by_hand(att, x, heads, memory=None):
    """The attention of ``att`` (batch first; of ``x`` to ``memory``, itself by default) over the given heads
    only, a head at a time."""
    w, dim = att.head_dim, att.out_proj.weight.shape[0]
    weight, bias = att.in_proj_weight, att.in_proj_bias
    out = att.out_proj.bias.expand(*x.shape[:2], -1).clone()
    sources = (x, x, x) if memory is None else (x, memory, memory)
    for h in heads:
        q, k, v = (s @ weight[p * dim + h * w:p * dim + (h + 1) * w].T + bias[p * dim + h * w:p * dim + (h + 1) * w]
                   for p, s in enumerate(sources))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(w), dim=-1) @ v
        out = out + a @ att.out_proj.weight[:, h * w:(h + 1) * w].T
    return out


def test_by_hand_is_torchs_attention():
    att = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(by_hand(att, x, range(4)), att(x, x, x)[0], atol=1e-6, rtol=1e-5)


def test_granet_keeps_whole_heads_and_compact_removes_them():
    """Channel GraNet with regrowth: every step masks whole heads; compact cuts them out of q, k, v and
    out_proj, and the module's sizes follow."""

    def whole_heads(sparse):
        columns = sparse.get_buffer("att.out_proj.weight_mask").view(16, 4, 4)   # (out, head, channel of the head)
        assert bool((columns == columns[:1, :, :1]).all()), "a head is masked only in part"

    torch.manual_seed(0)
    sparse = granet_on_heads(Attention(), whole_heads)
    kept = kept_heads(sparse)
    assert len(kept) == 2
    x = torch.randn(3, 5, 16)
    small = gf.compact(sparse, x)
    att = small.att
    assert tuple(att.in_proj_weight.shape) == (24, 16) and tuple(att.in_proj_bias.shape) == (24,)
    assert tuple(att.out_proj.weight.shape) == (16, 8) and att.out_proj.in_features == 8
    assert (att.split_size, att.num_heads, att.head_dim, att.embed_dim) == (8, 2, 4, 16)
    folded = gf.fold(sparse).att
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand(folded, x, kept))
        torch.testing.assert_close(small(x), sparse.eval()(x), atol=1e-6, rtol=1e-5)
        # the compacted module runs every path: weights over its 2 heads, cross-attention, masks
        y = torch.randn(3, 7, 16)
        out, weights = att(x, y, y, key_padding_mask=torch.zeros(3, 7, dtype=torch.bool))
        assert out.shape == (3, 5, 16) and weights.shape == (3, 5, 7)


class CrossAttention(nn.Module):
    """Queries from one sequence, keys and values from another, each through its own linear layer."""

    def __init__(self):
        super().__init__()
        self.q_in, self.kv_in = nn.Linear(8, 16), nn.Linear(6, 16)
        self.att = nn.MultiheadAttention(16, 4, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x, memory):
        h, m = self.q_in(x), self.kv_in(memory)
        return self.out(self.att(h, m, m, need_weights=False)[0])


def test_cross_attention_loses_whole_heads():
    """In cross-attention the query, key and value projections are slices of one weight: a head is rows of
    each slice and columns of out_proj, and the two input sequences share the weight's input channels, so
    they keep the same ones. compact removes heads and input channels; the result is the attention computed
    by hand over the kept heads."""
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    sparse = gf.sparsify(CrossAttention(), channel_config(), example_inputs=(x, memory))
    groups = gf.sparse_info(sparse).channel_groups
    assert_four_free_heads(groups, width=16)
    (inputs,) = [g for g in groups if any(m.weight == "q_in.weight" for m in g.members)]
    assert {(m.role, m.weight) for m in inputs.members} >= {
        ("row", "q_in.weight"), ("row", "kv_in.weight"), ("column", "att.in_proj_weight")}
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    kept = kept_heads(sparse)
    assert 0 < len(kept) < 4
    small = gf.compact(sparse.eval(), (x, memory))
    att = small.att
    assert (att.num_heads, att.split_size) == (len(kept), 4 * len(kept))
    assert att.in_proj_weight.shape[0] == 12 * len(kept) and small.q_in.out_features == att.embed_dim
    folded = gf.fold(sparse)
    with torch.no_grad():
        h, m = folded.q_in(x), folded.kv_in(memory)
        torch.testing.assert_close(small(x, memory), folded.out(by_hand(folded.att, h, kept, m)), atol=1e-5,
                                   rtol=1e-5)


def test_the_residual_stream_through_the_attention_compacts():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sparse = gf.sparsify(Block(), channel_config(), example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    sparse.eval()
    small = gf.compact(sparse, x)
    att = small.att
    stream = att.in_proj_weight.shape[1]
    assert stream < 32 and att.num_heads < 4
    assert (att.embed_dim, att.split_size) == (stream, att.num_heads * 8)
    assert tuple(att.out_proj.weight.shape) == (stream, att.split_size) and small.fc1.in_features == stream
    with torch.no_grad():
        torch.testing.assert_close(small(x), sparse(x), atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_granet_export_compacts_the_heads(tmp_path):
    torch.manual_seed(0)
    model = Attention()
    sparse = gf.sparsify(model, channel_config(), example_inputs=(torch.randn(2, 5, 16),))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    kept = kept_heads(sparse)
    assert len(kept) == 2
    x = torch.randn(2, 5, 16)
    gf.save(sparse, tmp_path / "m.pt", example_inputs=(x,))
    run = granet_export(tmp_path / "m.pt", tmp_path / "m.onnx", "--compact")
    assert "removed 2 of" in run.stdout, run.stdout
    import onnx
    import onnxruntime

    shapes = Counter(tuple(i.dims) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)
    assert not {(48, 16), (16, 48), (16, 16)} & set(shapes), shapes          # no projection of 4 heads is left
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), by_hand(gf.fold(sparse).att, x, kept), atol=1e-5,
                                   rtol=1e-5)


class Attentions(nn.Module):
    """A cross-attention, one with keys and values of other widths, and one with extra keys, in a residual stream."""

    def __init__(self):
        super().__init__()
        self.inp, self.mem = nn.Linear(8, 16), nn.Linear(6, 16)
        self.k_in, self.v_in = nn.Linear(6, 12), nn.Linear(6, 10)
        self.cross = nn.MultiheadAttention(16, 4, batch_first=True)
        self.widths = nn.MultiheadAttention(16, 4, kdim=12, vdim=10, batch_first=True)
        self.extra = nn.MultiheadAttention(16, 4, add_bias_kv=True, add_zero_attn=True, batch_first=True)
        self.fc = nn.Linear(16, 3)

    def forward(self, x, memory, attentions=None):
        cross, widths, extra = attentions or (self.cross, self.widths, self.extra)
        h, m = self.inp(x), self.mem(memory)
        h = h + cross(h, m, m, need_weights=False)[0]
        h = h + widths(h, self.k_in(memory), self.v_in(memory), need_weights=False)[0]
        return self.fc(h + extra(h, h, h, need_weights=False)[0])


def test_granet_export_compacts_the_heads_of_every_option(tmp_path):
    """Through granet-export (a graph that is the model's code, whose split widths are numbers it rewrites):
    cross-attention, kdim/vdim and add_bias_kv/add_zero_attn lose heads, and onnxruntime computes what torch's
    own modules compute with the masked weights."""
    torch.manual_seed(0)
    x, memory = torch.randn(2, 5, 8), torch.randn(2, 7, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # bias_k and bias_v get no mask (they are not weights of a layer)
        sparse = gf.sparsify(Attentions(), channel_config(scope="layer"), example_inputs=(x, memory))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    gf.save(sparse, tmp_path / "m.pt", example_inputs=(x, memory))
    granet_export(tmp_path / "m.pt", tmp_path / "m.onnx", "--compact")
    import onnxruntime

    folded = gf.fold(sparse).eval()
    torchs = []
    for name, options in (("cross", {}), ("widths", {"kdim": 12, "vdim": 10}),
                          ("extra", {"add_bias_kv": True, "add_zero_attn": True})):
        heads = int(folded.get_submodule(name).out_proj.weight.reshape(16, 4, 4).abs().sum((0, 2)).ne(0).sum())
        assert heads < 4, name
        att = nn.MultiheadAttention(16, 4, batch_first=True, **options)
        att.load_state_dict(folded.get_submodule(name).state_dict())
        torchs.append(att.eval())
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, dict(zip(names, (x.numpy(), memory.numpy()))))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), folded(x, memory, torchs), atol=1e-5, rtol=1e-5)
    import onnx

    widths = {tuple(i.dims) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer}
    assert not {(48, 16), (16, 12), (16, 10), (1, 1, 16)} & widths, widths    # no weight of 4 heads is left


class OwnEncoderLayer(nn.TransformerEncoderLayer):
    """A user's subclass of torch's encoder layer: its forward may be anything, so it keeps torch's classes."""


class Options(nn.Module):
    """An encoder layer that keeps torch's classes, and a cross-attention, beside an MLP whose channels can go."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.cross = nn.MultiheadAttention(16, 4, batch_first=True)
        self.layer = OwnEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.cross(h, h.flip(1), h.flip(1))[0]
        return self.fc2(torch.relu(self.fc1(self.layer(h))))


def test_a_subclassed_encoder_layer_keeps_torchs_module_and_its_heads_quietly():
    torch.manual_seed(0)
    model = Options()
    reference = copy.deepcopy(model).eval()
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sparse = gf.sparsify(model, channel_config(), example_inputs=(x,))
    assert not caught, [str(w.message) for w in caught]      # nothing about attention heads
    assert type(sparse.layer.self_attn) is nn.MultiheadAttention
    assert type(sparse.layer) is OwnEncoderLayer
    assert type(sparse.cross) is SplitHeadsAttention
    groups = gf.sparse_info(sparse).channel_groups
    for g in groups:
        if any(("in_proj_weight" in m.weight or "out_proj" in m.weight) and not m.weight.startswith("cross.")
               for m in g.members if m.weight):
            assert g.pinned, g
    assert any(not g.pinned and any(m.weight == "fc1.weight" for m in g.rows) for g in groups)
    with torch.no_grad():
        torch.testing.assert_close(sparse.eval()(x), reference(x), atol=1e-6, rtol=1e-5)   # still all kept


def test_unstructured_sparsity_keeps_torchs_module():
    model = Block()
    sparse = gf.sparsify(model, gf.GraNetConfig(final_sparsity=0.5, total_steps=10),
                         example_inputs=(torch.randn(2, 5, 8),))
    assert type(sparse.att) is nn.MultiheadAttention
    assert {"att.in_proj_weight", "att.out_proj.weight"} <= {l.name for l in gf.sparse_info(sparse).masked}


# torch's Transformer layers ------------------------------------------------------------------------------


def encoder_pair(norm_first, batch_first, nested):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, norm_first=norm_first, batch_first=batch_first)
    reference = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested)
    ours = copy.deepcopy(reference)
    assert split_attention_heads(ours) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert all(type(m) is SplitHeadsEncoderLayer for m in ours.layers)
    return reference, ours


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layers_compute_what_torchs_compute(norm_first, batch_first):
    """In training and in eval, with and without grad (torch's fused inference op), with a padding mask, a
    causal mask or none, against torch's own encoder; padded positions apart, which torch's nested-tensor
    path sets to zero and the module path computes."""
    reference, ours = encoder_pair(norm_first, batch_first, nested=True)
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[0, 4:] = padding[2, 5:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    for training, grad in ((True, True), (False, True), (False, False)):
        reference.train(training), ours.train(training)
        for kw in ({}, {"src_key_padding_mask": padding}, {"mask": causal, "is_causal": True}):
            src = x if batch_first else x.transpose(0, 1)
            with torch.set_grad_enabled(grad):
                expected, got = reference(src, **kw), ours(src, **kw)
            if not batch_first:
                expected, got = expected.transpose(0, 1), got.transpose(0, 1)
            if "src_key_padding_mask" in kw:
                expected, got = expected[~padding], got[~padding]
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


class Seq2Seq(nn.Module):
    """torch's encoder (two layers) and decoder layer, between a linear input and a linear head."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.decoder = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)
        memory = self.encoder(h)
        return self.out(self.decoder(h.flip(1), memory).mean(1))


def test_transformer_layers_lose_whole_heads():
    """Channel pruning to 50% on torch's layers: the self-attention of each encoder layer and of the decoder
    layer, and the decoder's cross-attention, keep whole heads, and compact removes the others.
    The compacted model computes the masked model's outputs in eval without grad, where torch's layers would
    take their fused op."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    sparse = gf.sparsify(Seq2Seq(), channel_config(), example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    names = ["encoder.layers.0.self_attn", "encoder.layers.1.self_attn", "decoder.self_attn",
             "decoder.multihead_attn"]
    heads = {}
    for name in names:
        mask = sparse.get_buffer(f"{name}.out_proj.weight_mask").view(16, 4, 4)   # (out, head, channel)
        assert bool((mask == mask[:1, :, :1]).all()), f"{name}: a head is masked only in part"
        heads[name] = int(mask[0, :, 0].sum())
    assert sum(heads.values()) < 16, heads
    sparse.eval()
    small = gf.compact(sparse, x)
    for name in names:
        att = small.get_submodule(name)
        assert att.num_heads == heads[name] and tuple(att.in_proj_weight.shape[:1]) == (3 * 4 * heads[name],)
    with torch.no_grad():
        torch.testing.assert_close(small(x), sparse(x), atol=1e-5, rtol=1e-5)
