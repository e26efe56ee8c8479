"""Interpreter lane: the fused diffGrad kernel against its reference."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_helpers import (STORAGE_DTYPES, U, adam_direction_bound, adam_moment_bounds,
                            assert_within, size_strategy, storage_rounding)

from quantized_cases import diffgrad_case

from gradproj.kernels.diffgrad import diffgrad_step, diffgrad_step_ref

pytestmark = pytest.mark.interpreter


@settings(max_examples=20, deadline=None)
@given(n=size_strategy, storage=st.sampled_from(STORAGE_DTYPES), step=st.integers(1, 10_000),
       seed=st.integers(0, 2 ** 31 - 1))
@example(n=1, storage=torch.float32, step=1, seed=0)
@example(n=1025, storage=torch.bfloat16, step=1, seed=1)
def test_diffgrad_step_matches_reference(n, storage, step, seed):
    gen = torch.Generator().manual_seed(seed)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    grad = torch.randn(n, generator=gen)
    m0 = (torch.randn(n, generator=gen) * 0.1).to(storage)
    v0 = (torch.rand(n, generator=gen) * 0.01).to(storage)
    p0 = (grad + torch.randn(n, generator=gen) * torch.rand(n, generator=gen) * 3).to(storage)
    step_size = (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
    ours, ref = [x.clone() for x in (m0, v0, p0)], [x.clone() for x in (m0, v0, p0)]
    d_k = diffgrad_step(grad, *ours, beta1, beta2, eps, step_size)
    d_r = diffgrad_step_ref(grad, *ref, beta1, beta2, eps, step_size)
    err_m, err_v = adam_moment_bounds(grad, m0.float(), v0.float(), beta1, beta2)
    m = m0.float() * beta1 + (1 - beta1) * grad
    v = v0.float() * beta2 + (1 - beta2) * grad * grad
    delta = (p0.float() - grad).abs().double()
    adam_n = (step_size * m.abs() / (v.sqrt() + eps)).double()
    # ξ ∈ [½, 1) scales Adam's bound down; ξ's own error: |Δ| rounded once (ξ moves by at
    # most half of that, relative), exp, 1 + e and the division: 4 roundings
    bound = adam_direction_bound(m, v, err_m, err_v, eps, step_size) + (4 + delta) * U[torch.float32] * adam_n
    assert_within(d_k, d_r, bound, "direction")
    assert_within(ours[0].float(), ref[0].float(), err_m + 2 * storage_rounding(m, storage), "exp_avg")
    assert_within(ours[1].float(), ref[1].float(), err_v + 2 * storage_rounding(v, storage), "exp_avg_sq")
    # G_prev ← G: the same fp32 G rounded to storage once in each (the interpreter's
    # fp32 → bf16 cast need not round to nearest even as torch's does)
    assert_within(ours[2].float(), ref[2].float(), 2 * storage_rounding(grad, storage), "previous_grad")
    if storage == torch.float32:
        assert torch.equal(ours[2], grad)
    assert ours[2].dtype == storage and d_k.dtype == torch.float32


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=12, deadline=None)
@given(n=size_strategy, step=st.integers(1, 1000), seed=st.integers(0, 2 ** 31 - 1))
@example(n=4097, step=1, seed=0)
@example(n=129, step=3, seed=1)
def test_fused_quantized_diffgrad_matches_reference(bits, n, step, seed):
    """8-bit and 4-bit: three blockwise states (M, V, G_prev) against dequantize →
    `diffgrad_step_ref` → quantize in PyTorch."""
    diffgrad_case(bits, n, step, seed)
