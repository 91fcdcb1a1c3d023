"""The accuracy benchmark's --quick mode, end to end on real MNIST-1D (slow: a few minutes)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from granet_fx import runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_accuracy_benchmark(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert result.returncode == 0, result.stderr[-2000:]
    sweep = runs.load(tmp_path / "accuracy.json")
    rows = sweep["results"]
    labels = {r["label"] for r in rows}
    assert len(labels) == 7 and len(rows) == 1 + 6 * 3  # dense once, six sparse methods at three sparsities
    for r in rows:
        assert r["global_sparsity"] == pytest.approx(r["sparsity"], abs=1e-4)
        assert r["inference_flops"] <= 1 + 1e-9 and r["training_flops"] <= 1 + 1e-9
    dense = next(r for r in rows if r["method"] == "dense")
    assert dense["accuracy"] > 0.9  # ten classes: chance is 0.1
    for r in rows:
        if r["sparsity"] == 0.9:
            assert r["accuracy"] > 0.8, r
    text = (tmp_path / "accuracy.md").read_text()
    assert "| GraNet-ST (s_i=0.5) | 98% |" in text and "--quick" in text
    recorded = {run["label"] for run in sweep["runs"]}
    assert recorded == {"GraNet (s_i=0)", "GraNet-ST (s_i=0.5)", "RigL"}
    for name in ("accuracy.png", "schedule.png", "layer_density.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "accuracy.json").read_text())["setup"]["seeds"] == 1
