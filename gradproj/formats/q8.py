"""`q8`: blockwise 8-bit moments, bitsandbytes' layout (dynamic map, block 256, fp32 absmax).

Under a key prefix `key` a moment of n ≥ 4096 values is stored as
    state[f"{key}.codes"]   uint8, the moment's shape        (1 byte per value)
    state[f"{key}.absmax"]  fp32 [ceil(n/256)]               (one scale per block)
    state[f"{key}.signed"]  bool: signed map (first moments) or unsigned (second moments)
Smaller moments keep fp32 under `state[key]`, as bitsandbytes does (`min_8bit_size` 4096):
the scales would be a larger share of them and they are a negligible share of the model.
Quantization runs through `kernels/q8.py` (Triton on CUDA, the PyTorch reference on CPU);
the fused 8-bit Adam step of `kernels/adam_q8.py` updates these tensors in place.
"""
from __future__ import annotations

import math

import torch

from ..kernels.q8 import q8_dequantize, q8_nbytes, q8_quantize
from ..kernels.qmaps import zero_code
from ..registry import STATE_FORMATS
from .base import StateFormat

MIN_QUANTIZED_NUMEL = 4096


@STATE_FORMATS.register("q8", aliases=("8bit",))
class Q8Format(StateFormat):
    """Blockwise 8-bit moments (bitsandbytes-compatible), fp32 below 4096 elements."""

    bits = 8

    def zeros(self, state, key, shape, device, signed):
        numel = math.prod(shape)
        if numel < MIN_QUANTIZED_NUMEL:
            state[key] = torch.zeros(shape, dtype=torch.float32, device=device)
            return
        state[f"{key}.codes"] = torch.full(tuple(shape), zero_code(self.bits, signed),
                                           dtype=torch.uint8, device=device)
        state[f"{key}.absmax"] = torch.zeros(-(-numel // 256), dtype=torch.float32, device=device)
        state[f"{key}.signed"] = bool(signed)

    def read(self, state, key):
        if key in state:
            return state[key].float()
        return q8_dequantize(state[f"{key}.codes"], state[f"{key}.absmax"], state[f"{key}.signed"])

    def write(self, state, key, value):
        if key in state:
            state[key].copy_(value)
            return
        codes, absmax = q8_quantize(value, state[f"{key}.signed"])
        state[f"{key}.codes"].copy_(codes)
        state[f"{key}.absmax"].copy_(absmax)

    def nbytes(self, shape, signed=True):
        numel = math.prod(shape)
        return 4 * numel if numel < MIN_QUANTIZED_NUMEL else q8_nbytes(numel)
