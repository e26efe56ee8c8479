"""Exact SVD of the current gradient (GaLore), with a fallback that never crashes."""
from __future__ import annotations

import torch

from ..registry import PROJECTORS
from .base import Projector, sides_of
from .randomized import range_finder, seeded_generator

# Relative size of the jitter added before the fallback range finder: large enough to
# break exact degeneracy, small enough (1e-6·‖G‖/√(mn) per entry) not to move the basis.
JITTER = 1e-6


@PROJECTORS.register("svd", aliases=("exact",))
class SVDProjector(Projector):
    """Exact fp32 SVD of the gradient (GaLore); falls back to the range finder if it fails."""

    orthonormal = True  # PᵀP = I to fp32 rounding (the property suite checks it)

    def fit(self, grad, state, *, rank, side, seed, dtype):
        state["rank"] = rank
        for one in sides_of(side):
            basis = self.exact(grad, rank, one)
            if basis is None:  # counted so a run can report how often the SVD failed
                state["svd_fallbacks"] = state.get("svd_fallbacks", 0) + 1
                basis = self.fallback(grad, rank, one, seed)
            self.store_basis(state, one, basis, dtype)

    def fit_side(self, grad, rank, side, seed):
        basis = self.exact(grad, rank, side)
        return self.fallback(grad, rank, side, seed) if basis is None else basis

    @staticmethod
    def exact(grad, rank, side):
        """Top-rank singular vectors, or None when the SVD fails or is not finite."""
        try:
            u, _, vh = torch.linalg.svd(grad, full_matrices=False)
        except RuntimeError:  # LAPACK/cuSOLVER "failed to converge"
            return None
        basis = u[:, :rank] if side == "left" else vh[:rank].T
        return basis.contiguous() if torch.isfinite(basis).all() else None

    def fallback(self, grad, rank, side, seed):
        clean = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        noise = torch.randn(clean.shape, generator=seeded_generator(clean.device, seed + 1),
                            device=clean.device, dtype=clean.dtype)
        scale = JITTER * clean.norm() / max(clean.numel(), 1) ** 0.5 + 1e-30
        jittered = clean + scale * noise
        a = jittered if side == "left" else jittered.T
        return range_finder(a, rank, oversample=8, power_iters=2, seed=seed)
