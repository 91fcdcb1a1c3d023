"""benchmarks/mask_update.py on its tiny models: well-formed output, and the byte model counted right."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mask_update.py"

# Masked weights of the --quick models, by hand:
#   MLP 64-128-128-10: 64*128 + 128*128 + 128*10 = 8,192 + 16,384 + 1,280 = 25,856
#   ResNet-18 at width 8 (3x3 convs unless said): stem 3*8*9 = 216; stage 1 four 8->8 convs 4*576 = 2,304;
#   stage 2 16*8*9 + 3*16*16*9 + 1x1 shortcut 16*8 = 1,152 + 6,912 + 128 = 8,192; stage 3 the same at 32 wide
#   = 4,608 + 27,648 + 512 = 32,768; stage 4 at 64 = 18,432 + 110,592 + 2,048 = 131,072; fc 64*10 = 640;
#   total 216 + 2,304 + 8,192 + 32,768 + 131,072 + 640 = 175,192
#   GPT-2, 2 blocks of width 128 (the tied embedding stays dense): 2 * (c_attn 128*384 + attn c_proj 128*128
#   + mlp c_fc 128*512 + mlp c_proj 512*128) = 2 * (49,152 + 16,384 + 65,536 + 65,536) = 393,216
WEIGHTS = {"mlp": 25_856, "resnet18": 175_192, "gpt2": 393_216}
# Bytes per float32 weight with SGD momentum: |w| 4 + gradient 4 + mask 1 + mask written 1
# + weight re-masked (read + write) 8 + momentum re-masked 8.
PER_WEIGHT = {"read |w|": 4, "read gradient": 4, "read mask": 1, "write mask": 1, "re-mask weight": 8,
              "re-mask optimizer state": 8}


def run(*args):
    # one thread: on a busy machine, two threads wait for each other at every small op
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", *args],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_quick_benchmark_output(tmp_path):
    out = tmp_path / "mu"
    run("--out", str(out))
    data = json.loads(out.with_suffix(".json").read_text())
    text = out.with_suffix(".txt").read_text()
    assert text.startswith("# python ") and "--quick" in text.splitlines()[0]
    assert data["quick"] is True and "--quick" in data["command"] and data["threads"] == 1 and data["timings"] == 1
    best = data["bandwidth_best_bytes_per_s"]
    assert len(data["bandwidth_bytes_per_s"]) == 4 and best == max(data["bandwidth_bytes_per_s"]) > 0
    assert [r["model"] for r in data["models"]] == ["mlp", "resnet18", "gpt2"]
    for r in data["models"]:
        n = WEIGHTS[r["model"]]
        assert r["masked_weights"] == n
        assert r["bytes_by_item"] == {k: v * n for k, v in PER_WEIGHT.items()}
        assert r["bytes"] == 26 * n
        assert r["limit_s"] == pytest.approx(r["bytes"] / best)
        assert [u["step"] for u in r["updates"]] == list(range(100, 1000, 100))
        assert [u["kind"] for u in r["updates"]] == ["prune + regrow"] * 5 + ["regrow"] * 4
        assert r["updates"][-1]["sparsity_after"] == pytest.approx(0.9, abs=0.01)
        assert r["updates"][0]["sparsity_after"] < r["updates"][4]["sparsity_after"]
        assert all(u["seconds_each"] == [u["seconds"]] and u["eager_seconds_each"] == [u["eager_seconds"]]
                   for u in r["updates"])
        seconds = sorted(u["seconds"] for u in r["updates"])
        assert r["update_s"] == pytest.approx(seconds[4]) and r["update_s"] > 0
        eager = sorted(u["eager_seconds"] for u in r["updates"])     # the eager pass, beside it
        assert r["eager_update_s"] == pytest.approx(eager[4]) and eager[0] > 0
        assert 0 < r["remask_s"] < r["train_step_s"]
        assert r["update_over_limit"] == pytest.approx(r["update_s"] / r["limit_s"])
        assert r["update_over_step"] == pytest.approx(r["update_s"] / r["train_step_s"])
        assert r["within_4x_limit"] == (r["update_over_limit"] <= 4)
        if r["model"] == "resnet18":
            assert r["below_one_step"] is None
        else:
            assert r["below_one_step"] == (r["update_over_step"] < 1)
        assert f"{r['masked_weights']:,}" in text and r["label"] in text
    assert text.count("(target <= 4): ") == 3 and text.count("(target < 1): ") == 2


def test_quick_profile(tmp_path):
    out = tmp_path / "profile"
    run("--profile", "--models", "mlp", "--out", str(out))
    data = json.loads(out.with_suffix(".json").read_text())
    (profile,) = data["profiles"]
    assert profile["masked_weights"] == WEIGHTS["mlp"] and profile["largest_layer"] == 128 * 128
    both, regrow = profile["kinds"]["prune + regrow"], profile["kinds"]["regrow"]
    assert "prune_global_counted" in both["functions"] and "prune_global_counted" not in regrow["functions"]
    assert "_pick" in both["functions"] and "_pick" not in regrow["functions"]    # the pruning's selection
    for k in (both, regrow):        # the drops, growths and re-masking: one compiled call
        assert "_regrown_compiled" in k["functions"] and "grow_largest" not in k["functions"] and k["aten_ops"]
        assert k["passes_by_op"]["native.regrow"] == 3     # the drop, growth and zeroing of the 128x128 layer
        assert all(0 <= f["share"] <= 1 + 1e-9 for f in k["functions"].values())
        # any update reads the gradient, |w| and the mask and re-masks: at least the byte model's 26 B
        assert sum(k["bytes_per_masked_weight"].values()) >= 26
    assert "passes over a largest layer" in out.with_suffix(".txt").read_text()


def test_traffic_counts_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import mask_update

    n = 1000
    w, m, idx = torch.randn(n), torch.rand(n) > 0.5, torch.arange(10)
    timers = mask_update.Timers()
    traffic = mask_update.Traffic(timers, {n: 1}, n)
    with traffic:
        w.mul_(m.view(torch.uint8))      # a view (nothing), then read w 4n + m n, write w 4n
        w.abs()                          # read 4n, write 4n
        torch.count_nonzero(m)           # read n, write one int64
        w[idx]                           # a gather: 10 int64 indices and 10 floats
        torch.empty(n).copy_(w)          # empty writes nothing; copy_ reads w 4n and writes 4n
    assert traffic.bytes == {"other": 9 * n + 8 * n + (n + 8) + (80 + 40) + 8 * n}
    assert traffic.passes == {"other": {n: 4}}
    assert traffic.op_passes == {"mul_": 1, "abs": 1, "count_nonzero": 1, "copy_": 1}
