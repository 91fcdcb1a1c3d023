"""Mask-update time and mask memory at GPT-2-small size, next to the time of a training step.

Builds GPT-2 small (124M parameters, 85M of them in the 48 masked Conv1D
weights; the tied embedding and output layer stays dense) from its config with
random weights, no download. Then, side by side in one run, medians over
``--repeats`` after one warm-up round, on ``--threads`` CPU threads:

- one eager training step (forward, backward, SGD with momentum) at each batch,
- one mask update, ``granet.step()`` at an update step: global magnitude
  pruning along the cubic schedule plus drop-and-regrow in every layer
  (dense-to-sparse GraNet to 90%, one update per step, so each measured update
  prunes further and regrows about half of every layer's weights),
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=batch_size, nargs="+", default=[(1, 128), (8, 128)],
                        help="training batches as ROWSxTOKENS (default 1x128 8x128)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer GPT-2, a smoke test; writes nothing")
    args = parser.parse_args()
    if args.threads < 1 or args.repeats < 1:
        parser.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    warmup = 1
    rounds = warmup + args.repeats
    config = gf.GraNetConfig(final_sparsity=0.9, total_steps=100 * rounds, update_every=1, prune_end=rounds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # the tied embedding/output weight stays dense
        model = gf.sparsify(gpt2(args.quick), config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    granet = gf.GraNet(model, optimizer)
    masks = list(granet.masks().values())
    masked = sum(m.numel() for m in masks)
    mask_bytes = sum(model.get_buffer(l.mask_name).nbytes for l in gf.sparse_info(model).masked)
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

    step_times = {b: [] for b in args.batches}
    update_times, remask_times, sparsity = [], [], []
    for i in range(rounds):
        for b in args.batches:
            step_times[b].append(timed(train_step, *b))
        # the gradient of the last batch is still there: granet.step() is an update at every step here
        update_times.append(timed(granet.step))
        sparsity.append(granet.report().global_sparsity)
        remask_times.append(timed(granet.apply_masks))
        print(f"round {i + 1}/{rounds}: update {update_times[-1]:.2f} s, sparsity {sparsity[-1]:.3f}", flush=True)

    def median(values: list[float]) -> float:
        return statistics.median(values[warmup:])

    update, remask = median(update_times), median(remask_times)
    steps = {f"{r}x{t}": median(v) for (r, t), v in step_times.items()}
    data = {
        "command": command(),
        "machine": machine(),
        "model": ("a 2-layer GPT-2" if args.quick else "GPT-2 small") + " from GPT2Config, random weights, eager",
        "parameters": parameters,
        "masked_weights": masked,
        "mask_bytes": mask_bytes,
        "mask_bytes_per_masked_weight": mask_bytes / masked,
        "method": "granet, dense-to-sparse to 0.9, update_every=1",
        "sparsity_after_each_update": sparsity,
        "warmup": warmup,
        "repeats": args.repeats,
        "update_s": update,
        "remask_s": remask,
        "train_step_s": steps,
        "update_over_train_step": {k: update / v for k, v in steps.items()},
        "remask_over_train_step": {k: remask / v for k, v in steps.items()},
    }
    lines = [
        f"# {data['command']}",
        f"# {data['machine']}",
        f"{data['model']}: {parameters / 1e6:.1f}M parameters, {masked / 1e6:.1f}M in masked weights",
        f"mask memory: {mask_bytes / 2**20:.1f} MiB, {data['mask_bytes_per_masked_weight']:.3f} byte per masked weight",
        f"medians of {args.repeats} after {warmup} warm-up round",
        f"mask update (global prune + regrow): {update:.3f} s",
        f"re-masking after a step (weights and momentum): {remask:.3f} s",
    ]
    for key, step in steps.items():
        lines.append(f"training step at batch {key} tokens: {step:.3f} s; update / step = {update / step:.2f}; "
                     f"re-masking / step = {remask / step:.3f}")
    text = "\n".join(lines) + "\n"
    print()
    print(text, end="")
    if not args.quick:
        write("scale", text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
