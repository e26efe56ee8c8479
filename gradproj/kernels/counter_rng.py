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


def _list_keys(seeds) -> tuple[list[int], list[int]] | None:
    """The keys of a list of seeds (taken mod 2⁶³, as `keys` does); None for a tensor."""
    if torch.is_tensor(seeds):
        return None
    pairs = [seed_keys(int(s) % (1 << 63)) for s in seeds]
    return [a for a, _ in pairs], [b for _, b in pairs]


def _c_streams(key_lists, numel: int, device, *parts) -> list | None:
    """On CPU, the C loop of `cpu_counter_rng.py` (the reference's bits) for each
    (start, stride, offset) in `parts`; None where it does not run (not CPU, tensor seeds,
    GRADPROJ_KERNELS≠auto, no compiler): the tensor arithmetic below runs instead."""
    if key_lists is None or torch.device(device if device is not None else "cpu").type != "cpu":
        return None
    out = [cpu_counter_rng.uniform_rows(*key_lists, numel, *part) for part in parts]
    return None if any(t is None for t in out) else out


def uniform(numel: int, seed: int, device=None) -> torch.Tensor:
    """The fp32 stream u ∈ [0, 1) of one seed (what `int8_sr` rounds with)."""
    k0, k1 = seed_keys(seed)  # the whole 64-bit seed (a bucket's `keys` take it mod 2⁶³)
    fast = _c_streams(([k0], [k1]), numel, device, (0, 1, 0))
    if fast is not None:
        return fast[0][0]
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return uniform_bits(index, k0, k1).float() * 2.0 ** -24


def uniforms(seeds: list[int], numel: int, device) -> torch.Tensor:
    """k streams at once: a k×numel fp32 tensor, row i the stream of seeds[i]."""
    fast = _c_streams(_list_keys(seeds), numel, device, (0, 1, 0))
    if fast is not None:
        return fast[0]
    k0, k1 = keys(seeds, device)
    index = torch.arange(numel, dtype=torch.int64, device=device)
    return uniform_bits(index, k0, k1).float() * 2.0 ** -24


def normals(seeds: list[int], numel: int, device) -> torch.Tensor:
    """k streams of standard normals (Box–Muller on elements 2i and 2i+1 of each uniform
    stream): a k×numel fp32 tensor. u₁ is taken in (0, 1], so log u₁ is finite."""
    fast = _c_streams(_list_keys(seeds), numel, device, (0, 2, 1), (1, 2, 0))
    if fast is not None:
        u1, u2 = fast
    else:
        k0, k1 = keys(seeds, device)
        index = torch.arange(numel, dtype=torch.int64, device=device) * 2
        u1 = (uniform_bits(index, k0, k1) + 1).float() * 2.0 ** -24
        u2 = uniform_bits(index + 1, k0, k1).float() * 2.0 ** -24
    return u1.log_().mul_(-2.0).sqrt_().mul_(torch.cos(u2.mul_(2.0 * math.pi)))
