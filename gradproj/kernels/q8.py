"""Blockwise 8-bit codec of optimizer states, bitsandbytes-compatible in layout and error.

A tensor of n values is cut into blocks of 256 (flattened, row-major; the last block may be
short). Each block stores one fp32 absmax a and n uint8 codes c in the tensor's own shape;
the value is code_map[c]·a, with bitsandbytes' dynamic map (signed for first moments,
unsigned for second ones; `qmaps.py`). 1 + 4/256 = 1.015625 bytes per element.

    codes, absmax = q8_quantize(x, signed)        # uint8 x.shape, fp32 [ceil(n/256)]
    x_hat = q8_dequantize(codes, absmax, signed)  # fp32 codes.shape
"""
import torch

from . import cpu_blockwise
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .qmaps import _nearest_code, _scale_rows, nearest_code_ref, scale_ref, tables

BLOCK = 256


def q8_nbytes(numel: int) -> int:
    return numel + 4 * (-(-numel // BLOCK))


@triton.jit
def _q8_quantize_kernel(x_ptr, codes_ptr, absmax_ptr, mids_ptr, n,
                        ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < n
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    absmax, scaled = _scale_rows(x, valid)
    codes = _nearest_code(scaled, mids_ptr, 8)
    tl.store(codes_ptr + offs, codes.to(tl.uint8), mask=valid)
    tl.store(absmax_ptr + rows, absmax, mask=rows * QBLOCK < n)


@triton.jit
def _q8_dequantize_kernel(codes_ptr, absmax_ptr, code_ptr, out_ptr, n,
                          ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < n
    codes = tl.load(codes_ptr + offs, mask=valid, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + rows, mask=rows * QBLOCK < n, other=0.0)
    values = tl.load(code_ptr + codes) * absmax[:, None]
    tl.store(out_ptr + offs, values.to(out_ptr.dtype.element_ty), mask=valid)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:  # zeros never change a block's absmax; their codes are dropped below
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def q8_quantize_ref(x: torch.Tensor, signed: bool = True):
    """Reference: (codes uint8 of x's shape, absmax fp32 [ceil(numel/256)])."""
    _, mids = tables(8, signed, x.device)
    absmax, scaled = scale_ref(_blocks(x))
    codes = nearest_code_ref(scaled, mids).to(torch.uint8)
    return codes.reshape(-1)[:x.numel()].reshape(x.shape), absmax


def q8_dequantize_ref(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True):
    """Reference: fp32 tensor of codes' shape."""
    code, _ = tables(8, signed, codes.device)
    flat = codes.reshape(-1).long()
    scale = absmax.repeat_interleave(BLOCK)[:flat.numel()]
    return (code[flat] * scale).reshape(codes.shape)


def _rows(numel: int) -> tuple[int, int]:
    blocks = -(-numel // BLOCK)
    rows = tile(4, 64)
    return blocks, rows


def q8_quantize(x: torch.Tensor, signed: bool = True):
    """Quantize to blockwise 8-bit: (codes uint8 of x's shape, absmax fp32 [blocks])."""
    if not use_triton(x):  # CPU: the C twin (cpu_blockwise.py) when it builds, same codes
        fast = cpu_blockwise.quantize(x, 8, signed)
        return fast if fast is not None else q8_quantize_ref(x, signed)
    x = x.contiguous()
    _, mids = tables(8, signed, x.device)
    blocks, rows = _rows(x.numel())
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=x.device)
    if blocks:
        _q8_quantize_kernel[(triton.cdiv(blocks, rows),)](x, codes, absmax, mids, x.numel(),
                                                          ROWS=rows, QBLOCK=BLOCK)
    return codes, absmax


def q8_dequantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool = True):
    """Dequantize blockwise 8-bit codes to fp32 (codes' shape)."""
    if not use_triton(codes, absmax):
        fast = cpu_blockwise.dequantize(codes, absmax, 8, signed, tuple(codes.shape))
        return fast if fast is not None else q8_dequantize_ref(codes, absmax, signed)
    code, _ = tables(8, signed, codes.device)
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    blocks, rows = _rows(codes.numel())
    if blocks:
        _q8_dequantize_kernel[(triton.cdiv(blocks, rows),)](codes, absmax, code, out, codes.numel(),
                                                            ROWS=rows, QBLOCK=BLOCK)
    return out


def _configs():
    const = {"ROWS": 4, "QBLOCK": BLOCK}
    q = {"x_ptr": "*fp32", "codes_ptr": "*u8", "absmax_ptr": "*fp32", "mids_ptr": "*fp32",
         "n": "i32", "ROWS": "constexpr", "QBLOCK": "constexpr"}
    d = {"codes_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32", "out_ptr": "*fp32",
         "n": "i32", "ROWS": "constexpr", "QBLOCK": "constexpr"}
    return (CompileConfig(_q8_quantize_kernel, q, const),
            CompileConfig(_q8_dequantize_kernel, d, const))


register_kernel("q8_quantize", q8_quantize, q8_quantize_ref, _configs()[:1])
register_kernel("q8_dequantize", q8_dequantize, q8_dequantize_ref, _configs()[1:])
