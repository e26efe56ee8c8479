"""Fast CPU twins of the q8/q4 blockwise codecs (`q8.py`, `q4.py`): one pass per block, in C.

The reference quantizer is `scale_ref` + `torch.bucketize` over the map's midpoints; on CPU
`bucketize` alone takes ~90 ns an element (90 ms for 1M values on one thread), the rest of
the chain ~10 passes over memory. Here each block of 256 (q8) or 128 (q4) values is done
in one pass while it sits in L1, in C (`cpu_blockwise.c`; `cpu_native.py` compiles it
once per machine; without a compiler every function here returns None and callers run the
reference). Per block, exactly the reference's operations:

    absmax = max |x|            integer max of the sign-cleared float bits: for non-negative
                                floats the bit order is the value order, and a NaN's bits
                                exceed +inf's, so a NaN anywhere makes absmax NaN (torch.amax)
    inv    = 1 / max(absmax, (float)1e-38)      1.0 / absmax.clamp(min=1e-38); NaN stays NaN
    s      = clamp(x · inv, −1, 1)              NaN passes through, as torch.clamp
    code   = #{midpoints m : !(m ≥ s)}          torch.bucketize's lower_bound predicate:
                                                ties go to the lower code, NaN to the last

That count is found without bucketize's per-element loop. q4: all 15 midpoints are
compared at once (a vectorised count). q8 with AVX-512 (where `-march=native` has it): the
8-level binary search over the 255 midpoints for 16 values at once, each level's candidate
midpoints picked from registers by permutes. q8 elsewhere (the portable build): floats
sharing their sign, exponent and top 6 mantissa bits form a bucket, an interval [lo, hi];
a 32 KiB table built from `torch.bucketize` itself gives first = #{m < lo}, and since no
bucket holds more than 2 of the 255 midpoints,
code = first + [mids[first] < s] + [mids[first+1] < s] (see `codebook`): the same count
by construction. Both builds are tested against the reference on every machine.
Every step is one IEEE operation rounded as written (no FMA contraction, no fast-math), so
codes and absmax are bit-identical to the reference; the q4 tail block is zero-padded (and
its padding codes stored) as `q4_quantize_ref` does. Dequantization is code[c] · absmax,
optionally times a `scale` (one more rounding: the fused Adam step's β·M).

With several torch threads, large tensors are split into block ranges run on a thread pool
(ctypes releases the GIL); the result does not depend on the split.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .cpu_native import load, package_source
from .dispatch import mode
from .qmaps import tables


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_QUANT = (None, [_I, _I, _I, _P, _P, _P, _P])
_DEQUANT = (None, [_I, _I, _I, _P, _P, _P, _P, _F])
_FINISH = (None, [_I, _I, _I, _P, _P, _P, _P, _F, _F, _P, _P, _P, _P, _P, _P])
SIGNATURES = {"gp_q8_quantize": _QUANT, "gp_q4_quantize": _QUANT,
              "gp_q8_dequantize": _DEQUANT, "gp_q4_dequantize": _DEQUANT,
              "gp_adam_q8_finish": _FINISH, "gp_adam_q4_finish": _FINISH,
              "gp_adam_dense": (None, [_I, _I, _I, _P, _P, _P, _P, *[_F] * 6]),
              "gp_avx512": (ctypes.c_int, [])}
BLOCKS = {8: 256, 4: 128}
# the bucket key keeps sign, exponent and this many mantissa bits: 2^15 one-byte entries
# (32 KiB, fits L1), and at most 2 of the 8-bit maps' midpoints fall in one bucket. Measured
# on 1M values, one thread, min of 40: 7 bits (64 KiB, 1 probe) 2.9 ms, 6 bits 3.0 ms — the
# same within noise; the 8-probe binary search 10.8 ms; gcc's gather-vectorised loop 2x slower
# (the portable build: with AVX-512 the search uses only the midpoints, by register permutes).
MANTISSA_BITS = 6
PROBES = 2  # the C search's comparisons after the table lookup


class _Codebook(ctypes.Structure):
    _fields_ = [("first", ctypes.c_void_p), ("mids", ctypes.c_void_p), ("shift", ctypes.c_int32)]


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 float bit patterns -> those float32 values."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=None)
def codebook(bits: int, signed: bool, mantissa_bits: int = MANTISSA_BITS):
    """The search table of a code map, built from the reference search itself.

    Floats sharing their top 9 + `mantissa_bits` bits form a bucket, an interval [lo, hi].
    first[bucket] = bucketize(lo, mids) counts the midpoints below it; the midpoints from
    there on are ≥ lo, so the code of s in the bucket is first + #{j < k : mids[first+j] < s}
    with k the most midpoints any bucket holds (padded with +inf): the count bucketize
    returns, exactly. Buckets of exponent 255 hold NaN only (s is clamped to [−1, 1]
    first) and get bucketize(NaN)."""
    _, mids = tables(bits, signed, "cpu")
    shift = 23 - mantissa_bits
    keys = torch.arange(1 << (32 - shift), dtype=torch.int64)
    low, high = _floats(keys << shift), _floats((keys << shift) | ((1 << shift) - 1))
    negative = keys >= 1 << (31 - shift)
    lo, hi = torch.where(negative, high, low), torch.where(negative, low, high)
    first = torch.bucketize(lo, mids)
    inside = torch.bucketize(hi, mids, right=True) - first
    nan_bucket = (keys >> mantissa_bits) & 0xFF == 0xFF
    first[nan_bucket] = torch.bucketize(torch.tensor(float("nan")), mids)
    k = int(inside[~nan_bucket].max())
    if k > PROBES:
        raise ValueError(f"{bits}-bit map: a bucket of {mantissa_bits} mantissa bits holds {k} "
                         f"midpoints, the C search probes {PROBES}")
    first = first.to(torch.uint8)
    padded = torch.cat([mids, torch.full((PROBES,), float("inf"))])
    struct = _Codebook(first.data_ptr(), padded.data_ptr(), shift)
    return struct, (first, padded)  # the tensors must outlive the struct's pointers


CHUNK_ELEMENTS = 1 << 18  # a thread gets at least this many values (~0.5 ms of work)
_POOL: dict = {}  # pid -> ThreadPoolExecutor: a forked child must not reuse its parent's


def source() -> str | None:
    """The C kernels: `cpu_common.h` then `cpu_blockwise.c` (package data), or None."""
    return package_source("cpu_common.h", "cpu_blockwise.c")


def library():
    """The compiled kernels, or None (no compiler; see `cpu_native.load_error`)."""
    return None if source() is None else load("cpu_blockwise", source(), SIGNATURES)


def portable_library():
    """The same kernels without their AVX-512 code: what a CPU without AVX-512 runs (the
    tests check both against the reference on any machine)."""
    if source() is None:
        return None
    return load("cpu_blockwise_portable", "#define GP_PORTABLE 1\n" + source(), SIGNATURES)


def active(*tensors: torch.Tensor) -> bool:
    """Whether the C path runs: GRADPROJ_KERNELS=auto, every tensor on CPU, library built."""
    return (mode() == "auto" and all(t.device.type == "cpu" for t in tensors)
            and library() is not None)


def fits(codes: torch.Tensor, absmax: torch.Tensor, bits: int, numel: int) -> bool:
    """Whether codes/absmax have the contiguous uint8/fp32 layout of a `numel`-value moment."""
    blocks = -(-numel // BLOCKS[bits])
    return (codes.dtype == torch.uint8 and codes.is_contiguous()
            and codes.numel() == (numel if bits == 8 else blocks * BLOCKS[bits] // 2)
            and absmax.dtype == torch.float32 and absmax.is_contiguous()
            and absmax.numel() == blocks)


def run_blocks(fn, numel: int, block: int, b0: int, b1: int, floats: tuple, rest: tuple) -> None:
    """fn(numel, b0, b1, *floats, *rest) over blocks [b0, b1): `floats` are the addresses
    of fp32 arrays starting at block b0's first value. With several torch threads and
    enough work the range is split over a thread pool (each part's float addresses
    advanced to its first block); blocks are independent, so the result is the same."""
    threads = torch.get_num_threads()
    chunks = min(threads, max(1, (b1 - b0) * block // CHUNK_ELEMENTS))
    if chunks <= 1:
        fn(numel, b0, b1, *floats, *rest)
        return
    pool = _POOL.get(os.getpid())
    if pool is None or pool._max_workers < chunks:
        _POOL.clear()
        pool = _POOL[os.getpid()] = ThreadPoolExecutor(max_workers=chunks,
                                                       thread_name_prefix="gradproj-cpu")
    step = -(-(b1 - b0) // chunks)
    jobs = [pool.submit(fn, numel, b, min(b + step, b1),
                        *(p + (b - b0) * block * 4 for p in floats), *rest)
            for b in range(b0, b1, step)]
    for job in jobs:
        job.result()


def quantize(x: torch.Tensor, bits: int, signed: bool):
    """(codes, absmax) exactly as `q8_quantize_ref` / `q4_quantize_ref`, or None where the
    C path does not run (see `active`)."""
    if not active(x):
        return None
    lib = library()
    block = BLOCKS[bits]
    flat = x.reshape(-1).float().contiguous()  # the reference's own conversion
    n = flat.numel()
    blocks = -(-n // block)
    book = ctypes.byref(codebook(bits, signed)[0]) if bits == 8 else \
        tables(bits, signed, "cpu")[1].data_ptr()
    if bits == 8:
        codes = torch.empty(x.shape, dtype=torch.uint8)
    else:
        codes = torch.empty(blocks * (block // 2), dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    fn = lib.gp_q8_quantize if bits == 8 else lib.gp_q4_quantize
    run_blocks(fn, n, block, 0, blocks, (flat.data_ptr(),),
               (book, codes.data_ptr(), absmax.data_ptr()))
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
               shape: tuple[int, ...], scale: float = 1.0):
    """fp32 `shape` tensor (code[c] · absmax) · scale, or None where the C path does not
    apply (see `active`; or codes/absmax not the contiguous uint8/fp32 layout `shape` needs:
    the reference then runs and reports the problem itself)."""
    n = math.prod(shape)
    if not (active(codes, absmax) and fits(codes, absmax, bits, n)):
        return None
    out = torch.empty(shape, dtype=torch.float32)
    dequantize_into(out, codes, absmax, bits, signed, n, 0, -(-n // BLOCKS[bits]), scale)
    return out


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bits: int,
                    signed: bool, numel: int, b0: int, b1: int, scale: float) -> None:
    """Blocks [b0, b1) of a `numel`-value moment into the fp32 buffer `out` (from its start);
    the caller has checked the layout (`dequantize` does)."""
    code, _ = tables(bits, signed, "cpu")
    fn = library().gp_q8_dequantize if bits == 8 else library().gp_q4_dequantize
    run_blocks(fn, numel, BLOCKS[bits], b0, b1, (out.data_ptr(),),
               (codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), scale))
