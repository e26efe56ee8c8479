"""Fused 8-bit Adam step: dequantize both moments, update in fp32, requantize, in one pass.

Per block of 256: read G (4 B/elem), two code bytes and two fp32 absmax, write two code
bytes, two absmax and N (4 B/elem) — 12 bytes per element against ~40 for dequantize +
`rules/adamw.py` + quantize through PyTorch. The math is the reference's exactly: the
direction uses the fp32 moments before they are requantized (as bitsandbytes' 8-bit Adam
does), and requantization is `q8.py`'s (absmax of the new block, nearest code).
"""
import torch

from .adam import _check
from . import cpu_adam
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q8 import BLOCK, q8_dequantize_ref, q8_quantize_ref
from .qmaps import _nearest_code, _scale_rows, tables


@triton.jit
def _adam_q8_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, vc_ptr, va_ptr, m_code_ptr, m_mids_ptr,
                    v_code_ptr, v_mids_ptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2,
                    eps, step_size, ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < n
    row_ok = rows * QBLOCK < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mc = tl.load(mc_ptr + offs, mask=valid, other=0).to(tl.int32)
    vc = tl.load(vc_ptr + offs, mask=valid, other=0).to(tl.int32)
    m = tl.load(m_code_ptr + mc) * tl.load(ma_ptr + rows, mask=row_ok, other=0.0)[:, None]
    v = tl.load(v_code_ptr + vc) * tl.load(va_ptr + rows, mask=row_ok, other=0.0)[:, None]
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    d = tl.div_rn(m, tl.sqrt_rn(v) + eps) * step_size
    tl.store(d_ptr + offs, d, mask=valid)
    m_absmax, m_scaled = _scale_rows(m, valid)
    v_absmax, v_scaled = _scale_rows(v, valid)
    tl.store(mc_ptr + offs, _nearest_code(m_scaled, m_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(vc_ptr + offs, _nearest_code(v_scaled, v_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(ma_ptr + rows, m_absmax, mask=row_ok)
    tl.store(va_ptr + rows, v_absmax, mask=row_ok)


def adam_q8_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
    """Reference: dequantize, `rules/adamw.py`'s math, requantize; codes/absmax in place."""
    m = q8_dequantize_ref(m_codes, m_absmax, True).mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v = q8_dequantize_ref(v_codes, v_absmax, False).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    for (codes, absmax), value, signed in (((m_codes, m_absmax), m, True),
                                           ((v_codes, v_absmax), v, False)):
        new_codes, new_absmax = q8_quantize_ref(value, signed)
        codes.copy_(new_codes)
        absmax.copy_(new_absmax.view(absmax.shape))
    return m.div(v.sqrt().add_(eps)).mul_(step_size)


def adam_q8_step(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps, step_size):
    """Fused 8-bit Adam: codes and absmax updated in place; returns the fp32 direction."""
    _check(grad, m_codes, v_codes)
    blocks = -(-grad.numel() // BLOCK)
    if m_absmax.numel() != blocks or v_absmax.numel() != blocks:
        raise ValueError(f"absmax must hold {blocks} blocks of {BLOCK} for {grad.numel()} values")
    if not use_triton(grad, m_codes, v_codes):  # CPU: three passes, same bits (cpu_adam.py)
        fast = cpu_adam.adam_blockwise_step(8, grad, m_codes, m_absmax, v_codes, v_absmax,
                                            beta1, beta2, eps, step_size)
        if fast is not None:
            return fast
        return adam_q8_step_ref(grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                                step_size)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    m_code, m_mids = tables(8, True, g.device)
    v_code, v_mids = tables(8, False, g.device)
    rows = tile(4, 64)
    if blocks:
        _adam_q8_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, v_codes, v_absmax, m_code, m_mids, v_code, v_mids,
            g.numel(), beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size,
            ROWS=rows, QBLOCK=BLOCK)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "vc_ptr": "*u8", "va_ptr": "*fp32", "m_code_ptr": "*fp32", "m_mids_ptr": "*fp32",
           "v_code_ptr": "*fp32", "v_mids_ptr": "*fp32", "n": "i32", "beta1": "fp32",
           "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32",
           "eps": "fp32", "step_size": "fp32", "ROWS": "constexpr", "QBLOCK": "constexpr"}
    return (CompileConfig(_adam_q8_kernel, sig, {"ROWS": 4, "QBLOCK": BLOCK}),)


register_kernel("adam_q8_step", adam_q8_step, adam_q8_step_ref, _configs())
