"""Code maps of the 8-bit and 4-bit optimizer states, and the nearest-code search kernels share.

* `dynamic_map(signed, max_exponent_bits, total_bits)`: bitsandbytes' dynamic-exponent map
  (Dettmers 2015), spelled out with its float32 arithmetic so the 256 values are
  bit-identical to `bitsandbytes.functional.create_dynamic_map` (checked in the tests):
  for each exponent e = 10^(−(E−1)+i), the midpoints of a linear grid on [0.1, 1] with
  2^(i+K−E) (signed) or 2^(i+K−E+1) (unsigned) steps; plus 0 and 1. 8-bit: E = 7. torchao's
  4-bit first moment uses E = 3, total 4 bits (16 values, no zero padding).
* `linear_map()`: torchao's 4-bit second-moment map linspace(0, 1, 17)[1:] — zero is left
  out, so √V never underflows to 0 in the denominator.

Quantizing x with absmax a picks the code whose value is nearest to x·(1/a) clamped to
[−1, 1], ties to the lower code: `bucketize` against the midpoints of neighbouring codes,
exactly bitsandbytes' CPU reference. `_nearest_code` is the Triton twin: a branch-free
binary search over the same midpoints (8 probes for 256 codes, 4 for 16).
"""
import functools

import torch

from .dispatch import tl, triton


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
                 else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
        bounds = torch.linspace(0.1, 1, items, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
        if signed:
            data += (-(10 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1)) * means).tolist()
    data += [0.0, 1.0]
    if len(data) != 2 ** total_bits:
        raise ValueError(f"dynamic map of {total_bits} bits with {max_exponent_bits} exponent "
                         f"bits has {len(data)} values, expected {2 ** total_bits}")
    return torch.tensor(sorted(data), dtype=torch.float32)


def linear_map(total_bits: int = 4) -> torch.Tensor:
    return torch.linspace(0, 1, 2 ** total_bits + 1, dtype=torch.float32)[1:]


_MAPS = {
    # (bits, signed) -> code map; which map a moment uses follows bitsandbytes / torchao
    (8, True): lambda: dynamic_map(True, 7, 8),
    (8, False): lambda: dynamic_map(False, 7, 8),
    (4, True): lambda: dynamic_map(True, 3, 4),
    (4, False): lambda: linear_map(4),
}


@functools.lru_cache(maxsize=None)
def _tables_cpu(bits: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    code = _MAPS[(bits, signed)]()
    return code, (code[:-1] + code[1:]) / 2


_DEVICE_TABLES: dict = {}


def tables(bits: int, signed: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(code values, midpoints between neighbours) as fp32 tensors on `device`, cached."""
    device = torch.device(device)
    key = (bits, bool(signed), str(device))
    if key not in _DEVICE_TABLES:
        code, mids = _tables_cpu(bits, bool(signed))
        _DEVICE_TABLES[key] = (code.to(device), mids.to(device))
    return _DEVICE_TABLES[key]


def zero_code(bits: int, signed: bool) -> int:
    """The code that all-zero storage starts with (the code nearest to 0)."""
    _, mids = _tables_cpu(bits, bool(signed))
    return int(torch.bucketize(torch.zeros(()), mids))


def nearest_code_ref(scaled: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest code to `scaled` (already in [−1, 1]), ties to the lower one."""
    return torch.bucketize(scaled, mids)


def scale_ref(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax of `blocks` [B, block] and the values scaled into [−1, 1]."""
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax.clamp(min=1e-38)  # an all-zero block scales by 1e38 × 0 = 0
    return absmax, (blocks * inv[:, None]).clamp_(-1.0, 1.0)


@triton.jit
def _nearest_code(scaled, mids_ptr, BITS: tl.constexpr):
    """Count of midpoints strictly below `scaled` = torch.bucketize(scaled, mids)."""
    pos = tl.zeros(scaled.shape, tl.int32)
    for level in tl.static_range(BITS - 1, -1, -1):
        probe = tl.load(mids_ptr + pos + ((1 << level) - 1))
        pos = tl.where(probe < scaled, pos + (1 << level), pos)
    return pos


@triton.jit
def _scale_rows(x, valid):
    """Triton twin of `scale_ref` on a [R, C] tile: (absmax [R], scaled [R, C])."""
    absmax = tl.max(tl.where(valid, tl.abs(x), 0.0), axis=1)
    tiny = tl.full(absmax.shape, 1e-38, tl.float32)  # a bare 1e-38 literal is fp64 in triton 3.6
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, tiny))
    scaled = tl.minimum(tl.maximum(x * inv[:, None], -1.0), 1.0)
    return absmax, scaled
