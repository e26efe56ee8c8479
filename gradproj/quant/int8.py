"""Group-wise symmetric INT8 weight codec with stochastic rounding (Q-GaLore's weights).

Each group of `group_size` (256) consecutive values of the flattened weight stores one
fp32 `scale = absmax/127`; code = round(x/scale) ∈ [−127, 127]. 1 + 4/256 = 1.016 bytes
per weight instead of 2 (bf16). The update path re-quantizes with *stochastic* rounding
— floor(x/scale + u), u ~ U[0, 1) — so a code moves up with probability equal to the
fractional part and E[dequant(code)] = x: updates far smaller than one step (scale ≈
absmax/127 ≈ 1e-3 for a weight of absmax 0.1, against lr·|U| ≈ 1e-5) still move the
weight on average instead of rounding away to nothing, which is what makes INT8
training work (Q-GaLore §3.3). Symmetric codes (no zero-point) keep 0 exact.
"""
from __future__ import annotations

import torch

DEFAULT_GROUP = 256
QMAX = 127


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:  # zero padding never raises a group's absmax
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


def int8_nbytes(numel: int, group_size: int = DEFAULT_GROUP) -> int:
    return numel + 4 * (-(-numel // group_size))


def int8_quantize(x: torch.Tensor, group_size: int = DEFAULT_GROUP,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 of x's shape, scale fp32 [groups]); stochastic rounding when `generator` is given."""
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"option 'weight_group_size' must be a positive integer, got {group_size!r}")
    groups = _groups(x, group_size)
    scale = groups.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays 0
    scaled = groups / scale[:, None]
    if generator is None:
        q = torch.round(scaled)
    else:
        noise = torch.rand(scaled.shape, generator=generator, device=scaled.device)
        q = torch.floor(scaled + noise)
    codes = q.clamp_(-QMAX, QMAX).to(torch.int8).reshape(-1)[: x.numel()].reshape(x.shape)
    return codes, scale


def int8_dequantize(codes: torch.Tensor, scale: torch.Tensor,
                    group_size: int = DEFAULT_GROUP) -> torch.Tensor:
    """fp32 tensor of codes' shape: code · scale of its group."""
    groups = _groups(codes, group_size)
    return (groups * scale[:, None]).reshape(-1)[: codes.numel()].reshape(codes.shape)
