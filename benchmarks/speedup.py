"""onnxruntime speedup of channel-pruned, compacted ResNet-18s over the dense one, next to the FLOPs ratio.

    python benchmarks/speedup.py            # writes benchmarks/results/speedup.txt and speedup.json

A CIFAR ResNet-18 (32x32 inputs) is pruned one-shot to each channel sparsity
by the GraNet controller (granularity="channel", global L2 ranking of the
channels of the untrained weights: the speed depends on the layer widths that
result, not on the weight values), compacted with granet_fx.compact, and
exported with the dense model to ONNX (torch.onnx.export, dynamo, dynamic
batch). granet-bench's measurement then runs dense and compacted alternately
at each batch size. The FLOPs ratio (dense / compacted, counted in the ONNX
graphs) is the speedup that removing channels can give at most; the target is
a measured speedup of at least 0.9 x the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile

import torch

import granet_fx as gf
from granet_fx.export.archive import export_program
from granet_fx.export.bench import format_table, machine, run
from granet_fx.export.onnx_export import to_onnx
from granet_fx.models import resnet18
from granet_fx.report import columns

from common import command, write_outputs

TARGET = 0.9


def prune_channels(model: torch.nn.Module, sparsity: float, multiple: int, x: torch.Tensor) -> torch.nn.Module:
    """``model`` with ``sparsity`` of its removable output channels masked by one controller step."""
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1,
                             prune_end=1, update_every=1, channel_multiple=multiple)
    model = gf.sparsify(model, config, example_inputs=(x,))
    granet = gf.GraNet(model, torch.optim.SGD(model.parameters(), lr=0.0))
    granet.step()
    return model


def export(model: torch.nn.Module, x: torch.Tensor, path: str) -> None:
    """ONNX with a dynamic batch, the way granet-export writes it."""
    program, _ = export_program(model.eval(), (x,), dynamic_batch=True)
    with open(path, "wb") as f:
        f.write(to_onnx(program).SerializeToString())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", default="0.5,0.75", help="channel sparsities (default 0.5,0.75)")
    parser.add_argument("--multiple", default="1,8",
                        help="channel_multiple values: layers keep a multiple of this many channels (default 1,8)")
    parser.add_argument("--batch", default="1,32", help="batch sizes (default 1,32)")
    parser.add_argument("--threads", default="2", help="onnxruntime thread counts, for example 1,2 (default 2)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (default 64: 11M parameters)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "speedup"),
                        help="output path without extension (default benchmarks/results/speedup)")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(max(threads))
    torch.manual_seed(0)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    multiples = [int(k) for k in args.multiple.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    x = torch.randn(1, 3, 32, 32)
    dense = resnet18(width=args.width).eval()

    cmd = command()
    m = machine()
    lines = [
        f"$ {cmd}",
        f"ResNet-18 (CIFAR, 32x32, width {args.width}), onnxruntime on {m['cpu']} ({m['logical_cpus']} logical CPUs), "
        f"warm-up {args.warmup}, {args.runs} timed runs, dense and compacted run alternately",
        "",
    ]
    rows = [("channel sparsity", "multiple", "threads", "batch", "dense ms", "compacted ms", "speedup", "FLOPs ratio",
             "speedup / FLOPs ratio", f">= {TARGET}")]
    details = []    # what compaction did, once per (sparsity, multiple)
    results = {"command": cmd, "machine": m, "width": args.width, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        dense_path = os.path.join(tmp, "dense.onnx")
        export(dense, x, dense_path)
        for sparsity in sparsities:
            for multiple in multiples:
                sparse = prune_channels(copy.deepcopy(dense), sparsity, multiple, x)
                compacted = gf.compact(sparse, x)
                report = gf.compaction_report(compacted)
                widths = [m.out_channels for m in compacted.modules() if isinstance(m, torch.nn.Conv2d)]
                print(report, file=sys.stderr)
                details += ["", f"channel sparsity {sparsity}, channel_multiple {multiple}:", str(report),
                            f"conv output channels: {widths}"]
                path = os.path.join(tmp, f"compacted_{sparsity}_{multiple}.onnx")
                export(compacted, x, path)
                for n in threads:
                    bench = run([path], dense_path, batches, n, args.warmup, args.runs)
                    for entry in bench["models"]:  # the files lived in a temporary folder
                        entry["path"] = os.path.basename(entry["path"])
                    print(format_table(bench), file=sys.stderr)
                    flops_ratio = bench["models"][0]["flops_ratio"]
                    for r in bench["results"]:
                        compacted_ms, dense_ms = (stats["median_ms"] for stats in r["latency"])
                        speedup = r["speedup"][0]
                        ratio = speedup / flops_ratio
                        rows.append((f"{sparsity:.2f}", str(multiple), str(n), str(r["batch"]),
                                     f"{dense_ms:.2f}", f"{compacted_ms:.2f}",
                                     f"{speedup:.2f}x", f"{flops_ratio:.2f}x", f"{ratio:.2f}",
                                     "yes" if ratio >= TARGET else "NO"))
                    results["runs"].append({"channel_sparsity": sparsity, "channel_multiple": multiple, "threads": n,
                                            "compaction": str(report), "conv_widths": widths,
                                            "pytorch_flops_ratio": 1 / report.flops_ratio,
                                            "bench": bench})
    lines += columns(rows)
    lines += ["", "speedup = dense median latency / compacted median latency; FLOPs ratio = dense / compacted "
              "FLOPs counted in the ONNX graphs (the limit)"]
    lines += details
    write_outputs(args.out, "\n".join(lines) + "\n", results)


if __name__ == "__main__":
    main()
