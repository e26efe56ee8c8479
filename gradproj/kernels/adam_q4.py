"""Fused 4-bit Adam step: unpack + dequantize both moments, fp32 update, requantize + pack.

A block of 128 values is handled as its even and odd halves (the low and high nibbles of
64 bytes), so packing needs no shuffle. Per element: G and N (8 bytes) plus 2 × 0.53 bytes
of state read and written. Same math as the reference (`q4.py` + `rules/adamw.py`); the
direction uses the fp32 moments before requantization.
"""
import torch

from . import cpu_adam
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q4 import BLOCK, HALF, _scale_pairs, q4_dequantize_ref, q4_quantize_ref
from .qmaps import _nearest_code, tables


@triton.jit
def _adam_half(g, mc, vc, m_code_ptr, v_code_ptr, m_absmax, v_absmax, beta1, one_minus_beta1,
               beta2, one_minus_beta2, eps, step_size):
    m = tl.load(m_code_ptr + mc) * m_absmax[:, None]
    v = tl.load(v_code_ptr + vc) * v_absmax[:, None]
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    d = tl.div_rn(m, tl.sqrt_rn(v) + eps) * step_size
    return m, v, d


@triton.jit
def _adam_q4_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, m_code_ptr, m_mids_ptr,
                    v_code_ptr, v_mids_ptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2,
                    eps, step_size, ROWS: tl.constexpr, HALF_BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    row_ok = rows * (2 * HALF_BLOCK) < n
    lo_ok = 2 * pairs < n
    hi_ok = 2 * pairs + 1 < n
    m_bytes = tl.load(mc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    v_bytes = tl.load(vc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    m_absmax = tl.load(ma_ptr + rows, mask=row_ok, other=0.0)
    v_absmax = tl.load(va_ptr + rows, mask=row_ok, other=0.0)
    g_lo = tl.load(g_ptr + 2 * pairs, mask=lo_ok, other=0.0).to(tl.float32)
    g_hi = tl.load(g_ptr + 2 * pairs + 1, mask=hi_ok, other=0.0).to(tl.float32)
    m_lo, v_lo, d_lo = _adam_half(g_lo, m_bytes & 15, v_bytes & 15, m_code_ptr, v_code_ptr,
                                  m_absmax, v_absmax, beta1, one_minus_beta1, beta2,
                                  one_minus_beta2, eps, step_size)
    m_hi, v_hi, d_hi = _adam_half(g_hi, m_bytes >> 4, v_bytes >> 4, m_code_ptr, v_code_ptr,
                                  m_absmax, v_absmax, beta1, one_minus_beta1, beta2,
                                  one_minus_beta2, eps, step_size)
    tl.store(d_ptr + 2 * pairs, d_lo, mask=lo_ok)
    tl.store(d_ptr + 2 * pairs + 1, d_hi, mask=hi_ok)
    # the reference requantizes the fp32 moments with the last block zero-padded
    m_lo = tl.where(lo_ok, m_lo, 0.0)
    m_hi = tl.where(hi_ok, m_hi, 0.0)
    v_lo = tl.where(lo_ok, v_lo, 0.0)
    v_hi = tl.where(hi_ok, v_hi, 0.0)
    m_absmax, m_lo, m_hi = _scale_pairs(m_lo, m_hi, lo_ok, hi_ok)
    v_absmax, v_lo, v_hi = _scale_pairs(v_lo, v_hi, lo_ok, hi_ok)
    m_byte = _nearest_code(m_lo, m_mids_ptr, 4) | (_nearest_code(m_hi, m_mids_ptr, 4) << 4)
    v_byte = _nearest_code(v_lo, v_mids_ptr, 4) | (_nearest_code(v_hi, v_mids_ptr, 4) << 4)
    tl.store(mc_ptr + pairs, m_byte.to(tl.uint8), mask=row_ok[:, None])
    tl.store(vc_ptr + pairs, v_byte.to(tl.uint8), mask=row_ok[:, None])
    tl.store(ma_ptr + rows, m_absmax, mask=row_ok)
    tl.store(va_ptr + rows, v_absmax, mask=row_ok)


def adam_q4_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
    """Reference: dequantize, `rules/adamw.py`'s math, requantize; codes/absmax in place."""
    shape = tuple(grad.shape)
    m = q4_dequantize_ref(m_codes, m_absmax, True, shape).mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v = q4_dequantize_ref(v_codes, v_absmax, False, shape).mul_(beta2).addcmul_(
        grad, grad, value=1.0 - beta2)
    for (codes, absmax), value, signed in (((m_codes, m_absmax), m, True),
                                           ((v_codes, v_absmax), v, False)):
        new_codes, new_absmax = q4_quantize_ref(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax.view(absmax.shape))
    return m.div(v.sqrt().add_(eps)).mul_(step_size)


def adam_q4_step(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
    """Fused 4-bit Adam: packed codes and absmax updated in place; returns the fp32 direction."""
    blocks = -(-grad.numel() // BLOCK)
    for name, codes, absmax in (("exp_avg", m_codes, m_absmax), ("exp_avg_sq", v_codes, v_absmax)):
        if codes.numel() != blocks * HALF or absmax.numel() != blocks or not codes.is_contiguous():
            raise ValueError(f"{name}: q4 state must hold {blocks} blocks of {BLOCK} "
                             f"({blocks * HALF} code bytes) for {grad.numel()} values")
    if not use_triton(grad, m_codes, v_codes):  # CPU: three passes, same bits (cpu_adam.py)
        fast = cpu_adam.adam_blockwise_step(4, grad, m_codes, m_absmax, v_codes, v_absmax,
                                            beta1, beta2, eps, step_size)
        if fast is not None:
            return fast
        return adam_q4_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                                step_size)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    m_code, m_mids = tables(4, True, g.device)
    v_code, v_mids = tables(4, False, g.device)
    rows = tile(8, 128)
    if blocks:
        _adam_q4_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, v_codes, v_absmax, m_code, m_mids, v_code, v_mids,
            g.numel(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size,
            ROWS=rows, HALF_BLOCK=HALF)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "vc_ptr": "*u8", "va_ptr": "*fp32", "m_code_ptr": "*fp32", "m_mids_ptr": "*fp32",
           "v_code_ptr": "*fp32", "v_mids_ptr": "*fp32", "n": "i32", "beta1": "fp32",
           "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32",
           "eps": "fp32", "step_size": "fp32", "ROWS": "constexpr", "HALF_BLOCK": "constexpr"}
    return (CompileConfig(_adam_q4_kernel, sig, {"ROWS": 8, "HALF_BLOCK": HALF}),)


register_kernel("adam_q4_step", adam_q4_step, adam_q4_step_ref, _configs())
