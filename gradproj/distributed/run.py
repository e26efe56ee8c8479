"""What the training loop asks of distribution, in one object; identity for `parallel = "none"`.

    ctx = RunContext.start(spec.train.parallel)
    model = ctx.wrap(build_model(...));  opt = ctx.optimizer(spec.optimizer.build(ctx.module(model)))
    x, y = ctx.shard(*batches.batch(step, micro))     # this rank's rows of the global batch
    loss_value = ctx.mean(loss.item())                # the global batch's mean loss, every rank

`[train] batch_size` is the *global* number of sequences per micro-batch: each of W ranks
takes batch_size / W of them, so the averaged gradient is the single-process gradient of
the same batch and a run's numbers do not depend on how many processes computed them.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .env import DistEnv, init_distributed, shutdown
from .optimizer import distribute_optimizer
from .wrap import unwrap, wrap_model


class RunContext:
    def __init__(self, env: DistEnv):
        self.env = env

    @classmethod
    def start(cls, parallel: str, device: str = "auto") -> "RunContext":
        return cls(init_distributed(parallel, device=device))

    @property
    def is_main(self) -> bool:
        return self.env.is_main

    @property
    def distributed(self) -> bool:
        return self.env.distributed

    def check(self, batch_size: int, per_layer: bool) -> None:
        """Raise ValueError for combinations the chosen parallelism cannot run."""
        env = self.env
        if env.distributed and batch_size % env.world_size:
            raise ValueError(f"[train] batch_size = {batch_size} is the global batch and must be "
                             f"a multiple of the world size {env.world_size}")

    # -- model and optimizer -------------------------------------------------------------
    def wrap(self, model: torch.nn.Module, per_layer: bool = False) -> torch.nn.Module:
        if per_layer and self.env.parallel == "ddp":  # the stepper reduces the gradients
            from .perlayer import replicate
            return replicate(model)
        return wrap_model(model, self.env)

    def per_layer_stepper(self, optimizer, grad_accum: int = 1, model=None, **options):
        """Optimizer-in-backward: under DDP each weight steps on its all-reduced gradient
        (`perlayer.py`; `model` gives the bucket order); FSDP2 runs the hooks after its
        reduce-scatter, as one process does."""
        if self.env.parallel == "ddp":
            from .perlayer import DDPPerLayerStepper
            return DDPPerLayerStepper(optimizer, grad_accum, module=model, **options)
        from ..train.perlayer import PerLayerStepper
        return PerLayerStepper(optimizer, grad_accum, **options)

    def average_unreduced_grads(self, params) -> None:
        """Average over the ranks the gradients DDP's reducer does not see: it reduces the
        parameters that require grad, and an INT8 `QuantLinear` weight does not (its float
        gradient is written by the layer's own backward). Called after backward, before
        the norm, clipping and the step, so every rank steps the same weights."""
        if self.env.parallel != "ddp":
            return
        self._average([p.grad for p in params if p.grad is not None and not p.requires_grad])

    def average_grads(self, params) -> None:
        """Average every `.grad` of `params` over the ranks (one flat all-reduce): for a
        backward that did not run through DDP's forward, such as Sophia's curvature pass
        on the unwrapped model (train/curvature.py). No-op unless DDP."""
        if self.env.parallel != "ddp":
            return
        self._average([p.grad for p in params if p.grad is not None])

    def _average(self, grads: list[torch.Tensor]) -> None:
        if not grads:
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat.div_(self.env.world_size)
        for grad, value in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            grad.copy_(value)

    @property
    def rank(self) -> int:
        return self.env.rank

    @staticmethod
    def bucket_bytes(model: torch.nn.Module) -> int:
        """Bytes of DDP's gradient buckets: the reducer keeps every parameter that requires
        grad in one of them, from wrapping to the end of the run (0 when not DDP)."""
        if not isinstance(model, DistributedDataParallel):
            return 0
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)

    @staticmethod
    def module(model: torch.nn.Module) -> torch.nn.Module:
        return unwrap(model)

    def optimizer(self, optimizer):
        return distribute_optimizer(optimizer, self.env.parallel)

    def checkpoints(self, run_dir: Path, keep_last: int):
        if not self.env.distributed:
            from ..train.checkpoint import CheckpointManager
            return CheckpointManager(run_dir, keep_last)
        from .checkpoint import DistributedCheckpointManager
        return DistributedCheckpointManager(run_dir, keep_last, self.env.parallel)

    # -- data and reductions ---------------------------------------------------------------
    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's contiguous share of a global micro-batch."""
        if not self.env.distributed:
            return x, y
        rows = x.shape[0] // self.env.world_size
        part = slice(self.env.rank * rows, (self.env.rank + 1) * rows)
        return x[part], y[part]

    def mean(self, value: float) -> float:
        """Mean over ranks (equal shares: the global batch's mean); non-finite anywhere
        makes it non-finite everywhere, so every rank skips the same steps."""
        if not self.env.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return float(t.item()) / self.env.world_size

    def mean_all(self, values) -> list[float]:
        """`mean` of several floats in one all-reduce (zeroth-order: one per perturbation)."""
        values = [float(v) for v in values]
        if not self.env.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return [float(v) / self.env.world_size for v in t.tolist()]

    @staticmethod
    def total_norm(norm: torch.Tensor) -> float:
        """A gradient norm as a float (FSDP2's is a DTensor over the shards)."""
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm.item())

    def barrier(self) -> None:
        if self.env.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.env.distributed:
            shutdown()
