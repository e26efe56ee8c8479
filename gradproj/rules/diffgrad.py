"""diffGrad (Dubey et al. 2019, "diffGrad: An Optimization Method for Convolutional Neural Networks")."""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, adam_bias_correction, check_betas, check_positive, rule_step


@RULES.register("diffgrad")
class DiffGrad(Rule):
    """Adam whose first moment is damped by the friction ξ = sigmoid(|G_{t−1} − G_t|).

    M ← β1·M + (1−β1)·G;  V ← β2·V + (1−β2)·G²;  ξ = 1/(1 + e^(−|G_prev − G|));  G_prev ← G;
    direction = √(1−β2ᵗ)/(1−β1ᵗ) · ξ·M/(√V + ε)  (torch-optimizer's DiffGrad, the authors'
    code). ξ ∈ [½, 1): a gradient that barely changes (near an optimum) halves the step.
    The previous gradient is state beside the moments (a third signed tensor, counted by
    `state_nbytes`); in a low-rank group it is the projected gradient, so a refresh with
    moments "rotate" maps it as it maps M (A·G_prev·B) and "reset" zeroes it (then ξ of the
    first step after is sigmoid(|G|), as on step 1). The fused step is kernels/diffgrad.py.
    Weight decay is the optimizer's, decoupled (the authors' code adds L2 to G instead).
    """

    defaults = {"betas": (0.9, 0.999), "eps": 1e-8}
    moments = (("exp_avg", True), ("exp_avg_sq", False), ("previous_grad", True))
    batched = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)

    def step_scale(self, t, group):
        return adam_bias_correction(group["betas"], t)

    def update(self, grad, state, group, fmt):
        beta1, beta2 = group["betas"]
        return fmt.diffgrad_step(state, "exp_avg", "exp_avg_sq", "previous_grad", grad, beta1,
                                 beta2, group["eps"], self.step_scale(rule_step(state), group))
