"""The recorded graph (channel_groups.capture) against torch.export's: the same channel groups, values kept
as the layers read them, and torch.export's path (and its error) where the code reads tensor values."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx.models import InvertedResidual, MobileNetV2, TransformerBlock, resnet18
from granet_fx.passes.channel_groups import capture, export_graph, find_groups

from helpers import Branchy
from test_channel_groups import CatFlatten, GroupedAndOutput, Mobile, TwoBlocks
from test_heads import Attention


def structure(groups):
    """Each group as (size, pinned?, its members without the graph node a column reads)."""
    return sorted((g.size, bool(g.pinned), sorted((m.role, m.weight, m.mask, m.offset, m.repeat, m.depthwise, m.padded)
                                                  for m in g.members)) for g in groups)


def sparsified(model, x):
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.5, total_steps=1, prune_end=1,
                             update_every=1)
    return gf.sparsify(model, config, example_inputs=(x,))


def exported_module(model, x):
    module = copy.deepcopy(torch.export.export(model.eval(), (x,), strict=False).module())
    for name in ("train", "eval"):   # as compact does: the program's module refuses mode changes
        vars(module).pop(name, None)
    return module


CASES = {
    "residual blocks": lambda: (TwoBlocks(), torch.randn(2, 3, 8, 8)),
    "depthwise": lambda: (Mobile(), torch.randn(2, 4, 8, 8)),
    "concatenation and flatten": lambda: (CatFlatten(), torch.randn(2, 2, 8)),
    "transformer block": lambda: (TransformerBlock(16, 2), torch.randn(2, 3, 16)),
    "grouped conv and outputs": lambda: (GroupedAndOutput(), torch.randn(1, 3, 4, 4)),
    "attention heads": lambda: (Attention(16, 4), torch.randn(2, 5, 16)),
    "inverted residual": lambda: (InvertedResidual(4, 6, stride=2, expand=4), torch.randn(2, 4, 8, 8)),
    "MobileNetV2": lambda: (MobileNetV2(width=8), torch.randn(2, 3, 32, 32)),
    "ResNet-18": lambda: (resnet18(width=8), torch.randn(2, 3, 32, 32)),
}


@pytest.mark.parametrize("form", ["plain", "sparsified", "exported"])
@pytest.mark.parametrize("name", list(CASES))
def test_recorded_graph_gives_the_groups_of_torch_export(name, form):
    model, x = CASES[name]()
    model.eval()
    if form == "sparsified":
        model = sparsified(model, x)
    elif form == "exported":
        model = exported_module(model, x)
    recorded = capture(model, (x,))
    assert recorded.exported is None, "recorded, not exported"
    expected = structure(find_groups(export_graph(model, (x,))))
    assert expected and structure(find_groups(recorded)) == expected


def test_outputs_are_the_models():
    model, x = CASES["ResNet-18"]()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(capture(model, (x,)).outputs, expected)


class InPlaceAfterRead(nn.Module):
    """h is read by fc2, then doubled in place, then read by fc3."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        out = self.fc2(h)
        h.mul_(2.0)
        return out + self.fc3(h)


def test_values_are_kept_as_each_layer_read_them():
    torch.manual_seed(0)
    model = InPlaceAfterRead().eval()
    with torch.no_grad():
        model.fc1.weight[2] = 0
        model.fc1.bias[2] = 0.5     # channel 2 of h: 0.5 for fc2, 1.0 for fc3 after the in-place doubling
    x = torch.randn(5, 4)
    recorded = capture(model, (x,), values=True)
    read = {n.args[1].target: recorded.values[n.args[0].name] for n in recorded.graph.nodes
            if n.op == "call_function" and n.target is torch.ops.aten.linear.default}
    assert torch.all(read["fc2.weight"][:, 2] == 0.5) and torch.all(read["fc3.weight"][:, 2] == 1.0)
    # compaction folds each constant into the bias of the layer that read it: exact, channel 2 gone
    small = gf.compact(model, x)
    assert small.fc1.weight.shape == (5, 4) and small.fc2.weight.shape == (3, 5) and small.fc3.weight.shape == (3, 5)
    with torch.no_grad():
        assert torch.allclose(small(x), model(x), atol=1e-6)


class ReadsValues(nn.Module):
    """Data-dependent control flow that torch.export can capture (the branch is on a size it reads)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        n = x.new_tensor(x.shape[0]).tolist()
        return self.fc(x) * n


def test_code_that_reads_values_goes_to_torch_export():
    x = torch.randn(2, 4)
    assert capture(ReadsValues(), (x,)).exported is not None
    with pytest.raises(ValueError, match="torch.export cannot capture Branchy"):
        capture(Branchy(), (torch.ones(1, 8),))
