"""Group-wise symmetric INT8 weights (Q-GaLore): the codec the optimizer's update path uses.

Each group of `group_size` (256) consecutive values of the flattened weight stores one
fp32 `scale = absmax/127`; code ∈ [−127, 127]: 1 + 4/256 ≈ 1.016 bytes per weight instead
of 2 (bf16). Conversion rounds to nearest; the update path re-quantizes with *stochastic*
rounding — up with probability equal to the fractional part, so E[dequant(code)] = x.
Updates far below one step (scale ≈ absmax/127 ≈ 8e-4 for a weight of absmax 0.1, against
lr·|U| ≈ 1e-5) then still move the weight on average instead of rounding away to
nothing, which is what makes INT8 training work (Q-GaLore §3.3). Symmetric codes keep 0
exact. The codec is `gradproj.kernels.int8_sr` (Triton on CUDA, its PyTorch reference
elsewhere); its rounding noise is a counter-based hash of (seed, index), so a seed gives
the same codes on every device and a resumed run re-draws exactly the same noise.
"""
from __future__ import annotations

import torch

from ..kernels.int8_sr import DEFAULT_GROUP, int8_dequantize, int8_sr_quantize


def int8_nbytes(numel: int, group_size: int = DEFAULT_GROUP) -> int:
    """Codes (1 byte each) + one fp32 scale per group."""
    return numel + 4 * (-(-numel // group_size))


def int8_quantize(x: torch.Tensor, group_size: int = DEFAULT_GROUP,
                  seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 of x's shape, scale fp32 [groups]): stochastic rounding when `seed` is given."""
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"option 'weight_group_size' must be a positive integer, got {group_size!r}")
    return int8_sr_quantize(x, 0 if seed is None else seed, group_size, stochastic=seed is not None)


__all__ = ["DEFAULT_GROUP", "int8_dequantize", "int8_nbytes", "int8_quantize"]
