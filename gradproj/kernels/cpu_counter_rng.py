"""The counter streams of `counter_rng.py` and the INT8 stochastic rounding of `int8_sr.py`
on CPU in C, bit-identical to their references.

The reference (`counter_rng.uniform_bits`) is ~20 int64 tensor passes per value — two
lowbias32 hashes, each five shifts, xors, products and masks, every one a fresh 8-byte
temporary — which made the INT8 stochastic rounding of Q-GaLore's weights the slowest
part of a CPU step (`benchmarks/overhead.py`: q-galore 5.1× torch AdamW's CPU time per
step on the 24-layer list, every other preset ≤ 1.2×). `cpu_counter_rng.c` draws a
stream in one loop of integer operations, so its values equal the reference's bit for bit
on every machine (tests/kernels/test_kernels_cpu_counter_rng.py). The rounding around it
(absmax, scale, divide, floor, compare, clamp: ~12 more passes and a padded copy) is one
loop over each group of 256 as well, with the reference's IEEE operations one for one.

`uniform_rows(k0, k1, numel, start, stride, offset)` gives k streams and
`int8_sr_rows(x, k0, k1, group_size)` k rows' codes and scales and
`int8_dequantize_rows(codes, scales, group_size)` their values back, or None where the C path
does not apply (GRADPROJ_KERNELS≠auto, not an fp32 CPU tensor, or no compiler): the
caller keeps the reference. `int8_step_rows` runs a whole INT8 weight step in place —
dequantize, update, decay, re-round — or returns False for the caller's chain.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from .cpu_native import load, package_source
from .dispatch import mode

_I64, _U64 = ctypes.c_int64, ctypes.c_uint64
_PTR = ctypes.c_void_p
SIGNATURES = {"gp_counter_uniform": (None, [_I64, _U64, _U64, _I64, _I64, _U64, _PTR]),
              "gp_int8_sr_rows": (None, [_I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR]),
              "gp_int8_dequantize_rows": (None, [_I64, _I64, _I64, _PTR, _PTR, _PTR]),
              "gp_int8_step_rows": (None, [_I64, _I64, _I64, _PTR, _PTR, _PTR, ctypes.c_float,
                                           ctypes.c_float, _I64, _PTR, _PTR, _PTR])}


def library():
    """The compiled stream, or None (no compiler; see `cpu_native.load_error`)."""
    source = package_source("cpu_common.h", "cpu_counter_rng.c")
    return None if source is None else load("cpu_counter_rng", source, SIGNATURES)


def uniform_rows(k0: list[int], k1: list[int], numel: int, start: int = 0, stride: int = 1,
                 offset: int = 0) -> torch.Tensor | None:
    """A k×numel fp32 CPU tensor, row i = ((bits of index start + stride·j under keys
    (k0[i], k1[i])) + offset)·2⁻²⁴; None where the C path does not run."""
    if mode() != "auto" or numel < 0:
        return None
    lib = library()
    if lib is None:
        return None
    out = torch.empty(len(k0), numel, dtype=torch.float32)
    base = out.data_ptr()  # row addresses by arithmetic: iterating `out` dispatches k selects
    for i, (a, b) in enumerate(zip(k0, k1)):
        lib.gp_counter_uniform(numel, a, b, start, stride, offset, base + 4 * numel * i)
    return out


def int8_sr_rows(x: torch.Tensor, k0: list[int], k1: list[int],
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes int8 of x's shape, scales fp32 k×groups) for the k rows of `x` (k×…), or None."""
    if (mode() != "auto" or x.device.type != "cpu" or x.dtype != torch.float32
            or x[0].numel() >= 2 ** 32):  # the C loop's indices are uint32
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    k, n = x.shape[0], x[0].numel()
    codes = torch.empty(x.shape, dtype=torch.int8)
    scales = torch.empty(k, -(-n // group_size), dtype=torch.float32)
    keys = torch.tensor([k0, k1], dtype=torch.int64)  # uint32 values: int64 holds them
    lib.gp_int8_sr_rows(k, n, group_size, x.data_ptr(), keys[0].data_ptr(), keys[1].data_ptr(),
                        codes.data_ptr(), scales.data_ptr())
    return codes, scales


def int8_dequantize_rows(codes: torch.Tensor, scales: torch.Tensor,
                         group_size: int) -> torch.Tensor | None:
    """fp32 values of codes' shape (code · its group's scale) for k rows, or None."""
    if (mode() != "auto" or codes.device.type != "cpu" or scales.device.type != "cpu"
            or codes.dtype != torch.int8 or scales.dtype != torch.float32):
        return None
    k, n = codes.shape[0], codes[0].numel()
    if scales.shape != (k, -(-n // group_size)):
        return None  # not this codec's layout: the reference reports it
    lib = library()
    if lib is None:
        return None
    codes, scales = codes.contiguous(), scales.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32)
    lib.gp_int8_dequantize_rows(k, n, group_size, codes.data_ptr(), scales.data_ptr(),
                                out.data_ptr())
    return out


def int8_step_rows(codes: list[torch.Tensor], scales: list[torch.Tensor], update: torch.Tensor,
                   lr: float, weight_decay: float, k0: list[int], k1: list[int],
                   group_size: int) -> bool:
    """W ← W − lr·U (then W ← W − lr·wd·W where wd ≠ 0) on k INT8 weights in place:
    codes[i] (int8) and scales[i] (fp32, one a group) dequantized, stepped with row i of
    `update` (k×n fp32) and re-quantized by `int8_sr_rows`' rounding under
    keys (k0[i], k1[i]) — `quant.linear.apply_quantized_updates`' chain, bit for bit, in one
    pass a group. False (nothing written) where the C path does not apply: the caller runs
    the chain."""
    if mode() != "auto" or not codes or not aten_add_fuses():
        return False
    n = codes[0].numel()
    groups = -(-n // group_size)
    tensors = (update, *codes, *scales)
    plain = (torch.Tensor, torch.nn.Parameter)  # no DTensor shard or other subclass
    if not (0 < n < 2 ** 32 and all(type(t) in plain for t in tensors)
            and update.device.type == "cpu" and update.dtype == torch.float32
            and update.is_contiguous() and update.numel() == len(codes) * n
            and all(c.device.type == "cpu" and c.dtype == torch.int8 and c.is_contiguous()
                    and c.numel() == n for c in codes)
            and all(s.device.type == "cpu" and s.dtype == torch.float32 and s.is_contiguous()
                    and s.numel() == groups for s in scales)):
        return False
    lib = library()
    if lib is None:
        return False
    addresses = torch.tensor([[c.data_ptr() for c in codes], [s.data_ptr() for s in scales],
                              k0, k1], dtype=torch.int64)  # uint32 keys: int64 holds them
    buf = torch.empty(min(group_size, n), dtype=torch.float32)
    lib.gp_int8_step_rows(len(codes), n, group_size, addresses[0].data_ptr(),
                          addresses[1].data_ptr(), update.data_ptr(), -lr, -lr * weight_decay,
                          int(bool(weight_decay)), addresses[2].data_ptr(),
                          addresses[3].data_ptr(), buf.data_ptr())
    return True


@functools.cache
def aten_add_fuses() -> bool:
    """Whether ATen's CPU `y.add_(x, alpha=a)` rounds y + a·x once (a fused multiply-add) in
    its vectorised body and its scalar tail alike, as its AVX2/AVX-512 kernels do: the C
    step's `fmaf` gives the chain's bits only then (else it declines). x = a = 1 + 2⁻¹²:
    a·x = 1 + 2⁻¹¹ + 2⁻²⁴, and y + a·x with y = −(1 + 2⁻¹¹) keeps the 2⁻²⁴ only if the
    product is not rounded first."""
    a = 1.0 + 2.0 ** -12
    for n in (1, 7, 67):  # a tail alone, a short tail, 4 AVX-512 vectors and a tail
        y = torch.full((n,), -(1.0 + 2.0 ** -11))
        y.add_(torch.full((n,), a), alpha=a)
        if not bool((y == 2.0 ** -24).all()):
            return False
    return True
