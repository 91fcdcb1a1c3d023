"""A roofline limit for ONNX models: the fastest a model can run on this machine, layer by layer.

Each node takes at least ``max(FLOPs / compute rate, bytes moved / memory
bandwidth)``: its multiply-accumulates (Conv, MatMul, Gemm) at the machine's
measured matmul rate, or the bytes it reads and writes (weights and
activations) at the machine's measured bandwidth, whichever is slower. A
model's limit is the sum over its nodes. The ratio of two models' limits is
the speedup that removing channels can give at most, which is lower than the
FLOPs ratio wherever layers are memory-bound (depthwise convolutions, few
channels, batch 1).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_BYTES = {TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.DOUBLE: 8, TensorProto.INT64: 8,
          TensorProto.INT32: 4, TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1,
          TensorProto.BFLOAT16: 2}


@dataclass(frozen=True)
class Machine:
    """What one onnxruntime session reaches here: matmul FLOP/s and memory bytes/s, at a thread count."""

    flops_per_s: float
    bytes_per_s: float
    threads: int


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _median_seconds(run, repeats: int = 7) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_machine(threads: int = 1, size: int = 768, megabytes: int = 128) -> Machine:
    """Measure onnxruntime's float32 MatMul rate and its streaming bandwidth (an Add over a large tensor)."""
    def graph(node, inputs, output, shapes):
        values = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip(inputs, shapes)]
        out = helper.make_tensor_value_info(output, TensorProto.FLOAT, None)
        model = helper.make_model(helper.make_graph([node], "probe", values, [out]),
                                  opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    mm = _session(graph(helper.make_node("MatMul", ["a", "b"], ["c"]), ["a", "b"], "c",
                        [[size, size], [size, size]]), threads)
    seconds = _median_seconds(lambda: mm.run(None, {"a": a, "b": a}))
    flops = 2 * size ** 3 / seconds
    n = megabytes * (1 << 20) // 4
    x = np.ones(n, dtype=np.float32)
    one = np.ones(1, dtype=np.float32)
    add = _session(graph(helper.make_node("Add", ["x", "y"], ["z"]), ["x", "y"], "z", [[n], [1]]), threads)
    seconds = _median_seconds(lambda: add.run(None, {"x": x, "y": one}), repeats=5)
    return Machine(flops, 2 * x.nbytes / seconds, threads)


@dataclass(frozen=True)
class NodeCost:
    name: str
    op: str
    flops: float
    bytes: float


def node_costs(model: onnx.ModelProto, batch: int) -> list[NodeCost]:
    """FLOPs and bytes moved by every node at ``batch`` (first input dimension), from ONNX shape inference."""
    model = _with_batch(model, batch)
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = inferred.graph
    shapes: dict[str, tuple[list[int], int]] = {}
    for v in list(graph.input) + list(graph.value_info) + list(graph.output):
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if all(d is not None for d in dims):
            shapes[v.name] = (dims, _BYTES.get(t.elem_type, 4))
    for init in graph.initializer:
        shapes[init.name] = (list(init.dims), _BYTES.get(init.data_type, 4))
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = (list(a.t.dims), _BYTES.get(a.t.data_type, 4))
                elif a.name == "sparse_value":
                    shapes[node.output[0]] = (list(a.sparse_tensor.dims), 4)
    costs = []
    for node in graph.node:
        if node.op_type == "Constant":
            continue
        known = [shapes.get(n) for n in list(node.input) + list(node.output) if n]
        moved = sum(math.prod(s) * b for s, b in (k for k in known if k is not None))
        costs.append(NodeCost(node.name, node.op_type, _flops(node, shapes), float(moved)))
    return costs


def limit_seconds(model: onnx.ModelProto, batch: int, machine: Machine) -> float:
    """The roofline lower bound of one run of ``model`` at ``batch`` on ``machine``."""
    return sum(max(c.flops / machine.flops_per_s, c.bytes / machine.bytes_per_s) for c in node_costs(model, batch))


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
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            if dims[0].HasField("dim_value") and dims[0].dim_value != batch:
                raise ValueError(f"input {value.name} has a fixed batch of {dims[0].dim_value}, not {batch}")
            dims[0].dim_value = batch
    for value in model.graph.output:
        value.type.tensor_type.ClearField("shape")   # unknown: inferred again
    return model
