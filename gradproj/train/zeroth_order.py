"""Zeroth-order training (MeZO, Malladi et al. 2023): SPSA estimates fed to the optimizer.

    zo = ZerothOrder(optimizer, eps=1e-3, perturbations=1, subspace=False, seed=0)
    loss, ok = zo.step(lambda: model(x, y).item(), mean=ctx.mean_many)

Per step, for each of n perturbations i with seed s_i (drawn from a counter stream):

    θ ← θ + ε·z_i;  L₊ = L(θ)       z_i ~ N(0, I), regenerated from s_i, never stored
    θ ← θ − 2ε·z_i; L₋ = L(θ)
    θ ← θ + ε·z_i                    restore (fp32: within rounding of θ, as MeZO)
    ĝ_i = (L₊ − L₋) / 2ε             the projected gradient along z_i

then, one parameter at a time, G = (1/n)·Σ ĝ_i·z_i (z_i regenerated again) is handed to
`optimizer.step_param(p, group, grad=G)`: the optimizer's own rule, state format,
projector and residual act on it (ZO-SGD = `sgdm` with momentum 0, ZO-Adam = `adamw`).
E[ĝ·z] = E[z zᵀ]∇L + O(ε²) = ∇L (SPSA; tests/train/test_zeroth_order.py tests it).

Memory: the forwards run under `torch.no_grad()` (no autograd graph, nothing saved for a
backward) and no `.grad` is ever set: besides weights and optimizer states, the only
tensors are one forward's live activations and, between forwards, one weight's z (fp32,
the weight's shape) — plus, in the update, that weight's fp32 estimate G (for n > 1 a
second tensor: G and the z_i being added). The memory planner reports it this way.

Low-rank perturbations (`subspace = True`, in the spirit of ZO-Bench's and SubZero's
subspace perturbations): for a projected weight, z = back(z_low) with z_low ~ N(0, I)
of the low-rank shape (r×n for a left basis P: z = P·z_low) in the basis the optimizer
state holds. Since back is the adjoint of project, ĝ ≈ ⟨∇L, back(z_low)⟩ =
⟨project(∇L), z_low⟩, so ĝ·z_low estimates R = project(G) — handed over directly as
`step_param(low_grad=...)`, no m×n gradient. On the steps where the weight's basis is
due for a refresh (every `update_gap` steps, and the first), the weight takes a full
perturbation and the optimizer refits its basis on the full estimate as usual. This
shrinks the dimension the SPSA variance grows with from m·n to r·n for those weights.

Seeds: perturbation k of the run (k = step·n + i) has seed `zo_seed(base, k)`, and the
weight with optimizer index j draws its z from `zo_param_seed(s_k, j)`, so every rank of a
DDP run draws the same z with no communication; the losses are averaged over ranks
(one float per perturbation, L₊ − L₋, in one all-reduce). The stream's position is
saved in the checkpoint (`state_dict`) and restored on resume.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..optimizers.lowrank import matrix_shape
from ..projectors.base import low_rank_shape
from ..quant.linear import is_quantized
from ..seeds import zo_param_seed, zo_seed
from ..stacked_state import StackedState


class ZerothOrder:
    """SPSA gradient source for a `LowRankOptimizer` (see the module docstring)."""

    def __init__(self, optimizer, *, eps: float = 1e-3, perturbations: int = 1,
                 subspace: bool = False, seed: int = 0):
        if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
            raise ValueError(f"zeroth-order: eps must be a finite number > 0, got {eps!r}")
        if not (isinstance(perturbations, int) and perturbations >= 1):
            raise ValueError(f"zeroth-order: perturbations must be an integer >= 1, "
                             f"got {perturbations!r}")
        self.opt = optimizer
        self.eps, self.n, self.subspace, self.base = float(eps), perturbations, subspace, int(seed)
        self.position = 0  # perturbations drawn so far: the seed stream's state
        # (index, parameter, group index): load_state_dict replaces the group dicts (and the
        # LR scheduler writes into the new ones), so a group is looked up at each use
        self._params: list[tuple[int, torch.Tensor, int]] = []
        for g, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if is_quantized(p):
                    raise ValueError("zeroth-order training perturbs weights in place; INT8 "
                                     "weights (quantize_weights) cannot take θ ± ε·z")
                self._params.append((len(self._params), p, g))
        if subspace:
            for _, p, group in self.params:
                if optimizer.is_low_rank(p, group) and not optimizer.accumulates_low_rank(p, group):
                    raise ValueError(f"zeroth-order subspace perturbations: residual "
                                     f"{group['residual']!r} reads the full gradient; use a "
                                     f"residual that reads R only ('drop')")
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def params(self) -> list[tuple[int, torch.Tensor, dict]]:
        groups = self.opt.param_groups
        return [(j, p, groups[g]) for j, p, g in self._params]

    # -- the seed stream (checkpointed) ---------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.base, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.base:
            raise ValueError(f"zeroth-order: the checkpoint's perturbation stream has seed "
                             f"{state['seed']}, this run {self.base}")
        self.position = int(state["position"])

    # -- perturbations ----------------------------------------------------------------------
    def _noise(self, shape, seed: int, device: torch.device) -> torch.Tensor:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)

    def _layout(self) -> list[tuple | None]:
        """Per parameter: None (full z) or (side, low-rank shape) for a subspace z."""
        out = []
        for _, p, group in self.params:
            low = None
            if self.subspace and self.opt.is_low_rank(p, group):
                state = self.opt.state.get(p)
                due = not state or state["step"] >= state["next_refresh"]
                if not due:  # a basis exists and this step does not refit it
                    side = self.opt.side(p, group)
                    low = (side, low_rank_shape(matrix_shape(p), group["rank"], side))
            out.append(low)
        return out

    def _direction(self, j: int, p: torch.Tensor, group: dict, low, seed: int, *,
                   full: bool) -> torch.Tensor:
        """z for parameter j (full: its shape; subspace: back(z_low) or z_low itself)."""
        s = zo_param_seed(seed, j)
        if low is None:
            return self._noise(p.shape, s, p.device)
        side, shape = low
        z_low = self._noise(shape, s, p.device)
        if not full:
            return z_low
        projector = self.opt.plugins(group)[1]
        state = self.opt.state[p]
        if projector.batched:
            z = projector.project_back(z_low.unsqueeze(0), StackedState([state]), side,
                                       matrix_shape(p))[0]
        else:
            z = projector.project_back(z_low, state, side, matrix_shape(p))
        return z.reshape(p.shape)

    @torch.no_grad()
    def _perturb(self, layout, seed: int, scale: float) -> None:
        for (j, p, group), low in zip(self.params, layout):
            p.add_(self._direction(j, p, group, low, seed, full=True), alpha=scale)

    # -- one step -----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, loss_fn: Callable[[], float],
             mean: Callable[[Sequence[float]], list[float]] = list) -> tuple[float, bool]:
        """Estimate and apply one update. `loss_fn()` returns this process's loss (a float)
        at the current weights; `mean` averages a list of floats over ranks (one
        all-reduce). Returns (loss at θ estimated as the mean of L₊ and L₋, ok); ok is
        False when a loss was not finite: the weights are restored and nothing is stepped."""
        layout = self._layout()
        seeds = [zo_seed(self.base, self.position + i) for i in range(self.n)]
        self.position += self.n
        diffs, level = [], 0.0
        for seed in seeds:
            self._perturb(layout, seed, self.eps)
            plus = loss_fn()
            self._perturb(layout, seed, -2 * self.eps)
            minus = loss_fn()
            self._perturb(layout, seed, self.eps)
            diffs.append(plus - minus)
            level += (plus + minus) / (2 * self.n)
        *diffs, level = mean([*diffs, level])  # one float per perturbation (+ the loss shown)
        if not all(map(math.isfinite, [*diffs, level])):
            return level, False
        projected = [d / (2 * self.eps) for d in diffs]
        for (j, p, group), low in zip(self.params, layout):  # groups as they are now (lr)
            estimate = None
            for seed, g in zip(seeds, projected):
                z = self._direction(j, p, group, low, seed, full=False)
                if estimate is None:
                    estimate = z.mul_(g / self.n)
                else:
                    estimate.add_(z, alpha=g / self.n)
            if low is None:
                self.opt.step_param(p, group, grad=estimate)
            else:
                self.opt.step_param(p, group, low_grad=estimate.reshape(low[1]))
        return level, True


__all__ = ["ZerothOrder"]
