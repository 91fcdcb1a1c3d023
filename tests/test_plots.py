"""PNG plots of runs and sweeps, and the granet-report command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread

import granet_fx as gf
from granet_fx import plots, runs

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(label, initial):
    steps = list(range(0, 101, 10))
    return {
        "format": runs.RUN_FORMAT, "version": 1, "label": label, "method": "granet",
        "config": {"final_sparsity": 0.9, "initial_sparsity": initial},
        "history": {
            "step": steps,
            "target_sparsity": [0.9 + (initial - 0.9) * (1 - min(t, 50) / 50) ** 3 for t in steps],
            "global_sparsity": [0.9 + (initial - 0.9) * (1 - min(t // 20 * 20, 50) / 50) ** 3 for t in steps],
            "regrow_fraction": [0.5 * (1 - t / 100) for t in steps],
        },
        "updates": {"step": [20, 40, 60, 80], "regrown_fraction": [0.3, 0.2, 0.1, 0.05]},
        "layers": [{"name": "conv.weight", "shape": [8, 1, 3], "density": 0.4, "erk_density": 0.5},
                   {"name": "fc.weight", "shape": [10, 80], "density": 0.05, "erk_density": 0.08}],
    }


def fake_sweep():
    rows = [{"label": "Dense", "method": "dense", "sparsity": 0.0, "seed": s, "accuracy": 0.95 + 0.01 * s,
             "training_flops": 1.0, "inference_flops": 1.0} for s in range(2)]
    for label in ("GMP", "GraNet"):
        for sparsity in (0.9, 0.98):
            rows += [{"label": label, "method": label.lower(), "sparsity": sparsity, "seed": s,
                      "accuracy": 0.9 - sparsity / 10 + 0.01 * s, "training_flops": 0.5,
                      "inference_flops": 1 - sparsity} for s in range(2)]
    return {"format": runs.SWEEP_FORMAT, "version": 1, "title": "fake", "summary": runs.summarize(rows),
            "runs": [fake_run("GraNet", 0.0), fake_run("GraNet-ST", 0.5)]}


def assert_png(path):
    assert path.read_bytes()[:8] == PNG
    height, width, _ = imread(path).shape
    assert height > 200 and width > 400


def test_plot_report_of_a_sweep_writes_three_pngs(tmp_path):
    written = gf.plot_report(fake_sweep(), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["accuracy.png", "layer_density.png", "schedule.png"]
    for path in written:
        assert_png(path)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in written)


def test_plot_report_of_a_run_file(tmp_path):
    path = runs.save_json(fake_run("GraNet", 0.0), tmp_path / "run.json")
    written = gf.plot_report(path, tmp_path)
    assert sorted(p.name for p in written) == ["layer_density.png", "schedule.png"]
    for p in written:
        assert_png(p)


def test_plot_report_refuses_a_malformed_record(tmp_path):
    run = fake_run("GraNet", 0.0)
    del run["layers"][1]["erk_density"]
    with pytest.raises(ValueError, match=r"layers\[1\]\.'erk_density'|'layers\[1\].erk_density'"):
        gf.plot_report(run, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cli_writes_pngs(tmp_path, capsys):
    path = runs.save_json(fake_sweep(), tmp_path / "accuracy.json")
    assert plots.main([str(path), "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "out" / n) for n in
                                     ("accuracy.png", "schedule.png", "layer_density.png"))


@pytest.mark.parametrize("problem", ["missing", "corrupt", "foreign", "out is a file", "unknown option"])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, problem):
    path = tmp_path / "run.json"
    out = tmp_path / "out"
    if problem == "corrupt":
        path.write_bytes(b"{not json")
    elif problem == "foreign":
        path.write_text(json.dumps({"format": "something else"}))
    elif problem == "out is a file":
        runs.save_json(fake_run("GraNet", 0.0), path)
        out.write_text("keep me")
    extra = ["--bogus"] if problem == "unknown option" else []
    assert plots.main([str(path), "-o", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("granet-report: error: ")
    if problem == "out is a file":
        assert out.read_text() == "keep me"


def test_cli_entry_point_has_no_traceback(tmp_path):
    command = Path(sys.executable).with_name("granet-report")  # the console script pip installed
    result = subprocess.run([str(command), str(tmp_path / "nope.json")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"granet-report: error: {tmp_path / 'nope.json'}: no such file"


def test_a_bad_record_leaves_the_old_set_of_pngs(tmp_path):
    out = tmp_path / "plots"
    out.mkdir()
    old = {name: f"old {name}".encode() for name in ("accuracy.png", "schedule.png", "layer_density.png")}
    for name, data in old.items():
        (out / name).write_bytes(data)
    sweep = fake_sweep()
    sweep["runs"][1]["config"]["final_sparsity"] = "0.9"     # fails only the density plot's input
    path = runs.save_json(sweep, tmp_path / "sweep.json")
    assert plots.main([str(path), "-o", str(out)]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_a_failed_write_leaves_the_old_set_and_no_temporary_file(tmp_path, monkeypatch):
    out = tmp_path / "plots"
    out.mkdir()
    (out / "schedule.png").write_bytes(b"old")
    written = []

    def fsync(fd):
        written.append(fd)
        if len(written) == 2:                       # the second PNG cannot be written
            raise OSError("disk full")

    monkeypatch.setattr(plots.os, "fsync", fsync)
    with pytest.raises(OSError, match="disk full"):
        gf.plot_report(fake_sweep(), out)
    assert [p.name for p in out.iterdir()] == ["schedule.png"]
    assert (out / "schedule.png").read_bytes() == b"old"


def test_the_input_file_is_never_overwritten(tmp_path, capsys):
    path = runs.save_json(fake_run("GraNet", 0.0), tmp_path / "schedule.png")   # a run saved under a PNG's name
    before = path.read_bytes()
    assert plots.main([str(path), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is the input file" in err and len(err.strip().splitlines()) == 1
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["schedule.png"]
