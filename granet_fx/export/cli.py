"""``granet-export``: a saved sparse model to an ONNX file with sparse weights, checked in onnxruntime."""

from __future__ import annotations

import argparse
import importlib
import io
import pickletools
import re
import sys
import time
import warnings
import zipfile
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from ..passes.compact import CompactionReport, compact, compaction_report
from ..report import LayerReport, columns, global_sparsity, inference_flops
from ..sparsify import MASK_SUFFIX
from .archive import (ArchiveError, export_program, is_archive, load_bytes, named_outputs, plain_layer_reports,
                      read_file)
from .console import ArgumentParser, UsageError, first_line
from .files import atomic_write, check_writable, same_file
from .onnx_export import ExportError, check, max_abs_error, portable, rename_outputs, run_onnxruntime, to_onnx
from .quantize import agreement, load_calibration, quantize_int8
from .safe_zip import ZipProblem, read_entries, write_entries
from .sparse_initializers import LAYOUTS, store_sparse

DESCRIPTION = """\
Export a sparse model to ONNX, storing each weight that is mostly zeros as a
sparse tensor (int64 positions + values), then check the file with
onnx.checker and run it in onnxruntime against reference outputs.

MODEL is one of:
  - a file written by granet_fx.save (holds example inputs and reference outputs;
    it loads without the package that defined the model);
  - a state_dict checkpoint (read with torch.load(weights_only=True)), with
    --model package.module:factory and --input-shape; mask buffers
    ("<weight>_mask") in it are multiplied into their weights;
  - a whole pickled nn.Module, only with --trust-pickle.

onnxruntime turns sparse weights back into dense tensors when it loads a
model: sparse storage makes the file smaller, not inference faster.
"""

SPEED_NOTE = ("note: onnxruntime densifies sparse weights when it loads the model: "
              "the file is smaller, inference is not faster (speed needs removed channels: --compact)")
COMPACT_NOTE = ("note: the removed channels make inference faster; the zeros left inside the remaining "
                "weights only make the file smaller (onnxruntime densifies them at load)")


@dataclass
class Source:
    """What the ONNX export needs from MODEL, whatever kind of file it was."""

    kind: str
    module: nn.Module | None                 # None for an archive (its program is used)
    program: torch.export.ExportedProgram | None
    dynamic_batch: bool                      # whether ``program`` already has a dynamic batch
    inputs: tuple[torch.Tensor, ...]
    reference: list[torch.Tensor]
    output_names: list[str]                  # the ONNX outputs' names
    layers: list[LayerReport]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="granet-export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL", help="granet_fx archive, state_dict checkpoint, or pickled module")
    p.add_argument("-o", "--output", required=True, metavar="OUT.onnx", help="the ONNX file to write")
    p.add_argument("--model", dest="factory", metavar="package.module:factory",
                   help="for a state_dict: a callable that builds the model, called with no arguments")
    p.add_argument("--input-shape", action="append", metavar="1,3,32,32",
                   help="for a state_dict or pickled module: shape of a float32 input (repeat for several inputs)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow MODEL to be a whole pickled module; loading it RUNS CODE FROM THE FILE")
    p.add_argument("--opset", type=int, metavar="N", help="ONNX opset (default: torch.onnx's)")
    p.add_argument("--dense-initializers", action="store_true", help="keep every weight dense (no sparse storage)")
    p.add_argument("--sparse-layout", choices=LAYOUTS, default="constant",
                   help="constant (default): Constant nodes with sparse_value, passes onnx.checker's full check; "
                        "initializer: graph.sparse_initializer, passes its basic check only")
    p.add_argument("--dynamic-batch", action="store_true", help="make the first input dimension dynamic")
    p.add_argument("--compact", action="store_true",
                   help="remove the channels that compute nothing first (granet_fx.compact): a smaller dense "
                        "model that runs faster; checked against the same reference outputs")
    p.add_argument("--quantize", choices=("int8",),
                   help="int8: onnxruntime static quantization (per-channel int8 weights, uint8 activations, "
                        "QDQ), after --compact if given; weights stay dense; checked by top-1 agreement")
    p.add_argument("--calibration", metavar="DATA.npz",
                   help="with --quantize: calibration inputs, one array per model input with samples on axis 0 "
                        "(default: the archive's example inputs)")
    p.add_argument("--min-agreement", type=float, default=0.99, metavar="A",
                   help="with --quantize: smallest allowed top-1 agreement with the float model (default 0.99)")
    p.add_argument("--tolerance", type=float, default=1e-4, metavar="T",
                   help="largest allowed |onnxruntime - reference|, times max(1, max |reference|) (default 1e-4)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tool; returns 0 on success, 1 when the export or its check fails, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
        if not args.tolerance >= 0:
            raise UsageError(f"--tolerance must be >= 0; got {args.tolerance}")
        if (args.calibration or args.min_agreement != 0.99) and not args.quantize:
            raise UsageError("--calibration and --min-agreement apply to --quantize int8 only")
        if not 0 <= args.min_agreement <= 1:
            raise UsageError(f"--min-agreement must be in [0, 1]; got {args.min_agreement}")
        return _export(args)
    except (UsageError, ArchiveError) as e:
        print(f"granet-export: error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"granet-export: error: {e}", file=sys.stderr)
        return 1


def console() -> None:
    """Entry point of the ``granet-export`` console script."""
    sys.exit(main())


def _progress(message: str) -> None:
    print(f"granet-export: {message}", file=sys.stderr, flush=True)


def _export(args) -> int:
    if same_file(args.model, args.output):
        raise UsageError(f"the output {args.output} is the input file; choose another name")
    problem = check_writable(args.output)
    if problem:
        raise UsageError(f"cannot write {args.output}: {problem}")
    source = read_source(args)
    _progress(f"read {args.model}: {source.kind}")
    if args.dynamic_batch and source.program is not None and not source.dynamic_batch:
        raise UsageError(f"{args.model} was saved with a fixed batch size; --dynamic-batch is not possible")
    start = time.perf_counter()
    compaction = None
    if args.compact:
        source, compaction, widths_note = _compacted(source)
        args.dynamic_batch = args.dynamic_batch or source.dynamic_batch
    _progress("exporting to ONNX (torch.export, then torch.onnx.export with dynamo)")
    program = _program(source, args.dynamic_batch)
    try:
        dense, sparse_names, data, outputs = _onnx(program, source, args)
    except ExportError as first:
        # The exporter may also write a file that the checker or onnxruntime refuses (BEiT's relative
        # position index): try once more with the portable program, else report the first failure.
        _progress(f"{first}; exporting again with attention decomposed and views as reshapes")
        try:
            dense, sparse_names, data, outputs = _onnx(portable(program), source, args)
        except ExportError:
            raise first from None
    error = max_abs_error(outputs, source.reference)
    scale = max([1.0] + [float(t.double().abs().max()) for t in source.reference if t.numel()])
    limit = args.tolerance * scale
    print(summary(source, dense.ByteSize(), len(data), sparse_names, args.dense_initializers))
    if compaction is not None:
        print(compaction)
        if widths_note:
            print(widths_note)
    print(f"onnxruntime vs reference outputs: max abs error {error:.3g} "
          f"(tolerance {args.tolerance:g} x max(1, max|reference|) = {limit:.3g})")
    if not error <= limit:
        raise ExportError(f"onnxruntime outputs differ from the reference by {error:.3g} > {limit:.3g}; nothing written")
    if args.quantize:
        data = _quantized(args, data, source)
    _progress(f"writing {args.output}")
    try:
        atomic_write(args.output, data)
    except OSError as e:
        raise UsageError(f"cannot write {args.output}: {e.strerror}") from None
    print(SPEED_NOTE if compaction is None else COMPACT_NOTE)
    print(f"wrote {args.output} ({len(data):,} bytes) in {time.perf_counter() - start:.1f} s")
    return 0


def _onnx(program: torch.export.ExportedProgram, source: Source, args):
    """The dense ONNX model of ``program``, the names of the weights stored sparse, the bytes to write
    and onnxruntime's outputs on the reference inputs, checked."""
    try:
        dense = to_onnx(program, opset=args.opset)
    except ValueError as e:
        raise UsageError(str(e)) from None
    rename_outputs(dense, source.output_names)
    final, sparse_names = dense, []
    if not args.dense_initializers and not args.quantize:
        _progress(f"storing weights sparse ({args.sparse_layout} layout)")
        final, sparse_names = store_sparse(dense, args.sparse_layout)
    full = args.dense_initializers or args.sparse_layout == "constant"
    _progress(f"checking with onnx.checker (full_check={full})")
    try:
        check(final, full=full)
    except Exception as e:
        raise ExportError(f"onnx.checker rejects the model: {first_line(e)}") from None
    data = final.SerializeToString()
    _progress("running it in onnxruntime on the reference inputs")
    try:
        outputs = run_onnxruntime(data, source.inputs)
    except Exception as e:
        raise ExportError(f"onnxruntime cannot run the model: {first_line(e)}") from None
    return dense, sparse_names, data, outputs


def _quantized(args, float_model: bytes, source: Source) -> bytes:
    """The float ONNX model quantized to int8, checked by top-1 agreement on the calibration inputs."""
    import numpy as np
    import onnx

    if args.calibration:
        try:
            calibration = load_calibration(args.calibration, len(source.inputs))
        except ValueError as e:
            raise UsageError(str(e)) from None
    else:
        calibration = [[t.numpy() for t in source.inputs]]
    model = onnx.load_from_string(float_model)
    fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    if fixed:   # a model with a fixed batch size is calibrated in batches of that size
        arrays = [np.concatenate(parts) for parts in zip(*calibration)]
        calibration = [[a[i:i + fixed] for a in arrays] for i in range(0, len(arrays[0]) - fixed + 1, fixed)]
    _progress(f"quantizing to int8 (onnxruntime static quantization, "
              f"{sum(len(b[0]) for b in calibration)} calibration sample(s))")
    int8 = quantize_int8(model, calibration).SerializeToString()
    result = agreement(float_model, int8, calibration)
    print(result)
    if result.top1 is not None and not result.top1 >= args.min_agreement:
        raise ExportError(f"int8 top-1 agreement {result.top1:.2%} is below --min-agreement "
                          f"{args.min_agreement:.2%}; nothing written")
    if not result.max_abs_error == result.max_abs_error:
        raise ExportError("the int8 model gives NaN outputs; nothing written")
    print(f"int8 file: {len(int8):,} bytes ({len(int8) / len(float_model):.3f} x the float file)")
    return int8


def _compacted(source: Source) -> tuple[Source, CompactionReport, str]:
    """``source`` with its channels that compute nothing removed (a module to export again), the report,
    and ``odd_widths_note``."""
    _progress("compacting: removing the channels that compute nothing")
    module = source.module if source.module is not None else source.program.module()
    try:
        compacted = compact(module, source.inputs)
    except Exception as e:
        raise ExportError(f"compaction failed: {first_line(e)}") from None
    return (replace(source, module=compacted, program=None), compaction_report(compacted),
            odd_widths_note(module, compacted))


def odd_widths_note(before: nn.Module, after: nn.Module) -> str:
    """A note naming the 2-D convolutions that compaction narrowed to a channel count that is not a
    multiple of 8 (onnxruntime's NCHWc kernels take such counts on a slower path); "" if there are none."""
    shapes = {name: p.shape for name, p in before.named_parameters()}
    odd = [int(p.shape[0]) for name, p in after.named_parameters()
           if p.ndim == 4 and name in shapes and shapes[name][0] != p.shape[0] and p.shape[0] % 8]
    if not odd:
        return ""
    return (f"note: {len(odd)} convolution{'s' if len(odd) != 1 else ''} kept a channel count that is not a "
            f"multiple of 8 ({', '.join(map(str, odd[:6]))}{', ...' if len(odd) > 6 else ''}); onnxruntime's CPU "
            "convolutions run such counts slower: train with GraNetConfig(channel_multiple='measured') (or 16) "
            "to keep counts that run fast (README: channel pruning)")


def _program(source: Source, dynamic_batch: bool) -> torch.export.ExportedProgram:
    """The program to export: the archive's own, or a fresh torch.export with the batch as asked."""
    if source.program is not None and dynamic_batch:
        return source.program
    module = source.module if source.module is not None else source.program.module()
    try:
        return export_program(module, source.inputs, dynamic_batch=dynamic_batch)[0]
    except ValueError:
        raise
    except Exception as e:
        raise ExportError(f"torch.export failed: {first_line(e)}") from None


# Reading MODEL -----------------------------------------------------------------
def read_source(args) -> Source:
    data = read_file(args.model)
    if is_archive(data):
        if args.factory or args.input_shape or args.trust_pickle:
            raise UsageError(f"{args.model} is a granet_fx archive: --model, --input-shape and --trust-pickle "
                           "apply to checkpoints only")
        saved = load_bytes(data, args.model)
        return Source(f"granet_fx archive ({saved.kind} model)", None, saved.program, saved.dynamic_batch,
                      saved.example_inputs, saved.reference_outputs, saved.output_names, saved.layers)
    if not _is_torch_file(data):
        raise UsageError(f"{args.model} is not a granet_fx archive or a PyTorch checkpoint "
                       "(truncated, or a file from another tool)")
    if args.input_shape is None:
        raise UsageError("--input-shape is required for a checkpoint (the model's input shape, e.g. 1,3,32,32)")
    shapes = [_parse_shape(s) for s in args.input_shape]
    try:
        checked = _checked_torch_zip(args.model, data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol: the error says what matters
            obj = torch.load(io.BytesIO(checked), weights_only=True, map_location="cpu")
        kind = "state_dict"
    except UsageError:
        raise
    except Exception as e:
        if not _holds_python_objects(data, e):
            raise UsageError(f"{args.model} is a damaged PyTorch checkpoint: {first_line(e)}") from None
        if not args.trust_pickle:
            raise UsageError(f"{args.model} holds pickled Python objects (a whole module?); loading it would run "
                           "code from the file: pass --trust-pickle only if you trust it, or save a state_dict") from None
        obj = _load_pickle(args.model, data)
        kind = "pickled module"
    if kind == "state_dict":
        if not args.factory:
            raise UsageError(f"{args.model} is a state_dict: pass --model package.module:factory to build the model")
        module = _module_from_state_dict(args.model, obj, args.factory)
    else:
        if args.factory:
            raise UsageError("--model applies to a state_dict; this checkpoint holds a whole module")
        module = obj
    module.eval()
    generator = torch.Generator().manual_seed(0)
    inputs = tuple(torch.randn(shape, generator=generator) for shape in shapes)
    try:
        with torch.no_grad():
            names, reference = named_outputs(module(*inputs))
    except Exception as e:
        shown = " and ".join(",".join(map(str, s)) for s in shapes)
        raise UsageError(f"the model does not take input shape {shown}: {first_line(e)}") from None
    return Source(kind, module, None, False, inputs, reference, names, plain_layer_reports(module, inputs))


def _checked_torch_zip(path: str, data: bytes) -> bytes:
    """A torch.save zip rebuilt from its checked entries (see safe_zip), or a legacy pickle stream as it is."""
    if data[:4] != b"PK\x03\x04":
        return data
    try:
        return write_entries(read_entries(data))
    except ZipProblem as e:
        raise UsageError(f"{path} is not a valid PyTorch checkpoint: {e}") from None


def _is_torch_file(data: bytes) -> bool:
    """A torch.save zip archive, or a pickle stream (torch.save's legacy format, or a plain pickle)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            return any(n.endswith("/data.pkl") for n in z.namelist())
    except zipfile.BadZipFile:
        pass
    return data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # PROTO 2-5


def _holds_python_objects(data: bytes, error: Exception) -> bool:
    """Whether torch.load(weights_only=True) refused ``data`` because it holds pickled Python objects.

    True when the pickle parses and names Python callables (GLOBAL/STACK_GLOBAL)
    that the weights-only unpickler does not allow; False for a damaged file.
    """
    if "Unsupported global" in str(error):
        return True
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            stream = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    except (zipfile.BadZipFile, StopIteration, KeyError, OSError):
        stream = data
    names = set()
    try:
        for opcode, _, _ in pickletools.genops(stream):
            names.add(opcode.name)
    except Exception:
        return False
    return bool(names & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"})


def _load_pickle(path: str, data: bytes) -> nn.Module:
    try:
        obj = torch.load(io.BytesIO(data), weights_only=False, map_location="cpu")
    except Exception as e:
        raise UsageError(f"cannot unpickle {path}: {first_line(e)}") from None
    if not isinstance(obj, nn.Module):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _module_from_state_dict(path: str, state: object, factory: str) -> nn.Module:
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UsageError(f"{path} holds a {type(state).__name__}, not a state_dict (a dict of tensors)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise UsageError(f"{path}: {bad} holds NaN or infinite values; refusing to export it")
    module = _call_factory(factory)
    masks = {k[: -len(MASK_SUFFIX)]: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    masks = {k: v for k, v in masks.items() if k in state}
    mask_keys = {k + MASK_SUFFIX for k in masks}
    weights = {k: v for k, v in state.items() if k not in mask_keys}
    try:
        module.load_state_dict(weights)
    except RuntimeError as e:
        raise UsageError(f"{path} does not fit {factory}(): {first_line(e)} {_rest(e)}".strip()) from None
    with torch.no_grad():
        for name, mask in masks.items():
            try:
                module.get_parameter(name).mul_(mask)
            except (AttributeError, RuntimeError) as e:
                raise UsageError(f"{path}: {name}{MASK_SUFFIX} does not fit {name}: {first_line(e)}") from None
    return module


def _rest(e: Exception) -> str:
    lines = [line.strip() for line in str(e).strip().splitlines()[1:] if line.strip()]
    return " ".join(lines)[:300]


def _call_factory(spec: str) -> nn.Module:
    match = re.fullmatch(r"([\w.]+):([\w.]+)", spec)
    if not match:
        raise UsageError(f"--model must look like package.module:factory; got {spec!r}")
    module_name, attr = match.groups()
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except ImportError as e:
        raise UsageError(f"--model {spec}: cannot import {module_name}: {first_line(e)}") from None
    except AttributeError:
        raise UsageError(f"--model {spec}: {module_name} has no {attr}") from None
    try:
        model = obj()
    except Exception as e:
        raise UsageError(f"--model {spec}: calling it failed: {first_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"--model {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise UsageError(f"--input-shape must be positive integers separated by commas, e.g. 1,3,32,32; got {text!r}")
    return shape


# The summary -------------------------------------------------------------------
def summary(source: Source, dense_bytes: int, sparse_bytes: int, sparse_names: list[str], dense_only: bool) -> str:
    rows = [("layer", "kind", "shape", "weights", "density")]
    for l in source.layers:
        rows.append((l.name, l.kind, "x".join(map(str, l.shape)), f"{l.numel:,}",
                     f"{l.density:.4f}" + ("" if l.masked else " (dense)")))
    lines = columns(rows, rule=True)
    masked = [l for l in source.layers if l.masked]
    if masked:
        sparsity = global_sparsity(source.layers)
        counted = "kept by the masks" if source.kind.startswith("granet_fx archive (sparse") else "nonzero"
        lines.append(f"global density {1 - sparsity:.4f} ({counted}; sparsity {sparsity:.4f}) "
                     f"over {len(masked)} conv/linear weights")
    flops = inference_flops(source.layers)
    if flops is not None and any(l.macs for l in source.layers):
        lines.append(f"inference FLOPs {flops:.4f} x dense (conv/linear multiply-accumulates)")
    lines.append("")
    stored = "dense (--dense-initializers)" if dense_only else f"weights stored sparse: {len(sparse_names)}"
    lines += columns([
        ("ONNX file", "bytes", "x dense"),
        ("dense weights", f"{dense_bytes:,}", "1.000"),
        ("written", f"{sparse_bytes:,}", f"{sparse_bytes / dense_bytes:.3f}  ({stored})"),
    ], rule=True)
    return "\n".join(lines)


if __name__ == "__main__":
    console()
