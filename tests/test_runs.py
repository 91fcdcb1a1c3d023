"""Run records, sweep summaries and their files (granet_fx.runs)."""

import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granet_fx as gf
from granet_fx import runs
from granet_fx.mnist1d import Mnist1d, train_mnist1d
from granet_fx.models import Mnist1dNet
from helpers import MLP


def fake_results():
    rows = []
    for seed, (a, b) in enumerate([(0.90, 0.88), (0.80, 0.82), (0.85, 0.80)]):
        rows.append({"label": "GraNet", "method": "granet", "sparsity": 0.9, "seed": seed, "accuracy": a,
                     "training_flops": 0.4 + 0.01 * seed, "inference_flops": 0.1})
        rows.append({"label": "GMP", "method": "gmp", "sparsity": 0.9, "seed": seed, "accuracy": b,
                     "training_flops": 0.5, "inference_flops": 0.2})
    rows.append({"label": "GraNet", "method": "granet", "sparsity": 0.9, "seed": 7, "accuracy": 0.5,
                 "training_flops": 0.4, "inference_flops": 0.1})  # no GMP partner
    rows.append({"label": "Dense", "method": "dense", "sparsity": 0.0, "seed": 0, "accuracy": 0.95,
                 "training_flops": 1.0, "inference_flops": 1.0})
    return rows


def test_summarize_is_mean_and_sample_std_over_seeds():
    results = fake_results()
    summary = {(s["label"], s["sparsity"]): s for s in runs.summarize(results)}
    assert list(summary) == [("GraNet", 0.9), ("GMP", 0.9), ("Dense", 0.0)]
    granet = summary["GraNet", 0.9]
    acc = np.array([0.90, 0.80, 0.85, 0.5])
    assert granet["seeds"] == 4
    assert granet["accuracy_mean"] == pytest.approx(acc.mean())
    assert granet["accuracy_std"] == pytest.approx(acc.std(ddof=1))
    assert granet["training_flops"] == pytest.approx(np.mean([0.40, 0.41, 0.42, 0.40]))
    assert summary["Dense", 0.0]["accuracy_std"] is None  # one seed: no spread to report


def test_paired_difference_pairs_by_seed():
    d = runs.paired_difference(fake_results(), "GraNet", "GMP", 0.9)
    diffs = np.array([0.02, -0.02, 0.05])  # seed 7 has no partner
    assert d["pairs"] == 3 and d["wins"] == 2
    assert d["mean"] == pytest.approx(diffs.mean())
    assert d["std"] == pytest.approx(diffs.std(ddof=1))
    assert runs.paired_difference(fake_results(), "GraNet", "GMP", 0.95) is None


def test_markdown_table_rows():
    results = [
        {"label": "GraNet", "method": "granet", "sparsity": 0.95, "seed": s, "accuracy": a,
         "training_flops": 0.5, "inference_flops": 0.125}
        for s, a in enumerate([0.90, 0.91, 0.92])
    ] + [{"label": "Dense", "method": "dense", "sparsity": 0.0, "seed": 0, "accuracy": 0.981,
          "training_flops": None, "inference_flops": 1.0}]
    lines = runs.markdown_table(runs.summarize(results)).splitlines()
    assert lines[0].startswith("| Method | Sparsity | Test accuracy (%)")
    assert lines[2] == "| GraNet | 95% | 91.00 ± 1.00 | 0.500x | 0.125x | 3 |"
    assert lines[3] == "| Dense | 0% | 98.10 | n/a | 1.000x | 1 |"


def test_recorder_follows_the_schedule_of_a_real_run():
    torch.manual_seed(0)
    config = gf.GraNetConfig(final_sparsity=0.8, total_steps=12, update_every=2, prune_end=8)
    model = gf.sparsify(MLP(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    granet = gf.GraNet(model, optimizer)
    recorder = gf.RunRecorder()
    recorder(granet)
    masks = [model.fc1.weight_mask, model.fc2.weight_mask]
    actual = [0.0]
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        x, y = torch.randn(16, 20, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        granet.step()
        recorder(granet)
        actual.append(1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks))
    h = recorder.history
    assert h["step"] == list(range(13))
    cubic = [0.8 - 0.8 * (1 - min(t, 8) / 8) ** 3 for t in range(13)]
    assert h["target_sparsity"] == pytest.approx(cubic)
    assert h["global_sparsity"] == pytest.approx(actual)
    cosine = [0.005 + 0.5 * 0.495 * (1 + math.cos(math.pi * t / 12)) for t in range(13)]
    assert h["regrow_fraction"] == pytest.approx(cosine)
    assert h["global_sparsity"][-1] == pytest.approx(0.8, abs=1e-3)
    steps = recorder.updates["step"]
    assert steps and set(steps) <= {2, 4, 6, 8, 10}
    record = recorder.run("GraNet", accuracy=0.5)
    runs.check(record)
    assert record["label"] == "GraNet" and record["config"]["final_sparsity"] == 0.8


def test_measured_regrowth_counts_exactly_the_regrown_weights():
    # Gradients only at inactive positions, all different: RigL drops the n smallest |w| and
    # regrows the n inactive weights with the largest gradient, none of them just dropped.
    torch.manual_seed(0)
    model = gf.sparsify(nn.Sequential(nn.Linear(10, 10, bias=False)),
                        gf.GraNetConfig(method="rigl", final_sparsity=0.5, total_steps=10, update_every=1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    granet = gf.GraNet(model, optimizer)
    recorder = gf.RunRecorder()
    recorder(granet)
    weight, mask = model.get_parameter("0.weight"), model.get_buffer("0.weight_mask")
    assert int(mask.sum()) == 50
    weight.grad = torch.where(mask, 0.0, torch.rand(10, 10) + 1.0)
    optimizer.step()
    granet.step()
    recorder(granet)
    r1 = 0.5 * 0.5 * (1 + math.cos(math.pi * 1 / 7.5))  # RigL: cosine to zero at 75% of 10 steps
    assert recorder.updates["step"] == [1]
    assert recorder.updates["regrown_fraction"] == [pytest.approx(math.ceil(r1 * 50) / 50)]


def test_run_record_has_final_and_erk_densities():
    torch.manual_seed(0)
    config = gf.GraNetConfig(method="static", final_sparsity=0.8, total_steps=5)
    model = gf.sparsify(MLP((20, 30, 10)), config)
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.1))
    recorder = gf.RunRecorder()
    recorder(granet)
    layers = {l["name"]: l for l in recorder.run()["layers"]}
    # ERK by hand: eps * (sum(shape) / numel), eps = 0.2 * 900 / (50 + 40) = 2.
    assert layers["fc1.weight"]["erk_density"] == pytest.approx(2 * 50 / 600)
    assert layers["fc2.weight"]["erk_density"] == pytest.approx(2 * 40 / 300)
    for name in ("fc1", "fc2"):
        mask = model.get_buffer(f"{name}.weight_mask")
        assert layers[f"{name}.weight"]["density"] == pytest.approx(mask.float().mean().item())
        assert layers[f"{name}.weight"]["shape"] == list(mask.shape)


def test_train_mnist1d_calls_back_before_and_after_every_step():
    g = torch.Generator().manual_seed(0)
    data = Mnist1d(torch.randn(64, 1, 40, generator=g), torch.randint(0, 10, (64,), generator=g),
                   torch.randn(16, 1, 40, generator=g), torch.randint(0, 10, (16,), generator=g))
    seen = []
    train_mnist1d(Mnist1dNet(width=8, hidden=8), gf.GraNetConfig(final_sparsity=0.5, total_steps=3),
                  data, batch_size=16, compile=False, callback=lambda granet: seen.append(granet.step_count))
    assert seen == [0, 1, 2, 3]


def test_save_and_load_round_trip(tmp_path):
    record = {"format": runs.RUN_FORMAT, "version": 1, "label": "x",
              "history": {k: [0, 1] for k in runs.HISTORY_KEYS},
              "updates": {"step": [1], "regrown_fraction": [0.5]},
              "layers": [{"name": "fc.weight", "density": 0.1, "erk_density": 0.2}]}
    path = runs.save_json(record, tmp_path / "run.json")
    assert runs.load(path) == record


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"\x89PNG\x00\xff", "not a JSON file"),
    (b'{"a": 1}', "not a granet_fx run or sweep file"),
    (b'{"format": "granet_fx.run", "version": 9}', "unsupported version 9"),
    (b'{"format": "granet_fx.run", "version": 1, "label": "x"}', "'history'"),
    (b'{"format": "granet_fx.sweep", "version": 1, "summary": [{"label": "a", "sparsity": "high"}]}',
     "'summary[0].sparsity'"),
])
def test_load_names_the_problem(tmp_path, content, message):
    path = tmp_path / "run.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        runs.load(path)
    assert str(path) in str(e.value)


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text('{"old": true}')
    with pytest.raises(ValueError):
        runs.save_json({"accuracy": float("nan")}, path)  # NaN is not JSON
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.parametrize("content, message", [
    (b"[" * 100_000 + b"]" * 100_000, "nested more than 32 levels"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than 32 levels"),
    (b'{"format": "granet_fx.run", "version": 1, "accuracy": NaN}', "NaN is not a JSON number"),
    (b'{"format": "granet_fx.run", "version": 1, "label": "' + b"x" * 1_000_000 + b'"}',
     "field 'label' is a string of 1,000,000 characters; expected a string of at most 200 printable characters"),
    (b'{"format": "granet_fx.run", "version": 1, "label": 7}', "field 'label' is 7; expected a string"),
])
def test_load_bounds_depth_size_and_text(tmp_path, content, message):
    path = tmp_path / "run.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        runs.load(path)
    assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)


def good_record():
    return {"format": runs.RUN_FORMAT, "version": 1, "label": "x", "config": {"final_sparsity": 0.5},
            "history": {k: [0, 1] for k in runs.HISTORY_KEYS},
            "updates": {"step": [1], "regrown_fraction": [0.5]},
            "layers": [{"name": "fc.weight", "shape": [2, 3], "density": 0.1, "erk_density": 0.2}]}


@pytest.mark.parametrize("change, message", [
    (lambda r: r["config"].update(final_sparsity="high"), "field 'config.final_sparsity' is 'high'; expected null or a number in [0, 1]"),
    (lambda r: r["history"]["step"].__setitem__(1, -3), "field 'history.step[1]' is -3; expected an integer >= 0"),
    (lambda r: r["history"]["global_sparsity"].__setitem__(0, 1.5), "field 'history.global_sparsity[0]' is 1.5"),
    (lambda r: r["updates"].update(step=[True]), "field 'updates.step[0]' is true"),
    (lambda r: r["layers"][0].update(name=12), "field 'layers[0].name' is 12"),
    (lambda r: r["layers"][0].update(shape="2x3"), "field 'layers[0].shape' is '2x3'"),
    (lambda r: r["layers"][0].update(density=float("inf")), "field 'layers[0].density' is inf"),
    (lambda r: r.update(layers=[None]), "field 'layers[0]' is not an object"),
    (lambda r: r["history"].pop("regrow_fraction"), "field 'history.regrow_fraction' is missing"),
    (lambda r: r.update(version=True), "unsupported version true"),
])
def test_check_names_the_key_and_the_problem(change, message):
    record = good_record()
    runs.check(record)
    change(record)
    with pytest.raises(ValueError, match=re.escape(message)):
        runs.check(record)


def test_a_sweep_checks_its_summary_and_runs():
    sweep = {"format": runs.SWEEP_FORMAT, "version": 1, "title": "t",
             "summary": [{"label": "a", "sparsity": 0.5, "seeds": 2, "accuracy_mean": 0.9, "accuracy_std": 0.01}],
             "runs": [good_record()]}
    runs.check(sweep)
    sweep["runs"][0]["label"] = None
    with pytest.raises(ValueError, match=re.escape("runs[0]: field 'label' is null")):
        runs.check(sweep)
    sweep["runs"] = [good_record()]
    del sweep["summary"][0]["seeds"]
    with pytest.raises(ValueError, match=re.escape("field 'summary[0].seeds' is missing")):
        runs.check(sweep)
