"""AdamW on the (projected) gradient, as galore-torch and HF's AdamW compute it."""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, adam_bias_correction, check_betas, check_positive, rule_step


@RULES.register("adamw", aliases=("adam",))
class AdamW(Rule):
    """Bias-corrected Adam moments; decoupled weight decay is the optimizer's (AdamW)."""

    defaults = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    moments = (("exp_avg", True), ("exp_avg_sq", False))
    batched = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)

    def step_scale(self, t, group):
        # galore-torch folds the bias correction into the step size and keeps eps outside
        # it: N = sqrt(1-b2^t)/(1-b1^t) * M / (sqrt(V) + eps). torch.optim.AdamW instead
        # uses eps*sqrt(1-b2^t); the two differ by < eps relative to |N|.
        if not group.get("correct_bias", True):
            return 1.0
        return adam_bias_correction(group["betas"], t)

    def update(self, grad, state, group, fmt):
        # the format runs the moment update: one fused pass (Triton on CUDA) over dense,
        # 8-bit or 4-bit moments, or read -> kernels.adam.adam_step_ref -> write
        beta1, beta2 = group["betas"]
        return fmt.adam_step(state, "exp_avg", "exp_avg_sq", grad, beta1, beta2, group["eps"],
                             self.step_scale(rule_step(state), group))
