"""What one exact selection pass costs at the least when it is written with eager torch ops, against the
mask update's budget (issue 11: an update within 4x of the bandwidth limit).

An exact selection (``criteria._pick``) must look at every entry of the pool once: compute the key
(``|w|`` or ``|g|``), compare it with the bracket, and gather the few entries inside the bracket (their
positions, to clear or keep them). This script times those primitives in eager torch on slices of
2^18 float32 entries (the size ``criteria`` works in, so that they stay in cache), median of many slices,
on ``--threads`` threads, and the machine's copy bandwidth (as ``mask_update.py`` measures it). It prints

- each primitive's cost in ns per entry;
- the cheapest pass that still gathers: abs + one comparison + the cheapest way to find positions
  (``nonzero`` at 4% True, the bracket's usual share; a boolean index, a ``masked_select``, a
  ``bincount`` or a ``histc`` instead are listed beside it);
- the budget: 4 x 26 B per weight (``mask_update.py``'s byte model) over the bandwidth, in ns per
  weight, against three such passes (a prune-and-regrow update selects three times: global pruning,
  the drop, the regrowth) plus the re-masking of the weight and its momentum (16 B per weight at the
  copy bandwidth).

    python benchmarks/selection_primitives.py   # writes results/selection_primitives.{txt,json}
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from common import command, machine, write_outputs
from mask_update import bandwidth

SLICE = 1 << 18
BYTES_PER_WEIGHT = 26      # mask_update.py's byte model
TARGET = 4.0


def per_entry(fn, data: torch.Tensor, repeats: int) -> float:
    """Median ns per entry of ``fn(slice)`` over ``repeats`` consecutive slices of ``data``."""
    slices = [data[i * SLICE:(i + 1) * SLICE] for i in range(data.numel() // SLICE)]
    fn(slices[0])
    times = []
    for r in range(repeats):
        part = slices[r % len(slices)]
        start = time.perf_counter()
        fn(part)
        times.append(time.perf_counter() - start)
    return statistics.median(times) / SLICE * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, as mask_update.py)")
    parser.add_argument("--repeats", type=int, default=200, help="slices timed per primitive (default 200)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "selection_primitives"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = torch.randn(64 * SLICE)
    keys = weights.abs()
    pool = torch.rand(64 * SLICE) < 0.5
    inside = (keys > 0.60) & (keys < 0.66)       # about 4% of a normal's magnitudes
    rare = keys > 3.3                             # about 0.1%
    flags, buffer = torch.empty(SLICE), torch.empty(SLICE)
    bins = (keys * 1000).long().clamp_(0, 4095)
    n = args.repeats
    cost = {
        "abs into a buffer": per_entry(lambda s: torch.abs(s, out=buffer), weights, n),
        "compare, float 0/1 out": per_entry(lambda s: torch.le(s, 0.5, out=flags), keys, n),
        "compare, bool out": per_entry(lambda s: torch.le(s, 0.5), keys, n),
        "float 0/1 to bool": per_entry(lambda s: torch.empty(SLICE, dtype=torch.bool).copy_(flags), keys, n),
        "and with the pool (bool)": per_entry(lambda s: torch.logical_and(s, s), pool, n),
        "count_nonzero (bool)": per_entry(torch.count_nonzero, pool, n),
        "nonzero, 0.1% True": per_entry(torch.nonzero, rare, n),
        "nonzero, 4% True": per_entry(torch.nonzero, inside, n),
        "nonzero, 50% True": per_entry(torch.nonzero, pool, n),
        "boolean index, 4% True": per_entry(lambda s: buffer[s], inside, n),
        "masked_select, 4% True": per_entry(lambda s: torch.masked_select(buffer, s), inside, n),
        "bincount, 4096 bins": per_entry(lambda s: torch.bincount(s, minlength=4096), bins, n),
        "histc, 4096 bins": per_entry(lambda s: torch.histc(s, 4096, 0.6, 0.66), keys, n),
    }
    gather = min(cost[k] for k in ("nonzero, 4% True", "boolean index, 4% True", "masked_select, 4% True",
                                   "bincount, 4096 bins", "histc, 4096 bins"))
    one_pass = cost["abs into a buffer"] + cost["compare, float 0/1 out"] + gather
    best = bandwidth(512)
    budget = TARGET * BYTES_PER_WEIGHT / best * 1e9
    remask = 16 / best * 1e9
    floor = 3 * one_pass + remask

    lines = [f"$ {command()}", machine(),
             f"slices of {SLICE:,} float32 entries (in cache), median of {n} slices per primitive", "",
             f"{'primitive':32s} ns per entry"]
    lines += [f"{k:32s} {v:6.2f}" for k, v in cost.items()]
    lines += ["",
              f"copy bandwidth: {best / 1e9:.1f} GB/s (best of 10 copies of 512 MiB)",
              f"cheapest gather of a bracket's entries: {gather:.2f} ns per entry",
              f"one selection pass at the least (abs + compare + gather): {one_pass:.2f} ns per entry",
              f"a prune-and-regrow update, 3 passes + re-masking weight and momentum (16 B at the bandwidth): "
              f"{floor:.2f} ns per weight",
              f"budget at {TARGET:g}x the bandwidth limit ({BYTES_PER_WEIGHT} B per weight): {budget:.2f} ns per weight",
              f"floor / budget: {floor / budget:.2f}"]
    data = {"command": command(), "machine": machine(), "slice": SLICE, "ns_per_entry": cost,
            "bandwidth_bytes_per_s": best, "gather_ns": gather, "pass_ns": one_pass, "update_floor_ns": floor,
            "budget_ns": budget}
    write_outputs(args.out, "\n".join(lines) + "\n", data)


if __name__ == "__main__":
    main()
