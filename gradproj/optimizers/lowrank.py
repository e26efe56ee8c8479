"""`LowRankOptimizer`: one optimizer step of the GaLore family, composed from plugins.

For a weight W (m×n) in a low-rank group, with gradient G:

    refresh?  projector.fit(G)                 every `update_gap` steps (step % gap == 0)
    R = projector.project(G)                   r×n or m×r
    N = rule.update(R)                         moments stored through `state_format`
    U = residual.combine(G, R, N, back, c)     "drop": U = scale · back(N)
    W ← W − lr·U;  W ← W − lr·wd·W             decoupled weight decay after the step
                                               (a rule that `finishes_update` makes U' from
                                               W and U, its decay inside: W ← W − lr·U')

Everything else (1-D, embeddings, groups without `lowrank`) runs the same rule at full
rank: U = N. All per-parameter state is tensors and plain scalars.

The step runs on buckets (`buckets.py`): the parameters of a group with one shape, dtype
and layout step as one k×m×n stack — one batched matmul per projection, one elementwise
pass per moment update, one foreach write of the weights — wherever the plugins declare
`batched`; a plugin that does not is called once per weight inside its bucket. A single
weight (`step_param`, per-layer mode) is a bucket of one and runs the same code.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch

from .. import formats, projectors, residuals, rules  # noqa: F401  (registers built-ins)
from ..kernels import backproj
from ..projectors.base import PROJ_TYPES, low_rank_shape, resolve_side
from ..quant.linear import apply_quantized_updates, compute_dtype, is_quantized
from ..registry import PROJECTORS, RESIDUALS, RULES, STATE_FORMATS
from ..rules.base import rule_step
from ..seeds import param_seed
from ..stacked_state import StackedState
from .buckets import Bucket, partition, view_buckets
from .curvature import update_curvature
from .heap import keep_freed_memory
from .options import GENERIC_DEFAULTS, normalize_group, validate_group
from .refresh import refresh_subspace


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
        self._side_cache: dict[tuple, str] = {}
        self._bucket_cache: dict[tuple, list[Bucket]] = {}
        self._warned: set[str] = set()
        super().__init__(params, defaults)

    # -- groups and plugins ------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        normalize_group(param_group)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        rule, _, _, residual = self._registered_plugins(group)
        for source in (rule.defaults, residual.defaults):
            for key, value in source.items():
                group.setdefault(key, value)
        validate_group(group)
        rule.validate(group)
        residual.validate(group)
        self.plugins(group)  # a subclass may refuse a combination here (FSDP2)
        self._param_seeds = {p: i for i, p in enumerate(
            q for g in self.param_groups for q in g["params"])}

    def plugins(self, group: dict) -> tuple:
        """(rule, projector, state format, residual) instances for a group, cached; the
        rule as configured for the group's options (`Rule.for_options`: SGD at momentum 0
        keeps no buffer), so every state call below sizes state from them."""
        rule, projector, fmt, residual = self._registered_plugins(group)
        return rule.for_options(group), projector, fmt, residual

    def _registered_plugins(self, group: dict) -> tuple:
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
        plugins = self.plugins(group)
        shape, rank, dtype = matrix_shape(p), group["rank"], compute_dtype(p)
        key = (*map(id, plugins), group["proj_type"], rank, shape, dtype)
        side = self._side_cache.get(key)
        if side is None:
            rule, projector, fmt, _ = plugins

            def cost(side: str) -> int:
                return (rule.state_nbytes(low_rank_shape(shape, rank, side), fmt)
                        + projector.basis_nbytes(shape, rank, side, dtype))

            side = self._side_cache[key] = resolve_side(group["proj_type"], shape, cost)
        return side

    def init_state(self, p: torch.Tensor, group: dict) -> dict:
        """Allocate p's state (moments, counters). Works on the meta device too."""
        rule, _, fmt, _ = self.plugins(group)
        if p.device.type == "cpu":
            keep_freed_memory()  # once a process: CPU steps stop re-faulting their temporaries
        state = self.state[p]
        state["step"] = 0
        state["seed"] = param_seed(group["seed"], self._param_seeds[p])
        if self.is_low_rank(p, group):
            shape = low_rank_shape(matrix_shape(p), group["rank"], self.side(p, group))
            state["next_refresh"] = 0
            state["refreshes"] = 0
        else:
            shape = tuple(p.shape)
        rule.init_state(state, shape, p.device, fmt)
        return state

    def _state_of(self, p: torch.Tensor, group: dict) -> dict:
        return self.state[p] if self.state.get(p) else self.init_state(p, group)

    # -- the step ----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for bucket in self.buckets(index, group, params):
                self._step_bucket(bucket, group, [p.grad for p in bucket.params])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, except that gradients living in a bucket's buffer
        (`gradient_as_bucket_view`) are zeroed in place, one op a bucket, and stay there."""
        viewed = [b for b in view_buckets(self._bucket_cache) if b.viewed()]
        for bucket in viewed:
            for p in bucket.params:
                p.grad = None
        super().zero_grad(set_to_none)
        for bucket in viewed:
            bucket.attach_views()

    def restore_gradient_views(self) -> None:
        """Give back its (zeroed) buffer slices to every bucket whose gradients were all set
        to None from outside — HF Trainer's `model.zero_grad()` after each step — so the
        next backward accumulates into the buffer instead of the next step stacking anew."""
        for bucket in view_buckets(self._bucket_cache):
            if all(p.grad is None for p in bucket.params):
                bucket.attach_views()

    def buckets(self, index: int, group: dict, params: list[torch.Tensor]) -> list[Bucket]:
        """`params` of group `index` partitioned into buckets, cached while neither the
        set of parameters with a gradient nor the options that shape a bucket change."""
        key = (index, *map(id, self.plugins(group)), group["lowrank"], group["rank"],
               group["proj_type"], group["bucket_cap_mb"], *map(id, params))
        cached = self._bucket_cache.get(key)
        if cached is not None:
            return cached
        buckets = partition(params, lambda p: self.is_low_rank(p, group),
                            lambda p: self.side(p, group), group["bucket_cap_mb"])
        if len(self._bucket_cache) > 64:  # parameter sets that vary step to step
            self._bucket_cache.clear()
        self._bucket_cache[key] = buckets
        return buckets

    @torch.no_grad()
    def step_param(self, p: torch.Tensor, group: dict | None = None,
                   grad: torch.Tensor | None = None, low_grad: torch.Tensor | None = None) -> None:
        """Update one parameter (a bucket of one; used by per-layer, optimizer-in-backward mode).

        `low_grad`: an already projected gradient R (from `project_grad`, e.g. summed over
        micro-batches) used instead of projecting `grad`; only where `accumulates_low_rank`.
        """
        group = self._group_of(p) if group is None else group
        low_rank = self.is_low_rank(p, group)
        bucket = Bucket([p], low_rank, self.side(p, group) if low_rank else None)
        if low_grad is not None:
            if not self.accumulates_low_rank(p, group):
                raise ValueError("low_grad is only accepted for projected weights whose "
                                 "residual reads R alone (see accumulates_low_rank)")
            self._step_bucket(bucket, group, None, low_grad.unsqueeze(0))
            return
        self._step_bucket(bucket, group, [p.grad if grad is None else grad])

    def _step_bucket(self, bucket: Bucket, group: dict, grads: list | None,
                     low: torch.Tensor | None = None) -> None:
        """One step of a bucket: `grads` (one per parameter), or its projected `low` (k×…)."""
        params = bucket.params
        if grads is not None and any(g.is_sparse for g in grads):
            raise ValueError("LowRankOptimizer does not support sparse gradients")
        states = [self._state_of(p, group) for p in params]
        for state in states:
            state["step"] += 1
        grad = None
        if grads is not None:
            grad = bucket.gradients(grads, group["gradient_as_bucket_view"]).float()
            if bucket.low_rank:
                grad = grad.view(len(params), *matrix_shape(params[0]))
                self._refresh_due(bucket, group, grad, states)
        # the rule's bias correction counts from each weight's last moment reset: weights
        # whose counts differ step in separate subsets (normally there is one)
        subsets: dict[tuple, list[int]] = {}
        for i, state in enumerate(states):
            subsets.setdefault((rule_step(state), len(state)), []).append(i)
        for members in subsets.values():
            whole = len(members) == len(params)
            pick = (lambda x: x) if whole else (lambda x: x[members])
            self._step_subset(bucket, group, tuple(members), [states[i] for i in members],
                              None if grad is None else pick(grad),
                              None if low is None else pick(low))

    def _refresh_due(self, bucket: Bucket, group: dict, grad: torch.Tensor, states: list) -> None:
        # galore-torch refreshes when the pre-increment count % gap == 0
        for i, state in enumerate(states):
            step = state["step"] - 1
            if step >= state["next_refresh"]:  # fit, then the group's refresh/moments policies
                refresh_subspace(self.plugins(group), grad[i], state, group, bucket.side, step,
                                 compute_dtype(bucket.params[i]))

    def _step_subset(self, bucket, group, members, states, grad, low) -> None:
        rule, projector, fmt, residual = self.plugins(group)
        params = [bucket.params[i] for i in members]
        stacked = bucket.state(members, states)
        if not bucket.low_rank:
            direction = self._rule_update(rule, fmt, grad, stacked, states, group)
            self._write_weights(params, direction, stacked, group, _finisher(rule, grad, group))
            return
        side, shape = bucket.side, matrix_shape(params[0])

        def each(fn, *stacks):  # a per-weight plugin method over a bucket's slices (None: no G)
            return torch.stack([fn(*(None if x is None else x[i] for x in stacks), state)
                                for i, state in enumerate(states)])

        if projector.batched:
            def back(x):
                return projector.project_back(x, stacked, side, shape)
        else:
            def back(x):
                return each(lambda y, state: projector.project_back(y, state, side, shape), x)
        if low is None:
            low = (projector.project(grad, stacked, side) if projector.batched
                   else each(lambda g, state: projector.project(g, state, side), grad))
        direction = self._rule_update(rule, fmt, low, stacked, states, group)
        if (residual.fuses_back_projection and not rule.finishes_update
                and self._fusable(params, projector, side, direction)):
            residual.fused_step([p.view(shape) for p in params],
                                projector.load_basis(stacked, side, shape), direction, side, group)
            return
        folded = rule.step_scale(rule_step(states[0]), group)
        if residual.batched:
            update = residual.combine(grad, low, direction, back, stacked, group, folded)
        else:
            def combine_one(g, r, n, state):
                return residual.combine(g, r, n, lambda x: projector.project_back(x, state, side, shape),
                                        state, group, folded)
            update = each(combine_one, grad, low, direction)
        self._write_weights(params, update, stacked, group, _finisher(rule, grad, group))

    @staticmethod
    def _fusable(params, projector, side, direction) -> bool:
        """Whether a weight update may run fused into the back-projection: exact for a
        dense contiguous weight and a stored one-sided basis, where the kernel says it pays
        (Triton, or a large fp32 weight on CPU: kernels/backproj.py)."""
        p = params[0]
        return (side in ("left", "right") and projector.batched and not is_quantized(p)
                and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and all(q.is_contiguous() for q in params) and backproj.fuses(p, direction))

    @staticmethod
    def _rule_update(rule, fmt, grad, stacked, states, group) -> torch.Tensor:
        if rule.batched and fmt.stackable(tuple(grad.shape[1:])):
            return rule.update(grad, stacked, group, fmt)
        return torch.stack([rule.update(g, state, group, fmt) for g, state in zip(grad, states)])

    @staticmethod
    def _write_weights(params, update, stacked, group, finish=None) -> None:
        """W ← W − lr·U, then decoupled weight decay W ← W − lr·wd·W, for a bucket's weights
        (U stacked k×…); INT8 `QuantLinear` weights dequantize, step and re-quantize.
        `finish(W, U)` (a rule that `finishes_update`) gives the final U', decay included."""
        if is_quantized(params[0]):
            apply_quantized_updates(params, update, stacked, group, finish)
            return
        lr, decay = group["lr"], group["weight_decay"]
        if finish is not None:
            # one weight: a view, no copy; the step runs under no_grad (no detach per weight)
            weights = (params[0].detach().unsqueeze(0) if len(params) == 1
                       else torch.stack(params)).float()
            update = finish(weights, update.float().reshape(weights.shape))
            decay = 0.0
        update = update.to(params[0].dtype).reshape(len(params), *params[0].shape)
        torch._foreach_add_(params, update.unbind(0), alpha=-lr)
        if decay:
            torch._foreach_add_(params, params, alpha=-lr * decay)

    # -- curvature (Sophia) ------------------------------------------------------------
    def update_curvature(self, estimator: str = "gnb", *, batch_size: int | None = None,
                         loss: torch.Tensor | None = None,
                         generator: torch.Generator | None = None) -> None:
        """Feed a fresh diagonal curvature estimate (Sophia's h) to every weight whose rule
        keeps one: "gnb" from `.grad` (ĥ = B·ĝ⊙ĝ, `batch_size` B), "hutchinson" from `loss`
        (ĥ = u⊙Hu, probes from `generator`); optimizers/curvature.py says how."""
        update_curvature(self, estimator, batch_size=batch_size, loss=loss, generator=generator)

    # -- gradient accumulation in the subspace (per-layer mode) ---------------------
    def accumulates_low_rank(self, p: torch.Tensor, group: dict | None = None) -> bool:
        """Whether p's micro-batch gradients may be summed after projection: p is projected
        and its residual reads only R (`Residual.uses_full_grad` is False)."""
        group = self._group_of(p) if group is None else group
        return self.is_low_rank(p, group) and not self.plugins(group)[3].uses_full_grad

    def refresh_due(self, p: torch.Tensor, group: dict | None = None) -> bool:
        """Whether p's next step (or `project_grad`) refits its basis first."""
        group = self._group_of(p) if group is None else group
        state = self._state_of(p, group)
        return "next_refresh" in state and state["step"] >= state["next_refresh"]

    @torch.no_grad()
    def project_grad(self, p: torch.Tensor, grad: torch.Tensor,
                     group: dict | None = None) -> torch.Tensor:
        """R = project(G) in the basis p's *next* step uses, fitting that basis on `grad`
        first when the next step refreshes it. Projection is linear, so the sum of the
        micro-batches' R equals the projection of their summed G in that basis; the basis
        of a refresh step is fit on the first micro-batch's G (the one that sees it due)."""
        group = self._group_of(p) if group is None else group
        state = self._state_of(p, group)
        side = self.side(p, group)
        g = grad.float().reshape(matrix_shape(p))
        if self.refresh_due(p, group):
            refresh_subspace(self.plugins(group), g, state, group, side, state["step"],
                             compute_dtype(p))
        projector = self.plugins(group)[1]
        if projector.batched:  # as a bucket of one, so the sum matches a bucketed step's bits
            return projector.project(g.unsqueeze(0), StackedState([state]), side)[0]
        return projector.project(g, state, side)

    # -- checkpoints -------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps every state tensor's own dtype.

        torch casts floating-point state to the parameter's dtype, which would turn fp32
        moments and quantization scales of a bf16 weight into bf16 and break exact resume.
        """
        super().load_state_dict(state_dict)
        self._bucket_cache.clear()  # their stacks hold the replaced tensors
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            self.state[p] = {k: v.to(device=p.device, copy=True) if torch.is_tensor(v) else v
                             for k, v in saved.items()}


def _finisher(rule, grad: torch.Tensor | None, group: dict):
    """`finish(W, U)` for `_write_weights` where the rule `finishes_update`, else None;
    G (k×m×n in a low-rank bucket) is handed over in the weights' own shape."""
    if not rule.finishes_update:
        return None

    def finish(weights: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        g = None if grad is None else grad.reshape(weights.shape)
        return rule.finish_update(weights, update, g, group)
    return finish


__all__ = ["LowRankOptimizer", "matrix_shape", "PROJ_TYPES"]
