"""ONNX through ``torch.onnx.export`` (dynamo), and the checks an exported file must pass."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper

from .console import first_line


class ExportError(RuntimeError):
    """torch.onnx.export failed, or did not give what was asked for."""


def to_onnx(program: torch.export.ExportedProgram, *, opset: int | None = None) -> onnx.ModelProto:
    """Export ``program`` with ``torch.onnx.export(dynamo=True)``, without its console output.

    The IR version is set to the lowest one that the opsets need (the exporter
    may write a newer one than onnxruntime reads). Raises ``ExportError`` when
    the export fails, naming the operator and source line it failed on where
    the exporter says, and ``ValueError`` when the exporter cannot write ``opset``.
    """
    try:
        exported = _quiet_export(program, opset)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed{_where(e)}: {first_line(e)}") from None
    model = exported.model_proto
    got = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and got != opset:
        raise ValueError(f"torch.onnx.export cannot write opset {opset} for this model (it wrote opset {got})")
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    strip_exporter_metadata(model)
    return model


def _quiet_export(program: torch.export.ExportedProgram, opset: int | None):
    quiet = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript")]
    levels = [logger.level for logger in quiet]
    captured = io.StringIO()
    try:
        for logger in quiet:
            logger.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            warnings.simplefilter("ignore")
            return torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
    finally:
        for logger, level in zip(quiet, levels):
            logger.setLevel(level)


def portable(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """``program`` with its attention decomposed into matmuls and softmax and every ``view`` a ``reshape``.

    The same results; granet-export exports it when the program as it is fails
    (in the exporter, the checker or onnxruntime). transformers' SDPA attention records views that hold for
    the fused kernel's output strides but not for the exporter's own
    decomposition; decomposing only attention (not all of core ATen) leaves
    in-place writes such as BEiT's relative position index as they are.
    """
    table = {op: f for op, f in torch.export.default_decompositions().items() if "scaled_dot_product" in str(op)}
    program = program.run_decompositions(table)
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.view.default:
            node.target = torch.ops.aten.reshape.default
    program.graph_module.recompile()
    return program


def _where(e: Exception) -> str:
    """" at <operator> (<file>:<line>)" from an exporter error's text, where it says."""
    text = str(e)
    op = re.findall(r"target=([\w.:]+)", text)
    files = re.findall(r'File "[^"]*?([\w-]+\.py)", line (\d+)', text)
    parts = ([op[-1]] if op else []) + ([f"{files[-1][0]}:{files[-1][1]}"] if files else [])
    return f" at {' in '.join(parts)}" if parts else ""


def _is_exporter_annotation(key: str) -> bool:
    return key == "namespace" or key.startswith("pkg.torch.onnx.")


def strip_exporter_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug annotations (Python stack traces with the
    exporting machine's file paths, fx node text, module names) from ``model`` in place.

    They do not change what the model computes, and in a sparse model they are a
    noticeable share of the file.
    """
    for items in (model.graph.node, model.graph.value_info, model.graph.input, model.graph.output):
        for item in items:
            kept = [kv for kv in item.metadata_props if not _is_exporter_annotation(kv.key)]
            if len(kept) != len(item.metadata_props):
                del item.metadata_props[:]
                item.metadata_props.extend(kept)


def check(model: onnx.ModelProto, *, full: bool = True) -> None:
    """``onnx.checker.check_model``; ``full`` adds strict shape and type inference."""
    onnx.checker.check_model(model, full_check=full)


def run_onnxruntime(model: bytes, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run a serialized ONNX model once in onnxruntime (CPU) on ``inputs``, in the graph's input order."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(inputs):
        raise ValueError(f"the ONNX model takes {len(names)} inputs, not {len(inputs)}")
    return session.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)})


def max_abs_error(actual: Sequence[np.ndarray], expected: Sequence[torch.Tensor]) -> float:
    """Largest ``|actual - expected|`` over all outputs; inf when their number or shapes differ,
    NaN when any difference is NaN (so that ``error <= limit`` fails)."""
    if len(actual) != len(expected):
        return float("inf")
    worst = 0.0
    for a, e in zip(actual, expected):
        e = e.detach().cpu().numpy()
        if a.shape != e.shape:
            return float("inf")
        if a.size:
            diff = float(np.max(np.abs(a.astype(np.float64) - e.astype(np.float64))))
            if diff != diff:
                return float("nan")
            worst = max(worst, diff)
    return worst


def rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the graph's outputs ``names`` (in order), renaming any other value that already has one of them."""
    graph = model.graph
    if len(names) != len(graph.output):
        raise ExportError(f"the ONNX model has {len(graph.output)} outputs, but {len(names)} output names are stored")
    fixed = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used = fixed | {o for node in graph.node for o in node.output}
    for output, name in zip(graph.output, names):
        if output.name == name or output.name in fixed:
            continue
        if name in used:                       # another value has the name: move it aside first
            spare = next(f"{name}_{k}" for k in range(1, len(used) + 2) if f"{name}_{k}" not in used)
            if name in fixed:
                continue
            _rename_value(graph, name, spare)
            used.add(spare)
        _rename_value(graph, output.name, name)
        used.add(name)


def _rename_value(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for field in (node.input, node.output):
            for i, value in enumerate(field):
                if value == old:
                    field[i] = new
    for value in list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new
