"""Rank-0-only output: metrics, plots, progress bars and prints come from one process.

Under `torchrun --nproc_per_node=N` every rank runs the same script; without this, N
progress bars interleave and N processes race to write the same metrics.jsonl.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

from .env import rank

T = TypeVar("T")


def is_main_process() -> bool:
    """True on global rank 0, and in a plain single-process run."""
    return rank() == 0


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run `fn` on rank 0; other ranks return None without calling it."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_main_process() else None
    return wrapper


@rank_zero_only
def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only (flushes, so torchrun's interleaved stdout stays readable)."""
    kwargs.setdefault("flush", True)
    print(*args, **kwargs)


class Rank0:
    """A writer (metrics file, plotter) built and used on rank 0 only.

    `Rank0(lambda: MetricsWriter(run_dir))` calls the factory on rank 0; on the other
    ranks nothing is created (no file is opened) and every method call is a no-op
    returning None, so a loop can call `metrics.write(...)` unconditionally.
    """

    def __init__(self, factory):
        self._target = factory() if is_main_process() else None

    def __getattr__(self, name):
        if self._target is None:
            return lambda *args, **kwargs: None
        return getattr(self._target, name)
