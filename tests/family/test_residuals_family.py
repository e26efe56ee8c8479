"""Fira, FRUGAL and APOLLO against their papers' update rules spelled out in plain torch."""
import math

import pytest
import torch

import gradproj as gp

EPS = torch.finfo(torch.float32).eps
# SVD bases are computed by the same LAPACK call on the same input in both paths, so the
# difference is op ordering: a few fp32 roundings per step over ≤ 6 steps
TOL = dict(rtol=256 * EPS, atol=256 * EPS)
SCALES = [1.0, 1.0, 3.0, 3.5, 0.5, 6.0]  # growing norms make the 1.01 limiter bite


def grads_for(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * s for s in SCALES]


def run(w0, grads, group, **options):
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w], **group}], **options)
    bases = []
    for g in grads:
        w.grad = g.clone()
        opt.step()
        state, projector = opt.state[w], opt.plugins(opt.param_groups[0])[1]
        side = opt.side(w, opt.param_groups[0])
        bases.append((side, projector.load_basis(state, side, tuple(w.shape))))
    return w.detach(), bases, opt.state[w]


def svd_basis(g, r, side):
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    return u[:, :r] if side == "left" else vh[:r].T


class Adam:
    """galore-torch's Adam on R: bias correction folded into the step, ε outside the root."""

    def __init__(self, betas=(0.9, 0.999), eps=1e-6):
        self.b1, self.b2, self.eps, self.m, self.v, self.t = *betas, eps, 0.0, 0.0, 0

    def raw(self, r):
        """(M/(√V + ε), c_t): the direction before and the factor of its bias correction."""
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * r
        self.v = self.b2 * self.v + (1 - self.b2) * r * r
        c = math.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
        return self.m / (self.v.sqrt() + self.eps), c

    def __call__(self, r):
        n, c = self.raw(r)
        return c * n


def project(g, p, side):
    return p.T @ g if side == "left" else g @ p


def back(x, p, side):
    return p @ x if side == "left" else x @ p.T


def channel_ratio(n, r, side):
    dim = 0 if side == "left" else 1  # norms over the compressed dimension
    return n.norm(dim=dim, keepdim=True) / (r.norm(dim=dim, keepdim=True) + 1e-8)


class Limiter:
    def __init__(self, gamma=1.01):
        self.gamma, self.prev, self.active = gamma, None, 0

    def __call__(self, u):
        norm = u.norm()
        if self.prev is None:
            self.prev = norm
            return u
        lim = max(norm / (self.prev + 1e-8), self.gamma) / self.gamma
        self.active += bool(lim > 1)
        self.prev = norm / lim
        return u / lim


@pytest.mark.parametrize("shape,side", [((12, 20), "left"), ((20, 12), "right")])
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_fira_scaling_per_channel_and_limiter(shape, side, alpha):
    r, lr = 3, 1e-2
    w0, grads = torch.randn(shape), grads_for(shape)
    p = svd_basis(grads[0], r, side)
    adam, limiter, w = Adam(), Limiter(1.01), w0.clone()
    for g in grads:  # Fira (Chen et al. 2024), Alg. 1; the bias correction in the step size
        low = project(g, p, side)
        n, c = adam.raw(low)
        outside = g - back(low, p, side)  # the paper's S: no α (the reference's `back` has it)
        w = w - lr * c * (alpha * back(n, p, side) + limiter(channel_ratio(n, low, side) * outside))
    assert limiter.active >= 1, "the fixed gradients must exercise the limiter"
    got, _, state = run(w0, grads, {"rank": r, "update_gap": 1000, "scale": alpha},
                        rule="adamw", residual="fira", lr=lr)
    torch.testing.assert_close(got, w, **TOL)
    torch.testing.assert_close(state["limited_norm"], torch.as_tensor(limiter.prev), **TOL)


@pytest.mark.parametrize("alpha", [0.25, 2.0])
def test_drop_is_galore_alpha_times_back_projected_adam(alpha):
    """GaLore (residual "drop"): W ← W − lr·α·P·N, N = Adam(PᵀG); G − back(R) discarded."""
    shape, r, lr = (12, 20), 3, 1e-2
    w0, grads = torch.randn(shape), grads_for(shape, seed=4)
    p = svd_basis(grads[0], r, "left")
    adam, w = Adam(), w0.clone()
    for g in grads:
        w = w - lr * alpha * back(adam(project(g, p, "left")), p, "left")
    got, _, _ = run(w0, grads, {"rank": r, "update_gap": 1000, "scale": alpha}, residual="drop", lr=lr)
    torch.testing.assert_close(got, w, **TOL)


def test_fira_with_moment_reset_restarts_the_bias_correction():
    """Fira with moments = "reset": at each refresh (every 2 steps) a new basis and fresh
    Adam moments, whose bias correction c_t counts from the reset — the c_t Fira's
    residual is scaled by too."""
    shape, r, lr, gap = (12, 20), 3, 1e-2, 2
    w0, grads = torch.randn(shape), grads_for(shape, seed=5)
    limiter, w = Limiter(1.01), w0.clone()
    for t, g in enumerate(grads):
        if t % gap == 0:
            p, adam = svd_basis(g, r, "left"), Adam()
        low = project(g, p, "left")
        n, c = adam.raw(low)
        outside = g - back(low, p, "left")
        w = w - lr * c * (back(n, p, "left") + limiter(channel_ratio(n, low, "left") * outside))
    got, _, state = run(w0, grads, {"rank": r, "update_gap": gap, "scale": 1.0},
                        rule="adamw", residual="fira", moments="reset", lr=lr)
    assert state["moments_origin"] == 4
    torch.testing.assert_close(got, w, **TOL)


def test_fira_residual_is_orthogonal_to_the_subspace():
    # with α ≠ 1 Fira's reference leaks (1−α)·back(R) into S; ours keeps S ⟂ span(P)
    shape, r = (10, 16), 2
    w0, g = torch.zeros(shape), torch.randn(shape)
    got, bases, _ = run(w0, [g], {"rank": r, "scale": 0.25}, residual="fira", lr=1.0)
    side, p = bases[0]
    fira_part = -got - 0.25 * back(Adam()(project(g, p, side)), p, side)
    assert project(fira_part, p, side).abs().max() <= 64 * EPS * g.abs().max()


@pytest.mark.parametrize("kappa,alpha", [(1.0, 1.0), (0.1, 1.0), (1.0, 0.5)])
def test_frugal_split_and_moment_reset(kappa, alpha):
    shape, r, lr, gap = (10, 14), 3, 1e-2, 2
    w0, grads = torch.randn(shape), grads_for(shape, seed=1)
    w, adam = w0.clone(), None
    for t, g in enumerate(grads):  # FRUGAL: Adam in span(P), signSGD on the rest
        if t % gap == 0:  # refresh: new basis, moments and bias correction reset
            p, adam = svd_basis(g, r, "left"), Adam(eps=1e-8)
        low = project(g, p, "left")
        w = w - lr * (alpha * back(adam(low), p, "left") + kappa * torch.sign(g - back(low, p, "left")))
    options = gp.preset_options("frugal")
    options.update(rank=r, update_gap=gap, free_lr_scale=kappa, lr=lr, scale=alpha)
    got, _, state = run(w0, grads, {}, **{**options, "lowrank": True})
    torch.testing.assert_close(got, w, **TOL)
    assert state["refreshes"] == 3 and state["moments_origin"] == 4


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_apollo_channel_scaling_of_the_raw_gradient(shape):
    r, lr = 4, 1e-2
    w0, grads = torch.randn(shape), grads_for(shape, seed=2)
    options = gp.preset_options("apollo")
    options.update(rank=r, update_gap=3, lr=lr)
    got, bases, _ = run(w0, grads, {"lowrank": True}, **options)
    adam, limiter, w = Adam(), Limiter(1.01), w0.clone()
    for g, (side, p) in zip(grads, bases):  # APOLLO, Alg. 1 (channel-wise)
        low = project(g, p, side)
        n, c = adam.raw(low)
        w = w - lr * c * math.sqrt(1.0) * limiter(g * channel_ratio(n, low, side))
    # redrawn from the seed: the same within a gap (steps 0–2), a new draw at the refresh (3)
    assert torch.equal(bases[0][1], bases[2][1]) and not torch.equal(bases[0][1], bases[3][1])
    torch.testing.assert_close(got, w, **TOL)


def test_apollo_mini_is_rank_one_tensor_wise_scale_128():
    shape, lr = (16, 24), 1e-3
    w0, grads = torch.randn(shape), grads_for(shape, seed=3)
    options = gp.preset_options("apollo-mini")
    assert (options["rank"], options["scale_type"], options["scale"]) == (1, "tensor", 128.0)
    got, bases, state = run(w0, grads, {"lowrank": True}, **{**options, "lr": lr})
    adam, limiter, w = Adam(), Limiter(1.01), w0.clone()
    for g, (side, p) in zip(grads, bases):
        low = project(g, p, side)
        n, c = adam.raw(low)
        w = w - lr * c * math.sqrt(128.0) * limiter(g * (n.norm() / (low.norm() + 1e-8)))
    torch.testing.assert_close(got, w, **TOL)
    assert state["exp_avg"].numel() == shape[1]  # rank 1: one row of n moments


def test_seeded_projectors_store_no_basis():
    shape = (32, 48)
    for name in ("gaussian", "sparse"):
        _, _, state = run(torch.zeros(shape), grads_for(shape)[:2], {"rank": 4},
                          projector=name, residual="apollo")
        basis_bytes = sum(v.numel() * v.element_size() for k, v in state.items()
                          if torch.is_tensor(v) and k.startswith("proj"))
        assert basis_bytes == 0 and isinstance(state["proj_seed"], int)


@pytest.mark.parametrize("residual,options,name", [
    ("fira", {"norm_growth_limit": 0.5}, "norm_growth_limit"),
    ("apollo", {"scale_type": "column"}, "scale_type"),
    ("frugal", {"free_lr_scale": -1}, "free_lr_scale"),
])
def test_bad_residual_option_names_the_option(residual, options, name):
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=name):
        gp.LowRankOptimizer([w], residual=residual, **options)


def test_drop_fused_step_on_a_large_weight_applies_alpha_and_decoupled_decay():
    """A 1024×64 fp32 weight (2^16 values) takes Drop's fused back-projection step (addmm_
    on CPU, Triton on GPU): W ← W − lr·α·back(N), then W ← W − lr·wd·W, as the unfused
    path (catches the fused step dropping α or the weight decay)."""
    from gradproj.kernels import backproj

    shape, r, lr, alpha, wd = (1024, 64), 4, 1e-2, 0.25, 0.1
    if not backproj.fuses(torch.zeros(shape)):
        pytest.skip("the fused back-projection is off (GRADPROJ_KERNELS=reference)")
    gen = torch.Generator().manual_seed(8)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(2)]
    p = svd_basis(grads[0], r, "right")  # m >= n: GaLore's right side
    adam, w = Adam(), w0.clone()
    for g in grads:
        w = w - lr * alpha * back(adam(project(g, p, "right")), p, "right")
        w = w - lr * wd * w
    got, bases, _ = run(w0, grads, {"rank": r, "update_gap": 1000, "scale": alpha},
                        residual="drop", lr=lr, weight_decay=wd, projector="svd")
    assert bases[0][0] == "right"
    torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)


def _group(residual, **options):
    w = torch.nn.Parameter(torch.zeros(8, 6))
    return gp.LowRankOptimizer([w], residual=residual, **options).param_groups[0]


def test_residual_defaults_are_the_papers():
    """Without options, APOLLO's update may grow by at most γ = 1.01 a step (Fira's and
    APOLLO's limiter), and FRUGAL's residual moves by κ = 1 (its pre-training setting): the
    second APOLLO update for a gradient twice as large is 1.01× the first, FRUGAL's residual
    update is sign(G) (catches other default γ or κ)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(8, 6, generator=gen)
    low = torch.randn(2, 6, generator=gen)  # side "left": R is r×n
    direction = torch.randn(2, 6, generator=gen)
    apollo, state = gp.RESIDUALS.create("apollo"), {}
    group = _group("apollo")
    first = apollo.combine(g, low, direction, None, state, group).norm()
    second = apollo.combine(2 * g, low, direction, None, state, group).norm()
    assert abs(float(second / first) - 1.01) < 1e-5
    frugal = gp.RESIDUALS.create("frugal")
    out = frugal.combine(g, low, direction, lambda x: torch.zeros(8, 6), {}, _group("frugal"))
    torch.testing.assert_close(out, torch.sign(g), rtol=0, atol=0)


def test_limits_at_the_edge_of_their_range_are_accepted():
    """γ = 1 (an update may not grow at all) and κ = 0 (FRUGAL without its residual) are
    valid options: the limiter then holds the norm exactly, the residual adds nothing
    (catches `>` for `>=` in the γ check and `<=` for `<` in the κ check)."""
    gen = torch.Generator().manual_seed(1)
    g, low, direction = torch.randn(8, 6, generator=gen), torch.randn(2, 6, generator=gen), torch.randn(2, 6, generator=gen)
    for name in ("fira", "apollo"):
        group = _group(name, norm_growth_limit=1)
        assert group["norm_growth_limit"] == 1
    apollo, state = gp.RESIDUALS.create("apollo"), {}
    group = _group("apollo", norm_growth_limit=1)
    first = apollo.combine(g, low, direction, None, state, group).norm()
    second = apollo.combine(3 * g, low, direction, None, state, group).norm()
    assert abs(float(second / first) - 1.0) < 1e-5
    group = _group("frugal", free_lr_scale=0)
    out = gp.RESIDUALS.create("frugal").combine(g, low, direction, lambda x: torch.ones(8, 6), {}, group)
    torch.testing.assert_close(out, torch.ones(8, 6), rtol=0, atol=0)  # back(·) alone
