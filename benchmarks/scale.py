"""Mask-update time and mask memory at GPT-2-small size, next to the time of a training step.

Builds GPT-2 small (124M parameters, 85M of them in the 48 masked Conv1D
weights; the tied embedding and output layer stays dense) from its config with
random weights, no download. Then, side by side in one run on ``--threads``
CPU threads, it walks a GraNet schedule (dense-to-sparse to 90% over 1000
steps, an update every 100, pruning until step 500) from update to update and
times:

- each of the nine mask updates, ``granet.step()`` at an update step: global
  magnitude pruning along the cubic schedule plus drop-and-regrow in every
  layer (the first five), or drop-and-regrow alone (the last four),
- one eager training step (forward, backward, SGD with momentum) at each
  batch, before each update (median, the first one a warm-up),
- the re-masking that ``granet.step()`` does after every optimizer step
  (``apply_masks``: weights and momentum times mask),

and the bytes of mask per masked weight.

    python benchmarks/scale.py            # writes results/scale.{txt,json}
    python benchmarks/scale.py --quick    # a 2-layer GPT-2, a smoke test; writes nothing
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers

import granet_fx as gf

from common import command, machine, write


TOTAL, EVERY = 1000, 100     # nine updates: five that prune and regrow, four that only regrow


def gpt2(quick: bool) -> torch.nn.Module:
    """GPT-2 small (or a 2-layer, 128-wide one) with random weights."""
    size = dict(n_layer=2, n_embd=128, n_head=2) if quick else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False, **size))


def batch_size(text: str) -> tuple[int, int]:
    try:
        rows, tokens = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch must be ROWSxTOKENS, like 4x512; got {text!r}") from None
    if rows < 1 or not 2 <= tokens <= 1024:
        raise argparse.ArgumentTypeError(f"batch needs rows >= 1 and 2 <= tokens <= 1024; got {text!r}")
    return rows, tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=batch_size, nargs="+", default=[(1, 128), (8, 128)],
                        help="training batches as ROWSxTOKENS (default 1x128 8x128)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer GPT-2, a smoke test; writes nothing")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = gf.GraNetConfig(final_sparsity=0.9, total_steps=TOTAL, update_every=EVERY, prune_end=TOTAL // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the tied embedding/output weight stays dense
        model = gf.sparsify(gpt2(args.quick), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    granet = gf.GraNet(model, optimizer)
    masked_layers = gf.sparse_info(model).masked
    masked = sum(l.numel for l in masked_layers)
    mask_bytes = sum(model.get_buffer(l.mask_name).nbytes for l in masked_layers)
    parameters = sum(p.numel() for p in model.parameters())

    def train_step(rows: int, tokens: int) -> None:
        ids = torch.randint(0, model.config.vocab_size, (rows, tokens))
        logits = model(ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def timed(fn, *a) -> float:
        start = time.perf_counter()
        fn(*a)
        return time.perf_counter() - start

    # Walk the schedule from update to update; the training steps in between change nothing measured here.
    step_times = {b: [] for b in args.batches}
    updates, remask_times = [], []
    for t in range(EVERY, TOTAL, EVERY):
        granet.load_state_dict({**granet.state_dict(), "step": t - 1})
        for b in args.batches:
            step_times[b].append(timed(train_step, *b))
        # the last batch's gradient is still there for regrowth
        seconds = timed(granet.step)
        updates.append({"step": t, "kind": "prune + regrow" if t <= TOTAL // 2 else "regrow",
                        "regrow_fraction": granet.regrow_fraction(t),
                        "sparsity_after": granet.report().global_sparsity, "seconds": seconds})
        remask_times.append(timed(granet.apply_masks))
        print(f"step {t}: {updates[-1]['kind']}, sparsity {updates[-1]['sparsity_after']:.3f}, "
              f"{seconds:.2f} s", flush=True)

    steps = {f"{r}x{t}": statistics.median(v[1:]) for (r, t), v in step_times.items()}   # first: warm-up
    update = statistics.median(u["seconds"] for u in updates)
    slowest = max(u["seconds"] for u in updates)
    remask = statistics.median(remask_times[1:])
    data = {
        "command": command(),
        "machine": machine(),
        "model": ("a 2-layer GPT-2" if args.quick else "GPT-2 small") + " from GPT2Config, random weights, eager",
        "parameters": parameters,
        "masked_weights": masked,
        "mask_bytes": mask_bytes,
        "mask_bytes_per_masked_weight": mask_bytes / masked,
        "schedule": f"granet, dense-to-sparse to 0.9, total_steps={TOTAL}, update_every={EVERY}, "
                    f"prune_end={TOTAL // 2}",
        "updates": updates,
        "update_median_s": update,
        "update_max_s": slowest,
        "remask_median_s": remask,
        "train_step_median_s": steps,
        "update_median_over_train_step": {k: update / v for k, v in steps.items()},
        "update_max_over_train_step": {k: slowest / v for k, v in steps.items()},
        "remask_over_train_step": {k: remask / v for k, v in steps.items()},
    }
    lines = [
        f"# {data['command']}",
        f"# {data['machine']}",
        f"{data['model']}: {parameters / 1e6:.1f}M parameters, {masked / 1e6:.1f}M in masked weights",
        f"mask memory: {mask_bytes / 2**20:.1f} MiB, {data['mask_bytes_per_masked_weight']:.3f} byte per masked weight",
        f"schedule: {data['schedule']}",
        "",
        "step  update          regrow fraction  sparsity after  seconds",
    ]
    for u in updates:
        lines.append(f"{u['step']:<5} {u['kind']:<15} {u['regrow_fraction']:<16.3f} {u['sparsity_after']:<15.3f} "
                     f"{u['seconds']:.3f}")
    lines += [
        "",
        f"mask update: median {update:.3f} s, slowest {slowest:.3f} s",
        f"re-masking after every step (weights and momentum): median {remask:.3f} s",
    ]
    for key, step in steps.items():
        lines.append(f"training step at batch {key} tokens: median {step:.3f} s; update / step: median "
                     f"{update / step:.2f}, slowest {slowest / step:.2f}; re-masking / step {remask / step:.3f}")
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if not args.quick:
        write("scale", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
