"""Large output tensors on CPU, reused across steps instead of page-faulted anew.

PyTorch's CPU allocator hands freed blocks of more than a few MB back to the OS (glibc
maps them with mmap and unmaps them on free), so a step that allocates a fresh 64 MB
direction for a 32000×512 embedding takes its page faults again every time: ~30 ms of the
~120 ms its Adam step costs on one thread here (benchmarks/step_time.py's 60M model has
two such tensors). `reusable_empty` keeps one buffer per size and thread and hands it out
again only when nothing references it any more — its storage's use count is back to what
the cache alone holds — so a direction a caller still keeps, or any view of it, is never
overwritten: the caller gets a fresh tensor instead. The cost is one buffer per distinct
large size kept alive between steps (at 60M: 64 MB; the CUDA caching allocator keeps
such blocks the same way).
"""
from __future__ import annotations

import math
import threading

import torch

MIN_NUMEL = 1 << 20  # 4 MB of fp32: smaller blocks come from glibc's heap and are reused
_LOCAL = threading.local()


def _use_count(t: torch.Tensor) -> int | None:
    try:  # the TensorImpls sharing t's storage (+1 for the storage object of the call)
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except AttributeError:  # a private API: without it every call allocates afresh
        return None


def reusable_empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialized CPU tensor: a kept buffer when free, otherwise a new one."""
    numel = math.prod(shape)
    if numel < MIN_NUMEL:
        return torch.empty(shape, dtype=dtype)
    cache = _LOCAL.__dict__.setdefault("cache", {})
    kept = cache.get((numel, dtype))
    if kept is None:
        buffer = torch.empty(numel, dtype=dtype)
        idle = _use_count(buffer)
        if idle is None:
            return buffer.view(shape)
        cache[(numel, dtype)] = kept = (buffer, idle)
    buffer, idle = kept
    if _use_count(buffer) != idle:  # a previous result is still alive somewhere
        return torch.empty(shape, dtype=dtype)
    return buffer.view(shape)
