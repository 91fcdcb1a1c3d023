"""GraNet: the training-time controller that keeps the masks on schedule."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import nn

from . import native
from .config import PRUNING_METHODS, REGROWTH_METHODS, GraNetConfig
from .criteria import SAMPLE, drop_smallest, grow_largest, prune_global_counted, prune_gradient_first
from .distributed import comm_for, is_sharded, local, row_offset, shard_like
from .report import LayerReport, SparsityReport
from .schedule import cosine_fraction, cubic_sparsity, is_update_step, rigl_fraction
from .sparsify import initial_counts, mask_units, sparse_info, unwrap
from .structured import structured_masks


class GraNet:
    """Runs GraNet (or a related method) on a model returned by ``sparsify``.

    Call ``step()`` once after every ``optimizer.step()``. It re-applies the
    masks to the weights and to the optimizer state shaped like them, and at
    update steps prunes along the cubic schedule and regrows connections by
    gradient (or at random for SET). The weights' ``.grad`` must still hold the
    current mini-batch's gradient when ``step()`` runs.

    ``total_steps`` supplies the run's length when the config left it unset
    (``sparsify(model)`` with the default config). A stack of expert weights
    (one 3-D parameter) counts as one layer per expert: each has its own
    regrowth count, its own row in the report (``name[i]``) and competes with
    every other layer in global pruning.

    Under FSDP2 (``fully_shard`` after ``sparsify``, then the controller) each
    rank keeps the mask rows of its weight shard, and every selection is exact
    across ranks: the masks are the ones a single process would choose. Call
    ``step()`` on every rank.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, total_steps: int | None = None):
        self.model = unwrap(model)
        info = sparse_info(self.model)
        self.config = _with_total_steps(info.config, total_steps)
        self.optimizer = optimizer
        self.layers = list(info.layers)
        masked = info.masked
        # Each weight once (masks, optimizer state); each unit (a weight, or one expert) for the ranking.
        self._params = [self.model.get_parameter(l.name) for l in masked]
        self._param_masks = [self.model.get_buffer(l.mask_name) for l in masked]
        self._units = mask_units(masked)
        self._comm = comm_for(self._params)
        self._offsets = [0] * len(masked)     # first global row of each weight's local shard
        if self._comm.world > 1:
            self._shard_masks(masked)
        by_layer = {id(l): i for i, l in enumerate(masked)}
        self._unit_param = [by_layer[id(u.layer)] for u in self._units]
        self._names = [u.name for u in self._units]
        self.step_count = 0
        self._generator = torch.Generator().manual_seed(self.config.seed + 1)
        self._train_macs = 0.0
        self._work = None             # the mask updates' buffers, made at the first (_work_buffers)
        self._spare_buffer = None     # and the spare (_spare)
        self._dense_macs = None
        if all(l.macs is not None for l in self.layers):
            self._dense_macs = sum(l.macs for l in self.layers)
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [l.name for l, w in zip(masked, self._params) if id(w) not in in_optimizer]
        if missing:
            warnings.warn(f"granet_fx: masked weights not in the optimizer: {', '.join(missing)}", stacklevel=2)
        shapes = [u.shape for u in self._units]
        self._final_counts = initial_counts(self.config, shapes, self.config.final_sparsity)
        self._start_counts = initial_counts(self.config, shapes, self.config.start_sparsity)
        self._structured = structured_masks(self.model, info)  # None for unstructured sparsity
        if self._structured is not None and self._comm.world > 1:
            raise ValueError(f"granet_fx: granularity={self.config.granularity!r} is not supported on sharded "
                             "(FSDP2) weights; use unstructured sparsity, or DDP")
        self._count_active()
        self.apply_masks()

    def _shard_masks(self, masked) -> None:
        """Replace each whole mask buffer by a DTensor sharded like its weight: this rank's rows only."""
        for j, (layer, w) in enumerate(zip(masked, self._params)):
            self._offsets[j] = row_offset(w.shape[0], local(w).shape[0], self._comm)
            owner, _, name = layer.mask_name.rpartition(".")
            holder = self.model.get_submodule(owner)
            holder.register_buffer(name, shard_like(holder.get_buffer(name), w, self._offsets[j]))
            self._param_masks[j] = holder.get_buffer(name)

    # Each unit's part of its weight, mask and gradient on this rank (views: writing to them writes the
    # whole). Under FSDP2, an expert of a stack lives on one rank and is empty on the others.
    def _part(self, i: int, t: torch.Tensor) -> torch.Tensor:
        unit, t = self._units[i], local(t)
        if unit.index is None:
            return t
        at = unit.index - self._offsets[self._unit_param[i]]
        return t[at] if 0 <= at < t.shape[0] else t.new_empty(0)

    def _weight(self, i: int) -> torch.Tensor:
        return self._part(i, self._params[self._unit_param[i]])

    def _mask(self, i: int) -> torch.Tensor:
        return self._part(i, self._param_masks[self._unit_param[i]])

    def _grad(self, i: int) -> torch.Tensor | None:
        grad = self._params[self._unit_param[i]].grad
        return None if grad is None else self._part(i, grad)

    @property
    def _weights(self) -> list[torch.Tensor]:
        return [self._weight(i) for i in range(len(self._units))]

    @property
    def _masks(self) -> list[torch.Tensor]:
        return [self._mask(i) for i in range(len(self._units))]

    # The schedule -----------------------------------------------------------
    def target_sparsity(self, step: int | None = None) -> float:
        """Global sparsity that the schedule asks for at ``step`` (default: now)."""
        c = self.config
        t = self.step_count if step is None else step
        if c.method in PRUNING_METHODS:
            return cubic_sparsity(t, c.initial_sparsity, c.final_sparsity, c.prune_start, c.prune_end_step)
        return c.start_sparsity

    def regrow_fraction(self, step: int | None = None) -> float:
        """Fraction of each layer's active weights dropped and regrown at ``step``."""
        c = self.config
        t = self.step_count if step is None else step
        if c.method == "rigl":
            return rigl_fraction(t, c.total_steps, c.regrow_fraction)
        if c.method in REGROWTH_METHODS:
            return cosine_fraction(t, c.total_steps, c.regrow_fraction, c.regrow_fraction_min)
        return 0.0

    def _prunes_at(self, t: int) -> bool:
        c = self.config
        if c.method not in PRUNING_METHODS or t < c.prune_start:
            return False
        if t > c.prune_end_step:    # only to make up for an update that was skipped
            return is_update_step(t, c.prune_start, c.update_every) and self._above_final()
        return t == c.prune_end_step or is_update_step(t, c.prune_start, c.update_every)

    def _above_final(self) -> bool:
        active = [self._active[n] for n in self._names]
        if self.config.scope == "global":
            return sum(active) > sum(self._final_counts)
        return any(a > f for a, f in zip(active, self._final_counts))

    def _regrows_at(self, t: int) -> bool:
        c = self.config
        if c.method not in REGROWTH_METHODS or t >= c.total_steps:
            return False
        start = c.prune_start if c.method == "granet" else 0
        return is_update_step(t, start, c.update_every) and self.regrow_fraction(t) > 0

    # The training-time step -------------------------------------------------
    def step(self) -> bool:
        """Advance one optimizer step; returns True when the masks were updated."""
        if self._dense_macs is not None:
            self._train_macs += self._sparse_macs()
        self.step_count += 1
        t = self.step_count
        prune, regrow = self._updates_at(t)
        if not (prune or regrow):
            self.apply_masks()
            return False
        if self._structured is not None:
            self.apply_masks()
            self._update_structured(t, prune, regrow)
            self._count_active()
        else:
            self._update(t, prune, regrow)      # re-masks once, at the end, and counts
        return True

    def _updates_at(self, t: int) -> tuple[bool, bool]:
        """Whether step ``t`` prunes and whether it regrows, given the gradient it has."""
        if not self._units:             # every weight stays dense (sparsify warned why): nothing to update
            return False, False
        prune, regrow = self._prunes_at(t), self._regrows_at(t)
        if regrow or (prune and self.config.method == "fggp"):   # FGGP prunes by gradient too
            size = self._gradient_size()
            if not math.isfinite(size):
                warnings.warn(f"granet_fx: non-finite gradient at step {t}; mask update skipped", stacklevel=3)
                return False, False
            if size == 0.0:
                warnings.warn(f"granet_fx: gradient zero everywhere (an empty batch?) at step {t}; "
                              "regrowth skipped", stacklevel=3)
                regrow = False
        return prune, regrow

    @torch.no_grad()
    def apply_masks(self) -> None:
        """Zero pruned weights and the optimizer state shaped like them (momentum, Adam moments)."""
        for w, m in zip(self._params, self._param_masks):
            self._zero(w, local(m), local)

    def _zero(self, w: torch.Tensor, mask: torch.Tensor, part, also: torch.Tensor | None = None,
              dest: torch.Tensor | None = None) -> None:
        """Zero ``part`` of the weight ``w``, and of its optimizer state, where ``mask`` (and ``also``) is
        False; ``dest``: then copy ``also`` (or ``mask``) there."""
        _zero_where_not(self._masked_by(w, part), mask, also, dest)

    def _masked_by(self, w: torch.Tensor, part) -> list[torch.Tensor]:
        """``part`` of the weight ``w`` and of its optimizer state shaped like it: what its mask zeroes."""
        return [part(w)] + [part(v) for v in self.optimizer.state.get(w, {}).values()
                            if isinstance(v, torch.Tensor) and v.shape == w.shape]

    @torch.no_grad()
    def _update(self, t: int, prune: bool, regrow: bool) -> None:
        """Prune, then regrow, then re-mask the weights and their optimizer state once.

        The weights kept are those active both after pruning and after
        regrowth: a regrown connection starts from zero, as if the masks had
        been applied after each stage. The new masks are written in the work
        buffers (``_work_buffers``), never in fresh memory: pruning's in one
        buffer a mask; then, layer by layer, the drop and the growth in the
        spare and in whichever of that buffer and the mask does not hold the
        pruned mask (the growth in the mask itself when it can), and the
        re-masking copies the new mask into the mask in the same pass. On one
        process, one compiled call does that for every layer it can take
        (``_regrown_compiled``: the layers side by side on the threads); the
        loop does the rest.
        """
        current = self._masks
        work = self._work_buffers()
        counts = self._comm.sum([native.count(m) for m in current])   # the masks may have been loaded
        masks, counts = self._pruned(t, counts, work) if prune else (current, counts)
        fraction = self.regrow_fraction(t)
        done = self._regrown_compiled(current, masks, counts, fraction, work) if regrow else []
        for i, (m, p) in enumerate(zip(current, masks)):
            if i < len(done) and done[i]:
                continue
            flat, f = m.view(-1), p
            pruned = p.data_ptr() != m.data_ptr()          # then m is free: the growth goes there
            if regrow:
                room = self._spare()[:m.numel()]
                f = self._regrown(i, p, counts[i], fraction, room if pruned else work[i], flat if pruned else room)
            # Zeroed where p and f are not both True; m becomes f in the same pass (f may be m already).
            self._zero(self._params[self._unit_param[i]], p, lambda x, i=i: self._part(i, x), None if f is p else f,
                       m if f.data_ptr() != m.data_ptr() else None)
        self._active = dict(zip(self._names, counts))    # regrowth keeps every count

    def _work_buffers(self) -> list[torch.Tensor]:
        """A flat bool buffer for each mask, made at the first update and kept: fresh memory costs a page
        fault every 4 KiB, more than the selection itself."""
        if self._work is None:
            self._work = [torch.empty(m.numel(), dtype=torch.bool, device=m.device) for m in self._masks]
        return self._work

    def _spare(self) -> torch.Tensor:
        """A flat bool buffer as long as the longest mask, made when first needed and kept (the compiled
        update, ``_regrown_compiled``, has its own)."""
        if self._spare_buffer is None:
            masks = self._masks
            self._spare_buffer = torch.empty(max((m.numel() for m in masks), default=0), dtype=torch.bool,
                                             device=masks[0].device if masks else None)
        return self._spare_buffer

    def _regrown_compiled(self, current: list[torch.Tensor], masks: list[torch.Tensor], counts: list[int],
                          fraction: float, work: list[torch.Tensor]) -> list[bool]:
        """Each unit's drop, growth and re-masking (``_regrown`` and ``_zero``) in one compiled call, where
        ``native.regrow`` can take them (one process, CPU tensors, scores by gradient); which units it did.

        Same masks and tensors, in the same buffers, as the loop in ``_update``; only the order differs:
        each unit on one thread, the units side by side.
        """
        if self._comm.world > 1 or self.config.method == "set" or native.kernel() is None:
            return []
        layers, which = [], []
        for i, (m, p) in enumerate(zip(current, masks)):
            w, grad = self._weight(i).reshape(-1), self._grad(i)
            grad = None if grad is None else grad.reshape(-1)
            flat, keep = m.view(-1), p.view(-1)
            pruned = keep.data_ptr() != flat.data_ptr()
            active = counts[i]
            k = 0 if grad is None else _regrown_count(fraction, active)
            tensors = self._masked_by(self._params[self._unit_param[i]], lambda x, i=i: self._part(i, x))
            if k:       # as in _update: the growth in m where it is free, else m becomes the growth
                dropped, grown, dest = (None, flat, None) if pruned else (work[i], None, flat)
            else:       # nothing dropped: m becomes p
                dropped, grown, dest = None, None, flat if pruned else None
            scores = [w] + ([grad] if grad is not None else [])
            outs = [b for b in (dropped, grown) if b is not None]
            if (all(t.is_floating_point() for t in tensors) and native.eligible(scores, [keep] * len(scores), outs)
                    and native.can_zero(tensors, keep, None, dest)):
                layers.append(native.RegrowLayer(w, grad, keep, dropped, grown, dest, tensors, k, active))
                which.append(i)
        done = [False] * len(current)
        for i, ok in zip(which, native.regrow(layers, SAMPLE) if layers else []):
            done[i] = ok
        return done

    def _update_structured(self, t: int, prune: bool, regrow: bool) -> None:
        if prune:
            self._structured.prune(self.target_sparsity(t), self.config.scope)
            self.apply_masks()
        if regrow:
            self._structured.regrow(self.regrow_fraction(t), self._generator if self.config.method == "set" else None)
            self.apply_masks()

    def _pruned(self, t: int, counts: list[int], out: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
        """The masks after step ``t``'s pruning by |w| (not the masks now: in ``out`` where the selection can
        write there), and their active counts over all ranks; ``counts``: those of the masks now."""
        c = self.config
        comm, weights, masks = self._comm, self._weights, self._masks
        if c.method == "fggp":
            scores = [w.abs() for w in weights]
            grads = [g if g is not None else torch.zeros_like(w)
                     for g, w in ((self._grad(i), self._weight(i)) for i in range(len(self._units)))]
        if c.scope == "global":
            keep = round((1.0 - self.target_sparsity(t)) * sum(u.numel for u in self._units))
            if c.method == "fggp":
                new = prune_gradient_first(scores, grads, masks, keep, c.select_ratio, comm)
            else:
                return prune_global_counted(weights, masks, keep, comm, counts, magnitude=True, out=out)
            return new, comm.sum([native.count(m) for m in new])
        new, after = [], []
        for i, (w, m, n0, nf) in enumerate(zip(weights, masks, self._start_counts, self._final_counts)):
            n = self._units[i].numel
            sparsity = cubic_sparsity(t, 1 - n0 / n, 1 - nf / n, c.prune_start, c.prune_end_step)
            keep = round((1.0 - sparsity) * n)
            if c.method == "fggp":
                new.append(prune_gradient_first([scores[i]], [grads[i]], [m], keep, c.select_ratio, comm)[0])
                after.append(comm.sum([native.count(new[-1])])[0])
            else:
                new.append(drop_smallest(w, m, counts[i] - keep, comm, counts[i], magnitude=True, out=out[i]))
                after.append(counts[i] - max(0, min(counts[i] - keep, counts[i])))
        return new, after

    def _regrown(self, i: int, mask: torch.Tensor, active: int, fraction: float, dropped: torch.Tensor,
                 grown: torch.Tensor) -> torch.Tensor:
        """Unit i's ``mask`` after dropping and regrowing ``fraction`` of its ``active`` entries (over all
        ranks), which keeps its count; ``mask`` itself without a gradient. The drop may be written in
        ``dropped``, the growth in ``grown`` (flat bool buffers of the mask's size, neither ``mask``)."""
        grad = self._grad(i)
        if grad is None:
            return mask
        comm = self._comm
        n = _regrown_count(fraction, active)
        kept = drop_smallest(self._weight(i), mask, n, comm, active, magnitude=True, out=dropped)
        inactive = self._units[i].numel - active + n
        if self.config.method == "set":
            return grow_largest(self._random_scores(i).to(mask.device), kept, n, comm, inactive, out=grown)
        return grow_largest(grad, kept, n, comm, inactive, magnitude=True, out=grown)

    def _random_scores(self, i: int) -> torch.Tensor:
        """SET's random scores for unit i on this rank: the whole unit's draw, cut to the local rows,
        so that every world size draws the same numbers."""
        scores = torch.rand(self._units[i].shape, generator=self._generator)
        if self._comm.world == 1 or self._units[i].index is not None:
            return scores if self._weight(i).numel() else scores.new_empty(0)
        rows = self._weight(i).shape[0]
        start = self._offsets[self._unit_param[i]]
        return scores[start:start + rows]

    def _gradient_size(self) -> float:
        """A size of the gradients of the masked weights (all ranks): not finite if an entry is not (or
        if their float32 sum of |gradient| overflows), zero after an empty batch.

        The largest |entry| of each gradient (``aminmax``: a quarter of the time of the L1 norm) says as
        much, unless ``numel`` times it could overflow float32: then the L1 norm is taken.
        """
        grads = [local(w.grad) for w in self._params if w.grad is not None]
        if not grads:
            raise RuntimeError(
                "granet_fx: no gradients at a mask update; call granet.step() after "
                "loss.backward() and optimizer.step(), before optimizer.zero_grad()"
            )
        size = 0.0
        for g in grads:
            if g.numel():
                low, high = (float(x) for x in torch.aminmax(g))
                largest = max(-low, high) if math.isfinite(low) and math.isfinite(high) else low + high
                if largest * g.numel() >= 2.0 ** 127:
                    largest = float(torch.linalg.vector_norm(g, 1, dtype=torch.float32))
                size += largest
        return self._comm.sum([size])[0]

    # Book-keeping ----------------------------------------------------------
    def _count_active(self) -> None:
        counts = self._comm.sum([native.count(m) for m in self._masks])
        self._active = dict(zip(self._names, counts))
        if self._structured is not None:
            self._active.update(self._structured.active())

    def _sparse_macs(self) -> float:
        return sum(r.macs * r.active / r.numel for r in self._layer_reports())

    def _layer_reports(self) -> list[LayerReport]:
        """A row per layer: each masked weight, each expert of an expert stack, each dense weight."""
        units = {}
        for u in self._units:
            units.setdefault(id(u.layer), []).append(u)
        rows = []
        for l in self.layers:
            if l.mask_name is None or id(l) not in units:
                rows.append(LayerReport(l.name, l.kind, l.shape, l.numel, l.numel, False, l.macs))
                continue
            for u in units[id(l)]:
                macs = None if l.macs is None else l.macs * u.numel / l.numel   # experts share evenly
                rows.append(LayerReport(u.name, l.kind, u.shape, u.numel, self._active.get(u.name, u.numel),
                                        True, macs))
        return rows

    def masks(self) -> dict[str, torch.Tensor]:
        """A copy of every mask: weight name (``name[i]`` for expert i of a stack) -> bool tensor (True = kept).
        Under FSDP2, this rank's rows (gather them with the model's mask buffers' ``full_tensor()``)."""
        return {n: m.clone() for n, m in zip(self._names, self._masks)}

    def mask_bytes(self) -> int:
        """Bytes of mask this rank holds (under FSDP2 about 1/world of the whole); the work buffers of the
        mask updates (``_work_buffers``) hold about as many again from the first update on."""
        return sum(local(m).numel() * local(m).element_size() for m in self._param_masks)

    def report(self) -> SparsityReport:
        layers = self._layer_reports()
        training = None
        if self._dense_macs and self.step_count:
            training = self._train_macs / (self._dense_macs * self.step_count)
        return SparsityReport(
            method=self.config.method,
            step=self.step_count,
            total_steps=self.config.total_steps,
            target_sparsity=self.target_sparsity(),
            regrow_fraction=self.regrow_fraction(),
            layers=layers,
            training_flops=training,
        )

    # Resume -----------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Schedule position and random state; the masks live in the model's state_dict."""
        return {
            "step": self.step_count,
            "generator": self._generator.get_state(),
            "train_macs": self._train_macs,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.config.to_dict()
        theirs = state.get("config", {})
        differ = sorted(k for k in mine if theirs.get(k, mine[k]) != mine[k])
        if differ:
            raise ValueError(f"GraNet state was saved with a different config: {', '.join(differ)} differ")
        self.step_count = int(state["step"])
        self._generator.set_state(state["generator"])
        self._train_macs = float(state.get("train_macs", 0.0))
        self._count_active()


# Zeroing where a mask is False: compiled (granet_fx.native) where it can be, one read of the masks for
# every tensor. Otherwise multiplying the bits of each value, seen as integers of its size, by the mask as
# 0/1 integers keeps every kept value bit for bit and writes +0.0 elsewhere, like masked_fill_, at half
# its time; the mask goes through a buffer of one slice (a quarter million entries: it stays in cache).
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SLICE = 1 << 18


def _regrown_count(fraction: float, active: int) -> int:
    """How many of a layer's ``active`` entries an update drops, and regrows: at most all of them (the
    fraction is at most 1)."""
    return math.ceil(fraction * active)


def _zero_where_not(tensors: list[torch.Tensor], mask: torch.Tensor, also: torch.Tensor | None = None,
                    dest: torch.Tensor | None = None) -> None:
    """Set each of ``tensors`` (shaped like ``mask``) to zero where the bool ``mask`` (and ``also``) is False;
    ``dest``: then copy ``also`` (or ``mask``) there (``mask`` itself too)."""
    compiled = [t for t in tensors if t.is_floating_point() and native.can_zero([t], mask, also, dest)]
    rest = [t for t in tensors if not any(t is c for c in compiled)]
    if rest:                    # before ``dest`` is written: it may be ``mask``
        _zero_eager(rest, mask if also is None else torch.logical_and(mask, also))
    if compiled or (dest is not None and native.can_zero([], mask, also, dest)):
        native.zero_where_not(compiled, mask, also, dest)
    elif dest is not None:
        dest.copy_((mask if also is None else also).view(dest.shape))


def _zero_eager(tensors: list[torch.Tensor], mask: torch.Tensor) -> None:
    """``_zero_where_not`` without the compiled pass: by slices of the mask, as integers."""
    flat = mask.reshape(-1)
    fast = [t for t in tensors if t.is_floating_point() and t.is_contiguous() and t.element_size() in _BITS]
    for t in tensors:
        if not any(t is f for f in fast):
            t.masked_fill_(~mask, 0)
    views = [t.view(-1).view(_BITS[t.element_size()]) for t in fast]
    buffers = {v.dtype: torch.empty(min(_SLICE, flat.numel()), dtype=v.dtype, device=v.device) for v in views}
    for at in range(0, flat.numel(), _SLICE):
        part = flat[at:at + _SLICE]
        ones = {dtype: b[:len(part)].copy_(part) for dtype, b in buffers.items()}
        for v in views:
            v[at:at + _SLICE].mul_(ones[v.dtype])


def _with_total_steps(config: GraNetConfig, total_steps: int | None) -> GraNetConfig:
    """``config`` with ``total_steps`` from the controller when the config did not set it."""
    if total_steps is not None:
        if config.total_steps is not None and config.total_steps != total_steps:
            raise ValueError(
                f"total_steps is given twice: the config has {config.total_steps}, GraNet got {total_steps}"
            )
        return dataclasses.replace(config, total_steps=total_steps)   # validates it
    if config.total_steps is None and config.method in PRUNING_METHODS + REGROWTH_METHODS:
        raise ValueError(
            f"total_steps is required for method={config.method!r} (the number of optimizer steps of the "
            "whole run): set it in the config, GraNetConfig(total_steps=T), or give it to the controller, "
            "GraNet(model, optimizer, total_steps=T)"
        )
    return config
