"""Per-rank memory of a multi-process launch: what one of N ranks holds under DDP or FSDP2.

    plan = gp.plan_memory("examples/llama-7b-galore.toml", launch="ddp", nproc=8)

`[train] batch_size` is the global batch, so every launch traces activations for
batch_size / N sequences. Then:
  * DDP — weights and optimizer states are replicated (each rank holds all of them).
    Gradients: every `.grad` plus the reducer's flat buckets, which hold a second copy of
    every gradient for the whole run (DistributedDataParallel allocates them when it
    wraps the model; gradient_as_bucket_view = False, as `distributed/wrap.py` builds it).
    In per-layer mode the model is not wrapped (`distributed/perlayer.py`): alive at once
    are the bucket being filled, the one being all-reduced and the gradient being copied
    in, over DDP's buckets (25 MiB, 1 MiB first; a larger gradient alone) in reverse
    parameter order —
    `ddp_per_layer_peak` follows the stepper event by event, so it is exact for one
    micro-batch; with k > 1 it adds that bucket term to one process's per-layer figure
    (full-rank `.grad` kept, fp32 sums of R), a bound.
  * FSDP2 — weights, gradients and optimizer states are row-sharded (Shard(0), the
    largest rank's ceil(m/N) rows); each state is allocated by `init_state` on a
    shard-shaped meta tensor, as the FSDP2 step does on its local rows, with the
    projection side and low-rank choice made on the whole weight. So a right basis P
    (n×r) is replicated and the moments m/N×r sharded; a left one shards P (m/N×r) and
    replicates the r×n moments. Buffers are replicated. Not counted: the unsharded
    weights and gradients of the FSDP unit being all-gathered or reduce-scattered (a
    note gives the largest unit's size).
"""
from __future__ import annotations

import math

import torch

from ..optimizers.lowrank import LowRankOptimizer, matrix_shape
from ..projectors.base import low_rank_shape
from ..quant.linear import is_quantized
from .accounting import grad_nbytes, gradient_bytes, nbytes, weight_bytes

LAUNCHES = ("none", "ddp", "fsdp2")


def trained(optimizer: LowRankOptimizer) -> list[tuple[torch.Tensor, dict]]:
    return [(p, g) for g in optimizer.param_groups for p in g["params"]
            if p.requires_grad or is_quantized(p)]


def backward_order(model: torch.nn.Module, optimizer: LowRankOptimizer) -> list:
    """(p, group) in the order backward produces gradients: the module's, reversed."""
    group_of = {p: g for p, g in trained(optimizer)}
    ordered = [p for p in model.parameters() if p in group_of]
    seen = set(ordered)
    ordered += [p for p in group_of if p not in seen]
    return [(p, group_of[p]) for p in reversed(ordered)]


FIRST_BUCKET_BYTES = 1024 * 1024        # = distributed.perlayer's (imported lazily: cycle)
BUCKET_CAP_BYTES = 25 * 1024 * 1024


def ddp_bucket_peak(sizes: list[tuple[int, torch.dtype]],
                    limits: tuple[int, int] = (FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES)) -> int:
    """Peak bytes of per-layer DDP's reduction of tensors of `sizes`, arriving in order:
    while bucket j fills, bucket j−1 is being all-reduced; a bucket of several tensors is
    a new buffer the arriving tensor is copied into, a bucket of one is that tensor."""
    from ..distributed.perlayer import bucket_assignment
    peak, previous = 0, 0
    for members in bucket_assignment(sizes, list(limits), large_alone=True):
        size = sum(sizes[i][0] for i in members)
        if len(members) > 1:
            peak = max(peak, previous + size + max(sizes[i][0] for i in members))
        else:
            peak = max(peak, previous + size)
        previous = size
    return peak


def ddp_gradient_bytes(model: torch.nn.Module, optimizer: LowRankOptimizer, *,
                       per_layer: bool = False, grad_accum: int = 1,
                       limits: tuple[int, int] = (FIRST_BUCKET_BYTES, BUCKET_CAP_BYTES)
                       ) -> tuple[int, dict]:
    """Gradient bytes alive at the peak on one DDP rank, and where they are; `limits`:
    the per-layer stepper's (first, other) bucket sizes."""
    order = backward_order(model, optimizer)
    grads = sum(grad_nbytes(p) for p, _ in order)
    if not per_layer:
        # DDP buckets what requires grad; an INT8 weight's gradient is not reduced by it
        buckets = sum(grad_nbytes(p) for p in model.parameters() if p.requires_grad)
        return grads + buckets, {".grad": grads, "reducer buckets": buckets}
    full = [(grad_nbytes(p), getattr(p, "grad_dtype", None) or p.dtype) for p, _ in order]
    if grad_accum <= 1:
        peak = ddp_bucket_peak(full, limits)
        return peak, {"buckets + one .grad": peak}
    last = []  # the last micro-batch reduces the fp32 sums of R and the other full gradients
    for (p, group), size in zip(order, full):
        if optimizer.accumulates_low_rank(p, group):
            shape = low_rank_shape(matrix_shape(p), group["rank"], optimizer.side(p, group))
            last.append((4 * math.prod(shape), torch.float32))
        else:
            last.append(size)
    fits = [size for (p, group), size in zip(order, full)
            if optimizer.accumulates_low_rank(p, group)]  # a refresh step's first micro-batch
    buckets = max(ddp_bucket_peak(last, limits), ddp_bucket_peak(fits, limits) if fits else 0)
    one = gradient_bytes(optimizer, per_layer=True, grad_accum=grad_accum)
    return one + buckets, {"kept .grad + sums of R + one .grad": one, "buckets": buckets}


class _ShardPlanner(LowRankOptimizer):
    """The optimizer on shard-shaped meta tensors; low-rank choice and side are made on the
    whole weight, as `DistributedLowRankOptimizer` does for FSDP2's local rows."""

    def __init__(self, params, global_of: dict, **options):
        self._global = global_of
        super().__init__(params, **options)

    def is_low_rank(self, p, group):
        return super().is_low_rank(self._global.get(p, p), group)

    def side(self, p, group):
        return super().side(self._global.get(p, p), group)


def shard_rows(p: torch.Tensor, world: int) -> torch.Tensor:
    """A meta tensor shaped like rank 0's (the largest) FSDP2 shard of p."""
    if p.dim() == 0:
        return p
    shape = (math.ceil(p.shape[0] / world), *p.shape[1:])
    local = torch.empty(shape, dtype=p.dtype, device="meta", requires_grad=p.requires_grad)
    if getattr(p, "grad_dtype", None) is not None:
        local.grad_dtype = p.grad_dtype
    return local


def fsdp2_optimizer(optimizer: LowRankOptimizer, world: int) -> tuple[LowRankOptimizer, dict]:
    """The same groups over shard-shaped parameters; and {shard: whole weight}."""
    global_of, groups = {}, []
    for group in optimizer.param_groups:
        shards = []
        for p in group["params"]:
            local = shard_rows(p, world)
            global_of[local] = p
            shards.append(local)
        groups.append({**group, "params": shards})
    return _ShardPlanner(groups, global_of, **optimizer.defaults), global_of


def fsdp2_weight_bytes(model: torch.nn.Module, world: int) -> tuple[int, int]:
    """(weight, scale) bytes of rank 0's parameter shards plus every buffer (FSDP2 leaves
    buffers replicated)."""
    return weight_bytes(model, lambda p: nbytes(shard_rows(p, world)))


def largest_unit_bytes(model: torch.nn.Module) -> int:
    """Bytes of the largest FSDP2 unit's unsharded parameters: one block of a ModuleList,
    or the root's own (embeddings, head, norms)."""
    from ..distributed.wrap import blocks
    units = blocks(model)
    inside = {id(p) for unit in units for p in unit.parameters()}
    root = sum(nbytes(p) for p in model.parameters() if id(p) not in inside)
    return max([root, *(sum(nbytes(p) for p in unit.parameters()) for unit in units)])


__all__ = ["LAUNCHES", "backward_order", "ddp_bucket_peak", "ddp_gradient_bytes",
           "fsdp2_optimizer", "fsdp2_weight_bytes", "largest_unit_bytes", "shard_rows"]
