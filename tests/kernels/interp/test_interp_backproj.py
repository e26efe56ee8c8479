"""Interpreter lane: the fused back-projection GEMM + update epilogue, and the optimizer's
fused paths (Adam kernels + GEMM) against the reference optimizer."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import U, assert_within

import gradproj as gp
from gradproj.kernels import backproj
from gradproj.kernels.backproj import backproject_update, backproject_update_ref

pytestmark = pytest.mark.interpreter


@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 150), n=st.integers(1, 150), r=st.integers(1, 40),
       side=st.sampled_from(["left", "right"]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       weight_decay=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 2 ** 31 - 1))
def test_backproject_update_matches_reference(m, n, r, side, dtype, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen).to(dtype)
    basis = torch.randn(m if side == "left" else n, r, generator=gen).to(dtype)
    low = torch.randn(*((r, n) if side == "left" else (m, r)), generator=gen)
    lr, scale = 0.01, 0.25
    w_k, w_r = weight.clone(), weight.clone()
    backproject_update(w_k, basis, low, side, lr, scale, weight_decay)
    backproject_update_ref(w_r, basis, low, side, lr, scale, weight_decay)
    # GEMM bound γ_r·|P|·|N| (r-long fp32 reduction), carried through α and lr; then the
    # epilogue's 3 roundings to the weight's dtype (U's cast, the update, the decay): where
    # the fp32 values differ, each may land one ulp (≤ 2u·|x|) apart
    p, q = (basis.float(), low) if side == "left" else (low, basis.float().T)
    exact = (p.double() @ q.double()).abs()
    gemm = (r + 2) * U[torch.float32] * (p.abs().double() @ q.abs().double())
    w1 = w_r.double().abs() + lr * scale * exact
    bound = lr * scale * (gemm + 2 * U[dtype] * exact) + 2 * 2 * U[dtype] * w1
    assert_within(w_k.float(), w_r.float(), bound, f"weight ({side}, {dtype})")


def _sync(dst_opt, dst_params, src_opt, src_params):
    with torch.no_grad():
        for d, s in zip(dst_params, src_params):
            d.copy_(s)
    dst_opt.load_state_dict(copy.deepcopy(src_opt.state_dict()))


@pytest.mark.parametrize("state_format", ["fp32", "bf16", "q8", "q4"])
def test_optimizer_fused_path_matches_reference_step(state_format, monkeypatch):
    """LowRankOptimizer with Triton (interpreted: fused Adam + fused GEMM) against the
    reference path, each step taken from the same weights and state, on a 96×160 projected
    weight (2560 moments: the dense fallback of q8/q4) and a full-rank 64×128 one (8192
    moments: quantized)."""
    beta1, beta2, lr, scale, rank = 0.9, 0.999, 1e-2, 0.25, 16
    opts, params = {}, {}
    for mode in ("interpret", "reference"):
        torch.manual_seed(1)
        params[mode] = [torch.nn.Parameter(torch.randn(96, 160)), torch.nn.Parameter(torch.randn(64, 128))]
        opts[mode] = gp.LowRankOptimizer(
            [{"params": params[mode][:1], "rank": rank, "update_gap": 2}, {"params": params[mode][1:]}],
            lr=lr, weight_decay=0.1, scale=scale, betas=(beta1, beta2), state_format=state_format)
    # |N| = s·|M|/(√V+ε) ≤ (1−β1)/√((1−β2)(1−β1²/β2)) for any gradient sequence (Cauchy–
    # Schwarz on the two EMAs; s ≤ 1); the kernels bound ΔN by 8u·|N| (test_interp_adam) and
    # the GEMM adds (r+2)u; a step then rounds W 3 times (the decay included)
    fused = []
    real = backproj.backproject_update
    monkeypatch.setattr(backproj, "backproject_update", lambda *a: fused.append(1) or real(*a))
    u = U[torch.float32]
    n_max = (1 - beta1) / ((1 - beta2) * (1 - beta1 ** 2 / beta2)) ** 0.5
    for step in range(4):
        gen = torch.Generator().manual_seed(step)
        grads = [torch.randn(p.shape, generator=gen) for p in params["reference"]]
        if step:
            _sync(opts["interpret"], params["interpret"], opts["reference"], params["reference"])
        for mode in ("interpret", "reference"):
            monkeypatch.setenv("GRADPROJ_KERNELS", mode)
            for p, g in zip(params[mode], grads):
                p.grad = g.clone()
            opts[mode].step()
        w_ref = [p.detach() for p in params["reference"]]
        state = opts["reference"].state[params["reference"][0]]
        basis = state["proj_left" if "proj_left" in state else "proj_right"].abs().max().item()
        low_rank = lr * scale * rank * basis * n_max * (rank + 2 + 8) * u
        for got, want, extra in zip(params["interpret"], w_ref, (low_rank, lr * n_max * 8 * u)):
            assert_within(got.detach(), want, extra + 6 * u * want.abs().double(),
                          f"{state_format} step {step}")
    assert len(fused) == 4  # the interpreted run took the fused GEMM at every step
