"""Wrap a model for data parallelism: DDP (replicated weights) or FSDP2 (row-sharded weights).

Both keep the module's Parameter objects reachable under the module's own names, so
`param_groups(model, targets=...)` works the same on the wrapped model:
- DDP wraps the module (`model.module`); its parameters are the original tensors.
- FSDP2 (`fully_shard`) converts parameters in place to DTensors sharded on dim 0 — one
  `fully_shard` per block of a `ModuleList` (so a block's weights are all-gathered just
  before its forward and freed after), then one for the root (embeddings, head, norms).
  Build the optimizer after wrapping: it must hold the DTensor parameters.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..quant.linear import is_quantized
from .env import DistEnv


def wrap_model(model: nn.Module, env: DistEnv, *, reshard_after_forward: bool = True) -> nn.Module:
    """`model` for env.parallel: unchanged ("none"), DDP, or sharded with FSDP2."""
    if env.parallel == "none":
        return model
    if env.parallel == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if env.parallel == "fsdp2":
        quantized = [name for name, p in model.named_parameters() if is_quantized(p)]
        if quantized:  # FSDP2 would fail in backward: its fp32 gradient shard vs int8 codes
            raise ValueError(f"parallel = 'fsdp2' cannot shard INT8 weights (QuantLinear codes "
                             f"take fp32 gradients), got {len(quantized)}, e.g. {quantized[0]!r}; "
                             f"use parallel = 'ddp' or 'none'")
        for module in blocks(model):
            fully_shard(module, reshard_after_forward=reshard_after_forward)
        fully_shard(model, reshard_after_forward=reshard_after_forward)
        return model
    raise ValueError(f"option 'parallel' must be one of none, ddp, fsdp2, got {env.parallel!r}")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: every child of every nn.ModuleList."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found.extend(child for child in module if any(True for _ in child.parameters()))
    return found


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module (DDP's `.module`; FSDP2 wraps in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t
