"""INT4 storage of another projector's basis (Q-GaLore), dequantized on use."""
from __future__ import annotations

import torch

from ..kernels.int4 import DEFAULT_GROUP, int4_dequantize, int4_nbytes, int4_quantize
from ..registry import PROJECTORS
from ..stacked_state import StackedState
from .base import BASIS_KEYS, Projector, basis_shape, sides_of


@PROJECTORS.register("int4", aliases=("q4_basis",))
class Int4Projector(Projector):
    """Wraps another projector (`inner`) and stores its basis group-wise 4-bit, 2 codes/byte."""

    def __init__(self, inner: str = "svd", group_size: int = DEFAULT_GROUP, **inner_options):
        if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
            raise ValueError(f"option 'group_size' must be a positive even integer, got {group_size!r}")
        if inner == "int4":
            raise ValueError("option 'inner' of the int4 projector cannot be 'int4'")
        self.inner = PROJECTORS.create(inner, **inner_options)
        self.group_size = group_size

    @property
    def orthonormal(self) -> bool:
        """The inner projector's, within the INT4 quantization error (≤ scale/2 per entry)."""
        return self.inner.orthonormal

    def fit(self, grad, state, *, rank, side, seed, dtype):
        fitted: dict = {}
        self.inner.fit(grad, fitted, rank=rank, side=side, seed=seed, dtype=torch.float32)
        for key, value in fitted.items():  # plain scalars (rank, fallback counts) carry over
            if not torch.is_tensor(value):
                state[key] = value
        for one in sides_of(side):
            basis = self.inner.load_basis(fitted, one, tuple(grad.shape))
            self.store_basis(state, one, basis, dtype)

    def store_basis(self, state, side, basis, dtype):
        codes, scale, minimum = int4_quantize(basis, self.group_size)
        key = BASIS_KEYS[side]
        state[key + ".codes"], state[key + ".scale"], state[key + ".min"] = codes, scale, minimum

    def load_basis(self, state, side, shape):
        key = BASIS_KEYS[side]
        rows_cols = basis_shape(shape, state["rank"], side)
        codes, scale, minimum = state[key + ".codes"], state[key + ".scale"], state[key + ".min"]
        if not isinstance(state, StackedState):
            return int4_dequantize(codes, scale, minimum, rows_cols)
        basis = state.scratch.get(("basis", side))
        if basis is None:  # k weights' groups dequantized as one run of groups (elementwise)
            k, groups, half = codes.shape
            flat = int4_dequantize(codes.reshape(k * groups, half), scale.reshape(-1),
                                   minimum.reshape(-1), (k * groups * 2 * half,))
            numel = rows_cols[0] * rows_cols[1]
            basis = flat.view(k, -1)[:, :numel].reshape(k, *rows_cols)
            state.scratch[("basis", side)] = basis
        return basis

    def basis_nbytes(self, shape, rank, side, dtype):
        return sum(int4_nbytes(rank * basis_shape(shape, rank, one)[0], self.group_size)
                   for one in sides_of(side))
