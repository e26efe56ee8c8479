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

from ..kernels.adam import adam_step
from ..kernels.diffgrad import diffgrad_step
from ..kernels.sophia import sophia_step
from .base import StateFormat

MIN_QUANTIZED_NUMEL = 4096


class BlockwiseFormat(StateFormat):
    """Subclasses give the codec (`quantize`, `dequantize`), the code layout and its size,
    and `fused_adam`, `fused_diffgrad`, `fused_sophia` (the fused 8-/4-bit kernels for
    their codes: `kernels/{adam,diffgrad,sophia}_q8.py` / `_q4.py`)."""

    def allocate(self, state: dict, key: str, shape: tuple[int, ...], device, signed: bool) -> None:
        """Create `{key}.codes` and `{key}.absmax` holding an all-zero moment."""
        raise NotImplementedError

    def quantize(self, value: torch.Tensor, state: dict, key: str):
        raise NotImplementedError

    def dequantize(self, state: dict, key: str) -> torch.Tensor:
        raise NotImplementedError

    def quantized_nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def fused_adam(self, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                   step_size) -> torch.Tensor:
        raise NotImplementedError

    def fused_diffgrad(self, grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                       beta1, beta2, eps, step_size) -> torch.Tensor:
        raise NotImplementedError

    def fused_sophia(self, grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho,
                     eps) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def _codes(state: dict, *keys: str) -> list[torch.Tensor]:
        return [state[f"{key}.{part}"] for key in keys for part in ("codes", "absmax")]

    def adam_step(self, state, m_key, v_key, grad, beta1, beta2, eps, step_size):
        if m_key in state:  # small moments are fp32 tensors
            return adam_step(grad, state[m_key], state[v_key], beta1, beta2, eps, step_size)
        return self.fused_adam(grad, state[f"{m_key}.codes"], state[f"{m_key}.absmax"],
                               state[f"{v_key}.codes"], state[f"{v_key}.absmax"], beta1, beta2,
                               eps, step_size)

    def diffgrad_step(self, state, m_key, v_key, prev_key, grad, beta1, beta2, eps, step_size):
        if m_key in state:  # small moments are fp32 tensors: the fused dense kernel
            return diffgrad_step(grad, state[m_key], state[v_key], state[prev_key], beta1,
                                 beta2, eps, step_size)
        return self.fused_diffgrad(grad, *self._codes(state, m_key, v_key, prev_key), beta1,
                                   beta2, eps, step_size)

    def sophia_step(self, state, m_key, h_key, grad, beta1, rho, eps):
        if m_key in state:  # small moments are fp32 tensors: the fused dense kernel
            return sophia_step(grad, state[m_key], state[h_key], beta1, rho, eps)
        # H is the rule's unsigned moment, stored as codes like M; the step only reads it
        return self.fused_sophia(grad, *self._codes(state, m_key, h_key), beta1, rho, eps)

    @staticmethod
    def stores_codes(shape: tuple[int, ...]) -> bool:
        """Whether a moment of `shape` is quantized (else it is kept fp32)."""
        return math.prod(shape) >= MIN_QUANTIZED_NUMEL

    def zeros(self, state, key, shape, device, signed):
        if not self.stores_codes(shape):
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
        target = state[f"{key}.absmax"]  # k×blocks when k moments are stacked
        target.copy_(absmax.view(target.shape))

    def nbytes(self, shape, signed=True):
        numel = math.prod(shape)
        return 4 * numel if numel < MIN_QUANTIZED_NUMEL else self.quantized_nbytes(numel)
