"""SLTrain's regenerated sparse support (`parametrizations/sparse_support.py`) on CPU in C.

The tensor reference is ~40 int64 ops per Feistel pass plus a synchronising cycle-walk
loop, ~4 ms a call even for a few hundred positions (an SLTrain layer regenerates its
support in every forward and backward: on the tiny model ~56 calls a step, as much time as
the step itself). `cpu_feistel.c` does each position in one loop of the same integer
operations, so the positions equal the reference's (tests/parametrizations/test_sltrain.py).
"""
from __future__ import annotations

import ctypes

import torch

from .cpu_native import load, package_source
from .dispatch import mode

_I32, _I64, _PTR = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {"gp_feistel_support": (None, [_I64, _I64, _I32, _PTR, _I32, _PTR])}


def library():
    """The compiled permutation, or None (no compiler; see `cpu_native.load_error`)."""
    source = package_source("cpu_feistel.c")
    return None if source is None else load("cpu_feistel", source, SIGNATURES)


def support(numel: int, count: int, half_bits: int, keys: list[int]) -> torch.Tensor | None:
    """int64 CPU positions π(0..count−1) cycle-walked into [0, numel), or None where the C
    path does not run (GRADPROJ_KERNELS≠auto, no compiler, or 2·half_bits ≥ 64)."""
    if mode() != "auto" or 2 * half_bits >= 64:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(count, dtype=torch.int64)
    key_tensor = torch.tensor(keys, dtype=torch.int64)  # uint32 values: int64 holds them
    lib.gp_feistel_support(numel, count, half_bits, key_tensor.data_ptr(), len(keys), out.data_ptr())
    return out
