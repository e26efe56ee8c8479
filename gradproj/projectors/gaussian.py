"""Seeded random projections (APOLLO): the basis is regenerated from a stored seed, never stored."""
from __future__ import annotations

import torch

from ..registry import PROJECTORS
from .base import Projector, basis_shape
from .randomized import seeded_generator

# Keys in the per-parameter state. The seed is a plain int; the anchor is a 0-element
# tensor (0 bytes) that records the device the basis is drawn on: CPU and CUDA generators
# give different streams for one seed, and `load_basis` gets no device argument, so
# without it an INT4-wrapped or resumed basis could be drawn on the wrong device.
SEED_KEY, ANCHOR_KEY = "proj_seed", "proj_anchor"


class SeededProjector(Projector):
    """Base for projectors whose basis is a pure function of (seed, side, shape, rank)."""

    #: random bases are not orthonormal (PᵀP ≈ I only in expectation)
    orthonormal = False
    #: the basis is drawn per weight from that weight's seed: one generator call each
    batched = False

    def fit(self, grad, state, *, rank, side, seed, dtype):
        state["rank"] = rank
        state[SEED_KEY] = int(seed)
        state[ANCHOR_KEY] = torch.empty(0, device=grad.device)

    def fit_side(self, grad, rank, side, seed):
        rows = basis_shape(tuple(grad.shape), rank, side)[0]
        return self.draw(rows, rank, self._side_seed(seed, side), grad.device)

    def load_basis(self, state, side, shape):
        rows = basis_shape(tuple(shape), state["rank"], side)[0]
        return self.draw(rows, state["rank"], self._side_seed(state[SEED_KEY], side),
                         state[ANCHOR_KEY].device)

    def basis_nbytes(self, shape, rank, side, dtype):
        return 0  # regenerated on use: the seed is one Python int

    @staticmethod
    def _side_seed(seed: int, side: str) -> int:
        # distinct streams for the two sides of proj_type "full"
        return 2 * int(seed) + (side == "right")

    def draw(self, rows: int, rank: int, seed: int, device) -> torch.Tensor:
        """The fp32 rows×rank basis for `seed` on `device`."""
        raise NotImplementedError


@PROJECTORS.register("gaussian", aliases=("random", "apollo"))
class GaussianProjector(SeededProjector):
    """Gaussian N(0, 1/r) projection regenerated from a seed (APOLLO): zero basis memory.

    E[P·Pᵀ] = I (each of the r columns has variance 1/r), so ‖PᵀG‖ ≈ ‖G‖ column-wise
    (Johnson–Lindenstrauss) and APOLLO's ratio ‖N‖/‖R‖ estimates the full-rank one.
    """

    def draw(self, rows, rank, seed, device):
        gen = seeded_generator(torch.device(device), seed)
        return torch.randn(rows, rank, generator=gen, device=device).div_(rank ** 0.5)


__all__ = ["GaussianProjector", "SeededProjector"]
