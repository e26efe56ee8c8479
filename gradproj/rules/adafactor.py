"""Adafactor (Shazeer & Stern 2018) on the (projected) gradient, as GaLore's reference applies it."""
from __future__ import annotations

import math

import torch

from ..registry import RULES
from .base import Rule, check_positive, has_moment, rule_step

ROW, COL, FULL, FIRST = "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"


def _factored(shape: tuple[int, ...]) -> bool:
    return len(shape) >= 2


@RULES.register("adafactor")
class Adafactor(Rule):
    """Factored second moment (row and column means of G²), update clipping, optional momentum.

    For an r×n gradient the second moment costs r + n numbers instead of r·n:
        β2ₜ = 1 − t^decay_rate;  R ← β2ₜ·R + (1−β2ₜ)·mean_cols(G² + ε1);  C likewise over rows
        V̂ = R·Cᵀ / mean(R);  U = G / √V̂;  U ← U / max(1, RMS(U)/clip_threshold)
    1-D tensors keep an unfactored V. `beta1` > 0 adds a first moment of U (the default
    0 keeps none). `relative_step` multiplies the
    direction by ρₜ = min(1e-2, 1/√t) — use it with lr 1; Shazeer & Stern also scale ρ
    by RMS(W), which a rule on the projected gradient cannot see, so that part is left
    out (HF's `scale_parameter`). Off by default, as in GaLore's reference.
    ε1 is named `eps1` (default 1e-30, the paper's) so an AdamW `eps` left in a group by
    a preset is never added to G² by mistake.
    """

    defaults = {"decay_rate": -0.8, "beta1": 0.0, "eps1": 1e-30, "clip_threshold": 1.0,
                "relative_step": False}

    def validate(self, group):
        rate = group.get("decay_rate")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not -1.0 <= rate < 0.0:
            raise ValueError(f"option 'decay_rate' must be a number in [-1, 0), got {rate!r}")
        beta1 = group.get("beta1")
        if not isinstance(beta1, (int, float)) or isinstance(beta1, bool) or not 0.0 <= beta1 < 1.0:
            raise ValueError(f"option 'beta1' must be a number in [0, 1) (0 = no first moment), got {beta1!r}")
        check_positive(group, "eps1")  # 0 would make V̂ = 0 and U = 0/0 on a zero gradient
        check_positive(group, "clip_threshold")
        if not isinstance(group.get("relative_step"), bool):
            raise ValueError(f"option 'relative_step' must be true or false, got {group.get('relative_step')!r}")

    def init_state(self, state, shape, device, fmt):
        if _factored(shape):
            fmt.zeros(state, ROW, tuple(shape[:-1]), device, signed=False)
            fmt.zeros(state, COL, tuple(shape[:-2]) + (shape[-1],), device, signed=False)
        else:
            fmt.zeros(state, FULL, tuple(shape), device, signed=False)

    def for_options(self, group):
        return self if group["beta1"] == 0 else WITH_FIRST_MOMENT

    def state_nbytes(self, shape, fmt):
        """Bytes of the second moment (`beta1` > 0: `for_options` adds the first's)."""
        if _factored(shape):
            return (fmt.nbytes(tuple(shape[:-1]), False)
                    + fmt.nbytes(tuple(shape[:-2]) + (shape[-1],), False))
        return fmt.nbytes(tuple(shape), False)

    def update(self, grad, state, group, fmt):
        step = rule_step(state)
        beta2t = 1.0 - step ** group["decay_rate"]  # 0 at t = 1: the first V is exact
        sq = grad.square().add_(group["eps1"])
        if _factored(grad.shape):
            row, col = fmt.read(state, ROW), fmt.read(state, COL)
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            fmt.write(state, ROW, row)
            fmt.write(state, COL, col)
            update = factored_rsqrt(row, col).mul_(grad)
        else:
            v = fmt.read(state, FULL)
            v.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            fmt.write(state, FULL, v)
            update = v.rsqrt().mul_(grad)
        rms = update.square().mean().sqrt()
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0))
        if group["relative_step"]:
            update.mul_(min(1e-2, 1.0 / math.sqrt(step)))
        beta1 = group["beta1"]
        if beta1 > 0:
            if not has_moment(state, FIRST):
                fmt.zeros(state, FIRST, tuple(grad.shape), grad.device, signed=True)
            exp_avg = fmt.read(state, FIRST)
            exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
            fmt.write(state, FIRST, exp_avg)
            update = exp_avg.clone()
        return update

    def reset_moments(self, state, shape, device, fmt):
        """Zero the moments (refresh policy "reset"), dropping a lazily made first moment."""
        for key in [k for k in state if k == FIRST or k.startswith(FIRST + ".")]:
            del state[key]
        self.init_state(state, shape, device, fmt)

    def rotate_moments(self, state, fmt, left: torch.Tensor | None, right: torch.Tensor | None):
        """Carry the moments into a new basis (see optimizers/refresh.py for A and B).

        R' = A·R·B: the first moment maps exactly; for the factored second moment, with
        independent zero-mean coordinates E[R'²] = (A∘A)·V·(B∘B), so the row means map
        by A∘A and the column means by (B∘B)ᵀ — exact for V of rank one (what the
        factorisation already assumes) and Σ-preserving for orthogonal A, B.
        """
        if has_moment(state, ROW):
            if left is not None:
                fmt.write(state, ROW, (left * left) @ fmt.read(state, ROW))
            if right is not None:
                fmt.write(state, COL, fmt.read(state, COL) @ (right * right))
        if has_moment(state, FIRST):
            m = fmt.read(state, FIRST)
            m = left @ m if left is not None else m
            fmt.write(state, FIRST, m @ right if right is not None else m)


class AdafactorWithFirstMoment(Adafactor):
    """Adafactor at `beta1` > 0 (what `for_options` returns): the first moment of U is
    allocated with the second, so the planner and `state_nbytes` count it (it was made at
    the first update, after the planner's look: 418,632 state bytes against 249,152
    planned for the tiny model in q8, tests/memory/test_accounting.py)."""

    def init_state(self, state, shape, device, fmt):
        super().init_state(state, shape, device, fmt)
        fmt.zeros(state, FIRST, tuple(shape), device, signed=True)

    def state_nbytes(self, shape, fmt):
        return super().state_nbytes(shape, fmt) + fmt.nbytes(tuple(shape), True)


WITH_FIRST_MOMENT = AdafactorWithFirstMoment()


def factored_rsqrt(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1/√V̂ for V̂ = R·Cᵀ/mean(R) without forming V̂ first (Shazeer & Stern eq. 4)."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return r_factor * c_factor
