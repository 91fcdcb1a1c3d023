"""Test accuracy of GraNet and its baselines on MNIST-1D, with training and inference FLOPs.

    python benchmarks/accuracy.py            # 8 methods x 90/95/98% x 3 seeds
    python benchmarks/accuracy.py --quick    # 1 seed, 800 steps: a few minutes
    python benchmarks/accuracy.py --equal-flops GMP   # same training FLOPs, not steps

Every method trains the same model for the same number of steps with the
same optimizer, learning-rate schedule and hyper-parameters
(granet_fx.mnist1d.train_mnist1d: SGD, Nesterov momentum 0.9, weight decay
5e-4, learning rate 0.1 divided by 10 at 50% and 75% of training). Only the
method differs; every method keeps its library defaults (mask update every
100 steps, regrowth fraction 0.5, pruning from step 0 to half of training).
Runs are spread over --jobs processes of --threads threads each.

With --equal-flops LABEL every method spends the training FLOPs that LABEL
spends in --steps steps instead: a method whose training FLOPs are a fraction
f of dense training runs --steps x budget / f steps, where f is measured by
one pilot run per method (seed 0, --steps steps). The schedules are
fractions of each run's own steps (pruning ends at half, the learning rate
drops at 50% and 75%, regrowth decays over the run), so they stretch with
it; the mask update interval stays the library default of 100 steps.

Writes accuracy.md (the table and the paired comparisons behind the paper's
claims), accuracy.json (every run, the summary, and the records of a few runs)
and accuracy.png, schedule.png, layer_density.png into --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch

import granet_fx as gf
from granet_fx import runs
from granet_fx.export.files import atomic_write
from granet_fx.mnist1d import load_mnist1d, train_mnist1d
from granet_fx.models import Mnist1dNet
from granet_fx.passes import WEIGHT_MODULES

from common import command

# label, method, initial sparsity
METHODS = [
    ("Dense", "dense", 0.0),
    ("Static (ERK)", "static", 0.0),
    ("SET", "set", 0.0),
    ("RigL", "rigl", 0.0),
    ("GMP", "gmp", 0.0),
    ("FGGP", "fggp", 0.0),
    ("GraNet (s_i=0)", "granet", 0.0),
    ("GraNet-ST (s_i=0.5)", "granet", 0.5),
]
# The paper's claims, as (a, b, claim): a should beat b.
CLAIMS = [
    ("GraNet (s_i=0)", "GMP", "regrowth helps gradual pruning (GraNet beats GMP)"),
    ("FGGP", "GraNet (s_i=0)", "FGGP beats GraNet-style gradual pruning (the FGGP paper's claim)"),
    ("GraNet-ST (s_i=0.5)", "RigL", "GraNet-ST beats RigL at the same {budget}"),
    ("GraNet-ST (s_i=0.5)", "SET", "GraNet-ST beats SET at the same {budget}"),
]
# Runs whose schedule and layer densities are kept for the plots (highest sparsity, first seed).
RECORDED = ("GraNet (s_i=0)", "GraNet-ST (s_i=0.5)", "RigL")

_data = None


def _init_worker(samples: int, threads: int) -> None:
    global _data
    torch.set_num_threads(threads)
    _data = load_mnist1d(samples)


def _train(job: dict) -> dict:
    """Train one (method, sparsity, seed); returns its result row and its run record."""
    config = gf.GraNetConfig.from_dict(job["config"])
    recorder = runs.RunRecorder(every=max(config.total_steps // 300, 1)) if job["record"] else None
    torch.manual_seed(job["seed"])
    model = Mnist1dNet()
    result = train_mnist1d(model, config, _data, compile=job["compile"], seed=job["seed"], callback=recorder)
    report = result.report
    row = {
        "label": job["label"], "method": config.method, "initial_sparsity": config.initial_sparsity,
        "sparsity": job["sparsity"], "seed": job["seed"], "accuracy": result.accuracy,
        "global_sparsity": report.global_sparsity, "training_flops": report.training_flops,
        "inference_flops": report.inference_flops, "seconds": result.seconds, "steps": config.total_steps,
    }
    return {"row": row, "run": recorder.run(job["label"], result.accuracy) if recorder else None}


def make_jobs(args) -> list[dict]:
    jobs = []
    for seed in range(args.seeds):
        for sparsity in args.sparsities:
            for label, method, initial in METHODS:
                if args.methods and label not in args.methods:
                    continue
                if method == "dense" and sparsity != args.sparsities[0]:
                    continue
                config = gf.GraNetConfig(method=method, final_sparsity=sparsity, initial_sparsity=initial,
                                         total_steps=args.steps)
                record = label in RECORDED and sparsity == max(args.sparsities) and seed == 0
                jobs.append({"label": label, "sparsity": 0.0 if method == "dense" else sparsity,
                             "seed": seed, "config": config.to_dict(), "compile": args.compile,
                             "record": record})
    return jobs


def equal_flops_steps(steps: int, budget: float, fraction: float) -> int:
    """Steps at which a run whose training FLOPs are ``fraction`` of dense spends ``budget`` x ``steps`` dense steps."""
    return max(round(steps * budget / fraction), 1)


def stretch_jobs(jobs: list[dict], args) -> tuple[dict, list[dict]]:
    """Set each job's steps for equal training FLOPs (--equal-flops); returns the budgets and the pilot rows.

    One pilot run per sparse method and sparsity (seed 0, --steps steps)
    measures its training FLOPs fraction; dense is 1 by definition and gets
    the budget of the lowest sparsity.
    """
    pilots = [{**j, "record": False} for j in jobs if j["seed"] == 0 and j["config"]["method"] != "dense"]
    print(f"pilot: {len(pilots)} run(s) of {args.steps} steps to measure training FLOPs", file=sys.stderr)
    rows = [o["row"] for o in run_jobs(pilots, args)]
    fraction = {(r["label"], r["sparsity"]): r["training_flops"] for r in rows}
    budget = {s: fraction[args.equal_flops, s] for s in args.sparsities}
    for j in jobs:
        sparsity = j["sparsity"] or args.sparsities[0]
        f = 1.0 if j["config"]["method"] == "dense" else fraction[j["label"], j["sparsity"]]
        j["config"] = {**j["config"], "total_steps": equal_flops_steps(args.steps, budget[sparsity], f)}
    return budget, rows


def run_jobs(jobs: list[dict], args) -> list[dict]:
    done = []

    def progress(out):
        done.append(out)
        r = out["row"]
        print(f"[{len(done)}/{len(jobs)}] {r['label']} {100 * r['sparsity']:g}% seed {r['seed']}: "
              f"{100 * r['accuracy']:.2f}% ({r['seconds']:.0f} s)", file=sys.stderr, flush=True)

    if args.jobs == 1:
        _init_worker(args.samples, args.threads)
        for job in jobs:
            progress(_train(job))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, context, _init_worker,
                                                    (args.samples, args.threads)) as pool:
            for future in concurrent.futures.as_completed([pool.submit(_train, j) for j in jobs]):
                progress(future.result())
    key = {(j["label"], j["sparsity"], j["seed"]): i for i, j in enumerate(jobs)}
    return sorted(done, key=lambda o: key[o["row"]["label"], o["row"]["sparsity"], o["row"]["seed"]])


def claims(results: list[dict], sparsities: list[float], budget: str = "training steps") -> list[dict]:
    out = []
    for a, b, claim in CLAIMS:
        for s in sparsities:
            d = runs.paired_difference(results, a, b, s)
            if d is not None:
                out.append({**d, "claim": claim.format(budget=budget)})
    return out


def summarize(results: list[dict], steps: int) -> list[dict]:
    """runs.summarize, plus each method's steps and its training FLOPs relative to dense training of ``steps``."""
    summary = runs.summarize(results)
    for s in summary:
        rows = [r for r in results if r["label"] == s["label"] and r["sparsity"] == s["sparsity"]]
        s["steps"] = rows[0]["steps"]
        spent = [r["training_flops"] * r["steps"] / steps for r in rows if r["training_flops"] is not None]
        s["training_budget"] = sum(spent) / len(spent) if spent else None
    return summary


def flops_table(summary: list[dict]) -> str:
    """The summary as a Markdown table with each method's steps and the training FLOPs it spent."""
    lines = [
        "| Method | Sparsity | Steps | Test accuracy (%) | Training FLOPs spent | Inference FLOPs | Seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        lines.append(f"| {s['label']} | {100 * s['sparsity']:g}% | {s['steps']:,} | {runs.accuracy_cell(s)} "
                     f"| {s['training_budget']:.3f}x | {s['inference_flops']:.3f}x | {s['seeds']} |")
    return "\n".join(lines) + "\n"


def markdown(sweep: dict) -> str:
    setup = sweep["setup"]
    reference = setup.get("equal_flops")
    if reference:
        budgets = ", ".join(f"{b:.3f}x at {100 * s:g}% sparsity" for s, b in setup["budget"])
        steps = (f"Equal training FLOPs: every method gets the training FLOPs that {reference} spends in "
                 f"{setup['steps']:,} steps ({budgets}, relative to {setup['steps']:,} dense steps), so each "
                 "runs its own number of steps (the Steps column), set from its training FLOPs in one pilot "
                 "run (seed 0, the same steps). Schedules are fractions of each run's steps; mask updates stay "
                 "every 100 steps. Batch 128")
        table = flops_table(sweep["summary"])
        flops = ("FLOPs: multiply-accumulates of the conv/linear layers relative to the dense model; training "
                 f"FLOPs spent are summed over all of a run's steps, relative to dense training for "
                 f"{setup['steps']:,} steps.")
    else:
        steps = f"{setup['steps']:,} steps of batch 128 per run"
        table = runs.markdown_table(sweep["summary"])
        flops = ("FLOPs: multiply-accumulates of the conv/linear layers relative to the dense model "
                 "(training: summed over all steps).")
    lines = [
        "# Accuracy of GraNet and baselines on MNIST-1D",
        "",
        f"Command: `{sweep['command']}`",
        "",
        f"Data: MNIST-1D generated by `mnist1d` ({setup['samples']:,} samples: "
        f"{setup['train']:,} train, {setup['test']:,} test). Model: `{setup['model']}` "
        f"({setup['weights']:,} conv/linear weights). {steps}, "
        f"{setup['seeds']} seed(s), {setup['mode']}; {setup['jobs']} process(es) x {setup['threads']} thread(s); "
        f"torch {setup['torch']} on {setup['machine']}. Wall time {setup['wall_seconds'] / 60:.1f} min "
        f"(1-minute load average {setup['load_average'][0]:.1f} at the start and {setup['load_average'][1]:.1f} "
        f"at the end; above {setup['cpus']}, other jobs shared the CPUs).",
        "",
        f"Test accuracy: mean ± sample standard deviation over seeds. {flops}",
        "",
        table,
        "## The paper's claims, paired by seed",
        "",
        "Difference of test accuracy in percentage points (mean ± std over seeds of a - b) and the "
        "seeds where a was better.",
        "",
        "| Claim | a - b | Sparsity | Difference (points) | a better |",
        "|---|---|---:|---:|---:|",
    ]
    for c in sweep["claims"]:
        diff = f"{100 * c['mean']:+.2f}" + ("" if c["std"] is None else f" ± {100 * c['std']:.2f}")
        lines.append(f"| {c['claim']} | {c['a']} - {c['b']} | {100 * c['sparsity']:g}% | {diff} "
                     f"| {c['wins']}/{c['pairs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed and 800 steps, unless given")
    parser.add_argument("--seeds", type=int, help="seeds per method and sparsity (default 3)")
    parser.add_argument("--steps", type=int, help="training steps per run (default 3000)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    parser.add_argument("--methods", nargs="+", metavar="LABEL", choices=[m[0] for m in METHODS],
                        help="run only these methods, by label (default: all)")
    parser.add_argument("--samples", type=int, default=20_000, help="MNIST-1D samples, 80%% train (default 20000)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    parser.add_argument("--compile", action="store_true", help="train under torch.compile (default eager)")
    parser.add_argument("--equal-flops", metavar="LABEL", choices=[m[0] for m in METHODS],
                        help="give every method the training FLOPs that LABEL spends in --steps steps, "
                        "instead of the same steps")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results; "
                        "runs/accuracy-quick with --quick)")
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.steps = args.steps or (800 if args.quick else 3000)
    args.out = args.out or Path("runs/accuracy-quick" if args.quick else "benchmarks/results")
    for name in ("seeds", "steps", "jobs", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.samples < 100:
        parser.error("--samples must be at least 100")
    args.sparsities = sorted(set(args.sparsities))
    try:
        jobs = make_jobs(args)
    except ValueError as e:
        parser.error(str(e))
    if args.equal_flops and args.methods and args.equal_flops not in args.methods:
        parser.error(f"--equal-flops {args.equal_flops} is not among --methods")
    if args.equal_flops == "Dense":
        parser.error("--equal-flops needs a sparse method: Dense spends the most FLOPs, nothing to give the others")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    args.out.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    budget, pilot = stretch_jobs(jobs, args) if args.equal_flops else ({}, [])
    outs = run_jobs(jobs, args)
    wall = time.perf_counter() - start
    results = [o["row"] for o in outs]
    train = int(0.8 * args.samples)
    sweep = {
        "format": runs.SWEEP_FORMAT, "version": runs.VERSION,
        "title": "MNIST-1D test accuracy",
        "command": command(),
        "setup": {
            "samples": args.samples, "train": train, "test": args.samples - train,
            "model": "granet_fx.models.Mnist1dNet()",
            "weights": sum(m.weight.numel() for m in Mnist1dNet().modules() if isinstance(m, WEIGHT_MODULES)),
            "steps": args.steps, "seeds": args.seeds, "batch_size": 128,
            "mode": "torch.compile" if args.compile else "eager", "jobs": args.jobs, "threads": args.threads,
            "torch": torch.__version__, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "cpus": os.cpu_count(),
            "wall_seconds": wall, "load_average": [load_before, os.getloadavg()[0]],
            "equal_flops": args.equal_flops, "budget": sorted(budget.items()), "pilot": pilot,
        },
        "results": results,
        "summary": summarize(results, args.steps),
        "claims": claims(results, args.sparsities, "training FLOPs" if args.equal_flops else "training steps"),
        "runs": [o["run"] for o in outs if o["run"] is not None],
    }
    runs.save_json(sweep, args.out / "accuracy.json")
    text = markdown(sweep)
    atomic_write(args.out / "accuracy.md", text.encode())
    written = gf.plot_report(sweep, args.out)
    print(text)
    print("wrote", ", ".join(str(p) for p in [args.out / "accuracy.json", args.out / "accuracy.md", *written]))


if __name__ == "__main__":
    main()
