"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms")."""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, check_betas


@RULES.register("lion")
class Lion(Rule):
    """Sign of the β1-interpolated momentum; one moment, no ε, lr 3–10× smaller than AdamW's.

    c = β1·M + (1−β1)·G;  direction = sign(c);  M ← β2·M + (1−β2)·G.
    The optimizer multiplies the direction by lr and applies decoupled weight decay
    after it (W ← W − lr·sign(c) − lr·wd·W), which is the paper's update; its default
    weight decay is the optimizer's, 0. The paper's defaults: β1 0.9, β2 0.99.
    """

    defaults = {"betas": (0.9, 0.99)}
    moments = (("exp_avg", True),)
    batched = True

    def validate(self, group):
        check_betas(group)

    def update(self, grad, state, group, fmt):
        # the direction uses the *old* momentum interpolated with G (β1), the stored
        # momentum then moves with the slower β2: two betas are what makes Lion Lion.
        # The format runs it: one fused pass over dense moments (kernels/lion.py)
        beta1, beta2 = group["betas"]
        return fmt.lion_step(state, "exp_avg", grad, beta1, beta2)
