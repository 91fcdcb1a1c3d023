"""ONNX export: sparse storage that is present and correct, the checker, and parity in onnxruntime."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import granet_fx as gf
from granet_fx.export.archive import export_program
from granet_fx.export.onnx_export import check, max_abs_error, run_onnxruntime, to_onnx
from granet_fx.export.sparse_initializers import store_sparse

from helpers import SmallCNN
from test_fold import trained


def sparse_tensors(model: onnx.ModelProto) -> dict:
    """Every sparse tensor of the main graph, from Constant nodes and sparse initializers, by name."""
    found = {s.values.name: s for s in model.graph.sparse_initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "sparse_value":
                    found[node.output[0]] = a.sparse_tensor
    return found


def densify(s: onnx.SparseTensorProto) -> np.ndarray:
    """The dense array of a sparse tensor with linearized indices, written out by hand."""
    values = numpy_helper.to_array(s.values)
    indices = numpy_helper.to_array(s.indices)
    out = np.zeros(int(np.prod(s.dims)), dtype=values.dtype)
    for i, v in zip(indices, values):
        out[i] = v
    return out.reshape(tuple(s.dims))


def test_store_sparse_on_a_hand_made_graph():
    w = np.zeros((4, 4), np.float32)
    w[0, 1], w[2, 3], w[3, 0] = 1.5, -2.0, 3.0         # 3 nonzeros: 3 * 12 = 36 bytes < 64 dense
    b = np.array([[0.0, 1.0], [2.0, 0.0]], np.float32)  # 2 nonzeros: 24 bytes > 16 dense
    shape = np.array([4, 4], np.int64)                   # not floating point: never sparse
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Reshape", ["y", "shape"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b"), numpy_helper.from_array(shape, "shape")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    for layout in ("constant", "initializer"):
        out, names = store_sparse(model, layout)
        assert names == ["w"]
        s = sparse_tensors(out)["w"]
        assert list(s.dims) == [4, 4]
        assert s.indices.data_type == TensorProto.INT64 and list(s.indices.dims) == [3]
        assert numpy_helper.to_array(s.indices).tolist() == [1, 11, 12]  # row-major positions, ascending
        assert numpy_helper.to_array(s.values).tolist() == [1.5, -2.0, 3.0]
        assert sorted(t.name for t in out.graph.initializer) == ["b", "shape"]
        x = np.arange(16, dtype=np.float32).reshape(4, 4)
        y = run_onnxruntime(out.SerializeToString(), [torch.from_numpy(x)])[0]
        assert np.array_equal(y, x @ w)
    assert len(model.graph.initializer) == 3  # the input model is not changed


@pytest.fixture(scope="module")
def exported():
    torch.manual_seed(0)
    model, granet = trained(SmallCNN())
    model.drop.p = 0.0
    model.eval()
    x = torch.randn(1, 1, 12)
    folded = gf.fold(model)
    program, _ = export_program(folded, (x,), dynamic_batch=False)
    dense = to_onnx(program)
    return model, granet, x, dense


def test_dense_export_matches_pytorch(exported):
    model, _, x, dense = exported
    check(dense, full=True)
    y = run_onnxruntime(dense.SerializeToString(), [x])
    assert max_abs_error(y, [model(x)]) < 1e-5
    # an IR version that onnxruntime reads: the one the opset needs
    assert dense.ir_version == helper.find_min_ir_version_for(list(dense.opset_import), ignore_unknown=True)


@pytest.mark.parametrize("layout", ["constant", "initializer"])
def test_sparse_weights_are_present_correct_and_smaller(exported, layout):
    model, granet, x, dense = exported
    sparse, names = store_sparse(dense, layout)
    stored = sparse_tensors(sparse)
    assert set(stored) == set(names) and names
    originals = {t.name: numpy_helper.to_array(t) for t in dense.graph.initializer}
    for name, s in stored.items():
        idx = numpy_helper.to_array(s.indices)
        assert idx.dtype == np.int64 and idx.ndim == 1 and np.all(np.diff(idx) > 0)
        assert np.array_equal(densify(s), originals[name])
        assert 12 * idx.size < 4 * originals[name].size  # stored sparse only when smaller
    # the conv weights keep their names: compare with the masked PyTorch weights
    masks = granet.masks()
    for name in ("conv1.weight", "conv2.weight"):
        expected = (model.get_parameter(name) * masks[name]).detach().numpy()
        if name in stored:
            assert np.array_equal(densify(stored[name]), expected)
    assert "conv2.weight" in stored  # 80% sparse: must be stored sparse
    for t in sparse.graph.initializer:  # what stays dense is where sparse would not be smaller
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f" and a.ndim:
            assert 12 * np.count_nonzero(a) >= 4 * a.size
    assert sparse.ByteSize() < dense.ByteSize()
    y = run_onnxruntime(sparse.SerializeToString(), [x])
    assert max_abs_error(y, [model(x)]) < 1e-5


def test_checker(exported):
    *_, dense = exported
    constant, _ = store_sparse(dense, "constant")
    check(constant, full=True)
    initializer, _ = store_sparse(dense, "initializer")
    check(initializer, full=False)
    # onnx's shape inference types a sparse initializer as a sparse tensor, which
    # ordinary operators do not take: why "constant" is the default layout.
    with pytest.raises(onnx.shape_inference.InferenceError):
        check(initializer, full=True)


def test_bad_layout():
    with pytest.raises(ValueError, match="layout"):
        store_sparse(onnx.ModelProto(), "coo")


def test_exporter_debug_annotations_are_dropped(exported):
    *_, dense = exported
    keys = {kv.key for node in dense.graph.node for kv in node.metadata_props}
    keys |= {kv.key for v in dense.graph.value_info for kv in v.metadata_props}
    assert not any(k == "namespace" or k.startswith("pkg.torch.onnx.") for k in keys)
    assert b"stack_trace" not in dense.SerializeToString()


def test_a_nan_anywhere_fails_the_parity_check():
    from granet_fx.export.onnx_export import max_abs_error
    good = np.array([1.0, 2.0], dtype=np.float32)
    bad = np.array([1.0, np.nan], dtype=np.float32)
    reference = [torch.tensor([1.0, 2.5])]
    assert max_abs_error([good], reference) == 0.5
    error = max_abs_error([bad, good], reference + reference)   # the NaN comes first, a finite error after it
    assert not error <= 1e9
    assert not max_abs_error([good, bad], reference + reference) <= 1e9
