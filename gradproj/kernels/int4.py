"""Group-wise asymmetric INT4 codec for projector bases, two codes per byte.

Each group of `group_size` values stores fp32 `scale = (max − min)/15` and fp32 `minimum`;
code = round((x − min)/scale) ∈ [0, 15], so x ≈ code·scale + min with error ≤ scale/2.
Unlike Q-GaLore's reference (an integer zero-point clamped to [0, 15], which clips every
group whose values share one sign, and one code per uint8), the offset is the exact
minimum and codes are packed low nibble first: byte = q[2i] | q[2i+1] << 4.
"""
from __future__ import annotations

import torch

DEFAULT_GROUP = 256


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"int4 group_size must be a positive even integer, got {group_size}")
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:  # repeat the last value so padding never widens a group's [min, max]
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def int4_quantize_ref(x: torch.Tensor, group_size: int = DEFAULT_GROUP):
    """Return (codes uint8 [groups, group_size/2], scale fp32 [groups], minimum fp32 [groups])."""
    groups = _grouped(x, group_size)
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - lo[:, None]) / scale[:, None]).clamp_(0, 15).to(torch.uint8)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    return codes, scale, lo


def int4_dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                        shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `int4_quantize_ref`: an fp32 tensor of `shape`."""
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    values = q.float() * scale[:, None] + minimum[:, None]
    numel = 1
    for d in shape:
        numel *= d
    return values.reshape(-1)[:numel].reshape(shape)


def int4_nbytes(numel: int, group_size: int = DEFAULT_GROUP) -> int:
    groups = -(-numel // group_size)
    return groups * (group_size // 2 + 8)  # packed codes + fp32 scale + fp32 minimum


def int4_quantize(x: torch.Tensor, group_size: int = DEFAULT_GROUP):
    return int4_quantize_ref(x, group_size)


def int4_dequantize(codes, scale, minimum, shape):
    return int4_dequantize_ref(codes, scale, minimum, shape)
