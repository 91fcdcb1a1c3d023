"""Time to find channel groups and compact a channel-pruned model, granet_fx against Torch-Pruning, side by side.

    python benchmarks/compaction_time.py    # writes benchmarks/results/compaction_time.txt and .json

Each model (CIFAR ResNet-18, the small MobileNetV2, a random-weight
HuggingFace ConvNeXt on 64x64 images) is pruned one-shot by the GraNet
controller (granularity="channel", 50% channel sparsity, one step), then:

- granet_fx: the channel analysis that ``gf.sparsify`` runs for
  granularity="channel" (``channel_groups``: capture the model's graph and
  walk it), timed inside ``gf.sparsify``, and ``gf.compact`` (from the masked
  model to the compacted copy: fold the masks into a copy, capture, plan,
  slice, check the outputs against the masked model's);
- Torch-Pruning (benchmark-only dependency): ``DependencyGraph`` built on a
  fresh copy of the dense model, then exactly the output channels granet_fx
  removed are pruned, group by group (its pruning is its compaction: in place).

Both compacted models must have the same parameter and buffer shapes (the
output says so, or lists the differences). Every repetition uses fresh
models; times are medians over the repetitions after one warm-up, and the
first call of each (in a fresh interpreter that has imported both libraries,
nothing else run) is reported on its own, since a user pays it once per
process. torch runs on one thread by default: on a shared 2-core machine a
2-thread forward pass took up to 100x longer whenever another process was
busy, which drowns what is measured here (``--threads 2`` to see it).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import statistics
import sys
import time

import torch

import granet_fx as gf
from granet_fx.models import MobileNetV2, resnet18
from granet_fx import structured
from granet_fx.report import columns
from granet_fx.sparsify import sparse_info
from granet_fx.structured import ChannelMasks

from common import command, machine, write_outputs

TARGET = 2.0
SPARSITY = 0.5


def convnext() -> tuple[torch.nn.Module, torch.Tensor]:
    """A small random-weight HF ConvNeXt (as in speedup.py): 64x64 images, widths 48-384, two blocks a stage."""
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(image_size=64, hidden_sizes=[48, 96, 192, 384], depths=[2, 2, 2, 2], num_labels=10)
    return ConvNextForImageClassification(config).eval(), torch.randn(1, 3, 64, 64)


MODELS = {
    "ResNet-18 (CIFAR)": lambda: (resnet18().eval(), torch.randn(1, 3, 32, 32)),
    "MobileNetV2 (CIFAR)": lambda: (MobileNetV2().eval(), torch.randn(1, 3, 32, 32)),
    "ConvNeXt (HF, 64x64)": convnext,
}


@contextlib.contextmanager
def timing(module, name: str, spent: list[float]):
    """Add the time spent in calls to ``module.name`` to ``spent[0]``."""
    original = getattr(module, name)

    def timed_call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    setattr(module, name, timed_call)
    try:
        yield
    finally:
        setattr(module, name, original)


def prune(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.nn.Module, float, float]:
    """``model`` sparsified with channel granularity and pruned to ``SPARSITY`` by one controller step;
    the time of ``gf.sparsify`` and of the channel analysis inside it."""
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=SPARSITY, total_steps=1,
                             prune_end=1, update_every=1)
    analysis = [0.0]
    start = time.perf_counter()
    with timing(structured, "channel_groups", analysis):
        sparse = gf.sparsify(model, config, example_inputs=(x,))
    total = time.perf_counter() - start
    gf.GraNet(sparse, torch.optim.SGD(sparse.parameters(), lr=0.0)).step()
    return sparse, total, analysis[0]


def pruned_rows(sparse: torch.nn.Module) -> dict[str, list[int]]:
    """Per weight (state_dict name) whose output channels the controller pruned: those channels.

    One entry per channel group, its first non-depthwise row: pruning it prunes the whole group."""
    info = sparse_info(sparse)
    masks = ChannelMasks(sparse, info.channel_groups, [l.name for l in info.masked])
    rows = {}
    for group, keep in zip(masks.groups, masks.keeps()):
        gone = (~keep).nonzero().squeeze(1)
        if len(gone):
            row = next(r for r in group.rows if not r.depthwise)
            rows[row.weight] = (row.offset + gone).tolist()
    return rows


def tp_compact(model: torch.nn.Module, x: torch.Tensor, rows: dict[str, list[int]]) -> torch.nn.Module:
    """Torch-Pruning: dependency graph of ``model``, then the given output channels pruned group by group."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(
        model, example_inputs=x, output_transform=lambda out: out.logits if hasattr(out, "logits") else out)
    for weight, idxs in rows.items():
        module = model.get_submodule(weight.rpartition(".")[0])
        fn = tp.prune_linear_out_channels if isinstance(module, torch.nn.Linear) else tp.prune_conv_out_channels
        group = graph.get_pruning_group(module, fn, idxs=idxs)
        group.prune()
    return model


def shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return {name: tuple(t.shape) for name, t in tensors.items() if not name.endswith("num_batches_tracked")}


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure(name: str, repeats: int) -> dict:
    """First-call and median warm times of granet_fx's analysis and compaction and of Torch-Pruning."""
    runs = []
    for rep in range(repeats + 2):   # the first call, a warm-up, then the timed repetitions
        torch.manual_seed(rep)
        dense, x = MODELS[name]()
        tp_model = copy.deepcopy(dense)
        sparse, sparsify, analysis = prune(dense, x)
        rows = pruned_rows(sparse)
        ours, compaction = timed(lambda: gf.compact(sparse, x))
        theirs, torch_pruning = timed(lambda: tp_compact(tp_model, x, rows))
        a, b = shapes(ours), shapes(theirs)
        differences = sorted(f"{k}: granet_fx {a.get(k)}, Torch-Pruning {b.get(k)}" for k in a.keys() | b.keys()
                             if a.get(k) != b.get(k))
        runs.append({"sparsify_s": sparsify, "analysis_s": analysis, "compact_s": compaction, "torch_pruning_s": torch_pruning,
                     "removed_channels": gf.compaction_report(ours).removed, "shape_differences": differences})
        print(f"{name}, repetition {rep}: analysis {analysis:.3f} s, compact {compaction:.3f} s, "
              f"Torch-Pruning {torch_pruning:.3f} s", file=sys.stderr)
    warm = runs[2:]
    median = {k: statistics.median(r[k] for r in warm) for k in runs[0]
              if k.endswith("_s")}
    return {"model": name, "first": runs[0], "warm": median, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions after the warm-up (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see the docstring)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compaction_time"),
                        help="output path without extension (default benchmarks/results/compaction_time)")
    parser.add_argument("--worker", choices=list(MODELS), help=argparse.SUPPRESS)  # one model, JSON to stdout
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        start = time.perf_counter()
        import torch_pruning  # noqa: F401  (imported before the first call: not part of its time)
        import transformers  # noqa: F401

        imports = time.perf_counter() - start
        print(json.dumps(dict(measure(args.worker, args.repeats), imports_s=imports)))
        return
    cmd = command()
    load = os.getloadavg()[0]
    results = []
    for name in MODELS:   # each model in a fresh interpreter, so that its first call is a real first call
        worker = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats),
                  "--threads", str(args.threads)]
        results.append(json.loads(subprocess.run(worker, check=True, stdout=subprocess.PIPE, text=True).stdout))
    rows = [("model", "call", "sparsify s", "analysis s", "compact s", "granet_fx s", "Torch-Pruning s",
             "ours / TP", f"<= {TARGET}", "compact / TP")]
    for r in results:
        for call, t in (("first", r["first"]), ("warm", r["warm"])):
            total = t["analysis_s"] + t["compact_s"]
            ratio = total / t["torch_pruning_s"]
            rows.append((r["model"], call, f"{t['sparsify_s']:.3f}", f"{t['analysis_s']:.3f}", f"{t['compact_s']:.3f}", f"{total:.3f}",
                         f"{t['torch_pruning_s']:.3f}", f"{ratio:.2f}", "yes" if ratio <= TARGET else "NO",
                         f"{t['compact_s'] / t['torch_pruning_s']:.2f}"))
    lines = [f"$ {cmd}",
             f"{machine()}; load average (1 min) before / after: {load:.1f} / {os.getloadavg()[0]:.1f}",
             f"channel sparsity {SPARSITY} (one controller step, granularity='channel'); first call, then the median "
             f"of {args.repeats} repetitions after one warm-up, fresh models each time; each model in a fresh "
             "interpreter (first = its first call there, after importing granet_fx, torch_pruning and transformers: "
             + ", ".join(f"{r['imports_s']:.1f} s" for r in results) + " for those two imports)", ""]
    lines += columns(rows)
    lines += ["", "sparsify = gf.sparsify(model, granularity='channel', example_inputs); analysis = the channel "
              "analysis inside it (granet_fx.structured.channel_groups: graph capture and walk); "
              "compact = gf.compact(masked model); granet_fx = analysis + compact; Torch-Pruning = "
              "DependencyGraph.build_dependency + pruning the same output channels (get_pruning_group + prune); "
              "ours / TP = granet_fx / Torch-Pruning", ""]
    for r in results:
        diffs = {d for run in r["runs"] for d in run["shape_differences"]}
        removed = r["runs"][-1]["removed_channels"]
        lines.append(f"{r['model']}: {removed} channels removed; compacted layer shapes "
                     + ("identical in granet_fx and Torch-Pruning" if not diffs else "DIFFER:"))
        lines += [f"  {d}" for d in sorted(diffs)]
    write_outputs(args.out, "\n".join(lines) + "\n",
                  {"command": cmd, "machine": machine(), "load_average": load,
                   "sparsity": SPARSITY, "repeats": args.repeats, "models": results})


if __name__ == "__main__":
    main()
