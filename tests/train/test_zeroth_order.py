"""Zeroth-order training (MeZO): the SPSA estimate against autograd, the spec, a real run.

The estimator is checked on softmax regression in float64, L(W) = mean_i CE(W·x_i, y_i),
where the central difference's error has a closed bound: along a direction Z the loss
is f(t) = L(W + tZ) and (f(ε) − f(−ε))/2ε = f'(0) + ε²/6·f'''(ξ) for some |ξ| ≤ ε;
f''' is the mean over samples of the third central moment of d_i = Z·x_i under the
softmax at W + ξZ, and |κ₃| ≤ (max d_i − min d_i)³. So
    |ĝ − ⟨∇L, Z⟩| ≤ ε²/6 · mean_i (max d_i − min d_i)³ + rounding (float64: ~1e-13 here).
The perturbation z itself is recovered independently of the estimator's seeds from the
weights the loss sees: z = (θ₊ − θ₋)/2ε.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from trainhelpers import write_spec

from gradproj.optimizers import LowRankOptimizer
from gradproj.train.checks import SpecError
from gradproj.train.spec import load_spec
from gradproj.train.zeroth_order import ZerothOrder

M, N, SAMPLES, CLASSES = 6, 10, 32, 6


def problem(seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(SAMPLES, N, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    w = torch.nn.Parameter(0.3 * torch.randn(M, N, generator=gen, dtype=torch.float64))
    return x, y, w


def loss_of(w, x, y) -> torch.Tensor:
    return F.cross_entropy(x @ w.T, y)


def true_grad(w, x, y) -> torch.Tensor:
    w = w.detach().clone().requires_grad_(True)
    loss_of(w, x, y).backward()
    return w.grad


def taylor_bound(z, x, eps) -> float:
    d = x @ z.T  # logit change per sample and class along z
    spread = (d.max(dim=1).values - d.min(dim=1).values) ** 3
    return eps ** 2 / 6 * float(spread.mean()) + 1e-11


def recording_loss(w, x, y, seen: list):
    def loss_fn() -> float:
        seen.append(w.detach().clone())
        return float(loss_of(w, x, y))
    return loss_fn


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), eps=st.sampled_from([1e-3, 1e-2]),
       subspace=st.booleans())
def test_each_estimate_is_the_directional_derivative_within_the_taylor_bound(seed, eps, subspace):
    x, y, w = problem(seed)
    rank = 2
    opt = LowRankOptimizer([{"params": [w], "lowrank": subspace}], rule="sgdm", momentum=0.0,
                           lr=1.0, rank=rank, update_gap=1000, projector="svd", scale=1.0)
    zo = ZerothOrder(opt, eps=eps, subspace=subspace, seed=seed)
    for step in range(2):  # subspace: step 0 fits the basis (full z), step 1 perturbs in it
        seen: list = []
        before = w.detach().clone()
        grad = true_grad(before, x, y)
        loss, ok = zo.step(recording_loss(w, x, y, seen))
        assert ok and len(seen) == 2
        z = (seen[0] - seen[1]) / (2 * eps)
        assert torch.allclose(seen[0], before + eps * z, atol=1e-13)
        g_hat = (float(loss_of(seen[0], x, y)) - float(loss_of(seen[1], x, y))) / (2 * eps)
        assert abs(g_hat - float((grad * z).sum())) <= taylor_bound(z, x, eps)
        assert loss == pytest.approx((float(loss_of(seen[0], x, y)) + float(loss_of(seen[1], x, y))) / 2)
        # SGD at lr 1: W ← W − ĝ·z, from restored weights (within float64 rounding); a
        # projected weight's first step refits its basis on ĝ·z and takes P·Pᵀ·ĝ·z instead
        if not (subspace and step == 0):
            assert torch.allclose(w.detach(), before - g_hat * z, atol=1e-6)  # fp32 step
        if subspace and step == 1:  # z = P·z_low lies in the rank-2 basis' column space
            p = torch.linalg.svd(z)[1]
            assert float(p[rank:].abs().max()) <= 1e-6 * float(p[0])  # P·z_low in fp32


def test_the_mean_estimate_is_unbiased_for_the_gradient():
    """n perturbations in one step: Ĝ = (1/n)·Σ ĝ_i z_i, applied by SGD at lr 1.

    For ĝ_i = ⟨g, z_i⟩ (exact to ~1e-9 here, from the Taylor bound) and z_i ~ N(0, I):
    E[Ĝ] = g and Cov[Ĝ] = (‖g‖²·I + 2·g·gᵀ)/n. Along u = g/‖g‖, ⟨Ĝ, u⟩ has mean ‖g‖ and
    standard deviation ‖g‖·√(3/n); the rest, ‖Ĝ − ⟨Ĝ,u⟩u‖², has mean (d−1)‖g‖²/n and
    standard deviation √(2(d−1))·‖g‖²/n. Both are held to 5 standard deviations (fixed
    seeds). A flipped sign gives −‖g‖ (10σ off at n = 3000), ĝ divided by ε instead of 2ε
    gives 2‖g‖ (18σ), and a z regenerated differently for the update than for the
    perturbation gives 0 along u."""
    n = 3000
    x, y, w = problem(7)
    g = true_grad(w, x, y)
    opt = LowRankOptimizer([{"params": [w], "lowrank": False}], rule="sgdm", momentum=0.0, lr=1.0)
    before = w.detach().clone()
    ZerothOrder(opt, eps=1e-4, perturbations=n, seed=3).step(lambda: float(loss_of(w, x, y)))
    estimate = (before - w.detach()).flatten()
    g = g.flatten()
    norm, d = float(g.norm()), g.numel()
    along = float(estimate @ g) / norm
    assert abs(along - norm) <= 5 * norm * math.sqrt(3 / n)
    rest = float((estimate - along * g / norm).pow(2).sum())
    mean, sd = (d - 1) * norm ** 2 / n, math.sqrt(2 * (d - 1)) * norm ** 2 / n
    assert abs(rest - mean) <= 5 * sd


def test_no_gradient_tensor_and_no_graph_in_a_step():
    x, y, w = problem(1)
    opt = LowRankOptimizer([{"params": [w], "lowrank": False}], rule="adamw", lr=1e-2)
    graphs = []

    def loss_fn():
        loss = loss_of(w, x, y)
        graphs.append(loss.grad_fn)
        return float(loss)

    ZerothOrder(opt, perturbations=2).step(loss_fn)
    assert graphs == [None] * 4 and w.grad is None
    assert opt.state[w]["step"] == 1  # ZO-Adam: the estimate went through adamw's step


def test_a_non_finite_loss_restores_the_weights_and_skips_the_step():
    _, _, w = problem(2)
    opt = LowRankOptimizer([{"params": [w], "lowrank": False}], rule="sgdm", momentum=0.0, lr=1.0)
    before = w.detach().clone()
    calls = iter([1.0, float("nan")])
    loss, ok = ZerothOrder(opt, eps=1e-3).step(lambda: next(calls))
    assert not ok and math.isnan(loss)
    assert torch.allclose(w.detach(), before, atol=1e-15) and not opt.state.get(w)


def test_the_seed_stream_is_checkpointed_and_checked():
    x, y, w = problem(3)
    opt = LowRankOptimizer([{"params": [w], "lowrank": False}], rule="sgdm", momentum=0.0, lr=1.0)
    zo = ZerothOrder(opt, perturbations=3, seed=5)
    zo.step(lambda: float(loss_of(w, x, y)))
    assert zo.state_dict() == {"seed": 5, "position": 3}
    other = ZerothOrder(opt, seed=6)
    with pytest.raises(ValueError, match="seed 5, this run 6"):
        other.load_state_dict(zo.state_dict())


# -- the spec ------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, where", [
    (["train.gradient='forward'"], "[train].gradient"),
    (["train.zo_eps=1e-3"], "[train].zo_eps"),  # read only with zeroth-order
    (["train.gradient='zeroth-order'", "train.zo_eps=0"], "[train].zo_eps"),
    (["train.gradient='zeroth-order'", "train.zo_perturbations=0"], "[train].zo_perturbations"),
    (["train.gradient='zeroth-order'", "train.per_layer=true"], "[train].gradient"),
    (["train.gradient='zeroth-order'", "train.parallel='fsdp2'"], "[train].gradient"),
    (["train.gradient='zeroth-order'", "train.zo_subspace=true",
      "optimizer.lowrank.residual='fira'"], "[train].zo_subspace"),
])
def test_spec_errors_name_the_key(tmp_path, overrides, where):
    with pytest.raises(SpecError) as info:
        load_spec(write_spec(tmp_path), overrides)
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and where in lines[0], lines


def test_spec_notices_grad_clip_is_not_applied(tmp_path):
    spec = load_spec(write_spec(tmp_path), ["train.gradient='zeroth-order'", "train.grad_clip=1.0"])
    assert any("grad_clip" in i.place for i in spec.notices)
    assert spec.resolved()["train"]["gradient"] == "zeroth-order"
    # the resolved spec (what `gradproj resume` reads) loads back, with or without zo keys
    from gradproj.train.spec import write_resolved
    for overrides in (["train.gradient='zeroth-order'", "train.zo_perturbations=3"], []):
        saved = tmp_path / "resolved.toml"
        write_resolved(load_spec(write_spec(tmp_path), overrides), saved)
        again = load_spec(saved).train
        assert (again.gradient, again.zo_perturbations) == (
            ("zeroth-order", 3) if overrides else ("backprop", 1))


def recovered_z(seen: list, eps: float) -> list[torch.Tensor]:
    """Each weight's z from the weights the two losses saw: (θ₊ − θ₋) / 2ε."""
    return [(plus - minus) / (2 * eps) for plus, minus in zip(seen[0], seen[1])]


def test_every_weight_draws_its_own_z_and_refresh_steps_perturb_in_full():
    """Two weights of one shape, subspace perturbations, update_gap 2: each weight's z is its
    own draw (uncorrelated: |corr| ≤ 0.6 is 4.6 sd for 60 entries; fixed seed), and z is
    full-rank on the steps that fit a basis (0 and 2), in the rank-2 subspace on step 1."""
    gen = torch.Generator().manual_seed(11)
    ws = [torch.nn.Parameter(torch.randn(M, N, generator=gen, dtype=torch.float64)) for _ in range(2)]
    x = torch.randn(SAMPLES, N, generator=gen, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (SAMPLES,), generator=gen)
    opt = LowRankOptimizer([{"params": ws, "lowrank": True}], rule="sgdm", momentum=0.0, lr=1e-3,
                           rank=2, update_gap=2, projector="svd", scale=1.0)
    eps = 1e-3
    zo = ZerothOrder(opt, eps=eps, subspace=True, seed=4)
    for step in range(3):
        seen: list = []

        def loss_fn():
            seen.append([w.detach().clone() for w in ws])
            return float(sum(loss_of(w, x, y) for w in ws))

        zo.step(loss_fn)
        zs = recovered_z(seen, eps)
        a, b = (z.flatten() - z.mean() for z in zs)
        assert abs(float(a @ b) / float(a.norm() * b.norm())) <= 0.6, step
        for z in zs:
            s = torch.linalg.svdvals(z)
            if step == 1:
                assert float(s[2:].max()) <= 1e-6 * float(s[0])
            else:
                assert float(s[2:].min()) >= 1e-2 * float(s[0]), (step, s)


def test_the_loss_shown_is_the_mean_of_all_perturbed_losses():
    """n = 3: the step reports the mean of its 2n losses (L₊ and L₋ of every perturbation)."""
    x, y, w = problem(5)
    opt = LowRankOptimizer([{"params": [w], "lowrank": False}], rule="sgdm", momentum=0.0, lr=1e-3)
    seen: list = []

    def loss_fn():
        seen.append(float(loss_of(w, x, y)))
        return seen[-1]

    loss, ok = ZerothOrder(opt, perturbations=3, seed=2).step(loss_fn)
    assert ok and len(seen) == 6 and loss == pytest.approx(sum(seen) / 6, rel=1e-12)
