"""Interpreter lane: Lion, the INT8 stochastic-rounding codec and the INT4 basis codec."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_helpers import STORAGE_DTYPES, U, assert_within, size_strategy, storage_rounding

from gradproj.kernels import int4, int8_sr, lion

pytestmark = pytest.mark.interpreter


@settings(max_examples=15, deadline=None)
@given(n=size_strategy, storage=st.sampled_from(STORAGE_DTYPES),
       betas=st.sampled_from([(0.9, 0.99), (0.95, 0.98), (0.3, 0.9)]),
       seed=st.integers(0, 2 ** 31 - 1))
@example(n=1, storage=torch.float32, betas=(0.9, 0.99), seed=0)
def test_lion_matches_reference(n, storage, betas, seed):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(n, generator=gen)
    m0 = torch.randn(n, generator=gen).to(storage)
    m_k, m_r = m0.clone(), m0.clone()
    d = lion.lion_update(grad, m_k, *betas)
    d_r = lion.lion_update_ref(grad, m_r, *betas)
    u = U[torch.float32]
    beta1, beta2 = betas
    m32 = m0.float().double()
    # signs may differ only where c is within its rounding error (3 roundings) of zero
    c = torch.lerp(grad.double(), m32, beta1)
    near_zero = c.abs() <= 3 * u * (m32.abs() + grad.double().abs())
    assert torch.equal(d[~near_zero], d_r[~near_zero])
    new_m = m32 * beta2 + (1 - beta2) * grad.double()
    bound = 2 * u * ((beta2 * m32).abs() + ((1 - beta2) * grad.double()).abs()) + 2 * storage_rounding(new_m, storage)
    assert_within(m_k.float(), m_r.float(), bound, "exp_avg")


@settings(max_examples=15, deadline=None)
@given(n=size_strategy, group=st.sampled_from([256, 64, 100]), stochastic=st.booleans(),
       dtype=st.sampled_from(STORAGE_DTYPES), seed=st.integers(0, 2 ** 64 - 1))
@example(n=257, group=256, stochastic=True, dtype=torch.float32, seed=2 ** 64 - 1)
def test_int8_sr_matches_reference(n, group, stochastic, dtype, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed % 2 ** 63)).to(dtype)
    codes, scale = int8_sr.int8_sr_quantize(x, seed, group, stochastic)
    codes_r, scale_r = int8_sr.int8_sr_quantize_ref(x, seed, group, stochastic)
    # identical IEEE operations and the same counter-based random bits: bit-identical
    assert torch.equal(scale, scale_r) and torch.equal(codes, codes_r)
    assert torch.equal(int8_sr.int8_dequantize(codes, scale, group),
                       int8_sr.int8_dequantize_ref(codes, scale, group))


@settings(max_examples=15, deadline=None)
@given(n=size_strategy, group=st.sampled_from([256, 64, 2]), shift=st.sampled_from([0.0, 3.0]),
       dtype=st.sampled_from(STORAGE_DTYPES), seed=st.integers(0, 2 ** 31 - 1))
@example(n=3, group=256, shift=3.0, dtype=torch.float32, seed=0)
def test_int4_matches_reference(n, group, shift, dtype, seed):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) + shift).to(dtype)
    codes, scale, minimum = int4.int4_quantize(x, group)
    codes_r, scale_r, minimum_r = int4.int4_quantize_ref(x, group)
    assert torch.equal(scale, scale_r) and torch.equal(minimum, minimum_r)
    assert torch.equal(codes, codes_r)
    y = int4.int4_dequantize(codes, scale, minimum, (n,))
    y_r = int4.int4_dequantize_ref(codes, scale, minimum, (n,))
    # code·scale + minimum: a fused multiply-add rounds once where PyTorch rounds twice
    q_scale = (y_r.double() - minimum.repeat_interleave(group)[:n].double()).abs()
    assert_within(y, y_r, U[torch.float32] * (q_scale + y_r.double().abs()), "dequantized")
