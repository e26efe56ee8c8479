"""FRUGAL (Zmushko et al. 2024): stateful rule in the subspace, state-free signSGD outside it."""
from __future__ import annotations

import torch

from ..registry import RESIDUALS
from .base import Residual


@RESIDUALS.register("frugal")
class Frugal(Residual):
    """U = scale·back(N) + κ·sign(G − back(R)): signSGD on the residual, no state (κ = free_lr_scale).

    The optimizer multiplies U by lr, so the subspace moves with lr·scale (FRUGAL's
    projected-params lr scale; its preset uses 1) and the rest with lr·κ (κ = 1 for
    pre-training, 0.1 for fine-tuning in the paper). FRUGAL resets the moments when
    the subspace changes: its preset sets `moments = "reset"`.
    """

    defaults = {"free_lr_scale": 1.0}
    batched = True

    def validate(self, group):
        kappa = group.get("free_lr_scale")
        if not isinstance(kappa, (int, float)) or isinstance(kappa, bool) or kappa < 0:
            raise ValueError(f"option 'free_lr_scale' must be a number >= 0, got {kappa!r}")

    def combine(self, grad, low_grad, direction, back, state, group, folded_scale=1.0):
        outside = back(low_grad)  # a fresh tensor: G − back(R) into it, then its sign
        torch.sub(grad, outside, out=outside).sign_()
        return back(direction * group["scale"]).add_(outside, alpha=group["free_lr_scale"])
