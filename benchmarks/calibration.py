"""What ``channel_multiple="measured"`` sees: onnxruntime times of each channel group's layers by width.

    python benchmarks/calibration.py      # writes benchmarks/results/calibration.txt and .json
    python benchmarks/calibration.py --models resnet18 --groups 0 --out /tmp/calibration

For each model of ``speedup.py`` (random weights) and each removable channel
group, the calibration's measurement (granet_fx.export.calibrate, one
onnxruntime thread, no cache): the group's size, the width it keeps at
``--sparsity``, the times of its layers at ``base + p`` channels for every
period p, and the multiple chosen. For the groups named by ``--groups``
(indices, default the first of each model) it also times every width from
``base + 1`` to ``base + 32``, which shows the staircase the rule reads.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

import granet_fx as gf
from granet_fx.export import calibrate
from granet_fx.passes.channel_groups import named_tensors
from granet_fx.sparsify import sparse_info
from granet_fx.structured import ChannelMasks

from common import choices, command, machine, write_outputs
from speedup import MODELS, build


def groups_of(name: str, sparsity: float):
    """(tensors, the removable channel groups) of model ``name`` made ready for channel GraNet."""
    _, model, x = build(name, 64)
    config = gf.GraNetConfig(method="gmp", granularity="channel", final_sparsity=sparsity, total_steps=1)
    model = gf.sparsify(copy.deepcopy(model), config, example_inputs=(x,))
    info = sparse_info(model)
    return named_tensors(model), ChannelMasks(model, info.channel_groups, [l.name for l in info.masked]).groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=choices(MODELS), default=list(MODELS))
    parser.add_argument("--sparsity", type=float, default=0.5, help="channel sparsity (default 0.5)")
    parser.add_argument("--groups", default="0", help="groups timed at every width (indices; default 0)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "calibration"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [f"$ {command()}", f"{machine()}; onnxruntime 1 thread; times are medians of {calibrate.RUNS} runs "
             f"in ms; a multiple is the smallest p from which every measured width base + q (q >= p) is efficient "
             f"(each wider width costs at least {calibrate.GAIN} x its proportional share more)", ""]
    found = []
    for name in args.models:
        tensors, groups = groups_of(name, args.sparsity)
        for i, g in enumerate(groups):
            shapes = calibrate.group_shapes(tensors, g)
            kept = calibrate.kept_channels(g.size, 1 - args.sparsity)
            base, largest, widths = calibrate.measured_widths(kept, g.size)
            times = calibrate.time_widths(shapes, widths)
            multiple = calibrate.period(times, base, largest)
            lines.append(f"{name} group {i}: {g.size} channels, {len(shapes)} layers, keeps {kept}; "
                         + "  ".join(f"{w}: {1e3 * times[w]:.3f}" for w in widths) + f"  -> multiple {multiple}")
            entry = {"model": name, "group": i, "size": g.size, "kept": kept, "layers": len(shapes),
                     "ms": {w: 1e3 * t for w, t in times.items()}, "multiple": multiple}
            if str(i) in args.groups.split(","):
                every = calibrate.time_widths(shapes, list(range(base + 1, base + 33)))
                lines.append("  every width: " + "  ".join(f"{w}: {1e3 * t:.3f}" for w, t in every.items()))
                entry["every_ms"] = {w: 1e3 * t for w, t in every.items()}
            found.append(entry)
            print(lines[-1], file=sys.stderr)
    write_outputs(args.out, "\n".join(lines) + "\n", {"command": command(), "machine": machine(), "groups": found})


if __name__ == "__main__":
    main()
