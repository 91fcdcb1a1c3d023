"""Selection across shards: the few collectives the criteria need, and FSDP2's sharded weights.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every weight is a DTensor
sharded on dimension 0: each rank holds a contiguous block of rows, rank 0 the
first. The criteria then work on each rank's rows and agree through a
``Comm``: sums of counts, a table of per-rank counts, and the concatenation of
a few candidate scores. ``LOCAL`` is the one-process ``Comm``, which makes
the same code the single-process code.
"""

from __future__ import annotations

import math
import sys
from typing import Sequence

import torch
import torch.distributed as dist


class Comm:
    """One process: every collective is the identity."""

    rank = 0
    world = 1

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (ints stay ints)."""
        return list(values)

    def table(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``values`` (same length on all ranks), stacked in rank order: (world, n)."""
        return values.unsqueeze(0)

    def cat(self, values: torch.Tensor) -> torch.Tensor:
        """Every rank's 1-D ``values`` (any length) concatenated in rank order."""
        return values


LOCAL = Comm()


class GroupComm(Comm):
    """The ranks of a process group (FSDP2's mesh); every rank must make the same calls."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def sum(self, values: Sequence[float]) -> list[float]:
        if not values:
            return []
        exact = all(isinstance(v, int) for v in values)
        t = torch.tensor(list(values), dtype=torch.int64 if exact else torch.float64)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def table(self, values: torch.Tensor) -> torch.Tensor:
        out = [torch.empty_like(values) for _ in range(self.world)]
        dist.all_gather(out, values.contiguous(), group=self.group)
        return torch.stack(out)

    def cat(self, values: torch.Tensor) -> torch.Tensor:
        sizes = self.table(torch.tensor([values.numel()])).flatten().tolist()
        padded = values.new_zeros(max(sizes))
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def allot_last(table: torch.Tensor, n: int, rank: int) -> list[int]:
    """How many of this rank's entries, per tensor, are the last ``n`` in the global order.

    ``table[r, u]`` counts rank r's entries of tensor u; the global order is
    tensor by tensor, and inside a tensor rank by rank (each rank's rows follow
    the previous rank's).
    """
    mine = [0] * table.shape[1]
    for u in reversed(range(table.shape[1])):
        for r in reversed(range(table.shape[0])):
            take = min(int(table[r, u]), n)
            n -= take
            if r == rank:
                mine[u] = take
    return mine


# FSDP2's sharded weights ---------------------------------------------------


def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (what ``fully_shard`` turns a parameter and its gradient into).

    Called on every forward's mask nodes: until something has imported
    ``torch.distributed.tensor`` (half a second) no tensor can be one, so it is
    not imported here.
    """
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (the same storage); any other tensor as it is."""
    return t.to_local() if is_sharded(t) else t


def comm_for(params: Sequence[torch.Tensor]) -> Comm:
    """``LOCAL`` for plain weights; for FSDP2's, a ``GroupComm`` over their mesh.

    Only dimension-0 sharding on one mesh dimension (``fully_shard``'s) is
    supported; other layouts are refused by name.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return LOCAL
    from torch.distributed.tensor import Shard

    if len(sharded) != len(params):
        raise ValueError("granet_fx: some masked weights are sharded (FSDP2) and some are not; "
                         "fully_shard the whole model (the root module last)")
    mesh = sharded[0].device_mesh
    for p in sharded:
        if p.device_mesh != mesh or tuple(p.placements) != (Shard(0),):
            raise ValueError(
                f"granet_fx: a masked weight is laid out as {tuple(p.placements)} on mesh {p.device_mesh}; "
                "only fully_shard's layout (Shard(0) on one 1-D mesh) is supported, not HSDP or tensor parallel"
            )
    return GroupComm(mesh.get_group())


def row_offset(rows: int, local_rows: int, comm: Comm) -> int:
    """The first global row of this rank's shard of a ``rows``-row tensor (``torch.chunk``'s split)."""
    chunk = math.ceil(rows / comm.world) if rows else 0
    offset = min(comm.rank * chunk, rows)
    if local_rows != min(chunk, rows - offset):
        raise ValueError(f"granet_fx: a shard of {local_rows} rows of {rows} on rank {comm.rank} is not "
                         f"fully_shard's even split; only dimension-0 chunks are supported")
    return offset


def shard_like(full: torch.Tensor, param: torch.Tensor, offset: int) -> torch.Tensor:
    """``full`` (a whole mask) as a DTensor sharded like ``param``, keeping only this rank's rows."""
    from torch.distributed.tensor import DTensor

    rows = param.to_local().shape[0]
    return DTensor.from_local(full[offset:offset + rows].clone(), param.device_mesh, param.placements,
                              shape=full.shape, stride=full.stride(), run_check=False)
