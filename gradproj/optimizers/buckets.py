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

With `gradient_as_bucket_view` (as DDP's option of that name) the first stack of a
bucket's gradients becomes the parameters' `.grad`: slice i of one k×… buffer is
params[i].grad, backward accumulates into it in place, and later steps read the buffer as
it is instead of copying k gradients into a new one (one read and one write of every
gradient a step: on a GPU as many bytes as the projected step's own reads of G).
`LowRankOptimizer.zero_grad` zeroes such a buffer in place, one op a bucket, and keeps it.
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
# weights alone, 1293 ms stacked; galore-torch 915 ms). Not only for the copy: with
# gradient views (no copy) the stacked 60M step took 0.93–0.97× the time of weights
# alone, but the 130M one 1.06× (its k×m×n temporaries, ~75 MB a bucket, leave the
# caches; benchmarks/step_time.py, one thread), so large weights step alone either way.
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
    grad_buffer: torch.Tensor | None = None    # k×…: slice i is params[i].grad (bucket views)
    grad_views: tuple[torch.Tensor, ...] = ()

    def gradients(self, grads: list[torch.Tensor], as_view: bool) -> torch.Tensor:
        """The k gradients as one k×… tensor: the bucket's buffer where every gradient is
        still its slice; otherwise a new stack, which becomes the buffer with `as_view`."""
        if self.viewed(grads):
            return self.grad_buffer
        if len(grads) == 1:
            return grads[0].unsqueeze(0)
        stacked = torch.stack(grads)
        if as_view and all(type(g) is torch.Tensor and g.layout == torch.strided
                           and g.dtype == p.dtype for p, g in zip(self.params, grads)):
            self.grad_buffer, self.grad_views = stacked, stacked.unbind(0)
            for p, view in zip(self.params, self.grad_views):
                p.grad = view
        return stacked

    def attach_views(self) -> None:
        """Zero the buffer in place (one op) and make its slices the parameters' `.grad`."""
        self.grad_buffer.zero_()
        for p, view in zip(self.params, self.grad_views):
            p.grad = view

    def viewed(self, grads: list[torch.Tensor] | None = None) -> bool:
        """Whether `grads` (default: the parameters' .grad) are all slices of the buffer."""
        if not self.grad_views:
            return False
        grads = [p.grad for p in self.params] if grads is None else grads
        return all(g is v for g, v in zip(grads, self.grad_views))

    def state(self, members: tuple[int, ...], states: list[dict]) -> "StackedState":
        kept = self.subsets.get(members)
        if kept is None:  # a new subset: the stacks of subsets it overlaps lose their views
            for other in [m for m in self.subsets if not set(m).isdisjoint(members)]:
                del self.subsets[other]
            kept = self.subsets[members] = ({}, {})
        return StackedState(states, *kept)


def view_buckets(cache: dict) -> list[Bucket]:
    """The distinct buckets of an optimizer's bucket cache that hold gradient views."""
    unique = {id(b): b for buckets in cache.values() for b in buckets if b.grad_views}
    return list(unique.values())
