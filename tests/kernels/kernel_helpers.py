"""Shared by the kernel tests: shape strategies and error bounds derived from dtypes.

Every bound is written as (number of roundings) × unit roundoff u = eps/2 of the dtype the
value passes through, times the magnitude it is relative to; nothing is widened by hand.
"""
from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from gradproj.kernels.qmaps import tables

#: unit roundoff u (half an ulp at 1.0) of each storage dtype
U = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}

STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: spacing of the subnormals (= the smallest positive value) of each storage dtype:
#: fp16 2⁻²⁴ = 5.96e-8, bf16 2⁻¹³³, fp32 2⁻¹⁴⁹. Below the smallest normal (fp16: 6.1e-5)
#: the spacing stops shrinking, so rounding to storage errs by up to half of it — an
#: absolute error that u·|x| does not cover (|x| = 2.4e-5 in fp16: u·|x| = 1.2e-8 < 3.0e-8)
SUBNORMAL = {dt: torch.finfo(dt).smallest_normal * torch.finfo(dt).eps for dt in STORAGE_DTYPES}


def storage_rounding(x: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """Bound of |fl(x) − x| when fp32 `x` is rounded to `storage`: u·|x| for a normal
    result, half the subnormal spacing for a subnormal one; their sum bounds both."""
    return U[storage] * x.abs().double() + SUBNORMAL[storage] / 2

#: sizes 1 .. 2^16, drawn log-uniformly so small and block-boundary sizes are common
sizes = st.integers(0, 16).flatmap(lambda k: st.integers(max(1, 1 << k >> 1), 1 << k))
#: sizes that straddle the 256/128 block sizes (non-multiples included)
block_edges = st.sampled_from([1, 2, 127, 128, 129, 255, 256, 257, 511, 4095, 4096, 4097, 65536])
size_strategy = st.one_of(sizes, block_edges)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float,
                  what: str) -> None:
    """|actual − expected| ≤ bound elementwise; on failure name the worst index (Liger-style)."""
    bound = torch.broadcast_to(torch.as_tensor(bound, dtype=torch.float64), expected.shape).reshape(-1)
    actual, expected = actual.double().reshape(-1), expected.double().reshape(-1)
    err = (actual - expected).abs()
    bad = ~(err <= bound)  # NaN counts as a failure
    if bad.any():
        excess = torch.where(bad, err - bound, torch.zeros_like(err))
        i = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        raise AssertionError(f"{what}: {int(bad.sum())}/{err.numel()} elements out of bound; "
                             f"worst index {i}: got {actual[i].item()!r}, expected "
                             f"{expected[i].item()!r}, |err| {err[i].item():.3g} > bound "
                             f"{bound[i].item():.3g}")


def adam_moment_bounds(g, m0, v0, beta1, beta2):
    """fp32 error bounds of M and V after one update (2 roundings each, of the terms' sum:
    the kernel may fuse a multiply-add where PyTorch rounds twice)."""
    u = U[torch.float32]
    g, m0, v0 = g.double(), m0.double(), v0.double()
    err_m = 2 * u * ((beta1 * m0).abs() + ((1 - beta1) * g).abs())
    err_v = 3 * u * ((beta2 * v0).abs() + (1 - beta2) * g * g)
    return err_m, err_v


def adam_direction_bound(m, v, err_m, err_v, eps, step_size):
    """Bound of N = s·M/(√V + ε) given M, V errors: first-order propagation plus 4 roundings
    (sqrt, add, div, mul) of N itself."""
    u = U[torch.float32]
    m, v = m.double(), v.double()
    denom = v.sqrt() + eps
    # d√V = dV / (2√V); guard V = 0 (then err_v = 0 too)
    dsqrt = torch.where(v > 0, err_v / (2 * v.sqrt().clamp(min=1e-300)), torch.zeros_like(v))
    n = step_size * m.abs() / denom
    return step_size * err_m / denom + n * dsqrt / denom + 4 * u * n + 1e-300


def codes_agree(codes, codes_ref, scaled_ref, mids, slack):
    """Codes equal, or adjacent with the reference's scaled value within `slack` of the
    midpoint between them (a rounding-level perturbation may cross it)."""
    codes, codes_ref = codes.long().reshape(-1), codes_ref.long().reshape(-1)
    differ = codes != codes_ref
    if not differ.any():
        return
    lower = torch.minimum(codes, codes_ref)[differ]
    adjacent = (codes - codes_ref).abs()[differ] == 1
    dist = (scaled_ref.reshape(-1)[differ].double() - mids.double()[lower.clamp(max=mids.numel() - 1)]).abs()
    near = dist <= torch.as_tensor(slack, dtype=torch.float64).expand_as(codes_ref).reshape(-1)[differ]
    ok = adjacent & near
    if not ok.all():
        i = int(differ.nonzero()[~ok][0])
        raise AssertionError(f"code {int(codes[i])} vs reference {int(codes_ref[i])} at index "
                             f"{i}, scaled {scaled_ref.reshape(-1)[i].item()!r} is not at a midpoint")


def check_requantized(codes, absmax, codes_r, absmax_r, value, err, bits, signed, block):
    """Codes after a fused step: equal to the reference's, or one apart at a midpoint."""
    u = U[torch.float32]
    _, mids = tables(bits, signed, "cpu")
    pad = (-value.numel()) % block
    flat = torch.cat([value.reshape(-1).double(), value.new_zeros(pad).double()]).view(-1, block)
    errs = torch.cat([err.reshape(-1), err.new_zeros(pad)]).view(-1, block)
    # a block's absmax is off by at most its largest value error
    assert_within(absmax, absmax_r, errs.amax(1), "absmax")
    scale = absmax_r.double().clamp(min=1e-38)[:, None]
    scaled = (flat / scale).clamp(-1, 1)
    # value error over absmax, plus the absmax error, plus 2 roundings of the scaling
    slack = errs / scale + scaled.abs() * (errs.amax(1, keepdim=True) / scale) + 2 * u
    if bits == 4:
        unpack = lambda c: torch.stack([c & 15, c >> 4], -1).reshape(-1)  # noqa: E731
        codes, codes_r = unpack(codes), unpack(codes_r)
    else:
        codes, codes_r = codes.reshape(-1), codes_r.reshape(-1)
        scaled, slack = scaled.reshape(-1)[:value.numel()], slack.reshape(-1)[:value.numel()]
    codes_agree(codes, codes_r, scaled, mids, slack)


def adam_fp32_ops(g, m, v, beta1, beta2, eps, step_size):
    """Adam in numpy float32, one IEEE rounding per operation as written (numpy neither
    contracts a·b + c nor approximates sqrt): M = M·β1 + G·(1−β1), V = V·β2 + (G·G)·(1−β2),
    N = (M / (√V + ε))·s, the constants rounded to fp32 once. Updates m and v in place and
    returns N — what the CPU C pass (`gp_adam_dense`) must give bit for bit."""
    f = np.float32
    gn, mn, vn = g.numpy(), m.numpy(), v.numpy()
    m_new = mn * f(beta1) + gn * f(1.0 - beta1)
    v_new = vn * f(beta2) + (gn * gn) * f(1.0 - beta2)
    mn[...], vn[...] = m_new, v_new
    return torch.from_numpy((m_new / (np.sqrt(v_new) + f(eps))) * f(step_size))
