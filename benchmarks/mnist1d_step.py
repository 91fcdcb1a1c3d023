"""Eager against torch.compile for one GraNet training step of the accuracy benchmark's model.

    python benchmarks/mnist1d_step.py     # writes results/mnist1d_step.{txt,json}

Times a full step (forward, backward, SGD step, granet.step()) of Mnist1dNet at
batch 128 with 90% GraNet masks, eager and compiled, alternating between the
two so that both see the same load; prints medians after warm-up and their
ratio, at the accuracy benchmark's thread count (1 per process) and at 2.
The accuracy benchmark trains in the faster mode.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import granet_fx as gf
from granet_fx.models import Mnist1dNet

from common import command, machine, write


def setup(compiled: bool):
    torch.manual_seed(0)
    config = gf.GraNetConfig(final_sparsity=0.9, initial_sparsity=0.5, total_steps=10**6)
    model = gf.sparsify(Mnist1dNet(), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    granet = gf.GraNet(model, optimizer)
    return (torch.compile(model) if compiled else model), optimizer, granet


def step(forward, optimizer, granet, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(forward(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    granet.step()
    return time.perf_counter() - start


def measure(threads: int, steps: int, warmup: int) -> dict[str, float]:
    """Median ms per step, eager and compiled, the two modes alternating."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 1, 40, generator=g), torch.randint(0, 10, (128,), generator=g)
    modes = {"eager": setup(False), "compiled": setup(True)}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(warmup + steps):
        for mode, state in modes.items():
            t = step(*state, x, y)
            if i >= warmup:
                times[mode].append(t)
    return {m: statistics.median(t) * 1e3 for m, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="timed steps per mode (default 300)")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per mode first (default 30)")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    lines = [f"# {command()}", f"# {machine()} by default; each row sets its own thread count",
             f"# {args.steps} timed steps per mode after {args.warmup} warm-up, eager and compiled alternating",
             "threads  eager ms/step  compiled ms/step  compiled/eager"]
    data = {"command": command(), "machine": machine(), "steps": args.steps, "warmup": args.warmup, "rows": []}
    for threads in (1, 2):
        ms = measure(threads, args.steps, args.warmup)
        ratio = ms["compiled"] / ms["eager"]
        lines.append(f"{threads:7d}  {ms['eager']:13.2f}  {ms['compiled']:16.2f}  {ratio:14.2f}")
        data["rows"].append({"threads": threads, "eager_ms": ms["eager"], "compiled_ms": ms["compiled"],
                             "compiled_over_eager": ratio})
    text = "\n".join(lines) + "\n"
    print(text, end="")
    write("mnist1d_step", text, data)


if __name__ == "__main__":
    main()
