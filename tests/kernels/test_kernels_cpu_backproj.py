"""CPU lane: the fused back-projection (`W.addmm_`, kernels/backproj.py) against its reference,
and the optimizer taking it exactly where the kernel says it pays."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import U, assert_within

import gradproj as gp
from gradproj.kernels import backproj, cpu_adam
from gradproj.kernels.backproj import CPU_FUSE_MIN_NUMEL, backproject_update, backproject_update_ref


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")


@settings(max_examples=10, deadline=None)
@given(m=st.integers(64, 400), n=st.integers(64, 400), r=st.integers(1, 48),
       side=st.sampled_from(["left", "right"]), weight_decay=st.sampled_from([0.0, 0.1]),
       seed=st.integers(0, 2 ** 31 - 1))
def test_cpu_fused_backprojection_matches_reference(m, n, r, side, weight_decay, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(m, n, generator=gen)
    basis = torch.randn(m if side == "left" else n, r, generator=gen)
    low = torch.randn(*((r, n) if side == "left" else (m, r)), generator=gen)
    lr, scale = 0.01, 0.25
    assert backproj.fuses(weight, basis, low) == (m * n >= CPU_FUSE_MIN_NUMEL)
    w_k, w_r = weight.clone(), weight.clone()
    backproject_update(w_k, basis, low, side, lr, scale, weight_decay)
    backproject_update_ref(w_r, basis, low, side, lr, scale, weight_decay)
    # the r-long fp32 GEMM (γ_r·|P|·|N|) carried through α·lr, then at most three
    # roundings of W-sized values (α·product, the add, the decay) on either side
    p, q = (basis, low) if side == "left" else (low, basis.T)
    exact = (p.double() @ q.double()).abs()
    gemm = (r + 2) * U[torch.float32] * (p.abs().double() @ q.abs().double())
    w1 = w_r.double().abs() + lr * scale * exact
    bound = lr * scale * (gemm + 2 * U[torch.float32] * exact) + 2 * 2 * U[torch.float32] * w1
    assert_within(w_k, w_r, bound, f"weight ({side}, {m}x{n} r{r})")


def test_reference_mode_and_small_or_bf16_weights_keep_the_reference(monkeypatch):
    basis, low = torch.randn(300, 8), torch.randn(8, 300)
    assert backproj.fuses(torch.zeros(300, 300), basis, low)
    assert not backproj.fuses(torch.zeros(200, 300), basis, low)   # 60000 < 65536 values
    assert not backproj.fuses(torch.zeros(300, 300, dtype=torch.bfloat16), basis, low)
    monkeypatch.setenv("GRADPROJ_KERNELS", "reference")
    assert not backproj.fuses(torch.zeros(300, 300), basis, low)
    w = torch.randn(300, 300)
    w_k, w_r = w.clone(), w.clone()
    backproject_update(w_k, basis, low, "left", 0.1, 0.25, 0.1)
    backproject_update_ref(w_r, basis, low, "left", 0.1, 0.25, 0.1)
    assert torch.equal(w_k, w_r)


def test_optimizer_fuses_large_drop_weights_only(monkeypatch):
    """A 300×300 projected weight takes the fused call, a 64×64 one the bucket's batched
    matmul; the fused step agrees with the reference mode's step within the GEMM bound.
    Adam takes its reference chain in both modes (its C pass rounds differently), so
    the 64×64 weight's two steps must agree bit for bit."""
    monkeypatch.setattr(cpu_adam, "adam_dense_step", lambda *args: None)
    calls = []
    real = backproj.backproject_update
    monkeypatch.setattr(backproj, "backproject_update", lambda w, *a: calls.append(w.shape) or real(w, *a))
    results = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("GRADPROJ_KERNELS", mode)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(300, 300)), torch.nn.Parameter(torch.randn(64, 64))]
        opt = gp.LowRankOptimizer([{"params": params, "rank": 8, "update_gap": 2}], lr=1e-2,
                                  weight_decay=0.1, scale=0.25)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results[mode] = [p.detach().clone() for p in params]
    assert calls == [torch.Size([300, 300])] * 3
    assert torch.equal(results["auto"][1], results["reference"][1])
    # the gradients do not depend on the weights, so both runs see the same directions N
    # (|N| ≤ n_max, Cauchy–Schwarz on Adam's EMAs) and orthonormal bases (|P| ≤ 1): each
    # step differs by the GEMM bound and ≤ 4 roundings of W-sized values, over 3 steps
    u, lr_scale, r, (beta1, beta2) = U[torch.float32], 1e-2 * 0.25, 8, (0.9, 0.999)
    n_max = (1 - beta1) / ((1 - beta2) * (1 - beta1 ** 2 / beta2)) ** 0.5
    update = lr_scale * r * n_max
    bound = 3 * (4 * u * (results["reference"][0].double().abs() + update) + (r + 2) * u * update)
    assert_within(results["auto"][0], results["reference"][0], bound, "fused 300x300 weight")
