"""MNIST-1D accuracy of channel GraNet vs unstructured GraNet at equal inference FLOPs.

    python benchmarks/mnist1d_channel.py     # writes benchmarks/results/mnist1d_channel.txt and .json
    python benchmarks/mnist1d_channel.py --compare channel_floor=0,0.5 --sparsity 0.5,0.75,0.9 --seeds 5
                                             # writes benchmarks/results/mnist1d_channel_floor.txt and .json

For each seed and channel sparsity, channel GraNet trains the 1D CNN of the
main job; its inference FLOPs are those of the compacted model (granet_fx.compact)
over the dense model's. Unstructured GraNet then trains with every layer at
density equal to that FLOPs fraction (scope="layer", distribution="uniform"),
so that both spend the same conv/linear FLOPs at inference. The dense model
gives the reference. Same recipe for all (granet_fx.mnist1d.train_mnist1d,
eager mode); mean and standard deviation over the seeds.

``--render RUN.json`` rewrites the table of a ``--compare`` run from its JSON.
With ``--compare FIELD=A,B,...`` it trains channel GraNet only, once per
value of that GraNetConfig field (channel_floor, channel_multiple) with the
same seeds, and reports each value's accuracy, its compacted FLOPs and the
layer widths, and the paired difference from the first value (same seed,
same data order, same initial weights).
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--compare", metavar="FIELD=A,B", help="compare channel GraNet at these values of a "
                        "GraNetConfig field, paired by seed (for example channel_floor=0,0.5)")
    parser.add_argument("--out", help="output path without extension (default benchmarks/results/mnist1d_channel, "
                        "with --compare mnist1d_channel_<field without 'channel_'>)")
    parser.add_argument("--render", metavar="JSON", help="write the table of an earlier --compare run from its JSON "
                        "(next to it, .txt), without training")
    args = parser.parse_args()
    if args.render:
        with open(args.render) as f:
            text = compare_text(json.load(f))
        write_atomic(os.path.splitext(args.render)[0] + ".txt", text)
        print(text)
        return
    if args.compare:
        compare(args)
        return
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "mnist1d_channel")
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    x = data.x_train[:1]
    sparsities = [float(s) for s in args.sparsity.split(",")]
    seeds = list(range(args.seeds))

    def train(config: gf.GraNetConfig, seed: int):
        print(f"  {config.method} {config.granularity} s={config.final_sparsity:.4f} seed {seed}", file=sys.stderr)
        torch.manual_seed(seed)          # the initial weights too: a seed's runs start from the same network
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


CHANCE = 0.2   # a run below this test accuracy ended at chance (10 classes): its ReLUs died


def _stats(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.2f} +- {100 * spread:.2f}"


def compare(args) -> None:
    """Channel GraNet at each value of one config field, paired by seed: accuracy, FLOPs and widths."""
    field, _, text = args.compare.partition("=")
    if field not in ("channel_floor", "channel_multiple") or not text:
        sys.exit("--compare takes channel_floor=A,B,... or channel_multiple=A,B,...")
    if field == "channel_multiple":      # integers, "auto" or "measured"
        values = [int(v) if v.isdigit() else v for v in text.split(",")]
    else:
        values = [float(v) for v in text.split(",")]
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "mnist1d_" + field)
    torch.set_num_threads(args.threads)
    data = load_mnist1d()
    x = data.x_train[:1]
    sparsities = [float(s) for s in args.sparsity.split(",")]
    seeds = list(range(args.seeds))
    runs = []
    for sparsity in sparsities:
        for seed in seeds:
            for value in values:
                config = gf.GraNetConfig(granularity="channel", final_sparsity=sparsity, total_steps=args.steps,
                                         **{field: value})
                print(f"  s={sparsity} seed {seed} {field}={value}", file=sys.stderr)
                torch.manual_seed(seed)      # the same initial weights for every value: a paired comparison
                result = train_mnist1d(Mnist1dCNN(), config, data, compile=False, seed=seed)
                compacted = gf.compact(result.model, x)
                widths = [m.out_channels for m in compacted.modules() if isinstance(m, torch.nn.Conv1d)]
                runs.append({"channel_sparsity": sparsity, "seed": seed, field: value, "accuracy": result.accuracy,
                             "flops": gf.compaction_report(compacted).flops_ratio, "conv_widths": widths})
    found = {"command": command(), "steps": args.steps, "threads": args.threads, "field": field, "values": values,
             "runs": runs}
    text = compare_text(found)
    print(text)
    write_json(found, out + ".json")
    write_atomic(out + ".txt", text)


def compare_text(data: dict) -> str:
    """The table of a ``--compare`` run (``data`` as its JSON holds it)."""
    field, values, runs = data["field"], data["values"], data["runs"]
    sparsities = sorted({r["channel_sparsity"] for r in runs})
    seeds = sorted({r["seed"] for r in runs})
    lines = [f"$ {data['command']}",
             f"MNIST-1D (10,000 samples), Mnist1dCNN (3 conv layers of 64 channels), channel GraNet, {data['steps']} "
             f"steps, seeds {seeds}, eager, {data.get('threads', 1)} threads; {field} in {values}, paired by seed",
             ""]
    rows = [("channel sparsity", field, "test acc %", "median %", f"at chance (< {100 * CHANCE:.0f} %)",
             "inference FLOPs (x dense)", "mean conv widths", f"acc - acc at {values[0]} (pp)",
             "better / worse / same")]
    for sparsity in sparsities:
        base = {r["seed"]: r["accuracy"] for r in runs if r["channel_sparsity"] == sparsity and r[field] == values[0]}
        for value in values:
            mine = [r for r in runs if r["channel_sparsity"] == sparsity and r[field] == value]
            diffs = [r["accuracy"] - base[r["seed"]] for r in mine]
            widths = [statistics.mean(w) for w in zip(*(r["conv_widths"] for r in mine))]
            counts = (sum(d > 0 for d in diffs), sum(d < 0 for d in diffs), sum(d == 0 for d in diffs))
            accuracies = [r["accuracy"] for r in mine]
            rows.append((f"{sparsity:.2f}", str(value), _stats(accuracies), f"{100 * statistics.median(accuracies):.2f}",
                         f"{sum(a < CHANCE for a in accuracies)} of {len(accuracies)}",
                         f"{statistics.mean(r['flops'] for r in mine):.4f}", " ".join(f"{w:.1f}" for w in widths),
                         "-" if value == values[0] else _stats(diffs),
                         "-" if value == values[0] else "/".join(map(str, counts))))
    lines += columns(rows)
    lines += ["", "mean +- standard deviation over seeds; the difference is paired (same seed); per run:"]
    for r in runs:
        lines.append(f"  s={r['channel_sparsity']:.2f} seed {r['seed']} {field}={r[field]}: "
                     f"{100 * r['accuracy']:.2f} %, FLOPs {r['flops']:.4f}, conv widths {r['conv_widths']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
