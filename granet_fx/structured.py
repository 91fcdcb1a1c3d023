"""Masks decided per channel or per N:M group, for ``sparsify`` and the ``GraNet`` controller.

The masks stay full-shape bool buffers, one per weight, so the mask nodes,
``torch.compile`` and export work as for unstructured sparsity; only the
choice of which entries are True changes.

- ``granularity="channel"``: a channel is one index of a ``ChannelGroup``
  (output channels that must go together: a conv, its batch norm, the
  residual adds and depthwise convs that share them). It is pruned where it
  is read: the columns of every layer that reads it are masked, so nothing
  uses it and ``compact`` removes it with everything that makes it. Pruning
  and dropping rank channels by the L2 norm of their weight rows; regrowth
  ranks pruned channels by the L2 norm of the dense gradient of those masked
  columns. (Masking the rows instead would leave no gradient to rank: a
  channel of zeros sits where ReLU's derivative is zero.) Regrown columns
  start at zero; the rows kept their values. ``final_sparsity`` is the
  fraction of output channels (rows) pruned among the layers whose channels
  can be removed; pinned groups keep all their channels. The global ranking
  (``scope="global"``) leaves every group at least ``channel_floor`` x the
  density of its channels (0: the pure global ranking; 1: every group keeps
  the density, as with ``scope="layer"``), so that no stage is starved by
  layers whose weights happen to be larger. With ``channel_multiple=k`` every group keeps a multiple of k
  channels (the nearest to what the ranking chose, never below the floor),
  which suits the SIMD blocks of CPU convolution kernels; "auto" picks the
  block of onnxruntime's NCHWc kernels on the CPU that trains, "measured" a
  multiple per group from the onnxruntime speed of the group's own layers on
  that CPU (``export/calibrate.py``, measured once and cached).
- ``granularity="n:m"``: in every group of M consecutive input weights (along
  dimension 1, for each output channel and kernel position) N are kept at the
  end. The cubic schedule is followed group by group: at sparsity s each group
  keeps round(M (1 - s)) weights, never fewer than N. Regrowth drops the
  layer's smallest weights and refills the same groups with the largest
  gradients, so the pattern holds at every step.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .criteria import (
    channel_norms, drop_smallest, grow_largest, nm_keep_largest, nm_refill, prune_channels, round_kept,
)
from .passes.channel_groups import ChannelGroup, channel_groups, named_tensors
from .passes.layer_norms import mask_layer_norms, restore_norms


def init_structured_masks(model: nn.Module, info, example_inputs: Any, generator: torch.Generator) -> None:
    """For ``sparsify``: find channel groups if needed, then write the initial structured masks."""
    config = info.config
    if config.granularity == "channel":
        if example_inputs is None:
            raise ValueError(
                "granularity='channel' needs example_inputs: the channels that must be pruned together "
                "are found by capturing the model on them"
            )
        info.channel_groups = _mask_layer_norms(model, channel_groups(model, example_inputs),
                                                {l.name for l in info.masked})
    masks = structured_masks(model, info)
    if isinstance(masks, ChannelMasks) and not masks.groups:
        reasons = Counter(g.pinned[0] for g in info.channel_groups if g.pinned)
        why = "; ".join(f"{r} ({n} groups)" for r, n in reasons.most_common(3)) or "no layer reads another's channels"
        warnings.warn(f"granet_fx: granularity='channel' found no channel that can be removed, so the model "
                      f"stays dense; the channels stay because: {why}", stacklevel=3)
    if masks is not None:
        masks.initialize(config.start_sparsity, generator)


def _removable(group: ChannelGroup, masked: set[str], norms: bool = True) -> bool:
    """Whether channel pruning can take channels from ``group``: not pinned, made and read by layers
    whose columns are masked, and (``norms``) normalised only by layer norms that ignore what they do not keep."""
    return not group.pinned and bool(group.rows) and bool(group.columns) \
        and all(c.weight in masked and c.mask for c in group.columns) \
        and (not norms or all(m.mask for m in group.members if m.layer_norm))


def _mask_layer_norms(model: nn.Module, groups: list[ChannelGroup], masked: set[str]) -> list[ChannelGroup]:
    """``groups`` with the layer norms of the removable ones made ``masked_layer_norm`` (their ``keep``
    buffer as the member's mask); a layer norm that cannot be (not in a traced graph) leaves its group whole."""
    norms = {m.weight for g in groups if _removable(g, masked, norms=False) for m in g.members if m.layer_norm}
    keeps = mask_layer_norms(model, norms) if norms else {}
    for g in groups:
        g.members = [replace(m, mask=keeps.get(m.weight)) if m.layer_norm and m.mask is None else m
                     for m in g.members]
    restore_norms(model, norms)    # the RMS norms that sparsify made masked (recognise_rms_norms) and no group needs
    for g in groups:
        if not _removable(g, masked):
            g.members = [replace(m, mask=None) if m.layer_norm and m.weight not in norms else m for m in g.members]
    return groups


def channel_multiple(value: int | str) -> int | str:
    """``GraNetConfig.channel_multiple`` as a number ("measured" stays: it is found per group): "auto" is
    the channel block of onnxruntime's NCHWc convolutions on this CPU, 16 floats with AVX-512 and 8
    otherwise (AVX2), the widths that run without padding (benchmarks/speedup.py measures them)."""
    if value != "auto":
        return value
    return 16 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 8


def structured_masks(model: nn.Module, info) -> "ChannelMasks | NMMasks | None":
    """The mask logic of ``info.config.granularity``; None for unstructured sparsity."""
    if info.config.granularity == "channel":
        return ChannelMasks(model, info.channel_groups, [l.name for l in info.masked],
                            channel_multiple(info.config.channel_multiple), info.config.channel_floor,
                            1.0 - info.config.final_sparsity)
    if info.config.nm is not None:
        from .sparsify import mask_units   # sparsify imports this module

        return NMMasks(model, mask_units(info.masked), *info.config.nm)
    return None


class ChannelMasks:
    """Whole-channel masks over the groups whose channels may be removed."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], masked: list[str], multiple: int | str = 1,
                 floor: float = 0.5, density: float = 0.5):
        self.floor = floor
        self.masked = set(masked)
        self.groups = [g for g in groups if _removable(g, self.masked)]
        self.costs = [sum(r.repeat for r in g.rows) for g in self.groups]   # rows per channel (a head has many)
        self.total = sum(g.size * c for g, c in zip(self.groups, self.costs))
        self.tensors = named_tensors(model)
        if multiple == "measured":   # per group, at the final density
            from .export.calibrate import measured_multiples

            self.multiples = measured_multiples(self.tensors, self.groups, density)
        else:   # ``multiple`` in each group's channels: a head 64 channels wide is already a multiple of 8
            self.multiples = [multiple // math.gcd(multiple, g.rows[0].repeat) for g in self.groups]
        self.positions = [[c.indices(torch.arange(g.size)) for c in g.columns] for g in self.groups]

    def _rows(self, i: int) -> list[torch.Tensor]:
        """Each row layer's weights, a channel per row; an attention head's rows scaled by
        1/sqrt(rows) so that its norm is a root mean square over them, like one channel's."""
        g = self.groups[i]
        return [r.channels(self.tensors[r.weight].detach(), g.size) / math.sqrt(r.repeat) for r in g.rows]

    def _gradient_columns(self, i: int) -> list[torch.Tensor | None]:
        """The group's columns of every reader's weight gradient (None where there is none), channels first."""
        g = self.groups[i]
        grads = [self.tensors[c.weight].grad for c in g.columns]
        return [None if t is None else c.channels(t, g.size) for c, t in zip(g.columns, grads)]

    def keeps(self) -> list[torch.Tensor]:
        """Per group, which channels are kept (read from the masks, the state that is saved)."""
        return [g.columns[0].channels(self.tensors[g.columns[0].mask], g.size).all(1) for g in self.groups]

    @torch.no_grad()
    def set(self, keeps: list[torch.Tensor]) -> None:
        """Mask the columns of the channels not kept, and leave them out of the layer norms' statistics."""
        for g, positions, keep in zip(self.groups, self.positions, keeps):
            for c, idx in zip(g.columns, positions):
                mask = c.oriented(self.tensors[c.mask])
                value = keep.repeat_interleave(c.repeat).to(mask.device)
                mask[:, idx.to(mask.device)] = value.view(1, -1, *[1] * (mask.dim() - 2)).expand(
                    mask.shape[0], -1, *mask.shape[2:])
            for n in g.members:
                if n.layer_norm:
                    buffer = self.tensors[n.mask]
                    buffer[n.indices(torch.arange(g.size)).to(buffer.device)] = keep.to(buffer.device)

    @torch.no_grad()
    def initialize(self, sparsity: float, generator: torch.Generator) -> None:
        if sparsity > 0:
            keeps = []
            for g, multiple in zip(self.groups, self.multiples):
                score = torch.rand(g.size, generator=generator)
                keep = grow_largest(score, torch.zeros(g.size, dtype=torch.bool), max(1, round((1 - sparsity) * g.size)))
                keeps.append(round_kept(score, keep, multiple))
            self.set(keeps)
        for g in self.groups:
            for c in g.columns:
                self.tensors[c.weight].mul_(self.tensors[c.mask])

    def minimum(self, sparsity: float) -> list[int]:
        """Per group, the channels the global ranking must leave it: ``floor`` x the density ``1 - sparsity``
        of them, rounded up to a multiple of ``multiple`` so that rounding keeps them."""
        share = self.floor * (1.0 - sparsity)
        return [min(g.size, k * math.ceil(math.ceil(share * g.size - 1e-9) / k))
                for g, k in zip(self.groups, self.multiples)]

    @torch.no_grad()
    def prune(self, sparsity: float, scope: str) -> None:
        if not self.groups:
            return
        keeps = self.keeps()
        scores = [channel_norms(self._rows(i)) for i in range(len(self.groups))]
        if scope == "global":
            new = prune_channels(scores, keeps, self.costs, round((1 - sparsity) * self.total),
                                 self.minimum(sparsity))
        else:
            new = [drop_smallest(s, k, int(k.sum()) - max(1, round((1 - sparsity) * g.size)))
                   for g, s, k in zip(self.groups, scores, keeps)]
        self.set([round_kept(s, k, m) for s, k, m in zip(scores, new, self.multiples)])

    @torch.no_grad()
    def regrow(self, fraction: float, generator: torch.Generator | None = None) -> None:
        """Drop ``fraction`` of each group's channels by weight norm; regrow as many by the gradient norm
        of their masked columns (at random with a generator, for SET)."""
        new = []
        for i, (g, keep) in enumerate(zip(self.groups, self.keeps())):
            grads = self._gradient_columns(i)
            if any(x is None for x in grads):
                new.append(keep)
                continue
            n = math.ceil(fraction * int(keep.sum()))
            kept = drop_smallest(channel_norms(self._rows(i)), keep, n)
            score = torch.rand(g.size, generator=generator) if generator is not None else channel_norms(grads)
            new.append(grow_largest(score.to(keep.device), kept, n))
        self.set(new)

    def active(self) -> dict[str, int]:
        """Weights that still compute something, per masked weight: its mask, less the rows of the
        channels that nothing reads."""
        effective = {}
        for g, keep in zip(self.groups, self.keeps()):
            pruned = (~keep).nonzero().squeeze(1)
            for r in g.rows:
                if r.weight in self.masked and r.mask and len(pruned):
                    if r.weight not in effective:
                        effective[r.weight] = self.tensors[r.mask].clone()
                    r.oriented(effective[r.weight])[r.indices(pruned).to(effective[r.weight].device)] = False
        return {name: int(m.sum()) for name, m in effective.items()}


class NMMasks:
    """N of every M consecutive input weights kept, in every masked layer."""

    def __init__(self, model: nn.Module, units, n: int, m: int):
        """``units``: the ``sparsify.MaskUnit`` of each masked weight (one per expert of a stack)."""
        self.n, self.m = n, m
        self.weights = [u.of(model.get_parameter(u.layer.name)) for u in units]   # views of the weights
        self.masks = [u.of(model.get_buffer(u.layer.mask_name)) for u in units]
        self._params = [model.get_parameter(u.layer.name) for u in units]
        self._units = units
        for unit, w in zip(units, self.weights):
            if w.dim() < 2 or w.shape[1] % m:
                size = w.shape[1] if w.dim() >= 2 else 1
                name = unit.layer.name
                raise ValueError(
                    f"granularity='{n}:{m}' groups {m} consecutive input weights, but {unit.name} has "
                    f"{size} inputs, not a multiple of {m}; keep it dense with exclude="
                    f"({name.rpartition('.')[0]!r},)"
                )

    def per_group(self, sparsity: float) -> int:
        return min(self.m, max(self.n, round(self.m * (1 - sparsity))))

    @torch.no_grad()
    def initialize(self, sparsity: float, generator: torch.Generator) -> None:
        k = self.per_group(sparsity)
        for w, mask in zip(self.weights, self.masks):
            if k < self.m:
                score = torch.rand(mask.shape, generator=generator).to(mask.device)
                mask.copy_(nm_keep_largest(score, torch.ones_like(mask), k, self.m))
            w.mul_(mask)

    @torch.no_grad()
    def prune(self, sparsity: float, scope: str) -> None:
        k = self.per_group(sparsity)
        for w, mask in zip(self.weights, self.masks):
            mask.copy_(nm_keep_largest(w.abs(), mask, k, self.m))

    @torch.no_grad()
    def regrow(self, fraction: float, generator: torch.Generator | None = None) -> None:
        for w, mask, p, unit in zip(self.weights, self.masks, self._params, self._units):
            if p.grad is None:
                continue
            grad = unit.of(p.grad)
            active = int(mask.sum())
            k = active // (mask.numel() // self.m)
            kept = drop_smallest(w.abs(), mask, math.ceil(fraction * active))
            score = torch.rand(mask.shape, generator=generator).to(mask.device) if generator is not None \
                else grad.abs()
            mask.copy_(nm_refill(score, kept, k, self.m))

    def active(self) -> dict[str, int]:
        return {}
