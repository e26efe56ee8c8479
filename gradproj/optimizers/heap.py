"""Keep a CPU step's freed temporaries in the process instead of handing them back to the kernel.

A bucketed step allocates a few k×m×n temporaries a bucket (the gradient stack, the
back-projection, a residual), 1–2 MB each for the overhead benchmark's 24-layer list, and
frees them before the next bucket. glibc's malloc returns such memory to the kernel (it
`mmap`s a block above its dynamic threshold and trims the heap's top above twice that),
so the next step faults every page back in, zero-filled: 480 (Fira) to 1,200 (AdamP)
minor page faults a step on that list, 10–25 % of the step's time
(`benchmarks/overhead.py`'s faults/step column; AdamW(foreach), whose temporaries are one
weight's size, takes none). `keep_freed_memory` pins the two thresholds at the values
glibc's own adaptation stops at (mmap above 32 MiB, trim above 128 MiB), once a process:
the same step then takes no faults, and the process keeps up to 128 MiB of freed heap
it would have returned. Tensors above 32 MiB still come from `mmap` (a 60M LLaMA's
largest; there the arithmetic dominates and the step time did not change).

`LowRankOptimizer` calls it when it first allocates state for a CPU parameter. Without
glibc (macOS, musl, Windows) it does nothing; `GRADPROJ_KEEP_FREED_MEMORY=0` turns it off,
and so does setting either threshold yourself (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`): glibc then keeps yours.
"""
from __future__ import annotations

import ctypes
import os
import platform

# mallopt's parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_BYTES = 32 * 2 ** 20   # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, its ceiling
TRIM_THRESHOLD_BYTES = 128 * 2 ** 20
OPT_OUT = "GRADPROJ_KEEP_FREED_MEMORY"
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_applied: bool | None = None  # the outcome of the one attempt a process makes


def _libc():
    """glibc's handle, or None where the C library is another."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds once a process; whether they are set by us."""
    global _applied
    if _applied is None:
        _applied = False
        wanted = os.environ.get(OPT_OUT, "1").strip().lower() not in ("0", "false", "no", "off")
        libc = _libc() if wanted and not any(k in os.environ for k in USER_SETTINGS) else None
        if libc is not None:
            # mallopt returns 1 on success; setting either turns glibc's adaptation off,
            # which is why both are set (the trim threshold alone faulted more: 2,700 a step)
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                            and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
