"""`LowRankOptimizer`: one optimizer step of the GaLore family, composed from plugins.

For a weight W (m×n) in a low-rank group, with gradient G:

    refresh?  projector.fit(G)                 every `update_gap` steps (step % gap == 0)
    R = projector.project(G)                   r×n or m×r
    N = rule.update(R)                         moments stored through `state_format`
    U = residual.combine(G, R, N, back)        "drop": U = scale · back(N)
    W ← W − lr·U;  W ← W − lr·wd·W             decoupled weight decay after the step

Everything else (1-D, embeddings, groups without `lowrank`) runs the same rule at full
rank: U = N. All per-parameter state is tensors and plain scalars.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from .. import formats, projectors, residuals, rules  # noqa: F401  (registers built-ins)
from ..kernels.backproj import fused_backproject_step
from ..projectors.base import PROJ_TYPES, low_rank_shape, resolve_side
from ..quant.linear import apply_quantized_update, compute_dtype, is_quantized
from ..registry import PROJECTORS, RESIDUALS, RULES, STATE_FORMATS
from ..residuals.base import Drop
from .options import GENERIC_DEFAULTS, normalize_group, validate_group
from .refresh import refresh_subspace, rule_update


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The 2-D view a weight is projected as: conv kernels flatten to out × (in·k·k)."""
    return (p.shape[0], p.numel() // p.shape[0])


class LowRankOptimizer(torch.optim.Optimizer):
    """Gradient low-rank projection around any registered rule, projector, format, residual.

    Options (all overridable per parameter group): lr, weight_decay, rule, projector,
    projector_options, state_format, residual, rank, update_gap, scale, proj_type, seed,
    lowrank, plus the options of the chosen rule and residual (e.g. betas, eps).
    """

    def __init__(self, params: Iterable, **options: Any):
        defaults = dict(GENERIC_DEFAULTS)
        defaults.update(options)
        self._plugin_cache: dict[tuple, tuple] = {}
        self._warned: set[str] = set()
        super().__init__(params, defaults)

    # -- groups and plugins ------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        normalize_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        rule, _, _, residual = self.plugins(group)
        for source in (rule.defaults, residual.defaults):
            for key, value in source.items():
                group.setdefault(key, value)
        validate_group(group)
        rule.validate(group)
        residual.validate(group)
        self._param_seeds = {p: i for i, p in enumerate(
            q for g in self.param_groups for q in g["params"])}

    def plugins(self, group: dict) -> tuple:
        """(rule, projector, state format, residual) instances for a group, cached."""
        options = group.get("projector_options") or {}
        key = (group["rule"], group["projector"], repr(sorted(options.items())),
               group["state_format"], group["residual"])
        if key not in self._plugin_cache:
            for registry, name, option in ((RULES, group["rule"], "rule"),
                                           (PROJECTORS, group["projector"], "projector"),
                                           (STATE_FORMATS, group["state_format"], "state_format"),
                                           (RESIDUALS, group["residual"], "residual")):
                if name not in registry:
                    try:
                        registry.canonical(name)
                    except KeyError as exc:
                        raise ValueError(f"option {option!r}: {exc}") from None
            try:
                projector = PROJECTORS.create(group["projector"], **options)
            except TypeError as exc:
                raise ValueError(f"option 'projector_options' for {group['projector']!r}: {exc}") from None
            self._plugin_cache[key] = (RULES.create(group["rule"]), projector,
                                       STATE_FORMATS.create(group["state_format"]),
                                       RESIDUALS.create(group["residual"]))
        return self._plugin_cache[key]

    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("parameter is not managed by this optimizer")

    # -- per-parameter layout ----------------------------------------------------
    def is_low_rank(self, p: torch.Tensor, group: dict) -> bool:
        if not group["lowrank"] or p.dim() < 2:
            return False
        if group["rank"] >= min(matrix_shape(p)):
            msg = (f"rank {group['rank']} >= min{tuple(matrix_shape(p))}: such weights are "
                   f"updated at full rank (projection would be the identity)")
            if msg not in self._warned:
                self._warned.add(msg)
                warnings.warn(msg, stacklevel=3)
            return False
        return True

    def side(self, p: torch.Tensor, group: dict) -> str:
        """The projection side for p under the group's `proj_type` ("auto" minimises bytes)."""
        rule, projector, fmt, _ = self.plugins(group)
        shape, rank = matrix_shape(p), group["rank"]

        def cost(side: str) -> int:
            return (rule.state_nbytes(low_rank_shape(shape, rank, side), fmt)
                    + projector.basis_nbytes(shape, rank, side, compute_dtype(p)))

        return resolve_side(group["proj_type"], shape, cost)

    def init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Allocate p's state (moments, counters). Works on the meta device too."""
        rule, _, fmt, _ = self.plugins(group)
        state = self.state[p]
        state["step"] = 0
        state["seed"] = int(group["seed"]) * 1_000_003 + self._param_seeds[p]
        if self.is_low_rank(p, group):
            shape = low_rank_shape(matrix_shape(p), group["rank"], self.side(p, group))
            state["next_refresh"] = 0
            state["refreshes"] = 0
        else:
            shape = tuple(p.shape)
        rule.init_state(state, shape, p.device, fmt)
        return state

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.step_param(p, group)
        return loss

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict | None = None,
                   grad: torch.Tensor | None = None, low_grad: torch.Tensor | None = None) -> None:
        """Update one parameter (used by `step` and by per-layer, optimizer-in-backward mode).

        `low_grad`: an already projected gradient R (from `project_grad`, e.g. summed over
        micro-batches) used instead of projecting `grad`; only where `accumulates_low_rank`.
        """
        group = self._group_of(p) if group is None else group
        if low_grad is not None:
            if not self.accumulates_low_rank(p, group):
                raise ValueError("low_grad is only accepted for projected weights whose "
                                 "residual reads R alone (see accumulates_low_rank)")
            state = self.state[p]
            state["step"] += 1
            self._apply_update(p, self._low_rank_update(p, None, state, group, low=low_grad),
                               state, group)
            return
        grad = p.grad if grad is None else grad
        if grad.is_sparse:
            raise ValueError("LowRankOptimizer does not support sparse gradients")
        state = self.state[p] if self.state.get(p) else self.init_state(p, group)
        rule, projector, fmt, residual = self.plugins(group)
        g = grad.float()
        state["step"] += 1
        if "next_refresh" not in state:  # full-rank parameter
            update = rule.update(g, state, group, fmt)
        else:
            update = self._low_rank_update(p, g, state, group)
        self._apply_update(p, update, state, group)

    @staticmethod
    def _apply_update(p: torch.Tensor, update: torch.Tensor, state: dict, group: dict) -> None:
        """W ← W − lr·U, then decoupled weight decay W ← W − lr·wd·W; INT8 weights re-quantize."""
        if update is None:  # a fused kernel has applied the step already
            return
        if is_quantized(p):  # gradproj.quant.QuantLinear: dequantize, step, SR re-quantize
            apply_quantized_update(p, update, state, group)
            return
        p.add_(update.to(p.dtype), alpha=-group["lr"])
        if group["weight_decay"]:
            p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def _refresh_if_due(self, p, g, state, group, side, step) -> None:
        # galore-torch refreshes when the pre-increment count % gap == 0
        if step >= state["next_refresh"]:  # fit, then the group's refresh/moments policies
            refresh_subspace(self.plugins(group), g, state, group, side, step, compute_dtype(p))

    def _low_rank_update(self, p, g, state, group, low=None):
        rule, projector, fmt, residual = self.plugins(group)
        shape = matrix_shape(p)
        side = self.side(p, group)
        if low is None:
            g = g.reshape(shape)
            self._refresh_if_due(p, g, state, group, side, state["step"] - 1)
            low = projector.project(g, state, side)
        direction = rule_update(rule, low, state, group, fmt)  # step counted from a moment reset
        if fused_backproject_step(p, projector, residual, state, side, shape, direction, group):
            return None  # applied W ← W − lr·α·back(N) − lr·wd·W in one GEMM (kernels/backproj.py)

        def back(x: torch.Tensor) -> torch.Tensor:
            return projector.project_back(x, state, side, shape)

        update = residual.combine(g, low, direction, back, state, group)
        return update.reshape(p.shape)

    # -- gradient accumulation in the subspace (per-layer mode) ---------------------
    def accumulates_low_rank(self, p: torch.Tensor, group: dict | None = None) -> bool:
        """Whether p's micro-batch gradients may be summed after projection: p is projected
        and its residual reads only R. Residuals that read the full G (fira, frugal, apollo)
        are recognised as any residual other than `Drop` unless they set
        `uses_full_grad = False`."""
        group = self._group_of(p) if group is None else group
        if not self.is_low_rank(p, group):
            return False
        residual = self.plugins(group)[3]
        return not getattr(residual, "uses_full_grad", not isinstance(residual, Drop))

    @torch.no_grad()
    def project_grad(self, p: torch.Tensor, grad: torch.Tensor,
                     group: dict | None = None) -> torch.Tensor:
        """R = project(G) in the basis p's *next* step uses, fitting that basis on `grad`
        first when the next step refreshes it. Projection is linear, so the sum of the
        micro-batches' R equals the projection of their summed G in that basis; the basis
        of a refresh step is fit on the first micro-batch's G (the one that sees it due)."""
        group = self._group_of(p) if group is None else group
        state = self.state[p] if self.state.get(p) else self.init_state(p, group)
        side = self.side(p, group)
        g = grad.float().reshape(matrix_shape(p))
        self._refresh_if_due(p, g, state, group, side, state["step"])
        return self.plugins(group)[1].project(g, state, side)

    # -- checkpoints -------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps every state tensor's own dtype.

        torch casts floating-point state to the parameter's dtype, which would turn fp32
        moments and quantization scales of a bf16 weight into bf16 and break exact resume.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                             for k, v in saved.items()}


def count_refreshes(optimizer: LowRankOptimizer) -> int:
    """Total subspace refreshes so far, over all parameters (metric `subspace/refreshes`)."""
    return sum(s.get("refreshes", 0) for s in optimizer.state.values())


def count_svd_fallbacks(optimizer: LowRankOptimizer) -> int:
    """Total SVD failures that fell back to the range finder."""
    return sum(s.get("svd_fallbacks", 0) for s in optimizer.state.values())


def optimizer_state_nbytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor in the optimizer's state."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))


__all__ = ["LowRankOptimizer", "matrix_shape", "count_refreshes", "count_svd_fallbacks",
           "optimizer_state_nbytes", "PROJ_TYPES"]
