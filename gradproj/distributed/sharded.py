"""Plugin wrappers the distributed optimizer hands to the unchanged single-process step.

`LowRankOptimizer` reaches its projector and residual only through `plugins(group)`;
the distributed optimizer returns these wrappers from there, so the step, the refresh
policies (fixed/adaptive, keep/reset/rotate moments) and every rule run as written.

- `ShardedProjector.fit` replaces one parameter's refit:
  1. a basis the batched sharded refresh already computed for this step → install it;
  2. FSDP2 + the randomized projector → the row-sharded range finders (all ranks): the
     right one (`sharded_range_finder`) and/or the left one (`sharded_left_range_finder`);
  3. otherwise one owner rank fits on the full gradient (gathered under FSDP2) and
     broadcasts what it wrote (the unbatched path: per-layer mode, gradient accumulation).
- Under FSDP2 every basis is stored whole on every rank (n×r right, m×r left), so the
  refresh policies (moment rotation Pₙₑwᵀ·Pₒₗd, adaptive similarity) run unchanged.
  `load_basis` always answers for the global m×n shape; `project` / `project_back` of a
  left (or full) side use this rank's rows P_k of the left basis: R = Σ_k P_kᵀ·G_k is one
  all-reduce of the r×n (r×r) partials per step, and back(N) = P_k·N is local rows.
- `ShardedResidual.combine` (FSDP2 only) runs residuals that take norms over the whole
  matrix — Fira's and APOLLO's norm-growth limiter ‖φ·S‖ — on DTensor views of the local
  rows, so the norm is the global one (one scalar all-reduce), not this shard's. The
  low-rank R and N are row-sharded for a right side and replicated for a left/full one.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from ..projectors.base import sides_of
from ..projectors.randomized import RandomizedProjector
from ..seeds import param_index
from .exchange import broadcast_entries, fitted_entries
from .rangefinder import gather_rows, row_layout, sharded_left_range_finder, sharded_range_finder

def _mirror(mixin: type, inner, optimizer):
    """An object of a subclass of (mixin, type(inner)) sharing inner's attributes.

    A subclass rather than a proxy, so that code inspecting the plugin's class — the fused
    back-projection kernel checks `type(projector).project_back`, registries and residual
    policies use isinstance — sees the wrapped plugin's class and methods.
    """
    cls = _MIRRORS.get((mixin, type(inner)))
    if cls is None:
        cls = type(f"{mixin.__name__}[{type(inner).__name__}]", (mixin, type(inner)), {})
        _MIRRORS[(mixin, type(inner))] = cls
    obj = object.__new__(cls)
    obj.__dict__.update(inner.__dict__)
    obj._plugin, obj._dist_opt = inner, optimizer  # names no plugin uses (int4 has .inner)
    obj._local_rows = None                          # set while projecting a left side
    return obj


_MIRRORS: dict = {}


class ShardedProjector:
    """Mixed into the wrapped projector's class: everything is the projector's but `fit`."""

    @classmethod
    def wrap(cls, inner, optimizer):
        return _mirror(cls, inner, optimizer)

    @property
    def collective(self) -> bool:
        """Whether FSDP2 refits this projector with the row-sharded range finder."""
        return type(self._plugin) is RandomizedProjector

    def fit(self, grad, state, *, rank, side, seed, dtype):
        opt = self._dist_opt
        prefit = opt._prefit.pop(id(state), None)
        if prefit is not None:
            state.update(prefit)
            return
        group = opt.process_group
        if opt.parallel == "fsdp2" and self.collective:
            finders = {"left": sharded_left_range_finder, "right": sharded_range_finder}
            state["rank"] = rank
            for one in sides_of(side):  # "full": both, from the same seed, as Projector.fit
                basis = finders[one](grad, rank, oversample=self._plugin.oversample,
                                     power_iters=self._plugin.power_iters, seed=seed, group=group)
                self._plugin.store_basis(state, one, basis, dtype)
            return
        world = torch.distributed.get_world_size(group)
        owner = param_index(state["seed"]) % world
        full = grad
        if opt.parallel == "fsdp2":
            full = gather_rows(grad, row_layout(grad.shape[0], group, grad.device)[2], owner, group)
        entries = None
        if torch.distributed.get_rank(group) == owner:
            scratch = dict(state)
            self._plugin.fit(full, scratch, rank=rank, side=side, seed=seed, dtype=dtype)
            entries = fitted_entries(state, scratch)
        state.update(broadcast_entries(entries, owner, grad.device, group))

    # -- the basis of a row-sharded weight: stored whole, used by rows ----------------------
    def load_basis(self, state, side, shape):
        param = self._dist_opt._current
        if not isinstance(param, DTensor):
            return super().load_basis(state, side, shape)
        basis = super().load_basis(state, side, (param.shape[0], param.numel() // param.shape[0]))
        if side == "left" and self._local_rows is not None:
            basis = basis[..., self._local_rows, :]
        return basis

    def _left_sharded(self, side: str) -> bool:
        return side in ("left", "full") and isinstance(self._dist_opt._current, DTensor)

    def _rows_of_current(self) -> slice:
        param = self._dist_opt._current
        local, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh,
                                                              param.placements)
        return slice(offset[0], offset[0] + local[0])

    def project(self, grad, state, side):
        if not self._left_sharded(side):
            return super().project(grad, state, side)
        self._local_rows = self._rows_of_current()
        try:
            low = super().project(grad, state, side)   # P_kᵀ·G_k: this rank's partial
        finally:
            self._local_rows = None
        torch.distributed.all_reduce(low, group=self._dist_opt.process_group)
        return low

    def project_back(self, low, state, side, shape):
        if not self._left_sharded(side):
            return super().project_back(low, state, side, shape)
        self._local_rows = self._rows_of_current()
        try:
            return super().project_back(low, state, side, shape)  # P_k·N: this rank's rows
        finally:
            self._local_rows = None


def _lift(local: torch.Tensor, mesh, rows: int) -> DTensor:
    shape = (rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _lower(value: DTensor) -> torch.Tensor:
    if any(not isinstance(p, Shard) or p.dim != 0 for p in value.placements):
        value = value.redistribute(value.device_mesh, [Shard(0)] if value.dim() else [Replicate()])
    return value.to_local()


class ShardedResidual:
    """Mixed into the wrapped residual's class (FSDP2): `combine` sees row-sharded DTensors."""

    batched = False  # one weight's local rows at a time, lifted to a DTensor

    @classmethod
    def wrap(cls, inner, optimizer):
        return _mirror(cls, inner, optimizer)

    def combine(self, grad, low_grad, direction, back, state, group, folded_scale=1.0):
        param = self._dist_opt._current
        if grad is None or not isinstance(param, DTensor):
            return self._plugin.combine(grad, low_grad, direction, back, state, group, folded_scale)
        mesh, rows = param.device_mesh, param.shape[0]
        side = self._dist_opt.side(param, group)

        def sharded_back(x):
            return _lift(back(x.to_local()), mesh, rows)

        def low_rank(x):  # R, N: row-sharded (right) or the same on every rank (left, full)
            if side == "right":
                return _lift(x, mesh, rows)
            return DTensor.from_local(x, mesh, [Replicate()], run_check=False)

        scalars = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 0]
        for key in scalars:  # e.g. Fira's limited norm: the same value on every rank
            state[key] = DTensor.from_local(state[key], mesh, [Replicate()], run_check=False)
        try:
            update = self._plugin.combine(_lift(grad, mesh, rows), low_rank(low_grad),
                                        low_rank(direction), sharded_back, state, group,
                                        folded_scale)
        finally:
            for key, value in list(state.items()):
                if isinstance(value, DTensor):
                    state[key] = _lower(value)
        return _lower(update) if isinstance(update, DTensor) else update
