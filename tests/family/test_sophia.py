"""Sophia (Liu et al. 2023): the rule against the official SophiaG (`sophia-opt`, when
installed) and against its update spelled out in plain torch; the curvature call, its
errors, and its low-rank coordinates."""
import itertools
import math

import pytest
import torch

import gradproj as gp
from gradproj.kernels.q8 import q8_dequantize, q8_quantize
from gradproj.kernels.sophia import sophia_step_ref

STEPS, EVERY = 30, 10


def schedule(shapes, dtype, seed=1):
    """STEPS gradients and, every EVERY steps (and once early, step 3), a GNB gradient ĝ."""
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for t in range(1, STEPS + 1):
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        curv = ([torch.randn(s, generator=gen, dtype=dtype) * 0.3 for s in shapes]
                if t % EVERY == 0 or t == 3 else None)
        steps.append((grads, curv))
    return steps


def run_ours(w0s, steps, batch, **options):
    ps = [torch.nn.Parameter(w.clone()) for w in w0s]
    opt = gp.LowRankOptimizer([{"params": ps}], rule="sophia", **options)
    for grads, curv in steps:
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        if curv is not None:
            for p, g in zip(ps, curv):
                p.grad = g.clone()
            opt.update_curvature("gnb", batch_size=batch)
    return [p.detach() for p in ps], opt


@pytest.mark.parametrize("lr,wd", [(1e-4, 0.1), (1e-3, 0.0)])
def test_matches_official_sophiag(lr, wd):
    """sophia-opt packages the authors' sophia.py. In fp64 weights (our moments stay fp32)
    the two differ by the order of decay and step, lr²·wd·|N| ≤ 1e-9 per step at
    lr 1e-4, wd 0.1 (official: decay first; here: after), and by fp32 rounding of N."""
    sophia_opt = pytest.importorskip("sophia_opt")
    gen = torch.Generator().manual_seed(0)
    w0s = [torch.randn(6, 5, generator=gen, dtype=torch.float64),
           torch.randn(5, generator=gen, dtype=torch.float64)]
    steps, batch = schedule([w.shape for w in w0s], torch.float64), 5120
    ours, _ = run_ours(w0s, steps, batch, lr=lr, weight_decay=wd)
    qs = [torch.nn.Parameter(w.clone()) for w in w0s]
    ref = sophia_opt.SophiaG(qs, lr=lr, weight_decay=wd)  # its defaults: betas, rho
    for grads, curv in steps:
        for q, g in zip(qs, grads):
            q.grad = g.clone()
        ref.step(bs=batch)
        if curv is not None:
            for q, g in zip(qs, curv):
                q.grad = g.clone()
            ref.update_hessian()
    moved = max((q.detach() - w).abs().max().item() for q, w in zip(qs, w0s))
    assert moved > 10 * lr  # the runs went somewhere: the comparison is not vacuous
    for got, want in zip(ours, qs):
        assert (got - want.detach()).abs().max().item() <= 1e-6


@pytest.mark.parametrize("state_format", ["fp32", "bf16"])
def test_matches_sophia_spelled_out(state_format):
    """Liu et al. 2023, Alg. 3 with GNB (Alg. 2), in plain torch, always run."""
    gen = torch.Generator().manual_seed(2)
    w0s = [torch.randn(7, 4, generator=gen), torch.randn(3, generator=gen)]
    steps, batch = schedule([w.shape for w in w0s], torch.float32), 480
    lr, wd, (b1, b2), rho, eps = 3e-3, 0.1, (0.965, 0.99), 0.04, 1e-15
    ours, opt = run_ours(w0s, steps, batch, lr=lr, weight_decay=wd, state_format=state_format)
    store = {"fp32": torch.float32, "bf16": torch.bfloat16}[state_format]
    for i, w0 in enumerate(w0s):
        w, m, h = w0.clone(), torch.zeros_like(w0), torch.zeros_like(w0)
        for grads, curv in steps:
            m = (b1 * m + (1 - b1) * grads[i]).to(store).float() if store != torch.float32 else \
                b1 * m + (1 - b1) * grads[i]
            direction = torch.clamp(m / torch.clamp(rho * h, min=eps), -1.0, 1.0)
            w = w - lr * direction
            w = w - lr * wd * w
            if curv is not None:
                h = b2 * h + (1 - b2) * batch * curv[i] ** 2
                h = h.to(store).float()
        # fp32: a few roundings per step; bf16 moments round M each step (the direction is
        # computed from the fp32 M first, the reference rounds it first: ≤ 2⁻⁸ relative,
        # clipped to at most lr·2⁻⁸ a step)
        tol = 1e-6 if state_format == "fp32" else STEPS * lr * 2 ** -8
        assert (ours[i] - w).abs().max().item() <= tol
        if state_format == "fp32":
            state = opt.state[opt.param_groups[0]["params"][i]]
            torch.testing.assert_close(state["hessian"], h, rtol=1e-6, atol=0)


def test_sign_steps_until_the_first_estimate():
    """h = 0: every coordinate is clipped, N = sign(M): the official code's first k steps."""
    w = torch.nn.Parameter(torch.zeros(5, 4))
    opt = gp.LowRankOptimizer([{"params": [w]}], rule="sophia", lr=0.01, weight_decay=0.0)
    g = torch.randn(5, 4)
    w.grad = g
    opt.step()
    torch.testing.assert_close(w.detach(), -0.01 * torch.sign(g))


def test_q8_storage_reads_references_writes():
    """A 64×64 moment (4096 ≥ the q8 threshold) is stored as codes: the step dequantizes
    M and H, runs the reference and re-quantizes M; H is untouched by the step."""
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = gp.LowRankOptimizer([{"params": [w]}], rule="sophia", state_format="q8", lr=1e-3)
    gen = torch.Generator().manual_seed(3)
    for t in range(4):
        w.grad = torch.randn(64, 64, generator=gen)
        opt.step()
        w.grad = torch.randn(64, 64, generator=gen)
        opt.update_curvature("gnb", batch_size=64)
    state = opt.state[w]
    assert {"exp_avg.codes", "hessian.codes"} <= set(state) and "exp_avg" not in state
    m = q8_dequantize(state["exp_avg.codes"], state["exp_avg.absmax"], True)
    h = q8_dequantize(state["hessian.codes"], state["hessian.absmax"], False)
    h_codes = state["hessian.codes"].clone()
    g = torch.randn(64, 64, generator=gen)
    w0 = w.detach().clone()
    w.grad = g
    opt.step()
    expected_m = m.clone()
    direction = sophia_step_ref(g, expected_m, h, 0.965, 0.04, 1e-15)
    torch.testing.assert_close(w.detach(), w0 - 1e-3 * direction, rtol=0, atol=1e-7)
    codes, absmax = q8_quantize(expected_m, True)
    assert torch.equal(state["exp_avg.codes"], codes) and torch.equal(state["exp_avg.absmax"], absmax)
    assert torch.equal(state["hessian.codes"], h_codes)


def test_state_nbytes_exact():
    rule = gp.RULES.create("sophia")
    for name in gp.STATE_FORMATS.names():
        fmt = gp.STATE_FORMATS.create(name)
        for shape in [(7,), (64, 64), (128, 40)]:
            state = {}
            rule.init_state(state, shape, torch.device("cpu"), fmt)
            assert rule.state_nbytes(shape, fmt) == sum(
                v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    assert rule.state_nbytes((64, 64), gp.STATE_FORMATS.create("fp32")) == 2 * 4 * 4096


def test_low_rank_curvature_is_in_the_subspace():
    """In a low-rank group ĥ = B·(Pᵀĝ)⊙(Pᵀĝ) for the weight's current basis P (left side
    of a 12×20 weight: r×n), and the step's clip acts on r×n coordinates."""
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 4, "update_gap": 100}], rule="sophia",
                              projector="svd", lr=1e-3)
    w.grad = torch.randn(12, 20)
    opt.step()
    state = opt.state[w]
    assert tuple(state["hessian"].shape) == (4, 20)
    g_hat = torch.randn(12, 20)
    w.grad = g_hat
    opt.update_curvature("gnb", batch_size=32)
    basis = opt.plugins(opt.param_groups[0])[1].load_basis(state, "left", (12, 20))
    expected = (1 - 0.99) * 32 * (basis.T @ g_hat) ** 2
    torch.testing.assert_close(state["hessian"], expected, rtol=1e-6, atol=0)


def test_refresh_resets_the_curvature_with_the_moments():
    w = torch.nn.Parameter(torch.randn(12, 20))
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 4, "update_gap": 2}], rule="sophia",
                              moments="reset", lr=1e-3)
    w.grad = torch.randn(12, 20)
    opt.step()
    w.grad = torch.randn(12, 20)
    opt.update_curvature("gnb", batch_size=8)
    assert opt.state[w]["hessian"].abs().sum() > 0
    opt.step()  # step 2: no refresh
    assert opt.state[w]["hessian"].abs().sum() > 0
    w.grad = torch.randn(12, 20)
    opt.step()  # step 3 refreshes (gap 2): h is zeroed with M, then M takes the new G
    assert torch.equal(opt.state[w]["hessian"], torch.zeros(4, 20))


def test_errors_name_the_problem():
    w = torch.nn.Parameter(torch.randn(4, 4))
    adam = gp.LowRankOptimizer([{"params": [w]}], rule="adamw")
    with pytest.raises(ValueError, match="rule 'adamw' keeps no curvature estimate"):
        adam.update_curvature("gnb", batch_size=4)
    opt = gp.LowRankOptimizer([{"params": [w]}], rule="sophia")
    w.grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match="estimator must be one of gnb, hutchinson, got 'fisher'"):
        opt.update_curvature("fisher")
    with pytest.raises(ValueError, match="needs batch_size"):
        opt.update_curvature("gnb")
    with pytest.raises(ValueError, match="needs loss="):
        opt.update_curvature("hutchinson")
    low = torch.nn.Parameter(torch.randn(12, 20))
    fresh = gp.LowRankOptimizer([{"params": [low], "rank": 4}], rule="sophia")
    low.grad = torch.randn(12, 20)
    with pytest.raises(ValueError, match="no subspace yet; take an optimizer step"):
        fresh.update_curvature("gnb", batch_size=4)
    for option, value, message in [("curvature_every", 0, "an integer >= 1, got 0"),
                                   ("curvature_estimator", "fisher", "one of gnb, hutchinson"),
                                   ("rho", -1.0, "'rho' must be a number >= 0"),
                                   ("eps", 0.0, "'eps' must be a number > 0")]:
        with pytest.raises(ValueError, match=message):
            gp.LowRankOptimizer([{"params": [w]}], rule="sophia", **{option: value})


# -- the estimators' expectations -------------------------------------------------------
# A softmax regression, logits_b = W·x_b (V = 3 classes, d = 4 inputs, B = 2 rows), small
# enough to form the exact Gauss-Newton and Hessian diagonals. Each draw of an estimate
# lies in a known interval of width R, so Hoeffding's inequality bounds the mean of N
# draws: P(|mean − E| ≥ t) ≤ 2·exp(−2N·t²/R²); with a union bound over the entries and a
# failure probability δ = 1e-6 in all, t = R·sqrt(ln(2·entries/δ) / 2N). The problem's
# seed is one where these bounds are sharp enough to tell the right expectation from the
# wrong ones checked below (a fixed seed: the test is deterministic).
DELTA, ROWS = 1e-6, 2


def hoeffding(width: torch.Tensor, entries: int, draws: int) -> torch.Tensor:
    return width * math.sqrt(math.log(2 * entries / DELTA) / (2 * draws))


def softmax_problem():
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(ROWS, 4, generator=gen) * 2 - 1
    w0 = torch.randn(3, 4, generator=gen)
    return x, w0, torch.tensor([0, 2])


def test_gnb_expectation_is_the_gauss_newton_diagonal():
    x, w0, _ = softmax_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w]}], rule="sophia", betas=(0.965, 0.0))  # h = ĥ
    gen, draws = torch.Generator().manual_seed(6), 2000
    total = torch.zeros(3, 4)
    for _ in range(draws):
        loss, batch = gp.sampled_label_loss(x @ w.T, generator=gen)
        assert batch == ROWS
        w.grad = None
        loss.backward()
        opt.update_curvature("gnb", batch_size=batch)
        total += opt.state[w]["hessian"]
    mean = total / draws
    # the Gauss-Newton diagonal of the mean CE: (1/B)·Σ_b S_b[i,i]·x_bj², S = diag(p) − ppᵀ
    p = torch.softmax(x @ w0.T, dim=-1)
    gn = ((p - p ** 2).T @ (x ** 2)) / ROWS
    # one draw: ĝ_ij = (1/B)·Σ_b (p_bi − [ŷ_b = i])·x_bj; ĥ_ij = B·ĝ_ij² takes one of 2^B
    # values (which rows drew class i): its range is exact
    width = torch.zeros(3, 4)
    for i, j in itertools.product(range(3), range(4)):
        values = [ROWS * (sum((p[b, i] - hit[b]) * x[b, j] for b in range(ROWS)) / ROWS) ** 2
                  for hit in itertools.product([0, 1], repeat=ROWS)]
        width[i, j] = max(values) - min(values)
    t = hoeffding(width, 12, draws)
    assert ((mean - gn).abs() <= t).all(), (mean, gn, t)
    assert (gn - gn / ROWS > t).all()  # the bound would catch a missing factor B


def test_hutchinson_expectation_is_the_hessian_diagonal():
    x, w0, y = softmax_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w]}], rule="sophia", betas=(0.965, 0.0),
                              curvature_estimator="hutchinson")

    def loss_of(weight):
        return torch.nn.functional.cross_entropy(x @ weight.T, y)

    hessian = torch.autograd.functional.hessian(loss_of, w0).reshape(12, 12)
    gen, draws = torch.Generator().manual_seed(7), 2000
    total = torch.zeros(3, 4)
    for _ in range(draws):
        opt.update_curvature("hutchinson", loss=loss_of(w), generator=gen)
        total += opt.state[w]["hessian"]
    mean = (total / draws).reshape(12)
    diag = hessian.diagonal()
    # one draw: u_i·Σ_j H_ij·u_j = H_ii + Σ_{j≠i} ±H_ij, an interval of width 2·Σ_{j≠i}|H_ij|
    t = hoeffding(2 * (hessian.abs().sum(1) - diag.abs()), 12, draws)
    assert ((mean - diag).abs() <= t).all(), (mean, diag, t)
    assert (diag > t).all()  # the bound would catch ĥ = 0 or a doubled ĥ


def test_low_rank_hutchinson_expectation_is_the_projected_hessian_diagonal():
    """W = W0 + P·X (left side, rank 2): E[u⊙project(H·back(u))] = diag(∇²_X L)."""
    x, w0, y = softmax_problem()
    w = torch.nn.Parameter(w0.clone())
    opt = gp.LowRankOptimizer([{"params": [w], "rank": 2, "update_gap": 10 ** 6}],
                              rule="sophia", betas=(0.965, 0.0), lr=0.0)
    w.grad = torch.randn(3, 4)
    opt.step()  # fits the basis (lr 0: W stays W0)
    state = opt.state[w]
    basis = opt.plugins(opt.param_groups[0])[1].load_basis(state, "left", (3, 4))

    def loss_of(weight):
        return torch.nn.functional.cross_entropy(x @ weight.T, y)

    h_low = torch.autograd.functional.hessian(lambda X: loss_of(w0 + basis @ X),
                                              torch.zeros(2, 4)).reshape(8, 8)
    gen, draws = torch.Generator().manual_seed(8), 1000
    total = torch.zeros(2, 4)
    for _ in range(draws):
        opt.update_curvature("hutchinson", loss=loss_of(w), generator=gen)
        total += state["hessian"]
    mean = (total / draws).reshape(8)
    diag = h_low.diagonal()
    t = hoeffding(2 * (h_low.abs().sum(1) - diag.abs()), 8, draws)
    assert ((mean - diag).abs() <= t).all(), (mean, diag, t)


def test_defaults_are_the_papers_and_the_official_codes():
    rule, preset = gp.RULES.get("sophia").defaults, gp.preset_options("sophia")
    assert (rule["betas"], rule["rho"], rule["eps"], rule["curvature_every"]) == (
        (0.965, 0.99), 0.04, 1e-15, 10)
    assert {k: preset[k] for k in ("rule", "betas", "rho", "weight_decay", "curvature_every")} == {
        "rule": "sophia", "betas": (0.965, 0.99), "rho": 0.04, "weight_decay": 0.1,
        "curvature_every": 10}
    sophia_opt = pytest.importorskip("sophia_opt")
    import inspect
    official = inspect.signature(sophia_opt.SophiaG.__init__).parameters
    assert official["betas"].default == rule["betas"] and official["rho"].default == rule["rho"]
    assert official["weight_decay"].default == preset["weight_decay"]


def test_sampled_label_loss_counts_every_token():
    """B is the number of labels drawn: every position of a batch × time × vocab logits
    tensor (GNB's B in tokens, as the official `bs = total_bs · block_size`)."""
    logits = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))
    loss, batch = gp.sampled_label_loss(logits, generator=torch.Generator().manual_seed(1))
    assert batch == 15 and loss.shape == ()
