"""What happens to the gradient outside the subspace: the `RESIDUALS` plugin kind.

A residual policy composes the full-size update U from the pieces of one low-rank step:
G (m×n fp32 gradient), R = project(G), N = rule(R), and `back`, the back-projection.
The optimizer then applies W ← W − lr·U − lr·wd·W. Policies keep any state of their own
(e.g. Fira's limited norm) in the per-parameter state dict under their own keys.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..registry import RESIDUALS

Back = Callable[[torch.Tensor], torch.Tensor]


class Residual:
    """Base class for a residual policy."""

    #: option name -> default value; merged into the optimizer's defaults
    defaults: dict = {}

    def validate(self, group: dict) -> None:
        """Raise ValueError naming a bad option of `group`."""

    def combine(self, grad: torch.Tensor, low_grad: torch.Tensor, direction: torch.Tensor,
                back: Back, state: dict, group: dict) -> torch.Tensor:
        raise NotImplementedError


@RESIDUALS.register("drop", aliases=("none", "galore"))
class Drop(Residual):
    """Discard G − back(R) (GaLore): U = scale · back(N)."""

    def combine(self, grad, low_grad, direction, back, state, group):
        return back(direction).mul_(group["scale"])
