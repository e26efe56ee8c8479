"""AdaBelief (Zhuang et al. 2020): Adam whose second moment tracks the gradient's surprise."""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, check_betas, check_positive, rule_step


@RULES.register("adabelief")
class AdaBelief(Rule):
    """Adam with S tracking (G − M)² instead of G²: large steps where the gradient is predictable.

    M ← β1·M + (1−β1)·G;  S ← β2·S + (1−β2)·(G − M)² + ε;
    direction = (M / (1−β1ᵗ)) / (√(S / (1−β2ᵗ)) + ε).
    As the authors' package (adabelief-pytorch 0.2): ε (default 1e-16) is added to S in
    place every step as well as to the denominator; with ε = 1e-16 and fp32 states the
    in-place add only matters where (G − M)² underflows.
    """

    defaults = {"betas": (0.9, 0.999), "eps": 1e-16}
    moments = (("exp_avg", True), ("exp_avg_var", False))
    batched = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "eps", allow_zero=True)

    def update(self, grad, state, group, fmt):
        beta1, beta2 = group["betas"]
        eps, step = group["eps"], rule_step(state)
        exp_avg = fmt.read(state, "exp_avg")
        exp_avg_var = fmt.read(state, "exp_avg_var")
        exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        surprise = grad - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(surprise, surprise, value=1.0 - beta2).add_(eps)
        fmt.write(state, "exp_avg", exp_avg)
        fmt.write(state, "exp_avg_var", exp_avg_var)
        bias1 = 1.0 - beta1 ** step
        bias2 = 1.0 - beta2 ** step
        # out of place: with fp32 states `fmt.read` returns the stored tensor itself
        denom = exp_avg_var.div(bias2).sqrt_().add_(eps)
        return exp_avg.div(denom).div_(bias1)
