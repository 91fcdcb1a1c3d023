"""A roofline limit for ONNX models: the fastest a model can run on this machine, layer by layer.

Each node takes at least ``max(FLOPs / compute rate, bytes moved / memory
bandwidth)``: its multiply-accumulates (Conv, MatMul, Gemm) at the machine's
measured compute rate, or the bytes it reads and writes (weights and
activations) at the machine's measured bandwidth, whichever is slower. A
model's limit is the sum over its nodes. The ratio of two models' limits is
the speedup that removing channels can give at best, which is lower than the
FLOPs ratio wherever layers are memory-bound (depthwise convolutions, few
channels, batch 1).

What onnxruntime does to the graph is counted the way it does it: an
activation or residual ``Add`` that follows a Conv, MatMul or Gemm (as the only
reader of its output) is fused into it, so it moves only the other tensors it
reads; shape-only nodes (Reshape, Flatten, ...) reuse their input's buffer and
move nothing.

The machine's rates are measured by ``measure_machine``: the compute rate is
the best of a square MatMul and single-node copies of the Conv/MatMul/Gemm
nodes that hold the most FLOPs in the models measured (the same op and
shapes, at the same batch), each the best of several runs, so that the rate
is not below what onnxruntime reaches on these layers; the bandwidth is that
of a copy (an Add) of as many bytes as the model's working set (its weights
and largest layer): a model whose weights fit in the caches reads them from
there on every run after the first, one that does not reads them from memory.
The limit is a model, not a proof; the benchmark says so when a speedup
exceeds it.
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.INT64: 8,
          TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1,
          TensorProto.BFLOAT16: 2}

COMPUTE = ("Conv", "MatMul", "Gemm")
# element-wise nodes that onnxruntime fuses into the Conv/MatMul/Gemm whose output they read
FUSABLE = ("Relu", "Add", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh")
# nodes that only change a shape: onnxruntime reuses the input buffer
VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


@dataclass(frozen=True)
class Machine:
    """What one onnxruntime session reaches here: FLOP/s and memory bytes/s, at a thread count.

    ``probe`` names the measurement that gave the compute rate.
    """

    flops_per_s: float
    bytes_per_s: float
    threads: int
    probe: str = ""


SESSION_SETTINGS = "ORT_ENABLE_ALL (NCHWc layout), sequential, intra-op spinning off"


def session_options(threads: int):
    """The onnxruntime session options of the benchmark and of the rate measurement (``SESSION_SETTINGS``).

    All graph optimizations: the NCHWc layout makes the convolutions faster than
    ORT_ENABLE_EXTENDED or ORT_ENABLE_BASIC. Spinning off: with several sessions
    in one process (the models run alternately) the spinning workers of one
    session take the cores the next one needs. ``benchmarks/speedup.py --options``
    measures these choices.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


class Probe:
    """One measurement of the machine: a session run on fixed inputs, doing ``amount`` FLOPs (a compute
    probe) or moving ``amount`` bytes (a copy) per run; ``rate`` = amount / the fastest run so far.

    The fastest run is the one least disturbed by other load; the benchmark runs its probes between the
    models' runs, so that they see the same machine over the same time.
    """

    def __init__(self, name: str, model: onnx.ModelProto, amount: float, threads: int):
        self.name, self.amount = name, amount
        self.session = _session(model, threads)
        self.feeds = _random_feeds(self.session)
        self.best = math.inf

    def run(self) -> None:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        self.best = min(self.best, time.perf_counter() - start)

    @property
    def rate(self) -> float:
        return self.amount / self.best


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "probe", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _float(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _random_feeds(session) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in session.get_inputs()}


def probes(models: Sequence[onnx.ModelProto], batch: int, count: int = 3) -> list[tuple[str, onnx.ModelProto, float]]:
    """(description, single-node model, FLOPs) for the ``count`` float Conv/MatMul/Gemm shapes that hold
    the most FLOPs over ``models`` at ``batch`` (nodes of the same op, shapes and attributes summed).

    Inputs that are initializers in the model stay initializers (random values), so that onnxruntime
    prepacks the weights as it does for the real layer.
    """
    totals: dict[tuple, float] = defaultdict(float)
    found: dict[tuple, tuple[onnx.ModelProto, float]] = {}
    for model in models:
        graph, shapes, constants = _inferred(model, batch)
        for node in graph.node:
            flops = _flops(node, shapes)
            names = [n for n in node.input if n]
            if node.op_type not in COMPUTE or flops == 0 or any(n not in shapes for n in names) \
                    or any(shapes[n][1] != 4 for n in names):
                continue
            key = (node.op_type, tuple(tuple(shapes[n][0]) for n in names),
                   tuple(a.SerializeToString() for a in node.attribute))
            totals[key] += flops
            if key not in found:
                rng = np.random.default_rng(0)
                inputs = [f"i{j}" for j in range(len(names))]
                probe = helper.make_node(node.op_type, inputs, ["y"])
                probe.attribute.extend(node.attribute)
                inits = [numpy_helper.from_array(rng.standard_normal(shapes[n][0]).astype(np.float32), i)
                         for n, i in zip(names, inputs) if n in constants]
                values = [_float(i, shapes[n][0]) for n, i in zip(names, inputs) if n not in constants]
                found[key] = _model([probe], values, [_float("y", shapes[node.output[0]][0])], inits), flops
    top = sorted(totals, key=totals.get, reverse=True)[:count]
    return [(f"{k[0]} {' x '.join(str(list(s)) for s in k[1])}", *found[k]) for k in top]


def compute_probes(threads: int, models: Sequence[onnx.ModelProto], batch: int) -> list[Probe]:
    """A 1024 MatMul and the dominant layers of ``models`` at ``batch`` (``probes``), ready to run."""
    return [Probe(name, model, flops, threads) for name, model, flops in [matmul_probe()] + probes(models, batch)]


def best(found: Sequence[Probe]) -> Probe:
    """The probe with the highest rate."""
    return max(found, key=lambda p: p.rate)


def matmul_probe(size: int = 1024) -> tuple[str, onnx.ModelProto, float]:
    """A square float32 MatMul, the weight an initializer."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((size, size), dtype=np.float32), "w")
    model = _model([helper.make_node("MatMul", ["a", "w"], ["y"])], [_float("a", [size, size])],
                   [_float("y", [size, size])], [weight])
    return f"MatMul [{size}, {size}] x [{size}, {size}]", model, 2.0 * size ** 3


def copy_probe(threads: int, nbytes: int = 1 << 29) -> Probe:
    """An Add of a scalar whose float32 input and output together take ``nbytes``: it moves ``nbytes``."""
    n = max(1024, nbytes // 8)
    model = _model([helper.make_node("Add", ["x", "one"], ["y"])], [_float("x", [n])], [_float("y", [n])],
                   [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    return Probe(f"copy of {8 * n / 1e6:.1f} MB", model, 8.0 * n, threads)


def _run(probe: Probe, repeats: int) -> Probe:
    for _ in range(repeats + 1):
        probe.run()
    return probe


def working_set_bytes(model: onnx.ModelProto, batch: int) -> int:
    """Bytes one run keeps touching: the weights, plus the largest bytes moved by one node at ``batch``."""
    weights = sum(math.prod(t.dims) * _BYTES.get(t.data_type, 4) for t in model.graph.initializer)
    return int(weights + max((c.bytes for c in node_costs(model, batch)), default=0))


def measure_machine(threads: int = 1, models: Sequence[onnx.ModelProto] = (), batch: int = 1,
                    working_set: int = 1 << 29, repeats: int = 5) -> Machine:
    """The compute rate (best of a 1024 MatMul and the dominant layers of ``models`` at ``batch``) and the
    bandwidth of a copy of ``working_set`` bytes (default 512 MB: memory, not cache), each probe the best
    of ``repeats`` runs after one untimed one."""
    fastest = best([_run(p, repeats) for p in compute_probes(threads, models, batch)])
    copy = _run(copy_probe(threads, working_set), max(repeats, min(200, (1 << 30) // max(working_set, 1))))
    return Machine(fastest.rate, copy.rate, threads, fastest.name)


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    flops: float
    bytes: float


def _inferred(model: onnx.ModelProto, batch: int):
    """The graph at ``batch`` after shape inference, its known (shape, bytes per element) and its constants."""
    inferred = onnx.shape_inference.infer_shapes(_with_batch(model, batch), data_prop=True)
    graph = inferred.graph
    shapes: dict[str, tuple[list[int], int]] = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.HasField("shape") and all(d is not None for d in dims):
            shapes[v.name] = (dims, _BYTES.get(t.elem_type, 4))
    unknown = [v for v in list(graph.value_info) + list(graph.output) if v.name not in shapes]
    shapes.update(run_shapes(inferred, unknown, batch))
    constants = set()
    for init in graph.initializer:
        shapes[init.name] = (list(init.dims), _BYTES.get(init.data_type, 4))
        constants.add(init.name)
    for node in graph.node:
        if node.op_type == "Constant":
            constants.add(node.output[0])
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = (list(a.t.dims), _BYTES.get(a.t.data_type, 4))
                elif a.name == "sparse_value":
                    shapes[node.output[0]] = (list(a.sparse_tensor.dims), 4)
    return graph, shapes, constants


def run_shapes(model: onnx.ModelProto, values: Sequence[onnx.ValueInfoProto], batch: int) -> dict:
    """{name: (shape, bytes per element)} of ``values`` of ``model``, found by running it in onnxruntime on
    random inputs of ``batch`` samples: for the shapes that ONNX shape inference leaves unknown (it loses the
    batch in HF GPT-2's attention mask, say). Empty if there are none or the model cannot run so."""
    if not values:
        return {}
    import onnxruntime as ort

    from .bench import _feeds

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    for v in values:
        out = probe.graph.output.add()
        out.CopyFrom(v)
        out.type.tensor_type.ClearField("shape")
    try:
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        results = session.run([v.name for v in values], _feeds(session, "model", batch))
    except Exception:
        return {}
    return {v.name: (list(r.shape), r.dtype.itemsize) for v, r in zip(values, results)}


def _fused_inputs(graph) -> dict[int, str]:
    """Node index -> the input it reads from the Conv/MatMul/Gemm (or fused chain) it is fused into."""
    readers = Counter(n for node in graph.node for n in node.input)
    outputs = {v.name for v in graph.output}
    producer = {o: i for i, node in enumerate(graph.node) for o in node.output}
    fused: dict[int, str] = {}
    for i, node in enumerate(graph.node):
        if node.op_type not in FUSABLE:
            continue
        for name in node.input:
            p = producer.get(name)
            if p is not None and (graph.node[p].op_type in COMPUTE or p in fused) and readers[name] == 1 \
                    and name not in outputs:
                fused[i] = name
                break
    return fused


def node_costs(model: onnx.ModelProto, batch: int) -> list[NodeCost]:
    """FLOPs and bytes moved by every node at ``batch`` (first input dimension), from ONNX shape inference.

    A fused node (see the module docstring) moves only its other inputs; a shape-only node moves nothing.
    """
    graph, shapes, _ = _inferred(model, batch)
    fused = _fused_inputs(graph)
    costs = []
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant":
            continue
        if node.op_type in VIEWS:
            names: list[str] = []
        elif i in fused:
            names = [n for n in node.input if n and n != fused[i]]
        else:
            names = [n for n in list(node.input) + list(node.output) if n]
        moved = sum(math.prod(shapes[n][0]) * shapes[n][1] for n in names if n in shapes)
        costs.append(NodeCost(node.name, node.op_type, _flops(node, shapes), float(moved)))
    return costs


def node_seconds(cost: NodeCost, machine: Machine) -> float:
    return max(cost.flops / machine.flops_per_s, cost.bytes / machine.bytes_per_s)


def limit_seconds(model: onnx.ModelProto, batch: int, machine: Machine) -> float:
    """The roofline lower bound of one run of ``model`` at ``batch`` on ``machine``."""
    return sum(node_seconds(c, machine) for c in node_costs(model, batch))


def memory_bound_share(model: onnx.ModelProto, batch: int, machine: Machine) -> float:
    """The share of the limit spent in nodes that are memory-bound (bytes, not FLOPs, decide their time)."""
    costs = node_costs(model, batch)
    total = sum(node_seconds(c, machine) for c in costs)
    memory = sum(node_seconds(c, machine) for c in costs if c.bytes / machine.bytes_per_s > c.flops / machine.flops_per_s)
    return memory / total if total else 0.0


def _flops(node, shapes) -> float:
    out = shapes.get(node.output[0]) if node.output else None
    if out is None:
        return 0.0
    out_numel = math.prod(out[0])
    if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in shapes:
        w = shapes[node.input[1]][0]
        return 2.0 * out_numel * math.prod(w[1:])      # (C_in / groups) x kernel per output element
    if node.op_type in ("MatMul", "Gemm") and node.input[0] in shapes:
        a = shapes[node.input[0]][0]
        transposed = node.op_type == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)
        k = a[0] if transposed else a[-1]
        return 2.0 * out_numel * k
    return 0.0


def _with_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs have ``batch`` as their first dimension (it must be dynamic or equal)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.value_info[:]
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and value.name not in initializers:
            if dims[0].HasField("dim_value") and dims[0].dim_value != batch:
                raise ValueError(f"input {value.name} has a fixed batch of {dims[0].dim_value}, not {batch}")
            dims[0].dim_value = batch
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")   # unknown: inferred again
    return model
