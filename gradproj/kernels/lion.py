"""Fused Lion step (Chen et al. 2023): one pass, one moment, a sign direction.

    c = β1·M + (1−β1)·G;   direction = sign(c);   M ← β2·M + (1−β2)·G

Reads G and M, writes M and the direction: 4 tensor passes instead of ~7. M may be stored
fp32, bf16 or fp16 (math in fp32). The interpolation is computed the way `torch.lerp`
does (`rules/lion.py`'s reference), G + w·(M − G) for w < 0.5, else M − (M − G)·(1 − w),
so signs agree with the reference except where c is within rounding of 0.

    direction = lion_update(grad, exp_avg, beta1, beta2)   # exp_avg updated in place
"""
import torch

from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton


@triton.jit
def _lion_kernel(g_ptr, m_ptr, d_ptr, n, beta1, beta2, one_minus_beta2, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    diff = m - g
    # torch.lerp's two branches; its 1 − w is taken in fp32 from the fp32 weight
    c = tl.where(beta1 < 0.5, g + beta1 * diff, m - diff * (1.0 - beta1))
    d = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
    m = m * beta2 + one_minus_beta2 * g
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)


def lion_update_ref(grad, exp_avg, beta1, beta2):
    """Reference: `rules/lion.py`'s math; exp_avg updated in place, fp32 direction returned."""
    m = exp_avg.float()
    direction = torch.lerp(grad.float(), m, beta1).sign_()
    exp_avg.copy_(m.mul_(beta2).add_(grad, alpha=1.0 - beta2))
    return direction


def lion_update(grad, exp_avg, beta1, beta2):
    """Fused Lion: the fp32 sign direction; exp_avg (fp32/bf16/fp16, grad's shape) in place."""
    if exp_avg.shape != grad.shape or not exp_avg.is_contiguous():
        raise ValueError(f"exp_avg of shape {tuple(exp_avg.shape)} must be contiguous and match "
                         f"the gradient's {tuple(grad.shape)}")
    if not use_triton(grad, exp_avg):
        return lion_update_ref(grad, exp_avg, beta1, beta2)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    block = tile(1024, 1 << 14)
    _lion_kernel[(triton.cdiv(g.numel(), block),)](g, exp_avg, out, g.numel(), beta1, beta2,
                                                   1.0 - beta2, BLOCK=block)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "m_ptr": "*fp32", "d_ptr": "*fp32", "n": "i32", "beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32",
           "BLOCK": "constexpr"}
    return (CompileConfig(_lion_kernel, sig, {"BLOCK": 1024}),
            CompileConfig(_lion_kernel, dict(sig, m_ptr="*bf16"), {"BLOCK": 1024}))


register_kernel("lion_update", lion_update, lion_update_ref, _configs())
