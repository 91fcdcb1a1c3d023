"""MNIST-1D accuracy of channel GraNet vs unstructured GraNet at equal inference FLOPs.

    python benchmarks/mnist1d_channel.py     # writes benchmarks/results/mnist1d_channel.txt and .json

For each seed and channel sparsity, channel GraNet trains the 1D CNN of the
main job; its inference FLOPs are those of the compacted model (granet_fx.compact)
over the dense model's. Unstructured GraNet then trains with every layer at
density equal to that FLOPs fraction (scope="layer", distribution="uniform"),
so that both spend the same conv/linear FLOPs at inference. The dense model
gives the reference. Same recipe for all (granet_fx.mnist1d.train_mnist1d,
eager mode); mean and standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

import granet_fx as gf
from granet_fx.export.bench import write_atomic, write_json
from granet_fx.mnist1d import accuracy, load_mnist1d, train_mnist1d
from granet_fx.models import Mnist1dCNN
from granet_fx.report import columns

from common import command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", default="0.5,0.75", help="channel sparsities (default 0.5,0.75)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: fastest for this small model)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "mnist1d_channel"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    x = data.x_train[:1]
    sparsities = [float(s) for s in args.sparsity.split(",")]
    seeds = list(range(args.seeds))

    def train(config: gf.GraNetConfig, seed: int):
        print(f"  {config.method} {config.granularity} s={config.final_sparsity:.4f} seed {seed}", file=sys.stderr)
        return train_mnist1d(Mnist1dCNN(), config, data, compile=False, seed=seed)

    dense = [train(gf.GraNetConfig(method="dense", total_steps=args.steps), s).accuracy for s in seeds]
    runs = []
    for sparsity in sparsities:
        for seed in seeds:
            config = gf.GraNetConfig(granularity="channel", final_sparsity=sparsity, total_steps=args.steps)
            channel = train(config, seed)
            compacted = gf.compact(channel.model, x)
            flops = gf.compaction_report(compacted).flops_ratio
            compacted_accuracy = accuracy(compacted, data.x_test, data.y_test)
            config = gf.GraNetConfig(final_sparsity=1 - flops, total_steps=args.steps, scope="layer",
                                     distribution="uniform")
            unstructured = train(config, seed)
            runs.append({
                "channel_sparsity": sparsity, "seed": seed, "flops": flops,
                "channel_accuracy": channel.accuracy, "channel_compacted_accuracy": compacted_accuracy,
                "unstructured_sparsity": 1 - flops, "unstructured_accuracy": unstructured.accuracy,
                "unstructured_flops": unstructured.report.inference_flops,
            })

    def stats(values: list[float]) -> str:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{100 * statistics.mean(values):.2f} +- {100 * spread:.2f}"

    cmd = command()
    lines = [
        f"$ {cmd}",
        f"MNIST-1D (10,000 samples), Mnist1dCNN (64 channels), {args.steps} steps, seeds {seeds}, eager, "
        f"{args.threads} threads",
        f"dense: test accuracy {stats(dense)} %",
        "",
    ]
    rows = [("channel sparsity", "inference FLOPs (x dense)", "channel GraNet acc %",
             "unstructured GraNet acc %", "unstructured sparsity")]
    for sparsity in sparsities:
        mine = [r for r in runs if r["channel_sparsity"] == sparsity]
        flops = [r["flops"] for r in mine]
        rows.append((f"{sparsity:.2f}", f"{statistics.mean(flops):.4f}",
                     stats([r["channel_accuracy"] for r in mine]), stats([r["unstructured_accuracy"] for r in mine]),
                     f"{1 - statistics.mean(flops):.4f}"))
    lines += columns(rows)
    lines += ["", "mean +- standard deviation over seeds; per run:"]
    for r in runs:
        lines.append(
            f"  s={r['channel_sparsity']:.2f} seed {r['seed']}: FLOPs {r['flops']:.4f}; channel "
            f"{100 * r['channel_accuracy']:.2f} % (compacted model {100 * r['channel_compacted_accuracy']:.2f} %); "
            f"unstructured {100 * r['unstructured_accuracy']:.2f} % at FLOPs {r['unstructured_flops']:.4f}")
    text = "\n".join(lines) + "\n"
    print(text)
    write_json({"command": cmd, "steps": args.steps, "dense_accuracy": dense, "runs": runs},
               args.out + ".json")
    write_atomic(args.out + ".txt", text)


if __name__ == "__main__":
    main()
