"""`q8`: blockwise 8-bit moments, bitsandbytes' layout (dynamic map, block 256, fp32 absmax).

Under a key prefix `key` a moment of n ≥ 4096 values is stored as
    state[f"{key}.codes"]   uint8, the moment's shape        (1 byte per value)
    state[f"{key}.absmax"]  fp32 [ceil(n/256)]               (one scale per block)
    state[f"{key}.signed"]  bool: signed map (first moments) or unsigned (second moments)
Smaller moments keep fp32 (see `blockwise.py`). Quantization runs through `kernels/q8.py`
(Triton on CUDA; on CPU its C twin `kernels/cpu_blockwise.py`, the same codes as the
PyTorch reference, which runs under GRADPROJ_KERNELS=reference or without a C compiler);
the fused 8-bit Adam step of `kernels/adam_q8.py` (on CPU `kernels/cpu_adam.py`), diffGrad
step of `kernels/diffgrad_q8.py` and Sophia step of `kernels/sophia_q8.py` update these
tensors in place.
"""
from __future__ import annotations

import math

import torch

from ..kernels.adam_q8 import adam_q8_step
from ..kernels.diffgrad_q8 import diffgrad_q8_step
from ..kernels.q8 import BLOCK, q8_dequantize, q8_nbytes, q8_quantize
from ..kernels.qmaps import zero_code
from ..kernels.sophia_q8 import sophia_q8_step
from ..registry import STATE_FORMATS
from .blockwise import BlockwiseFormat


@STATE_FORMATS.register("q8", aliases=("8bit",))
class Q8Format(BlockwiseFormat):
    """Blockwise 8-bit moments (bitsandbytes-compatible), fp32 below 4096 elements."""

    bits = 8

    def allocate(self, state, key, shape, device, signed):
        state[f"{key}.codes"] = torch.full(shape, zero_code(self.bits, signed),
                                           dtype=torch.uint8, device=device)
        state[f"{key}.absmax"] = torch.zeros(-(-math.prod(shape) // 256), dtype=torch.float32,
                                             device=device)

    def quantize(self, value, state, key):
        return q8_quantize(value, state[f"{key}.signed"])

    def dequantize(self, state, key):
        return q8_dequantize(state[f"{key}.codes"], state[f"{key}.absmax"], state[f"{key}.signed"])

    def quantized_nbytes(self, numel):
        return q8_nbytes(numel)

    def stackable(self, shape):
        # codes keep the moment's shape; blocks of 256 never straddle two moments when
        # each moment is a whole number of blocks
        return not self.stores_codes(shape) or math.prod(shape) % BLOCK == 0

    def fused_adam(self, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
        return adam_q8_step(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                            step_size)

    def fused_diffgrad(self, grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                       beta1, beta2, eps, step_size):
        return diffgrad_q8_step(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                                beta1, beta2, eps, step_size)

    def fused_sophia(self, grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
        return sophia_q8_step(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps)
