"""The README's main job, shortened: train, save, export sparse and compacted, bench against dense."""

import os
import subprocess
import sys
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent


def test_main_job_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_mnist1d.py"), "--steps", "60", "--update-every", "10",
         "--no-compile", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = result.stdout
    assert "test accuracy" in text and "global sparsity 0.9000" in text
    assert "compaction: removed" in text
    assert "mnist1d-compact.onnx" in text and "dense.onnx" in text and "speedup" in text
    for name in ("mnist1d.pt2", "mnist1d.onnx", "mnist1d-compact.onnx", "dense.onnx"):
        assert (out / name).stat().st_size > 0
    onnx.checker.check_model(onnx.load(str(out / "mnist1d.onnx")), full_check=True)
    assert (out / "mnist1d.onnx").stat().st_size < (out / "dense.onnx").stat().st_size
