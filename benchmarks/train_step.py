"""Training-step cost of the mask nodes and of a mask update, measured side by side.

For a CIFAR-size ResNet-18 and a transformer block at batch 64:
  * compiled masked step / compiled dense step           (target <= 1.03)
  * compiled masked step / eager step masked GraNet-style (w *= mask after each step)
For a 25M-parameter model (ResNet-18 at width 96):
  * one mask update (global magnitude pruning + regrowth) / one training step (target < 1)
  * the same at update_every=100, as a share of training time    (target < 1%)

A step is forward, backward, optimizer step and, for the sparse runs,
granet.step(). Dense, masked and eager steps take turns in a rotating order,
so that drift hits all of them; medians after warm-up.

    python benchmarks/train_step.py            # writes results/train_step.{txt,json}
    python benchmarks/train_step.py --quick    # small models, a smoke test
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import granet_fx as gf
from granet_fx.models import TransformerBlock, resnet18

from common import command, machine, median_time, write


def eager_granet_style(model, masks):
    """GraNet's own way: an eager model, weights and momentum multiplied by the mask after each step."""
    params = dict(model.named_parameters())

    def apply(optimizer):
        with torch.no_grad():
            for name, m in masks.items():
                w = params[name]
                w.mul_(m)
                buf = optimizer.state.get(w, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(m)
    return apply


def compare_steps(name, make_model, x, y, repeats, config):
    """Compiled dense, compiled masked and eager GraNet-style steps, interleaved."""
    torch.manual_seed(0)
    base = make_model()
    dense = copy.deepcopy(base)
    eager = copy.deepcopy(base)
    masked = gf.sparsify(copy.deepcopy(base), config)
    sgd = dict(lr=0.01, momentum=0.9, nesterov=True)
    opt_d = torch.optim.SGD(dense.parameters(), **sgd)
    opt_m = torch.optim.SGD(masked.parameters(), **sgd)
    opt_e = torch.optim.SGD(eager.parameters(), **sgd)
    granet = gf.GraNet(masked, opt_m)
    masks = granet.masks()
    eager.load_state_dict({k: v for k, v in masked.state_dict().items() if not k.endswith("_mask")})
    apply_eager = eager_granet_style(eager, masks)

    if y is None:  # a transformer block: regress onto a fixed target
        target = torch.randn_like(x)
        criterion = lambda out: F.mse_loss(out, target)
    else:
        criterion = lambda out: F.cross_entropy(out, y)

    def step_of(opt, forward, after):
        def step():
            loss = criterion(forward(x))
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            after()
        return step

    t0 = time.perf_counter()
    c_dense = torch.compile(dense)
    steps = {"compiled dense": step_of(opt_d, c_dense, lambda: None)}
    steps["compiled dense"]()
    compile_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    c_masked = torch.compile(masked)
    steps["compiled masked"] = step_of(opt_m, c_masked, granet.step)
    steps["compiled masked"]()
    compile_masked = time.perf_counter() - t0
    steps["eager GraNet-style"] = step_of(opt_e, eager, lambda: apply_eager(opt_e))
    for fn in steps.values():  # warm-up
        fn()
    times = {k: [] for k in steps}
    names = list(steps)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: no variant always first
            start = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": name,
        "parameters": sum(p.numel() for p in base.parameters()),
        "batch": x.shape[0],
        "repeats": repeats,
        "median_s": med,
        "first_compile_s": {"dense": compile_dense, "masked": compile_masked},
        "masked_over_dense_compiled": med["compiled masked"] / med["compiled dense"],
        "masked_compiled_over_eager_granet_style": med["compiled masked"] / med["eager GraNet-style"],
    }


def mask_update(width, batch, repeats):
    """One GraNet update (global pruning + regrowth) against one training step of the same model."""
    torch.manual_seed(0)
    config = gf.GraNetConfig(final_sparsity=0.9, total_steps=1000, update_every=1, prune_end=500)
    model = gf.sparsify(resnet18(width=width), config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    granet = gf.GraNet(model, opt)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def train_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()

    train_step()
    granet.step_count = 99  # update_every=1: every next step prunes and regrows
    update = median_time(granet.step, repeats, warmup=1)
    step = median_time(train_step, repeats, warmup=1)
    n = sum(p.numel() for p in model.parameters())
    return {
        "model": f"ResNet-18 width {width}",
        "parameters": n,
        "masked_weights": sum(m.numel() for m in granet.masks().values()),
        "batch": batch,
        "median_update_s": update,
        "median_train_step_s": step,
        "update_over_step": update / step,
        "update_share_at_update_every_100": update / (update + 100 * step),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="small models and few repeats (a smoke test)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    batch = 8 if quick else args.batch
    repeats = 3 if quick else args.repeats
    config = gf.GraNetConfig(final_sparsity=0.9, initial_sparsity=0.5, total_steps=10_000, update_every=100)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    tokens = torch.randn(batch, 16 if quick else 64, 64 if quick else 256)
    rows = [
        compare_steps("ResNet-18 (CIFAR)", lambda: resnet18(width=16 if quick else 64), x, y, repeats, config),
        compare_steps("transformer block", lambda: TransformerBlock(64 if quick else 256), tokens, None, repeats,
                      config),
    ]
    update = mask_update(16 if quick else 96, batch, max(repeats // 2, 3))

    lines = [f"# {command()}", f"# {machine()}", ""]
    lines.append(f"{'model':20} {'params':>10} {'dense':>9} {'masked':>9} {'eager-GraNet':>13}"
                 f" {'masked/dense':>13} {'masked/eager':>13}")
    for r in rows:
        m = r["median_s"]
        lines.append(f"{r['model']:20} {r['parameters']:>10,} {m['compiled dense']:>8.3f}s"
                     f" {m['compiled masked']:>8.3f}s {m['eager GraNet-style']:>12.3f}s"
                     f" {r['masked_over_dense_compiled']:>13.3f} {r['masked_compiled_over_eager_granet_style']:>13.3f}")
    lines.append("")
    lines.append("step times are medians of %d steps each at batch %d, the variants taking turns in a rotating"
                 " order (compiled = torch.compile of the forward/backward; optimizer and granet.step() eager)"
                 % (repeats, batch))
    lines.append("target: masked/dense <= 1.03; masked/eager is torch.compile's gain kept by the masked model")
    lines.append("")
    lines.append(f"mask update on {update['model']} ({update['parameters']:,} parameters, "
                 f"{update['masked_weights']:,} masked), batch {update['batch']}:")
    lines.append(f"  one update (global prune + regrowth) {update['median_update_s']:.3f}s, "
                 f"one training step {update['median_train_step_s']:.3f}s, ratio {update['update_over_step']:.3f}"
                 " (target < 1)")
    lines.append(f"  at update_every=100 the updates take {update['update_share_at_update_every_100']:.3%}"
                 " of training time (target < 1%)")
    text = "\n".join(lines) + "\n"
    print(text)
    if not quick:
        write("train_step", text, {"command": command(), "machine": machine(), "steps": rows, "mask_update": update})


if __name__ == "__main__":
    main()
