"""The dense fp32 Adam pass on CPU (`cpu_adam.adam_dense_step`, C `gp_adam_dense`).

Held bit for bit to Adam written out in numpy float32 (`kernel_helpers.adam_fp32_ops`: one
rounding per operation, as the C is compiled), for any size, hyper-parameters and thread
count; and checked to be what `adam_step` runs on CPU in auto mode, and not in reference mode.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_helpers import adam_fp32_ops, size_strategy

import gradproj as gp
from gradproj.kernels import cpu_adam, cpu_blockwise
from gradproj.kernels.adam import adam_step, adam_step_ref

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the CPU fast path is not built")

betas = st.floats(0.0, 0.9999)


def _state(n, seed, v_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(n, generator=gen)
    return g, torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * v_scale


@settings(max_examples=60, deadline=None)
@given(n=size_strategy, seed=st.integers(0, 2 ** 16), beta1=betas, beta2=betas,
       eps=st.sampled_from([0.0, 1e-8, 1e-6, 1e-3]), step_size=st.floats(1e-4, 10.0),
       v_scale=st.sampled_from([1e-8, 2e-3, 1.0]))
def test_dense_pass_is_fp32_adam_op_by_op(n, seed, beta1, beta2, eps, step_size, v_scale):
    """Direction and both moments equal the op-by-op numpy float32 Adam exactly (v_scale
    2e-3: V ~ (1−β2)·G², where a fused multiply-add would round differently)."""
    g, m, v = _state(n, seed, v_scale)
    m_ref, v_ref = m.clone(), v.clone()
    d = cpu_adam.adam_dense_step(g, m, v, beta1, beta2, eps, step_size)
    expected = adam_fp32_ops(g, m_ref, v_ref, beta1, beta2, eps, step_size)
    assert torch.equal(d, expected) and torch.equal(m, m_ref) and torch.equal(v, v_ref)


def test_dense_pass_does_not_depend_on_threads_or_slices(monkeypatch):
    """3 threads over a pool split at 1024 values give the one-thread bits; so does each
    half of a stack stepped on its own (a bucket against one weight at a time)."""
    monkeypatch.setattr(cpu_blockwise, "CHUNK_ELEMENTS", 1024)
    n = 3 * 4096 + 77
    g, m, v = _state(n, 3)
    one = [t.clone() for t in (m, v)]
    d_one = cpu_adam.adam_dense_step(g, *one, 0.9, 0.999, 1e-8, 0.3).clone()
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = [t.clone() for t in (m, v)]
        d_three = cpu_adam.adam_dense_step(g, *three, 0.9, 0.999, 1e-8, 0.3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(d_one, d_three) and all(map(torch.equal, one, three))
    half = n // 2 + 3  # a slice starting off any vector boundary
    parts = [cpu_adam.adam_dense_step(g[s].contiguous(), m[s].clone(), v[s].clone(),
                                      0.9, 0.999, 1e-8, 0.3).clone()
             for s in (slice(0, half), slice(half, n))]
    assert torch.equal(torch.cat(parts), d_one)


def test_adam_step_takes_the_pass_in_auto_mode_only(monkeypatch):
    """fp32 CPU moments: `adam_step` is the C pass in auto mode and the reference chain
    in reference mode; bf16 moments and non-contiguous ones stay on the reference."""
    g, m, v = _state(5000, 4)
    for mode, expected in (("auto", adam_fp32_ops), ("reference", adam_step_ref)):
        monkeypatch.setenv("GRADPROJ_KERNELS", mode)
        ours, theirs = [t.clone() for t in (m, v)], [t.clone() for t in (m, v)]
        d = adam_step(g, *ours, 0.9, 0.999, 1e-6, 0.7)
        assert torch.equal(d, expected(g, *theirs, 0.9, 0.999, 1e-6, 0.7)), mode
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")
    assert cpu_adam.adam_dense_step(g, m.bfloat16(), v.bfloat16(), 0.9, 0.999, 1e-6, 1.0) is None
    wide = torch.zeros(2, 5000)[:, ::2]
    assert cpu_adam.adam_dense_step(wide, wide, wide, 0.9, 0.999, 1e-6, 1.0) is None


def test_optimizer_step_matches_reference_mode_within_rounding(monkeypatch):
    """LowRankOptimizer, 5 steps with a refresh, a projected and a full-rank weight: the auto
    (C) and reference runs agree to fp32 rounding (the passes differ only in how they
    round: ATen fuses multiply-adds), and a bucket of two equals its weights stepped alone."""
    def run(mode, per_weight=False):
        monkeypatch.setenv("GRADPROJ_KERNELS", mode)
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 96)) for _ in range(2)] + \
                 [torch.nn.Parameter(torch.randn(40, 30)) for _ in range(2)]
        opt = gp.LowRankOptimizer([{"params": params[:2], "rank": 8, "update_gap": 3},
                                   {"params": params[2:]}], lr=1e-2, weight_decay=0.1)
        for step in range(5):
            gen = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if per_weight:
                for p in params:
                    opt.step_param(p)
            else:
                opt.step()
        return [p.detach().clone() for p in params]
    auto, reference, alone = run("auto"), run("reference"), run("auto", per_weight=True)
    for a, r, w in zip(auto, reference, alone):
        assert torch.equal(a, w)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
