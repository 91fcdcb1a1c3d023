"""granet-bench: onnxruntime latency of an ONNX model, side by side with a baseline.

    granet-bench model.onnx --baseline dense.onnx --batch 1,32 --threads 2
    granet-bench sparse.onnx compact.onnx --baseline dense.onnx

For each batch size the models run alternately (ABC..., then ...CBA), so that
drift of the machine hits all of them; medians and 90th percentiles come from
the same rounds. Reported per model: file size, FLOPs per sample (2 x the
multiply-accumulates of Conv, MatMul and Gemm, with shapes from ONNX shape
inference), latency and throughput, and the speedup over the baseline. Inputs
are random, with the first dimension of every input as the batch. The
sessions use all graph optimizations and no intra-op spinning (see
granet_fx.export.roofline.session_options for why); the header says so.

With a baseline, each model also gets its roofline limit (granet_fx.export.roofline):
the sum over its nodes of max(FLOPs / compute rate, bytes moved / bandwidth),
with the rates measured here, at the same thread count, by probes that run
once in every round of the models' runs (their fastest run counts):
the compute rate is the best of a 1024 MatMul and copies of the layers that
hold the most FLOPs, the bandwidth that of a copy the size of each model's
working set. The roofline limit (baseline limit / model limit) is the speedup
the model could give if both ran at those rates; it is lower than the FLOPs
ratio where layers are memory-bound. Printed beside the speedup: the FLOPs
ratio, the limit and the speedup as a fraction of the limit, and a NOTE
wherever a speedup exceeds its limit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import stat
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ..report import columns
from . import roofline
from .console import ArgumentParser, UsageError, first_line
from .files import FileReadError, atomic_write, check_writable, read_bounded, same_file

PROG = "granet-bench"


class BenchError(UsageError):
    """A problem with the user's input: reported in one line, exit code 2."""


@dataclass
class OnnxModel:
    path: str
    file_bytes: int
    flops: int | None          # per sample; None when some shapes are unknown
    external: tuple[str, ...] = ()  # the files holding its external data
    proto: object = field(default=None, repr=False)  # the onnx.ModelProto, for the roofline


def load(path: str) -> OnnxModel:
    """Read an ONNX file's size and FLOPs, or raise BenchError saying what is wrong with it.

    The file is checked (``validate``) before anything else reads it.
    """
    import onnx

    model = validate(path)
    folder = os.path.dirname(os.path.abspath(path))
    external = external_files(model, folder)
    size = os.path.getsize(path) + sum(os.path.getsize(f) for f in external)
    macs = count_macs(model)
    if macs is None and external:  # shape inference may need small constants stored outside the file
        try:
            model = onnx.load(path)
            macs = count_macs(model)
        except Exception as e:
            raise BenchError(f"{path}: cannot read its external data ({first_line(e)})") from e
    return OnnxModel(path, size, None if macs is None else 2 * macs, tuple(external), model)


# Checking a file before onnxruntime sees it -------------------------------------

MAX_ELEMENTS = 1 << 31       # elements of one tensor (dense size of a sparse one): 8 GB of floats
MAX_FEED_BYTES = 1 << 30     # bytes of one random input that granet-bench makes

# bytes per element, and the typed field (with values per element) that holds inline data
_ELEMENT = {
    "FLOAT": (4, "float_data", 1), "DOUBLE": (8, "double_data", 1), "FLOAT16": (2, "int32_data", 1),
    "BFLOAT16": (2, "int32_data", 1), "INT8": (1, "int32_data", 1), "UINT8": (1, "int32_data", 1),
    "INT16": (2, "int32_data", 1), "UINT16": (2, "int32_data", 1), "INT32": (4, "int32_data", 1),
    "UINT32": (4, "uint64_data", 1), "INT64": (8, "int64_data", 1), "UINT64": (8, "uint64_data", 1),
    "BOOL": (1, "int32_data", 1), "COMPLEX64": (8, "float_data", 2), "COMPLEX128": (16, "double_data", 2),
}


def validate(path: str):
    """The ONNX model in ``path``, parsed from at most ``MAX_FILE_BYTES`` bytes and checked; else BenchError.

    Checked before onnxruntime reads the file: the protobuf parses; every
    tensor's dimensions are non-negative and bounded, and its data has the
    size they imply; external data is a relative path inside the model's
    folder (no absolute path, no ``..``, no link that leads out), to a regular
    file holding the bytes it names; every sparse tensor has int64 indices in
    range and in increasing order and one value per index; ``onnx.checker``
    accepts the model.
    """
    import onnx

    try:
        data = read_bounded(path, what="model file")
    except FileReadError as e:
        raise BenchError(str(e)) from None
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:
        raise BenchError(f"{path}: not an ONNX model ({first_line(e)})") from None
    del data
    if not model.HasField("graph") or not model.graph.node:
        raise BenchError(f"{path}: not an ONNX model (no graph nodes)")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        for where, tensor, sparse in _tensors(model):
            if sparse:
                _check_sparse(tensor, where, folder)
            else:
                _check_tensor(tensor, where, folder)
    except ValueError as e:
        raise BenchError(f"{path}: {e}") from None
    try:
        onnx.checker.check_model(path)
    except Exception as e:
        raise BenchError(f"{path}: onnx.checker rejects it ({first_line(e)})") from None
    return model


def external_files(model, folder: str) -> list[str]:
    """The distinct files that the (validated) model's external data lives in."""
    found = []
    for _, tensor, sparse in _tensors(model):
        for t in (tensor.values, tensor.indices) if sparse else (tensor,):
            location = _external(t).get("location")
            if location is not None:
                full = os.path.realpath(os.path.join(folder, location))
                if full not in found:
                    found.append(full)
    return found


def _tensors(model):
    """Every (where, tensor, is_sparse) in the model: initializers, and tensors in attributes, in all graphs."""
    graphs = [("graph", model.graph)] + [(f"function {f.name!r}", f) for f in model.functions]
    while graphs:
        name, graph = graphs.pop()
        for t in getattr(graph, "initializer", ()):
            yield f"{name}: initializer {t.name!r}", t, False
        for t in getattr(graph, "sparse_initializer", ()):
            yield f"{name}: sparse initializer {t.values.name!r}", t, True
        for node in graph.node:
            for a in node.attribute:
                where = f"{name}: node {node.name or node.op_type!r} attribute {a.name!r}"
                if a.HasField("t"):
                    yield where, a.t, False
                for t in a.tensors:
                    yield where, t, False
                if a.HasField("sparse_tensor"):
                    yield where, a.sparse_tensor, True
                for t in a.sparse_tensors:
                    yield where, t, True
                if a.HasField("g"):
                    graphs.append((f"{where} subgraph", a.g))
                graphs.extend((f"{where} subgraph", g) for g in a.graphs)


def _external(t) -> dict[str, str]:
    import onnx

    if t.data_location != onnx.TensorProto.EXTERNAL:
        return {}
    entries = {}
    for e in t.external_data:
        if e.key in entries:
            raise ValueError(f"tensor {t.name!r} names its external {e.key} twice")
        entries[e.key] = e.value
    if "location" not in entries:
        raise ValueError(f"tensor {t.name!r} is stored outside the file but names no location")
    return entries


def _numel(dims, what: str) -> int:
    if any(d < 0 for d in dims):
        raise ValueError(f"{what} has a negative dimension {list(dims)}")
    n = math.prod(dims)
    if n > MAX_ELEMENTS:
        raise ValueError(f"{what} has {n:,} elements (dimensions {list(dims)}); at most {MAX_ELEMENTS:,} are allowed")
    return n


def _check_tensor(t, where: str, folder: str) -> None:
    import onnx

    what = where if repr(t.name) in where else f"{where} (tensor {t.name!r})"
    n = _numel(t.dims, what)
    type_name = onnx.TensorProto.DataType.Name(t.data_type) if t.data_type in onnx.TensorProto.DataType.values() else None
    if type_name is None or type_name == "UNDEFINED":
        raise ValueError(f"{what} has an unknown data type {t.data_type}")
    element = _ELEMENT.get(type_name)
    external = _external(t)
    if external:
        location = external["location"]
        file = _inside(folder, location, what)
        try:
            offset, length = int(external.get("offset", 0)), external.get("length")
            length = None if length is None else int(length)
        except ValueError:
            raise ValueError(f"{what}: its external offset or length is not an integer") from None
        size = os.path.getsize(file)
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"{what}: its external offset or length is negative")
        stored = size - offset if length is None else length
        if offset + stored > size or stored < 0:
            raise ValueError(f"{what}: its external data reaches past the end of {location} ({size:,} bytes)")
        if element and stored != n * element[0]:
            raise ValueError(f"{what} has {stored:,} bytes of external data; its dimensions {list(t.dims)} "
                             f"need {n * element[0]:,}")
        return
    if element is None:
        return                      # packed and string types: left to onnx.checker
    itemsize, field, per = element
    if t.HasField("raw_data"):
        if len(t.raw_data) != n * itemsize:
            raise ValueError(f"{what} has {len(t.raw_data):,} bytes of data; its dimensions {list(t.dims)} "
                             f"need {n * itemsize:,}")
        return
    count = len(getattr(t, field))
    if count != n * per:
        raise ValueError(f"{what} holds {count:,} values; its dimensions {list(t.dims)} need {n * per:,}")


def _inside(folder: str, location: str, what: str) -> str:
    """The file that ``location`` names, refused unless it is a regular file inside ``folder``."""
    parts = location.replace("\\", "/").split("/")
    if (not location or "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\"))
            or ":" in parts[0] or ".." in parts):
        raise ValueError(f"{what}: its external data location {location[:100]!r} is not a plain relative path "
                         "inside the model's folder")
    real_folder = os.path.realpath(folder)
    file = os.path.realpath(os.path.join(folder, location))
    if os.path.commonpath([real_folder, file]) != real_folder:
        raise ValueError(f"{what}: its external data {location[:100]!r} leads outside the model's folder (a link)")
    try:
        info = os.stat(file)
    except OSError:
        raise ValueError(f"{what}: its external data file {location[:100]!r} does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what}: its external data {location[:100]!r} is not a regular file")
    return file


def _check_sparse(st, where: str, folder: str) -> None:
    import onnx
    from onnx import numpy_helper

    what = f"{where} (sparse tensor {st.values.name!r})"
    if not st.dims:
        raise ValueError(f"{what} has no dimensions")
    n = _numel(st.dims, what)
    values, indices = st.values, st.indices
    for part, t in (("values", values), ("indices", indices)):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            raise ValueError(f"{what}: its {part} are stored outside the file, which {PROG} does not read")
        _check_tensor(t, f"{what} {part}", folder)
    if len(values.dims) != 1:
        raise ValueError(f"{what}: its values have dimensions {list(values.dims)}, not one dimension")
    nnz = values.dims[0]
    if nnz > n:
        raise ValueError(f"{what} has {nnz:,} values for {n:,} positions")
    if indices.data_type != onnx.TensorProto.INT64:
        raise ValueError(f"{what}: its indices are not int64")
    rank = len(st.dims)
    if list(indices.dims) not in ([nnz], [nnz, rank]) and not (nnz == 0 and not indices.dims):
        raise ValueError(f"{what}: its indices have dimensions {list(indices.dims)}; expected [{nnz}] or "
                         f"[{nnz}, {rank}]")
    if nnz == 0:
        return
    index = numpy_helper.to_array(indices).astype(np.int64, copy=False)
    if index.ndim == 2:
        if (index < 0).any() or (index >= np.asarray(st.dims, dtype=np.int64)).any():
            raise ValueError(f"{what} has an index outside its dimensions {list(st.dims)}")
        strides = np.cumprod([1] + list(st.dims[:0:-1]))[::-1].astype(np.int64)
        index = index @ strides
    elif (index < 0).any() or (index >= n).any():
        raise ValueError(f"{what} has an index outside its {n:,} positions")
    if (np.diff(index) <= 0).any():
        raise ValueError(f"{what}: its indices are not in increasing order without repeats")


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
    unknown = [v for v in [*model.graph.value_info, *model.graph.output]
               if shapes.get(v.name) is None or None in shapes[v.name]]
    shapes.update({name: dims for name, (dims, _) in roofline.run_shapes(model, unknown, 1).items()})
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

    try:
        return ort.InferenceSession(path, roofline.session_options(threads), providers=["CPUExecutionProvider"])
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
        if math.prod(size) * np.dtype(dtype).itemsize > MAX_FEED_BYTES or min(size) < 0:
            raise BenchError(f"{path}: input {value.name!r} of shape {size} would take more than "
                             f"{MAX_FEED_BYTES:,} bytes")
        feeds[value.name] = rng.standard_normal(size).astype(dtype) if np.issubdtype(dtype, np.floating) \
            else np.zeros(size, dtype=dtype)
    return feeds


def _stats(seconds: list[float], batch: int) -> dict[str, float]:
    median = float(np.median(seconds))
    return {"median_ms": 1e3 * median, "p90_ms": 1e3 * float(np.percentile(seconds, 90)),
            "items_per_s": batch / median}


def measure(paths: Sequence[str], batches: Sequence[int], threads: int, warmup: int, runs: int,
            progress: Callable[[int, int, str], None] | None = None,
            probes: dict[int, list[roofline.Probe]] | None = None) -> list[dict]:
    """Latency of each model at each batch size, the models run alternately; one dict per batch size.

    ``probes[batch]``, if given, run once in every round after the models (their best runs give the
    machine's rates over the same time as the models' runs).
    """
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
            for probe in (probes or {}).get(batch, ()):
                probe.run()
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
        runs: int, progress: Callable[[int, int, str], None] | None = None, output: str | None = None) -> dict:
    """Measure ``models`` (and ``baseline``), all run alternately, and return a JSON-ready dict.

    ``result["models"]`` lists the models, the baseline last; each result row
    holds one latency entry per model in that order, and, with a baseline,
    ``speedup[i]`` = baseline median / model i median. ``output``: the file
    the result will be written to, refused (before measuring) when it is one
    of the models or their external data.
    """
    import onnxruntime as ort

    if isinstance(models, str):
        models = [models]
    loaded = [load(p) for p in models] + ([load(baseline)] if baseline else [])
    if output:
        _refuse_overwriting_inputs(output, loaded)
    probes = _probes(loaded, batches, threads) if baseline else None
    timings = measure([m.path for m in loaded], batches, threads, warmup, runs, progress,
                      None if probes is None else {b: compute + copies for b, (compute, copies) in probes.items()})
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
        "onnxruntime": ort.__version__, "session": roofline.SESSION_SETTINGS, "threads": threads, "warmup": warmup,
        "runs": runs,
        "machine": machine(), "models": entries, "results": [],
    }
    limits = None if probes is None else rooflines(loaded, probes, threads)
    for t in timings:
        row = {"batch": t["batch"], "latency": t["models"]}
        if baseline:
            base = t["models"][-1]
            row["speedup"] = [base["median_ms"] / s["median_ms"] for s in t["models"]]
            row["speedup_p90"] = [base["p90_ms"] / s["p90_ms"] for s in t["models"]]
            row["flops_ratio"] = [e["flops_ratio"] for e in entries]
            if limits is not None:
                roof = limits[t["batch"]]
                ms = roof["limit_ms"]
                row["roofline"] = roof
                row["limit"] = [ms[-1] / m for m in ms]
                row["speedup_of_limit"] = [s / l for s, l in zip(row["speedup"], row["limit"])]
                row["roofline_efficiency"] = [m / s["median_ms"] for m, s in zip(ms, t["models"])]
        result["results"].append(row)
    return result


def _probes(models: Sequence[OnnxModel], batches: Sequence[int], threads: int) -> dict | None:
    """Per batch size: the compute probes (a 1024 MatMul and the models' dominant layers) and one copy
    the size of each model's working set; None when shape inference leaves some FLOPs unknown."""
    if any(m.flops is None for m in models):
        return None
    protos = [m.proto for m in models]
    return {batch: (roofline.compute_probes(threads, protos, batch),
                    [roofline.copy_probe(threads, roofline.working_set_bytes(p, batch)) for p in protos])
            for batch in batches}


def rooflines(models: Sequence[OnnxModel], probes: dict, threads: int) -> dict[int, dict]:
    """Per batch size: the rates the probes reached (their best runs) and each model's roofline time."""
    protos = [m.proto for m in models]
    found = {}
    for batch, (compute, copies) in probes.items():
        fastest = roofline.best(compute)
        machines = [roofline.Machine(fastest.rate, c.rate, threads, fastest.name) for c in copies]
        found[batch] = {
            "flops_per_s": fastest.rate, "probe": fastest.name, "working_set_bytes": [c.amount for c in copies],
            "bytes_per_s": [m.bytes_per_s for m in machines],
            "limit_ms": [1e3 * roofline.limit_seconds(p, batch, m) for p, m in zip(protos, machines)],
            "memory_bound_share": [roofline.memory_bound_share(p, batch, m) for p, m in zip(protos, machines)],
        }
    return found


def format_table(result: dict) -> str:
    """The results as text tables, with the machine and thread count in the header."""
    m = result["machine"]
    lines = [
        f"{PROG}: onnxruntime {result['onnxruntime']}, {result['threads']} thread(s), "
        f"{result.get('session', 'session settings not recorded')}; "
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
    roof = has_baseline and all("limit" in r for r in result["results"])
    rows = [("batch", "file", "median ms", "p90 ms", "items/s") + (("speedup", "p90 speedup") if has_baseline else ())
            + (("roofline ms", "memory-bound", "FLOPs ratio", "roofline limit", "speedup / limit") if roof else ())]
    above = []
    for r in result["results"]:
        for i, (entry, stats) in enumerate(zip(result["models"], r["latency"])):
            row = (str(r["batch"]), os.path.basename(entry["path"]), f"{stats['median_ms']:.3f}",
                   f"{stats['p90_ms']:.3f}", f"{stats['items_per_s']:.1f}")
            if has_baseline:
                row += (f"{r['speedup'][i]:.2f}x", f"{r['speedup_p90'][i]:.2f}x")
            if roof:
                ratio = r["flops_ratio"][i]
                row += (f"{r['roofline']['limit_ms'][i]:.3f}", f"{100 * r['roofline']['memory_bound_share'][i]:.0f} %",
                        "n/a" if ratio is None else f"{ratio:.2f}x", f"{r['limit'][i]:.2f}x",
                        f"{r['speedup_of_limit'][i]:.2f}")
                if r["speedup_of_limit"][i] > 1 and entry["role"] != "baseline":
                    above.append((r, i, entry))
            rows.append(row)
    lines += columns(rows)
    if has_baseline:
        lines += ["", "speedup = baseline median latency / model median latency (p90: the same for p90); "
                  "size and FLOPs vs baseline = model / baseline"]
    if roof:
        lines += ["roofline ms = sum over nodes of max(FLOPs / compute rate, bytes moved / bandwidth); "
                  "memory-bound = its share in nodes where the bytes decide; roofline limit = baseline roofline ms / "
                  "model roofline ms; FLOPs ratio = baseline FLOPs / model FLOPs"]
        for r in result["results"]:
            m = r["roofline"]
            copies = ", ".join(f"{os.path.basename(e['path'])} {b / 1e9:.1f} GB/s ({n / 1e6:.1f} MB)" for e, b, n in
                               zip(result["models"], m["bytes_per_s"], m["working_set_bytes"]))
            lines.append(f"machine at batch {r['batch']}: compute {m['flops_per_s'] / 1e9:.1f} GFLOP/s (the best of a "
                         f"1024 MatMul and the dominant layers: {m['probe']}); bandwidth of a copy the size of each "
                         f"model's working set: {copies}")
    for r, i, entry in above:
        eff = r["roofline_efficiency"]
        lines.append(f"NOTE: {os.path.basename(entry['path'])} at batch {r['batch']} is {r['speedup'][i]:.2f}x faster "
                     f"than the baseline, ABOVE its roofline limit of {r['limit'][i]:.2f}x: it ran at "
                     f"{100 * eff[i]:.0f} % of its roofline and the baseline at {100 * eff[-1]:.0f} % of its own "
                     "(the limit assumes both reach the measured rates)")
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file; BenchError saying why when it cannot."""
    try:
        atomic_write(path, text.encode())
    except OSError as e:
        raise BenchError(f"cannot write {path}: {e.strerror or e}") from e


def write_json(result: dict, path: str) -> None:
    write_atomic(path, json.dumps(result, indent=2) + "\n")


def _refuse_overwriting_inputs(out: str, models: Sequence[OnnxModel]) -> None:
    """UsageError when ``out`` is one of the input models or a file holding their external data."""
    for m in models:
        for f in [m.path, *m.external]:
            if same_file(out, f):
                what = "is the input model" if f == m.path else "holds external data of"
                raise UsageError(f"--json {out} {what} {m.path}; refusing to overwrite it")


def _progress_bar(done: int, total: int, what: str) -> None:
    width = 30
    filled = width * done // total
    end = "\n" if done == total else ""
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} runs, {what}  ",
          end=end, file=sys.stderr, flush=True)


def positive_list(text: str) -> list[int]:
    """An argparse type: comma-separated positive integers."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
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
    parser.add_argument("--batch", type=positive_list, default=[1], help="batch sizes, for example 1,8,32 (default 1)")
    parser.add_argument("--threads", type=at_least(1), default=os.cpu_count() or 1,
                        help="onnxruntime intra-op threads (default: all logical CPUs)")
    parser.add_argument("--warmup", type=at_least(0), default=5, help="untimed runs per model and batch (default 5)")
    parser.add_argument("--runs", type=at_least(1), default=30, help="timed runs per model and batch (default 30)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    try:
        args = parser.parse_args(argv)
        problem = check_writable(args.json) if args.json else None
        if problem:
            raise UsageError(f"--json: cannot write {args.json}: {problem}")
        result = run(args.model, args.baseline, args.batch, args.threads, args.warmup, args.runs, _progress_bar,
                     output=args.json)
        if args.json:
            write_json(result, args.json)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
