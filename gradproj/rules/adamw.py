"""AdamW on the (projected) gradient, as galore-torch and HF's AdamW compute it."""
from __future__ import annotations

import math

from ..kernels.adam import fused_adamw
from ..registry import RULES
from .base import Rule, check_betas, check_positive


@RULES.register("adamw", aliases=("adam",))
class AdamW(Rule):
    """Bias-corrected Adam moments; decoupled weight decay is the optimizer's (AdamW)."""

    defaults = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    moments = (("exp_avg", True), ("exp_avg_sq", False))

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)

    def update(self, grad, state, group, fmt):
        # Triton (CUDA, or GRADPROJ_KERNELS=interpret): one fused pass over grad and the
        # dense, 8-bit or 4-bit moments (kernels/adam*.py); None everywhere else
        fused = fused_adamw(grad, state, group, fmt)
        if fused is not None:
            return fused
        beta1, beta2 = group["betas"]
        step = state["step"]
        exp_avg = fmt.read(state, "exp_avg")
        exp_avg_sq = fmt.read(state, "exp_avg_sq")
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        fmt.write(state, "exp_avg", exp_avg)
        fmt.write(state, "exp_avg_sq", exp_avg_sq)
        # galore-torch folds the bias correction into the step size and keeps eps outside
        # it: N = sqrt(1-b2^t)/(1-b1^t) * M / (sqrt(V) + eps). torch.optim.AdamW instead
        # uses eps*sqrt(1-b2^t); the two differ by < eps relative to |N|.
        step_scale = 1.0
        if group.get("correct_bias", True):
            step_scale = math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
        return exp_avg.div(exp_avg_sq.sqrt().add_(group["eps"])).mul_(step_scale)
