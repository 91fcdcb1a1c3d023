"""INT8 on top of an exported model: onnxruntime's static quantization, checked by agreement.

Weights are quantized per output channel to int8 and activations to uint8 with
ranges calibrated on sample inputs (QDQ format, which onnxruntime fuses into
integer kernels). Quantized outputs cannot match the float ones to a
tolerance, so the check is stated differently: the largest difference and, for
outputs that look like class scores, how often the top-1 class agrees.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx

from .console import first_line
from .files import read_bounded
from .onnx_export import ExportError, run_onnxruntime


@dataclass
class Agreement:
    """How the quantized model's outputs compare with the float model's on the calibration inputs."""

    samples: int
    top1: float | None        # share of samples whose argmax over the last axis agrees (first output)
    max_abs_error: float      # over all outputs

    def __str__(self) -> str:
        top1 = f"top-1 agreement {self.top1:.2%}" if self.top1 is not None else "no class scores to compare"
        return (f"int8 vs float on {self.samples} calibration sample(s): {top1}, "
                f"max abs error {self.max_abs_error:.3g}")


def quantize_int8(model: onnx.ModelProto, calibration: Sequence[Sequence[np.ndarray]]) -> onnx.ModelProto:
    """``model`` (float, dense weights) statically quantized to int8 with ranges from ``calibration``.

    ``calibration`` holds batches, each a list with one array per model input.
    Raises ``ExportError`` when onnxruntime's quantizer fails.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    names = [i.name for i in model.graph.input]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else dict(zip(names, batch))

    with tempfile.TemporaryDirectory() as folder:
        source, prepared, target = (os.path.join(folder, n) for n in ("float.onnx", "prepared.onnx", "int8.onnx"))
        onnx.save(model, source)
        try:
            quant_pre_process(source, prepared, skip_symbolic_shape=True)
            quantize_static(prepared, target, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
        except Exception as e:
            raise ExportError(f"onnxruntime quantization failed: {first_line(e)}") from None
        return onnx.load(target)


def agreement(float_model: bytes, int8_model: bytes, calibration: Sequence[Sequence[np.ndarray]]) -> Agreement:
    """Run both models on every calibration batch and compare their outputs."""
    import torch

    worst, agree, samples, scores = 0.0, 0, 0, True
    for batch in calibration:
        inputs = [torch.from_numpy(np.ascontiguousarray(a)) for a in batch]
        ref, out = run_onnxruntime(float_model, inputs), run_onnxruntime(int8_model, inputs)
        for r, o in zip(ref, out):
            if r.size:
                diff = float(np.max(np.abs(r.astype(np.float64) - o.astype(np.float64))))
                worst = diff if diff != diff else max(worst, diff)   # a NaN stays NaN
        first_ref, first_out = ref[0], out[0]
        scores = scores and first_ref.ndim >= 2 and first_ref.shape[-1] > 1
        if scores:
            agree += int(np.sum(first_ref.argmax(-1) == first_out.argmax(-1)))
            samples += int(np.prod(first_ref.shape[:-1]))
    n = sum(len(b[0]) for b in calibration)
    return Agreement(n, agree / samples if scores and samples else None, worst)


def load_calibration(path: str, n_inputs: int, batch: int = 32) -> list[list[np.ndarray]]:
    """Calibration batches from an ``.npz`` file: one array per model input (in order), samples on axis 0.

    Read with ``allow_pickle=False``, so the file cannot carry code.
    """
    try:
        with np.load(io.BytesIO(read_bounded(path, what="calibration file")), allow_pickle=False) as data:
            arrays = [data[k] for k in data.files]
    except ValueError as e:
        raise ValueError(f"{path} is not a NumPy .npz file of arrays: {first_line(e)}") from None
    except Exception as e:
        raise ValueError(f"{path} is not a readable NumPy .npz file: {first_line(e)}") from None
    if len(arrays) != n_inputs:
        raise ValueError(f"{path} holds {len(arrays)} arrays; the model takes {n_inputs} input(s)")
    count = len(arrays[0]) if arrays and arrays[0].ndim else 0
    if not count or any(a.ndim == 0 or len(a) != count for a in arrays):
        raise ValueError(f"{path}: every array must hold the same number (> 0) of samples on its first axis")
    return [[a[i:i + batch] for a in arrays] for i in range(0, count, batch)]
