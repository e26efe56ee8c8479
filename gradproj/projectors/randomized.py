"""Randomized range finder (Halko, Martinsson & Tropp 2011, Alg. 4.4 + 5.1)."""
from __future__ import annotations

import torch

from ..registry import PROJECTORS
from .base import Projector


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) % (1 << 63))
    return gen


def range_finder(a: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 1,
                 seed: int = 0) -> torch.Tensor:
    """Orthonormal rows(a)×rank basis approximating a's top-`rank` left singular vectors.

    Y = A·Ω with Ω Gaussian cols(a)×(rank+p); q power iterations re-orthonormalised
    by QR at every half step (without it the columns collapse onto the top singular
    vector in fp32); then B = Qᵀ·A and the small SVD of B rotates Q onto the top-rank
    directions. The same seed gives the same basis on every process.
    """
    a = a.float()
    rows, cols = a.shape
    width = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, width, generator=seeded_generator(a.device, seed),
                        device=a.device, dtype=a.dtype)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(a.T @ q)
        q, _ = torch.linalg.qr(a @ z)
    u_small, _, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return q @ u_small[:, :rank]


@PROJECTORS.register("randomized", aliases=("rsvd", "range_finder"))
class RandomizedProjector(Projector):
    """Randomized range finder (oversample p, q power iterations), seeded per parameter and step."""

    orthonormal = True  # QR-based: PᵀP = I to fp32 rounding

    def __init__(self, oversample: int = 8, power_iters: int = 1, **options):
        super().__init__(**options)
        if not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"option 'oversample' must be an integer >= 0, got {oversample!r}")
        if not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"option 'power_iters' must be an integer >= 0, got {power_iters!r}")
        self.oversample = oversample
        self.power_iters = power_iters

    def fit_side(self, grad, rank, side, seed):
        a = grad if side == "left" else grad.T
        return range_finder(a, rank, oversample=self.oversample,
                            power_iters=self.power_iters, seed=seed)
