"""The roofline limit: FLOPs and bytes per ONNX node worked by hand, and the limit they give."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from granet_fx.export.roofline import (
    Machine, Probe, best, copy_probe, limit_seconds, matmul_probe, measure_machine, memory_bound_share, node_costs,
    probes, working_set_bytes,
)


def model_of(nodes, inputs, initializers):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def conv_relu(channels_out: int = 8) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((channels_out, 3, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])
    return model_of([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                     helper.make_node("Relu", ["c"], ["y"], name="relu")], [x], [w])


def test_node_costs_by_hand():
    conv, relu = node_costs(conv_relu(), batch=2)
    # Conv 3x3, no padding: output 2 x 8 x 8 x 8 = 1024 elements, each 3 x 3 x 3 = 27 MACs
    assert conv.flops == 2 * 1024 * 27
    assert conv.bytes == 4 * (2 * 3 * 10 * 10 + 8 * 3 * 3 * 3 + 1024)   # input + weight + output
    assert relu.flops == 0 and relu.bytes == 0       # fused into the conv: it reads and writes nothing more


def test_fusion_views_and_unfused_nodes_by_hand():
    """Conv -> Add(z) -> Relu is fused (the Add reads z only); a Relu of the input and a conv output read
    twice are not; Reshape moves nothing."""
    w = numpy_helper.from_array(np.ones((4, 2, 1, 1), np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 3])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, ["n", 4, 3, 3])
    nodes = [
        helper.make_node("Relu", ["x"], ["rx"], name="relu_in"),         # reads x, writes rx: 18 + 18 floats
        helper.make_node("Conv", ["rx", "w"], ["c"], name="conv"),       # 18 + 8 + 36 floats, 36 x 2 MACs
        helper.make_node("Add", ["c", "z"], ["a"], name="add"),          # fused: reads z only (36 floats)
        helper.make_node("Relu", ["a"], ["r"], name="relu"),             # fused: nothing
        helper.make_node("Conv", ["r", "w2"], ["d"], name="conv2"),      # 36 + 16 + 36 floats, 36 x 4 MACs
        helper.make_node("Relu", ["d"], ["e"], name="relu2"),            # d read twice: not fused, 36 + 36
        helper.make_node("Add", ["d", "e"], ["s"], name="add2"),         # not fused: 36 x 3
        helper.make_node("Reshape", ["s", "shape"], ["y"], name="flat"),  # a view: nothing
    ]
    w2 = numpy_helper.from_array(np.ones((4, 4, 1, 1), np.float32), "w2")
    costs = {c.name: c for c in node_costs(model_of(nodes, [x, z], [w, w2, shape]), batch=1)}
    assert {n: c.bytes / 4 for n, c in costs.items()} == {
        "relu_in": 36, "conv": 62, "add": 36, "relu": 0, "conv2": 88, "relu2": 72, "add2": 108, "flat": 0}
    assert costs["conv"].flops == 2 * 36 * 2 and costs["conv2"].flops == 2 * 36 * 4
    assert sum(c.flops for c in costs.values()) == 2 * 36 * 6


def test_limit_is_the_slower_of_compute_and_memory_per_node():
    machine = Machine(flops_per_s=1e9, bytes_per_s=1e8, threads=1)
    # conv: 55,296 FLOPs -> 55.3 us; 7,360 bytes -> 73.6 us: memory-bound; the fused relu costs nothing
    assert limit_seconds(conv_relu(), 2, machine) == pytest.approx(7360 / 1e8)
    assert memory_bound_share(conv_relu(), 2, machine) == 1.0
    fast_memory = Machine(flops_per_s=1e9, bytes_per_s=1e15, threads=1)   # compute-bound: the FLOPs decide
    assert limit_seconds(conv_relu(), 2, fast_memory) == pytest.approx(55296 / 1e9, rel=1e-6)
    assert memory_bound_share(conv_relu(), 2, fast_memory) == 0.0


def test_working_set_is_the_weights_and_the_largest_node():
    assert working_set_bytes(conv_relu(), 2) == 4 * 216 + 7360


def test_probes_copy_the_dominant_layer_with_its_weight_as_an_initializer():
    (name, probe, flops), = probes([conv_relu()], batch=2)
    assert name == "Conv [2, 3, 10, 10] x [8, 3, 3, 3]" and flops == 2 * 1024 * 27
    assert [i.name for i in probe.graph.initializer] == ["i1"]
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"i0": np.zeros((2, 3, 10, 10), np.float32)})
    assert out.shape == (2, 8, 8, 8)
    # two models: the shape with the most FLOPs in total comes first
    bigger = conv_relu(channels_out=16)
    assert [p[0] for p in probes([conv_relu(), bigger], batch=1)] == [
        "Conv [1, 3, 10, 10] x [16, 3, 3, 3]", "Conv [1, 3, 10, 10] x [8, 3, 3, 3]"]


def test_the_compute_rate_is_the_best_probe():
    name, model, flops = matmul_probe(64)
    assert name == "MatMul [64, 64] x [64, 64]" and flops == 2 * 64 ** 3
    plain, claimed = Probe(name, model, flops, 1), Probe("claimed", model, 1000.0 * flops, 1)
    for _ in range(3):
        plain.run()
        claimed.run()
    assert plain.rate == flops / plain.best and min(plain.best, claimed.best) > 0
    # the same op claimed to do 1000x the work is 1000x "faster": it must be the one chosen
    assert best([plain, claimed]) is claimed
    copy = copy_probe(1, 1 << 20)
    assert copy.amount == 1 << 20        # 128 Ki floats read and 128 Ki written
    machine = measure_machine(1, [conv_relu()], batch=2, working_set=1 << 20, repeats=2)
    assert machine.flops_per_s > 0 and machine.bytes_per_s > 0 and machine.threads == 1
    assert machine.probe.startswith(("MatMul", "Conv"))


def test_a_fixed_batch_that_differs_is_refused():
    model = conv_relu()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ValueError, match="fixed batch of 1"):
        node_costs(model, batch=4)
