"""The channel dependency graph, against groups worked out by hand for small models."""

import torch
import torch.nn.functional as F
from torch import nn

from granet_fx.models import BasicBlock, InvertedResidual, TransformerBlock
from granet_fx.passes.channel_groups import channel_groups


def summary(groups):
    """Each group as (size, pinned?, {(role, weight or scale, offset, repeat)})."""
    return [
        (g.size, bool(g.pinned), {(m.role, m.weight, m.offset, m.repeat) for m in g.members})
        for g in groups
    ]


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block1 = BasicBlock(8, 8)
        self.block2 = BasicBlock(8, 16, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block2(self.block1(F.relu(self.bn(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_residual_blocks():
    groups = summary(channel_groups(TwoBlocks(), torch.randn(2, 3, 8, 8)))
    expected = [
        # the stem's channels are block1's residual stream: stem, block1.conv2 and their norms go together,
        # read by block1.conv1, block2.conv1 and block2's shortcut conv
        (8, False, {("row", "stem.weight", 0, 1), ("norm", "bn.weight", 0, 1),
                    ("row", "block1.conv2.weight", 0, 1), ("norm", "block1.bn2.weight", 0, 1),
                    ("column", "block1.conv1.weight", 0, 1), ("column", "block2.conv1.weight", 0, 1),
                    ("column", "block2.shortcut.0.weight", 0, 1)}),
        (8, False, {("row", "block1.conv1.weight", 0, 1), ("norm", "block1.bn1.weight", 0, 1),
                    ("column", "block1.conv2.weight", 0, 1)}),
        (16, False, {("row", "block2.conv1.weight", 0, 1), ("norm", "block2.bn1.weight", 0, 1),
                     ("column", "block2.conv2.weight", 0, 1)}),
        (16, False, {("row", "block2.conv2.weight", 0, 1), ("norm", "block2.bn2.weight", 0, 1),
                     ("row", "block2.shortcut.0.weight", 0, 1), ("norm", "block2.shortcut.1.weight", 0, 1),
                     ("column", "fc.weight", 0, 1)}),
        (5, True, {("row", "fc.weight", 0, 1)}),
    ]
    canonical = lambda gs: sorted((size, pinned, sorted(members)) for size, pinned, members in gs)
    assert canonical(groups) == canonical(expected)


class Mobile(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = InvertedResidual(4, 4, expand=3)      # residual
        self.b = InvertedResidual(4, 6, stride=2, expand=2)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


def test_depthwise_conv_joins_its_input_and_output():
    groups = summary(channel_groups(Mobile(), torch.randn(2, 4, 8, 8)))
    hidden_a = (12, False, {("row", "a.expand.0.weight", 0, 1), ("norm", "a.expand.1.weight", 0, 1),
                            ("row", "a.depthwise.0.weight", 0, 1), ("norm", "a.depthwise.1.weight", 0, 1),
                            ("column", "a.project.0.weight", 0, 1)})
    assert hidden_a in groups
    # a's input is the model input: the residual add pins a's projection
    pinned = [g for g in groups if g[0] == 4]
    assert len(pinned) == 1 and pinned[0][1] and ("row", "a.project.0.weight", 0, 1) in pinned[0][2]
    # b's output is read by fc after a mean over the spatial dimensions
    assert (6, False, {("row", "b.project.0.weight", 0, 1), ("norm", "b.project.1.weight", 0, 1),
                       ("column", "fc.weight", 0, 1)}) in groups


class CatFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 3, 1)
        self.b = nn.Conv1d(2, 5, 1)
        self.c = nn.Conv1d(8, 4, 3)
        self.fc = nn.Linear(4 * 6, 2)

    def forward(self, x):                       # x: (N, 2, 8)
        y = torch.cat([self.a(x), torch.relu(self.b(x))], 1)
        return self.fc(self.c(y).flatten(1))     # c: (N, 4, 6) -> 24 features, 6 per channel


def test_concat_offsets_and_flatten_repeats():
    groups = summary(channel_groups(CatFlatten(), torch.randn(2, 2, 8)))
    assert (3, False, {("row", "a.weight", 0, 1), ("column", "c.weight", 0, 1)}) in groups
    assert (5, False, {("row", "b.weight", 0, 1), ("column", "c.weight", 3, 1)}) in groups
    assert (4, False, {("row", "c.weight", 0, 1), ("column", "fc.weight", 0, 6)}) in groups


def test_transformer_block_pins_what_it_cannot_follow():
    groups = channel_groups(TransformerBlock(16, 2), torch.randn(2, 3, 16))
    by_row = {g.rows[0].weight: g for g in groups}
    assert not by_row["fc1.weight"].pinned                      # the feed-forward hidden layer may shrink
    assert [c.weight for c in by_row["fc1.weight"].columns] == ["fc2.weight"]
    assert any("view" in r for r in by_row["qkv.weight"].pinned)  # heads are split by a view
    for name in ("proj.weight", "fc2.weight"):                   # the residual stream is the model input
        assert by_row[name].pinned


class GroupedAndOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.b(self.g(self.a(x))), self.a(x)


def test_grouped_convs_and_outputs_pin():
    groups = channel_groups(GroupedAndOutput(), torch.randn(1, 3, 4, 4))
    by_row = {g.rows[0].weight: g for g in groups}
    assert any("grouped" in r for r in by_row["a.weight"].pinned)
    assert any("output" in r for r in by_row["a.weight"].pinned)
    assert any("grouped" in r for r in by_row["g.weight"].pinned)


class Unused(nn.Module):
    """An op the analysis does not follow (a cumulative sum over the channels), its result used or dropped."""

    def __init__(self, use: bool):
        super().__init__()
        self.use = use
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        extra = h.cumsum(-1)
        return self.fc2(h) + (extra[..., :2] if self.use else 0)


def test_an_op_whose_result_nothing_uses_pins_nothing():
    for use in (True, False):
        (g,) = [g for g in channel_groups(Unused(use), torch.randn(3, 4)) if g.rows[0].weight == "fc1.weight"]
        assert bool(g.pinned) == use, g.pinned
