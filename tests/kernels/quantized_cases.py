"""One case of a fused 8-/4-bit diffGrad or Sophia step against its reference, with bounds
derived from rounding (kernel_helpers). The interpreter lane (interp/) runs them on CPU
tensors under TRITON_INTERPRET=1, the GPU lane (test_kernels_quantized_steps.py) on CUDA.

Codes: the states requantized from a value both sides compute identically (diffGrad's
G_prev ← G) and the states only read (Sophia's H) must be identical; M and V, which the
kernel may round differently (a fused multiply-add), must have equal codes or codes one
apart where the reference's scaled value lies within the derived slack of the midpoint
between them (`check_requantized`)."""
import torch
from kernel_helpers import (U, adam_direction_bound, adam_moment_bounds, assert_within,
                            check_requantized)

from gradproj.kernels import diffgrad_q4, diffgrad_q8, q4, q8, sophia_q4, sophia_q8


def _codec(bits, n):
    if bits == 8:
        return q8.q8_quantize_ref, q8.q8_dequantize_ref, 256
    return q4.q4_quantize_ref, (lambda c, a, s: q4.q4_dequantize_ref(c, a, s, (n,))), 128


def diffgrad_case(bits, n, step, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    quant, deq, block = _codec(bits, n)
    step_fn, ref_fn = ((diffgrad_q8.diffgrad_q8_step, diffgrad_q8.diffgrad_q8_step_ref) if bits == 8
                       else (diffgrad_q4.diffgrad_q4_step, diffgrad_q4.diffgrad_q4_step_ref))
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step_size = (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
    grad = torch.randn(n, generator=gen) * 1e-2
    ref_state = [*quant(torch.randn(n, generator=gen) * 1e-2, True),
                 *quant(torch.rand(n, generator=gen) * 1e-4, False),
                 *quant(torch.randn(n, generator=gen) * 1e-2, True)]
    state = [t.to(device, copy=True) for t in ref_state]  # a copy on CPU too
    m0 = deq(ref_state[0], ref_state[1], True)
    v0 = deq(ref_state[2], ref_state[3], False)
    p0 = deq(ref_state[4], ref_state[5], True)
    d = step_fn(grad.to(device), *state, beta1, beta2, eps, step_size).cpu()
    d_r = ref_fn(grad, *ref_state, beta1, beta2, eps, step_size)
    state = [t.cpu() for t in state]
    m = m0 * beta1 + (1 - beta1) * grad
    v = v0 * beta2 + (1 - beta2) * grad * grad
    err_m, err_v = adam_moment_bounds(grad, m0, v0, beta1, beta2)
    adam_n = (step_size * m.abs() / (v.sqrt() + eps)).double()
    delta = (p0 - grad).abs().double()
    # ξ ∈ [½, 1) scales Adam's bound down; ξ's own error: |Δ| rounded once (ξ moves by at
    # most half of that, relative), exp (NVIDIA's ex2.approx within 2 ulp), 1 + e and the
    # division: 4 roundings
    bound = (adam_direction_bound(m, v, err_m, err_v, eps, step_size)
             + (4 + delta) * U[torch.float32] * adam_n)
    assert_within(d, d_r, bound, "direction")
    check_requantized(state[0], state[1], ref_state[0], ref_state[1], m, err_m, bits, True, block)
    check_requantized(state[2], state[3], ref_state[2], ref_state[3], v, err_v, bits, False, block)
    # G_prev ← G is requantized from the same fp32 G in both: identical codes and scales
    assert torch.equal(state[4], ref_state[4]) and torch.equal(state[5], ref_state[5])


def sophia_case(bits, n, rho, h_kind, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    quant, deq, block = _codec(bits, n)
    step_fn, ref_fn = ((sophia_q8.sophia_q8_step, sophia_q8.sophia_q8_step_ref) if bits == 8
                       else (sophia_q4.sophia_q4_step, sophia_q4.sophia_q4_step_ref))
    beta1, eps = 0.965, 1e-15
    grad = torch.randn(n, generator=gen) * 1e-2
    # h ~ B·g² of the gradient's scale (GNB, ≥ 0), or signed (Hutchinson: the unsigned
    # map stores a negative value as its lowest code), or all 0 (before the first estimate)
    h = torch.randn(n, generator=gen) * 1e-2
    h = {"gnb": h * h * 64, "hutchinson": h, "zero": torch.zeros(n)}[h_kind]
    h_codes = quant(h, False)
    ref_state = [*quant(torch.randn(n, generator=gen) * 1e-2, True), *h_codes]
    state = [t.to(device, copy=True) for t in ref_state]  # a copy on CPU too
    m0, h0 = deq(ref_state[0], ref_state[1], True), deq(ref_state[2], ref_state[3], False)
    d = step_fn(grad.to(device), *state, beta1, rho, eps).cpu()
    d_r = ref_fn(grad, *ref_state, beta1, rho, eps)
    state = [t.cpu() for t in state]
    u = U[torch.float32]
    m = m0 * beta1 + (1 - beta1) * grad
    # M: two roundings of its terms' sum (the kernel may fuse the multiply-add)
    err_m = 2 * u * ((beta1 * m0.double()).abs() + ((1 - beta1) * grad.double()).abs())
    # the same D = max(fl(ρ·h), ε) from the same dequantized h in both: |ΔM|/D plus one
    # division rounding each; the clip is 1-Lipschitz, and where |M| − |ΔM| ≥ D(1 + 2u)
    # both quotients are ≥ 1 in magnitude with M's sign, so both clip to exactly ±1
    den = (h0 * rho).double().clamp(min=eps)
    bound = err_m / den + 2 * u * (m.double().abs() / den).clamp(max=1.0)
    bound = torch.where(m.double().abs() - err_m >= den * (1 + 2 * u), 0.0, bound)
    assert_within(d, d_r, bound, "direction")
    assert (d.abs() <= 1).all() and d.dtype == torch.float32
    check_requantized(state[0], state[1], ref_state[0], ref_state[1], m, err_m, bits, True, block)
    # H is only read: its codes and scales are the ones it was given
    assert torch.equal(state[2], h_codes[0]) and torch.equal(state[3], h_codes[1])
