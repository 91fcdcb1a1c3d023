"""Linear layers computed by matrix products: GPT-2's layout, weights stored (in, out) and computed by addmm
(HF's ``Conv1D``), with a fused query-key-value projection split into q, k and v by the attention's
``split_size``; and Falcon's ``x @ weight.T``. Checked against attention and MLPs computed by hand over the
kept heads and channels."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.passes.channel_groups import channel_groups

from test_heads import granet_on_heads


class Conv1D(nn.Module):
    """HF's ``Conv1D``, as transformers writes it: ``x @ weight + bias`` with the weight (in, out)."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class FusedAttention(nn.Module):
    """GPT-2's attention: one projection to q, k and v, split by ``split_size``; heads by a view with -1."""

    def __init__(self, dim=16, width=4, split_by_attribute=True):
        super().__init__()
        self.width = width
        if split_by_attribute:
            self.split_size = dim
        self.c_attn, self.c_proj = Conv1D(3 * dim, dim), Conv1D(dim, dim)

    def forward(self, x):
        size = getattr(self, "split_size", x.shape[-1])
        q, k, v = (t.view(*t.shape[:-1], -1, self.width).transpose(1, 2)
                   for t in self.c_attn(x).split(size, dim=2))
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*x.shape[:-1], -1))


def by_hand(model, x, heads):
    """``model``'s attention over the given heads only, a head at a time in plain torch."""
    w, dim = model.width, model.c_proj.weight.shape[1]
    weight, bias = model.c_attn.weight, model.c_attn.bias
    out = model.c_proj.bias.expand(*x.shape[:2], -1).clone()
    for h in heads:
        q, k, v = (x @ weight[:, p * dim + h * w:p * dim + (h + 1) * w] + bias[p * dim + h * w:p * dim + (h + 1) * w]
                   for p in range(3))
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(w), dim=-1) @ v
        out = out + a @ model.c_proj.weight[h * w:(h + 1) * w]
    return out


def test_a_fused_projection_is_three_pieces_of_one_group_of_heads():
    groups = channel_groups(FusedAttention(dim=16, width=4), torch.randn(2, 5, 16))
    (g,) = [g for g in groups if any(m.weight == "c_attn.weight" for m in g.rows)]
    assert g.size == 4 and not g.pinned
    assert {(m.role, m.weight, m.offset, m.repeat, m.transposed) for m in g.members} == {
        ("row", "c_attn.weight", 0, 4, True), ("row", "c_attn.weight", 16, 4, True),
        ("row", "c_attn.weight", 32, 4, True), ("column", "c_proj.weight", 0, 4, True)}
    # head 2 of k: columns 16 + 8 .. 16 + 11 of the (in, out) weight
    k = [m for m in g.rows if m.offset == 16][0]
    assert k.dim == 1 and k.indices(torch.tensor([2])).tolist() == [24, 25, 26, 27]


def test_compact_removes_whole_heads_from_q_k_and_v_and_rewrites_split_size():
    torch.manual_seed(0)
    model = FusedAttention(dim=16, width=4).eval()
    with torch.no_grad():
        model.c_proj.weight[4:8] = 0           # heads 1 and 3 are read by nothing (rows: the input channels)
        model.c_proj.weight[12:16] = 0
    x = torch.randn(3, 6, 16)
    small = gf.compact(model, x)
    assert tuple(small.c_attn.weight.shape) == (16, 24) and tuple(small.c_attn.bias.shape) == (24,)
    assert tuple(small.c_proj.weight.shape) == (8, 16)
    assert (small.split_size, small.c_attn.nf, small.c_proj.nx) == (8, 24, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand(model, x, [0, 2]))
        torch.testing.assert_close(by_hand(model, x, range(4)), model(x))   # the hand computation itself
    # q, k, v heads 4 + 4 + 4 of 4 x 16, and c_proj's 16 x 16, on 18 positions, become 2 heads each
    report = gf.compaction_report(small)
    assert (report.macs_before, report.macs_after) == (18 * (48 + 16) * 16, 18 * (24 + 8) * 16)


def test_a_split_by_a_size_compaction_cannot_change_keeps_its_heads():
    torch.manual_seed(0)
    model = FusedAttention(dim=16, width=4, split_by_attribute=False).eval()
    with torch.no_grad():
        model.c_proj.weight[4:8] = 0
    x = torch.randn(3, 6, 16)
    small = gf.compact(model, x)
    assert tuple(small.c_attn.weight.shape) == (16, 48)
    report = gf.compaction_report(small)
    assert any("splits the output of c_attn.weight" in reason for reason in report.kept), report.kept


class MLP(nn.Module):
    def __init__(self, dim=8, hidden=32):
        super().__init__()
        self.c_fc, self.c_proj = Conv1D(hidden, dim), Conv1D(dim, hidden)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


def test_channel_granet_prunes_conv1d_columns_and_compacts_to_the_kept_channels():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8)
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1)
    sparse = gf.sparsify(MLP(), config, example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    mask = sparse.get_buffer("c_proj.weight_mask")                     # (hidden, dim): a row per hidden channel
    kept = mask.all(1).nonzero().squeeze(1)
    assert len(kept) == 16 and bool((mask.any(1) == mask.all(1)).all()), "a channel is masked only in part"
    small = gf.compact(sparse, x)
    assert tuple(small.c_fc.weight.shape) == (8, 16) and tuple(small.c_proj.weight.shape) == (16, 8)
    assert (small.c_fc.nf, small.c_proj.nx) == (16, 16)
    with torch.no_grad():
        w1, b1 = sparse.get_parameter("c_fc.weight"), sparse.get_parameter("c_fc.bias")
        w2, b2 = sparse.get_parameter("c_proj.weight"), sparse.get_parameter("c_proj.bias")
        expected = F.gelu(x @ w1[:, kept] + b1[kept]) @ w2[kept] + b2
        torch.testing.assert_close(small(x), expected)


def test_gpt2_loses_whole_heads_and_mlp_channels_in_gf_compact():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=16, use_cache=False)
    model = transformers.GPT2LMHeadModel(config).eval()
    x = torch.randint(0, 64, (2, 8))
    granet_config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1,
                                    prune_end=1, update_every=1, scope="layer")
    sparse = gf.sparsify(model, granet_config, example_inputs=(x,))
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    small = gf.compact(sparse, (x,))
    for layer in range(2):
        mask = sparse.get_buffer(f"transformer.h.{layer}.attn.c_proj.weight_mask")   # (heads x 8, 32)
        per_head = mask.view(4, 8, 32).all(2).all(1)
        assert bool((mask.view(4, 8, 32).any(2).any(1) == per_head).all()), "a head is masked only in part"
        heads = int(per_head.sum())
        attn = small.get_submodule(f"transformer.h.{layer}.attn")
        assert heads == 2 and attn.split_size == 8 * heads
        assert attn.c_attn.weight.shape[1] == 3 * 8 * heads and attn.c_proj.weight.shape[0] == 8 * heads
        assert small.get_submodule(f"transformer.h.{layer}.mlp.c_fc").weight.shape[1] == 64
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, sparse(x).logits, atol=1e-5, rtol=1e-5)


def test_granet_with_regrowth_keeps_whole_fused_heads_and_compacts_to_them():
    """Channel GraNet (pruning and gradient regrowth) on GPT-2's layout: at every step each head is masked
    whole in c_proj's rows, the weights it reads are zero, and the compacted model computes attention over
    the kept heads by hand."""
    def whole_heads(sparse):
        rows = sparse.get_buffer("c_proj.weight_mask").view(4, 4, 16)      # (head, channel of the head, out)
        assert bool((rows == rows[:, :1, :1]).all()), "a head is masked only in part"

    torch.manual_seed(0)
    sparse = granet_on_heads(FusedAttention(dim=16, width=4), whole_heads)
    kept = sparse.get_buffer("c_proj.weight_mask")[:, 0].view(4, 4)[:, 0]
    assert int(kept.sum()) == 2
    assert sparse.get_parameter("c_proj.weight")[~kept.repeat_interleave(4)].abs().sum() == 0
    x = torch.randn(3, 5, 16)
    small = gf.compact(sparse, x)
    assert small.split_size == 8 and tuple(small.c_attn.weight.shape) == (16, 24)
    folded = FusedAttention(dim=16, width=4)
    folded.load_state_dict({k: v for k, v in sparse.state_dict().items() if not k.endswith("_mask")})
    with torch.no_grad():
        torch.testing.assert_close(small(x), by_hand(folded, x, kept.nonzero().squeeze(1).tolist()))


class MatmulLinear(nn.Linear):
    """Falcon's ``FalconLinear``: ``x @ weight.T``, then the bias."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


def test_a_linear_layer_written_as_a_matmul_with_the_transposed_weight_compacts():
    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(8, 32), nn.GELU(), MatmulLinear(32, 8)).eval()
    x = torch.randn(4, 5, 8)
    (g,) = [g for g in channel_groups(model, x) if any(m.weight == "0.weight" for m in g.rows)]
    assert not g.pinned and {(m.role, m.weight, m.transposed) for m in g.members} >= {
        ("row", "0.weight", False), ("column", "2.weight", False)}
    with torch.no_grad():
        model[2].weight[:, 1::2] = 0                 # odd hidden channels are read by nothing
    small = gf.compact(model, x)
    assert tuple(small[0].weight.shape) == (16, 8) and tuple(small[0].bias.shape) == (16,)
    assert tuple(small[2].weight.shape) == (8, 16) and small[2].in_features == 16
    with torch.no_grad():
        keep = torch.arange(0, 32, 2)
        expected = F.gelu(x @ model[0].weight[keep].T + model[0].bias[keep]) @ model[2].weight[:, keep].T + model[2].bias
        torch.testing.assert_close(small(x), expected)
