"""benchmarks/speedup.py with tiny settings: a row per model, columns that agree with each other and with torch."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import near, quotient, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "speedup.py"
MODELS = ["resnet18", "mobilenetv2", "convnext"]


def dense_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    """2 x the multiply-accumulates of the convolutions and linear layers on ``x``, counted with forward hooks."""
    macs = []

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        else:
            per_output = module.in_features
        macs.append(output.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 2 * sum(macs)


@pytest.mark.slow
def test_tiny_run_has_consistent_rows_for_every_model(tmp_path):
    out = tmp_path / "speedup"
    # one thread: on a busy machine two threads wait for each other
    args = ["--sparsity", "0.5", "--multiple", "8", "--batch", "1,2", "--threads", "1", "--warmup", "0",
            "--runs", "2", "--width", "8", "--out", str(out)]
    text, data = run_benchmark(SCRIPT, args, out)
    lines = text.splitlines()
    assert lines[0].startswith("$ python ") and "--width 8" in lines[0] and data["command"] == lines[0][2:]
    assert list(data["models"]) == MODELS

    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = [line.split() for line in lines[header + 1:header + 7]]
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [
        (m, "0.50", "8", "1", b) for m in MODELS for b in ("1", "2")]
    for r in rows:
        dense_ms, compacted_ms, flops, limit, speedup, of_limit, of_flops, target = r[5:13]
        assert near(speedup, *quotient(dense_ms, compacted_ms)), r
        assert near(of_limit, *quotient(speedup, limit)), r
        assert near(of_flops, *quotient(speedup, flops)), r
        # the targets: 0.9 of the FLOPs ratio, 0.85 of the limit on 1 thread (the rounded value decides unless
        # it is the target itself)
        assert target == ("yes" if float(of_flops) >= 0.9 else "NO") or of_flops == "0.90", r
        assert r[13] == "0.85:" and (r[14] == ("yes" if float(of_limit) >= 0.85 else "NO") or of_limit == "0.85"), r
        assert float(flops.rstrip("x")) > 1, r   # half the channels are gone

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from speedup import build

    runs = data["runs"]
    assert [run["model"] for run in runs] == MODELS
    for run in runs:
        bench = run["bench"]
        compacted, dense = bench["models"]
        _, model, x = build(run["model"], 8)
        assert dense["flops_per_sample"] == dense_flops(model, x), run["model"]
        # the ONNX graphs' FLOPs against the compaction report's count on the PyTorch modules
        assert compacted["flops_ratio"] == pytest.approx(run["pytorch_flops_ratio"], rel=1e-6)
        assert 0 <= run["max_abs_error"] < 1e-4
        # channel_multiple 8: every convolution keeps a multiple of 8 channels (all widths are multiples of 8)
        assert run["conv_widths"] and all(w % 8 == 0 for w in run["conv_widths"]), run["conv_widths"]
        for r in bench["results"]:
            model_ms, dense_ms = (s["median_ms"] for s in r["latency"])
            assert r["speedup"][0] == pytest.approx(dense_ms / model_ms)
            assert r["speedup_of_limit"][0] == pytest.approx(r["speedup"][0] / r["limit"][0])
    errors = re.findall(r"max abs error vs the masked model on the example inputs: (\S+)", text)
    assert len(errors) == 3 and all(float(e) < 1e-4 for e in errors)
    assert [line for line in lines if line.endswith("channel_multiple 8:")] == [
        f"{m}, channel sparsity 0.5, channel_multiple 8:" for m in MODELS]


def test_unknown_model_is_refused():
    result = subprocess.run([sys.executable, str(SCRIPT), "--models", "resnet18,vgg"], capture_output=True,
                            text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 2
    assert "unknown model vgg" in result.stderr and "Traceback" not in result.stderr
