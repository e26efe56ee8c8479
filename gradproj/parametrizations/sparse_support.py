"""A uniformly random fixed-size support, regenerated from a seed instead of stored.

SLTrain's S has `count = int(δ·m·n)` nonzeros at positions drawn uniformly without
replacement (the authors store `randperm(m·n)[:count]` as an int64 buffer: 8 bytes per
nonzero, 0.24 bytes per weight at δ = 0.03 — as much as the values in bf16 ×1.2).
Here the positions are `π(0), …, π(count−1)` for a keyed pseudo-random permutation π
of [0, m·n): a 4-round Feistel network on 2h bits (4^h ≥ m·n) with round keys from the
seed, cycle-walked back into range (Black & Rogaway 2002) — a bijection, so the
positions are distinct, and pseudo-random (Luby–Rackoff), so any fixed `count` of
them is a uniformly random subset to every test we run (tests/parametrizations). It
costs O(count) integer ops per call (fewer than 4 cycle walks on average, as
4^h < 4·m·n; 0.4 s for the 1.35M positions of a 7B MLP matrix on one CPU thread, less
than that matrix's B·A at rank 256), nothing is stored but the seed, and the same seed
gives the same support on every device. Positions come in permutation order, unsorted
(sorting would cost as much again; gather and scatter do not need it).
"""
from __future__ import annotations

import torch

ROUNDS = 4
_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # the 32-bit integer-hash multiplier of the "hash prospector" family


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def round_keys(seed: int) -> list[int]:
    keys, x = [], int(seed)
    for _ in range(ROUNDS):
        x = _splitmix64(x)
        keys.append(x & _MASK32)
    return keys


def _hash(r: torch.Tensor, key: int) -> torch.Tensor:
    # int64 arithmetic, every product < 2^32 · 2^27: no overflow
    h = (r ^ key) & _MASK32
    h = (h * _MULT) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _MULT) & _MASK32
    return h ^ (h >> 16)


def _feistel(x: torch.Tensor, half_bits: int, keys: list[int]) -> torch.Tensor:
    mask = (1 << half_bits) - 1
    left, right = x >> half_bits, x & mask
    for key in keys:
        left, right = right, left ^ (_hash(right, key) & mask)
    return (left << half_bits) | right


def support(numel: int, count: int, seed: int, device=None) -> torch.Tensor:
    """int64 positions of `count` distinct elements of [0, numel), from `seed`."""
    if not 0 <= count <= numel:
        raise ValueError(f"support: count {count} must lie in [0, {numel}]")
    device = torch.device(device or "cpu")
    if device.type == "meta":
        return torch.empty(count, dtype=torch.int64, device=device)
    half_bits = max(1, (max(numel - 1, 1).bit_length() + 1) // 2)
    keys = round_keys(seed)
    if device.type == "cpu":  # the same positions from a C loop (kernels/cpu_feistel.py)
        from ..kernels import cpu_feistel
        fast = cpu_feistel.support(numel, count, half_bits, keys)
        if fast is not None:
            return fast
    x = _feistel(torch.arange(count, dtype=torch.int64, device=device), half_bits, keys)
    out = x >= numel
    while bool(out.any()):  # cycle walking: re-encrypt until the value lands in range
        x[out] = _feistel(x[out], half_bits, keys)
        out = x >= numel
    return x


__all__ = ["ROUNDS", "round_keys", "support"]
