"""The sparse-storage pass: store each ONNX weight as a sparse tensor when that makes the file smaller.

A sparse tensor is ONNX's ``SparseTensorProto``: the nonzero values, their
int64 positions in the flattened weight in ascending order, and the dense
shape. With 4-byte floats a weight of density d takes 12 d bytes per weight
instead of 4, so it is stored sparse only below density 1/3.

Two places can hold it:

- ``"constant"`` (default): a ``Constant`` node with a ``sparse_value``
  attribute whose output is the dense weight. The model passes
  ``onnx.checker.check_model(full_check=True)``.
- ``"initializer"``: the graph's ``sparse_initializer`` list. onnxruntime
  reads it, but onnx's own shape inference types such a value as a sparse
  tensor, which no standard operator takes, so only the basic check passes.

Either way onnxruntime turns the weight back into a dense tensor when it
loads the model: the file is smaller, inference is not faster.

Run this pass last: onnx_ir round trips (the exporter's optimizer among
them) drop sparse initializers.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

LAYOUTS = ("constant", "initializer")
INDEX_BYTES = 8  # int64 linearized indices


def sparse_bytes(nonzeros: int, itemsize: int) -> int:
    """Bytes of a sparse tensor's payload: values plus int64 indices."""
    return nonzeros * (itemsize + INDEX_BYTES)


def to_sparse_tensor(tensor: onnx.TensorProto) -> onnx.SparseTensorProto | None:
    """``tensor`` as a sparse tensor when that is smaller, else None.

    Only floating-point tensors of rank >= 1 qualify: weights, not shapes or scalars.
    """
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.dims:
        return None
    if helper.tensor_dtype_to_np_dtype(tensor.data_type).kind != "f":
        return None
    dense = numpy_helper.to_array(tensor)
    flat = dense.reshape(-1)
    indices = np.flatnonzero(flat)  # ascending, as the ONNX spec asks
    if sparse_bytes(indices.size, flat.itemsize) >= flat.nbytes:
        return None
    values = numpy_helper.from_array(flat[indices], tensor.name)
    return helper.make_sparse_tensor(values, numpy_helper.from_array(indices.astype(np.int64)), list(dense.shape))


def store_sparse(model: onnx.ModelProto, layout: str = "constant") -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` with each main-graph weight stored sparse where that is smaller.

    Returns the new model and the names of the weights stored sparse.
    Weights that are also graph inputs (overridable at run time) stay as they are.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inputs = {i.name for i in graph.input}
    dense, sparse = [], []
    for tensor in graph.initializer:
        s = None if tensor.name in inputs else to_sparse_tensor(tensor)
        (dense if s is None else sparse).append(tensor if s is None else s)
    names = [s.values.name for s in sparse]
    del graph.initializer[:]
    graph.initializer.extend(dense)
    if layout == "initializer":
        graph.sparse_initializer.extend(sparse)
        # Their value_info says dense tensor; a sparse initializer is typed as a sparse tensor.
        stored = set(names)
        kept = [v for v in graph.value_info if v.name not in stored]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    else:
        constants = [helper.make_node("Constant", [], [s.values.name], name=f"{s.values.name}_sparse",
                                      sparse_value=s) for s in sparse]
        nodes = constants + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return model, names
