"""benchmarks/reach.py with tiny settings: rows that agree with each other, widths within the dense ones, and
linear MACs that match the widths counted by hand."""

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import near, quotient, run_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "reach.py"
HIDDEN, LAYERS, HEADS, INTERMEDIATE, SEQ, IMAGE, PATCH = 64, 2, 4, 128, 16, 16, 4
VARIANTS = ["granet", "granet-keep-residual", "granet-mlp", "tp", "tp-keep-residual"]
LABELS = 10


def macs_by_hand(model: str, heads: list[int], mlp: list[int], hidden: int, pooler: int | None) -> int:
    """Conv and linear multiply-accumulates of one sample, from the widths: per layer q, k, v and the output
    projection (heads x head size against the residual width) and the two MLP layers; BERT's pooler and the
    classifier (one token each); ViT's patch embedding conv."""
    d = HIDDEN // HEADS
    tokens = SEQ if model == "bert" else (IMAGE // PATCH) ** 2 + 1
    total = sum(tokens * (4 * hidden * k * d + 2 * hidden * m) for k, m in zip(heads, mlp))
    if model == "vit":
        return total + (tokens - 1) * hidden * 3 * PATCH * PATCH + hidden * LABELS
    return total + hidden * pooler + pooler * LABELS


@pytest.mark.slow
def test_tiny_run_has_consistent_rows(tmp_path):
    out = tmp_path / "reach"
    args = ["--hidden", str(HIDDEN), "--layers", str(LAYERS), "--heads", str(HEADS), "--intermediate",
            str(INTERMEDIATE), "--seq", str(SEQ), "--image", str(IMAGE), "--patch", str(PATCH), "--sparsity", "0.5",
            "--batch", "1,2", "--warmup", "0", "--runs", "2", "--out", str(out)]
    text, data = run_benchmark(SCRIPT, args, out)
    lines = text.splitlines()
    assert lines[0].startswith("$ python ") and "--heads 4" in lines[0] and data["command"] == lines[0][2:]
    assert any(line.startswith("load average (1 min) before each model's measurements: bert ") for line in lines)
    assert len(data["load_before"]) == 2 and all(load >= 0 for load in data["load_before"])

    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = [line.split() for line in lines[header + 1:header + 25]]
    assert [tuple(r[:4]) for r in rows] == [
        (m, s, v, b) for m in ("bert", "vit") for s, v in [("0.00", "dense-copy")] + [("0.50", v) for v in VARIANTS]
        for b in ("1", "2")]
    for r in rows:
        model, _, variant, _, heads, mlp, hidden, macs, flops, dense_ms, pruned_ms, speedup, of_flops = r
        heads, heads_of = heads.split("/")
        heads = [int(h) for h in heads.split(",")]
        mlp, mlp_of = mlp.split("/")
        mlp = [int(c) for c in mlp.split(",")]
        hidden, hidden_of = (int(v) for v in hidden.split("/"))
        assert (int(heads_of), int(mlp_of), hidden_of) == (HEADS, INTERMEDIATE, HIDDEN)
        assert len(heads) == len(mlp) == LAYERS
        assert all(1 <= h <= HEADS for h in heads) and all(1 <= c <= INTERMEDIATE for c in mlp), r
        assert near(speedup, *quotient(dense_ms, pruned_ms)), r
        assert near(of_flops, *quotient(speedup, flops)), r
        if variant == "dense-copy":     # the control: the dense model exported twice
            assert (heads, mlp, hidden, macs, flops) == ([HEADS] * LAYERS, [INTERMEDIATE] * LAYERS, HIDDEN, "1.00x",
                                                         "1.00x"), r
            continue
        assert float(macs.rstrip("x")) > 1 and float(flops.rstrip("x")) > 1, r
        if variant == "granet-mlp":
            assert heads == [HEADS] * LAYERS, r              # the attention modules were excluded
        if variant.startswith("tp"):
            assert heads == [HEADS // 2] * LAYERS and mlp == [INTERMEDIATE // 2] * LAYERS, r   # half of each layer
        if variant.startswith("granet"):
            assert mlp == [INTERMEDIATE // 2] * LAYERS, r      # scope="layer": half of each group
            assert heads == [HEADS // (1 if variant == "granet-mlp" else 2)] * LAYERS, r
        # the keep-residual runs keep the residual stream, the others narrow it by half
        assert hidden == (HIDDEN // 2 if variant in ("granet", "tp") else HIDDEN), r
    for name in ("bert", "vit"):
        dense = macs_by_hand(name, [HEADS] * LAYERS, [INTERMEDIATE] * LAYERS, HIDDEN, HIDDEN)
        for p, r in zip(data["models"][name]["pruned"], [r for r in rows if r[0] == name and r[3] == "1"][1:]):
            # the MACs ratio against the widths, counted by hand
            ratio = dense / macs_by_hand(name, p["heads"], p["mlp"], p["hidden"], p["pooler"])
            assert near(r[7], ratio, ratio), r

    for name in ("bert", "vit"):
        entry = data["models"][name]
        assert entry["control"]["linear_macs"] == macs_by_hand(name, [HEADS] * LAYERS, [INTERMEDIATE] * LAYERS,
                                                               HIDDEN, HIDDEN)
        assert [(p["sparsity"], p["variant"]) for p in entry["pruned"]] == [(0.5, v) for v in VARIANTS]
        for p in entry["pruned"]:
            assert p["linear_macs"] == macs_by_hand(name, p["heads"], p["mlp"], p["hidden"], p["pooler"]), (name, p)
        bench = entry["bench"]
        assert [m["role"] for m in bench["models"]] == ["model"] * 6 + ["baseline"]
        for r in bench["results"]:
            dense_ms = r["latency"][-1]["median_ms"]
            for i, stats in enumerate(r["latency"][:-1]):
                assert r["speedup"][i] == pytest.approx(dense_ms / stats["median_ms"])
        # a NOTE where the dense copy's speedup (the same model twice) strays more than 10 % from 1
        for r in bench["results"]:
            noted = any(line.startswith(f"NOTE: {name} at batch {r['batch']}: the dense copy ran") for line in lines)
            assert noted == (abs(r["speedup"][0] - 1) > 0.1), (name, r["batch"], r["speedup"][0])
    errors = [float(line.rsplit(" ", 1)[1]) for line in lines
              if line.startswith("max abs error vs the masked model on the example inputs:")]
    assert len(errors) == 6 and all(e < 1e-4 for e in errors)     # the granet variants, both models


@pytest.mark.parametrize("args, message", [
    (["--models", "bert,llama"], "unknown model llama"),
    (["--sparsity", "0.5,1.5"], "sparsities must lie between 0 and 1"),
    (["--hidden", "100", "--heads", "3"], "--hidden 100 is not a multiple of --heads 3"),
])
def test_bad_arguments_are_refused_in_one_line(args, message):
    result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
