"""LAMB, diffGrad and AdamP against their papers spelled out in plain torch (always run) and
against the reference packages (torch-optimizer's Lamb and DiffGrad, the authors' `adamp`;
skipped when not installed): ≤ 1e-6 on every weight over 25 autograd steps at full rank.

The model trains on real losses, so the gradients follow the weights and a wrong step
shows up in every later one. BatchNorm after the first Linear makes its rows
scale-invariant (AdamP's channel view detects it), LayerNorm after the second makes that
weight invariant as a whole (the layer view), and the head is neither.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradproj as gp
from gradproj.optimizers.lowrank import LowRankOptimizer

STEPS, LR, WD = 25, 3e-3, 0.1


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, bias=False), nn.BatchNorm1d(16), nn.Tanh(),
                         nn.Linear(16, 8, bias=False), nn.LayerNorm(8), nn.Linear(8, 4))


def train(model, step_fn, steps=STEPS):
    """`step_fn(params)` applies one update from the params' .grad; returns the final weights."""
    gen = torch.Generator().manual_seed(1)
    params = list(model.parameters())
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=gen), torch.randn(32, 4, generator=gen)
        for p in params:
            p.grad = None
        F.mse_loss(model(x), y).backward()
        with torch.no_grad():
            step_fn(params)
    return [p.detach().clone() for p in params]


def with_optimizer(opt_class, **options):
    def run(model):
        opt = opt_class(model.parameters(), **options)
        return train(model, lambda _: opt.step())
    return run


def ours(**options):
    return with_optimizer(LowRankOptimizer, lr=LR, **options)


def assert_same(got, want, atol=1e-6):
    moved = max((w - w0).abs().max().item() for w, w0 in zip(want, make_model().parameters()))
    assert moved > 100 * atol  # the run really trains: the comparison is not vacuous
    for i, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        assert err <= atol, f"parameter {i} {tuple(a.shape)}: max |err| {err:.3g} > {atol}"


# -- spelled-out references (You et al. 2020 Alg. 2; Dubey et al. 2019 Alg. 1; Heo et al. 2021 Alg. 2)
def lamb_reference(correct_bias=True, b1=0.9, b2=0.999, eps=1e-6, clamp=10.0):
    state = {}

    def step(params):
        for p in params:
            m, v, t = state.get(p, (torch.zeros_like(p), torch.zeros_like(p), 0))
            t += 1
            m = b1 * m + (1 - b1) * p.grad
            v = b2 * v + (1 - b2) * p.grad ** 2
            m_hat, v_hat = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if correct_bias else (m, v)
            u = m_hat / (v_hat.sqrt() + eps) + WD * p
            w_norm, u_norm = min(p.norm().item(), clamp), u.norm().item()
            ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            p -= LR * ratio * u
            state[p] = (m, v, t)
    return lambda model: train(model, step)


def diffgrad_reference(b1=0.9, b2=0.999, eps=1e-8):
    state = {}

    def step(params):
        for p in params:
            m, v, prev, t = state.get(p, (torch.zeros_like(p), torch.zeros_like(p),
                                          torch.zeros_like(p), 0))
            g, t = p.grad, t + 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            xi = 1 / (1 + torch.exp(-(prev - g).abs()))  # friction, in [1/2, 1)
            # ε beside √v, as the authors' code: √(1−β2ᵗ)/(1−β1ᵗ)·ξ·m/(√v + ε)
            p -= LR * (math.sqrt(1 - b2 ** t) / (1 - b1 ** t)) * xi * m / (v.sqrt() + eps)
            state[p] = (m, v, g.clone(), t)
    return lambda model: train(model, step)


def adamp_reference(nesterov=False, b1=0.9, b2=0.999, eps=1e-8, delta=0.1, wd_ratio=0.1,
                    detected=None):
    state = {}

    def step(params):
        for p in params:
            m, v, t = state.get(p, (torch.zeros_like(p), torch.zeros_like(p), 0))
            g, t = p.grad, t + 1
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            m_hat = (b1 * m + (1 - b1) * g if nesterov else m) / (1 - b1 ** t)
            update = m_hat / ((v / (1 - b2 ** t)).sqrt() + eps)
            decay = WD
            if p.dim() > 1:
                for view in ("channel", "layer"):
                    rows = [(p[i].reshape(-1), g[i].reshape(-1)) for i in range(p.shape[0])] \
                        if view == "channel" else [(p.reshape(-1), g.reshape(-1))]
                    width = rows[0][0].numel()
                    cos = max(abs(float(w @ q) / max(float(w.norm() * q.norm()), eps)) for w, q in rows)
                    if cos < delta / math.sqrt(width):  # scale-invariant: drop the radial part
                        flat_u = update.reshape(len(rows), -1)
                        for i, (w, _) in enumerate(rows):
                            w_hat = w / (w.norm() + eps)
                            flat_u[i] -= w_hat * (w_hat @ flat_u[i])
                        decay = WD * wd_ratio
                        if detected is not None:
                            detected.add((tuple(p.shape), view))
                        break
            p.mul_(1 - LR * decay)
            p -= LR * update
            state[p] = (m, v, t)
    return lambda model: train(model, step)


@pytest.mark.parametrize("correct_bias", [True, False])
def test_lamb_matches_the_paper_spelled_out(correct_bias):
    want = lamb_reference(correct_bias=correct_bias)(make_model())
    got = ours(rule="lamb", weight_decay=WD, correct_bias=correct_bias)(make_model())
    assert_same(got, want)


def test_lamb_clamp_bounds_the_step_by_clamp_value():
    """φ(‖W‖) = min(‖W‖, clamp): a weight of norm 40 moves by lr·10, not lr·40."""
    w = nn.Parameter(torch.full((4, 4), 10.0))  # ‖W‖ = 40
    opt = LowRankOptimizer([w], rule="lamb", lr=0.01)
    w.grad = torch.randn(4, 4)
    before = w.detach().clone()
    opt.step()
    assert math.isclose((w.detach() - before).norm().item(), 0.01 * 10.0, rel_tol=1e-4)


def test_lamb_zero_weight_takes_the_plain_adam_step():
    """‖W‖ = 0 (a zero-initialised bias): trust ratio 1, so W moves by lr·u, not by 0."""
    w = nn.Parameter(torch.zeros(5))
    opt = LowRankOptimizer([w], rule="lamb", lr=0.1)
    w.grad = torch.tensor([1.0, -2.0, 3.0, 0.0, 1e-3])
    opt.step()
    # t = 1 with bias correction: m̂ = g, v̂ = g², u = g/(|g| + ε)
    g = w.grad
    torch.testing.assert_close(w.detach(), -0.1 * g / (g.abs() + 1e-6), rtol=1e-6, atol=1e-9)


def test_lamb_zero_update_leaves_the_weight_alone():
    """‖u‖ = 0 (a zero gradient, no decay): ratio 1, W unchanged — not 0·∞ = NaN."""
    w = nn.Parameter(torch.randn(3, 4))
    before = w.detach().clone()
    opt = LowRankOptimizer([w], rule="lamb", lr=0.1)
    w.grad = torch.zeros(3, 4)
    opt.step()
    assert torch.equal(w.detach(), before)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_matches_the_paper_spelled_out(nesterov):
    detected: set = set()
    want = adamp_reference(nesterov=nesterov, detected=detected)(make_model())
    # both views detect: BatchNorm'd rows (channel), LayerNorm'd weight (layer); not the head
    assert detected == {((16, 8), "channel"), ((8, 16), "layer")}
    got = ours(rule="adamp", weight_decay=WD, nesterov=nesterov)(make_model())
    assert_same(got, want)


def test_diffgrad_matches_the_paper_spelled_out():
    got = ours(rule="diffgrad")(make_model())
    assert_same(got, diffgrad_reference()(make_model()))


# -- the reference packages ----------------------------------------------------------------
def test_lamb_matches_torch_optimizer():
    """torch-optimizer's Lamb (its defaults: debias False, clamp 10, ε 1e-6) is
    `correct_bias = false`; the trust ratio is taken on u = m/(√v + ε) + wd·W in both."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    want = with_optimizer(torch_optimizer.Lamb, lr=LR, weight_decay=WD)(make_model())
    got = ours(rule="lamb", weight_decay=WD, correct_bias=False)(make_model())
    assert_same(got, want)


def test_diffgrad_matches_torch_optimizer():
    """The authors' DiffGrad (as torch-optimizer ships it). Its weight decay is L2 added to
    G; ours is decoupled (the optimizer's), so both run without decay here."""
    torch_optimizer = pytest.importorskip("torch_optimizer")
    want = with_optimizer(torch_optimizer.DiffGrad, lr=LR)(make_model())
    assert_same(ours(rule="diffgrad")(make_model()), want)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adamp_matches_the_official_package(nesterov):
    adamp = pytest.importorskip("adamp")
    want = with_optimizer(adamp.AdamP, lr=LR, weight_decay=WD, nesterov=nesterov)(make_model())
    assert_same(ours(rule="adamp", weight_decay=WD, nesterov=nesterov)(make_model()), want)


# -- low-rank groups: the trust ratio and the projection see the full-size update ----------
def lowrank_step(rule, residual="drop", fuse=False, monkeypatch=None, **options):
    """One low-rank step of a 24×16 weight (rank 4) at step 2 (moments warm); (W0, W1, G)."""
    torch.manual_seed(3)
    w = nn.Parameter(torch.randn(24, 16))
    opt = LowRankOptimizer([{"params": [w], "lowrank": True, "rank": 4}], rule=rule,
                           residual=residual, lr=1e-2, update_gap=10, **options)
    if fuse:  # the fused back-projection would run here on CUDA: pretend it does
        monkeypatch.setattr(LowRankOptimizer, "_fusable", staticmethod(lambda *a: True))
    w.grad = torch.randn(24, 16)
    opt.step()
    w.grad = torch.randn(24, 16)
    before = w.detach().clone()
    opt.step()
    return before, w.detach().clone(), w.grad


@pytest.mark.parametrize("residual", ["drop", "fira", "frugal", "apollo"])
def test_lamb_trust_ratio_is_taken_on_the_full_size_update(residual):
    """‖ΔW‖ = lr·φ(‖W‖) exactly, whatever the residual adds: the ratio is computed on what
    W receives. Taken on the r×n direction N instead, ‖ΔW‖ would be lr·‖W‖·‖U‖/‖N‖
    (GaLore's scale 0.25 alone makes that 4× too small)."""
    before, after, _ = lowrank_step("lamb", residual)
    expected = 1e-2 * min(before.norm().item(), 10.0)
    assert math.isclose((after - before).norm().item(), expected, rel_tol=1e-4)


def test_finishing_rules_never_take_the_fused_back_projection(monkeypatch):
    """The fused GEMM writes W − lr·scale·back(N) − lr·wd·W without forming U; a rule that
    `finishes_update` must still get its full-size update (the step's norm shows it)."""
    before, after, _ = lowrank_step("lamb", fuse=True, monkeypatch=monkeypatch)
    assert math.isclose((after - before).norm().item(), 1e-2 * min(before.norm().item(), 10.0),
                        rel_tol=1e-4)


def test_adamp_gradient_against_the_weight_is_not_scale_invariant():
    """AdamP compares |cos|: a gradient along −W (cos −1 in every row and as a whole) is as
    radial as one along +W, so neither view projects and the update is left as it is."""
    from gradproj.rules.adamp import project_scale_invariant
    torch.manual_seed(5)
    w, u = torch.randn(2, 24, 16), torch.randn(2, 24, 16)
    for sign in (1.0, -1.0):
        out, invariant = project_scale_invariant(w, u.clone(), sign * w, 0.1, 1e-8)  # in place
        assert not invariant.any() and torch.equal(out, u)
    tangent = torch.randn(2, 24, 16)
    tangent -= (tangent * w).sum(2, keepdim=True) * w / (w * w).sum(2, keepdim=True)
    out, invariant = project_scale_invariant(w, u.clone(), tangent, 0.1, 1e-8)  # ⟂ W: detected
    assert invariant.all() and (out * w).sum(2).abs().max() < 1e-4


def tangent_run(delta):
    """3 low-rank AdamP steps (wd 0.5) of a weight whose gradient is orthogonal to each of
    its rows, as a per-row scale invariance makes it; (W before the last step, its step)."""
    torch.manual_seed(4)
    w = nn.Parameter(torch.randn(24, 16))
    opt = LowRankOptimizer([{"params": [w], "lowrank": True, "rank": 4}], rule="adamp",
                           lr=1e-2, weight_decay=0.5, delta=delta)
    for _ in range(3):
        g = torch.randn(24, 16)
        w.grad = g - (g * w).sum(1, keepdim=True) * w / (w * w).sum(1, keepdim=True)
        before = w.detach().clone()
        opt.step()
    return before, w.detach() - before


def test_adamp_low_rank_update_is_tangent_on_a_scale_invariant_weight():
    """The full gradient detects the invariance (its rows are orthogonal to W's; the
    back-projected update's are not), and the full-size update loses its radial part row
    by row, with the decay shrunk to wd·wd_ratio. With δ too small to detect, the same run
    moves radially."""
    before, step = tangent_run(delta=0.1)
    decay = -1e-2 * 0.5 * 0.1 * before  # wd_ratio 0.1
    radial = ((step - decay) * before).sum(1) / before.norm(dim=1)
    assert radial.abs().max() < 1e-4 * step.norm(dim=1).max()  # W's fp32 rounding: 3e-5
    before, step = tangent_run(delta=1e-12)
    radial = ((step + 1e-2 * 0.5 * before) * before).sum(1) / before.norm(dim=1)
    assert radial.abs().max() > 0.05 * step.norm(dim=1).max()


def test_diffgrad_previous_gradient_rotates_with_the_moments(monkeypatch):
    """In a low-rank group G_prev is the projected gradient: on a "rotate" refresh it maps as
    M does (A·G_prev with A = P_newᵀ·P_old, left side); "reset" zeroes it."""
    torch.manual_seed(5)
    for moments in ("rotate", "reset"):
        w = nn.Parameter(torch.randn(12, 20))  # m < n: std projects on the left
        opt = LowRankOptimizer([{"params": [w], "lowrank": True, "rank": 3}], rule="diffgrad",
                               update_gap=2, moments=moments)
        for _ in range(2):
            w.grad = torch.randn(12, 20)
            opt.step()
        state = opt.state[w]
        old_basis, old_prev = state["proj_left"].clone(), state["previous_grad"].clone()
        fmt = opt.plugins(opt.param_groups[0])[2]
        seen = {}
        original = fmt.diffgrad_step

        def spy(st, m, v, prev, *args):
            seen["prev"] = st[prev].clone()
            return original(st, m, v, prev, *args)
        monkeypatch.setattr(fmt, "diffgrad_step", spy)
        w.grad = torch.randn(12, 20)
        opt.step()  # step 2: refresh, then the rule
        monkeypatch.undo()
        new_basis = state["proj_left"]
        expected = (new_basis.T @ old_basis) @ old_prev if moments == "rotate" else 0 * old_prev
        torch.testing.assert_close(seen["prev"].squeeze(0), expected, rtol=1e-5, atol=1e-6)
        assert not torch.equal(old_basis, new_basis)


def test_state_bytes_count_the_previous_gradient():
    fmt = gp.STATE_FORMATS.create("fp32")
    assert gp.RULES.create("diffgrad").state_nbytes((4, 64), fmt) == 3 * 4 * 4 * 64
    assert gp.RULES.create("lamb").state_nbytes((4, 64), fmt) == 2 * 4 * 4 * 64
    assert gp.RULES.create("adamp").state_nbytes((4, 64), fmt) == 2 * 4 * 4 * 64


@pytest.mark.parametrize("rule,options,name", [
    ("lamb", {"clamp_value": 0}, "clamp_value"),
    ("lamb", {"correct_bias": 1}, "correct_bias"),
    ("lamb", {"betas": (0.9,)}, "betas"),
    ("diffgrad", {"eps": -1.0}, "eps"),
    ("diffgrad", {"betas": (0.9, 1.0)}, "betas"),
    ("adamp", {"delta": 0}, "delta"),
    ("adamp", {"wd_ratio": 2.0}, "wd_ratio"),
    ("adamp", {"nesterov": "yes"}, "nesterov"),
])
def test_bad_option_names_the_option(rule, options, name):
    with pytest.raises(ValueError, match=f"option '{name}'"):
        LowRankOptimizer([nn.Parameter(torch.zeros(2, 2))], rule=rule, **options)


def test_presets_carry_the_papers_defaults():
    lamb, diffgrad, adamp = (gp.PRESETS.get(n) for n in ("lamb", "diffgrad", "adamp"))
    assert (lamb["rule"], lamb["eps"], lamb["clamp_value"], lamb["correct_bias"]) == ("lamb", 1e-6, 10.0, True)
    assert (diffgrad["rule"], diffgrad["betas"], diffgrad["eps"]) == ("diffgrad", (0.9, 0.999), 1e-8)
    assert (adamp["rule"], adamp["delta"], adamp["wd_ratio"], adamp["nesterov"]) == ("adamp", 0.1, 0.1, False)


def test_int8_weights_hand_the_rule_their_dequantized_values(monkeypatch):
    """Q-GaLore's INT8 weights: the rule finishes U against the dequantized W, and W then
    moves by lr·U' with no second decay (the rule's wd·W is inside U')."""
    torch.manual_seed(6)
    model = nn.ModuleDict({"mlp": nn.Linear(64, 32, bias=False)})
    opt = gp.build_optimizer(model, "lamb", rank=4, quantize_weights=True, lr=0.05,
                             weight_decay=2.0)
    layer = model["mlp"]
    rule = opt.plugins(opt.param_groups[0])[0]
    seen = {}
    original = rule.finish_update

    def spy(weights, update, grad, group):
        seen["weights"] = weights.clone()
        seen["out"] = original(weights, update, grad, group)
        return seen["out"]
    monkeypatch.setattr(rule, "finish_update", spy)
    layer.weight.grad = torch.randn(32, 64)
    before = layer.dequantized_weight().float()
    opt.step()
    assert torch.equal(seen["weights"][0], before)
    moved = layer.dequantized_weight().float() - before
    # stochastic rounding adds ≤ one INT8 step (~1e-3) per entry, unbiased: moved·U'/|U'|²
    # is −lr to within ~step/‖W‖ ≈ 4e-4; a second decay would add −lr·wd·W·U'/|U'|² ≈ −0.05
    out = seen["out"][0]
    assert abs((moved * out).sum().item() / (out * out).sum().item() + 0.05) < 2e-3


@pytest.mark.parametrize("rule", ["lamb", "adamp"])
def test_per_layer_accumulated_projection_finishes_the_update_too(rule):
    """Per-layer mode summing projected micro-batches hands the step R only (no full G):
    LAMB still moves W by lr·φ(‖W‖); AdamP detects on the full-size update instead of G,
    and its step equals the one it takes when that update is also what it is given as G."""
    torch.manual_seed(7)
    w = nn.Parameter(torch.randn(24, 16))
    opt = LowRankOptimizer([{"params": [w], "lowrank": True, "rank": 4}], rule=rule, lr=1e-2,
                           weight_decay=0.1)
    low = sum(opt.project_grad(w, torch.randn(24, 16)) for _ in range(3))
    before = w.detach().clone()
    seen = {}
    finisher = opt.plugins(opt.param_groups[0])[0]
    original = finisher.finish_update

    def spy(weights, update, grad, group):
        seen["grad"], seen["update"] = grad, update.clone()
        return original(weights, update, grad, group)
    finisher.finish_update = spy
    try:
        opt.step_param(w, low_grad=low)
    finally:
        del finisher.finish_update
    assert seen["grad"] is None
    step = w.detach() - before
    assert torch.isfinite(step).all()
    if rule == "lamb":
        assert math.isclose(step.norm().item(), 1e-2 * min(before.norm().item(), 10.0), rel_tol=1e-4)
    else:
        want = original(before.unsqueeze(0), seen["update"].clone(), seen["update"].clone(),
                        opt.param_groups[0])
        torch.testing.assert_close(step, -1e-2 * want[0], rtol=1e-4, atol=1e-7)
