"""Fused AdamW step on q8/q4 moments on CPU, bit-identical to `rules/adamw.py` + the codecs.

The reference path (`fmt.read` → `rules/adamw.py` → `fmt.write`) is ~20 passes over memory
per step. This is five, with the blocks of the two C passes (`cpu_blockwise.py`) in L1:

  1. C:        M = (code[c]·absmax)·β1,  V = (code[c]·absmax)·β2
               (the reference's dequantize, then `mul_(β)`: two roundings, as there)
  2. PyTorch:  M.add_(G, alpha=1−β1);  V.addcmul_(G, G, value=1−β2);  R = V.sqrt()
               These stay ATen ops: ATen's vectorised add-with-alpha is a fused multiply-add
               while its scalar tail (n mod 32 elements of each thread's range) is not, and
               its float sqrt is not correctly rounded (1 ulp off on 0.6 % of values here),
               so only the same op on the same tensors rounds the same on every CPU and
               thread count.
  3. C:        N = (M / (R + ε))·step_size from the fp32 moments (what the reference
               returns), then both moments requantized in place (absmax, nearest code).

Step 3's add, divide and multiply are single IEEE operations in ATen too, and the C has no
multiply-add to contract and no fast-math, so N, the codes and the absmax are bit-identical
to the reference's (tests/kernels/test_kernels_cpu_blockwise.py).
"""
from __future__ import annotations

import ctypes
import math

import torch

from . import cpu_blockwise
from .qmaps import tables

BITS = {"q8": 8, "q4": 4}


def adam_blockwise_step(bits, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                        step_size):
    """The fp32 direction with codes/absmax updated in place, or None where the C path does
    not apply (GRADPROJ_KERNELS≠auto, not CPU, no compiler, or a layout that is not the
    format's: the caller's reference then runs and reports any problem itself)."""
    if not cpu_blockwise.active(grad, m_codes, v_codes, m_absmax, v_absmax):
        return None
    shape = tuple(grad.shape)
    m = cpu_blockwise.dequantize(m_codes, m_absmax, bits, True, shape, beta1)
    v = cpu_blockwise.dequantize(v_codes, v_absmax, bits, False, shape, beta2)
    if m is None or v is None:
        return None
    m.add_(grad, alpha=1.0 - beta1)
    v.addcmul_(grad, grad, value=1.0 - beta2)
    root = v.sqrt()
    out = torch.empty(shape, dtype=torch.float32)
    lib = cpu_blockwise.library()
    if bits == 8:
        fn = lib.gp_adam_q8_finish
        m_map = ctypes.byref(cpu_blockwise.codebook(8, True)[0])
        v_map = ctypes.byref(cpu_blockwise.codebook(8, False)[0])
    else:
        fn = lib.gp_adam_q4_finish
        m_map, v_map = tables(4, True, "cpu")[1].data_ptr(), tables(4, False, "cpu")[1].data_ptr()
    cpu_blockwise.run_blocks(
        fn, math.prod(shape), cpu_blockwise.BLOCKS[bits], (m.data_ptr(), v.data_ptr(), root.data_ptr()),
        (eps, step_size, m_map, v_map, out.data_ptr(), m_codes.data_ptr(), m_absmax.data_ptr(),
         v_codes.data_ptr(), v_absmax.data_ptr()))
    return out


def fused_adamw_cpu(grad, state, group, fmt):
    """`kernels.adam.fused_adamw` on CPU: the direction for q8/q4 codes, else None (the rule's
    own math runs: dense moments, q8/q4's fp32 small-tensor fallback, the reference mode)."""
    bits = BITS.get(getattr(fmt, "registry_name", None))
    if bits is None or "exp_avg.codes" not in state or "exp_avg_sq.codes" not in state:
        return None
    from .adam import adam_step_size

    beta1, beta2 = group["betas"]
    step_size = adam_step_size(beta1, beta2, state["step"], group.get("correct_bias", True))
    return adam_blockwise_step(bits, grad, state["exp_avg.codes"], state["exp_avg.absmax"],
                               state["exp_avg_sq.codes"], state["exp_avg_sq.absmax"],
                               beta1, beta2, group["eps"], step_size)
