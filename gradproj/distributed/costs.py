"""What FSDP2 costs per weight, by projection side: bytes sent and optimizer state per rank.

Exact counts from the shapes (no timing), for the memory planner and the docs. An m×n
weight is row-sharded over W ranks (m_k ≈ m/W rows each); r is the rank.

| side  | every step                          | moments per rank | basis per rank |
|-------|-------------------------------------|------------------|----------------|
| right | nothing (R = G_k·P is local rows)   | m_k×r (sharded)  | n×r (whole)    |
| left  | all-reduce of R's r×n partials      | r×n (replicated) | m×r (whole)    |
| full  | all-reduce of R's r×r partials      | r×r (replicated) | both (whole)   |

A ring all-reduce of F floats sends 2·(W−1)/W·F per rank. Refreshes add the range
finder's thin collectives (`rangefinder.range_finder_floats`), or — svd and the other
projectors — a gather of the m×n gradient onto one owner rank plus the basis broadcast.
At LLaMA-7B's down projection (4096×11008, left under "std"), r = 128, W = 8: the step's
all-reduce sends 2·7/8·128·11008·4 B = 9.9 MB per rank, against 78.9 MB for FSDP2's own
reduce-scatter of the bf16 gradient (7/8·4096·11008·2 B); the right side sends nothing.
"""
from __future__ import annotations

from ..projectors.base import sides_of
from .rangefinder import range_finder_floats

FLOAT_BYTES = 4  # R and the range finder's pieces are fp32


def allreduce_bytes(floats: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `floats` fp32 values."""
    return 0 if world <= 1 else 2 * (world - 1) * floats * FLOAT_BYTES // world


def step_bytes(shape: tuple[int, int], rank: int, side: str, world: int) -> int:
    """Bytes a rank sends per optimizer step to project one m×n weight (micro-batch: ×
    grad_accum in per-layer mode with projected accumulation)."""
    n = shape[1]
    floats = {"right": 0, "left": rank * n, "full": rank * rank}[side]
    return allreduce_bytes(floats, world)


def refresh_bytes(shape: tuple[int, int], rank: int, side: str, world: int, *,
                  collective: bool, oversample: int = 8, power_iters: int = 1) -> int:
    """Bytes a rank sends (at most) for one refresh of one weight's basis.

    `collective`: the randomized projector's row-sharded range finders (counted as
    all-reduces of their floats; an upper bound for the all-gathers); otherwise the
    owner-gather of the gradient (each rank's m_k×n rows) and the basis broadcast."""
    m, n = shape
    if world <= 1:
        return 0
    if collective:
        return sum(allreduce_bytes(range_finder_floats(m, n, rank, oversample, power_iters,
                                                       side=one), world)
                   for one in sides_of(side))
    rows = -(-m // world)
    basis = sum((m if one == "left" else n) * rank for one in sides_of(side))
    return (rows * n + basis) * FLOAT_BYTES


def state_elements(shape: tuple[int, int], rank: int, side: str, world: int) -> int:
    """Elements of one moment tensor of this weight held by the busiest rank under FSDP2."""
    m, n = shape
    if side == "right":
        return -(-m // world) * rank
    return {"left": rank * n, "full": rank * rank}[side]


__all__ = ["allreduce_bytes", "refresh_bytes", "state_elements", "step_bytes"]
