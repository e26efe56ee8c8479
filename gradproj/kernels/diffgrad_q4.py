"""Fused 4-bit diffGrad step: three packed 4-bit states (M, V, G_prev) in one pass.

Per block of 128 (held as its even and odd halves, the low and high nibbles of 64 bytes,
as `adam_q4.py` does): unpack + dequantize M, V and G_prev (`q4.py`, torchao's maps),
run `diffgrad.py`'s fp32 math, requantize M, V and the new G_prev = G, pack, write N.
Per element: G and N (8 bytes) plus 3 × 0.53 bytes of state read and written, against
~60 bytes for three dequantize + reference + three quantize passes through PyTorch. The
direction uses the fp32 moments before they are requantized, as `adam_q4.py` does.

On CPU the host runs the C codec (`cpu_blockwise.py`) around `diffgrad_step_ref`: the
reference's direction and codes bit for bit (the C codec's are the PyTorch codec's).
"""
import torch

from .diffgrad import diffgrad_step_ref
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q4 import (BLOCK, HALF, _scale_pairs, q4_dequantize, q4_dequantize_ref, q4_quantize,
                 q4_quantize_ref)
from .qmaps import _nearest_code, tables

SIGNS = (True, False, True)  # M and G_prev take the signed (dynamic) map, V the linear one


@triton.jit
def _diffgrad_half(g, mc, vc, pc, s_code_ptr, u_code_ptr, m_absmax, v_absmax, p_absmax, beta1,
                   one_minus_beta1, beta2, one_minus_beta2, eps, step_size):
    m = tl.load(s_code_ptr + mc) * m_absmax[:, None]
    v = tl.load(u_code_ptr + vc) * v_absmax[:, None]
    prev = tl.load(s_code_ptr + pc) * p_absmax[:, None]
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    friction = tl.div_rn(1.0, 1.0 + tl.exp(-tl.abs(prev - g)))
    d = tl.div_rn(m * friction, tl.sqrt_rn(v) + eps) * step_size
    return m, v, d


@triton.jit
def _requantize(lo, hi, lo_ok, hi_ok, codes_ptr, absmax_ptr, mids_ptr, pairs, rows, row_ok):
    # the reference requantizes the fp32 value with the last block zero-padded
    lo = tl.where(lo_ok, lo, 0.0)
    hi = tl.where(hi_ok, hi, 0.0)
    absmax, lo, hi = _scale_pairs(lo, hi, lo_ok, hi_ok)
    byte = _nearest_code(lo, mids_ptr, 4) | (_nearest_code(hi, mids_ptr, 4) << 4)
    tl.store(codes_ptr + pairs, byte.to(tl.uint8), mask=row_ok[:, None])
    tl.store(absmax_ptr + rows, absmax, mask=row_ok)


@triton.jit
def _diffgrad_q4_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, pc_ptr, pa_ptr,
                        s_code_ptr, s_mids_ptr, u_code_ptr, u_mids_ptr, n, beta1,
                        one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                        ROWS: tl.constexpr, HALF_BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    pairs = rows[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
    row_ok = rows * (2 * HALF_BLOCK) < n
    lo_ok = 2 * pairs < n
    hi_ok = 2 * pairs + 1 < n
    m_bytes = tl.load(mc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    v_bytes = tl.load(vc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    p_bytes = tl.load(pc_ptr + pairs, mask=row_ok[:, None], other=0).to(tl.int32)
    m_absmax = tl.load(ma_ptr + rows, mask=row_ok, other=0.0)
    v_absmax = tl.load(va_ptr + rows, mask=row_ok, other=0.0)
    p_absmax = tl.load(pa_ptr + rows, mask=row_ok, other=0.0)
    g_lo = tl.load(g_ptr + 2 * pairs, mask=lo_ok, other=0.0).to(tl.float32)
    g_hi = tl.load(g_ptr + 2 * pairs + 1, mask=hi_ok, other=0.0).to(tl.float32)
    m_lo, v_lo, d_lo = _diffgrad_half(g_lo, m_bytes & 15, v_bytes & 15, p_bytes & 15, s_code_ptr,
                                      u_code_ptr, m_absmax, v_absmax, p_absmax, beta1,
                                      one_minus_beta1, beta2, one_minus_beta2, eps, step_size)
    m_hi, v_hi, d_hi = _diffgrad_half(g_hi, m_bytes >> 4, v_bytes >> 4, p_bytes >> 4, s_code_ptr,
                                      u_code_ptr, m_absmax, v_absmax, p_absmax, beta1,
                                      one_minus_beta1, beta2, one_minus_beta2, eps, step_size)
    tl.store(d_ptr + 2 * pairs, d_lo, mask=lo_ok)
    tl.store(d_ptr + 2 * pairs + 1, d_hi, mask=hi_ok)
    _requantize(m_lo, m_hi, lo_ok, hi_ok, mc_ptr, ma_ptr, s_mids_ptr, pairs, rows, row_ok)
    _requantize(v_lo, v_hi, lo_ok, hi_ok, vc_ptr, va_ptr, u_mids_ptr, pairs, rows, row_ok)
    _requantize(g_lo, g_hi, lo_ok, hi_ok, pc_ptr, pa_ptr, s_mids_ptr, pairs, rows, row_ok)


def _unfused(dequantize, quantize, grad, states, beta1, beta2, eps, step_size):
    shape = tuple(grad.shape)
    values = [dequantize(c, a, s, shape) for (c, a), s in zip(states, SIGNS)]
    direction = diffgrad_step_ref(grad, *values, beta1, beta2, eps, step_size)
    for (codes, absmax), value, signed in zip(states, values, SIGNS):
        new_codes, new_absmax = quantize(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax.view(absmax.shape))
    return direction


def diffgrad_q4_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                         beta1, beta2, eps, step_size):
    """Reference: dequantize (PyTorch codec), `diffgrad_step_ref`, requantize; in place."""
    states = ((m_codes, m_absmax), (v_codes, v_absmax), (p_codes, p_absmax))
    return _unfused(q4_dequantize_ref, q4_quantize_ref, grad, states, beta1, beta2, eps,
                    step_size)


def diffgrad_q4_step(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax, beta1,
                     beta2, eps, step_size):
    """Fused 4-bit diffGrad: three states' packed codes and absmax in place; the fp32 direction."""
    blocks = -(-grad.numel() // BLOCK)
    states = ((m_codes, m_absmax), (v_codes, v_absmax), (p_codes, p_absmax))
    for name, (codes, absmax) in zip(("exp_avg", "exp_avg_sq", "previous_grad"), states):
        if codes.numel() != blocks * HALF or absmax.numel() != blocks or not codes.is_contiguous():
            raise ValueError(f"{name}: q4 state must hold {blocks} blocks of {BLOCK} "
                             f"({blocks * HALF} code bytes) for {grad.numel()} values")
    if not use_triton(grad, m_codes, v_codes, p_codes):  # CPU: the codec's C twin, same codes
        return _unfused(q4_dequantize, q4_quantize, grad, states, beta1, beta2, eps, step_size)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    s_code, s_mids = tables(4, True, g.device)
    u_code, u_mids = tables(4, False, g.device)
    rows = tile(8, 128)
    if blocks:
        _diffgrad_q4_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax, s_code, s_mids,
            u_code, u_mids, g.numel(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size,
            ROWS=rows, HALF_BLOCK=HALF)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "vc_ptr": "*u8", "va_ptr": "*fp32", "pc_ptr": "*u8", "pa_ptr": "*fp32",
           "s_code_ptr": "*fp32", "s_mids_ptr": "*fp32", "u_code_ptr": "*fp32",
           "u_mids_ptr": "*fp32", "n": "i32", "beta1": "fp32", "one_minus_beta1": "fp32",
           "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "step_size": "fp32",
           "ROWS": "constexpr", "HALF_BLOCK": "constexpr"}
    return (CompileConfig(_diffgrad_q4_kernel, sig, {"ROWS": 8, "HALF_BLOCK": HALF}),)


register_kernel("diffgrad_q4_step", diffgrad_q4_step, diffgrad_q4_step_ref, _configs())
