"""`q4`: blockwise 4-bit moments, torchao's 4-bit AdamW maps, two codes per byte.

Under a key prefix `key` a moment of n ≥ 4096 values is stored as
    state[f"{key}.codes"]   uint8 [ceil(n/128)·64]   packed codes, low nibble first
    state[f"{key}.absmax"]  fp32 [ceil(n/128)]       one scale per block of 128
    state[f"{key}.shape"]   uint8 of shape (0, *shape): no bytes, it carries the moment's
                            shape through checkpoints as a tensor (state stays tensors
                            and plain scalars, so `torch.load(weights_only=True)` works)
    state[f"{key}.signed"]  bool: dynamic map (first moments) or linear map (second)
Smaller moments keep fp32 (see `blockwise.py`). The codec is `kernels/q4.py` (Triton on
CUDA, its C twin `kernels/cpu_blockwise.py` on CPU); the fused 4-bit Adam step of
`kernels/adam_q4.py` (on CPU `kernels/cpu_adam.py`), diffGrad step of `kernels/diffgrad_q4.py`
and Sophia step of `kernels/sophia_q4.py` update these tensors in place.
"""
from __future__ import annotations

import math

import torch

from ..kernels.adam_q4 import adam_q4_step
from ..kernels.diffgrad_q4 import diffgrad_q4_step
from ..kernels.q4 import q4_dequantize, q4_nbytes, q4_quantize
from ..kernels.qmaps import zero_code
from ..kernels.sophia_q4 import sophia_q4_step
from ..registry import STATE_FORMATS
from .blockwise import BlockwiseFormat


@STATE_FORMATS.register("q4", aliases=("4bit",))
class Q4Format(BlockwiseFormat):
    """Blockwise 4-bit moments (torchao maps), 2 codes per byte, fp32 below 4096 elements."""

    bits = 4

    def allocate(self, state, key, shape, device, signed):
        blocks = -(-math.prod(shape) // 128)
        code = zero_code(self.bits, signed)
        state[f"{key}.codes"] = torch.full((blocks * 64,), code | (code << 4), dtype=torch.uint8,
                                           device=device)
        state[f"{key}.absmax"] = torch.zeros(blocks, dtype=torch.float32, device=device)
        state[f"{key}.shape"] = torch.empty((0, *shape), dtype=torch.uint8, device=device)

    def quantize(self, value, state, key):
        return q4_quantize(value, state[f"{key}.signed"])

    def dequantize(self, state, key):
        return q4_dequantize(state[f"{key}.codes"], state[f"{key}.absmax"],
                             state[f"{key}.signed"], tuple(state[f"{key}.shape"].shape[1:]))

    def quantized_nbytes(self, numel):
        return q4_nbytes(numel)

    def stackable(self, shape):
        # packed codes are flat and carry the moment's shape in `.shape`: only the small
        # fp32 moments stack
        return not self.stores_codes(shape)

    def fused_adam(self, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
        return adam_q4_step(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                            step_size)

    def fused_diffgrad(self, grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                       beta1, beta2, eps, step_size):
        return diffgrad_q4_step(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                                beta1, beta2, eps, step_size)

    def fused_sophia(self, grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
        return sophia_q4_step(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps)
