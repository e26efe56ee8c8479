"""Buckets: the parameters of a group that step together, and their states seen as one.

A bucket holds the parameters of one group that share (low-rank or not, shape, dtype,
device, INT8 or dense); with the group's plugins that fixes the side and the low-rank
shape, so everything a step computes for them has one shape and can be stacked along a
new leading dimension: k gradients become one k×m×n tensor, k projections one batched
matmul, k Adam updates one elementwise pass. A LLaMA block has 3–4 such shapes, so a
32-layer model steps in a handful of buckets (each holding at most `bucket_cap_mb` of
gradients), and the number of ops a step dispatches does not grow with the number of
layers.

`StackedState` (`gradproj/stacked_state.py`) presents the k per-parameter state dicts of a
bucket as one mapping of stacked tensors; each parameter's entry stays a view of the stack,
so `optimizer.state[p]` still holds everything (checkpoints, the memory accounting and
per-weight steps read it as before).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..quant.linear import is_quantized
from ..stacked_state import StackedState


# `bucket_cap_mb = "auto"`: 256 MiB, which keeps LLaMA-1B's MLP weights (44.7 MB) 5 to a
# bucket and a 7B's (180 MB) one. Stacking k gradients costs one pass over them and saves
# k−1 dispatches of every op: on a GPU (3 TB/s against ~5 µs a launch) that pays up to
# ~16 MB a weight; on a CPU only for small weights — a 256 KiB copy takes ~50 µs here,
# about what the ~20 ops of one weight cost — so there larger weights step alone
# (60M LLaMA on this 2-core machine, one thread: 988 ms per step with its 1–64 MiB
# weights alone, 1293 ms stacked; galore-torch 915 ms).
AUTO_CAP_MB = 256
CPU_STACK_MAX_BYTES = 256 * 2 ** 10


def cap_bytes(cap_mb: float | str, p: torch.Tensor) -> float:
    """The most fp32 gradient bytes a bucket of weights like `p` stacks (0: p steps alone)."""
    if cap_mb != "auto":
        return cap_mb * 2 ** 20
    if p.device.type == "cpu" and 4 * p.numel() >= CPU_STACK_MAX_BYTES:
        return 0
    return AUTO_CAP_MB * 2 ** 20


def partition(params: list[torch.Tensor], low_rank, side, cap_mb) -> list["Bucket"]:
    """`params` in buckets of one layout, in order of first appearance, each holding at most
    `cap_bytes` of fp32 gradients; `low_rank(p)` and `side(p)` are the optimizer's."""
    open_buckets: dict[tuple, Bucket] = {}
    buckets = []
    for p in params:
        projected = low_rank(p)
        layout = (projected, tuple(p.shape), p.dtype, p.device, is_quantized(p))
        bucket = open_buckets.get(layout)
        if bucket is None or 4 * p.numel() * (len(bucket.params) + 1) > cap_bytes(cap_mb, p):
            bucket = open_buckets[layout] = Bucket([], projected, side(p) if projected else None)
            buckets.append(bucket)
        bucket.params.append(p)
    return buckets


@dataclass
class Bucket:
    """Parameters of one group that step as one, and the stacks of their state.

    Usually the whole bucket steps together; where its parameters' rule steps differ
    (moments reset at different refreshes) it steps in subsets (`members`, indices into
    `params`), each with stacks of its own.
    """

    params: list[torch.Tensor]
    low_rank: bool
    side: str | None = None          # projection side (low-rank buckets)
    subsets: dict[tuple[int, ...], tuple[dict, dict]] = field(default_factory=dict)

    def state(self, members: tuple[int, ...], states: list[dict]) -> "StackedState":
        kept = self.subsets.get(members)
        if kept is None:  # a new subset: the stacks of subsets it overlaps lose their views
            for other in [m for m in self.subsets if not set(m).isdisjoint(members)]:
                del self.subsets[other]
            kept = self.subsets[members] = ({}, {})
        return StackedState(states, *kept)
