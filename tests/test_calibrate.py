"""channel_multiple="measured": the rule that reads a multiple off measured times, the layers it measures,
the cache, and the multiples the controller then keeps."""

import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import granet_fx as gf
from granet_fx.export import calibrate
from granet_fx.export.calibrate import LayerShape, efficient, group_model, group_shapes, period
from granet_fx.passes.channel_groups import channel_groups, named_tensors


def staircase(block: int, slow_outside: float = 1.0):
    """Times of a kernel that pads to ``block`` channels; widths off the block ``slow_outside`` x slower."""
    return lambda w: math.ceil(w / block) * block * (1.0 if w % block == 0 else slow_outside)


def times_at(base: int, f) -> dict[int, float]:
    return {base + p: float(f(base + p)) for p in calibrate.PERIODS}


@pytest.mark.parametrize("f, base, expected", [
    (lambda w: w, 32, 1),                  # time proportional to the width: every width is worth its cost
    # a fixed cost of 10 channels' time: w -> v costs (v - w) more, worth it while v - w > (10 + w)(v - w) / 2w,
    # that is w > 10; 16 is the first measured width past it
    (lambda w: 10 + w, 0, 16),
    (lambda w: 10 + w, 32, 1),             # the same cost, small against widths past 32
    (staircase(8), 32, 8),                 # 33..40 all cost 40: 40 is the first width worth its cost
    (staircase(8, 2.0), 96, 8),            # widths off the block take a path twice as slow
    (staircase(16), 64, 16),
    (staircase(32), 0, 32),                # flat up to 32: nothing but the widest is efficient
])
def test_period_of_worked_staircases(f, base, expected):
    assert period(times_at(base, f), base) == expected


def test_period_is_capped_and_efficient_is_strict():
    t = times_at(32, staircase(8))
    assert period(t, 32, largest=4) == 4       # no measured width past base + 4 counts
    # 36 -> 40 costs nothing more: 36 is not efficient; 40 -> 48 costs 8/40 = 20 % > half of 20 %
    assert not efficient(t, 36) and efficient(t, 40)
    # a wider width that costs less than half its proportional share more makes the narrower one inefficient
    assert not efficient({10: 1.0, 20: 1.49}, 10) and efficient({10: 1.0, 20: 1.51}, 10)


class Block(nn.Module):
    """A conv of 16 channels, a depthwise conv over them, and two readers, one of them of a concat."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.b = nn.Conv2d(3, 4, 1)
        self.c = nn.Conv2d(20, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.cat([torch.relu(self.dw(torch.relu(self.a(x)))), self.b(x)], 1)
        return self.fc(self.c(y).mean((2, 3)))


def test_group_shapes_are_the_layers_with_their_other_sides():
    model = Block()
    groups = [g for g in channel_groups(model, torch.randn(2, 3, 8, 8)) if not g.pinned]
    hidden = next(g for g in groups if g.size == 16)
    assert sorted(group_shapes(named_tensors(model), hidden), key=str) == sorted([
        LayerShape("row", 3, 0, (3, 3)),                     # a: 3 -> 16
        LayerShape("row", 1, 0, (3, 3), depthwise=True),     # dw: its inputs are its outputs
        LayerShape("column", 8, 4, (1, 1)),                  # c reads 16 of its 20 inputs: 4 others
    ], key=str)


def test_group_model_runs_every_layer_at_the_width():
    shapes = [LayerShape("row", 3, 0, (3, 3)), LayerShape("row", 1, 0, (3, 3), depthwise=True),
              LayerShape("column", 8, 4, (1, 1)), LayerShape("column", 5, 2, (), repeat=3)]
    model = group_model(shapes, 6)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: np.ones(i.shape, np.float32) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    # widths on the group's side: 6 channels, + 4 others for c, x 3 repeats + 2 others for the linear layer
    assert [list(i.shape) for i in session.get_inputs()] == [[1, 3, 32, 32], [1, 6, 32, 32], [1, 10, 32, 32],
                                                             [256, 20]]
    assert [o.shape for o in outputs] == [(1, 6, 32, 32), (1, 6, 32, 32), (1, 8, 32, 32), (256, 5)]
    # the first output by hand: a 3x3 conv of ones, zero-padded, at the centre sums all 27 weights
    w = next(t for t in model.graph.initializer if t.name == "w0")
    weight = np.frombuffer(w.raw_data, np.float32).reshape(6, 3, 3, 3) if w.raw_data else np.array(w.float_data)
    assert np.allclose(outputs[0][0, :, 16, 16], weight.reshape(6, -1).sum(1), atol=1e-4)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRANET_FX_CACHE", str(tmp_path))
    monkeypatch.setattr(calibrate, "_measured", {})
    return tmp_path / "channel_periods.json"


def fake_timer(monkeypatch, f):
    """Replace the onnxruntime timing by the times ``f(width)``; returns the list of widths asked for."""
    asked = []

    def time_widths(shapes, widths, threads=1, runs=calibrate.RUNS):
        asked.append(list(widths))
        return {w: float(f(w)) for w in widths}

    monkeypatch.setattr(calibrate, "time_widths", time_widths)
    return asked


def test_measured_once_then_read_from_the_cache(cache, monkeypatch):
    asked = fake_timer(monkeypatch, staircase(8))
    shapes = (LayerShape("row", 3, 0, (3, 3)),)
    assert calibrate.measured_period(shapes, kept=40, size=128) == 8
    assert asked == [[33, 34, 36, 40, 48, 64]]       # the multiple of 32 below 40 kept, + each period
    assert list(json.loads(cache.read_text()).values()) == [8]
    monkeypatch.setattr(calibrate, "_measured", {})  # a new process: the file answers
    assert calibrate.measured_period(shapes, kept=40, size=128) == 8 and len(asked) == 1
    # other shapes are measured
    assert calibrate.measured_period((LayerShape("row", 4, 0, (3, 3)),), kept=40, size=128) == 8
    assert len(asked) == 2 and len(json.loads(cache.read_text())) == 2


def test_a_damaged_cache_is_measured_again_and_replaced(cache, monkeypatch):
    cache.write_text("{not json")
    asked = fake_timer(monkeypatch, staircase(16))
    assert calibrate.measured_period((LayerShape("column", 8, 0, ()),), kept=20, size=64) == 16
    assert len(asked) == 1 and list(json.loads(cache.read_text()).values()) == [16]


def test_a_real_measurement_is_one_of_the_periods(cache):
    found = calibrate.measured_period((LayerShape("row", 8, 0, (3, 3)),), kept=12, size=64)
    assert found in calibrate.PERIODS and found <= 32
    assert list(json.loads(cache.read_text()).values()) == [found]


@pytest.mark.parametrize("block", [4, 16])
def test_measured_multiples_are_what_the_controller_keeps(cache, monkeypatch, block):
    asked = fake_timer(monkeypatch, staircase(block))
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=0.7, total_steps=1, prune_end=1,
                             channel_multiple="measured")
    model = gf.sparsify(model, config, example_inputs=torch.randn(2, 20))
    gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0)).step()
    kept = [int(model.get_submodule(n).weight_mask.all(0).sum()) for n in ("2", "4")]
    assert all(k % block == 0 and k > 0 for k in kept), kept
    # two groups (other layers) of 64 channels, 0.3 x 64 = 19 kept: each measured at 0 + every period, once
    # (the controller reads what sparsify measured)
    assert asked == [[1, 2, 4, 8, 16, 32]] * 2


@pytest.mark.slow
def test_calibration_benchmark_multiples_follow_from_its_times(tmp_path):
    """benchmarks/calibration.py: each group's multiple is what the rule gives on the times it printed,
    worked here from the JSON: the smallest period from which every measured width beats the wider ones by
    half a proportional share."""
    from pathlib import Path

    from helpers import run_benchmark

    out = tmp_path / "calibration"
    text, data = run_benchmark(Path(__file__).resolve().parents[1] / "benchmarks" / "calibration.py",
                               ["--models", "mobilenetv2", "--out", str(out)], out)
    assert data["groups"] and all(g["model"] == "mobilenetv2" for g in data["groups"])
    for g in data["groups"]:
        ms = {int(w): t for w, t in g["ms"].items()}
        widths = sorted(ms)
        worth = [all(ms[v] - ms[w] > 0.5 * ms[w] * (v - w) / w for v in widths if v > w) for w in widths]
        first = len(widths) - 1
        while first > 0 and worth[first - 1]:
            first -= 1
        base = widths[0] - 1                   # the widths are base + 1, base + 2, base + 4, ...
        assert g["multiple"] == widths[first] - base, g
        assert f"-> multiple {g['multiple']}" in text
    assert len(data["groups"][0]["every_ms"]) == 32


def test_a_group_that_cannot_be_timed_keeps_any_width(cache, monkeypatch):
    def refuse(shapes, widths, threads=1, runs=calibrate.RUNS):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel")

    monkeypatch.setattr(calibrate, "time_widths", refuse)
    with pytest.warns(UserWarning, match="could not time a channel group's layers .*RuntimeError.*multiple of 1"):
        assert calibrate.measured_period((LayerShape("row", 3, 0, (3, 3)),), kept=40, size=128) == 1
    assert not cache.exists()                  # not cached: measured again next time
    assert calibrate.measured_period((), kept=40, size=128) == 1
