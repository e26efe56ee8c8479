"""Blockwise 4-bit codec of optimizer states (torchao's 4-bit AdamW maps), 2 codes per byte.

Blocks of 128 values of the flattened tensor, one fp32 absmax each; codes index torchao's
maps (`qmaps.py`): the 16-value dynamic map (3 exponent bits) for first moments, the linear
map linspace(0, 1, 17)[1:] for second moments. Codes are packed low nibble first,
byte j = c[2j] | c[2j+1] << 4, as `int4.py` packs projector bases; the last block is padded
with zeros (their codes are stored, and dropped on dequantize). 0.5 + 4/128 = 0.53125 bytes
per element.

    codes, absmax = q4_quantize(x, signed)             # uint8 [blocks·64], fp32 [blocks]
    x_hat = q4_dequantize(codes, absmax, signed, shape)
"""
import math

import torch

from . import cpu_blockwise
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .qmaps import _nearest_code, nearest_code_ref, scale_ref, tables

BLOCK = 128
HALF = BLOCK // 2


def q4_nbytes(numel: int) -> int:
    blocks = -(-numel // BLOCK)
    return blocks * (HALF + 4)


@triton.jit
def _scale_pairs(lo, hi, lo_ok, hi_ok):
    """`qmaps._scale_rows` over a block held as its even (lo) and odd (hi) halves."""
    absmax = tl.maximum(tl.max(tl.where(lo_ok, tl.abs(lo), 0.0), axis=1),
                        tl.max(tl.where(hi_ok, tl.abs(hi), 0.0), axis=1))
    tiny = tl.full(absmax.shape, 1e-38, tl.float32)  # a bare 1e-38 literal is fp64 in triton 3.6
    inv = tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), tl.maximum(absmax, tiny))
    lo = tl.minimum(tl.maximum(lo * inv[:, None], -1.0), 1.0)
    hi = tl.minimum(tl.maximum(hi * inv[:, None], -1.0), 1.0)
    return absmax, lo, hi


@triton.jit
def _q4_quantize_kernel(x_ptr, codes_ptr, absmax_ptr, mids_ptr, n,
                        ROWS: tl.constexpr, HALF_BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    lo_ok = 2 * pairs < n
    hi_ok = 2 * pairs + 1 < n
    lo = tl.load(x_ptr + 2 * pairs, mask=lo_ok, other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + 2 * pairs + 1, mask=hi_ok, other=0.0).to(tl.float32)
    absmax, lo, hi = _scale_pairs(lo, hi, lo_ok, hi_ok)
    byte = _nearest_code(lo, mids_ptr, 4) | (_nearest_code(hi, mids_ptr, 4) << 4)
    row_ok = rows * (2 * HALF_BLOCK) < n  # the last block's zero padding keeps its codes
    tl.store(codes_ptr + pairs, byte.to(tl.uint8), mask=row_ok[:, None])
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)


@triton.jit
def _q4_dequantize_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n,
                          ROWS: tl.constexpr, HALF_BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    row_ok = rows * (2 * HALF_BLOCK) < n
    byte = tl.load(codes_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + 2 * pairs, tl.load(code_ptr + (byte & 15)) * absmax, mask=2 * pairs < n)
    tl.store(out_ptr + 2 * pairs + 1, tl.load(code_ptr + (byte >> 4)) * absmax,
             mask=2 * pairs + 1 < n)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def q4_quantize_ref(x: torch.Tensor, signed: bool = True):
    """Reference: (codes uint8 [blocks·64], absmax fp32 [blocks])."""
    _, mids = tables(4, signed, x.device)
    absmax, scaled = scale_ref(_blocks(x))
    q = nearest_code_ref(scaled, mids).to(torch.uint8).reshape(-1)
    return q[0::2] | (q[1::2] << 4), absmax


def q4_dequantize_ref(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                      shape: tuple[int, ...]):
    """Reference: fp32 tensor of `shape` (the padding of the last block is dropped)."""
    code, _ = tables(4, signed, codes.device)
    q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1, BLOCK).long()
    values = (code[q] * absmax[:, None]).reshape(-1)
    return values[:math.prod(shape)].reshape(shape)


def _launch_shape(numel: int) -> tuple[int, int]:
    return -(-numel // BLOCK), tile(8, 128)


def q4_quantize(x: torch.Tensor, signed: bool = True):
    """Quantize to blockwise 4-bit: (codes uint8 [blocks·64], absmax fp32 [blocks])."""
    if not use_triton(x):  # CPU: the C twin (cpu_blockwise.py) when it builds, same codes
        fast = cpu_blockwise.quantize(x, 4, signed)
        return fast if fast is not None else q4_quantize_ref(x, signed)
    x = x.contiguous()
    _, mids = tables(4, signed, x.device)
    blocks, rows = _launch_shape(x.numel())
    codes = torch.empty(blocks * HALF, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    if blocks:
        _q4_quantize_kernel[(triton.cdiv(blocks, rows),)](x, codes, absmax, mids, x.numel(),
                                                          ROWS=rows, HALF_BLOCK=HALF)
    return codes, absmax


def q4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                  shape: tuple[int, ...]):
    """Dequantize packed 4-bit codes to an fp32 tensor of `shape`."""
    numel = math.prod(shape)
    if codes.numel() != -(-numel // BLOCK) * HALF:
        raise ValueError(f"q4 codes hold {codes.numel()} bytes, shape {tuple(shape)} needs "
                         f"{-(-numel // BLOCK) * HALF}")
    if not use_triton(codes, absmax):
        fast = cpu_blockwise.dequantize(codes, absmax, 4, signed, tuple(shape))
        return fast if fast is not None else q4_dequantize_ref(codes, absmax, signed, shape)
    code, _ = tables(4, signed, codes.device)
    out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    blocks, rows = _launch_shape(numel)
    if blocks:
        _q4_dequantize_kernel[(triton.cdiv(blocks, rows),)](codes.contiguous(), absmax, code, out,
                                                            numel, ROWS=rows, HALF_BLOCK=HALF)
    return out


def _configs():
    const = {"ROWS": 8, "HALF_BLOCK": HALF}
    q = {"x_ptr": "*fp32", "codes_ptr": "*u8", "absmax_ptr": "*fp32", "mids_ptr": "*fp32",
         "n": "i32", "ROWS": "constexpr", "HALF_BLOCK": "constexpr"}
    d = {"codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*fp32",
         "n": "i32", "ROWS": "constexpr", "HALF_BLOCK": "constexpr"}
    return (CompileConfig(_q4_quantize_kernel, q, const),
            CompileConfig(_q4_dequantize_kernel, d, const))


register_kernel("q4_quantize", q4_quantize, q4_quantize_ref, _configs()[:1])
register_kernel("q4_dequantize", q4_dequantize, q4_dequantize_ref, _configs()[1:])
