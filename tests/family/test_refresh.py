"""Refresh policies: sign-invariant similarity, adaptive gap, moments keep | reset | rotate."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp
from gradproj.optimizers.refresh import subspace_similarity

EPS = torch.finfo(torch.float32).eps
TOL = dict(rtol=64 * EPS, atol=64 * EPS)


def orthonormal(d, r, seed):
    return torch.linalg.qr(torch.randn(d, r, generator=torch.Generator().manual_seed(seed)))[0]


@settings(max_examples=25, deadline=None)
@given(d=st.integers(4, 40), r=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_similarity_ignores_signs_order_and_rotations(d, r, seed):
    r = min(r, d - 1)
    q = orthonormal(d, r, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    signs = torch.where(torch.rand(r, generator=gen) < 0.5, -1.0, 1.0)
    rotation = orthonormal(r, r, seed + 2)
    moved = (q * signs)[:, torch.randperm(r, generator=gen)] @ rotation
    assert abs(subspace_similarity(q, moved) - 1.0) <= 16 * EPS * r
    other = torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    # an orthogonal complement shares no direction: every principal angle is 90°
    if 2 * r <= d:
        complement = other - q @ (q.T @ other)
        comp = torch.linalg.qr(complement)[0][:, :r]
        assert subspace_similarity(q, comp) <= 1e-3


def test_sign_flip_reads_as_change_for_qgalore_but_not_for_us():
    q = orthonormal(32, 1, 0)
    flipped = -q
    qgalore = torch.nn.functional.cosine_similarity(q.flatten(), flipped.flatten(), dim=0).item()
    assert qgalore == pytest.approx(-1.0)  # the reference's measure: "completely changed"
    assert subspace_similarity(q, flipped) == pytest.approx(1.0)


def stable_stream(m, n, k, steps, seed, flip=True):
    """Gradients from one fixed rank-k subspace; the SVD may return any sign of each vector."""
    gen = torch.Generator().manual_seed(seed)
    u, v = orthonormal(m, k, seed), orthonormal(n, k, seed + 1)
    out = []
    for _ in range(steps):
        s = torch.linspace(2.0, 1.0, k) * (torch.rand(k, generator=gen) + 0.5)
        if flip:
            s = s * torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
        out.append((u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=gen))
    return out


def refreshes(grads, shape, **options):
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 2}], lr=1e-3, **options)
    for g in grads:
        w.grad = g
        opt.step()
    return opt.state[w]


def test_adaptive_doubles_the_gap_on_a_stable_subspace_up_to_the_cap():
    grads = stable_stream(16, 24, 2, 120, seed=0)
    fixed = refreshes(grads, (16, 24), update_gap=2)
    adaptive = refreshes(grads, (16, 24), update_gap=2, refresh="adaptive", refresh_window=3,
                         refresh_max_factor=8)
    assert fixed["refreshes"] == 60
    assert adaptive["update_gap"] == 16  # 2 → 4 → 8 → 16, capped at 8 × 2
    assert adaptive["refreshes"] < fixed["refreshes"] / 3


def test_adaptive_keeps_the_gap_when_the_subspace_moves():
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(16, 24, generator=gen) for _ in range(40)]  # no shared subspace
    state = refreshes(grads, (16, 24), update_gap=2, refresh="adaptive", refresh_window=3)
    assert state["update_gap"] == 2 and state["refreshes"] == 20


@pytest.mark.parametrize("shape", [(10, 16), (16, 10)])
def test_rotate_carries_moments_into_the_new_basis(shape):
    r, b1, b2 = 3, 0.9, 0.999
    gen = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": r, "update_gap": 1}], moments="rotate")
    side = opt.side(w, opt.param_groups[0])

    def basis(g):
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u[:, :r] if side == "left" else vh[:r].T

    def proj(g, p):
        return p.T @ g if side == "left" else g @ p

    p1, p2 = basis(g1), basis(g2)
    m1, v1 = (1 - b1) * proj(g1, p1), (1 - b2) * proj(g1, p1) ** 2
    if side == "left":  # M' = P₂ᵀP₁·M, V' = (A∘A)·V
        a = p2.T @ p1
        m_rot, v_rot = a @ m1, (a * a) @ v1
    else:               # M' = M·P₁ᵀP₂, V' = V·(B∘B)
        b = p1.T @ p2
        m_rot, v_rot = m1 @ b, v1 @ (b * b)
    for g in (g1, g2):
        w.grad = g
        opt.step()
    state = opt.state[w]
    torch.testing.assert_close(state["exp_avg"], b1 * m_rot + (1 - b1) * proj(g2, p2), **TOL)
    torch.testing.assert_close(state["exp_avg_sq"], b2 * v_rot + (1 - b2) * proj(g2, p2) ** 2, **TOL)


def test_rotate_is_exact_when_the_subspace_only_changes_sign():
    # an exactly rank-2 gradient stream in one subspace, each singular value's sign
    # random per step. LAPACK fixes the sign of the left singular vectors, so the right
    # ones (the basis of side "right", m ≥ n) flip: A = P_newᵀP_old = diag(±1), and
    # rotating the moments makes the run equal to one that never refreshed
    u, v = orthonormal(18, 2, 0), orthonormal(12, 2, 1)
    gen = torch.Generator().manual_seed(2)
    grads = []
    for _ in range(6):
        s = torch.stack([3 + torch.rand(1, generator=gen), 1 + torch.rand(1, generator=gen)]).flatten()
        s = s * torch.where(torch.rand(2, generator=gen) < 0.5, -1.0, 1.0)
        grads.append((u * s) @ v.T)

    def final(**options):
        w = torch.nn.Parameter(torch.zeros(18, 12))
        opt = gp.LowRankOptimizer([{"params": [w], "rank": 2}], lr=1e-2, **options)
        for g in grads:
            w.grad = g
            opt.step()
        return w.detach()

    never = final(update_gap=1000)
    torch.testing.assert_close(final(update_gap=1, moments="rotate"), never, **TOL)
    assert not torch.allclose(final(update_gap=1, moments="keep"), never, **TOL)


@pytest.mark.parametrize("options,name", [
    ({"refresh": "sometimes"}, "refresh"), ({"moments": "rot"}, "moments"),
    ({"refresh_window": 0}, "refresh_window"), ({"refresh_threshold": 1.5}, "refresh_threshold"),
    ({"refresh_max_factor": 0}, "refresh_max_factor"),
])
def test_bad_refresh_option_names_the_option(options, name):
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=name):
        gp.LowRankOptimizer([w], **options)


def test_similarity_is_the_mean_cosine_of_the_principal_angles():
    """span{e1, e2} vs span{e1, cos a·e2 + sin a·e3}: principal angles 0 and a, so the
    similarity is (1 + cos a)/2 — not the smallest cosine, not the largest."""
    eye = torch.eye(6)
    for a in (0.0, 0.7, math.pi / 2):
        old = eye[:, :2]
        new = torch.stack([eye[:, 0], math.cos(a) * eye[:, 1] + math.sin(a) * eye[:, 2]], dim=1)
        assert subspace_similarity(old, new) == pytest.approx((1 + math.cos(a)) / 2, abs=1e-6)


def rotating_stream(steps, cos_two_steps, m=16, n=24):
    """Rank-1 gradients u(s)·vᵀ whose u turns by φ per step, cos 2φ = `cos_two_steps`: with
    a gap of 2 each refresh's basis has similarity |cos 2φ| to the previous one."""
    phi = math.acos(cos_two_steps) / 2
    e1, e2 = torch.eye(m)[:, 0], torch.eye(m)[:, 1]
    v = torch.linspace(1.0, 2.0, n)
    return [torch.outer(math.cos(phi * s) * e1 + math.sin(phi * s) * e2, v) for s in range(steps)]


def refresh_steps(grads, **options):
    w = torch.nn.Parameter(torch.zeros(grads[0].shape))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 1, "update_gap": 2}], lr=1e-3, **options)
    steps, count = [], 0
    for s, g in enumerate(grads):
        w.grad = g
        opt.step()
        if opt.state[w]["refreshes"] != count:
            count = opt.state[w]["refreshes"]
            steps.append(s)
    return steps, opt.state[w]


def test_adaptive_schedule_with_qgalores_defaults():
    """Q-GaLore's defaults (window 5, threshold 0.4, cap 8·T), similarity 0.45 per refresh:
    the gap stays T = 2 until 5 similarities are in the window (refreshes at 2..10), then
    doubles at every refresh whose window mean is ≥ 0.4, up to 16; the refresh is due at
    exactly step + gap."""
    steps, state = refresh_steps(rotating_stream(40, 0.45), refresh="adaptive")
    assert steps[:7] == [0, 2, 4, 6, 8, 10, 14], steps
    assert state["update_gap"] >= 8
    for gap in range(1, 5):  # between refreshes the gap is honoured exactly
        assert steps[gap] - steps[gap - 1] == 2
    # threshold just above the similarity: never doubles
    steps, state = refresh_steps(rotating_stream(40, 0.45), refresh="adaptive", refresh_threshold=0.46)
    assert steps == list(range(0, 40, 2)) and state["update_gap"] == 2


def test_every_refresh_of_a_seeded_projector_draws_a_new_basis():
    """The refresh passes seed·1_000_003 + step: each refresh of a random projector is a
    new draw, reproducible from the seed — even for the same gradient every step."""
    g = torch.randn(16, 24, generator=torch.Generator().manual_seed(0))
    w = torch.nn.Parameter(torch.zeros(16, 24))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 2, "update_gap": 1}], projector="gaussian")
    side = opt.side(w, opt.param_groups[0])
    seeds, bases = [], []
    for _ in range(3):
        w.grad = g.clone()
        opt.step()
        state = opt.state[w]
        seeds.append(state["proj_seed"])
        bases.append(opt.plugins(opt.param_groups[0])[1].load_basis(state, side, (16, 24)))
    assert seeds == [state["seed"] * 1_000_003 + t for t in range(3)]
    assert not torch.equal(bases[0], bases[1]) and not torch.equal(bases[1], bases[2])


def test_reset_restarts_the_moments_and_their_bias_correction():
    """moments = "reset" (FRUGAL): at the refresh of step 2 the moments are zeroed and the
    rule counts t from 1 again, so that step is exactly a first Adam step in the new basis:
    M = (1−β1)·R, V = (1−β2)·R², N = √(1−β2)/(1−β1)·M/(√V + ε); the step after it is t = 2."""
    shape, r, lr, alpha, (b1, b2), eps = (10, 16), 3, 1e-2, 0.25, (0.9, 0.999), 1e-6
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(shape, generator=gen) for _ in range(4)]
    w = torch.nn.Parameter(torch.zeros(shape))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": r, "update_gap": 2}], lr=lr, scale=alpha,
                              moments="reset")
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    before = w.detach().clone()
    w.grad = grads[2].clone()
    opt.step()
    state = opt.state[w]
    assert state["moments_origin"] == 2 and state["refreshes"] == 2
    p = torch.linalg.svd(grads[2], full_matrices=False)[0][:, :r]  # side left (m < n)
    low = p.T @ grads[2]
    m, v = (1 - b1) * low, (1 - b2) * low * low
    n = (1 - b2) ** 0.5 / (1 - b1) * m / (v.sqrt() + eps)
    torch.testing.assert_close(state["exp_avg"], m, **TOL)
    torch.testing.assert_close(w.detach() - before, -lr * alpha * (p @ n), **TOL)
    w.grad = grads[3].clone()
    opt.step()  # t = 2 from the reset
    low3 = p.T @ grads[3]
    m2, v2 = b1 * m + (1 - b1) * low3, b2 * v + (1 - b2) * low3 * low3
    n2 = (1 - b2 ** 2) ** 0.5 / (1 - b1 ** 2) * m2 / (v2.sqrt() + eps)
    after = before - lr * alpha * (p @ n) - lr * alpha * (p @ n2)
    torch.testing.assert_close(w.detach(), after, **TOL)


def test_similarity_window_holds_the_last_refreshes_oldest_first():
    """On the rotating stream (similarity |cos 2φ| = 0.45 at gap 2, |cos 4φ| = 0.595 at
    gap 4, |cos 8φ| = 0.292 at gap 8) the window after the refresh at step 22 holds the
    last five similarities in the order they came."""
    _, state = refresh_steps(rotating_stream(23, 0.45), refresh="adaptive")
    c2 = 0.45
    c4 = abs(2 * c2 ** 2 - 1)
    c8 = abs(2 * c4 ** 2 - 1)
    expected = torch.tensor([c2, c2, c2, c4, c8])
    torch.testing.assert_close(state["similarities"], expected, rtol=0, atol=1e-4)


def test_qgalore_defaults_cap_the_gap_at_eight_times_update_gap():
    """Default refresh_max_factor is 8 (Q-GaLore): on a stable subspace the gap of 2 grows
    2 → 4 → 8 → 16 and stops there (catches a default of 4, which stops at 8)."""
    grads = stable_stream(16, 24, 2, 200, seed=0)
    state = refreshes(grads, (16, 24), update_gap=2, refresh="adaptive", refresh_window=3)
    assert state["update_gap"] == 16


def test_two_sided_similarity_is_the_mean_of_the_sides():
    """proj_type "full" keeps a left and a right basis; the window records the mean of the
    two sides' similarities, so an unchanged gradient reads 1.0, never 2.0."""
    g = torch.randn(12, 20, generator=torch.Generator().manual_seed(4))
    w = torch.nn.Parameter(torch.zeros(12, 20))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 2, "update_gap": 1}], lr=1e-3,
                              proj_type="full", refresh="adaptive", refresh_window=2)
    for _ in range(3):
        w.grad = g.clone()
        opt.step()
    torch.testing.assert_close(opt.state[w]["similarities"], torch.tensor([1.0, 1.0]),
                               rtol=0, atol=1e-5)


def test_similarity_orthonormalises_a_skewed_basis_first():
    """span{e1, e1 + e2} is span{e1, e2}: similarity 1. Without the QR the cosines would be
    the singular values of [[1, 0], [1, 1]] (1.618, 0.618; clamped mean 0.809)."""
    eye = torch.eye(5)
    skewed = torch.stack([eye[:, 0], eye[:, 0] + eye[:, 1]], dim=1)
    assert subspace_similarity(skewed, eye[:, :2]) == pytest.approx(1.0, abs=1e-6)
    assert subspace_similarity(eye[:, :2], 3.0 * skewed) == pytest.approx(1.0, abs=1e-6)


def test_rotate_with_a_non_orthonormal_basis_maps_a_moment_in_its_span_exactly():
    """Gaussian bases are not orthonormal: R = PᵀG, and rotation maps M by
    A = P₂ᵀP₁(P₁ᵀP₁)⁻¹. For G₁ = P₁·X (inside span P₁) that gives exactly (1−β1)·P₂ᵀG₁,
    so after step 2 M = β1(1−β1)·P₂ᵀG₁ + (1−β1)·P₂ᵀG₂ (catches a rotation without the
    pseudo-inverse correction)."""
    shape, r, b1 = (10, 16), 3, 0.9
    gen = torch.Generator().manual_seed(6)

    def make():
        w = torch.nn.Parameter(torch.zeros(shape))
        opt = gp.LowRankOptimizer([{"params": [w], "rank": r, "update_gap": 1}], lr=1e-3,
                                  projector="gaussian", moments="rotate")
        return w, opt

    def basis(w, opt):
        side = opt.side(w, opt.param_groups[0])
        assert side == "left"
        return opt.plugins(opt.param_groups[0])[1].load_basis(opt.state[w], side, shape)

    probe, probe_opt = make()  # the same seed: the same first basis P₁
    probe.grad = torch.randn(shape, generator=gen)
    probe_opt.step()
    p1 = basis(probe, probe_opt).clone()
    assert not torch.allclose(p1.T @ p1, torch.eye(r), atol=1e-3)  # really not orthonormal
    g1 = p1 @ torch.randn(r, shape[1], generator=gen)
    g2 = torch.randn(shape, generator=gen)
    w, opt = make()
    for g in (g1, g2):
        w.grad = g.clone()
        opt.step()
    p2 = basis(w, opt)
    assert not torch.allclose(p1, p2)
    expected = b1 * (1 - b1) * (p2.T @ g1) + (1 - b1) * (p2.T @ g2)
    torch.testing.assert_close(opt.state[w]["exp_avg"], expected, rtol=1e-4, atol=1e-5)
