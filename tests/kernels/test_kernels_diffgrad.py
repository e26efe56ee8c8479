"""diffGrad's step through every state format: the reference against the paper spelled out,
and 8-/4-bit moments (≥ 4096 values, so stored as codes) through read → reference → write."""
import math

import pytest
import torch

import gradproj as gp
from gradproj.kernels.diffgrad import diffgrad_step, diffgrad_step_ref

KEYS = ("exp_avg", "exp_avg_sq", "previous_grad")


def test_reference_is_diffgrad_spelled_out():
    gen = torch.Generator().manual_seed(0)
    g, m, v, prev = (torch.randn(300, generator=gen) for _ in range(4))
    v = v.abs()
    b1, b2, eps, s = 0.9, 0.999, 1e-8, 0.3
    m_new, v_new = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    xi = torch.sigmoid((prev - g).abs())
    want = s * xi * m_new / (v_new.sqrt() + eps)
    for fn in (diffgrad_step, diffgrad_step_ref):  # on CPU the host runs the reference
        states = [x.clone() for x in (m, v, prev)]
        got = fn(g, *states, b1, b2, eps, s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)  # m_new may cancel
        torch.testing.assert_close(states[0], m_new, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(states[1], v_new, rtol=1e-6, atol=0)
        assert torch.equal(states[2], g)
    with pytest.raises(ValueError, match="must be contiguous and match"):
        diffgrad_step(g, m[:10], v, prev, b1, b2, eps, s)


@pytest.mark.parametrize("fmt_name", ["q8", "q4", "bf16"])
def test_format_step_is_read_reference_write(fmt_name):
    """The format's `diffgrad_step` equals dequantize → the reference → quantize, with the
    three 64×128 moments (8192 values) really stored as codes for q8/q4."""
    fmt = gp.STATE_FORMATS.create(fmt_name)
    shape = (64, 128)
    state: dict = {}
    for key, signed in zip(KEYS, (True, False, True)):
        fmt.zeros(state, key, shape, "cpu", signed)
    if fmt_name != "bf16":
        assert all(f"{key}.codes" in state for key in KEYS) and not any(k in state for k in KEYS)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, 4):
        g = torch.randn(shape, generator=gen) * (1 + t)
        before = [fmt.read(state, key) for key in KEYS]
        s = math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        want = diffgrad_step_ref(g, *before, 0.9, 0.999, 1e-8, s)
        mirror: dict = {}
        for key, value in zip(KEYS, before):
            fmt.zeros(mirror, key, shape, "cpu", key != "exp_avg_sq")
            fmt.write(mirror, key, value)
        got = fmt.diffgrad_step(state, *KEYS, g, 0.9, 0.999, 1e-8, s)
        assert torch.equal(got, want)
        for key in KEYS:  # the stored codes are the quantized reference moments
            assert torch.equal(fmt.read(state, key), fmt.read(mirror, key)), key
    # the quantized previous gradient is G to within its code spacing (q4: 16 codes)
    err = (fmt.read(state, "previous_grad") - g).abs().max() / g.abs().max()
    assert err < {"q8": 0.02, "q4": 0.2, "bf16": 2 ** -8}[fmt_name]


def test_q8_host_equals_its_reference_and_the_format_calls_it(monkeypatch):
    """On CPU the fused 8-bit host runs the C codec around the reference math: the same
    codes as `diffgrad_q8_step_ref` (PyTorch codec); Q8Format hands its codes to it."""
    from gradproj.kernels import diffgrad_q8, q8

    gen = torch.Generator().manual_seed(2)
    n = 5000  # a partial last block
    grad = torch.randn(n, generator=gen)
    states = [*q8.q8_quantize_ref(torch.randn(n, generator=gen), True),
              *q8.q8_quantize_ref(torch.rand(n, generator=gen), False),
              *q8.q8_quantize_ref(torch.randn(n, generator=gen), True)]
    ref_states = [t.clone() for t in states]
    d = diffgrad_q8.diffgrad_q8_step(grad, *states, 0.9, 0.999, 1e-8, 0.5)
    d_r = diffgrad_q8.diffgrad_q8_step_ref(grad, *ref_states, 0.9, 0.999, 1e-8, 0.5)
    assert torch.equal(d, d_r) and all(torch.equal(a, b) for a, b in zip(states, ref_states))
    with pytest.raises(ValueError, match="absmax must hold"):
        diffgrad_q8.diffgrad_q8_step(grad, *states[:5], states[5][:3], 0.9, 0.999, 1e-8, 0.5)
    calls = []
    monkeypatch.setattr("gradproj.formats.q8.diffgrad_q8_step",
                        lambda *a: calls.append(a) or diffgrad_q8.diffgrad_q8_step(*a))
    fmt, state = gp.STATE_FORMATS.create("q8"), {}
    for key, signed in zip(KEYS, (True, False, True)):
        fmt.zeros(state, key, (n,), "cpu", signed)
    fmt.diffgrad_step(state, *KEYS, grad, 0.9, 0.999, 1e-8, 0.5)
    assert len(calls) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("n", [1, 257, 4097, 1 << 20])
def test_diffgrad_kernels_cuda(n):
    """GPU lane: the dense (fp32, bf16 states) and 8-bit kernels against their references,
    with the interpreter lane's bounds; NVIDIA's approximate exp is inside the 4u of ξ."""
    from kernel_helpers import (U, adam_direction_bound, adam_moment_bounds, assert_within,
                                codes_agree, storage_rounding)

    from gradproj.kernels import diffgrad_q8, q8
    from gradproj.kernels.qmaps import tables

    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen)
    b1, b2, eps, s = 0.9, 0.999, 1e-8, 0.7
    for storage in (torch.float32, torch.bfloat16):
        init = [(torch.randn(n, generator=gen) * 0.1).to(storage),
                (torch.rand(n, generator=gen) * 0.01).to(storage),
                (g + torch.randn(n, generator=gen)).to(storage)]
        dev, ref = [x.cuda() for x in init], [x.clone() for x in init]
        d = diffgrad_step(g.cuda(), *dev, b1, b2, eps, s).cpu()
        dr = diffgrad_step_ref(g, *ref, b1, b2, eps, s)
        err_m, err_v = adam_moment_bounds(g, init[0].float(), init[1].float(), b1, b2)
        m, v = init[0].float() * b1 + (1 - b1) * g, init[1].float() * b2 + (1 - b2) * g * g
        adam_n = (s * m.abs() / (v.sqrt() + eps)).double()
        delta = (init[2].float() - g).abs().double()
        bound = adam_direction_bound(m, v, err_m, err_v, eps, s) + (4 + delta) * U[torch.float32] * adam_n
        assert_within(d, dr, bound, f"direction ({storage})")
        assert_within(dev[0].cpu().float(), ref[0].float(), err_m + 2 * storage_rounding(m, storage), "m")
        assert_within(dev[2].cpu().float(), ref[2].float(), 2 * storage_rounding(g, storage), "G_prev")
    states = [*q8.q8_quantize_ref(torch.randn(n, generator=gen) * 1e-2, True),
              *q8.q8_quantize_ref(torch.rand(n, generator=gen) * 1e-4, False),
              *q8.q8_quantize_ref(torch.randn(n, generator=gen) * 1e-2, True)]
    dev, ref = [x.cuda() for x in states], [x.clone() for x in states]
    d = diffgrad_q8.diffgrad_q8_step(g.cuda(), *dev, b1, b2, eps, s).cpu()
    dr = diffgrad_q8.diffgrad_q8_step_ref(g, *ref, b1, b2, eps, s)
    m0, v0 = (q8.q8_dequantize_ref(states[0], states[1], True),
              q8.q8_dequantize_ref(states[2], states[3], False))
    p0 = q8.q8_dequantize_ref(states[4], states[5], True)
    m, v = m0 * b1 + (1 - b1) * g, v0 * b2 + (1 - b2) * g * g
    err_m, err_v = adam_moment_bounds(g, m0, v0, b1, b2)
    adam_n = (s * m.abs() / (v.sqrt() + eps)).double()
    bound = (adam_direction_bound(m, v, err_m, err_v, eps, s)
             + (4 + (p0 - g).abs().double()) * U[torch.float32] * adam_n)
    assert_within(d, dr, bound, "q8 direction")
    _, mids = tables(8, True, "cpu")
    scaled = (g.reshape(-1) / ref[5].repeat_interleave(256)[:n].clamp(min=1e-38)).clamp(-1, 1)
    codes_agree(dev[4].cpu(), ref[4], scaled, mids, 2 * U[torch.float32])  # G_prev's codes
