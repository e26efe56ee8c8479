"""Plugin wrappers the distributed optimizer hands to the unchanged single-process step.

`LowRankOptimizer` reaches its projector and residual only through `plugins(group)`;
the distributed optimizer returns these wrappers from there, so the step, the refresh
policies (fixed/adaptive, keep/reset/rotate moments) and every rule run as written.

- `ShardedProjector.fit` replaces one parameter's refit:
  1. a basis the batched sharded refresh already computed for this step → install it;
  2. FSDP2 + the randomized projector → the row-sharded range finder (all ranks);
  3. otherwise one owner rank fits on the full gradient (gathered under FSDP2) and
     broadcasts what it wrote (the unbatched path: per-layer mode, gradient accumulation).
- `ShardedResidual.combine` (FSDP2 only) runs residuals that take norms over the whole
  matrix — Fira's and APOLLO's norm-growth limiter ‖φ·S‖ — on DTensor views of the local
  rows, so the norm is the global one (one scalar all-reduce), not this shard's.
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..projectors.randomized import RandomizedProjector
from .exchange import broadcast_entries, fitted_entries
from .rangefinder import gather_rows, row_layout, sharded_range_finder

SEED_STRIDE = 1_000_003  # LowRankOptimizer: state seed = group seed · 1_000_003 + param index


def param_index(state: dict) -> int:
    return int(state["seed"]) % SEED_STRIDE


class ShardedProjector:
    """Delegates everything to `inner` except `fit`."""

    def __init__(self, inner, optimizer):
        self.inner = inner
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def collective(self) -> bool:
        """Whether FSDP2 refits this projector with the row-sharded range finder."""
        return type(self.inner) is RandomizedProjector

    def fit(self, grad, state, *, rank, side, seed, dtype):
        opt = self.optimizer
        prefit = opt._prefit.pop(id(state), None)
        if prefit is not None:
            state.update(prefit)
            return
        group = opt.process_group
        if opt.parallel == "fsdp2" and self.collective:
            basis = sharded_range_finder(grad, rank, oversample=self.inner.oversample,
                                         power_iters=self.inner.power_iters, seed=seed, group=group)
            state["rank"] = rank
            self.inner.store_basis(state, "right", basis, dtype)
            return
        world = torch.distributed.get_world_size(group)
        owner = param_index(state) % world
        full = grad
        if opt.parallel == "fsdp2":
            full = gather_rows(grad, row_layout(grad.shape[0], group)[2], owner, group)
        entries = None
        if torch.distributed.get_rank(group) == owner:
            scratch = dict(state)
            self.inner.fit(full, scratch, rank=rank, side=side, seed=seed, dtype=dtype)
            entries = fitted_entries(state, scratch)
        state.update(broadcast_entries(entries, owner, grad.device, group))


def _lift(local: torch.Tensor, mesh, rows: int) -> DTensor:
    shape = (rows, *local.shape[1:])
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=shape, stride=stride)


def _lower(value: DTensor) -> torch.Tensor:
    if any(not isinstance(p, Shard) or p.dim != 0 for p in value.placements):
        value = value.redistribute(value.device_mesh, [Shard(0)] if value.dim() else [Replicate()])
    return value.to_local()


class ShardedResidual:
    """FSDP2: the residual sees the whole matrix as row-sharded DTensors."""

    def __init__(self, inner, optimizer):
        self.inner = inner
        self.optimizer = optimizer

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def combine(self, grad, low_grad, direction, back, state, group):
        param = self.optimizer._current
        if grad is None or not isinstance(param, DTensor):
            return self.inner.combine(grad, low_grad, direction, back, state, group)
        mesh, rows = param.device_mesh, param.shape[0]

        def sharded_back(x):
            return _lift(back(x.to_local()), mesh, rows)

        scalars = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 0]
        for key in scalars:  # e.g. Fira's limited norm: the same value on every rank
            state[key] = DTensor.from_local(state[key], mesh, [Replicate()], run_check=False)
        try:
            update = self.inner.combine(_lift(grad, mesh, rows), _lift(low_grad, mesh, rows),
                                        _lift(direction, mesh, rows), sharded_back, state, group)
        finally:
            for key, value in list(state.items()):
                if isinstance(value, DTensor):
                    state[key] = _lower(value)
        return _lower(update) if isinstance(update, DTensor) else update
