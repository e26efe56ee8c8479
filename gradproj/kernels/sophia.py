"""Fused Sophia step (Liu et al. 2023): one pass over the (low-rank) gradient.

    M ← β1·M + (1−β1)·G;   N = clip(M / max(ρ·H, ε), 1)   (clip to [−1, 1], elementwise)

H, the curvature EMA, is only read here: it changes every k steps, when the optimizer's
`update_curvature` feeds the rule an estimate (optimizers/curvature.py). So the step
reads G, M, H once and writes M and N once: 5 tensor passes, where the reference's op
chain (mul_, add_, mul, clamp_, div, clamp_) makes 14 and one temporary. M and H may be stored fp32, bf16 or fp16 (math in fp32; N is
computed from the fp32 M before it is rounded to storage, as the reference does).
max(ρ·H, ε) is the paper's denominator; the official code adds ε instead (ρ·H + ε),
which equals it up to ε/(ρ·H) relative for H ≥ 0 and, for Hutchinson's estimate, which
may be negative, would flip the step's sign where ρ·H < −ε. Division uses the
IEEE-rounded `div_rn`, so the kernel matches the reference to a few fp32 ulps.

    direction = sophia_step(grad, exp_avg, hessian, beta1, rho, eps)   # exp_avg in place

The state formats call it (`DenseFormat.sophia_step`, and `BlockwiseFormat` for its
small fp32 moments); `sophia_q8.py` and `sophia_q4.py` are the 8-/4-bit variants.
"""
import torch

from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton


@triton.jit
def _sophia_kernel(g_ptr, m_ptr, h_ptr, d_ptr, n, beta1, one_minus_beta1, rho, eps,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + one_minus_beta1 * g
    d = tl.div_rn(m, tl.maximum(rho * h, eps))
    d = tl.minimum(tl.maximum(d, -1.0), 1.0)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)


def sophia_step_ref(grad, exp_avg, hessian, beta1, rho, eps):
    """Reference: `rules/sophia.py`'s math, op for op; exp_avg updated in place, H read."""
    m = exp_avg.float().mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg.copy_(m)
    return m.div(hessian.float().mul(rho).clamp_(min=eps)).clamp_(-1.0, 1.0)


def sophia_step(grad, exp_avg, hessian, beta1, rho, eps):
    """Fused Sophia: update exp_avg in place, return the clipped fp32 direction."""
    for t in (exp_avg, hessian):
        if t.shape != grad.shape or not t.is_contiguous():
            raise ValueError(f"moment of shape {tuple(t.shape)} must be contiguous and match "
                             f"the gradient's {tuple(grad.shape)}")
    if not use_triton(grad, exp_avg, hessian):
        return sophia_step_ref(grad, exp_avg, hessian, beta1, rho, eps)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    block = tile(1024, 1 << 14)
    _sophia_kernel[(triton.cdiv(n, block),)](g, exp_avg, hessian, out, n, beta1, 1.0 - beta1,
                                             rho, eps, BLOCK=block)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "m_ptr": "*fp32", "h_ptr": "*fp32", "d_ptr": "*fp32", "n": "i32",
           "beta1": "fp32", "one_minus_beta1": "fp32", "rho": "fp32", "eps": "fp32",
           "BLOCK": "constexpr"}
    return (CompileConfig(_sophia_kernel, sig, {"BLOCK": 1024}),
            CompileConfig(_sophia_kernel, dict(sig, m_ptr="*bf16", h_ptr="*bf16"), {"BLOCK": 1024}))


register_kernel("sophia_step", sophia_step, sophia_step_ref, _configs())
