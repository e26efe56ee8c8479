"""Interpreter lane: 8-bit and 4-bit codecs and fused quantized Adam against references."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_helpers import (STORAGE_DTYPES, adam_direction_bound, adam_moment_bounds,
                            assert_within, check_requantized, size_strategy)

from gradproj.kernels import adam_q4, adam_q8, q4, q8

pytestmark = pytest.mark.interpreter


def _values(n, signed, dtype, gen):
    x = torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))
    return (x if signed else x.abs()).to(dtype)


@settings(max_examples=15, deadline=None)
@given(n=size_strategy, signed=st.booleans(), dtype=st.sampled_from(STORAGE_DTYPES),
       seed=st.integers(0, 2 ** 31 - 1))
@example(n=257, signed=True, dtype=torch.float32, seed=0)
def test_q8_codec_matches_reference(n, signed, dtype, seed):
    x = _values(n, signed, dtype, torch.Generator().manual_seed(seed))
    codes, absmax = q8.q8_quantize(x, signed)
    codes_r, absmax_r = q8.q8_quantize_ref(x, signed)
    # same fp32 input, same IEEE ops (division by div_rn, one multiply): bit-identical
    assert torch.equal(absmax, absmax_r) and torch.equal(codes, codes_r)
    assert codes.shape == x.shape and absmax.numel() == -(-n // 256)
    assert torch.equal(q8.q8_dequantize(codes, absmax, signed),
                       q8.q8_dequantize_ref(codes, absmax, signed))


@settings(max_examples=15, deadline=None)
@given(n=size_strategy, signed=st.booleans(), dtype=st.sampled_from(STORAGE_DTYPES),
       seed=st.integers(0, 2 ** 31 - 1))
@example(n=129, signed=False, dtype=torch.float32, seed=0)
def test_q4_codec_matches_reference(n, signed, dtype, seed):
    x = _values(n, signed, dtype, torch.Generator().manual_seed(seed))
    codes, absmax = q4.q4_quantize(x, signed)
    codes_r, absmax_r = q4.q4_quantize_ref(x, signed)
    assert torch.equal(absmax, absmax_r) and torch.equal(codes, codes_r)
    assert codes.numel() == -(-n // 128) * 64
    assert torch.equal(q4.q4_dequantize(codes, absmax, signed, (n,)),
                       q4.q4_dequantize_ref(codes, absmax, signed, (n,)))


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=12, deadline=None)
@given(n=size_strategy, step=st.integers(1, 1000), seed=st.integers(0, 2 ** 31 - 1))
@example(n=4097, step=1, seed=0)
def test_fused_quantized_adam_matches_reference(bits, n, step, seed):
    gen = torch.Generator().manual_seed(seed)
    codec, fused = (q8, adam_q8) if bits == 8 else (q4, adam_q4)
    quant = codec.q8_quantize_ref if bits == 8 else codec.q4_quantize_ref
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step_size = (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
    grad = torch.randn(n, generator=gen) * 1e-2
    state = [*quant(torch.randn(n, generator=gen) * 1e-2, True),
             *quant(torch.rand(n, generator=gen) * 1e-4, False)]
    ref_state = [t.clone() for t in state]
    step_fn = fused.adam_q8_step if bits == 8 else fused.adam_q4_step
    ref_fn = fused.adam_q8_step_ref if bits == 8 else fused.adam_q4_step_ref
    d = step_fn(grad, *state, beta1, beta2, eps, step_size)
    # the fp32 moments the reference computes before requantizing
    deq = codec.q8_dequantize_ref if bits == 8 else (
        lambda c, a, s: codec.q4_dequantize_ref(c, a, s, (n,)))
    m0, v0 = deq(ref_state[0], ref_state[1], True), deq(ref_state[2], ref_state[3], False)
    d_r = ref_fn(grad, *ref_state, beta1, beta2, eps, step_size)
    m = m0 * beta1 + (1 - beta1) * grad
    v = v0 * beta2 + (1 - beta2) * grad * grad
    err_m, err_v = adam_moment_bounds(grad, m0, v0, beta1, beta2)
    assert_within(d, d_r, adam_direction_bound(m, v, err_m, err_v, eps, step_size), "direction")
    block = 256 if bits == 8 else 128
    check_requantized(state[0], state[1], ref_state[0], ref_state[1], m, err_m, bits, True, block)
    check_requantized(state[2], state[3], ref_state[2], ref_state[3], v, err_v, bits, False, block)
