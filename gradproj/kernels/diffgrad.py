"""Fused diffGrad step (Dubey et al. 2019): Adam whose first moment is damped by friction.

    M ← β1·M + (1−β1)·G;   V ← β2·V + (1−β2)·G²;   ξ = sigmoid(|G_prev − G|);   G_prev ← G
    N = step_size · ξ·M / (√V + ε)

One pass: reads G, M, V, G_prev, writes M, V, G_prev and N (8 tensor passes; the PyTorch
chain of the reference makes ~14 and 4 temporaries). The three state tensors may be stored
fp32, bf16 or fp16 (math in fp32; G_prev is G rounded to its storage). `step_size` is the
rule's √(1−β2ᵗ)/(1−β1ᵗ), computed on the host, so a new step never recompiles. ξ is
1/(1 + e^(−|Δ|)) as torch-optimizer's DiffGrad writes it; ξ ∈ [½, 1), so an approximate
exp (NVIDIA's ex2.approx, 2 ulp) moves N by a few fp32 ulps only.

The state formats call it (`DenseFormat.diffgrad_step`, `BlockwiseFormat` for its small fp32
moments); `diffgrad_q8.py` and `diffgrad_q4.py` are the 8-bit and 4-bit variants.
"""
import torch

from .adam import _check
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton


@triton.jit
def _diffgrad_kernel(g_ptr, m_ptr, v_ptr, p_ptr, d_ptr, n, beta1, one_minus_beta1, beta2,
                     one_minus_beta2, eps, step_size, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    prev = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    friction = tl.div_rn(1.0, 1.0 + tl.exp(-tl.abs(prev - g)))
    d = tl.div_rn(m * friction, tl.sqrt_rn(v) + eps) * step_size
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + offs, g.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)


def diffgrad_step_ref(grad, exp_avg, exp_avg_sq, previous_grad, beta1, beta2, eps, step_size):
    """Reference: torch-optimizer's DiffGrad math, op for op; the three states in place."""
    m = exp_avg.float().mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    friction = torch.div(1.0, 1.0 + torch.exp(-(previous_grad.float() - grad).abs_()))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    previous_grad.copy_(grad)
    return m.mul(friction).div_(v.sqrt().add_(eps)).mul_(step_size)


def diffgrad_step(grad, exp_avg, exp_avg_sq, previous_grad, beta1, beta2, eps, step_size):
    """Fused diffGrad: update M, V, G_prev in place, return the fp32 direction (grad's shape)."""
    _check(grad, exp_avg, exp_avg_sq, previous_grad)
    if not use_triton(grad, exp_avg, exp_avg_sq, previous_grad):
        return diffgrad_step_ref(grad, exp_avg, exp_avg_sq, previous_grad, beta1, beta2, eps,
                                 step_size)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    block = tile(1024, 1 << 14)
    _diffgrad_kernel[(triton.cdiv(n, block),)](g, exp_avg, exp_avg_sq, previous_grad, out, n,
                                               beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
                                               step_size, BLOCK=block)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "p_ptr": "*fp32",
           "d_ptr": "*fp32", "n": "i32", "beta1": "fp32", "one_minus_beta1": "fp32",
           "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32", "step_size": "fp32",
           "BLOCK": "constexpr"}
    bf16 = dict(sig, m_ptr="*bf16", v_ptr="*bf16", p_ptr="*bf16")
    return (CompileConfig(_diffgrad_kernel, sig, {"BLOCK": 1024}),
            CompileConfig(_diffgrad_kernel, bf16, {"BLOCK": 1024}))


register_kernel("diffgrad_step", diffgrad_step, diffgrad_step_ref, _configs())
