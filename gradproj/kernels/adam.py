"""Fused Adam step on dense moments: one pass over the (low-rank) gradient.

Reads G, M, V once, writes M, V and the direction N once (5 tensors × numel; the unfused
PyTorch chain of `rules/adamw.py` makes ~8 passes and 3 temporaries):

    M ← β1·M + (1−β1)·G;   V ← β2·V + (1−β2)·G²;   N = step_size · M / (√V + ε)

M and V may be stored fp32, bf16 or fp16 (storage only: the math is fp32, and N is computed
from the fp32 moments before they are rounded to storage, as the reference does).
β, 1−β, ε and `step_size` (the rule's `step_scale`, √(1−β2ᵗ)/(1−β1ᵗ) for AdamW) are runtime
arguments computed on the host from the integer step, so a new step never recompiles.
Division and square root use the IEEE-rounded `div_rn`/`sqrt_rn` (Triton's default `/` and `sqrt` are approximate on
NVIDIA), so the kernel matches the reference to a few fp32 ulps.

On CPU, fp32 moments take one C pass instead (`cpu_adam.adam_dense_step`: the same
formula, each operation rounded as written), bf16/fp16 ones and GRADPROJ_KERNELS=reference
the reference chain. The state formats call it (`DenseFormat.adam_step`, and
`BlockwiseFormat` for its small fp32 moments); `adam_q8.py` and `adam_q4.py` hold the 8-bit
and 4-bit variants.
"""
import torch

from . import cpu_adam
from .cpu_out import reusable_empty
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton


@triton.jit
def _adam_kernel(g_ptr, m_ptr, v_ptr, d_ptr, n, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, eps, step_size, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + one_minus_beta1 * g
    v = v * beta2 + one_minus_beta2 * (g * g)
    d = tl.div_rn(m, tl.sqrt_rn(v) + eps) * step_size
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(d_ptr + offs, d, mask=mask)


def _check(grad, *moments):
    for m in moments:
        if m.shape != grad.shape or not m.is_contiguous():
            raise ValueError(f"moment of shape {tuple(m.shape)} must be contiguous and match "
                             f"the gradient's {tuple(grad.shape)}")


def adam_step_ref(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, out=None):
    """Reference: `rules/adamw.py`'s math, op for op; moments updated in place. `out`: an
    fp32 buffer of grad's shape for the direction (the values are the same)."""
    m = exp_avg.float().mul_(beta1).add_(grad, alpha=1.0 - beta1)
    v = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    # bf16/fp16 moments were updated in an fp32 copy; fp32 ones in place (no self-copy op)
    if m is not exp_avg:
        exp_avg.copy_(m)
    if v is not exp_avg_sq:
        exp_avg_sq.copy_(v)
    # the quotient goes into the denominator's buffer: the same values as m.div(denom),
    # and one fresh moment-sized allocation less per step — on CPU each is page-faulted
    # anew (1M values, one thread: 5.45 -> 4.16 ms, torch AdamW foreach 4.49 ms)
    if out is None:
        denom = v.sqrt().add_(eps)
    else:
        denom = torch.sqrt(v, out=out).add_(eps)
    return torch.div(m, denom, out=denom).mul_(step_size)


def adam_step(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size):
    """Fused Adam: update moments in place, return the fp32 direction (grad's shape)."""
    _check(grad, exp_avg, exp_avg_sq)
    if not use_triton(grad, exp_avg, exp_avg_sq):
        fused = cpu_adam.adam_dense_step(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size)
        if fused is not None:  # fp32 on CPU: one C pass (cpu_adam.py)
            return fused
        # else the reference; on CPU the direction goes into a reused buffer (`cpu_out.py`:
        # a fresh 64 MB one costs ~30 ms of page faults a step)
        out = reusable_empty(tuple(grad.shape)) if grad.device.type == "cpu" else None
        return adam_step_ref(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size, out)
    g = grad.float().contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    block = tile(1024, 1 << 14)
    _adam_kernel[(triton.cdiv(n, block),)](g, exp_avg, exp_avg_sq, out, n, beta1, 1.0 - beta1,
                                           beta2, 1.0 - beta2, eps, step_size, BLOCK=block)
    return out


def _configs():
    sig = {"g_ptr": "*fp32", "m_ptr": "*fp32", "v_ptr": "*fp32", "d_ptr": "*fp32", "n": "i32",
           "beta1": "fp32", "one_minus_beta1": "fp32", "beta2": "fp32",
           "one_minus_beta2": "fp32", "eps": "fp32", "step_size": "fp32", "BLOCK": "constexpr"}
    bf16 = dict(sig, m_ptr="*bf16", v_ptr="*bf16")
    return (CompileConfig(_adam_kernel, sig, {"BLOCK": 1024}),
            CompileConfig(_adam_kernel, bf16, {"BLOCK": 1024}))


register_kernel("adam_step", adam_step, adam_step_ref, _configs())
