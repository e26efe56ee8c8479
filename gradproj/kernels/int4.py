"""Group-wise asymmetric INT4 codec for projector bases, two codes per byte.

Each group of `group_size` values stores fp32 `scale = (max − min)/15` and fp32 `minimum`;
code = round((x − min)/scale) ∈ [0, 15], so x ≈ code·scale + min with error ≤ scale/2.
Unlike Q-GaLore's reference (an integer zero-point clamped to [0, 15], which clips every
group whose values share one sign, and one code per uint8), the offset is the exact
minimum and codes are packed low nibble first: byte = q[2i] | q[2i+1] << 4.

`int4_quantize` / `int4_dequantize` run the Triton kernels below when dispatch says so
(CUDA tensors, or GRADPROJ_KERNELS=interpret) and the references otherwise. The kernels
handle a group as its even and odd halves (low and high nibbles), so packing needs no
shuffle, and they read the padding of the last group as the last value (index clamped),
exactly what the reference pads with. Rounding is half to even, as `torch.round`.
"""
import torch

from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton

DEFAULT_GROUP = 256


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"int4 group_size must be a positive even integer, got {group_size}")
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:  # repeat the last value so padding never widens a group's [min, max]
        flat = torch.cat([flat, flat[-1:].expand(pad)])
    return flat.view(-1, group_size)


def int4_quantize_ref(x: torch.Tensor, group_size: int = DEFAULT_GROUP):
    """Return (codes uint8 [groups, group_size/2], scale fp32 [groups], minimum fp32 [groups])."""
    groups = _grouped(x, group_size)
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((groups - lo[:, None]) / scale[:, None]).clamp_(0, 15).to(torch.uint8)
    codes = q[:, 0::2] | (q[:, 1::2] << 4)
    return codes, scale, lo


def int4_dequantize_ref(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                        shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `int4_quantize_ref`: an fp32 tensor of `shape`."""
    q = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(codes.shape[0], -1)
    values = q.float() * scale[:, None] + minimum[:, None]
    numel = 1
    for d in shape:
        numel *= d
    return values.reshape(-1)[:numel].reshape(shape)


def int4_nbytes(numel: int, group_size: int = DEFAULT_GROUP) -> int:
    groups = -(-numel // group_size)
    return groups * (group_size // 2 + 8)  # packed codes + fp32 scale + fp32 minimum


@triton.jit
def _round_half_even(y):
    r = tl.floor(y)
    frac = y - r  # exact: 0 <= y <= 15 here
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return r + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)


@triton.jit
def _int4_quantize_kernel(x_ptr, codes_ptr, scale_ptr, min_ptr, n, groups,
                          ROWS: tl.constexpr, HALF_GROUP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_GROUP + tl.arange(0, HALF_GROUP)[None, :]
    row_ok = rows < groups
    lo = tl.load(x_ptr + tl.minimum(2 * pairs, n - 1), mask=row_ok[:, None], other=0.0).to(tl.float32)
    hi = tl.load(x_ptr + tl.minimum(2 * pairs + 1, n - 1), mask=row_ok[:, None], other=0.0).to(tl.float32)
    minimum = tl.minimum(tl.min(lo, axis=1), tl.min(hi, axis=1))
    scale = tl.div_rn(tl.maximum(tl.max(lo, axis=1), tl.max(hi, axis=1)) - minimum,
                      tl.full(minimum.shape, 15.0, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    q_lo = _round_half_even(tl.div_rn(lo - minimum[:, None], scale[:, None]))
    q_hi = _round_half_even(tl.div_rn(hi - minimum[:, None], scale[:, None]))
    q_lo = tl.minimum(tl.maximum(q_lo, 0.0), 15.0).to(tl.int32)
    q_hi = tl.minimum(tl.maximum(q_hi, 0.0), 15.0).to(tl.int32)
    tl.store(codes_ptr + pairs, (q_lo | (q_hi << 4)).to(tl.uint8), mask=row_ok[:, None])
    tl.store(scale_ptr + rows, scale, mask=row_ok)
    tl.store(min_ptr + rows, minimum, mask=row_ok)


@triton.jit
def _int4_dequantize_kernel(codes_ptr, scale_ptr, min_ptr, out_ptr, n,
                            ROWS: tl.constexpr, HALF_GROUP: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_GROUP + tl.arange(0, HALF_GROUP)[None, :]
    row_ok = rows * (2 * HALF_GROUP) < n
    byte = tl.load(codes_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)[:, None]
    minimum = tl.load(min_ptr + rows, mask=row_ok, other=0.0)[:, None]
    tl.store(out_ptr + 2 * pairs, (byte & 15).to(tl.float32) * scale + minimum, mask=2 * pairs < n)
    tl.store(out_ptr + 2 * pairs + 1, (byte >> 4).to(tl.float32) * scale + minimum,
             mask=2 * pairs + 1 < n)


def _rows(group_size: int) -> int:
    return max(1, tile(2048, 1 << 15) // group_size)


def int4_quantize(x: torch.Tensor, group_size: int = DEFAULT_GROUP):
    """Group-wise INT4: (codes uint8 [groups, group_size/2], scale fp32 [groups], minimum fp32 [groups])."""
    if not use_triton(x) or group_size & (group_size - 1):  # tl.arange needs a power of two
        return int4_quantize_ref(x, group_size)
    _grouped(x[:0], group_size)  # validates group_size
    x = x.contiguous()
    groups = -(-x.numel() // group_size)
    codes = torch.empty(groups, group_size // 2, dtype=torch.uint8, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    minimum = torch.empty(groups, dtype=torch.float32, device=x.device)
    if groups:
        rows = _rows(group_size)
        _int4_quantize_kernel[(triton.cdiv(groups, rows),)](x, codes, scale, minimum, x.numel(),
                                                            groups, ROWS=rows,
                                                            HALF_GROUP=group_size // 2)
    return codes, scale, minimum


def int4_dequantize(codes, scale, minimum, shape):
    """Inverse of `int4_quantize`: an fp32 tensor of `shape`."""
    group_size = 2 * codes.shape[1] if codes.dim() == 2 else 0
    if not use_triton(codes, scale, minimum) or not group_size or group_size & (group_size - 1):
        return int4_dequantize_ref(codes, scale, minimum, shape)
    out = torch.empty(shape, dtype=torch.float32, device=codes.device)
    numel = out.numel()
    if numel:
        rows = _rows(group_size)
        _int4_dequantize_kernel[(triton.cdiv(codes.shape[0], rows),)](
            codes.contiguous(), scale, minimum, out, numel, ROWS=rows, HALF_GROUP=group_size // 2)
    return out


def _configs():
    q = {"x_ptr": "*fp32", "codes_ptr": "*u8", "scale_ptr": "*fp32", "min_ptr": "*fp32",
         "n": "i32", "groups": "i32", "ROWS": "constexpr", "HALF_GROUP": "constexpr"}
    d = {"codes_ptr": "*u8", "scale_ptr": "*fp32", "min_ptr": "*fp32", "out_ptr": "*fp32",
         "n": "i32", "ROWS": "constexpr", "HALF_GROUP": "constexpr"}
    const = {"ROWS": 8, "HALF_GROUP": DEFAULT_GROUP // 2}
    return (CompileConfig(_int4_quantize_kernel, q, const),
            CompileConfig(_int4_dequantize_kernel, d, const))


register_kernel("int4_quantize", int4_quantize, int4_quantize_ref, _configs()[:1])
register_kernel("int4_dequantize", int4_dequantize, int4_dequantize_ref, _configs()[1:])
