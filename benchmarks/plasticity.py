"""Pruning plasticity on MNIST-1D: how well a network recovers after pruning at different points of training.

    python benchmarks/plasticity.py            # 5 prune points x one-shot/gradual x with/without regrowth x 3 seeds
    python benchmarks/plasticity.py --quick    # 1 seed, 800 steps

The experiment of GraNet's paper (section 3), on MNIST-1D: a dense network
trains with the recipe of accuracy.py; at a point t_p of training it is pruned
to the target sparsity, one-shot (all at once at t_p) or gradually (the cubic
schedule from t_p over a tenth of training), and then trains on to the end
with the same learning-rate schedule. "Without regeneration" is GMP (the mask
only shrinks); "with regeneration" is GraNet's zero-cost neuroregeneration
(from t_p on, every mask update drops the weakest weights of each layer and
regrows as many where the gradient is largest). Everything else is equal:
same initial weights, batches, optimizer and mask-update steps for each seed.
The recovered accuracy is the test accuracy at the end. Paired differences
(with minus without regeneration, same seed) say whether regeneration helps.

Writes plasticity.md, plasticity.json and plasticity.png into --out.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

import granet_fx as gf
from granet_fx import runs
from granet_fx.export.files import atomic_write

from accuracy import run_jobs
from common import command

POINTS = (0.1, 0.25, 0.4, 0.55, 0.7)     # prune points, as fractions of training
GRADUAL = 0.1                            # a gradual pruning lasts this fraction of training
MODES = ("one-shot", "gradual")
METHODS = (("without regeneration", "gmp"), ("with regeneration", "granet"))


def make_jobs(args) -> list[dict]:
    jobs = []
    for seed in range(args.seeds):
        dense = gf.GraNetConfig(method="dense", total_steps=args.steps)
        jobs.append({"label": "dense", "sparsity": 0.0, "seed": seed, "config": dense.to_dict(),
                     "compile": False, "record": False})
        for point in POINTS:
            start = int(point * args.steps)
            for mode in MODES:
                end = start if mode == "one-shot" else start + int(GRADUAL * args.steps)
                for name, method in METHODS:
                    config = gf.GraNetConfig(method=method, final_sparsity=args.sparsity, total_steps=args.steps,
                                             prune_start=start, prune_end=end)
                    jobs.append({"label": f"{mode}, {name}, t_p={point:g}", "sparsity": args.sparsity,
                                 "seed": seed, "config": config.to_dict(), "compile": False, "record": False})
    return jobs


def _stats(values: list[float]) -> tuple[float, float | None]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def tables(results: list[dict], seeds: int) -> tuple[list[str], list[dict]]:
    by = {(r["label"], r["seed"]): r["accuracy"] for r in results}
    dense = [by["dense", s] for s in range(seeds)]
    mean, std = _stats(dense)
    lines = [f"Dense: {100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}") + " %", "",
             "| Pruned at | Mode | Without regeneration (%) | With regeneration (%) | With - without (points) "
             "| Seeds better |", "|---:|---|---:|---:|---:|---:|"]
    rows = []
    for mode in MODES:
        for point in POINTS:
            acc = {name: [by[f"{mode}, {name}, t_p={point:g}", s] for s in range(seeds)] for name, _ in METHODS}
            diffs = [a - b for a, b in zip(acc["with regeneration"], acc["without regeneration"])]
            cells = []
            for values in (acc["without regeneration"], acc["with regeneration"], diffs):
                m, sd = _stats(values)
                cells.append(f"{100 * m:.2f}" + ("" if sd is None else f" ± {100 * sd:.2f}"))
            wins = sum(d > 0 for d in diffs)
            lines.append(f"| {point:g} | {mode} | {cells[0]} | {cells[1]} | {cells[2]} | {wins}/{seeds} |")
            rows.append({"mode": mode, "point": point, "without": acc["without regeneration"],
                         "with": acc["with regeneration"], "differences": diffs, "wins": wins})
    return lines, rows


def plot(rows: list[dict], dense: list[float], path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, mode in zip(axes, MODES):
        for key, label, style in (("without", "without regeneration (GMP)", "o--"),
                                  ("with", "with regeneration (GraNet)", "s-")):
            points = [r["point"] for r in rows if r["mode"] == mode]
            values = [[100 * v for v in r[key]] for r in rows if r["mode"] == mode]
            means = [statistics.mean(v) for v in values]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
            ax.errorbar(points, means, yerr=errs, fmt=style, capsize=3, label=label)
        ax.axhline(100 * statistics.mean(dense), color="gray", lw=1, label="dense")
        ax.set_title(f"{mode} pruning")
        ax.set_xlabel("pruned at (fraction of training)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy after recovery (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and 800 steps, unless given")
    parser.add_argument("--seeds", type=int, help="seeds (default 3)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 3000)")
    parser.add_argument("--sparsity", type=float, default=0.98, help="target sparsity (default 0.98)")
    parser.add_argument("--samples", type=int, default=20_000, help="MNIST-1D samples, 80%% train (default 20000)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results; "
                        "runs/plasticity-quick with --quick)")
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (800 if args.quick else 3000)
    args.out = args.out or Path("runs/plasticity-quick" if args.quick else "benchmarks/results")
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = make_jobs(args)
    start = time.perf_counter()
    results = [o["row"] for o in run_jobs(jobs, args)]
    wall = time.perf_counter() - start
    lines, rows = tables(results, args.seeds)
    dense = [r["accuracy"] for r in results if r["label"] == "dense"]
    text = "\n".join([
        "# Pruning plasticity on MNIST-1D", "", f"Command: `{command()}`", "",
        f"`granet_fx.models.Mnist1dNet`, {args.steps:,} steps of batch 128 (accuracy.py's recipe), pruned to "
        f"{args.sparsity:.0%} at t_p (one-shot, or gradually over {GRADUAL:g} of training), then trained to the "
        f"end; {args.seeds} seed(s), mean ± std; {args.jobs} process(es) x {args.threads} thread(s), torch "
        f"{torch.__version__} on {platform.machine()}, {os.cpu_count()} CPUs; wall time {wall / 60:.1f} min.",
        "", *lines, ""])
    data = {"command": command(), "steps": args.steps, "sparsity": args.sparsity, "seeds": args.seeds,
            "points": list(POINTS), "gradual": GRADUAL, "wall_seconds": wall, "results": results, "rows": rows}
    runs.save_json(data, args.out / "plasticity.json")
    atomic_write(args.out / "plasticity.md", text.encode())
    plot(rows, dense, args.out / "plasticity.png")
    print(text)


if __name__ == "__main__":
    main()
