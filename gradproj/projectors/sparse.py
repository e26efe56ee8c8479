"""Very sparse random projection, regenerated from a stored seed (no basis memory)."""
from __future__ import annotations


from ..kernels.counter_rng import uniforms
from ..registry import PROJECTORS
from .gaussian import SeededProjector


@PROJECTORS.register("sparse", aliases=("very_sparse",))
class SparseProjector(SeededProjector):
    """Very sparse random projection (Li, Hastie & Church 2006): ±√s w.p. 1/(2s), s = √d; seeded.

    d is the projected dimension (m for side "left", n for "right"); entries are scaled
    by 1/√r so E[P·Pᵀ] = I as for the Gaussian. With s = √4096 = 64 only 1 entry in 64
    is non-zero. `s` overrides the sparsity (s = 1: dense ±1, Achlioptas; s = 3: 2/3 zeros).
    """

    def __init__(self, s: float | None = None, **options):
        super().__init__(**options)
        if s is not None and (not isinstance(s, (int, float)) or isinstance(s, bool) or s < 1):
            raise ValueError(f"option 's' of the sparse projector must be a number >= 1 or None, got {s!r}")
        self.s = s

    def draw(self, rows, rank, seeds, device):
        s = float(self.s) if self.s is not None else max(1.0, rows ** 0.5)
        u = uniforms(seeds, rows * rank, device).view(len(seeds), rows, rank)
        half = 0.5 / s
        signs = (u < half).float() - (u >= 1.0 - half).float()
        return signs.mul_((s / rank) ** 0.5)
