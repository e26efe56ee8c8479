"""Split refresh work between ranks and share the results: owners, fitted entries, broadcast.

A refresh writes a few entries into a parameter's state (the basis, perhaps quantization
codes and scales, a fallback counter). The owner of a parameter computes them; the other
ranks receive exactly those entries, so every rank ends with bit-identical bases by
construction — not by trusting that two LAPACK calls on two ranks round the same way.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank per job, longest-first onto the least-loaded rank (ties: lowest index).

    Plain round-robin by index would give one rank both 4096×11008 MLP matrices of a
    layer pair and the other the 4096×4096 ones; greedy LPT keeps the busiest rank within
    4/3 of optimal. Deterministic, so every rank computes the same assignment.
    """
    load = [0.0] * world
    owners = [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[job] = owner
        load[owner] += costs[job]
    return owners


def fitted_entries(before: dict, after: dict) -> dict:
    """Entries a fit wrote: new keys, replaced tensors, changed plain scalars."""
    out = {}
    for key, value in after.items():
        old = before.get(key, _MISSING)
        if torch.is_tensor(value):
            if value is not old:
                out[key] = value
        elif old is _MISSING or old != value:
            out[key] = value
    return out


_MISSING = object()


def _describe(entries: dict) -> list[tuple]:
    return [(key, tuple(v.shape), v.dtype) if torch.is_tensor(v) else (key, None, v)
            for key, v in entries.items()]


def share_entries(fitted: dict[int, dict], device: torch.device, group=None) -> dict[int, dict]:
    """Every job's fitted entries on every rank.

    `fitted` maps job index -> entries for the jobs this rank owns. One all_gather_object
    of shapes/dtypes, then one broadcast per owner of all its tensors packed as bytes
    (W broadcasts per refresh, not one per tensor).
    """
    me, world = dist.get_rank(group), dist.get_world_size(group)
    layouts: list = [None] * world
    dist.all_gather_object(layouts, {job: _describe(e) for job, e in fitted.items()}, group=group)
    result: dict[int, dict] = {job: dict(e) for job, e in fitted.items()}
    for src in range(world):
        layout = layouts[src]
        if not layout:
            continue
        src_global = dist.get_global_rank(group, src) if group is not None else src
        sizes = [(job, key, shape, dtype) for job in sorted(layout) for key, shape, dtype
                 in layout[job] if shape is not None]
        nbytes = [torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                  for _, _, shape, dtype in sizes]
        if src == me:
            parts = [fitted[job][key].detach().contiguous().reshape(-1).view(torch.uint8)
                     for job, key, _, _ in sizes]
            buffer = torch.cat(parts).to(device) if parts else torch.empty(0, dtype=torch.uint8, device=device)
        else:
            buffer = torch.empty(sum(nbytes), dtype=torch.uint8, device=device)
        if buffer.numel():
            dist.broadcast(buffer, src=src_global, group=group)
        if src == me:
            continue
        offset = 0
        for (job, key, shape, dtype), size in zip(sizes, nbytes):
            chunk = buffer[offset: offset + size].clone()
            result.setdefault(job, {})[key] = chunk.view(dtype).reshape(shape)
            offset += size
        for job in layout:  # plain scalars travelled in the layout itself
            for key, shape, value in layout[job]:
                if shape is None:
                    result.setdefault(job, {})[key] = value
    return result


def broadcast_entries(entries: dict | None, owner: int, device: torch.device, group=None) -> dict:
    """One job's entries from `owner` to every rank (the unbatched path)."""
    me = dist.get_rank(group)
    fitted = {0: entries} if me == owner else {}
    return share_entries(fitted, device, group).get(0, {})
