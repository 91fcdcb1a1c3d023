"""onnxruntime speedup of channel-pruned, compacted models over the dense ones, next to the FLOPs ratio.

    python benchmarks/speedup.py            # writes benchmarks/results/speedup.txt and speedup.json
    python benchmarks/speedup.py --models convnext --out benchmarks/results/speedup_convnext   # one model
    python benchmarks/speedup.py --options --multiple 8 --threads 1,2 --runs 20
                                            # onnxruntime session options: speedup_options.txt and .json

The models (``--models``, default all three), random weights:

- resnet18: granet_fx.models.resnet18, CIFAR ResNet-18 (32x32 inputs, ``--width`` 64: 11M parameters);
- mobilenetv2: granet_fx.models.MobileNetV2 at width 32 (32x32 inputs; inverted residual blocks with
  depthwise 3x3 convolutions; 0.4M parameters);
- convnext: transformers' ConvNextForImageClassification from a ConvNextConfig, no download
  (64x64 inputs, patch 4, hidden sizes 48/96/192/384, depths 2/2/2/2, 10 labels: 3.6M parameters),
  with a layer scale of 1 instead of 1e-6, so that the MLPs, whose hidden channels are what
  channel pruning can remove, weigh in the outputs that compaction is checked on.

Each model is pruned one-shot to each channel sparsity by the GraNet controller
(granularity="channel", global L2 ranking of the channels of the untrained
weights: the speed depends on the layer widths that result, not on the weight
values), compacted with granet_fx.compact (which checks the result against
the masked model: max abs error in the output), and exported with the dense
model to ONNX (torch.onnx.export, dynamo, dynamic batch). granet-bench's
measurement then runs dense and compacted alternately at each batch size. The
FLOPs ratio (dense / compacted, counted in the ONNX graphs) is the speedup that
removing channels could give if every layer were compute-bound; the roofline
limit (granet-bench) is the one that allows for memory-bound layers: dense /
compacted roofline time, each node max(FLOPs / compute rate, bytes moved /
bandwidth) with the rates measured in the same run. Targets: a measured
speedup of at least 0.9 x the FLOPs ratio, and of 0.85 x the roofline limit
on 1 thread, 0.8 x on more.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

import granet_fx as gf
from granet_fx.export.archive import export_program
from granet_fx.export.bench import format_table, machine, run
from granet_fx.export.onnx_export import to_onnx
from granet_fx.export.roofline import SESSION_SETTINGS
from granet_fx.models import MobileNetV2, resnet18
from granet_fx.report import columns

from common import choices, command, write_outputs

TARGET = 0.9                         # of the FLOPs ratio
LIMIT_TARGET = (0.85, 0.8)           # of the roofline limit, on 1 thread and on more
MODELS = ("resnet18", "mobilenetv2", "convnext")
MOBILENET_WIDTH = 32
CONVNEXT = dict(image_size=64, patch_size=4, hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 2, 2], num_labels=10,
                layer_scale_init_value=1.0)


def build(name: str, width: int) -> tuple[str, torch.nn.Module, torch.Tensor]:
    """(description, dense model in eval mode, example input of batch 1); the weights are the same whatever
    else is measured (seed 0 for each model)."""
    torch.manual_seed(0)
    if name == "resnet18":
        x = torch.randn(1, 3, 32, 32)
        return f"ResNet-18 (CIFAR, 32x32, width {width})", resnet18(width=width).eval(), x
    if name == "mobilenetv2":
        x = torch.randn(1, 3, 32, 32)
        return f"MobileNetV2 (granet_fx.models, 32x32, width {MOBILENET_WIDTH})", MobileNetV2(MOBILENET_WIDTH).eval(), x
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(**CONVNEXT)
    size = CONVNEXT["image_size"]
    description = (f"ConvNeXt (transformers ConvNextForImageClassification, {size}x{size}, hidden sizes "
                   f"{CONVNEXT['hidden_sizes']}, depths {CONVNEXT['depths']}, layer scale 1)")
    x = torch.randn(1, 3, size, size)
    return description, ConvNextForImageClassification(config).eval(), x


def widths(model: torch.nn.Module) -> tuple[list[int], list[int]]:
    """Output channels of the convolutions and output features of the linear layers (every 2-D weight: sparsify
    may have turned a Linear into a traced module), in module order."""
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs, [p.shape[0] for p in model.parameters() if p.ndim == 2]


def prune_channels(model: torch.nn.Module, sparsity: float, multiple: int | str, x: torch.Tensor) -> torch.nn.Module:
    """``model`` with ``sparsity`` of its removable output channels masked by one controller step."""
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1,
                             prune_end=1, update_every=1, channel_multiple=multiple)
    model = gf.sparsify(model, config, example_inputs=(x,))
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0))
    granet.step()
    return model


def export(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """ONNX with a dynamic batch, the way granet-export writes it."""
    program, _ = export_program(model.eval(), (x,), dynamic_batch=True)
    with open(path, "wb") as f:
        f.write(to_onnx(program).SerializeToString())


def option_variants(threads: int) -> dict[str, dict]:
    """onnxruntime session settings to compare: changes to granet-bench's options (roofline.session_options)."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    variants = {
        "granet-bench": {},
        "ORT_ENABLE_EXTENDED (no NCHWc layout)": {"level": level.ORT_ENABLE_EXTENDED},
        "ORT_ENABLE_BASIC": {"level": level.ORT_ENABLE_BASIC},
        "intra-op spinning on": {"config": {"session.intra_op.allow_spinning": "1"}},
    }
    if threads > 1:
        variants["dynamic_block_base 4"] = {"config": {"session.dynamic_block_base": "4"}}
        workers = ";".join(str(i + 2) for i in range(threads - 1))  # the main thread is the caller's
        variants[f"worker affinity {workers}"] = {"config": {"session.intra_op_thread_affinities": workers}}
    return variants


def option_session(path: str, threads: int, variant: dict):
    import onnxruntime as ort

    from granet_fx.export.roofline import session_options

    options = session_options(threads)
    if "level" in variant:
        options.graph_optimization_level = variant["level"]
    for key, value in variant.get("config", {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def compare_options(paths: dict[str, str], threads: list[int], batches: list[int], warmup: int, runs: int) -> tuple:
    """Median latency of each model under each session-option variant, the variants run alternately."""
    import numpy as np

    rows = [("model", "threads", "batch", "variant", "median ms", "vs granet-bench")]
    found = []
    for n in threads:
        variants = option_variants(n)
        for name, path in paths.items():
            sessions = {v: option_session(path, n, spec) for v, spec in variants.items()}
            for batch in batches:
                given = sessions["granet-bench"].get_inputs()[0]
                image = np.random.default_rng(0).standard_normal((batch, *given.shape[1:])).astype(np.float32)
                feed = {given.name: image}
                times = {v: [] for v in variants}
                order = list(variants)
                for r in range(warmup + runs):
                    for v in (order if r % 2 == 0 else order[::-1]):
                        start = time.perf_counter()
                        sessions[v].run(None, feed)
                        if r >= warmup:
                            times[v].append(time.perf_counter() - start)
                medians = {v: 1e3 * float(np.median(t)) for v, t in times.items()}
                for v, ms in medians.items():
                    rows.append((name, str(n), str(batch), v, f"{ms:.3f}", f"{medians['granet-bench'] / ms:.3f}x"))
                    found.append({"model": name, "threads": n, "batch": batch, "variant": v, "median_ms": ms})
                print(f"options: {name}, {n} thread(s), batch {batch} done", file=sys.stderr)
    return rows, found


def measure_model(name: str, dense: torch.nn.Module, x: torch.Tensor, tmp: str, sparsities: list[float],
                  multiples: list[int | str], threads: list[int], batches: list[int], warmup: int,
                  runs: int) -> tuple[list, list, list, list]:
    """Prune, compact, export and measure one model at every setting: (table rows, notes on the rates,
    compaction details, JSON runs)."""
    rows, notes, details, found = [], [], [], []
    dense_path = os.path.join(tmp, f"{name}_dense.onnx")
    export(dense, x, dense_path)
    for sparsity in sparsities:
        for multiple in multiples:
            start = time.perf_counter()
            sparse = prune_channels(copy.deepcopy(dense), sparsity, multiple, x)
            pruned_in = time.perf_counter() - start
            compacted = gf.compact(sparse, x)
            report = gf.compaction_report(compacted)
            convs, linears = widths(compacted)
            print(f"{name}: {report}", file=sys.stderr)
            details += ["", f"{name}, channel sparsity {sparsity}, channel_multiple {multiple}:", str(report),
                        f"conv output channels: {convs}", f"linear output features: {linears}"]
            if multiple == "measured":
                details.append(f"sparsify and one-shot pruning took {pruned_in:.1f} s, with the calibration")
            path = os.path.join(tmp, f"{name}_compacted_{sparsity}_{multiple}.onnx")
            export(compacted, x, path)
            for n in threads:
                bench = run([path], dense_path, batches, n, warmup, runs)
                for entry in bench["models"]:  # the files lived in a temporary folder
                    entry["path"] = os.path.basename(entry["path"])
                print(format_table(bench), file=sys.stderr)
                flops_ratio = bench["models"][0]["flops_ratio"]
                goal = LIMIT_TARGET[0] if n == 1 else LIMIT_TARGET[1]
                for r in bench["results"]:
                    compacted_ms, dense_ms = (stats["median_ms"] for stats in r["latency"])
                    speedup, limit = r["speedup"][0], r["limit"][0]
                    ratio = speedup / flops_ratio
                    rows.append((name, f"{sparsity:.2f}", str(multiple), str(n), str(r["batch"]), f"{dense_ms:.2f}",
                                 f"{compacted_ms:.2f}", f"{flops_ratio:.2f}x", f"{limit:.2f}x", f"{speedup:.2f}x",
                                 f"{speedup / limit:.2f}", f"{ratio:.2f}", "yes" if ratio >= TARGET else "NO",
                                 f"{goal}: {'yes' if speedup / limit >= goal else 'NO'}"))
                    roof, eff, share = r["roofline"], r["roofline_efficiency"], r["roofline"]["memory_bound_share"]
                    where = f"{name}, sparsity {sparsity:.2f}, multiple {multiple}, {n} thread(s), batch {r['batch']}"
                    notes.append(f"  {where}: compute {roof['flops_per_s'] / 1e9:.1f} GFLOP/s ({roof['probe']}); "
                                 f"bandwidth {roof['bytes_per_s'][0] / 1e9:.1f} GB/s compacted, "
                                 f"{roof['bytes_per_s'][1] / 1e9:.1f} GB/s dense; roofline reached "
                                 f"{100 * eff[0]:.0f} % compacted, {100 * eff[1]:.0f} % dense; memory-bound "
                                 f"{100 * share[0]:.0f} % compacted, {100 * share[1]:.0f} % dense")
                    if speedup > limit:
                        notes.append(f"  NOTE: {where}: the speedup {speedup:.2f}x is ABOVE the roofline limit "
                                     f"{limit:.2f}x (the compacted model got closer to its roofline than the dense "
                                     "one)")
                found.append({"model": name, "channel_sparsity": sparsity, "channel_multiple": multiple,
                              "threads": n, "compaction": str(report), "max_abs_error": report.max_abs_error,
                              "conv_widths": convs, "linear_widths": linears,
                              "pytorch_flops_ratio": 1 / report.flops_ratio, "bench": bench})
    return rows, notes, details, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=choices(MODELS), default=list(MODELS),
                        help=f"comma-separated models to measure (default {','.join(MODELS)})")
    parser.add_argument("--sparsity", default="0.5,0.75", help="channel sparsities (default 0.5,0.75)")
    parser.add_argument("--multiple", default="1,8",
                        help="channel_multiple values: layers keep a multiple of this many channels; 'auto' (the NCHWc "
                        "block of this CPU) and 'measured' (per group, granet_fx.export.calibrate at 1 thread) "
                        "too (default 1,8)")
    parser.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    parser.add_argument("--threads", default="2", help="onnxruntime thread counts, for example 1,2 (default 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64: 11M parameters)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speedup"),
                        help="output path without extension (default benchmarks/results/speedup)")
    parser.add_argument("--options", action="store_true",
                        help="compare onnxruntime session options on the dense and compacted models instead "
                        "(channel_multiple: the first of --multiple); writes <out>_options.txt and .json")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    sparsities = [float(s) for s in args.sparsity.split(",")]
    multiples = [int(k) if k.isdigit() else k for k in args.multiple.split(",")]
    if any(k not in ("auto", "measured") and not isinstance(k, int) for k in multiples):
        parser.error(f"--multiple takes integers, 'auto' and 'measured'; got {args.multiple!r}")
    batches = [int(b) for b in args.batch.split(",")]
    models = {name: build(name, args.width) for name in args.models}
    if "measured" in multiples:   # calibrated in this run, on this machine, not read from an earlier one
        os.environ["GRANET_FX_CACHE"] = tempfile.mkdtemp(prefix="granet_fx_calibration_")

    cmd = command()
    m = machine()
    if args.options:
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for name, (_, dense, x) in models.items():
                paths[f"{name} dense"] = os.path.join(tmp, f"{name}_dense.onnx")
                export(dense, x, paths[f"{name} dense"])
                for sparsity in sparsities:
                    sparse = prune_channels(copy.deepcopy(dense), sparsity, multiples[0], x)
                    paths[f"{name} compacted {sparsity}"] = os.path.join(tmp, f"{name}_compacted_{sparsity}.onnx")
                    export(gf.compact(sparse, x), x, paths[f"{name} compacted {sparsity}"])
            rows, found = compare_options(paths, threads, batches, args.warmup, args.runs)
        lines = [f"$ {cmd}"]
        lines += [f"{name}: {description}" for name, (description, _, _) in models.items()]
        lines += [f"dense and compacted (channel_multiple {multiples[0]}), onnxruntime on {m['cpu']} "
                  f"({m['logical_cpus']} logical CPUs), warm-up {args.warmup}, {args.runs} timed runs, the variants "
                  "of one model run alternately",
                  f"load average (1 min) before / after the measurements: {load:.1f} / {os.getloadavg()[0]:.1f} on "
                  f"{os.cpu_count()} logical CPUs", ""]
        lines += columns(rows)
        lines += ["", f"granet-bench = the session options granet-bench uses ({SESSION_SETTINGS}: granet_fx.export."
                  "roofline.session_options); each other variant changes one of them; vs granet-bench = granet-bench "
                  "median / variant median (above 1: the variant is faster)"]
        write_outputs(args.out + "_options", "\n".join(lines) + "\n", {"command": cmd, "machine": m, "runs": found})
        return
    lines = [f"$ {cmd}"]
    lines += [f"{name}: {description}" for name, (description, _, _) in models.items()]
    lines += [
        f"onnxruntime on {m['cpu']} ({m['logical_cpus']} logical CPUs), warm-up {args.warmup}, {args.runs} timed runs, "
        f"dense and compacted run alternately; sessions: {SESSION_SETTINGS}",
        f"load average (1 min) before the measurements: {os.getloadavg()[0]:.1f} on {os.cpu_count()} logical CPUs",
        "",
    ]
    rows = [("model", "channel sparsity", "multiple", "threads", "batch", "dense ms", "compacted ms", "FLOPs ratio",
             "roofline limit", "speedup", "speedup / limit", "speedup / FLOPs ratio", f">= {TARGET}",
             "limit target")]
    notes = []      # the rates measured for the roofline, and speedups above their limit
    details = []    # what compaction did, once per (model, sparsity, multiple)
    results = {"command": cmd, "machine": m, "width": args.width,
               "models": {name: description for name, (description, _, _) in models.items()}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (_, dense, x) in models.items():
            more = measure_model(name, dense, x, tmp, sparsities, multiples, threads, batches, args.warmup, args.runs)
            rows += more[0]
            notes += more[1]
            details += more[2]
            results["runs"] += more[3]
    lines += columns(rows)
    lines += ["", "speedup = dense median latency / compacted median latency; FLOPs ratio = dense / compacted "
              "FLOPs counted in the ONNX graphs; roofline limit = dense / compacted roofline time (granet-bench: per "
              "node max(FLOPs / compute rate, bytes / bandwidth), rates measured in the same run); limit target = "
              f"the speedup / limit to reach ({LIMIT_TARGET[0]} on 1 thread, {LIMIT_TARGET[1]} on more) and "
              "whether it is reached",
              "", "measured rates (compute: best of a 1024 MatMul and the dominant layers; bandwidth: a copy the "
              "size of the model's working set), the share of its roofline each model reached and the share of its "
              "roofline time in memory-bound nodes:"] + notes
    lines += details
    write_outputs(args.out, "\n".join(lines) + "\n", results)


if __name__ == "__main__":
    main()
