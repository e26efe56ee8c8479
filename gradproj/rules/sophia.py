"""Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer for
Language Model Pre-training"), as the authors' `SophiaG` (github Liuhong99/Sophia).

    every step:             M ← β1·M + (1−β1)·G;   N = clip(M / max(ρ·h, ε), 1)
    every k steps (call):   h ← β2·h + (1−β2)·ĥ,   ĥ = B·ĝ⊙ĝ (GNB) or u⊙Hu (Hutchinson)

The optimizer multiplies N by lr and applies decoupled weight decay (W ← W − lr·N − lr·wd·W),
so the step never exceeds lr per coordinate: the clip is Sophia's guard against a small or
stale h. h is refreshed by `LowRankOptimizer.update_curvature` (optimizers/curvature.py),
which runs the estimator's extra backward; in a low-rank group ĝ (or the probe u) lives in
the projected space, so h is the diagonal of the projected curvature, and a refresh keeps,
resets or rotates it with M (it is the rule's unsigned moment, like Adam's V).

Differences from the official code, none of which changes the update beyond rounding:
  * B: the official `update_hessian` keeps the EMA of ĝ⊙ĝ and `step(bs=...)` multiplies
    it by the batch size in the denominator (ρ·bs·h + 1e-15); here B is folded into ĥ
    when it is fed (ĥ = B·ĝ⊙ĝ, the paper's Alg. 2), so the step needs no batch size and
    ρ is the paper's ρ (0.04 with B counted in tokens, the official default).
  * max(ρ·h, ε) (the paper) instead of ρ·h + ε: equal to ε/(ρ·h) relative for h ≥ 0;
    for Hutchinson's estimate, which can be negative, the official form would reverse
    the step's sign where ρ·h < −ε (the official repository ships only Sophia-G).
  * weight decay is applied after the step, as every rule here, not before it: the two
    differ by lr²·wd·N per step (1e-9 at the default lr 1e-4, wd 0.1).
  * the official training script clips the GNB gradient at its grad_clip (1.0) before
    `update_hessian`; the TOML loop does the same with [train].grad_clip (train/curvature.py).
Until the first estimate h = 0, so the first k steps are clipped sign-momentum steps,
as in the official code.
"""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, check_betas, check_positive

ESTIMATORS = ("gnb", "hutchinson")


@RULES.register("sophia", aliases=("sophiag", "sophia-g"))
class Sophia(Rule):
    """Momentum preconditioned by a clipped diagonal curvature EMA (Sophia-G by default)."""

    # the official SophiaG defaults (lr there 1e-4); k = 10 is the paper's and the
    # training script's hess_interval; ε = 1e-15 is the official code's
    defaults = {"betas": (0.965, 0.99), "rho": 0.04, "eps": 1e-15, "curvature_every": 10,
                "curvature_estimator": "gnb"}
    moments = (("exp_avg", True), ("hessian", False))
    batched = True
    uses_curvature = True

    def validate(self, group):
        check_betas(group)
        check_positive(group, "rho", allow_zero=True)
        check_positive(group, "eps")  # h = 0 before the first estimate: ε keeps M/ε finite
        every = group.get("curvature_every")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"option 'curvature_every' must be an integer >= 1, got {every!r}")
        if group.get("curvature_estimator") not in ESTIMATORS:
            raise ValueError(f"option 'curvature_estimator' must be one of {', '.join(ESTIMATORS)}, "
                             f"got {group.get('curvature_estimator')!r}")

    def update(self, grad, state, group, fmt):
        # the format runs it: one fused pass over dense moments (kernels/sophia.py), and
        # over 8-/4-bit codes (kernels/sophia_q8.py, sophia_q4.py: H dequantized, M requantized)
        return fmt.sophia_step(state, "exp_avg", "hessian", grad, group["betas"][0],
                               group["rho"], group["eps"])

    def update_curvature(self, estimate, state, group, fmt):
        beta2 = group["betas"][1]
        h = fmt.read(state, "hessian")
        h.mul_(beta2).add_(estimate, alpha=1.0 - beta2)
        fmt.write(state, "hessian", h)
