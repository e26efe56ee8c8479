"""Checkpoints under DDP and FSDP2, in the run folder layout of `train/checkpoint.py`.

DDP: weights and optimizer state are replicated, so rank 0 writes the ordinary
single-process checkpoint (parameter names without DDP's `module.` prefix). It is
world-size independent: `[train] batch_size` is the global batch, so a DDP run can be
resumed with another `--nproc_per_node`, or in one process.

FSDP2: safetensors per rank. Each rank writes its rows of every weight and its local
optimizer state; rank 0 writes the scheduler, loop counters and `meta.json` last:

    step-200/  model.rank0-of-2.safetensors  optimizer.rank0-of-2.safetensors  extra.rank0-of-2…
               model.rank1-of-2.safetensors  …                                 meta.json

The folder becomes `step-N/` by one rename after every rank has fsynced its files (two
barriers), so the single-process guarantee holds: a `step-N/` folder is complete or
absent. Resuming needs the same world size (a shard's rows are fixed by it); a different
one is refused with a message. Chosen over torch.distributed.checkpoint (DCP) to keep
one file format — safetensors + JSON, readable without torch.distributed — across modes.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from ..train.checkpoint import (FORMAT_VERSION, CheckpointError, CheckpointManager, Loaded,
                                _plain, optimizer_from_flat, optimizer_to_flat)
from .wrap import local_tensor, unwrap


def shard_name(stem: str, rank: int, world: int) -> str:
    return f"{stem}.rank{rank}-of-{world}.safetensors"


def model_shard(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's rows of every weight and buffer in the state dict."""
    return {k: local_tensor(v).detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}


def load_model_shard(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    own = unwrap(model).state_dict()
    if set(own) != set(tensors):
        missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise CheckpointError(f"{where}: model does not match the spec "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for key, value in own.items():
            local_tensor(value).copy_(tensors[key])


class DistributedCheckpointManager(CheckpointManager):
    """`CheckpointManager` for `parallel` = "ddp" (rank 0 writes) or "fsdp2" (per rank)."""

    def __init__(self, run_dir: Path, keep_last: int = 2, parallel: str = "ddp"):
        super().__init__(run_dir, keep_last)
        self.parallel = parallel
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    # -- writing -------------------------------------------------------------------------
    def save(self, step: int, model, opt, scheduler, loop: dict) -> Path:
        final = self.root / f"step-{step}"
        if self.parallel == "ddp":
            if self.rank == 0:
                super().save(step, unwrap(model), opt, scheduler, loop)
            dist.barrier()
            return final
        tmp = self.root / f".tmp-step-{step}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        opt_tensors, opt_meta = optimizer_to_flat(opt)
        self._write_tensors(tmp / shard_name("model", self.rank, self.world), model_shard(model))
        self._write_tensors(tmp / shard_name("optimizer", self.rank, self.world), opt_tensors)
        self._write_tensors(tmp / shard_name("extra", self.rank, self.world),
                            {"rng/torch_cpu": torch.get_rng_state()})
        metas: list = [None] * self.world
        dist.all_gather_object(metas, opt_meta)  # also a barrier: every shard is on disk
        if self.rank == 0:
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            meta = {"format": FORMAT_VERSION, "step": step, "parallel": "fsdp2",
                    "world_size": self.world, "optimizer": metas,
                    "scheduler": _plain(sched, "scheduler"), "loop": _plain(loop, "loop")}
            self._publish(tmp, final, meta)
        dist.barrier()
        return final

    # -- reading -------------------------------------------------------------------------
    def load(self, model, opt, scheduler: Any, folder: Path | None = None) -> Loaded:
        folder = folder or self.latest()
        if folder is None:
            raise CheckpointError(f"no complete checkpoint under {self.root}")
        meta = json.loads((folder / "meta.json").read_text())
        sharded = meta.get("parallel") == "fsdp2"
        if self.parallel == "ddp":
            if sharded:
                raise CheckpointError(f"{folder}: saved per rank under fsdp2; resume it with "
                                      f"[train] parallel = \"fsdp2\" on {meta['world_size']} ranks")
            return super().load(unwrap(model), opt, scheduler, folder)
        if not sharded or meta.get("world_size") != self.world:
            how = (f"under fsdp2 by {meta['world_size']} ranks" if sharded
                   else "by one process or under ddp")
            raise CheckpointError(f"{folder}: saved {how}; an fsdp2 checkpoint resumes only at the "
                                  f"world size that wrote it (this run has {self.world} ranks)")
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{folder}: checkpoint format {meta.get('format')}, "
                                  f"this gradproj reads {FORMAT_VERSION}")
        load_model_shard(model, load_file(str(folder / shard_name("model", self.rank, self.world))),
                         str(folder))
        optimizer_from_flat(opt, load_file(str(folder / shard_name("optimizer", self.rank, self.world))),
                            meta["optimizer"][self.rank])
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
        extra = load_file(str(folder / shard_name("extra", self.rank, self.world)))
        torch.set_rng_state(extra["rng/torch_cpu"])
        return Loaded(step=int(meta["step"]), path=folder, loop=meta["loop"])
