"""Momentum SGD, as torch.optim.SGD computes it (heavy ball or Nesterov)."""
from __future__ import annotations

from ..registry import RULES
from .base import Rule, rule_step


@RULES.register("sgdm", aliases=("sgd", "momentum"))
class SGDM(Rule):
    """Heavy-ball momentum (torch.optim.SGD semantics: dampening, nesterov); momentum 0 = SGD.

    B₁ = G₁ (no dampening on the first step, as torch); B ← μ·B + (1−d)·G;
    direction = G + μ·B with Nesterov, else B.
    """

    defaults = {"momentum": 0.9, "dampening": 0.0, "nesterov": False}
    moments = (("momentum_buffer", True),)
    batched = True

    def validate(self, group):
        momentum, dampening = group.get("momentum"), group.get("dampening")
        if not isinstance(momentum, (int, float)) or isinstance(momentum, bool) or not 0 <= momentum < 1:
            raise ValueError(f"option 'momentum' must be a number in [0, 1), got {momentum!r}")
        if not isinstance(dampening, (int, float)) or isinstance(dampening, bool) or not 0 <= dampening <= 1:
            raise ValueError(f"option 'dampening' must be a number in [0, 1], got {dampening!r}")
        if not isinstance(group.get("nesterov"), bool):
            raise ValueError(f"option 'nesterov' must be true or false, got {group.get('nesterov')!r}")
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            # torch.optim.SGD's rule: Nesterov needs momentum and no dampening
            raise ValueError("option 'nesterov' requires 'momentum' > 0 and 'dampening' = 0")

    def update(self, grad, state, group, fmt):
        momentum = group["momentum"]
        if momentum == 0:
            return grad.clone()
        buf = fmt.read(state, "momentum_buffer")
        if rule_step(state) == 1:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - group["dampening"])
        fmt.write(state, "momentum_buffer", buf)
        # a copy: with fp32 states `fmt.read` returns the stored tensor itself
        return grad.add(buf, alpha=momentum) if group["nesterov"] else buf.clone()
