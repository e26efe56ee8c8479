"""Fused AdamW steps on CPU: dense fp32 moments in one C pass, q8/q4 ones bit-identical to
`rules/adamw.py` + the codecs.

Dense fp32 (`adam_dense_step`): the reference chain is eight ATen ops, ~80 bytes of memory
traffic per value; `gp_adam_dense` reads G, M, V and writes M, V, N once (24 bytes): on one
thread here a 32000×768 moment (an embedding's) takes ~30 ms instead of ~110 ms. It
rounds every operation as written (IEEE, no FMA), so its values are a function of the
inputs alone — the same for any thread count or bucket — but they may differ from the
ATen chain's by an ulp (ATen contracts its multiply-adds and its sqrt is not IEEE's).

q8/q4 (`adam_blockwise_step`):

The reference path (`fmt.read` → `rules/adamw.py` → `fmt.write`) is ~20 passes over memory
per step. This is five, over slices of 64K values whose fp32 moments stay in L2 between
them (the two C passes are `cpu_blockwise.py`'s):

  1. C:        M = (code[c]·absmax)·β1,  V = (code[c]·absmax)·β2
               (the reference's dequantize, then `mul_(β)`: two roundings, as there)
  2. PyTorch:  M.add_(G, alpha=1−β1);  V.addcmul_(G, G, value=1−β2);  R = V.sqrt()
               These stay ATen ops: ATen fuses their multiply-adds (14 % of addcmul's
               results differ from product-then-add when V ~ (1−β2)·G²) and its float
               sqrt is not IEEE's (1 ulp off on 0.6 % of values), and how it rounds
               may depend on the CPU's vector width; the same op on the same values is
               the one way to round as the reference on every machine.
  3. C:        N = (M / (R + ε))·step_size from the fp32 moments (what the reference
               returns), then both moments requantized in place (absmax, nearest code).

Slicing keeps each element where the whole-tensor op has it: on one thread ATen runs an
op as one loop, vector body from its start, scalar tail at its end; slices start at
multiples of 256 values (a multiple of any vector width) and only the last one is short,
so every element falls in the body or the tail as in the whole-tensor op. With several
threads ATen splits an op at ceil(n/threads), so there the whole tensor is one slice and
the C passes are split over a thread pool instead. (On this machine's build ATen's tails
round as its bodies and the slices would match under threads too, but that is not
something to rely on.) Step 3's add, divide and multiply are single IEEE
operations in ATen too, and the C has no multiply-add to contract and no fast-math, so N,
the codes and the absmax are bit-identical to the reference's
(tests/kernels/test_kernels_cpu_blockwise.py).
"""
from __future__ import annotations

import ctypes
import threading

import torch

from . import cpu_blockwise
from .cpu_out import reusable_empty
from .qmaps import tables

# values per slice on one thread (a multiple of 256): the slices of M, V, √V and G
# (4 × 256 KiB) stay in L2 between the five passes, and the fp32 temporaries are 3 × 256 KiB
# instead of 3 × the moment (at 16M values 3 × 64 MiB, freshly page-faulted every step)
SLICE = 1 << 16


_LOCAL = threading.local()


def _scratch(numel: int) -> tuple[torch.Tensor, ...]:
    """Three fp32 buffers of `numel` values, views of this thread's own three, which are
    made once (and grown if `numel` outgrows them): a step over many small moments must
    not allocate and page-fault 3 × 256 KiB afresh for each (at 60M a step has 174)."""
    buffers = getattr(_LOCAL, "buffers", None)
    if buffers is None or buffers[0].numel() < numel:
        buffers = _LOCAL.buffers = tuple(torch.empty(numel, dtype=torch.float32) for _ in range(3))
    return tuple(t[:numel] for t in buffers)


def adam_dense_step(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, step_size):
    """The fp32 direction with both fp32 moments updated in place by the C pass, or None
    where it does not apply (GRADPROJ_KERNELS≠auto, not CPU, no compiler, or not three
    contiguous fp32 tensors of one shape: the caller's reference then runs)."""
    tensors = (grad, exp_avg, exp_avg_sq)
    if not (all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == grad.shape
                for t in tensors) and cpu_blockwise.active(*tensors)):
        return None
    out = reusable_empty(tuple(grad.shape))  # cpu_out.py: not page-faulted anew each step
    n = grad.numel()
    cpu_blockwise.run_blocks(cpu_blockwise.library().gp_adam_dense, n, 256, 0, -(-n // 256),
                             tuple(t.data_ptr() for t in (*tensors, out)),
                             (beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, step_size))
    return out


def adam_blockwise_step(bits, grad, m_codes, m_absmax, v_codes, v_absmax, beta1, beta2, eps,
                        step_size):
    """The fp32 direction with codes/absmax updated in place, or None where the C path does
    not apply (GRADPROJ_KERNELS≠auto, not CPU, no compiler, or a layout that is not the
    format's: the caller's reference then runs and reports any problem itself)."""
    n = grad.numel()
    if not (cpu_blockwise.active(grad, m_codes, v_codes, m_absmax, v_absmax)
            and cpu_blockwise.fits(m_codes, m_absmax, bits, n)
            and cpu_blockwise.fits(v_codes, v_absmax, bits, n)):
        return None
    block = cpu_blockwise.BLOCKS[bits]
    out = reusable_empty(tuple(grad.shape))  # cpu_out.py: not page-faulted anew each step
    single = torch.get_num_threads() == 1 and grad.dtype == torch.float32 and grad.is_contiguous()
    if single:  # slices of SLICE values (they start on block boundaries: SLICE % 256 == 0)
        chunk, g = SLICE, grad.reshape(-1)
        m_buf, v_buf, r_buf = _scratch(chunk)
    else:  # ATen splits each op over threads: only whole-tensor ops round as the reference
        chunk, g = n, grad
        m_buf, v_buf, r_buf = (torch.empty(grad.shape, dtype=torch.float32) for _ in range(3))
    lib = cpu_blockwise.library()
    if bits == 8:
        dequantize, finish = lib.gp_q8_dequantize, lib.gp_adam_q8_finish
        m_map = ctypes.byref(cpu_blockwise.codebook(8, True)[0])
        v_map = ctypes.byref(cpu_blockwise.codebook(8, False)[0])
    else:
        dequantize, finish = lib.gp_q4_dequantize, lib.gp_adam_q4_finish
        m_map, v_map = tables(4, True, "cpu")[1].data_ptr(), tables(4, False, "cpu")[1].data_ptr()
    m_code, v_code = tables(bits, True, "cpu")[0].data_ptr(), tables(bits, False, "cpu")[0].data_ptr()
    state = (m_codes.data_ptr(), m_absmax.data_ptr(), v_codes.data_ptr(), v_absmax.data_ptr())
    buffers = (m_buf.data_ptr(), v_buf.data_ptr(), r_buf.data_ptr())
    # one thread: the C functions are called directly (run_blocks would not split the
    # work, and its checks cost ~10 µs a call: ~5 % of a 64K-value slice)
    call = (lambda fn, numel, _block, b0, b1, floats, rest: fn(numel, b0, b1, *floats, *rest)) \
        if single else cpu_blockwise.run_blocks
    m, v, root = m_buf, v_buf, r_buf
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        b0, b1 = start // block, -(-stop // block)
        if single and stop - start < chunk:  # the last (or only), short slice
            m, v, root = m_buf[:stop - start], v_buf[:stop - start], r_buf[:stop - start]
        sliced = g[start:stop] if single else g
        call(dequantize, n, block, b0, b1, (buffers[0],), (state[0], state[1], m_code, beta1))
        call(dequantize, n, block, b0, b1, (buffers[1],), (state[2], state[3], v_code, beta2))
        m.add_(sliced, alpha=1.0 - beta1)
        v.addcmul_(sliced, sliced, value=1.0 - beta2)
        torch.sqrt(v, out=root)
        call(finish, n, block, b0, b1, (*buffers, out.data_ptr() + 4 * start),
             (eps, step_size, m_map, v_map, *state))
    return out
