"""APOLLO (Zhu et al. 2024): scale the raw gradient by the low-rank Adam's norm ratio."""
from __future__ import annotations

import math

from ..registry import RESIDUALS
from .base import Residual
from .fira import channel_norm_ratio, check_gamma, norm_growth_limiter

SCALE_TYPES = ("channel", "tensor")


@RESIDUALS.register("apollo")
class Apollo(Residual):
    """U = √scale · limit(G ⊙ ‖N‖/‖R‖), per channel or tensor-wise; back(N) is never formed.

    The low-rank Adam only estimates how much each channel (column for side left, row
    for side right) should be scaled: s = ‖N‖/(‖R‖ + 1e-8). The update is the full
    gradient times s, through Fira's norm-growth limiter (γ = 1.01), times √scale as
    the reference does. APOLLO: rank 256, channel, scale 1. APOLLO-Mini: rank 1,
    tensor-wise, scale 128 (√128 ≈ 11.3 makes up for one channel's ratio being small).
    """

    defaults = {"scale_type": "channel", "norm_growth_limit": 1.01}
    batched = True

    def validate(self, group):
        if group.get("scale_type") not in SCALE_TYPES:
            raise ValueError(f"option 'scale_type' must be one of {', '.join(SCALE_TYPES)}, "
                             f"got {group.get('scale_type')!r}")
        check_gamma(group)
        if group["scale"] < 0:
            raise ValueError(f"option 'scale' must be >= 0 with residual 'apollo' (it is "
                             f"square-rooted), got {group['scale']!r}")

    def combine(self, grad, low_grad, direction, back, state, group, folded_scale=1.0):
        c = folded_scale  # the limiter sees uncorrected norms, as the reference
        phi = channel_norm_ratio(direction, low_grad, tuple(grad.shape[-2:]),
                                 per_channel=group["scale_type"] == "channel").div_(c)
        update = grad * phi
        limiter = norm_growth_limiter(update, state, group["norm_growth_limit"])
        return update.mul_(c * math.sqrt(group["scale"]) / limiter)
