"""Checkpoints under DDP and FSDP2, in the run folder layout of `train/checkpoint.py`.

DDP: weights and optimizer state are replicated, so rank 0 writes the ordinary
single-process checkpoint (parameter names without DDP's `module.` prefix). It is
world-size independent: `[train] batch_size` is the global batch, so a DDP run can be
resumed with another `--nproc_per_node`, or in one process.

FSDP2: torch.distributed.checkpoint with its safetensors storage (`dcp.py`): every rank
writes one safetensors file of its chunks with their global offsets, rank 0 writes
`meta.json` last (scalars, options, how each state tensor is laid out):

    step-200/  shard-00001-model-00001-of-00001.safetensors   (rank 0's chunks)
               shard-00002-model-00001-of-00001.safetensors   (rank 1's)   meta.json

The folder becomes `step-N/` by one rename after every rank's files are fsynced (DCP's
save ends with a collective), so the single-process guarantee holds: a `step-N/` folder
is complete or absent, `latest` names the newest complete one. It resumes at any world
size under FSDP2, under DDP, or in one process (`CheckpointManager.load` reads it too);
q8/q4 moments of row-sharded weights are requantized in the new ranks' blocks (dcp.py).
Folders of the earlier per-rank layout (`model.rank0-of-2.safetensors`) still load at
the world size that wrote them.
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
                                _plain, optimizer_from_flat)
from .dcp import LAYOUT, load_checkpoint, rng_states, save_state
from .wrap import local_tensor, unwrap


def shard_name(stem: str, rank: int, world: int) -> str:
    return f"{stem}.rank{rank}-of-{world}.safetensors"


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
        described = save_state(tmp, model, opt, rng_states())  # every rank; ends in a collective
        if self.rank == 0:
            sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
            meta = {"format": FORMAT_VERSION, "step": step, "parallel": "fsdp2",
                    "layout": LAYOUT, "world_size": self.world, "optimizer": described,
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
        if meta.get("format") == FORMAT_VERSION and meta.get("layout") == LAYOUT:
            return load_checkpoint(folder, meta, model, opt, scheduler)  # any world size
        sharded = meta.get("parallel") == "fsdp2"
        if self.parallel == "ddp":
            if sharded:
                raise CheckpointError(f"{folder}: saved per rank under fsdp2 by an earlier gradproj; "
                                      f"resume it with [train] parallel = \"fsdp2\" on "
                                      f"{meta['world_size']} ranks")
            return super().load(unwrap(model), opt, scheduler, folder)
        if not sharded:
            raise CheckpointError(f"{folder}: saved by one process or under ddp; an fsdp2 run "
                                  f"resumes from a checkpoint written under fsdp2 (at any world size)")
        if meta.get("world_size") != self.world:
            raise CheckpointError(f"{folder}: saved under fsdp2 by {meta['world_size']} ranks in the "
                                  f"per-rank layout of an earlier gradproj, which resumes only at "
                                  f"that world size (this run has {self.world} ranks)")
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
