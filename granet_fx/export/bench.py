"""granet-bench: onnxruntime latency of an ONNX model, side by side with a baseline.

    granet-bench model.onnx --baseline dense.onnx --batch 1,32 --threads 2
    granet-bench sparse.onnx compact.onnx --baseline dense.onnx

For each batch size the models run alternately (ABC..., then ...CBA), so that
drift of the machine hits all of them; medians and 90th percentiles come from
the same rounds. Reported per model: file size, FLOPs per sample (2 x the
multiply-accumulates of Conv, MatMul and Gemm, with shapes from ONNX shape
inference), latency and throughput, and the speedup over the baseline. Inputs
are random, with the first dimension of every input as the batch.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..report import columns
from .console import ArgumentParser, UsageError, first_line
from .files import atomic_write, check_writable

PROG = "granet-bench"


class BenchError(UsageError):
    """A problem with the user's input: reported in one line, exit code 2."""


@dataclass
class OnnxModel:
    path: str
    file_bytes: int
    flops: int | None          # per sample; None when some shapes are unknown


def load(path: str) -> OnnxModel:
    """Read an ONNX file's size and FLOPs, or raise BenchError saying what is wrong with it."""
    import onnx

    if not os.path.isfile(path):
        raise BenchError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:
        raise BenchError(f"{path}: not an ONNX model ({first_line(e)})") from e
    if not model.graph.node:
        raise BenchError(f"{path}: not an ONNX model (no graph nodes)")
    size = os.path.getsize(path)
    folder = os.path.dirname(os.path.abspath(path))
    external = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                for entry in t.external_data if entry.key == "location"}
    size += sum(os.path.getsize(os.path.join(folder, f)) for f in external if os.path.isfile(os.path.join(folder, f)))
    macs = count_macs(model)
    if macs is None and external:  # shape inference may need small constants stored outside the file
        try:
            macs = count_macs(onnx.load(path))
        except Exception as e:
            raise BenchError(f"{path}: cannot read its external data ({first_line(e)})") from e
    return OnnxModel(path, size, None if macs is None else 2 * macs)


def count_macs(model) -> int | None:
    """Multiply-accumulates of the Conv, MatMul and Gemm nodes for one sample (batch dimension set to 1).

    None when shape inference leaves a needed shape unknown.
    """
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and len(dims):
            dims[0].Clear()
            dims[0].dim_value = 1
    del model.graph.value_info[:]  # shapes stored with a symbolic batch: infer them again for batch 1
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return None
    shapes: dict[str, list[int | None]] = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    for t in model.graph.initializer:
        shapes[t.name] = list(t.dims)

    def known(name: str) -> list[int] | None:
        s = shapes.get(name)
        return s if s is not None and all(d is not None for d in s) else None

    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        y, a, w = known(node.output[0]), known(node.input[0]), known(node.input[1])
        if y is None or a is None or w is None:
            return None
        if node.op_type == "Conv":
            total += math.prod(y) * math.prod(w[1:])
        elif node.op_type == "MatMul":
            total += math.prod(y) * a[-1]
        else:
            trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
            total += math.prod(y) * (a[0] if trans_a else a[1])
    return total


def _session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise BenchError(f"{path}: onnxruntime cannot load it ({first_line(e)})") from e


_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
           "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def _feeds(session, path: str, batch: int) -> dict[str, np.ndarray]:
    """Random inputs for ``batch`` samples: standard normal floats, zeros for integers and booleans."""
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        if value.type not in _DTYPES:
            raise BenchError(f"{path}: input {value.name!r} has type {value.type}, which {PROG} cannot fill")
        shape = list(value.shape)
        if not shape:
            raise BenchError(f"{path}: input {value.name!r} is a scalar; {PROG} needs a batch dimension")
        if isinstance(shape[0], int) and shape[0] != batch:
            raise BenchError(f"{path}: input {value.name!r} has a fixed batch size of {shape[0]}; "
                             f"--batch {batch} needs a dynamic first dimension")
        rest = shape[1:]
        if not all(isinstance(d, int) for d in rest):
            raise BenchError(f"{path}: input {value.name!r} has dynamic dimensions {shape}; {PROG} needs "
                             "every dimension but the first to be fixed")
        dtype = _DTYPES[value.type]
        size = [batch, *rest]
        feeds[value.name] = rng.standard_normal(size).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else np.zeros(size, dtype=dtype)
    return feeds


def _stats(seconds: list[float], batch: int) -> dict[str, float]:
    median = float(np.median(seconds))
    return {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
            "items_per_s": batch / median}


def measure(paths: Sequence[str], batches: Sequence[int], threads: int, warmup: int, runs: int,
            progress: Callable[[int, int, str], None] | None = None) -> list[dict]:
    """Latency of each model at each batch size, the models run alternately; one dict per batch size."""
    sessions = [_session(p, threads) for p in paths]
    total, done = len(batches) * (warmup + runs) * len(paths), 0
    all_feeds = {batch: [_feeds(s, p, batch) for s, p in zip(sessions, paths)] for batch in batches}  # fail early
    results = []
    for batch, feeds in all_feeds.items():
        seconds: list[list[float]] = [[] for _ in paths]
        for r in range(warmup + runs):
            order = range(len(paths)) if r % 2 == 0 else reversed(range(len(paths)))
            for i in order:
                start = time.perf_counter()
                try:
                    sessions[i].run(None, feeds[i])
                except Exception as e:
                    raise BenchError(f"{paths[i]}: onnxruntime failed to run it ({first_line(e)})") from e
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    seconds[i].append(elapsed)
                done += 1
                if progress:
                    progress(done, total, f"batch {batch}")
        results.append({"batch": batch, "models": [_stats(s, batch) for s in seconds]})
    return results


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform()}


def run(models: Sequence[str], baseline: str | None, batches: Sequence[int], threads: int, warmup: int,
        runs: int, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Measure ``models`` (and ``baseline``), all run alternately, and return a JSON-ready dict.

    ``result["models"]`` lists the models, the baseline last; each result row
    holds one latency entry per model in that order, and, with a baseline,
    ``speedup[i]`` = baseline median / model i median.
    """
    import onnxruntime as ort

    if isinstance(models, str):
        models = [models]
    loaded = [load(p) for p in models] + ([load(baseline)] if baseline else [])
    timings = measure([m.path for m in loaded], batches, threads, warmup, runs, progress)
    roles = ["model"] * len(models) + (["baseline"] if baseline else [])
    entries = []
    for role, m in zip(roles, loaded):
        entry = {"role": role, "path": m.path, "file_bytes": m.file_bytes, "flops_per_sample": m.flops}
        if baseline:
            base = loaded[-1]
            entry["size_ratio"] = base.file_bytes / m.file_bytes
            entry["flops_ratio"] = base.flops / m.flops if base.flops and m.flops else None
        entries.append(entry)
    result = {
        "onnxruntime": ort.__version__, "threads": threads, "warmup": warmup, "runs": runs,
        "machine": machine(), "models": entries, "results": [],
    }
    for t in timings:
        row = {"batch": t["batch"], "latency": t["models"]}
        if baseline:
            base = t["models"][-1]
            row["speedup"] = [base["median_ms"] / s["median_ms"] for s in t["models"]]
            row["speedup_p90"] = [base["p90_ms"] / s["p90_ms"] for s in t["models"]]
        result["results"].append(row)
    return result


def format_table(result: dict) -> str:
    """The results as text tables, with the machine and thread count in the header."""
    m = result["machine"]
    lines = [
        f"{PROG}: onnxruntime {result['onnxruntime']}, {result['threads']} thread(s); "
        f"{m['cpu']} ({m['logical_cpus']} logical CPUs), {m['platform']}",
        f"warm-up {result['warmup']}, {result['runs']} timed runs per model and batch size, models run alternately",
        "",
    ]
    has_baseline = result["models"][-1]["role"] == "baseline"
    rows = [("", "file", "size MB", "GFLOPs/sample") + (("size vs baseline", "FLOPs vs baseline")
                                                        if has_baseline else ())]
    for entry in result["models"]:
        flops = entry["flops_per_sample"]
        row = (entry["role"], os.path.basename(entry["path"]), f"{entry['file_bytes'] / 1e6:.3f}",
               "n/a" if flops is None else f"{flops / 1e9:.4f}")
        if has_baseline:
            ratio = entry["flops_ratio"]
            row += (f"{1 / entry['size_ratio']:.3f}x", "n/a" if ratio is None else f"{1 / ratio:.3f}x")
        rows.append(row)
    lines += columns(rows) + [""]
    rows = [("batch", "file", "median ms", "p90 ms", "items/s") + (("speedup", "p90 speedup") if has_baseline else ())]
    for r in result["results"]:
        for i, (entry, stats) in enumerate(zip(result["models"], r["latency"])):
            row = (str(r["batch"]), os.path.basename(entry["path"]), f"{stats['median_ms']:.3f}",
                   f"{stats['p90_ms']:.3f}", f"{stats['items_per_s']:.1f}")
            if has_baseline:
                row += (f"{r['speedup'][i]:.2f}x", f"{r['speedup_p90'][i]:.2f}x")
            rows.append(row)
    lines += columns(rows)
    if has_baseline:
        lines += ["", "speedup = baseline median latency / model median latency (p90: the same for p90); "
                  "size and FLOPs vs baseline = model / baseline"]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file; BenchError saying why when it cannot."""
    try:
        atomic_write(path, text.encode())
    except OSError as e:
        raise BenchError(f"cannot write {path}: {e.strerror or e}") from e


def write_json(result: dict, path: str) -> None:
    write_atomic(path, json.dumps(result, indent=2) + "\n")


def _progress_bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs, {what}  ",
          end=end, file=sys.stderr, flush=True)


def _positive_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="+", help="the ONNX model(s) to measure")
    parser.add_argument("--baseline", help="an ONNX model to compare with (for example the dense one)")
    parser.add_argument("--batch", type=_positive_list, default=[1], help="batch sizes, for example 1,8,32 (default 1)")
    parser.add_argument("--threads", type=_at_least(1), default=os.cpu_count() or 1,
                        help="onnxruntime intra-op threads (default: all logical CPUs)")
    parser.add_argument("--warmup", type=_at_least(0), default=5, help="untimed runs per model and batch (default 5)")
    parser.add_argument("--runs", type=_at_least(1), default=30, help="timed runs per model and batch (default 30)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    try:
        args = parser.parse_args(argv)
        problem = check_writable(args.json) if args.json else None
        if problem:
            raise UsageError(f"--json: cannot write {args.json}: {problem}")
        result = run(args.model, args.baseline, args.batch, args.threads, args.warmup, args.runs, _progress_bar)
        if args.json:
            write_json(result, args.json)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
