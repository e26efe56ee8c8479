"""Base optimizer math on a (possibly low-rank) gradient: the `RULES` plugin kind.

A rule turns a gradient R into a direction N of the same shape; the optimizer applies
`W ← W − lr·(α·back(N)) − lr·wd·W`. Learning rate and weight decay are the optimizer's;
a rule only owns its moments, stored through a `StateFormat` under its own keys.

Hyperparameters come from the parameter group (so schedulers and per-group overrides
work); `defaults` lists the ones a rule reads and `validate` checks them once, raising a
ValueError that names the option and the allowed values. Where the options decide what
state a rule keeps (SGD at momentum 0 keeps none), `for_options(group)` returns the rule
as configured for them, and the optimizer allocates, counts, resets and rotates state
through that instance; the state methods themselves never see the options.
"""
from __future__ import annotations

import math

import torch

from ..formats.base import StateFormat
from ..stacked_state import StackedState


def rule_step(state) -> int:
    """t, the step a rule's bias correction counts: steps since its moments were last
    (re)initialised. `state["step"]` counts every step of the parameter (the refresh
    schedule and the seeds follow it); a moment reset records its origin."""
    return state["step"] - state.get("moments_origin", 0)


class Rule:
    """Base class for an update rule.

    Capabilities (class attributes with safe defaults):
      `batched` (False): `update` is elementwise in the gradient and the moments, so it
          may be handed a k×… stack of same-shape gradients with a `StackedState` (each
          moment stacked the same way) and gives each slice what it would give that
          weight alone. Adam, Lion, AdaBelief and SGDM are; Adafactor (row/column means,
          update clipping by the RMS of the whole update) is not.
      `finishes_update` (False): the rule also sees the full-size update U the weight
          receives — after back-projection and the residual, as a k×… stack with the
          weights W — and returns the final U' with `finish_update`; the optimizer then
          applies W ← W − lr·U' and no weight decay of its own (the rule owns it: LAMB's
          trust ratio is taken over U + wd·W, AdamP scales wd by its wd_ratio). Such a
          rule never runs fused into the back-projection (`Residual.fuses_back_projection`
          writes W without forming U).
      `uses_curvature` (False): the rule keeps a curvature estimate that the optimizer's
          `update_curvature` call advances through `update_curvature` below (Sophia's h,
          optimizers/curvature.py); the optimizer refuses that call for other rules.
    FSDP2 steps a rule on each rank's rows only where `batched` holds (an elementwise
    rule is shard-local) and `finishes_update` does not (its norms span all rows).
    """

    #: option name -> default value; merged into the optimizer's defaults
    defaults: dict = {}
    #: names of the moment tensors kept per parameter, and whether each is signed
    moments: tuple[tuple[str, bool], ...] = ()
    batched: bool = False
    finishes_update: bool = False
    uses_curvature: bool = False

    def for_options(self, group: dict) -> Rule:
        """This rule as configured for a validated group's options: `self` unless the
        options change which state it keeps. Every state call of the optimizer (allocate,
        `state_nbytes`, reset, rotate, update) goes to the returned instance, so one whose
        `moments` (or state methods) keep less allocates, plans and checkpoints less. It
        must be cheap (called per bucket step) and return one instance per configuration
        (the optimizer's caches key on its identity)."""
        return self

    def step_scale(self, t: int, group: dict) -> float:
        """The factor this rule folds into its direction at step t (Adam's bias
        correction; 1 for rules without one). Residuals that must see the uncorrected
        direction (Fira, APOLLO) divide by it; it is the only place it is computed."""
        return 1.0

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

    def finish_update(self, weights: torch.Tensor, update: torch.Tensor,
                      grad: torch.Tensor | None, group: dict) -> torch.Tensor:
        """U' from the full-size update U, only where `finishes_update`: weights W and U are
        fp32 k×(weight shape) stacks (W read-only; norms are per slice), grad the full-size
        gradient G of the same shape, or None where the step only has its projection (per-layer
        mode accumulating R). U' must include the rule's weight decay."""
        raise NotImplementedError

    def update_curvature(self, estimate: torch.Tensor, state: dict, group: dict,
                         fmt: StateFormat) -> None:
        """Fold a fresh curvature estimate ĥ (fp32, the moments' shape) into the state."""
        raise NotImplementedError(f"{type(self).__name__} keeps no curvature estimate")

    def state_nbytes(self, shape: tuple[int, ...], fmt: StateFormat) -> int:
        """Exact bytes of this rule's state for a gradient of `shape` in format `fmt`."""
        return sum(fmt.nbytes(shape, signed) for _, signed in self.moments)

    def reset_moments(self, state: dict, shape: tuple[int, ...], device, fmt: StateFormat) -> None:
        """Zero the moments (refresh policy "reset")."""
        self.init_state(state, shape, device, fmt)

    def rotate_moments(self, state: dict, fmt: StateFormat, left: torch.Tensor | None,
                       right: torch.Tensor | None) -> None:
        """Carry the moments into a new basis (refresh policy "rotate"; A, B as in
        optimizers/refresh.py): M' = A·M·B for signed moments, V' = (A∘A)·V·(B∘B) for
        unsigned ones. A moment not allocated yet (one made lazily, SGDM's buffer after
        its momentum was 0) has nothing to carry."""
        for key, signed in self.moments:
            if not has_moment(state, key):
                continue
            value = fmt.read(state, key)
            a = None if left is None else (left if signed else left * left)
            b = None if right is None else (right if signed else right * right)
            if a is not None:
                value = a @ value
            if b is not None:
                value = value @ b
            fmt.write(state, key, value)


def has_moment(state, key: str) -> bool:
    """Whether moment `key` is allocated in `state` (a dict or a `StackedState`), under its
    own key (dense formats, small blockwise moments) or a format's `key.<part>` keys."""
    states = state.states if isinstance(state, StackedState) else [state]
    return all(key in s or any(k.startswith(key + ".") for k in s) for s in states)


def adam_bias_correction(betas, t: int) -> float:
    """Adam's bias correction as one step-size factor, √(1−β2ᵗ)/(1−β1ᵗ) (1 before step 1):
    the `step_scale` of every Adam-family rule (adamw, lamb, adamp, diffgrad)."""
    if t < 1:
        return 1.0
    beta1, beta2 = betas
    return math.sqrt(1.0 - beta2 ** t) / (1.0 - beta1 ** t)


def check_flag(group: dict, name: str) -> None:
    if not isinstance(group.get(name), bool):
        raise ValueError(f"option {name!r} must be true or false, got {group.get(name)!r}")


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
