"""Each new rule against its paper's update spelled out in plain torch, on fixed gradients."""
import math

import pytest
import torch

import gradproj as gp

EPS = torch.finfo(torch.float32).eps
# a handful of fp32 roundings per element per step, over a few steps: 64 eps relative
TOL = dict(rtol=64 * EPS, atol=64 * EPS)


def fixed_grads(shape, steps=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * (1 + t) for t in range(steps)]


def run_full_rank(w0, grads, **options):
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w], "lowrank": False}], **options)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    return w.detach(), opt.state[w]


@pytest.mark.parametrize("state_format", ["fp32", "q8"])
def test_lion_is_sign_of_interpolated_momentum(state_format):
    # fp32 states take the fused lion_update (its reference on CPU); a q8 moment this small
    # (30 < 4096 values) is stored fp32 by the format and takes the rule's own PyTorch path
    w0, grads, lr, (b1, b2) = torch.randn(6, 5), fixed_grads((6, 5)), 1e-3, (0.9, 0.99)
    w, m = w0.clone(), torch.zeros_like(w0)
    for g in grads:  # Chen et al. 2023, Alg. 2 (wd 0, the default)
        c = b1 * m + (1 - b1) * g
        w = w - lr * torch.sign(c)
        m = b2 * m + (1 - b2) * g
    got, state = run_full_rank(w0, grads, rule="lion", lr=lr, state_format=state_format)
    torch.testing.assert_close(got, w, **TOL)
    torch.testing.assert_close(state["exp_avg"], m, **TOL)
    assert gp.RULES.get("lion").defaults["betas"] == (0.9, 0.99)


def test_adamw_defaults_are_galore_torchs():
    """galore-torch's AdamW: betas (0.9, 0.999), ε 1e-6 outside the root, bias correction on.
    ε matters where √V is small: gradients of 1e-7 move by lr·N with N ≈ 0.1, not ≈ 1."""
    assert gp.RULES.get("adamw").defaults == {"betas": (0.9, 0.999), "eps": 1e-6, "correct_bias": True}
    w0, g = torch.zeros(4, 3), torch.full((4, 3), 1e-7)
    default, _ = run_full_rank(w0, [g], rule="adamw", lr=1.0)
    # t = 1: M = 0.1·g, V = 0.001·g², c = √0.001/0.1; N = c·M/(√V + ε)
    m, v = 0.1 * 1e-7, 0.001 * 1e-14
    n = (0.001 ** 0.5 / 0.1) * m / (v ** 0.5 + 1e-6)
    torch.testing.assert_close(default, torch.full((4, 3), -n), rtol=1e-5, atol=0)


def test_lion_update_has_unit_magnitude_per_entry():
    # |sign(c)| = 1 wherever c ≠ 0: every entry moves by exactly lr
    w0 = torch.zeros(4, 3)
    got, _ = run_full_rank(w0, [torch.randn(4, 3)], rule="lion", lr=0.5)
    assert torch.equal(got.abs(), torch.full((4, 3), 0.5))


def adafactor_reference(w, grads, lr, decay=-0.8, eps1=1e-30, clip=1.0, beta1=0.0):
    rows, cols, m = torch.zeros(w.shape[0]), torch.zeros(w.shape[1]), torch.zeros(w.shape)
    for t, g in enumerate(grads, 1):  # Shazeer & Stern 2018, Alg. 4 + update clipping
        beta2t = 1 - t ** decay
        sq = g * g + eps1
        rows = beta2t * rows + (1 - beta2t) * sq.mean(dim=1)
        cols = beta2t * cols + (1 - beta2t) * sq.mean(dim=0)
        v_hat = torch.outer(rows, cols) / rows.mean()
        u = g / v_hat.sqrt()
        u = u / max(1.0, (u.pow(2).mean().sqrt() / clip).item())
        if beta1:  # optional first moment of the clipped update
            m = beta1 * m + (1 - beta1) * u
            u = m
        w = w - lr * u
    return w, rows, cols


@pytest.mark.parametrize("clip,beta1", [(1e3, 0.0), (1.0, 0.9), (1e3, 0.9)])
def test_adafactor_unclipped_and_with_first_moment(clip, beta1):
    """Clipping at RMS 1 hides the scale of V̂ (the clipped update has RMS 1 whatever V̂'s
    scale): with clip_threshold 1e3 the factored V̂ = R·Cᵀ/mean(R) itself is checked; β1
    adds the first moment of the clipped update."""
    w0, grads = torch.randn(7, 5), fixed_grads((7, 5))
    ref, _, _ = adafactor_reference(w0, grads, lr=1e-2, clip=clip, beta1=beta1)
    got, state = run_full_rank(w0, grads, rule="adafactor", lr=1e-2, clip_threshold=clip, beta1=beta1)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("step,rho", [(1, 1e-2), (120, 1e-2), (40_000, 1 / 200)])
def test_adafactor_relative_step_is_min_of_1e_2_and_inverse_sqrt_t(step, rho):
    """ρₜ = min(1e-2, 1/√t) through the per-tensor Rule API, at t = 1, 120 (1/t would
    already be below 1e-2) and 40 000 (1/√t = 0.005)."""
    rule, fmt = gp.RULES.create("adafactor"), gp.STATE_FORMATS.create("fp32")
    g = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    out = {}
    for relative in (False, True):
        group = {**rule.defaults, "relative_step": relative}
        state = {"step": step}
        rule.init_state(state, (6, 4), torch.device("cpu"), fmt)
        out[relative] = rule.update(g, state, group, fmt)
    torch.testing.assert_close(out[True], rho * out[False], rtol=1e-6, atol=0)


def test_adafactor_rotates_factored_moments_by_squared_maps():
    """rotate_moments(A, B): row means by A∘A, column means by (B∘B)ᵀ, first moment A·M·B."""
    rule, fmt = gp.RULES.create("adafactor"), gp.STATE_FORMATS.create("fp32")
    gen = torch.Generator().manual_seed(2)
    group = {**rule.defaults, "beta1": 0.9}
    state = {"step": 1}
    rule.init_state(state, (4, 6), torch.device("cpu"), fmt)
    rule.update(torch.randn(4, 6, generator=gen), state, group, fmt)
    row, col, m = state["exp_avg_sq_row"].clone(), state["exp_avg_sq_col"].clone(), state["exp_avg"].clone()
    a, b = torch.randn(4, 4, generator=gen), torch.randn(6, 6, generator=gen)
    rule.rotate_moments(state, fmt, a, b)
    torch.testing.assert_close(state["exp_avg_sq_row"], (a * a) @ row, **TOL)
    torch.testing.assert_close(state["exp_avg_sq_col"], col @ (b * b), **TOL)
    torch.testing.assert_close(state["exp_avg"], a @ m @ b, **TOL)


def test_adafactor_factored_second_moment():
    w0, grads = torch.randn(7, 5), fixed_grads((7, 5))
    ref, rows, cols = adafactor_reference(w0, grads, lr=1e-2)
    got, state = run_full_rank(w0, grads, rule="adafactor", lr=1e-2)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(state["exp_avg_sq_row"], rows, **TOL)
    torch.testing.assert_close(state["exp_avg_sq_col"], cols, **TOL)
    # 7 + 5 numbers instead of 7·5: the point of factoring
    assert sum(v.numel() for v in state.values() if torch.is_tensor(v)) == 12


def test_adafactor_runs_on_the_projected_gradient():
    # GaLore's reference applies Adafactor to R = PᵀG: its moments are r + n long
    m, n, r, lr, scale = 12, 20, 3, 1e-2, 0.25
    w0, grads = torch.randn(m, n), fixed_grads((m, n), steps=3)
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w], "rank": r, "update_gap": 100}], rule="adafactor",
                              lr=lr, scale=scale)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    p = torch.linalg.svd(grads[0], full_matrices=False)[0][:, :r]  # left side (m < n), fit at step 0
    low_ref = adafactor_reference(torch.zeros(r, n), [p.T @ g for g in grads], lr=1.0)[0]
    torch.testing.assert_close(w.detach(), w0 + lr * scale * (p @ low_ref), **TOL)
    assert opt.state[w]["exp_avg_sq_row"].shape == (r,) and opt.state[w]["exp_avg_sq_col"].shape == (n,)


def test_adafactor_first_moment_and_relative_step():
    w0, grads = torch.randn(4, 6), fixed_grads((4, 6), steps=3)
    plain, _ = run_full_rank(w0, grads[:1], rule="adafactor", lr=1.0)
    relative, _ = run_full_rank(w0, grads[:1], rule="adafactor", lr=1.0, relative_step=True)
    # ρ₁ = min(1e-2, 1/√1) = 1e-2
    torch.testing.assert_close(w0 - relative, 1e-2 * (w0 - plain), **TOL)
    _, state = run_full_rank(w0, grads, rule="adafactor", beta1=0.9)
    assert state["exp_avg"].shape == (4, 6)


def test_adabelief_matches_the_authors_update():
    w0, grads, lr, (b1, b2), eps = torch.randn(5, 4), fixed_grads((5, 4)), 1e-3, (0.9, 0.999), 1e-16
    w, m, s = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
    for t, g in enumerate(grads, 1):  # adabelief-pytorch 0.2.0, decoupled wd 0
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        denom = (s / (1 - b2 ** t)).sqrt() + eps
        w = w - lr / (1 - b1 ** t) * m / denom
    got, state = run_full_rank(w0, grads, rule="adabelief", lr=lr)
    torch.testing.assert_close(got, w, **TOL)
    torch.testing.assert_close(state["exp_avg_var"], s, **TOL)


@pytest.mark.parametrize("momentum,dampening,nesterov,wd",
                         [(0.9, 0.0, False, 0.0), (0.9, 0.0, True, 0.0), (0.8, 0.3, False, 0.0),
                          (0.0, 0.0, False, 0.0), (0.9, 0.0, False, 0.1), (0.9, 0.0, True, 0.05),
                          (0.0, 0.0, False, 0.1)])
def test_sgdm_matches_torch_sgd(momentum, dampening, nesterov, wd):
    """torch.optim.SGD's direction; weight decay is the optimizer's decoupled one, applied
    after the step (W ← W − lr·d, then W ← W − lr·wd·W), not SGD's L2 term in the gradient."""
    w0, grads, lr = torch.randn(5, 3), fixed_grads((5, 3), steps=5), 0.05
    ref = torch.nn.Parameter(w0.clone())
    sgd = torch.optim.SGD([ref], lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
    for g in grads:
        ref.grad = g.clone()
        sgd.step()
        with torch.no_grad():
            ref.mul_(1 - lr * wd)
    got, _ = run_full_rank(w0, grads, rule="sgdm", lr=lr, momentum=momentum,
                           dampening=dampening, nesterov=nesterov, weight_decay=wd)
    torch.testing.assert_close(got, ref.detach(), **TOL)
    if wd:  # the decay is really applied: without it the weights differ by ≈ lr·wd·|W| per step
        plain, _ = run_full_rank(w0, grads, rule="sgdm", lr=lr, momentum=momentum,
                                 dampening=dampening, nesterov=nesterov)
        assert (plain - got).abs().max() > 1e-3


@pytest.mark.parametrize("rule,options,name", [
    ("lion", {"betas": (0.9, 1.0)}, "betas"),
    ("adafactor", {"decay_rate": 0.5}, "decay_rate"),
    ("adafactor", {"beta1": -0.1}, "beta1"),
    ("adafactor", {"eps1": 0.0}, "eps1"),
    ("adafactor", {"relative_step": "yes"}, "relative_step"),
    ("adabelief", {"eps": -1.0}, "eps"),
    ("sgdm", {"momentum": 1.5}, "momentum"),
    ("sgdm", {"nesterov": True, "momentum": 0.0}, "nesterov"),
])
def test_bad_rule_option_names_the_option(rule, options, name):
    w = torch.nn.Parameter(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=name):
        gp.LowRankOptimizer([w], rule=rule, **options)


def test_lion_magnitude_is_lr_not_gradient_scale():
    # sign() makes the step independent of the gradient's scale (1e-6 or 1e6)
    w0 = torch.zeros(3, 3)
    small, _ = run_full_rank(w0, [torch.full((3, 3), 1e-6)], rule="lion", lr=0.1)
    large, _ = run_full_rank(w0, [torch.full((3, 3), 1e6)], rule="lion", lr=0.1)
    assert torch.equal(small, large) and math.isclose(small[0, 0].item(), -0.1, rel_tol=1e-6)


@pytest.mark.parametrize("fmt_name", ["q8", "q4"])
def test_adafactor_second_moments_use_the_unsigned_maps(fmt_name):
    """Row/column means of G² are ≥ 0: quantized, they take the unsigned map (bitsandbytes'
    and torchao's second-moment maps); a signed map would spend half its codes on
    negatives. 4096 x 2 gradient: the 4096-long row moment is quantized."""
    rule, fmt = gp.RULES.create("adafactor"), gp.STATE_FORMATS.create(fmt_name)
    state = {"step": 0}
    rule.init_state(state, (4096, 2), torch.device("cpu"), fmt)
    assert state["exp_avg_sq_row.signed"] is False and "exp_avg_sq_row.codes" in state


def test_adafactor_state_bytes_are_a_row_and_a_column_mean():
    """A 6×10 gradient keeps 6 row means and 10 column means: (6 + 10)·4 fp32 bytes (catches
    a column moment sized by the rows, which a square shape would hide)."""
    rule, fmt = gp.RULES.create("adafactor"), gp.STATE_FORMATS.create("fp32")
    assert rule.state_nbytes((6, 10), fmt) == 4 * (6 + 10)
    assert rule.state_nbytes((10,), fmt) == 4 * 10


def test_adafactor_first_step_on_a_rank_one_square_is_the_sign():
    """G∘G = a·bᵀ has rank one, so t = 1's factored V̂ = R·Cᵀ/mean(R) is G∘G exactly and
    U = G/√V̂ = sign(G), RMS 1: no clipping, W moves by −lr·sign(G). Catches a column (or
    row) moment of sums instead of means, an RMS taken as the norm, and an ε1 that is not
    negligible next to G²."""
    gen = torch.Generator().manual_seed(3)
    u, v = torch.rand(6, generator=gen) + 0.5, torch.rand(9, generator=gen) + 0.5
    signs = torch.where(torch.rand(6, 9, generator=gen) < 0.5, -1.0, 1.0)
    g = torch.outer(u, v) * signs * 0.03  # |G| ~ 1e-2: G² ~ 1e-4
    got, _ = run_full_rank(torch.zeros(6, 9), [g], rule="adafactor", lr=0.1)
    torch.testing.assert_close(got, -0.1 * torch.sign(g), rtol=1e-5, atol=1e-6)


def test_adafactor_first_step_on_a_vector_is_the_sign():
    """1-D tensors keep an unfactored V: at t = 1 V = G² + ε1 with ε1 = 1e-30, so
    U = sign(G), RMS 1, and W moves by −lr·sign(G) even for |G| ~ 1e-3 (catches a larger
    default ε1 and an update clipped by its norm instead of its RMS)."""
    g = torch.tensor([-2e-3, -1e-3, -5e-4, 4e-4, 1e-3, 3e-3, 2e-3, -3e-3])
    got, _ = run_full_rank(torch.zeros(8), [g], rule="adafactor", lr=0.5)
    torch.testing.assert_close(got, -0.5 * torch.sign(g), rtol=1e-6, atol=0)


@pytest.mark.parametrize("rule,first,signs", [
    ("adamw", 0.1, {"exp_avg": True, "exp_avg_sq": False}),
    ("lion", 0.01, {"exp_avg": True}),  # M ← β2·M + (1−β2)·G with β2 = 0.99
    ("diffgrad", 0.1, {"exp_avg": True, "exp_avg_sq": False, "previous_grad": True}),
])
def test_quantized_moments_take_the_map_of_their_sign(rule, first, signs):
    """First moments (and diffGrad's previous gradient) change sign: the signed map; second
    moments are means of G² ≥ 0: the unsigned one. After one step on an all-negative 64×64
    gradient (4096 values: quantized) the q8 first moment is (1−β)·G, not clamped to 0."""
    g = -(torch.rand(64, 64, generator=torch.Generator().manual_seed(4)) + 0.5)
    _, state = run_full_rank(torch.zeros(64, 64), [g], rule=rule, lr=1e-3, state_format="q8")
    assert {key: state[f"{key}.signed"] for key in signs} == signs
    m = gp.STATE_FORMATS.create("q8").read(state, "exp_avg")
    torch.testing.assert_close(m, first * g, rtol=0.03, atol=0.0)
