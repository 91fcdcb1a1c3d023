"""INT8 on top of compaction: onnxruntime speed of float and int8 compacted models, and int8 agreement.

    python benchmarks/int8.py            # writes benchmarks/results/int8.txt and int8.json

Speed: a CIFAR ResNet-18 is pruned one-shot to each channel sparsity (as in
speedup.py), compacted, exported to ONNX, and quantized by granet-export's own
code (onnxruntime static quantization, per-channel int8 weights, QDQ,
calibrated on 32 random inputs). granet-bench's measurement runs the dense,
the float compacted and the int8 compacted model alternately at each batch
size, on one onnxruntime thread. Target: int8 at least 1.5x faster than the
float compacted model at batch 32.

Agreement: the main job's model (MNIST-1D CNN, GraNet at 90%, 4000 steps,
trained eager) is exported and quantized, calibrated on 512 training samples;
the int8 and float ONNX models then classify the 2,000 test samples. Target:
top-1 agreement of at least 99%.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import numpy as np
import onnx
import torch

import granet_fx as gf
from granet_fx.export.bench import format_table, machine, run
from granet_fx.export.onnx_export import run_onnxruntime
from granet_fx.export.quantize import quantize_int8
from granet_fx.mnist1d import load_mnist1d, train_mnist1d
from granet_fx.models import Mnist1dCNN, resnet18
from granet_fx.report import columns

from common import command, write_outputs
from speedup import export, prune_channels

TARGET_SPEEDUP = 1.5
TARGET_AGREEMENT = 0.99


def quantized(path: str, calibration: np.ndarray, out: str) -> None:
    """Quantize the ONNX file at ``path`` with ``calibration`` (in batches of 32) into ``out``."""
    batches = [[calibration[i:i + 32]] for i in range(0, len(calibration), 32)]
    onnx.save(quantize_int8(onnx.load(path), batches), out)


def speed(args, tmp: str, lines: list, results: dict) -> None:
    x = torch.randn(1, 3, 32, 32)
    dense = resnet18(width=args.width).eval()
    dense_path = os.path.join(tmp, "dense.onnx")
    export(dense, x, dense_path)
    calibration = torch.randn(32, 3, 32, 32).numpy()
    rows = [("channel sparsity", "batch", "dense ms", "float ms", "int8 ms", "float speedup", "int8 speedup",
             "int8 / float", f">= {TARGET_SPEEDUP}", "float MB", "int8 MB")]
    for sparsity in [float(s) for s in args.sparsity.split(",")]:
        compacted = gf.compact(prune_channels(copy.deepcopy(dense), sparsity, 8, x), x)
        float_path, int8_path = (os.path.join(tmp, f"{kind}_{sparsity}.onnx") for kind in ("float", "int8"))
        export(compacted, x, float_path)
        quantized(float_path, calibration, int8_path)
        bench = run([float_path, int8_path], dense_path, [int(b) for b in args.batch.split(",")], 1,
                    args.warmup, args.runs)
        for entry in bench["models"]:
            entry["path"] = os.path.basename(entry["path"])
        print(format_table(bench), file=sys.stderr)
        sizes = [os.path.getsize(p) / 1e6 for p in (float_path, int8_path)]
        for r in bench["results"]:
            float_ms, int8_ms, dense_ms = (stats["median_ms"] for stats in r["latency"])
            ratio = float_ms / int8_ms
            rows.append((f"{sparsity:.2f}", str(r["batch"]), f"{dense_ms:.2f}", f"{float_ms:.2f}", f"{int8_ms:.2f}",
                         f"{r['speedup'][0]:.2f}x", f"{r['speedup'][1]:.2f}x", f"{ratio:.2f}x",
                         "yes" if ratio >= TARGET_SPEEDUP else "NO", f"{sizes[0]:.2f}", f"{sizes[1]:.2f}"))
        results["speed"].append({"channel_sparsity": sparsity, "bench": bench, "float_mb": sizes[0],
                                 "int8_mb": sizes[1]})
    lines += [f"ResNet-18 (CIFAR, width {args.width}), channel GraNet with channel_multiple=8, compacted; "
              f"1 onnxruntime thread, warm-up {args.warmup}, {args.runs} timed runs, models run alternately", ""]
    lines += columns(rows)
    lines += ["", "speedups are over the dense float model; int8 / float = float compacted median / int8 compacted "
              "median", ""]


def agreement(args, tmp: str, lines: list, results: dict) -> None:
    data = load_mnist1d()
    config = gf.GraNetConfig(final_sparsity=0.9, total_steps=args.steps)
    torch.manual_seed(0)                 # the initial weights too, so that the run repeats
    result = train_mnist1d(Mnist1dCNN(), config, data, compile=False, seed=0)
    model = gf.fold(result.model).eval()
    float_path, int8_path = os.path.join(tmp, "mnist1d.onnx"), os.path.join(tmp, "mnist1d_int8.onnx")
    export(model, data.x_test[:1], float_path)
    quantized(float_path, data.x_train[:512].numpy(), int8_path)
    x, y = data.x_test, data.y_test.numpy()
    y_float = run_onnxruntime(open(float_path, "rb").read(), [x])[0].argmax(-1)
    y_int8 = run_onnxruntime(open(int8_path, "rb").read(), [x])[0].argmax(-1)
    agree = float(np.mean(y_float == y_int8))
    acc_float, acc_int8 = float(np.mean(y_float == y)), float(np.mean(y_int8 == y))
    rows = [("model", "test samples", "float accuracy", "int8 accuracy", "top-1 agreement", f">= {TARGET_AGREEMENT:.0%}"),
            (f"MNIST-1D CNN, GraNet 90%, {args.steps} steps", str(len(y)), f"{acc_float:.2%}", f"{acc_int8:.2%}",
             f"{agree:.2%}", "yes" if agree >= TARGET_AGREEMENT else "NO")]
    lines += ["int8 agreement on MNIST-1D's test set (calibrated on 512 training samples)", ""] + columns(rows)
    results["agreement"] = {"steps": args.steps, "test_samples": len(y), "float_accuracy": acc_float,
                            "int8_accuracy": acc_int8, "top1_agreement": agree}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", default="0.5,0.75", help="channel sparsities (default 0.5,0.75)")
    parser.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64)")
    parser.add_argument("--steps", type=int, default=4000, help="MNIST-1D training steps (default 4000)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "int8"),
                        help="output path without extension (default benchmarks/results/int8)")
    args = parser.parse_args()
    torch.manual_seed(0)
    cmd = command()
    m = machine()
    lines = [f"$ {cmd}", f"onnxruntime on {m['cpu']} ({m['logical_cpus']} logical CPUs)", ""]
    results = {"command": cmd, "machine": m, "speed": []}
    with tempfile.TemporaryDirectory() as tmp:
        speed(args, tmp, lines, results)
        agreement(args, tmp, lines, results)
    write_outputs(args.out, "\n".join(lines) + "\n", results)


if __name__ == "__main__":
    main()
