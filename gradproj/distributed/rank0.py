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
    """Wrap a writer (metrics logger, progress bar, plotter): its methods run on rank 0 only.

    Attribute reads pass through; calls on other ranks are no-ops returning None, so a
    loop can call `metrics.log(...)` unconditionally.
    """

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if callable(value) and not is_main_process():
            return lambda *args, **kwargs: None
        return value

    def __enter__(self):
        if is_main_process() and hasattr(self._target, "__enter__"):
            self._target.__enter__()
        return self

    def __exit__(self, *exc):
        if is_main_process() and hasattr(self._target, "__exit__"):
            return self._target.__exit__(*exc)
        return False
