"""Counter-based random numbers: one value per (seed, index), the same on every device.

Element i of a stream with seed s is u = hash(hash(i ^ k0) ^ k1) >> 8 · 2⁻²⁴ ∈ [0, 1),
with (k0, k1) = `seed_keys(s)` and `hash32` lowbias32 (C. Wellons, full avalanche). No
generator object and no state: a stream is a pure function of its seed, so CPU, GPU and
the Triton kernel of `int8_sr.py` (which computes the same hash in registers) draw the
same numbers, a resumed run redraws them exactly, and the streams of k weights — each
with its own seed — come out of one batched computation (`keys` stacks their keys), which
is what lets the seeded projectors regenerate a whole bucket's bases at once.
"""
from __future__ import annotations

import math

import torch

from . import cpu_counter_rng

M32 = 0xFFFFFFFF


def hash32(x: int) -> int:
    """lowbias32 on a Python int (uint32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def seed_keys(seed: int) -> tuple[int, int]:
    """The two uint32 keys of a 64-bit seed."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return hash32(seed & M32), hash32((seed >> 32) ^ 0x85EBCA6B)


def hash32_tensor(x: torch.Tensor) -> torch.Tensor:
    """`hash32` on an int64 tensor of uint32 values (products wrap mod 2⁶⁴; low bits kept)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def keys(seeds, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys of k seeds as two k×1 int64 tensors (they broadcast over a stream's index).

    `seeds` is a list of ints (taken mod 2⁶³), or an int64 tensor of seeds in [0, 2⁶³)
    already on `device` — then the keys are computed there, with no host-to-device copy
    (a copy from pageable memory would synchronise a CUDA stream every step).
    """
    if not torch.is_tensor(seeds):
        pairs = [seed_keys(int(s) % (1 << 63)) for s in seeds]
        k0 = torch.tensor([[a] for a, _ in pairs], dtype=torch.int64, device=device)
        k1 = torch.tensor([[b] for _, b in pairs], dtype=torch.int64, device=device)
        return k0, k1
    seeds = seeds.reshape(-1, 1)
    return hash32_tensor(seeds & M32), hash32_tensor((seeds >> 32) ^ 0x85EBCA6B)


def uniform_bits(index: torch.Tensor, k0, k1) -> torch.Tensor:
    """The 24-bit integers hash(hash(i ^ k0) ^ k1) >> 8 for int64 indices `index`."""
    return hash32_tensor(hash32_tensor(index ^ k0) ^ k1) >> 8


def _streams(seeds, numel: int, device, start: int = 0, stride: int = 1,
             offset: int = 0) -> torch.Tensor:
    """k×numel fp32: row i = (bits of indices start + stride·j under seeds[i]'s keys
    + offset)·2⁻²⁴ (seeds as `keys` takes them)."""
    if torch.is_tensor(seeds):
        k0, k1 = keys(seeds, device)
        return _from_keys(k0, k1, numel, device, start, stride, offset)
    pairs = [seed_keys(int(s) % (1 << 63)) for s in seeds]
    return _from_keys([a for a, _ in pairs], [b for _, b in pairs], numel, device, start,
                      stride, offset)


def _from_keys(k0, k1, numel: int, device, start: int = 0, stride: int = 1,
               offset: int = 0) -> torch.Tensor:
    """The streams of key pairs (lists of ints, or k×1 tensors): on CPU the C loop of
    `cpu_counter_rng.py` (the same bits), else (or with GRADPROJ_KERNELS≠auto) the
    tensor arithmetic below."""
    if isinstance(k0, list):
        if torch.device(device if device is not None else "cpu").type == "cpu":
            fast = cpu_counter_rng.uniform_rows(k0, k1, numel, start, stride, offset)
            if fast is not None:
                return fast
        k0 = torch.tensor(k0, dtype=torch.int64, device=device).reshape(-1, 1)
        k1 = torch.tensor(k1, dtype=torch.int64, device=device).reshape(-1, 1)
    index = torch.arange(numel, dtype=torch.int64, device=device) * stride + start
    return (uniform_bits(index, k0, k1) + offset).float() * 2.0 ** -24


def uniform(numel: int, seed: int, device=None) -> torch.Tensor:
    """The fp32 stream u ∈ [0, 1) of one seed (what `int8_sr` rounds with)."""
    k0, k1 = seed_keys(seed)  # the whole 64-bit seed (a bucket's `keys` take it mod 2⁶³)
    return _from_keys([k0], [k1], numel, device)[0]


def uniforms(seeds: list[int], numel: int, device) -> torch.Tensor:
    """k streams at once: a k×numel fp32 tensor, row i the stream of seeds[i]."""
    return _streams(seeds, numel, device)


def normals(seeds: list[int], numel: int, device) -> torch.Tensor:
    """k streams of standard normals (Box–Muller on elements 2i and 2i+1 of each uniform
    stream): a k×numel fp32 tensor. u₁ is taken in (0, 1], so log u₁ is finite."""
    u1 = _streams(seeds, numel, device, 0, 2, offset=1)
    u2 = _streams(seeds, numel, device, 1, 2)
    return u1.log_().mul_(-2.0).sqrt_().mul_(torch.cos(u2.mul_(2.0 * math.pi)))
