"""Shared storage logic of the blockwise-quantized formats (`q8`, `q4`).

A moment of n ≥ 4096 values is stored as uint8 codes + one fp32 absmax per block under
`state[f"{key}.codes"]`, `state[f"{key}.absmax"]`, with `state[f"{key}.signed"]` naming
the code map (signed for first moments, unsigned for second). Smaller moments keep fp32
under `state[key]`, as bitsandbytes does (`min_8bit_size` 4096): the scales would be a
larger share of them and they are a negligible share of the model.
"""
from __future__ import annotations

import math

import torch

from .base import StateFormat

MIN_QUANTIZED_NUMEL = 4096


class BlockwiseFormat(StateFormat):
    """Subclasses give the codec (`quantize`, `dequantize`), the code layout and its size."""

    def allocate(self, state: dict, key: str, shape: tuple[int, ...], device, signed: bool) -> None:
        """Create `{key}.codes` and `{key}.absmax` holding an all-zero moment."""
        raise NotImplementedError

    def quantize(self, value: torch.Tensor, state: dict, key: str):
        raise NotImplementedError

    def dequantize(self, state: dict, key: str) -> torch.Tensor:
        raise NotImplementedError

    def quantized_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def zeros(self, state, key, shape, device, signed):
        if math.prod(shape) < MIN_QUANTIZED_NUMEL:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)
            return
        self.allocate(state, key, tuple(shape), device, signed)
        state[f"{key}.signed"] = bool(signed)

    def read(self, state, key):
        if key in state:
            return state[key].float()
        return self.dequantize(state, key)

    def write(self, state, key, value):
        if key in state:
            state[key].copy_(value)
            return
        codes, absmax = self.quantize(value, state, key)
        state[f"{key}.codes"].copy_(codes)
        state[f"{key}.absmax"].copy_(absmax)

    def nbytes(self, shape, signed=True):
        numel = math.prod(shape)
        return 4 * numel if numel < MIN_QUANTIZED_NUMEL else self.quantized_nbytes(numel)
