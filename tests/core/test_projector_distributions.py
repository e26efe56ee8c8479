"""Distribution of the seeded random projectors (APOLLO's Gaussian, very sparse), with bounds.

Every draw here comes from a fixed seed, so each test sees the same numbers on every run;
the bounds are 5 standard deviations of the estimator (written next to each), so a
correct projector passes by a wide margin and a mis-scaled one fails by a wider one.
Ranks are ≥ 4 and two ranks are compared, so 1/r (the spec) and 1/√r (a plausible slip)
are told apart: at r = 4 vs 64 the variance ratio is 16 against 4.
"""
import math

import pytest
import torch

import gradproj as gp

CPU = torch.device("cpu")


def basis(name, rows, rank, seed, side="left", **options):
    """The fp32 basis the optimizer would use for a rows×cols weight, via fit/load_basis."""
    projector = gp.PROJECTORS.create(name, **options)
    shape = (rows, 8) if side == "left" else (8, rows)
    state = {}
    projector.fit(torch.zeros(shape), state, rank=rank, side=side, seed=seed, dtype=torch.float32)
    p = projector.load_basis(state, side, shape)
    assert tuple(p.shape) == (rows, rank)
    return p.double()


@pytest.mark.parametrize("rank", [4, 64])
def test_gaussian_entries_are_n_0_1_over_r(rank):
    rows = 16384 // rank  # 16384 entries per draw
    x = basis("gaussian", rows, rank, seed=3)
    n = x.numel()
    var = x.square().mean().item()
    # sample variance of N(0, σ²): std σ²·√(2/N) = 1.1 % here
    assert abs(var * rank - 1) <= 5 * math.sqrt(2 / n), var * rank
    assert abs(x.mean().item()) <= 5 * math.sqrt(1 / (rank * n))
    # Gaussian, not uniform or ±1: kurtosis 3, its estimator's std √(96/N) = 0.077
    kurtosis = x.pow(4).mean().item() / var ** 2
    assert abs(kurtosis - 3) <= 5 * math.sqrt(96 / n), kurtosis


def test_gaussian_variance_scales_as_one_over_r_not_one_over_sqrt_r():
    v4 = basis("gaussian", 4096, 4, seed=1).square().mean().item()
    v64 = basis("gaussian", 256, 64, seed=1).square().mean().item()
    # 1/r: ratio 16; 1/√r: ratio 4. Each variance within 5·√(2/16384) = 5.5 %
    assert 16 / 1.12 <= v4 / v64 <= 16 * 1.12, v4 / v64


@pytest.mark.parametrize("name", ["gaussian", "sparse"])
def test_expected_p_pt_is_identity(name):
    """E[P·Pᵀ] = I over 400 seeds (d = 16, r = 8). Per entry the mean's std is √(1/r)/20 =
    0.018 off the diagonal and √(2/r)/20 = 0.025 on it for the Gaussian; for the sparse one
    (s = 4) the diagonal's is √((s − 1)/r)/20 = 0.031. 5σ bounds, every entry."""
    d, r, seeds = 16, 8, 400
    total = torch.zeros(d, d, dtype=torch.float64)
    for seed in range(seeds):
        p = basis(name, d, r, seed)
        total += p @ p.T
    mean = total / seeds
    off = mean - torch.diag(torch.diagonal(mean))
    diag_sd = math.sqrt(2 / r) / math.sqrt(seeds) if name == "gaussian" else math.sqrt(3 / r) / math.sqrt(seeds)
    assert (torch.diagonal(mean) - 1).abs().max() <= 5 * diag_sd
    assert off.abs().max() <= 5 * math.sqrt(1 / r) / math.sqrt(seeds)


@pytest.mark.parametrize("name", ["gaussian", "sparse"])
def test_projection_preserves_the_squared_norm_in_expectation(name):
    """Johnson–Lindenstrauss, what APOLLO's ‖N‖/‖R‖ relies on: E‖Pᵀg‖² = ‖g‖² (d = 256,
    r = 32, 200 seeds); the mean's std is ‖g‖²·√(2/r)/√200 (Gaussian) = 1.8 %."""
    d, r, seeds = 256, 32, 200
    g = torch.randn(d, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratios = torch.tensor([(basis(name, d, r, seed).T @ g).square().sum().item() / g.square().sum().item()
                           for seed in range(seeds)])
    assert abs(ratios.mean().item() - 1) <= 5 * math.sqrt(2 / r) / math.sqrt(seeds)


def test_sparse_entries_follow_li_hastie_church():
    """±√(s/r) w.p. 1/(2s) each, 0 otherwise, s = √d: d = 4096 → s = 64, r = 16."""
    d, r = 4096, 16
    s = math.sqrt(d)
    x = basis("sparse", d, r, seed=5)
    n = x.numel()
    value = math.sqrt(s / r)
    nonzero = x != 0
    assert torch.allclose(x[nonzero].abs(), torch.full_like(x[nonzero], value), rtol=1e-6)
    p = 1 / s
    frac = nonzero.double().mean().item()
    assert abs(frac - p) <= 5 * math.sqrt(p * (1 - p) / n), frac  # binomial: 5σ = 0.0024
    pos, neg = (x > 0).sum().item(), (x < 0).sum().item()
    assert abs(pos - neg) <= 5 * math.sqrt(n * p)  # each sign w.p. 1/(2s)
    # entry variance (1/s)·(s/r) = 1/r; estimator std √(s/N)/r
    assert abs(x.square().mean().item() * r - 1) <= 5 * math.sqrt(s / n)


@pytest.mark.parametrize("s", [1, 3])
def test_sparse_s_option(s):
    d, r = 2048, 8
    x = basis("sparse", d, r, seed=2, s=s)
    n = x.numel()
    frac = (x != 0).double().mean().item()
    assert abs(frac - 1 / s) <= 5 * math.sqrt((1 / s) * (1 - 1 / s) / n) + 1e-12
    assert torch.allclose(x[x != 0].abs(), torch.full_like(x[x != 0], math.sqrt(s / r)), rtol=1e-6)


@pytest.mark.parametrize("name", ["gaussian", "sparse"])
def test_seeded_bases_are_fresh_per_seed_and_side(name):
    """A new seed is a new draw; the two sides of proj_type "full" are independent draws;
    one seed always regenerates the same basis (what makes it storable as one int)."""
    a, b = basis(name, 256, 8, seed=10), basis(name, 256, 8, seed=11)
    assert not torch.equal(a, b)
    assert torch.equal(a, basis(name, 256, 8, seed=10))
    projector = gp.PROJECTORS.create(name)
    state = {}
    projector.fit(torch.zeros(256, 256), state, rank=8, side="full", seed=10, dtype=torch.float32)
    left = projector.load_basis(state, "left", (256, 256))
    right = projector.load_basis(state, "right", (256, 256))
    assert not torch.equal(left, right)
    # independent draws: the normalised inner product of the two is ~N(0, 1/N)
    corr = (left * right).sum() / (left.norm() * right.norm())
    assert abs(corr.item()) <= 5 / math.sqrt(left.numel())


def test_optimizer_refresh_draws_a_new_seeded_basis():
    """The optimizer passes a new seed at each refresh (seed · 1_000_003 + step)."""
    w = torch.nn.Parameter(torch.zeros(64, 32))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 4, "update_gap": 2}], projector="gaussian")
    gen = torch.Generator().manual_seed(0)
    bases = []
    for _ in range(4):
        w.grad = torch.randn(64, 32, generator=gen)
        opt.step()
        side = opt.side(w, opt.param_groups[0])
        bases.append(gp.PROJECTORS.create("gaussian").load_basis(opt.state[w], side, (64, 32)).clone())
    assert torch.equal(bases[0], bases[1]) and torch.equal(bases[2], bases[3])
    assert not torch.equal(bases[1], bases[2])


@pytest.mark.parametrize("name", ["gaussian", "sparse", "svd", "randomized"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_fit_side_is_the_basis_fit_stores(name, side):
    """`fit_side(grad, rank, side, seed)` and `fit` + `load_basis` give one basis: what a
    caller that asks for one side (the distributed range finder, INT4 wrapping) gets is
    what the optimizer projects with."""
    grad = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    projector = gp.PROJECTORS.create(name)
    state = {}
    projector.fit(grad, state, rank=6, side=side, seed=21, dtype=torch.float32)
    stored = projector.load_basis(state, side, (48, 40))
    torch.testing.assert_close(projector.fit_side(grad, 6, side, 21), stored, rtol=0, atol=1e-6)
