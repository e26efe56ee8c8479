"""Reference lane: dispatch modes, the registry of kernels, and host functions on CPU."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernel_helpers import adam_direction_bound, adam_fp32_ops, adam_moment_bounds, assert_within

import gradproj.kernels  # noqa: F401
from gradproj.kernels import cpu_blockwise, cpu_out, dispatch
from gradproj.kernels.adam import adam_step, adam_step_ref
from gradproj.kernels.backproj import backproject_update
from gradproj.kernels.int8_sr import int8_dequantize, int8_sr_quantize, sr_uniform_ref
from gradproj.registry import KERNELS


def test_modes(monkeypatch):
    cpu = torch.zeros(3)
    for mode in ("auto", "reference", ""):
        monkeypatch.setenv(dispatch.ENV, mode)
        assert dispatch.use_triton(cpu) is False  # CPU tensors never run Triton in auto
    monkeypatch.setenv(dispatch.ENV, "cuda")
    with pytest.raises(ValueError, match="GRADPROJ_KERNELS must be one of"):
        dispatch.use_triton(cpu)
    if not dispatch.interpreting():
        monkeypatch.setenv(dispatch.ENV, "interpret")
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            dispatch.use_triton(cpu)


def test_every_kernel_is_registered_with_host_and_reference():
    expected = {"adam_step", "adam_q8_step", "adam_q4_step", "q8_quantize", "q8_dequantize",
                "q4_quantize", "q4_dequantize", "int4_quantize", "int4_dequantize",
                "int8_sr_quantize", "int8_dequantize", "lion_update", "backproject_update",
                "diffgrad_step", "diffgrad_q8_step", "diffgrad_q4_step", "sophia_step",
                "sophia_q8_step", "sophia_q4_step"}
    assert expected <= set(KERNELS.names())
    for entry in KERNELS:
        assert entry.description and entry.obj.reference.__name__.endswith("_ref")


def test_cpu_adam_step_is_adam_spelled_out():
    """On CPU `adam_step` runs its reference, the direction into a reused buffer; both
    are checked against Adam written out in float64 here, with the kernel
    helpers' rounding bounds: M ← β1·M + (1−β1)·G, V ← β2·V + (1−β2)·G²,
    N = s·M/(√V + ε), moments updated in place."""
    gen = torch.Generator().manual_seed(0)
    g, m, v = torch.randn(300, generator=gen), torch.randn(300, generator=gen), torch.rand(300, generator=gen)
    b1, b2, eps, s = 0.9, 0.999, 1e-6, 0.5
    m_exact = b1 * m.double() + (1 - b1) * g.double()
    v_exact = b2 * v.double() + (1 - b2) * g.double() ** 2
    n_exact = s * m_exact / (v_exact.sqrt() + eps)
    err_m, err_v = adam_moment_bounds(g, m, v, b1, b2)
    for step in (adam_step, adam_step_ref):
        m1, v1 = m.clone(), v.clone()
        n = step(g, m1, v1, b1, b2, eps, s)
        assert_within(m1, m_exact, err_m, "exp_avg")
        assert_within(v1, v_exact, err_v, "exp_avg_sq")
        assert_within(n, n_exact, adam_direction_bound(m_exact, v_exact, err_m, err_v, eps, s), "direction")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_adam_step_writes_half_precision_moments_back(dtype):
    """bf16/fp16 moments (the dense bf16 state format) are stepped in fp32 and stored
    rounded: each new moment is the float64 Adam moment of the stored one, rounded to the
    dtype (within one of its ulps), and the direction uses the fp32 values before rounding."""
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(300, generator=gen)
    m, v = torch.randn(300, generator=gen).to(dtype), torch.rand(300, generator=gen).to(dtype)
    b1, b2, eps, s = 0.9, 0.999, 1e-6, 0.5
    m_exact = b1 * m.double() + (1 - b1) * g.double()
    v_exact = b2 * v.double() + (1 - b2) * g.double() ** 2
    ulp = torch.finfo(dtype).eps
    for step in (adam_step, adam_step_ref):
        m1, v1 = m.clone(), v.clone()
        n = step(g, m1, v1, b1, b2, eps, s)
        assert m1.dtype == v1.dtype == dtype
        assert ((m1.double() - m_exact).abs() <= ulp * m_exact.abs() + 1e-6).all(), "exp_avg"
        assert ((v1.double() - v_exact).abs() <= ulp * v_exact.abs() + 1e-9).all(), "exp_avg_sq"
        n_exact = s * m_exact / (v_exact.sqrt() + eps)
        assert ((n.double() - n_exact).abs() <= 1e-4 * n_exact.abs() + 1e-6).all(), "direction"


def test_cpu_adam_step_reuses_its_buffer_only_when_free_and_matches_the_reference():
    """Above cpu_out.MIN_NUMEL the fp32 CPU step writes its direction into a kept buffer:
    bit-identical over 3 steps to what it computes (the C pass's op-by-op fp32 Adam, or
    without a compiler the reference chain); a dropped direction's buffer is handed out
    again, one still held (or a view of it) is not overwritten."""
    n = cpu_out.MIN_NUMEL + 300
    gen = torch.Generator().manual_seed(1)
    m, v = torch.randn(n, generator=gen), torch.rand(n, generator=gen)
    m_ref, v_ref = m.clone(), v.clone()
    expected = adam_fp32_ops if cpu_blockwise.library() is not None else adam_step_ref
    pointers = []
    for step in range(3):
        g = torch.randn(n, generator=gen)
        n_ref = expected(g, m_ref, v_ref, 0.9, 0.999, 1e-6, 0.5 + step)
        d = adam_step(g, m, v, 0.9, 0.999, 1e-6, 0.5 + step)
        assert torch.equal(d, n_ref) and torch.equal(m, m_ref) and torch.equal(v, v_ref)
        pointers.append(d.data_ptr())
        del d
    assert len(set(pointers)) == 1  # one buffer, page-faulted once
    held = adam_step(g, m, v, 0.9, 0.999, 1e-6, 0.5)
    view, kept = held[:10], held.clone()
    del held
    again = adam_step(g, m, v, 0.9, 0.999, 1e-6, 0.5)
    assert again.data_ptr() != view.data_ptr() and torch.equal(view, kept[:10])


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="moment"):
        adam_step(torch.zeros(4), torch.zeros(5), torch.zeros(4), 0.9, 0.9, 1e-8, 1.0)
    with pytest.raises(ValueError, match="group_size"):
        int8_sr_quantize(torch.zeros(4), 0, group_size=0)
    with pytest.raises(ValueError, match="seed"):
        int8_sr_quantize(torch.zeros(4), -1)
    with pytest.raises(ValueError, match="side"):
        backproject_update(torch.zeros(4, 4), torch.zeros(4, 2), torch.zeros(2, 4), "full", 1, 1, 0)


@settings(max_examples=3, deadline=None, derandomize=True)
@given(n=st.integers(1, 300), seed=st.integers(0, 2 ** 31 - 1), spread=st.sampled_from([1e-3, 1.0, 1e3]))
def test_stochastic_rounding_is_unbiased_and_seeded(n, seed, spread):
    """Mean of 1000 seeded roundings is within 5 standard errors of x for every element (a
    rounding is a Bernoulli(frac) choice between two codes one step apart); the same seed
    gives the same codes, another seed different ones."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * spread
    codes, scale = int8_sr_quantize(x, 7)
    assert torch.equal(codes, int8_sr_quantize(x, 7)[0])
    draws = torch.stack([int8_dequantize(*int8_sr_quantize(x, s)) for s in range(1000)])
    step = scale.repeat_interleave(256)[:n].double()
    y = x.double() / step
    frac = y - torch.floor(y)
    std_err = step * (frac * (1 - frac)).sqrt() / 1000 ** 0.5
    # plus the 2 roundings (x/scale, code·scale) that separate a code's value from x
    slack = 5 * std_err + 2 * 2.0 ** -24 * x.abs().double()
    assert torch.all((draws.double().mean(0) - x.double()).abs() <= slack)
    if n > 8:
        assert not torch.equal(codes, int8_sr_quantize(x, 8)[0])


def test_sr_uniform_bits():
    u = sr_uniform_ref(1 << 16, 3)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 4 * (1 / 12 / 65536) ** 0.5


@pytest.mark.parametrize("shape", [(3, 16, 16), (2, 40, 16), (4, 7), (1, 300)])
def test_int8_rows_equal_the_reference_row_by_row(shape):
    """The bucket codec (k weights, k seeds, one pass) gives each row the codes, scales and
    dequantized values the per-tensor reference gives it, padded last groups included."""
    from gradproj.kernels.int8_sr import (int8_dequantize_ref, int8_dequantize_rows,
                                          int8_sr_quantize_ref, int8_sr_quantize_rows)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    seeds = [11 + 7 * i for i in range(shape[0])]
    codes, scales = int8_sr_quantize_rows(x, seeds, group_size=64)
    for i, seed in enumerate(seeds):
        want_codes, want_scale = int8_sr_quantize_ref(x[i], seed, group_size=64)
        assert torch.equal(codes[i], want_codes) and torch.equal(scales[i], want_scale)
    values = int8_dequantize_rows(codes, scales, group_size=64)
    for i in range(shape[0]):
        assert torch.equal(values[i], int8_dequantize_ref(codes[i], scales[i], group_size=64))
