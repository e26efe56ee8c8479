"""Base optimizer math on a (possibly low-rank) gradient: the `RULES` plugin kind.

A rule turns a gradient R into a direction N of the same shape; the optimizer applies
`W ← W − lr·(α·back(N)) − lr·wd·W`. Learning rate and weight decay are the optimizer's;
a rule only owns its moments, stored through a `StateFormat` under its own keys.

Hyperparameters come from the parameter group (so schedulers and per-group overrides
work); `defaults` lists the ones a rule reads and `validate` checks them once, raising a
ValueError that names the option and the allowed values.
"""
from __future__ import annotations

import torch

from ..formats.base import StateFormat


class Rule:
    """Base class for an update rule."""

    #: option name -> default value; merged into the optimizer's defaults
    defaults: dict = {}
    #: names of the moment tensors kept per parameter, and whether each is signed
    moments: tuple[tuple[str, bool], ...] = ()

    def validate(self, group: dict) -> None:
        """Raise ValueError naming a bad option of `group`."""

    def init_state(self, state: dict, shape: tuple[int, ...], device, fmt: StateFormat) -> None:
        for key, signed in self.moments:
            fmt.zeros(state, key, shape, device, signed=signed)

    def update(self, grad: torch.Tensor, state: dict, group: dict, fmt: StateFormat) -> torch.Tensor:
        """Advance the moments with fp32 `grad`; return the direction (fp32, grad's shape).

        `state["step"]` has already been incremented: it is t = 1 on the first call.
        """
        raise NotImplementedError

    def state_nbytes(self, shape: tuple[int, ...], fmt: StateFormat) -> int:
        """Exact bytes of this rule's state for a gradient of `shape` in format `fmt`."""
        return sum(fmt.nbytes(shape, signed) for _, signed in self.moments)


def check_betas(group: dict, name: str = "betas", count: int = 2) -> None:
    betas = group.get(name)
    if (not isinstance(betas, (tuple, list)) or len(betas) != count
            or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"option {name!r} must be {count} numbers in [0, 1), got {betas!r}")


def check_positive(group: dict, name: str, allow_zero: bool = False) -> None:
    value = group.get(name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"option {name!r} must be a number {bound}, got {value!r}")
