"""Fused 8-bit Sophia step: dequantize M and H, `sophia.py`'s fp32 math, requantize M.

H, the curvature EMA, is stored as the rule's unsigned moment (`rules/sophia.py`), so in
`q8` it is codes + absmax too (unsigned dynamic map: a negative Hutchinson estimate
quantizes to 0, and max(ρ·0, ε) = ε is the denominator the dense step gives any
ρ·h ≤ ε). The step only reads H: its codes are loaded and never written. Per block of
256 (`q8.py`'s layout): read G (4 B/elem), M's and H's code bytes and absmax, write M's
code byte and absmax and N (4 B/elem) — 11 bytes per element against ~40 for two
dequantize + reference + one quantize pass through PyTorch. N is computed from the fp32
M before it is requantized, as the reference does.

On CPU the host runs the C codec (`cpu_blockwise.py`) around `sophia_step_ref`: the
reference's direction and codes bit for bit.
"""
import torch

from .adam import _check
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton
from .q8 import BLOCK, q8_dequantize, q8_dequantize_ref, q8_quantize, q8_quantize_ref
from .qmaps import _nearest_code, _scale_rows, tables
from .sophia import sophia_step_ref


@triton.jit
def _sophia_q8_kernel(g_ptr, d_ptr, mc_ptr, ma_ptr, hc_ptr, ha_ptr, m_code_ptr, m_mids_ptr,
                      h_code_ptr, n, beta1, one_minus_beta1, rho, eps,
                      ROWS: tl.constexpr, QBLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    valid = offs < n
    row_ok = rows * QBLOCK < n
    g = tl.load(g_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    mc = tl.load(mc_ptr + offs, mask=valid, other=0).to(tl.int32)
    hc = tl.load(hc_ptr + offs, mask=valid, other=0).to(tl.int32)
    m = tl.load(m_code_ptr + mc) * tl.load(ma_ptr + rows, mask=row_ok, other=0.0)[:, None]
    h = tl.load(h_code_ptr + hc) * tl.load(ha_ptr + rows, mask=row_ok, other=0.0)[:, None]
    m = m * beta1 + one_minus_beta1 * g
    d = tl.div_rn(m, tl.maximum(rho * h, eps))
    d = tl.minimum(tl.maximum(d, -1.0), 1.0)
    tl.store(d_ptr + offs, d, mask=valid)
    m_absmax, m_scaled = _scale_rows(m, valid)
    tl.store(mc_ptr + offs, _nearest_code(m_scaled, m_mids_ptr, 8).to(tl.uint8), mask=valid)
    tl.store(ma_ptr + rows, m_absmax, mask=row_ok)


def _unfused(dequantize, quantize, grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    m = dequantize(m_codes, m_absmax, True)
    direction = sophia_step_ref(grad, m, dequantize(h_codes, h_absmax, False), beta1, rho, eps)
    new_codes, new_absmax = quantize(m, True)
    m_codes.copy_(new_codes)
    m_absmax.copy_(new_absmax.view(m_absmax.shape))
    return direction


def sophia_q8_step_ref(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    """Reference: dequantize (PyTorch codec), `sophia_step_ref`, requantize M in place."""
    return _unfused(q8_dequantize_ref, q8_quantize_ref, grad, m_codes, m_absmax, h_codes,
                    h_absmax, beta1, rho, eps)


def sophia_q8_step(grad, m_codes, m_absmax, h_codes, h_absmax, beta1, rho, eps):
    """Fused 8-bit Sophia: M's codes and absmax in place, H read; the clipped fp32 direction."""
    _check(grad, m_codes, h_codes)
    blocks = -(-grad.numel() // BLOCK)
    if m_absmax.numel() != blocks or h_absmax.numel() != blocks:
        raise ValueError(f"absmax must hold {blocks} blocks of {BLOCK} for {grad.numel()} values")
    if not use_triton(grad, m_codes, h_codes):  # CPU: the codec's C twin, same codes
        return _unfused(q8_dequantize, q8_quantize, grad, m_codes, m_absmax, h_codes, h_absmax,
                        beta1, rho, eps)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    m_code, m_mids = tables(8, True, g.device)
    h_code, _ = tables(8, False, g.device)
    rows = tile(4, 64)
    if blocks:
        _sophia_q8_kernel[(triton.cdiv(blocks, rows),)](
            g, out, m_codes, m_absmax, h_codes, h_absmax, m_code, m_mids, h_code, g.numel(),
            beta1, 1.0 - beta1, rho, eps, ROWS=rows, QBLOCK=BLOCK)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "d_ptr": "*fp32", "mc_ptr": "*u8", "ma_ptr": "*fp32",
           "hc_ptr": "*u8", "ha_ptr": "*fp32", "m_code_ptr": "*fp32", "m_mids_ptr": "*fp32",
           "h_code_ptr": "*fp32", "n": "i32", "beta1": "fp32", "one_minus_beta1": "fp32",
           "rho": "fp32", "eps": "fp32", "ROWS": "constexpr", "QBLOCK": "constexpr"}
    return (CompileConfig(_sophia_q8_kernel, sig, {"ROWS": 4, "QBLOCK": BLOCK}),)


register_kernel("sophia_q8_step", sophia_q8_step, sophia_q8_step_ref, _configs())
