"""Seeded random projections (APOLLO): the basis is regenerated from a stored seed, never stored."""
from __future__ import annotations

import torch

from ..kernels.counter_rng import normals
from ..registry import PROJECTORS
from ..stacked_state import StackedState
from .base import Projector, basis_shape

# Keys in the per-parameter state. The seed is a plain int; the anchor is a 0-element
# tensor (0 bytes) that records the device the basis is drawn on (`load_basis` gets no
# device argument; the streams themselves are the same on every device).
SEED_KEY, ANCHOR_KEY = "proj_seed", "proj_anchor"


class SeededProjector(Projector):
    """Base for projectors whose basis is a pure function of (seed, side, shape, rank).

    The basis is drawn from counter-based streams (`kernels/counter_rng.py`): the same
    numbers on every device, and the k bases of a bucket — k seeds — in one batched draw,
    made once per step (`StackedState.scratch`) and used by both projections.
    """

    #: random bases are not orthonormal (PᵀP ≈ I only in expectation)
    orthonormal = False

    def fit(self, grad, state, *, rank, side, seed, dtype):
        state["rank"] = rank
        state[SEED_KEY] = int(seed)
        state[ANCHOR_KEY] = torch.empty(0, device=grad.device)

    def fit_side(self, grad, rank, side, seed):
        rows = basis_shape(tuple(grad.shape[-2:]), rank, side)[0]
        return self.draw(rows, rank, [self._side_seed(seed, side)], grad.device)[0]

    def load_basis(self, state, side, shape):
        rows = basis_shape(tuple(shape), state["rank"], side)[0]
        device = state[ANCHOR_KEY].device
        if not isinstance(state, StackedState):
            return self.draw(rows, state["rank"], [self._side_seed(state[SEED_KEY], side)], device)[0]
        basis = state.scratch.get(("basis", side))
        if basis is None:  # the seeds go to the device once per refresh, not every step
            seeds = tuple(self._side_seed(seed, side) % (1 << 63) for seed in state.values(SEED_KEY))
            # on a CPU the ints themselves: the C streams take them (the same bits as the
            # tensor arithmetic, at a fraction of its time)
            if device.type != "cpu":
                seeds = state.cached(("seeds", side), seeds, lambda ints=seeds: torch.tensor(
                    ints, dtype=torch.int64, device=device))
            basis = state.scratch[("basis", side)] = self.draw(rows, state["rank"], seeds, device)
        return basis

    def basis_nbytes(self, shape, rank, side, dtype):
        return 0  # regenerated on use: the seed is one Python int

    @staticmethod
    def _side_seed(seed: int, side: str) -> int:
        # distinct streams for the two sides of proj_type "full"
        return 2 * int(seed) + (side == "right")

    def draw(self, rows: int, rank: int, seeds, device) -> torch.Tensor:
        """The fp32 bases for `seeds` (ints, or an int64 tensor on `device`): k×rows×rank."""
        raise NotImplementedError


@PROJECTORS.register("gaussian", aliases=("random", "apollo"))
class GaussianProjector(SeededProjector):
    """Gaussian N(0, 1/r) projection regenerated from a seed (APOLLO): zero basis memory.

    E[P·Pᵀ] = I (each of the r columns has variance 1/r), so ‖PᵀG‖ ≈ ‖G‖ column-wise
    (Johnson–Lindenstrauss) and APOLLO's ratio ‖N‖/‖R‖ estimates the full-rank one.
    """

    def draw(self, rows, rank, seeds, device):
        values = normals(seeds, rows * rank, device)
        return values.view(len(seeds), rows, rank).div_(rank ** 0.5)


__all__ = ["GaussianProjector", "SeededProjector"]
