"""One GraNet mask update against the memory-bandwidth limit and against one training step.

An update is memory-bound: it must read |w|, the gradient and the mask once,
write the new mask, and re-mask the weight and its momentum. In one run, on
``--threads`` CPU threads, this script measures

- the machine's memory bandwidth: a copy of a large float32 tensor, bytes read
  plus bytes written over the time, best of several copies;
- the bytes an update must touch at the least (the byte model below), and so
  the bandwidth limit, bytes / bandwidth;
- the update time and the training-step time, side by side, and the same
  updates with the eager passes (selection, re-masking, mask counts) in place of the
  compiled ones (``granet_fx.native``): from the same state, alternately
  first, checked to choose the same masks,

for three models, each sparsified with ``gf.sparsify`` (GraNet, dense to 90%
sparsity over 1000 steps, an update every 100 steps, pruning until step 500,
regrowth on; global magnitude pruning, ERK) and trained eagerly with SGD
(lr 1e-3, momentum 0.9) on random data:

- an MLP of three Linear layers, 4096-4096-4096-10 (33.6M weights), batch 64,
- the CIFAR ResNet-18 of ``granet_fx.models`` (width 64, 11.2M weights), batch 64 of 3x32x32,
- GPT-2 small from transformers' ``GPT2Config`` defaults, random weights, no
  download, ``use_cache=False`` (85M masked weights; the tied embedding stays
  dense), one sequence of 128 tokens.

Definitions:

- update = the time of ``granet.step()`` at an update step: the re-masking
  that every step does plus pruning and regrowth. Median of the nine updates
  of the schedule (steps 100..500 prune and regrow, 600..900 only regrow),
  each the median of ``--repeats`` timings (3) from the same state; the
  schedule jumps from update to update (``load_state_dict`` with the step).
- training step = zero_grad, forward, backward, ``optimizer.step()`` and
  ``granet.step()`` at a non-update step (the step just before each update;
  median of nine).
- re-masking = ``granet.step()`` at that non-update step; extra = update - re-masking.

Byte model (per masked weight, float32 weights, gradients and momentum, bool
masks): read |w| 4 B + read the gradient 4 B + read the mask 1 B + write the
mask 1 B + re-mask the weight once (read + write, 4 + 4 B) + re-mask each
optimizer state tensor shaped like the weight once (SGD momentum: 4 + 4 B)
= 26 B. The limit is those bytes over the copy bandwidth.

Two threads on a busy machine wait for each other at every small op, and an update is thousands
of them: compare runs made under the same load (the JSON keeps the per-update times).

Targets (issue 11): update <= 4x the bandwidth limit for every model; update
below one training step for the MLP at batch 64 and GPT-2 small at 1x128 tokens.

``--profile`` shows where an update's time goes instead (nothing timed above):
time inside the controller's private methods and the criteria functions
(wrapped on the instance and in their modules, nothing edited), the aten ops
that take the time (``torch.profiler``), and the bytes moved and the passes
over each layer's memory, per phase (every aten op counted by a dispatch mode,
and each compiled call of ``granet_fx.native`` as one read or write of its tensors).

    python benchmarks/mask_update.py            # writes results/mask_update.{txt,json}
    python benchmarks/mask_update.py --profile  # prints where the time goes
    python benchmarks/mask_update.py --quick    # tiny models, a smoke test; writes only with --out
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import granet_fx as gf
import granet_fx.controller as controller_module
import granet_fx.criteria as criteria_module
from granet_fx import native
from granet_fx.models import MLP, resnet18

from common import RESULTS, command, machine, write_outputs

TOTAL, EVERY, PRUNE_END = 1000, 100, 500
UPDATES = list(range(EVERY, TOTAL, EVERY))      # nine: 100..500 prune and regrow, 600..900 only regrow
MODELS = ("mlp", "resnet18", "gpt2")
BYTE_MODEL = ("read |w| 4 B + read gradient 4 B + read mask 1 B + write mask 1 B + re-mask weight once "
              "(read + write 4 + 4 B) + re-mask each optimizer state tensor shaped like the weight once "
              "(SGD momentum: 4 + 4 B) = 26 B per masked float32 weight")
SCHEDULE = (f"granet, dense to 0.9 sparsity, total_steps={TOTAL}, update_every={EVERY}, prune_end={PRUNE_END}, "
            "global magnitude pruning, ERK, regrowth on")
OPTIMIZER = "torch.optim.SGD(lr=1e-3, momentum=0.9), eager"
TARGET_LIMIT = 4.0
STEP_TARGET = {"mlp", "gpt2"}   # the models with the update < one training step target


@dataclass
class Setup:
    """A sparsified model with its optimizer and controller, and one batch's training step."""

    name: str
    label: str
    batch: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    granet: gf.GraNet
    loss: Callable[[], torch.Tensor]

    def backward_step(self) -> None:
        """Forward, backward and optimizer step; the gradient stays for granet.step()."""
        loss = self.loss()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def at(self, step: int) -> None:
        """Move the schedule so that the next granet.step() is step ``step + 1``."""
        self.granet.load_state_dict({**self.granet.state_dict(), "step": step})


def build(name: str, quick: bool) -> Setup:
    """The model ``name`` ("mlp", "resnet18", "gpt2"), sparsified, with SGD momentum and a GraNet controller."""
    torch.manual_seed(0)
    if name == "mlp":
        width, rows = (128, 8) if quick else (4096, 64)
        net = MLP((64 if quick else width, width, width, 10))
        x, y = torch.randn(rows, net.layers[0].in_features), torch.randint(0, 10, (rows,))
        label, batch = f"MLP {net.layers[0].in_features}-{width}-{width}-10", str(rows)
        loss = lambda: F.cross_entropy(model(x), y)
    elif name == "resnet18":
        width, rows = (8, 4) if quick else (64, 64)
        net = resnet18(width=width)
        x, y = torch.randn(rows, 3, 32, 32), torch.randint(0, 10, (rows,))
        label, batch = f"ResNet-18 (CIFAR, width {width})", f"{rows}x3x32x32"
        loss = lambda: F.cross_entropy(model(x), y)
    elif name == "gpt2":
        import transformers
        size = dict(n_layer=2, n_embd=128, n_head=2, vocab_size=1000, n_positions=128, bos_token_id=999,
                    eos_token_id=999) if quick else {}
        tokens = 16 if quick else 128
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = transformers.GPT2LMHeadModel(transformers.GPT2Config(use_cache=False, **size))
        ids = torch.randint(0, net.config.vocab_size, (1, tokens))
        label, batch = "GPT-2 (2 layers, 128 wide)" if quick else "GPT-2 small", f"1x{tokens} tokens"

        def loss():
            logits = model(ids).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    else:
        raise ValueError(f"unknown model {name!r}")
    config = gf.GraNetConfig(method="granet", final_sparsity=0.9, total_steps=TOTAL, update_every=EVERY,
                             prune_end=PRUNE_END)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")     # GPT-2: the tied embedding/output weight stays dense
        model = gf.sparsify(net, config)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    granet = gf.GraNet(model, optimizer)
    return Setup(name, label, batch, model, optimizer, granet, loss)


def update_bytes(setup: Setup) -> dict[str, int]:
    """The least bytes one update must move, by the byte model, per item (after one optimizer step)."""
    parts = dict.fromkeys(["read |w|", "read gradient", "read mask", "write mask", "re-mask weight",
                           "re-mask optimizer state"], 0)
    for layer in gf.sparse_info(setup.model).masked:
        w = setup.model.get_parameter(layer.name)
        mask = setup.model.get_buffer(layer.mask_name)
        n = w.numel()
        grad = w.grad if w.grad is not None else w
        parts["read |w|"] += n * w.element_size()
        parts["read gradient"] += n * grad.element_size()
        parts["read mask"] += n * mask.element_size()
        parts["write mask"] += n * mask.element_size()
        parts["re-mask weight"] += 2 * n * w.element_size()
        for value in setup.optimizer.state.get(w, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == w.shape:
                parts["re-mask optimizer state"] += 2 * n * value.element_size()
    return parts


def bandwidth(mib: int, repeats: int = 10) -> float:
    """Bytes per second of a float32 tensor copy of ``mib`` MiB (read + written over the time), best of ``repeats``."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)          # touch the pages first
    best = min(_timed(dst.copy_, src) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(setup: Setup, timings: int) -> dict:
    """Training step, re-masking and update times over the schedule's nine updates, side by side; each
    update timed ``timings`` times from the same state on each path (the order alternating), the median kept."""
    granet = setup.granet
    setup.at(EVERY // 2)            # a warm-up step at a non-update step
    setup.backward_step()
    granet.step()
    steps, remasks, updates = [], [], []
    for t in UPDATES:
        setup.at(t - 2)
        start = time.perf_counter()
        setup.backward_step()
        remask_start = time.perf_counter()
        if granet.step():
            raise RuntimeError(f"step {t - 1} updated the masks; the benchmark's schedule is wrong")
        end = time.perf_counter()
        steps.append(end - start)
        remasks.append(end - remask_start)
        setup.backward_step()
        saved, state = snapshot(setup), granet.state_dict()
        each, masks = {"compiled": [], "eager": []}, None
        for r in range(timings):
            for path in (("eager", "compiled") if (len(updates) + r) % 2 else ("compiled", "eager")):   # alternate
                restore(setup, saved)
                granet.load_state_dict(state)
                with selection_pass(path):
                    each[path].append(_timed(lambda: granet.step() or _not_updated(t)))
                new = [b.clone() for n, b in setup.model.named_buffers() if n.endswith("_mask")]
                if masks is not None and not all(torch.equal(a, b) for a, b in zip(masks, new)):
                    raise RuntimeError(f"step {t}: the compiled and the eager passes chose different masks")
                masks = new
        seconds = {path: statistics.median(v) for path, v in each.items()}
        # Both left the same masks, so the same weights and momentum: the schedule goes on from either.
        updates.append({"step": t, "kind": "prune + regrow" if t <= PRUNE_END else "regrow",
                        "seconds": seconds["compiled"], "eager_seconds": seconds["eager"],
                        "seconds_each": each["compiled"], "eager_seconds_each": each["eager"],
                        "sparsity_after": granet.report().global_sparsity})
        print(f"  {setup.name} step {t}: {updates[-1]['kind']}, sparsity {updates[-1]['sparsity_after']:.3f}, "
              f"update {seconds['compiled'] * 1e3:.1f} ms (eager passes {seconds['eager'] * 1e3:.1f} ms), "
              f"training step {steps[-1] * 1e3:.1f} ms", flush=True)
    update = statistics.median(u["seconds"] for u in updates)
    remask = statistics.median(remasks)
    return {"updates": updates, "update_s": update, "eager_update_s": statistics.median(u["eager_seconds"] for u in updates),
            "remask_s": remask, "extra_s": update - remask, "train_step_s": statistics.median(steps)}


@contextlib.contextmanager
def selection_pass(path: str):
    """Mask updates with the compiled passes ("compiled", granet_fx.native: selection, re-masking, counts) or
    the eager ones."""
    if path == "compiled" and native.kernel() is None:
        raise RuntimeError("the compiled passes are not available here (no C compiler?)")
    eligible, can_zero, count = native.eligible, native.can_zero, native.count
    if path == "eager":
        native.eligible = native.can_zero = lambda *a: False
        native.count = lambda mask: int(torch.count_nonzero(mask))
    try:
        yield
    finally:
        native.eligible, native.can_zero, native.count = eligible, can_zero, count


def _not_updated(t: int) -> None:
    raise RuntimeError(f"step {t} did not update the masks; the benchmark's schedule is wrong")


def run_benchmark(args: argparse.Namespace) -> tuple[str, dict]:
    mib = args.bandwidth_mib or (64 if args.quick else 512)
    bandwidths = [bandwidth(mib)]
    timings = args.repeats or (1 if args.quick else 3)
    rows = []
    for name in args.models:
        setup = build(name, args.quick)
        print(f"{setup.label}: measuring", flush=True)
        result = measure(setup, timings)
        parts = update_bytes(setup)
        bandwidths.append(bandwidth(mib))
        rows.append({"model": name, "label": setup.label, "batch": setup.batch,
                     "parameters": sum(p.numel() for p in setup.model.parameters()),
                     "masked_weights": sum(l.numel for l in gf.sparse_info(setup.model).masked),
                     "bytes": sum(parts.values()), "bytes_by_item": parts, **result})
        del setup
    best = max(bandwidths)
    for r in rows:
        r["limit_s"] = r["bytes"] / best
        r["update_over_limit"] = r["update_s"] / r["limit_s"]
        r["update_over_step"] = r["update_s"] / r["train_step_s"]
        r["extra_over_step"] = r["extra_s"] / r["train_step_s"]
        r["bytes_per_masked_weight"] = r["bytes"] / r["masked_weights"]
        r["within_4x_limit"] = r["update_over_limit"] <= TARGET_LIMIT
        r["below_one_step"] = r["update_over_step"] < 1.0 if r["model"] in STEP_TARGET else None
    data = {"command": command(), "machine": machine(), "threads": torch.get_num_threads(), "quick": args.quick,
            "timings": timings,
            "bandwidth_copy_mib": mib, "bandwidth_bytes_per_s": bandwidths, "bandwidth_best_bytes_per_s": best,
            "byte_model": BYTE_MODEL, "schedule": SCHEDULE, "optimizer": OPTIMIZER,
            "targets": {"update_over_limit_at_most": TARGET_LIMIT,
                        "update_over_step_below_1_for": sorted(STEP_TARGET)},
            "models": rows}
    return report(data), data


def report(data: dict) -> str:
    rows = data["models"]
    gbs = [f"{b / 1e9:.1f}" for b in data["bandwidth_bytes_per_s"]]
    lines = [
        f"# {data['command']}",
        f"# {data['machine']}",
        f"memory bandwidth: copy of {data['bandwidth_copy_mib']} MiB of float32, (read + written) / time, best of 10,"
        f" measured before the first model and after each: {', '.join(gbs)} GB/s; the limit uses the best,"
        f" {data['bandwidth_best_bytes_per_s'] / 1e9:.1f} GB/s",
        f"byte model: {data['byte_model']}",
        f"schedule: {data['schedule']}",
        f"optimizer: {data['optimizer']}",
        "",
        f"{'model':30} {'batch':17} {'weights':>11} {'MB':>7} {'limit ms':>9} {'update ms':>10}"
        f" {'upd/limit':>9} {'step ms':>9} {'upd/step':>9} {'eager ms':>9} {'eager/upd':>9}",
    ]
    for r in rows:
        lines.append(f"{r['label']:30} {r['batch']:17} {r['masked_weights']:>11,} {r['bytes'] / 1e6:>7.1f}"
                     f" {r['limit_s'] * 1e3:>9.1f} {r['update_s'] * 1e3:>10.1f} {r['update_over_limit']:>9.2f}"
                     f" {r['train_step_s'] * 1e3:>9.1f} {r['update_over_step']:>9.2f}"
                     f" {r['eager_update_s'] * 1e3:>9.1f} {r['eager_update_s'] / r['update_s']:>9.2f}")
    lines += [
        "",
        "weights: masked weights; MB: bytes by the byte model; limit: MB / best bandwidth;",
        f"update: granet.step() at an update step, median of {len(UPDATES)} (steps 100-500 prune + regrow,"
        " 600-900 regrow), each the median of its timings from the same state"
        f" ({data['timings']} on each path), its re-masking included, with the compiled passes (granet_fx.native);",
        "eager: the same updates from the same state with the eager passes instead, timed alternately with them"
        " (the same masks, checked at every update);",
        "step: zero_grad + forward + backward + optimizer.step() + granet.step() at the non-update step before"
        " each update, median of the same number.",
        "",
        f"{'model':30} {'re-mask ms':>10} {'extra ms':>9} {'extra/step':>10}   prune+regrow ms (median)  regrow ms",
    ]
    for r in rows:
        prune = statistics.median(u["seconds"] for u in r["updates"] if u["kind"] == "prune + regrow")
        regrow = statistics.median(u["seconds"] for u in r["updates"] if u["kind"] == "regrow")
        lines.append(f"{r['label']:30} {r['remask_s'] * 1e3:>10.1f} {r['extra_s'] * 1e3:>9.1f}"
                     f" {r['extra_over_step']:>10.2f}   {prune * 1e3:>24.1f}  {regrow * 1e3:>9.1f}")
    lines += ["re-mask: granet.step() at a non-update step; extra: update - re-mask", "", "targets:"]
    for r in rows:
        lines.append(f"  {r['label']}: update / limit {r['update_over_limit']:.2f} (target <= {TARGET_LIMIT:g}): "
                     f"{'met' if r['within_4x_limit'] else 'NOT met'}")
    for r in rows:
        if r["below_one_step"] is not None:
            lines.append(f"  {r['label']} at batch {r['batch']}: update / step {r['update_over_step']:.2f}"
                         f" (target < 1): {'met' if r['below_one_step'] else 'NOT met'}")
    return "\n".join(lines) + "\n"


# --profile ------------------------------------------------------------------------------------------

# The controller's methods that make a phase (the innermost one running labels each aten op), and the
# criteria functions timed inside them; those the controller at hand lacks are skipped.
PHASES = ("_prune", "_regrow", "_pruned", "_regrown", "_regrown_compiled", "_update", "_zero", "apply_masks",
          "_count", "_count_active", "_gradient_size")
CRITERIA = ("prune_global", "prune_global_counted", "drop_smallest", "grow_largest")   # as the controller calls them
# inside granet_fx.criteria (_pass and _bracket run under FSDP2 or without the compiled selection)
INTERNALS = ("_pick", "_pass", "_bracket", "_best")


class Timers:
    """Inclusive time and calls per wrapped function, and the controller phase now running."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.phase = ["other"]
        self.active = False

    def wrap(self, name: str, fn: Callable, phase: bool) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            if phase:
                self.phase.append(name)
            start = time.perf_counter()
            try:
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                self.calls[name] = self.calls.get(name, 0) + 1
                if phase:
                    self.phase.pop()
        return wrapper


def instrument(granet: gf.GraNet, timers: Timers) -> Callable[[], None]:
    """Wrap the controller's methods (on this instance) and the criteria functions; returns an undo."""
    undo = []
    for name in PHASES:
        if not callable(getattr(granet, name, None)):
            continue
        setattr(granet, name, timers.wrap(name, getattr(granet, name), phase=True))
        undo.append(lambda name=name: delattr(granet, name))
    for module, names in ((controller_module, CRITERIA), (criteria_module, INTERNALS)):
        for name in names:
            original = getattr(module, name, None)
            if not callable(original):
                continue
            setattr(module, name, timers.wrap(name, original, phase=False))
            undo.append(lambda module=module, name=name, original=original: setattr(module, name, original))
    return lambda: [u() for u in reversed(undo)]


WRITE_ONLY = ("copy_", "fill_", "zero_")                          # in place, without reading their destination
ALLOCATE_ONLY = ("empty", "empty_like", "empty_strided", "new_empty")  # touch no memory


class Traffic(TorchDispatchMode):
    """Counts, per controller phase, the aten ops (and, inside ``native_calls``, the compiled passes), the
    bytes they move and the passes over each layer.

    Bytes of an op: its tensor inputs and outputs, whole (a view moves nothing; a gather or scatter
    with integer indices moves what it gathers; copy_ and fills do not read their destination, an
    allocation moves nothing). A pass over a layer: an op that reads or writes a whole tensor with that
    layer's number of elements (``op_passes``: per op, over the layers of the largest size). What an
    op does inside is not seen: ``mul_`` by a uint8 mask first converts it to float32 (aten::to in
    the profile), 8 more bytes per weight than counted here.
    """

    def __init__(self, timers: Timers, sizes: dict[int, int], largest: int) -> None:
        super().__init__()
        self.timers, self.sizes = timers, sizes     # numel -> how many masked layers have it
        self.largest = largest
        self.ops: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self.passes: dict[str, dict[int, int]] = {}
        self.op_passes: dict[str, int] = {}

    def count(self, name: str, moved: int, whole: list[torch.Tensor], layers: list[int] | None = None) -> None:
        """Note an op of the current phase that moved ``moved`` bytes and went over the tensors ``whole``:
        one pass over a layer of each size among them (``layers``: the sizes of the layers it went over)."""
        phase = self.timers.phase[-1]
        self.ops[phase] = self.ops.get(phase, 0) + 1
        self.bytes[phase] = self.bytes.get(phase, 0) + moved
        if layers is None:
            layers = list({t.numel() for t in whole})
        for n in (n for n in layers if n in self.sizes):
            per = self.passes.setdefault(phase, {})
            per[n] = per.get(n, 0) + 1
            if n == self.largest:
                self.op_passes[name] = self.op_passes.get(name, 0) + 1

    @contextlib.contextmanager
    def native_calls(self):
        """Count the compiled passes too (not aten ops): each reads and writes its tensors once, whole (the
        few entries a selection gathers inside its bracket are left out)."""
        def counted(name, fn, tensors):
            def call(*args, **kwargs):
                touched = tensors(*args, **kwargs)
                layers = [t.numel() for t in args[0]] if name == "select" else None    # a pass a tensor
                self.count(f"native.{name}", sum(_nbytes(t) for t in touched), touched, layers)
                return fn(*args, **kwargs)
            return call
        def regrow(layers, *args, **kwargs):     # per layer: the drop's, the growth's and the zeroing's passes
            moved, passes = 0, []
            for l in layers:
                n, mask = l.mask.numel(), _nbytes(l.mask)
                zero = sum(2 * _nbytes(t) for t in l.tensors) + mask * (1 + bool(l.k) + (l.dest is not None))
                moved += zero + (_nbytes(l.weight) + _nbytes(l.grad) + 4 * mask if l.k else 0)
                passes += [n] * (3 if l.k else 1)
            self.count("native.regrow", moved, [], passes)
            return saved["regrow"](layers, *args, **kwargs)
        saved = {name: getattr(native, name) for name in ("select", "zero_where_not", "slice_tops", "count", "regrow")}
        native.regrow = regrow
        native.select = counted("select", saved["select"], lambda scores, pools, *a, **k: [
            *scores, *pools, *(a[7] if len(a) > 7 else k["out"])])
        native.zero_where_not = counted("zero_where_not", saved["zero_where_not"], lambda tensors, keep, also=None,
                                        dest=None: [*tensors, *tensors, keep] + [m for m in (also, dest) if m is not None])
        native.slice_tops = counted("slice_tops", saved["slice_tops"], lambda score, pool, *a: [score, pool])
        native.count = counted("count", saved["count"], lambda mask: [mask])
        try:
            yield
        finally:
            for name, fn in saved.items():
                setattr(native, name, fn)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        ins = [a for a in _tensors(args) + _tensors(kwargs)]
        outs = _tensors(out)
        name = func.overloadpacket.__name__
        gather = name in ("index", "index_put", "index_put_") and not any(
            a.dtype == torch.bool for a in _tensors(args[1:]))
        if gather:          # moves the indices and the gathered/scattered values only
            moved = sum(_nbytes(t) for t in _tensors(args[1:])) + (_nbytes(outs[0]) if name == "index" else 0)
            whole = []
        else:
            if name in WRITE_ONLY:
                ins = ins[1:]
            if name in ALLOCATE_ONLY:
                outs = []
            moved = sum(_nbytes(t) for t in ins + outs)
            whole = ins + outs
        self.count(name, moved, whole)
        return out


def _tensors(x) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def profile(setup: Setup, repeats: int) -> dict:
    """Where the time of an update goes, for a prune + regrow update (step 300) and a regrow-only one (700).

    Each is prepared by the update before it (200, or 500 to reach the final sparsity), then timed
    ``repeats`` times, once under torch.profiler and once under ``Traffic``, each time from the same
    weights, masks and momentum.
    """
    granet = setup.granet
    masked = gf.sparse_info(setup.model).masked
    n_weights = sum(l.numel for l in masked)
    sizes: dict[int, int] = {}
    for l in masked:
        sizes[l.numel] = sizes.get(l.numel, 0) + 1
    largest = max(sizes)
    timers = Timers()
    result = {}
    undo = instrument(granet, timers)
    try:
        for t, before, kind in ((300, 200, "prune + regrow"), (700, 500, "regrow")):
            advance(setup, before)
            saved = snapshot(setup)

            totals = []
            timers.seconds, timers.calls = {}, {}
            for _ in range(repeats):
                restore(setup, saved)
                setup.at(t - 1)
                setup.backward_step()
                timers.active = True
                totals.append(_timed(granet.step))
                timers.active = False
            seconds, calls, total = dict(timers.seconds), dict(timers.calls), sum(totals)
            restore(setup, saved)
            setup.at(t - 1)
            setup.backward_step()
            timers.active = True
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                granet.step()
            timers.active = False
            traffic = Traffic(timers, sizes, largest)
            restore(setup, saved)
            setup.at(t - 1)
            setup.backward_step()
            timers.active = True
            with traffic, traffic.native_calls():
                granet.step()
            timers.active = False
            ops = [e for e in prof.key_averages() if e.key.startswith("aten::")]
            op_total = sum(e.self_cpu_time_total for e in ops) or 1.0
            ops.sort(key=lambda e: -e.self_cpu_time_total)
            result[kind] = {
                "step": t,
                "update_s": statistics.median(totals),
                "functions": {k: {"share": v / total, "calls_per_update": calls[k] / repeats,
                                  "s_per_update": v / repeats}
                              for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])},
                "aten_ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
                              "share": e.self_cpu_time_total / op_total} for e in ops[:12]],
                "bytes_per_masked_weight": {k: v / n_weights for k, v in traffic.bytes.items()},
                "ops": traffic.ops,
                "passes_over_largest_layer": {k: v.get(largest, 0) / sizes[largest]
                                              for k, v in traffic.passes.items()},
                "passes_by_op": dict(sorted(traffic.op_passes.items(), key=lambda kv: -kv[1])),
            }
    finally:
        undo()
    return {"model": setup.name, "label": setup.label, "masked_weights": n_weights, "layers": len(masked),
            "largest_layer": largest, "layers_of_largest_size": sizes[largest], "kinds": result}


def advance(setup: Setup, t: int) -> None:
    """One training step that ends at step ``t`` of the schedule."""
    setup.at(t - 1)
    setup.backward_step()
    setup.granet.step()


def snapshot(setup: Setup) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the weights, masks and optimizer state, to start several updates from the same place."""
    tensors = list(setup.model.state_dict(keep_vars=True).values())
    tensors += [v for s in setup.optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return [(t, t.detach().clone()) for t in tensors]


@torch.no_grad()
def restore(setup: Setup, saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for t, copy in saved:
        t.copy_(copy)


def run_profile(args: argparse.Namespace) -> tuple[str, dict]:
    rows = []
    for name in args.models:
        setup = build(name, args.quick)
        print(f"{setup.label}: profiling", flush=True)
        rows.append(profile(setup, args.repeats or (1 if args.quick else 2)))
        del setup
    lines = [f"# {command()}", f"# {machine()}", f"schedule: {SCHEDULE}", f"optimizer: {OPTIMIZER}",
             "minimum by the byte model: 26 B per masked weight, one pass over each tensor",
             "bytes moved and passes count the aten ops and the compiled calls (granet_fx.native: a whole"
             " selection, inside _pick on one process, so no _pass or _bracket; the re-masking, under _zero;"
             " at an update that regrows, every layer's drop, growth and re-masking in one call, under"
             " _regrown_compiled), each compiled call as one read or write of its tensors", ""]
    for r in rows:
        for kind, k in r["kinds"].items():
            lines.append(f"{r['label']} ({r['masked_weights']:,} masked weights in {r['layers']} layers), "
                         f"step {k['step']} ({kind}): granet.step() {k['update_s'] * 1e3:.1f} ms")
            lines.append("  time inside (inclusive; nested calls are counted in their callers too):")
            for f, v in k["functions"].items():
                lines.append(f"    {f:16} {v['share']:>6.1%}  {v['s_per_update'] * 1e3:>8.1f} ms"
                             f"  {v['calls_per_update']:>6.1f} calls")
            lines.append("  aten ops by self time (one update under torch.profiler):")
            for o in k["aten_ops"]:
                lines.append(f"    {o['op']:28} {o['share']:>6.1%}  {o['self_s'] * 1e3:>8.1f} ms  {o['calls']:>6} calls")
            moved = k["bytes_per_masked_weight"]
            lines.append(f"  bytes moved per masked weight: {sum(moved.values()):.1f} B in all ("
                         + ", ".join(f"{p} {v:.1f}" for p, v in sorted(moved.items(), key=lambda kv: -kv[1]))
                         + ")")
            passes = k["passes_over_largest_layer"]
            lines.append(f"  passes over a largest layer ({r['largest_layer']:,} weights, "
                         f"{r['layers_of_largest_size']} such layers): {sum(passes.values()):.0f} in all ("
                         + ", ".join(f"{p} {v:.0f}" for p, v in sorted(passes.items(), key=lambda kv: -kv[1]))
                         + "); by op: " + ", ".join(f"{o} {v / r['layers_of_largest_size']:.0f}"
                                                    for o, v in k["passes_by_op"].items()))
            lines.append("")
    return "\n".join(lines), {"command": command(), "machine": machine(), "profiles": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--quick", action="store_true", help="tiny models, a smoke test; writes only with --out")
    parser.add_argument("--profile", action="store_true", help="where an update's time goes; writes only with --out")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timings of each update from the same state, the median kept (default 3, 1 with "
                             "--quick); --profile: timed updates of each kind (default 2, 1 with --quick)")
    parser.add_argument("--bandwidth-mib", type=int, default=None,
                        help="size of the copied tensor (default 512, 64 with --quick)")
    parser.add_argument("--out", default=None,
                        help="output path without extension (default results/mask_update for the full benchmark)")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1; got {args.repeats}")
    if args.bandwidth_mib is not None and args.bandwidth_mib < 1:
        parser.error(f"--bandwidth-mib must be >= 1; got {args.bandwidth_mib}")
    torch.set_num_threads(args.threads)
    text, data = run_profile(args) if args.profile else run_benchmark(args)
    out = args.out or (None if args.quick or args.profile else str(RESULTS / "mask_update"))
    if out is None:
        print(text)
    else:
        write_outputs(out, text, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
