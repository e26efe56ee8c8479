"""Momentum SGD, as torch.optim.SGD computes it (heavy ball or Nesterov)."""
from __future__ import annotations

from ..registry import RULES
from ..stacked_state import StackedState
from .base import Rule, has_moment, rule_step

BUFFER = "momentum_buffer"


@RULES.register("sgdm", aliases=("sgd", "momentum"))
class SGDM(Rule):
    """Heavy-ball momentum (torch.optim.SGD semantics: dampening, nesterov); momentum 0 = SGD.

    B₁ = G₁ (no dampening on the first step, as torch); B ← μ·B + (1−d)·G;
    direction = G + μ·B with Nesterov, else B. At momentum 0 the rule keeps no state at
    all (`for_options` gives `SGD`): MeZO's ZO-SGD then holds the weights and nothing else.
    A buffer missing at momentum > 0 (the group's momentum was 0 when the state was made)
    starts as torch's does, B = G.
    """

    defaults = {"momentum": 0.9, "dampening": 0.0, "nesterov": False}
    moments = ((BUFFER, True),)
    batched = True

    def for_options(self, group):
        return self if group["momentum"] > 0 else PLAIN_SGD

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
        first = rule_step(state) == 1
        if not has_moment(state, BUFFER):
            # made at momentum 0: allocate per weight (a bucket's grad is k×shape)
            stacked = isinstance(state, StackedState)
            shape = tuple(grad.shape[1:] if stacked else grad.shape)
            for one in (state.states if stacked else [state]):
                fmt.zeros(one, BUFFER, shape, grad.device, signed=True)
            first = True
        buf = fmt.read(state, BUFFER)
        if first:
            buf.copy_(grad)
        else:
            buf.mul_(momentum).add_(grad, alpha=1.0 - group["dampening"])
        fmt.write(state, BUFFER, buf)
        # a copy: with fp32 states `fmt.read` returns the stored tensor itself
        return grad.add(buf, alpha=momentum) if group["nesterov"] else buf.clone()


class SGD(SGDM):
    """SGDM at momentum 0: the same step, no momentum buffer (nothing allocated, counted,
    reset, rotated or checkpointed)."""

    moments = ()


PLAIN_SGD = SGD()
