"""Fused 8-bit diffGrad step: three blockwise 8-bit states (M, V, G_prev) in one pass.

Per block of 256: dequantize M, V and G_prev (bitsandbytes' layout, `q8.py`), run
`diffgrad.py`'s fp32 math, requantize M, V and the new G_prev = G, write N. Per element:
G and N (8 bytes) plus 3 code bytes read and written, against ~60 bytes for three
dequantize + reference + three quantize passes through PyTorch. The direction uses the fp32
moments before they are requantized, as `adam_q8.py` does.
"""
import torch

from .adam import _check
from .diffgrad import diffgrad_step_ref
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q8 import BLOCK, q8_dequantize, q8_dequantize_ref, q8_quantize, q8_quantize_ref
from .qmaps import _nearest_code, _scale_rows, tables

SIGNS = (True, False, True)  # M and G_prev take the signed map, V the unsigned one


@triton.jit
def _diffgrad_q8_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, pc_ptr, pa_ptr,
                        s_code_ptr, s_mids_ptr, u_code_ptr, u_mids_ptr, n, beta1,
                        one_minus_beta1, beta2, one_minus_beta2, eps, step_size,
                        ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < n
    row_ok = rows * QBLOCK < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mc = tl.load(mc_ptr + offs, mask=valid, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=valid, other=0).to(tl.int32)
    pc = tl.load(pc_ptr + offs, mask=valid, other=0).to(tl.int32)
    m = tl.load(s_code_ptr + mc) * tl.load(ma_ptr + rows, mask=row_ok, other=0.0)[:, None]
    v = tl.load(u_code_ptr + vc) * tl.load(va_ptr + rows, mask=row_ok, other=0.0)[:, None]
    prev = tl.load(s_code_ptr + pc) * tl.load(pa_ptr + rows, mask=row_ok, other=0.0)[:, None]
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    friction = tl.div_rn(1.0, 1.0 + tl.exp(-tl.abs(prev - g)))
    d = tl.div_rn(m * friction, tl.sqrt_rn(v) + eps) * step_size
    tl.store(d_ptr + offs, d, mask=valid)
    m_absmax, m_scaled = _scale_rows(m, valid)
    v_absmax, v_scaled = _scale_rows(v, valid)
    p_absmax, p_scaled = _scale_rows(g, valid)
    tl.store(mc_ptr + offs, _nearest_code(m_scaled, s_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(vc_ptr + offs, _nearest_code(v_scaled, u_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(pc_ptr + offs, _nearest_code(p_scaled, s_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(ma_ptr + rows, m_absmax, mask=row_ok)
    tl.store(va_ptr + rows, v_absmax, mask=row_ok)
    tl.store(pa_ptr + rows, p_absmax, mask=row_ok)


def _unfused(dequantize, quantize, grad, states, beta1, beta2, eps, step_size):
    values = [dequantize(c, a, s) for (c, a), s in zip(states, SIGNS)]
    direction = diffgrad_step_ref(grad, *values, beta1, beta2, eps, step_size)
    for (codes, absmax), value, signed in zip(states, values, SIGNS):
        new_codes, new_absmax = quantize(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax.view(absmax.shape))
    return direction


def diffgrad_q8_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax,
                         beta1, beta2, eps, step_size):
    """Reference: dequantize, `diffgrad_step_ref`, requantize; codes/absmax in place."""
    states = ((m_codes, m_absmax), (v_codes, v_absmax), (p_codes, p_absmax))
    return _unfused(q8_dequantize_ref, q8_quantize_ref, grad, states, beta1, beta2, eps,
                    step_size)


def diffgrad_q8_step(grad, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax, beta1,
                     beta2, eps, step_size):
    """Fused 8-bit diffGrad: three states' codes and absmax in place; the fp32 direction."""
    _check(grad, m_codes, v_codes, p_codes)
    blocks = -(-grad.numel() // BLOCK)
    if any(a.numel() != blocks for a in (m_absmax, v_absmax, p_absmax)):
        raise ValueError(f"absmax must hold {blocks} blocks of {BLOCK} for {grad.numel()} values")
    states = ((m_codes, m_absmax), (v_codes, v_absmax), (p_codes, p_absmax))
    if not use_triton(grad, m_codes, v_codes, p_codes):  # CPU: the codec's C twin, same codes
        return _unfused(q8_dequantize, q8_quantize, grad, states, beta1, beta2, eps, step_size)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    s_code, s_mids = tables(8, True, g.device)
    u_code, u_mids = tables(8, False, g.device)
    rows = tile(4, 64)
    if blocks:
        _diffgrad_q8_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, v_codes, v_absmax, p_codes, p_absmax, s_code, s_mids,
            u_code, u_mids, g.numel(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size,
            ROWS=rows, QBLOCK=BLOCK)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "vc_ptr": "*u8", "va_ptr": "*fp32", "pc_ptr": "*u8", "pa_ptr": "*fp32",
           "s_code_ptr": "*fp32", "s_mids_ptr": "*fp32", "u_code_ptr": "*fp32",
           "u_mids_ptr": "*fp32", "n": "i32", "beta1": "fp32", "one_minus_beta1": "fp32",
           "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "step_size": "fp32",
           "ROWS": "constexpr", "QBLOCK": "constexpr"}
    return (CompileConfig(_diffgrad_q8_kernel, sig, {"ROWS": 4, "QBLOCK": BLOCK}),)


register_kernel("diffgrad_q8_step", diffgrad_q8_step, diffgrad_q8_step_ref, _configs())
