"""Interpreter lane: the fused Sophia kernel against its reference."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from kernel_helpers import STORAGE_DTYPES, U, assert_within, size_strategy, storage_rounding

from quantized_cases import sophia_case

from gradproj.kernels.sophia import sophia_step, sophia_step_ref

pytestmark = pytest.mark.interpreter


@settings(max_examples=20, deadline=None)
@given(n=size_strategy, storage=st.sampled_from(STORAGE_DTYPES),
       rho=st.sampled_from([0.04, 1.0, 0.0]), hutchinson=st.booleans(),
       seed=st.integers(0, 2 ** 31 - 1))
@example(n=1, storage=torch.float32, rho=0.04, hutchinson=False, seed=0)
@example(n=1025, storage=torch.bfloat16, rho=0.04, hutchinson=True, seed=1)
def test_sophia_step_matches_reference(n, storage, rho, hutchinson, seed):
    gen = torch.Generator().manual_seed(seed)
    beta1, eps = 0.965, 1e-15
    grad = torch.randn(n, generator=gen)
    m0 = (torch.randn(n, generator=gen) * 0.1).to(storage)
    # GNB's h is >= 0; Hutchinson's may be negative (max(ρ·h, ε) then gives ε); some zeros
    h0 = torch.randn(n, generator=gen) * 2.0
    h0 = (h0 if hutchinson else h0.abs()) * (torch.rand(n, generator=gen) > 0.1)
    h0 = h0.to(storage)
    m_k, m_r, h_k = m0.clone(), m0.clone(), h0.clone()
    d_k = sophia_step(grad, m_k, h_k, beta1, rho, eps)
    d_r = sophia_step_ref(grad, m_r, h0.clone(), beta1, rho, eps)
    u = U[torch.float32]
    m32 = m0.double()
    m_fp32 = m32 * beta1 + (1 - beta1) * grad.double()
    # M: two roundings of its terms' sum (the kernel may fuse the multiply-add)
    err_m = 2 * u * ((beta1 * m32).abs() + ((1 - beta1) * grad.double()).abs())
    # N = clip(M / D, 1) with the same D = max(fl(ρ·h), ε) in both: |ΔM|/D plus one
    # division rounding each; the clip is 1-Lipschitz
    den = (h0.double() * rho).float().double().clamp(min=eps)
    bound = err_m / den + 2 * u * (m_fp32.abs() / den).clamp(max=1.0)
    assert_within(d_k, d_r, bound, "direction")
    # where |M| exceeds D by more than M's rounding both clip to exactly sign(M); the bound
    # above says nothing there when D = ε (h ≤ 0: err_m / ε is huge), and that is where
    # max(ρ·h, ε) and the official ρ·h + ε differ: the latter flips the sign for ρ·h < −ε
    clipped = (m_fp32.abs() - err_m) > den * (1 + 4 * u)
    assert torch.equal(d_k[clipped], torch.sign(m_fp32[clipped]).float())
    assert (d_k.abs() <= 1).all() and d_k.dtype == torch.float32
    assert_within(m_k.float(), m_r.float(), err_m + 2 * storage_rounding(m_fp32, storage), "exp_avg")
    assert torch.equal(h_k, h0)  # H is read, never written


@pytest.mark.parametrize("bits", [8, 4])
@settings(max_examples=12, deadline=None)
@given(n=size_strategy, rho=st.sampled_from([0.04, 1.0, 0.0]), h_kind=st.sampled_from(
    ["gnb", "hutchinson", "zero"]), seed=st.integers(0, 2 ** 31 - 1))
@example(n=4097, rho=0.04, h_kind="gnb", seed=0)
@example(n=129, rho=0.04, h_kind="hutchinson", seed=1)
@example(n=300, rho=0.04, h_kind="zero", seed=2)
def test_fused_quantized_sophia_matches_reference(bits, n, rho, h_kind, seed):
    """8-bit and 4-bit M and H (H as the rule stores it: the unsigned map) against
    dequantize → `sophia_step_ref` → quantize M in PyTorch; H's codes are never written."""
    sophia_case(bits, n, rho, h_kind, seed)
