"""`DistributedLowRankOptimizer`: the single-process step under DDP or FSDP2.

    opt = distribute_optimizer(gp.build_optimizer(model, "galore"), "fsdp2")

DDP: every rank holds the whole, all-reduced gradient and runs the same step. Before the
step, the parameters due for a refresh are split between the ranks (greedy by cost),
each rank fits its share and the bases are broadcast: a refresh costs ~1/W of the
single-process time, and all ranks hold bit-identical bases by construction.

FSDP2: parameters and gradients are row-sharded DTensors (`fully_shard`, Shard(0)). The
step runs the unchanged single-process code on this rank's rows, on the side the spec's
`proj_type` picks for the global shape (as in one process; states are plain local tensors):
- right (P n×r, replicated): R = G_k·P and the moments m_k×r are sharded like the
  weight; no step communicates.
- left (P m×r, replicated; rank k uses its rows P_k): R = Σ_k P_kᵀ·G_k is one
  all-reduce of r×n partials per step; R, N and the r×n moments are the same on every
  rank (replicated, not sharded); back(N) = P_k·N is this rank's rows.
- full: Σ_k P_kᵀ·G_k·Pᵣ, one all-reduce of r×r per step.
`costs.py` gives these bytes per step and refresh. Refits: the randomized projector runs
the row-sharded range finders (`rangefinder.py`, thin collectives only); any other
projector (svd, int4, gaussian, plugins) gathers the gradient to one owner rank per
parameter, which fits it exactly as one process would, and broadcasts the basis.
Rules must be elementwise on the low-rank gradient (adamw, lion, sgdm, adabelief):
Adafactor's factored moments average across the rows FSDP2 splits.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..optimizers.lowrank import LowRankOptimizer, matrix_shape
from ..projectors.svd import SVDProjector
from ..quant.linear import compute_dtype
from ..seeds import refresh_seed
from ..residuals.base import Drop
from .exchange import assign_owners, fitted_entries, share_entries
from .rangefinder import gather_rows, row_layout
from .sharded import ShardedProjector, ShardedResidual

DISTRIBUTED_MODES = ("ddp", "fsdp2")


class DistributedLowRankOptimizer(LowRankOptimizer):
    """`LowRankOptimizer` for `parallel` in ("ddp", "fsdp2") over `process_group` (default: world)."""

    def __init__(self, params, parallel: str = "ddp", process_group=None, **options):
        if parallel not in DISTRIBUTED_MODES:
            raise ValueError(f"option 'parallel' must be one of {', '.join(DISTRIBUTED_MODES)}, "
                             f"got {parallel!r}")
        if not dist.is_initialized():
            raise ValueError(f"parallel = {parallel!r} needs an initialised process group "
                             f"(gradproj.distributed.init_distributed, or launch with torchrun)")
        self.parallel = parallel
        self.process_group = process_group
        self._prefit: dict[int, dict] = {}       # id(state) -> entries fitted for this step
        self._wrapped: dict[int, tuple] = {}
        self._global_of: dict = {}               # local shard -> its DTensor parameter
        self._current = None                     # the DTensor parameter being stepped
        super().__init__(params, **options)

    # -- plugins and layout ------------------------------------------------------------
    def plugins(self, group: dict) -> tuple:
        rule, projector, fmt, residual = super().plugins(group)
        key = id(projector), id(residual)
        if key not in self._wrapped:
            if self.parallel == "fsdp2":
                # elementwise rules are shard-local; a finishing rule's norms (LAMB, AdamP) span all rows
                if not rule.batched or rule.finishes_update:
                    raise ValueError(f"rule {group['rule']!r} is not supported under parallel = "
                                     f"\"fsdp2\": it reduces across the rows FSDP2 splits between "
                                     f"ranks; use an elementwise rule (adamw, lion, sgdm, adabelief)")
            sharded_residual = (ShardedResidual.wrap(residual, self)
                                if self.parallel == "fsdp2" and not isinstance(residual, Drop)
                                else residual)
            self._wrapped[key] = (ShardedProjector.wrap(projector, self), sharded_residual)
        wrapped_projector, wrapped_residual = self._wrapped[key]
        return rule, wrapped_projector, fmt, wrapped_residual

    def is_low_rank(self, p: torch.Tensor, group: dict) -> bool:
        # decided on the global shape, as in a single process, never on a shard's rows
        return super().is_low_rank(self._global_of.get(p, p), group)

    def side(self, p: torch.Tensor, group: dict) -> str:
        # the spec's side, decided on the global shape as in one process (never a shard's)
        return super().side(self._global_of.get(p, p), group)

    def _fusable(self, params, projector, side, direction) -> bool:
        # the fused back-projection kernel takes a whole basis; a left basis is used by rows
        if self.parallel == "fsdp2" and side in ("left", "full"):
            return False
        return super()._fusable(params, projector, side, direction)

    @contextmanager
    def _on_shard(self, p: torch.Tensor):
        """Run single-process code on p's local rows, with p's state dict and seed."""
        local = p.to_local()
        self.state[local] = self.state[p]          # the same dict: writes land in p's state
        self._param_seeds[local] = self._param_seeds[p]
        self._global_of[local], previous, self._current = p, self._current, p
        try:
            yield local
        finally:
            del self.state[local], self._param_seeds[local], self._global_of[local]
            self._current = previous

    def init_state(self, p: torch.Tensor, group: dict) -> dict:
        if not isinstance(p, DTensor):
            return super().init_state(p, group)
        with self._on_shard(p) as local:
            return super().init_state(local, group)

    @torch.no_grad()
    def step_param(self, p, group=None, grad=None, low_grad=None) -> None:
        if not isinstance(p, DTensor):
            return super().step_param(p, group, grad, low_grad)
        group = self._group_of(p) if group is None else group
        grad = p.grad if grad is None else grad
        with self._on_shard(p) as local:
            super().step_param(local, group, None if grad is None else grad.to_local(),
                               None if low_grad is None else _local(low_grad))

    @torch.no_grad()
    def project_grad(self, p, grad, group=None):
        if not isinstance(p, DTensor):
            return super().project_grad(p, grad, group)
        group = self._group_of(p) if group is None else group
        with self._on_shard(p) as local:
            return super().project_grad(local, _local(grad), group)

    # -- the step: a batched, sharded refresh first --------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.sharded_refresh()
        try:
            if self.parallel == "fsdp2":  # DTensor shards step one at a time (`_on_shard`)
                for group in self.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            self.step_param(p, group)
            else:
                super().step()
        finally:
            self._prefit.clear()
        return loss

    def _due(self) -> list[tuple]:
        """(p, group, state) of low-rank parameters whose refresh this step will fit, in order."""
        jobs = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p] if self.state.get(p) else self.init_state(p, group)
                if "next_refresh" not in state or state["step"] < state["next_refresh"]:
                    continue
                projector = self.plugins(group)[1]
                if self.parallel == "fsdp2" and projector.collective:
                    continue  # refit inside the step, by all ranks together
                jobs.append((p, group, state))
        return jobs

    def sharded_refresh(self) -> int:
        """Fit this rank's share of the refreshes due at this step and share all of them.

        Returns the number of parameters refitted here. The step then installs the
        shared bases (`ShardedProjector.fit`) where it would have fitted them.
        """
        jobs = self._due()
        if not jobs:
            return 0
        group_pg = self.process_group
        me, world = dist.get_rank(group_pg), dist.get_world_size(group_pg)
        costs = []
        for p, group, _ in jobs:  # fit flops: m·n·min(m, n) for an SVD, m·n·(r + p) otherwise
            (m, n), projector = matrix_shape(p), self.plugins(group)[1]._plugin
            costs.append(m * n * (min(m, n) if isinstance(projector, SVDProjector)
                                  else group["rank"] + 8))
        owners = assign_owners(costs, world)
        # FSDP2 gathers each gradient whole onto its owner. In rounds of one job per rank,
        # so a rank holds one full gradient at a time (all at once: ~3 GB per rank for a
        # 7B model's 224 matrices), and the ranks still fit in parallel.
        queues = [[job for job in range(len(jobs)) if owners[job] == r] for r in range(world)]
        fitted = {}
        for round_ in range(max(len(q) for q in queues)):
            mine = None
            for owner, queue in enumerate(queues):
                if round_ >= len(queue):
                    continue
                job = queue[round_]
                p, group, state = jobs[job]
                full = p.grad
                if self.parallel == "fsdp2":
                    local = p.grad.to_local()
                    sizes = row_layout(local.shape[0], group_pg, local.device)[2]
                    full = gather_rows(local.reshape(local.shape[0], -1).float(), sizes, owner,
                                       group_pg)
                if owner == me:
                    mine = job, full.float().reshape(matrix_shape(p))
            if mine is not None:
                job, g = mine
                p, group, state = jobs[job]
                fitted[job] = self._fit_full(p, g, state, group)
        device = jobs[0][0].grad.device if self.parallel == "ddp" else \
            jobs[0][0].grad.to_local().device
        shared = share_entries(fitted, device, group_pg)
        for job, (_, _, state) in enumerate(jobs):
            self._prefit[id(state)] = shared.get(job, {})
        return len(fitted)

    def _fit_full(self, p, g, state, group) -> dict:
        """What a single process's refit writes for this step's full gradient g."""
        projector = self.plugins(group)[1]._plugin
        step = state["step"]  # before the step's increment, as `_refresh_if_due` sees it
        scratch = dict(state)
        projector.fit(g, scratch, rank=group["rank"], side=self.side(p, group),
                      seed=refresh_seed(state["seed"], step), dtype=compute_dtype(p))
        return fitted_entries(state, scratch)

    # -- conversion ------------------------------------------------------------------------
    @classmethod
    def from_optimizer(cls, optimizer: LowRankOptimizer, parallel: str, process_group=None):
        """The same groups, options and state, stepping under `parallel`."""
        groups = [dict(g) for g in optimizer.param_groups]
        new = cls(groups, parallel=parallel, process_group=process_group, **optimizer.defaults)
        for p, state in optimizer.state.items():
            new.state[p] = state
        return new


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def distribute_optimizer(optimizer: LowRankOptimizer, parallel: str, process_group=None):
    """`optimizer` as is for "none"; its distributed twin for "ddp" / "fsdp2"."""
    if parallel == "none":
        return optimizer
    return DistributedLowRankOptimizer.from_optimizer(optimizer, parallel, process_group)
