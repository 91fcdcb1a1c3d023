"""End to end on MNIST-1D: train a small 1D CNN with GraNet under torch.compile, then export it.

After training, the model is saved with granet_fx.save (OUT/mnist1d.pt2) and
exported to ONNX by granet-export twice: with sparse weights
(OUT/mnist1d.onnx) and compacted, without the channels that compute nothing
(OUT/mnist1d-compact.onnx). Each is checked in onnxruntime against the
model's outputs. granet-bench then times both against the dense network
(OUT/dense.onnx, the same architecture without masks) in onnxruntime.

    python examples/train_mnist1d.py                 # GraNet, 90% sparsity, 4000 steps
    python examples/train_mnist1d.py --method rigl --sparsity 0.95
    python examples/train_mnist1d.py --save-run run.json && granet-report run.json -o plots/
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

import granet_fx as gf
from granet_fx.config import METHODS
from granet_fx.export.files import check_writable
from granet_fx.mnist1d import load_mnist1d, train_mnist1d
from granet_fx.models import Mnist1dCNN
from granet_fx.runs import save_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="granet", choices=METHODS)
    parser.add_argument("--sparsity", type=float, default=0.9, help="final sparsity (default 0.9)")
    parser.add_argument("--initial-sparsity", type=float, default=0.0,
                        help="0 = dense-to-sparse; 0.5 = GraNet-ST (default 0)")
    parser.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    parser.add_argument("--update-every", type=int, default=100, help="steps between mask updates")
    parser.add_argument("--channels", type=int, default=64, help="CNN width (default 64: 31k weights)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true", help="train in eager mode")
    parser.add_argument("--out", default="runs/mnist1d", help="folder for the saved model and the ONNX file")
    parser.add_argument("--save-run", metavar="RUN.json",
                        help="record the schedule and final layer densities for granet-report")
    args = parser.parse_args()

    try:
        config = gf.GraNetConfig(method=args.method, final_sparsity=args.sparsity,
                                 initial_sparsity=args.initial_sparsity, total_steps=args.steps,
                                 update_every=args.update_every)
    except ValueError as e:
        parser.error(str(e))
    problem = check_writable(args.save_run) if args.save_run else None
    if problem:
        parser.error(f"--save-run: {problem}")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    print("generating MNIST-1D (10,000 samples) ...", flush=True)
    data = load_mnist1d()
    mode = "eager" if args.no_compile else "torch.compile"
    print(f"training {args.method} at {args.sparsity:.0%} sparsity for {args.steps} steps ({mode}) ...", flush=True)
    recorder = gf.RunRecorder(every=max(args.steps // 300, 1)) if args.save_run else None
    torch.manual_seed(args.seed)        # the initial weights too: --seed repeats a run
    result = train_mnist1d(Mnist1dCNN(args.channels), config, data, compile=not args.no_compile,
                           seed=args.seed, progress=True, callback=recorder)
    print()
    print(result.report)
    print()
    print(f"test accuracy {result.accuracy:.2%} on {len(data.y_test)} samples, "
          f"training took {result.seconds:.1f} s")
    if recorder is not None:
        save_json(recorder.run(accuracy=result.accuracy), args.save_run)
        print(f"run saved to {args.save_run}; plot it with: granet-report {args.save_run} -o DIR")

    os.makedirs(args.out, exist_ok=True)
    out = {name: os.path.join(args.out, name) for name in
           ("mnist1d.pt2", "mnist1d.onnx", "mnist1d-compact.onnx", "dense.pt2", "dense.onnx")}
    example = (data.x_test[:1],)
    gf.save(result.model, out["mnist1d.pt2"], example_inputs=example)
    # The dense baseline: the same network without masks. Its weights do not change its speed.
    gf.save(Mnist1dCNN(args.channels).eval(), out["dense.pt2"], example_inputs=example)
    # The tools run as a user runs them: each command in a fresh process.
    for title, tool, argv in [
        ("exporting the sparse model to ONNX", "cli", [out["mnist1d.pt2"], "-o", out["mnist1d.onnx"]]),
        ("exporting it compacted", "cli", [out["mnist1d.pt2"], "-o", out["mnist1d-compact.onnx"], "--compact"]),
        ("exporting the dense baseline", "cli", [out["dense.pt2"], "-o", out["dense.onnx"]]),
        ("onnxruntime latency: sparse and compacted against dense", "bench",
         [out["mnist1d.onnx"], out["mnist1d-compact.onnx"], "--baseline", out["dense.onnx"], "--batch", "1,256"]),
    ]:
        print(f"\n== {title}\n", flush=True)
        extra = ["--dynamic-batch"] if tool == "cli" else []
        code = subprocess.run([sys.executable, "-m", f"granet_fx.export.{tool}", *argv, *extra]).returncode
        if code:
            sys.exit(code)

if __name__ == "__main__":
    main()
