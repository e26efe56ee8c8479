"""The fused 8-/4-bit diffGrad and Sophia steps on CPU (`diffgrad_q4`, `sophia_q8`,
`sophia_q4`; `diffgrad_q8` beside them): the host (C codec around the reference math)
against its `_ref` (PyTorch codec), bit for bit; the formats hand their codes to these
hosts only when the moments are stored as codes (≥ 4096 values); bad layouts are named.
The Triton kernels are held to the same references in the interpreter lane
(interp/test_interp_diffgrad.py, interp/test_interp_sophia.py) and compile lane."""
import pytest
import torch

import gradproj as gp
from gradproj.kernels import (cpu_blockwise, diffgrad_q4, diffgrad_q8, q4, q8, sophia_q4,
                              sophia_q8)
from gradproj.kernels.sophia import sophia_step_ref

HOSTS = {  # name -> (host, reference, bits, signs of the states)
    "diffgrad_q8": (diffgrad_q8.diffgrad_q8_step, diffgrad_q8.diffgrad_q8_step_ref, 8,
                    (True, False, True)),
    "diffgrad_q4": (diffgrad_q4.diffgrad_q4_step, diffgrad_q4.diffgrad_q4_step_ref, 4,
                    (True, False, True)),
    "sophia_q8": (sophia_q8.sophia_q8_step, sophia_q8.sophia_q8_step_ref, 8, (True, False)),
    "sophia_q4": (sophia_q4.sophia_q4_step, sophia_q4.sophia_q4_step_ref, 4, (True, False)),
}
DIFFGRAD_HYPER = (0.9, 0.999, 1e-8, 0.5)
SOPHIA_HYPER = (0.965, 0.04, 1e-15)


def _states(shape, bits, signs, gen, stacked_absmax=False):
    quant = q8.q8_quantize_ref if bits == 8 else q4.q4_quantize_ref
    out = []
    for signed in signs:
        x = torch.randn(shape, generator=gen) * 1e-2
        codes, absmax = quant(x if signed else x * x * 64, signed)
        if stacked_absmax:  # a bucket of k moments stores absmax as k × blocks
            absmax = absmax.view(shape[0], -1)
        out += [codes, absmax]
    return out


@pytest.mark.parametrize("name", list(HOSTS))
@pytest.mark.parametrize("shape", [(5000,), (3, 32, 128)])
def test_host_on_cpu_equals_its_reference(name, shape, monkeypatch):
    """Two steps: direction, codes and absmax identical to the PyTorch-codec reference;
    (3, 32, 128) is a bucket of three 32×128 q8 moments (absmax 3 × 16); the C codec ran."""
    host, ref, bits, signs = HOSTS[name]
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")
    gen = torch.Generator().manual_seed(len(name) + len(shape))
    stacked = bits == 8 and len(shape) == 3
    ours = _states(shape, bits, signs, gen, stacked)
    theirs = [t.clone() for t in ours]
    hyper = DIFFGRAD_HYPER if name.startswith("diffgrad") else SOPHIA_HYPER
    calls = []
    quantize = cpu_blockwise.quantize
    monkeypatch.setattr(cpu_blockwise, "quantize",
                        lambda *a: calls.append(1) or quantize(*a))
    for _ in range(2):
        grad = torch.randn(shape, generator=gen) * 1e-2
        d, d_r = host(grad, *ours, *hyper), ref(grad, *theirs, *hyper)
        assert d.shape == grad.shape and torch.equal(d, d_r)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    if cpu_blockwise.library() is not None:
        assert len(calls) == 2 * (len(signs) if name.startswith("diffgrad") else 1)
    if name.startswith("sophia"):
        assert (d.abs() <= 1).all()


@pytest.mark.parametrize("name", list(HOSTS))
def test_bad_layouts_are_named(name):
    host, _, bits, signs = HOSTS[name]
    gen = torch.Generator().manual_seed(0)
    states = _states((5000,), bits, signs, gen)
    hyper = DIFFGRAD_HYPER if name.startswith("diffgrad") else SOPHIA_HYPER
    short = list(states)
    short[-1] = short[-1][:3]
    match = "absmax must hold" if bits == 8 else "q4 state must hold 40 blocks of 128"
    with pytest.raises(ValueError, match=match):
        host(torch.randn(5000), *short, *hyper)
    if bits == 4:
        with pytest.raises(ValueError, match="exp_avg: q4 state must hold"):
            host(torch.randn(5000), states[0][:-1], *states[1:], *hyper)


SOPHIA_KEYS = ("exp_avg", "hessian")


@pytest.mark.parametrize("fmt_name", ["q8", "q4"])
def test_sophia_format_step_is_read_reference_write(fmt_name):
    """`fmt.sophia_step` on 64×128 moments (8192 values, stored as codes) equals
    read → `sophia_step_ref` → write M, with H fed by `update_curvature`'s EMA, and H's
    codes left as they were."""
    fmt = gp.STATE_FORMATS.create(fmt_name)
    shape, state = (64, 128), {}
    for key, signed in zip(SOPHIA_KEYS, (True, False)):
        fmt.zeros(state, key, shape, "cpu", signed)
    assert all(f"{key}.codes" in state for key in SOPHIA_KEYS) and "exp_avg" not in state
    gen = torch.Generator().manual_seed(1)
    rule, group = gp.RULES.create("sophia"), {"betas": (0.965, 0.99), "rho": 0.04, "eps": 1e-15}
    for t in range(3):
        g = torch.randn(shape, generator=gen)
        rule.update_curvature(64 * g * g, state, group, fmt)
        m, h = fmt.read(state, "exp_avg"), fmt.read(state, "hessian")
        h_codes = state["hessian.codes"].clone()
        want = sophia_step_ref(g, m, h, 0.965, 0.04, 1e-15)
        mirror = {}
        fmt.zeros(mirror, "exp_avg", shape, "cpu", True)
        fmt.write(mirror, "exp_avg", m)
        got = fmt.sophia_step(state, *SOPHIA_KEYS, g, 0.965, 0.04, 1e-15)
        assert torch.equal(got, want)
        assert torch.equal(state["exp_avg.codes"], mirror["exp_avg.codes"])
        assert torch.equal(state["exp_avg.absmax"], mirror["exp_avg.absmax"])
        assert torch.equal(state["hessian.codes"], h_codes)
    assert 0 < int((got.abs() < 1).sum()) < got.numel()  # some coordinates clip, some not


@pytest.mark.parametrize("fmt_name,rule,host", [
    ("q8", "sophia", "gradproj.formats.q8.sophia_q8_step"),
    ("q4", "sophia", "gradproj.formats.q4.sophia_q4_step"),
    ("q4", "diffgrad", "gradproj.formats.q4.diffgrad_q4_step"),
    ("q8", "diffgrad", "gradproj.formats.q8.diffgrad_q8_step")])
def test_the_optimizer_steps_through_the_fused_host(fmt_name, rule, host, monkeypatch):
    """A 64×64 weight (4096 moment values: codes) calls the fused host once per step; a
    63×64 one (4032 < 4096: fp32 moments) never does."""
    import importlib

    module, name = host.rsplit(".", 1)
    original = getattr(importlib.import_module(module), name)
    calls = []
    monkeypatch.setattr(host, lambda *a: calls.append(a[0].numel()) or original(*a))
    big, small = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(63, 64))
    opt = gp.LowRankOptimizer([big, small], rule=rule, state_format=fmt_name, lr=1e-3)
    for _ in range(2):
        big.grad, small.grad = torch.randn(64, 64), torch.randn(63, 64)
        opt.step()
    assert calls == [4096] * 2  # q8 buckets stack it as 1×64×64, q4 steps it alone
    keys = [k for k, _ in gp.RULES.create(rule).moments]
    assert all(f"{k}.codes" in opt.state[big] and k in opt.state[small] for k in keys)
    assert torch.isfinite(big.detach()).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("n", [1, 129, 257, 4097, 65536 + 3, 1 << 20])
def test_quantized_diffgrad_and_sophia_cuda(bits, n):
    """GPU lane: the compiled kernels against the references, the interpreter lane's cases
    and bounds (quantized_cases.py)."""
    from quantized_cases import diffgrad_case, sophia_case

    diffgrad_case(bits, n, 10, n, device="cuda")
    for h_kind in ("gnb", "hutchinson", "zero"):
        sophia_case(bits, n, 0.04, h_kind, n, device="cuda")
