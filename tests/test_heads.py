"""Attention heads as channel groups: found in the graph, compacted a head at a time, and trained
by channel GraNet, checked against attention computed by hand over the kept heads."""

import math
from collections import Counter
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes.channel_groups import channel_groups
from granet_fx.structured import ChannelMasks

from helpers import granet_export


class Attention(nn.Module):
    """Self-attention written the way HF models write it: separate q, k, v projections, heads by a
    view with -1 heads, scaled_dot_product_attention, and an output projection."""

    def __init__(self, dim=16, width=4):
        super().__init__()
        self.width = width
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.width).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def by_hand(model, x, heads):
    """The attention of ``model`` over the given heads only, one head at a time in plain torch."""
    w = model.width
    out = model.o.bias.expand(*x.shape[:2], -1).clone()
    for h in heads:
        rows = slice(h * w, (h + 1) * w)
        q, k, v = (x @ f.weight[rows].T + f.bias[rows] for f in (model.q, model.k, model.v))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(w), dim=-1) @ v
        out = out + a @ model.o.weight[:, rows].T
    return out


def test_heads_are_one_group_of_whole_heads():
    groups = channel_groups(Attention(dim=16, width=4), torch.randn(2, 5, 16))
    heads = [g for g in groups if any(m.weight == "q.weight" for m in g.rows)]
    assert len(heads) == 1
    g = heads[0]
    assert g.size == 4 and not g.pinned
    assert {(m.role, m.weight, m.offset, m.repeat) for m in g.members} == {
        ("row", "q.weight", 0, 4), ("row", "k.weight", 0, 4), ("row", "v.weight", 0, 4), ("column", "o.weight", 0, 4)}
    assert g.rows[0].indices(torch.tensor([2])).tolist() == [8, 9, 10, 11]   # head 2 is rows 8..11


def test_compact_removes_whole_heads_and_matches_attention_by_hand():
    torch.manual_seed(0)
    model = Attention(dim=16, width=4).eval()
    with torch.no_grad():
        model.o.weight[:, 4:8] = 0      # heads 1 and 3 are read by nothing
        model.o.weight[:, 12:16] = 0
    x = torch.randn(3, 6, 16)
    small = gf.compact(model, x)
    assert tuple(small.q.weight.shape) == (8, 16) and tuple(small.o.weight.shape) == (16, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand(model, x, [0, 2]))
        torch.testing.assert_close(by_hand(model, x, [0, 1, 2, 3]), model(x))   # the hand computation itself


class GroupedQuery(nn.Module):
    """Grouped-query attention as Llama writes it: 2 key/value heads of 4, each repeated for 2 query heads."""

    def __init__(self, dim=16, width=4, kv_heads=2):
        super().__init__()
        self.width, self.repeat = width, dim // width // kv_heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * width), nn.Linear(dim, kv_heads * width)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.width).transpose(1, 2) for f in (self.q, self.k, self.v))
        k, v = (y[:, :, None].expand(b, y.shape[1], self.repeat, t, self.width).reshape(b, -1, t, self.width)
                for y in (k, v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, -1))


def test_grouped_query_heads_go_with_their_key_value_head():
    torch.manual_seed(0)
    model = GroupedQuery().eval()
    x = torch.randn(3, 6, 16)
    (g,) = [g for g in channel_groups(model, x) if any(m.weight == "k.weight" for m in g.rows)]
    assert g.size == 2 and not g.pinned
    assert {(m.role, m.weight, m.repeat) for m in g.members} == {
        ("row", "q.weight", 8), ("row", "k.weight", 4), ("row", "v.weight", 4), ("column", "o.weight", 8)}
    with torch.no_grad():
        model.o.weight[:, 0:8] = 0          # query heads 0 and 1, which read key/value head 0
    small = gf.compact(model, x)
    assert tuple(small.q.weight.shape) == (8, 16) and tuple(small.k.weight.shape) == (4, 16)
    # by hand: query heads 2 and 3 against key/value head 1
    with torch.no_grad():
        k, v = (x @ f.weight[4:8].T + f.bias[4:8] for f in (model.k, model.v))
        out = model.o.bias.expand(3, 6, -1).clone()
        for h in (2, 3):
            rows = slice(h * 4, (h + 1) * 4)
            q = x @ model.q.weight[rows].T + model.q.bias[rows]
            out += (torch.softmax(q @ k.transpose(1, 2) / 2.0, dim=-1) @ v) @ model.o.weight[:, rows].T
        torch.testing.assert_close(small(x), out)


def test_heads_of_different_widths_or_merged_with_the_batch_stay():
    class Mismatched(Attention):
        def forward(self, x):
            b, t, _ = x.shape
            q, k = (f(x).view(b, t, -1, self.width).transpose(1, 2) for f in (self.q, self.k))
            v = self.v(x).view(b, t, -1, 2 * self.width).transpose(1, 2)   # 2 heads of 8 against 4 of 4
            return self.o(F.scaled_dot_product_attention(q[:, :2], k[:, :2], v).transpose(1, 2).reshape(b, t, -1))

    for model in (Mismatched(), nn.MultiheadAttention(16, 4, batch_first=True)):
        x = torch.randn(2, 5, 16)
        inputs = (x,) if isinstance(model, Mismatched) else (x, x, x)
        groups = channel_groups(model, inputs)
        for g in groups:
            if any(m.weight in ("q.weight", "k.weight", "v.weight", "in_proj_weight") for m in g.rows):
                assert g.pinned, g


def test_channel_multiple_counts_channels_not_heads():
    """With channel_multiple=8 and heads 4 channels wide, two heads are a multiple of 8 channels."""
    model = Attention(dim=32, width=4)
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1, channel_multiple=8)
    sparse = gf.sparsify(model, config, example_inputs=(torch.randn(2, 5, 32),))
    masks = ChannelMasks(sparse, channel_groups(sparse, torch.randn(2, 5, 32)), ["q.weight", "k.weight", "v.weight",
                                                                                     "o.weight"], multiple=8)
    (i,) = [i for i, g in enumerate(masks.groups) if g.size == 8]
    assert masks.multiples[i] == 2
    assert masks.costs[i] == 3 * 4                       # a head is 4 rows of each of q, k and v


def tiny_bert():
    import transformers

    config = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                                     intermediate_size=128, max_position_embeddings=16)
    return transformers.BertModel(config).eval(), torch.randint(0, 100, (2, 8))


class NumberedHeads(Attention):
    """Heads by a view that writes the number of heads, as code that reads ``self.heads`` does."""

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 4, self.width).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, 16))


def test_heads_written_as_numbers_stay_in_python_and_go_from_a_file(tmp_path):
    """The model's code keeps its numbers, so ``gf.compact`` keeps the heads; the graph in a saved file is
    the code that runs, so ``granet-export --compact`` rewrites the numbers and removes them."""
    torch.manual_seed(0)
    model = NumberedHeads(dim=16, width=4).eval()
    with torch.no_grad():
        model.o.weight[:, 4:8] = 0          # heads 1 and 3 are read by nothing
        model.o.weight[:, 12:16] = 0
    x = torch.randn(2, 6, 16)
    assert tuple(gf.compact(model, x).q.weight.shape) == (16, 16)
    gf.save(model, tmp_path / "m.pt", example_inputs=(x,))
    run = granet_export(tmp_path / "m.pt", tmp_path / "m.onnx", "--compact")
    assert "removed 2 of" in run.stdout, run.stdout               # 2 heads
    import onnx
    import onnxruntime

    shapes = Counter(tuple(i.dims) for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer)
    assert shapes[(8,)] == 3 and shapes[(16, 8)] >= 1, shapes      # q, k, v biases and weights of 2 heads
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randn(3, 6, 16)
    (out,) = session.run(None, {session.get_inputs()[0].name: other.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), by_hand(model, other, [0, 2]), atol=1e-5, rtol=1e-5)


def test_bert_loses_whole_heads_and_granet_export_compacts_it(tmp_path):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, x = tiny_bert()
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1)
    sparse = gf.sparsify(model, config, example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    kept = []
    for layer in range(2):
        mask = sparse.get_buffer(f"encoder.layer.{layer}.attention.output.dense.weight_mask")
        per_head = mask.view(64, 8, 8).all(2).all(0)          # column c belongs to head c // 8
        assert bool((mask.view(64, 8, 8).any(2) == per_head[None]).all()), "a head is masked only in part"
        kept.append(int(per_head.sum()))
    assert min(kept) < 8, kept

    gf.save(sparse, tmp_path / "bert.pt", example_inputs=(x,))
    granet_export(tmp_path / "bert.pt", tmp_path / "bert.onnx", "--compact")
    import onnx

    # the exporter stores q, k, v transposed, (64, 8 x heads), and the output projection as (8 x heads, 64)
    shapes = Counter(tuple(i.dims) for i in onnx.load(str(tmp_path / "bert.onnx")).graph.initializer)
    for heads in set(kept):
        layers = kept.count(heads)
        assert shapes[(64, 8 * heads)] >= 3 * layers and shapes[(8 * heads, 64)] >= layers, (kept, shapes)
    assert shapes[(64, 64)] == 1                          # only the pooler is still 64 x 64


def granet_on_heads(model, after_step):
    """``model`` (16 channels wide) trained 12 steps by channel GraNet with regrowth to final_sparsity=0.5,
    ``after_step(sparse)`` called after every step."""
    config = gf.GraNetConfig(method="granet", granularity="channel", final_sparsity=0.5, total_steps=12,
                             prune_end=8, update_every=2)
    sparse = gf.sparsify(model, config, example_inputs=(torch.randn(2, 5, 16),))
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.05)
    granet = gf.GraNet(sparse, optimizer)
    for _ in range(12):
        x = torch.randn(4, 5, 16)
        F.mse_loss(sparse(x), x.flip(1)).backward()
        optimizer.step()
        granet.step()
        optimizer.zero_grad()
        after_step(sparse)
    return sparse


def test_granet_trains_whole_heads_to_the_target():
    """Channel GraNet with regrowth on the attention alone: its only removable channels are its heads, so
    final_sparsity=0.5 keeps 2 of 4 heads, each masked whole at every step."""

    def whole_heads(sparse):
        columns = sparse.get_buffer("o.weight_mask").view(16, 4, 4)      # (out, head, channel of the head)
        assert bool((columns == columns[:1, :, :1]).all()), "a head is masked only in part"

    torch.manual_seed(0)
    sparse = granet_on_heads(Attention(dim=16, width=4), whole_heads)
    kept = sparse.get_buffer("o.weight_mask")[0].view(4, 4)[:, 0]
    assert int(kept.sum()) == 2
    assert sparse.get_parameter("o.weight")[:, ~kept.repeat_interleave(4)].abs().sum() == 0   # read by nothing


@pytest.mark.slow
def test_channel_zoo_benchmark_runs_as_a_command(tmp_path):
    pytest.importorskip("transformers")
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "channel_zoo.py")
    run = subprocess.run([sys.executable, script, "--only", "bert", "gpt2", "--out", str(tmp_path / "zoo")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    import json

    rows = {r["model"]: r for r in json.loads((tmp_path / "zoo.json").read_text())["rows"]}
    assert rows["bert"]["head_groups"] == 2 and rows["bert"]["heads"] == 8 and rows["bert"]["heads_kept"] < 8
    assert rows["bert"]["normed_groups"] == 1 and rows["bert"]["normed"] == 32    # the residual stream, tied head
    assert rows["gpt2"]["head_groups"] == 2 and rows["gpt2"]["heads_kept"] < rows["gpt2"]["heads"]   # fused q, k, v
    assert rows["gpt2"]["removed"] > 0 and rows["gpt2"]["macs_ratio"] < 1.0
