"""The README's main job, shortened: train, save, export sparse and compacted, bench against dense."""

import os
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent


SCRIPT = [sys.executable, str(ROOT / "examples" / "train_mnist1d.py"), "--steps", "60", "--update-every", "10",
          "--no-compile"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_main_job_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(SCRIPT + ["--out", str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "test accuracy" in text and "global sparsity 0.9000" in text
    assert "compaction: removed" in text
    assert "mnist1d-compact.onnx" in text and "dense.onnx" in text and "speedup" in text
    for name in ("mnist1d.pt2", "mnist1d.onnx", "mnist1d-compact.onnx", "dense.onnx"):
        assert (out / name).stat().st_size > 0
    onnx.checker.check_model(onnx.load(str(out / "mnist1d.onnx")), full_check=True)
    assert (out / "mnist1d.onnx").stat().st_size < (out / "dense.onnx").stat().st_size


def trained(out, seed: int) -> tuple[str, str]:
    """The training part of a run of the main job (its losses and its test accuracy); the run is stopped
    once it has printed the accuracy, before it exports."""
    proc = subprocess.Popen(SCRIPT + ["--seed", str(seed), "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        accuracy = next((line for line in proc.stdout if line.startswith("test accuracy")), "")
    finally:
        proc.kill()
        _, progress = proc.communicate(timeout=60)
    return progress.replace("\r", "\n"), accuracy.split(", training took")[0]


def test_the_seed_repeats_the_main_jobs_training(tmp_path):
    # The same --seed, the same losses at every progress line and the same accuracy: the initial weights
    # are seeded too, not only the masks and the batches' order.
    first, again = trained(tmp_path / "a", 3), trained(tmp_path / "b", 3)
    assert "loss" in first[0] and first[1].startswith("test accuracy")
    assert first == again
