"""Projectors: the `PROJECTORS` plugin kind, and the side conventions they share.

A projector is a stateless strategy. Everything it needs between steps (the basis,
quantization scales, a seed, the rank) lives in the optimizer's per-parameter state dict
as tensors and plain scalars, so checkpoints are `weights_only`-safe.

Sides follow galore-torch. For a gradient G (m×n) and rank r:
  "left":  P is m×r, R = Pᵀ·G (r×n),   back(N) = P·N
  "right": P is n×r, R = G·P  (m×r),   back(N) = N·Pᵀ
  "full":  both,     R = Pₗᵀ·G·Pᵣ (r×r), back(N) = Pₗ·N·Pᵣᵀ
`proj_type` picks the side: "std" (right if m ≥ n else left), "reverse_std" (the
opposite), "left", "right", "full", or "auto" (the side with fewer bytes of optimizer
states + basis; see `resolve_side`).
"""
from __future__ import annotations

from typing import Callable

import torch

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full", "auto")
SIDES = ("left", "right", "full")
BASIS_KEYS = {"left": "proj_left", "right": "proj_right"}


def sides_of(side: str) -> tuple[str, ...]:
    return ("left", "right") if side == "full" else (side,)


def low_rank_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    m, n = shape
    return {"left": (rank, n), "right": (m, rank), "full": (rank, rank)}[side]


def basis_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """Shape of the one-sided basis P for `side` in ("left", "right")."""
    m, n = shape
    return (m, rank) if side == "left" else (n, rank)


def resolve_side(proj_type: str, shape: tuple[int, int],
                 cost: Callable[[str], int] | None = None) -> str:
    """The side for `proj_type` on an m×n weight; `cost(side)` in bytes decides "auto"."""
    m, n = shape
    std = "right" if m >= n else "left"
    if proj_type == "std":
        return std
    if proj_type == "reverse_std":
        return "left" if std == "right" else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    if proj_type == "auto":
        if cost is None:
            return std
        other = "left" if std == "right" else "right"
        # ties keep galore-torch's choice
        return other if cost(other) < cost(std) else std
    raise ValueError(f"option 'proj_type' must be one of {', '.join(PROJ_TYPES)}; got {proj_type!r}")


class Projector:
    """Base class. Subclasses implement `fit_side`; the rest follows from the basis.

    Capabilities (class attributes, read by the optimizer; the defaults are safe):
      `orthonormal` (False): PᵀP = I to fp32 rounding. A moment rotation then uses Pᵀ as
          the inverse; otherwise it solves with the pseudo-inverse.
      `batched` (True): `project`, `project_back` and `load_basis` accept a *bucket* — a
          stack of k same-shape gradients (k×m×n) with a `StackedState` whose tensors are
          the k parameters' state entries stacked — and act on each slice as on one
          weight. This class's methods are written that way (`.mT`, `@` broadcasts over
          the leading dimension; the basis is read from `state[BASIS_KEYS[side]]`). A
          subclass that overrides one of them with 2-D-only code, or stores its basis
          elsewhere, sets `batched = False` and is called once per weight.
    """

    orthonormal: bool = False
    batched: bool = True

    def __init__(self, **options):
        if options:
            raise ValueError(f"{type(self).__name__} got unknown options: {', '.join(sorted(options))}")

    # -- fitting -----------------------------------------------------------------
    def fit(self, grad: torch.Tensor, state: dict, *, rank: int, side: str, seed: int,
            dtype: torch.dtype) -> None:
        """Compute a new basis for fp32 `grad` (m×n) and store it in `state`."""
        state["rank"] = rank
        for one in sides_of(side):
            self.store_basis(state, one, self.fit_side(grad, rank, one, seed), dtype)

    def fit_side(self, grad: torch.Tensor, rank: int, side: str, seed: int) -> torch.Tensor:
        """Return the orthonormal fp32 basis for one side: m×r (left) or n×r (right)."""
        raise NotImplementedError

    def store_basis(self, state: dict, side: str, basis: torch.Tensor, dtype: torch.dtype) -> None:
        state[BASIS_KEYS[side]] = basis.to(dtype)

    def load_basis(self, state: dict, side: str, shape: tuple[int, int]) -> torch.Tensor:
        """The fp32 basis for one side of an m×n weight."""
        return state[BASIS_KEYS[side]].float()

    def basis_nbytes(self, shape: tuple[int, int], rank: int, side: str, dtype: torch.dtype) -> int:
        """Exact bytes `fit` stores for this side choice (used by "auto" and the planner)."""
        size = torch.empty((), dtype=dtype).element_size()
        total = 0
        for one in sides_of(side):
            rows, cols = basis_shape(shape, rank, one)
            total += rows * cols * size
        return total

    # -- applying ----------------------------------------------------------------
    def project(self, grad: torch.Tensor, state: dict, side: str) -> torch.Tensor:
        """R = Pᵀ·G / G·P / Pₗᵀ·G·Pᵣ for an m×n G (or a k×m×n bucket when `batched`)."""
        shape = tuple(grad.shape[-2:])
        if side in ("left", "full"):
            grad = self.load_basis(state, "left", shape).mT @ grad
        if side in ("right", "full"):
            basis = self.load_basis(state, "right", shape)
            # G·P, except at r = 1: there it is a matrix-vector product that torch computes
            # differently for one matrix and for a batch (last-bit differences), and
            # (Pᵀ·Gᵀ)ᵀ gives every slice of a bucket the bits it gets alone. Not always:
            # that form and its copy cost 3.5× G·P's time on a 24×172×64 stack, r = 8
            grad = grad @ basis if basis.shape[-1] > 1 else (basis.mT @ grad.mT).mT.contiguous()
        return grad

    def project_back(self, low: torch.Tensor, state: dict, side: str,
                     shape: tuple[int, int]) -> torch.Tensor:
        """back(N) = P·N / N·Pᵀ / Pₗ·N·Pᵣᵀ, m×n (k×m×n for a bucket)."""
        if side in ("left", "full"):
            low = self.load_basis(state, "left", shape) @ low
        if side in ("right", "full"):
            low = low @ self.load_basis(state, "right", shape).mT
        return low
