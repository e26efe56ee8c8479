"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes")."""
from __future__ import annotations

import math

import torch

from ..registry import RULES
from .base import Rule, adam_bias_correction, check_betas, check_flag, check_positive, rule_step


@RULES.register("lamb")
class LAMB(Rule):
    """Adam direction plus decay, rescaled per layer by the trust ratio φ(‖W‖)/‖u‖.

    r = m̂/(√v̂ + ε);  u = r + wd·W;  W ← W − lr·(φ(‖W‖)/‖u‖)·u,  φ(z) = min(z, clamp_value);
    a zero ‖W‖ or ‖u‖ gives ratio 1 (the paper's Algorithm 2; torch-optimizer's Lamb).
    In a low-rank group r is the full-size update the weight receives (back-projection and
    residual applied), so ‖u‖ is the norm of what W really moves by, not of the r×n
    direction; the ratio is per weight (one vector_norm over each slice of the bucket).
    `correct_bias` (the paper's Algorithm 2) runs m̂/(√v̂ + ε) as c·m/(√v + ε·√(1−β2ᵗ)),
    c = √(1−β2ᵗ)/(1−β1ᵗ), through the format's fused Adam pass. torch-optimizer's Lamb
    defaults to `debias=False` (its comment: "Paper v3 does not use debiasing"), which is
    `correct_bias = false`: r = m/(√v + ε); with `debias=True` it scales the step by c
    after the trust ratio, which then cancels c (as `correct_bias = false`, apart from the
    decay's weight). `clamp_value` 10 is torch-optimizer's φ; the paper leaves φ's bounds open.
    """

    defaults = {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True, "clamp_value": 10.0}
    moments = (("exp_avg", True), ("exp_avg_sq", False))
    batched = True
    finishes_update = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)
        check_flag(group, "correct_bias")
        check_positive(group, "clamp_value")

    def step_scale(self, t, group):
        return adam_bias_correction(group["betas"], t) if group["correct_bias"] else 1.0

    def update(self, grad, state, group, fmt):
        beta1, beta2 = group["betas"]
        t, eps = rule_step(state), group["eps"]
        if group["correct_bias"] and t >= 1:
            eps *= math.sqrt(1.0 - beta2 ** t)
        return fmt.adam_step(state, "exp_avg", "exp_avg_sq", grad, beta1, beta2, eps,
                             self.step_scale(t, group))

    def finish_update(self, weights, update, grad, group):
        u = update.add_(weights, alpha=group["weight_decay"]) if group["weight_decay"] else update
        return u.mul_(trust_ratio(weights, u, group["clamp_value"]))


def trust_ratio(weights: torch.Tensor, u: torch.Tensor, clamp_value: float) -> torch.Tensor:
    """φ(‖W‖)/‖u‖ per slice of a k×… stack, shaped to broadcast (k×1×…); 1 where either is 0."""
    k = len(weights)
    w_norm = torch.linalg.vector_norm(weights.reshape(k, -1), dim=1).clamp_(max=clamp_value)
    u_norm = torch.linalg.vector_norm(u.reshape(k, -1), dim=1)
    ok = (w_norm > 0) & (u_norm > 0)
    ratio = torch.where(ok, w_norm / torch.where(ok, u_norm, 1.0), 1.0)
    return ratio.view(k, *([1] * (weights.dim() - 1)))
