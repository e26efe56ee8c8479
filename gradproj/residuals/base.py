"""What happens to the gradient outside the subspace: the `RESIDUALS` plugin kind.

A residual policy composes the full-size update U from the pieces of one low-rank step:
G (m×n fp32 gradient), R = project(G), N = rule(R), `back`, the back-projection (it
returns a fresh tensor, which the policy may overwrite), and c, the factor the rule
folded into N (`Rule.step_scale`: Adam's bias correction). The optimizer then applies
W ← W − lr·U − lr·wd·W; U must be a fresh tensor too (never G or R themselves): the
optimizer and a rule that `finishes_update` may overwrite it. Policies keep any state of
their own (e.g. Fira's limited norm) in the per-parameter state dict under their own keys.

Capabilities (class attributes with safe defaults):
  `uses_full_grad` (True): `combine` reads G itself, not only R. Per-layer mode may
      then not sum projected micro-batch gradients; it accumulates the full G.
  `batched` (False): `combine` acts on a k×m×n bucket (dimensions counted from the end,
      norms per slice) as on each weight alone.
  `fuses_back_projection` (False): the policy can apply W ← W − lr·U − lr·wd·W itself
      with `fused_step`, without materialising U (Drop: the back-projection GEMM with the
      update in its epilogue). The optimizer calls it where that is exact: a dense
      contiguous weight, a one-sided basis, and Triton running (`kernels/dispatch.py`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..kernels import backproj
from ..registry import RESIDUALS

Back = Callable[[torch.Tensor], torch.Tensor]


class Residual:
    """Base class for a residual policy."""

    #: option name -> default value; merged into the optimizer's defaults
    defaults: dict = {}
    uses_full_grad: bool = True
    batched: bool = False
    fuses_back_projection: bool = False

    def validate(self, group: dict) -> None:
        """Raise ValueError naming a bad option of `group`."""

    def combine(self, grad: torch.Tensor, low_grad: torch.Tensor, direction: torch.Tensor,
                back: Back, state: dict, group: dict, folded_scale: float = 1.0) -> torch.Tensor:
        raise NotImplementedError


@RESIDUALS.register("drop", aliases=("none", "galore"))
class Drop(Residual):
    """Discard G − back(R) (GaLore): U = scale · back(N)."""

    uses_full_grad = False
    batched = True
    fuses_back_projection = True

    def combine(self, grad, low_grad, direction, back, state, group, folded_scale=1.0):
        return back(direction).mul_(group["scale"])

    def fused_step(self, weights: list[torch.Tensor], basis: torch.Tensor,
                   direction: torch.Tensor, side: str, group: dict) -> None:
        """W ← W − lr·scale·back(N) − lr·wd·W for each (m×n view of a) weight, one fused
        GEMM each (kernels/backproj.py); `basis` and `direction` are stacked k×…."""
        for weight, p, n in zip(weights, basis, direction):
            backproj.backproject_update(weight, p, n, side, group["lr"], group["scale"],
                                        group["weight_decay"])
