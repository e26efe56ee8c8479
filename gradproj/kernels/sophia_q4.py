"""Fused 4-bit Sophia step: unpack + dequantize M and H, fp32 math, requantize + pack M.

As `sophia_q8.py` with `q4.py`'s layout: blocks of 128 handled as their even and odd halves
(low and high nibbles), M on torchao's signed dynamic map, H — the rule's unsigned moment —
on the linear map linspace(0, 1, 17)[1:]. That map has no zero: an H block of absmax a
dequantizes to ≥ a/16 everywhere (a = 0 before the first estimate: all zero), which is the
format's storage of H however the step reads it. H is only read. Per element: G and N
(8 bytes) plus 0.53 bytes of H read and 2 × 0.53 of M read and written.

On CPU the host runs the C codec (`cpu_blockwise.py`) around `sophia_step_ref`: the
reference's direction and codes bit for bit.
"""
import torch

from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q4 import (BLOCK, HALF, _scale_pairs, q4_dequantize, q4_dequantize_ref, q4_quantize,
                 q4_quantize_ref)
from .qmaps import _nearest_code, tables
from .sophia import sophia_step_ref


@triton.jit
def _sophia_half(g, mc, hc, m_code_ptr, h_code_ptr, m_absmax, h_absmax, beta1, one_minus_beta1,
                 rho, eps):
    m = tl.load(m_code_ptr + mc) * m_absmax[:, None]
    h = tl.load(h_code_ptr + hc) * h_absmax[:, None]
    m = m * beta1 + one_minus_beta1 * g
    d = tl.div_rn(m, tl.maximum(rho * h, eps))
    return m, tl.minimum(tl.maximum(d, -1.0), 1.0)


@triton.jit
def _sophia_q4_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, hc_ptr, ha_ptr, m_code_ptr, m_mids_ptr,
                      h_code_ptr, n, beta1, one_minus_beta1, rho, eps,
                      ROWS: tl.constexpr, HALF_BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    row_ok = rows * (2 * HALF_BLOCK) < n
    lo_ok = 2 * pairs < n
    hi_ok = 2 * pairs + 1 < n
    m_bytes = tl.load(mc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    h_bytes = tl.load(hc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    m_absmax = tl.load(ma_ptr + rows, mask=row_ok, other=0.0)
    h_absmax = tl.load(ha_ptr + rows, mask=row_ok, other=0.0)
    g_lo = tl.load(g_ptr + 2 * pairs, mask=lo_ok, other=0.0).to(tl.float32)
    g_hi = tl.load(g_ptr + 2 * pairs + 1, mask=hi_ok, other=0.0).to(tl.float32)
    m_lo, d_lo = _sophia_half(g_lo, m_bytes & 15, h_bytes & 15, m_code_ptr, h_code_ptr, m_absmax,
                              h_absmax, beta1, one_minus_beta1, rho, eps)
    m_hi, d_hi = _sophia_half(g_hi, m_bytes >> 4, h_bytes >> 4, m_code_ptr, h_code_ptr, m_absmax,
                              h_absmax, beta1, one_minus_beta1, rho, eps)
    tl.store(d_ptr + 2 * pairs, d_lo, mask=lo_ok)
    tl.store(d_ptr + 2 * pairs + 1, d_hi, mask=hi_ok)
    # the reference requantizes the fp32 M with the last block zero-padded
    m_lo = tl.where(lo_ok, m_lo, 0.0)
    m_hi = tl.where(hi_ok, m_hi, 0.0)
    m_absmax, m_lo, m_hi = _scale_pairs(m_lo, m_hi, lo_ok, hi_ok)
    byte = _nearest_code(m_lo, m_mids_ptr, 4) | (_nearest_code(m_hi, m_mids_ptr, 4) << 4)
    tl.store(mc_ptr + pairs, byte.to(tl.uint8), mask=row_ok[:, None])
    tl.store(ma_ptr + rows, m_absmax, mask=row_ok)


def _unfused(dequantize, quantize, grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    shape = tuple(grad.shape)
    m = dequantize(m_codes, m_absmax, True, shape)
    h = dequantize(h_codes, h_absmax, False, shape)
    direction = sophia_step_ref(grad, m, h, beta1, rho, eps)
    new_codes, new_absmax = quantize(m, True)
    m_codes.copy_(new_codes)
    m_absmax.copy_(new_absmax.view(m_absmax.shape))
    return direction


def sophia_q4_step_ref(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    """Reference: dequantize (PyTorch codec), `sophia_step_ref`, requantize M in place."""
    return _unfused(q4_dequantize_ref, q4_quantize_ref, grad, m_codes, m_absmax, h_codes,
                    h_absmax, beta1, rho, eps)


def sophia_q4_step(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    """Fused 4-bit Sophia: M's packed codes and absmax in place, H read; the clipped direction."""
    blocks = -(-grad.numel() // BLOCK)
    for name, codes, absmax in (("exp_avg", m_codes, m_absmax), ("hessian", h_codes, h_absmax)):
        if codes.numel() != blocks * HALF or absmax.numel() != blocks or not codes.is_contiguous():
            raise ValueError(f"{name}: q4 state must hold {blocks} blocks of {BLOCK} "
                             f"({blocks * HALF} code bytes) for {grad.numel()} values")
    if not use_triton(grad, m_codes, h_codes):  # CPU: the codec's C twin, same codes
        return _unfused(q4_dequantize, q4_quantize, grad, m_codes, m_absmax, h_codes, h_absmax,
                        beta1, rho, eps)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    m_code, m_mids = tables(4, True, g.device)
    h_code, _ = tables(4, False, g.device)
    rows = tile(8, 128)
    if blocks:
        _sophia_q4_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, h_codes, h_absmax, m_code, m_mids, h_code, g.numel(),
            beta1, 1.0 - beta1, rho, eps, ROWS=rows, HALF_BLOCK=HALF)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "hc_ptr": "*u8", "ha_ptr": "*fp32", "m_code_ptr": "*fp32", "m_mids_ptr": "*fp32",
           "h_code_ptr": "*fp32", "n": "i32", "beta1": "fp32", "one_minus_beta1": "fp32",
           "rho": "fp32", "eps": "fp32", "ROWS": "constexpr", "HALF_BLOCK": "constexpr"}
    return (CompileConfig(_sophia_q4_kernel, sig, {"ROWS": 8, "HALF_BLOCK": HALF}),)


register_kernel("sophia_q4_step", sophia_q4_step, sophia_q4_step_ref, _configs())
