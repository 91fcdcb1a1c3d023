"""The roofline limit: FLOPs and bytes per ONNX node worked by hand, and the limit they give."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from granet_fx.export.roofline import Machine, limit_seconds, node_costs


def conv_relu(channels_out: int = 8) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((channels_out, 3, 3, 3), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
                               helper.make_node("Relu", ["c"], ["y"], name="relu")], "g", [x], [y], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_node_costs_by_hand():
    conv, relu = node_costs(conv_relu(), batch=2)
    # Conv 3x3, no padding: output 2 x 8 x 8 x 8 = 1024 elements, each 3 x 3 x 3 = 27 MACs
    assert conv.flops == 2 * 1024 * 27
    assert conv.bytes == 4 * (2 * 3 * 10 * 10 + 8 * 3 * 3 * 3 + 1024)   # input + weight + output
    assert relu.flops == 0 and relu.bytes == 4 * (1024 + 1024)


def test_limit_is_the_slower_of_compute_and_memory_per_node():
    machine = Machine(flops_per_s=1e9, bytes_per_s=1e8, threads=1)
    conv, relu = node_costs(conv_relu(), batch=2)
    expected = max(conv.flops / 1e9, conv.bytes / 1e8) + relu.bytes / 1e8
    assert limit_seconds(conv_relu(), 2, machine) == pytest.approx(expected)
    fast_memory = Machine(flops_per_s=1e9, bytes_per_s=1e15, threads=1)   # compute-bound: the FLOPs decide
    assert limit_seconds(conv_relu(), 2, fast_memory) == pytest.approx(conv.flops / 1e9, rel=1e-6)


def test_a_fixed_batch_that_differs_is_refused():
    model = conv_relu()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ValueError, match="fixed batch of 1"):
        node_costs(model, batch=4)
