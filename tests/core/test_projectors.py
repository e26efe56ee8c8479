"""Properties of the core projectors: orthonormal bases, idempotent projection, energy, int4 bound."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp
from gradproj.kernels.int4 import int4_dequantize_ref, int4_quantize_ref
from gradproj.projectors.base import resolve_side

FP32_EPS = torch.finfo(torch.float32).eps


def gradient_like(m, n, seed, decay=0.8):
    """Low-rank-dominated matrix with a geometric spectrum plus noise, as LLM gradients are."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen))
    s = decay ** torch.arange(k, dtype=torch.float32)
    return (u * s) @ v.T + 1e-3 * torch.randn(m, n, generator=gen)


shapes = st.tuples(st.integers(2, 48), st.integers(2, 48))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, rank_frac=st.floats(0.05, 1.0), seed=st.integers(0, 1000),
       side=st.sampled_from(["left", "right", "full"]), name=st.sampled_from(["svd", "randomized"]))
def test_basis_orthonormal_and_projection_idempotent(shape, rank_frac, seed, side, name):
    m, n = shape
    rank = max(1, int(rank_frac * min(m, n)))
    grad = gradient_like(m, n, seed)
    projector = gp.PROJECTORS.create(name)
    state = {}
    projector.fit(grad, state, rank=rank, side=side, seed=seed, dtype=torch.float32)
    # orthonormality error of a QR/SVD basis grows like eps·rows
    for one in ("left", "right") if side == "full" else (side,):
        p = projector.load_basis(state, one, (m, n))
        eye = torch.eye(p.shape[1])
        assert (p.T @ p - eye).abs().max() <= 10 * FP32_EPS * max(m, n)
    once = projector.project_back(projector.project(grad, state, side), state, side, (m, n))
    twice = projector.project_back(projector.project(once, state, side), state, side, (m, n))
    assert (twice - once).abs().max() <= 20 * FP32_EPS * max(m, n) * once.abs().max().clamp_min(1)


def captured_energy(grad, projector, rank, side):
    state = {}
    projector.fit(grad, state, rank=rank, side=side, seed=7, dtype=torch.float32)
    return projector.project(grad, state, side).square().sum().item()


@settings(max_examples=20, deadline=None)
@given(m=st.integers(32, 160), n=st.integers(32, 160), decay=st.floats(0.5, 0.97))
def test_randomized_captures_95_percent_of_svd_energy(m, n, decay):
    """Default q = 1 power iteration where the spectrum decays by <= 0.9 per singular value
    (worst seen: 99.4 %); near-flat spectra (up to 0.97) need q = 3 (worst seen: 98.2 %,
    while q = 1 drops to 88 %). Hypothesis draws the shape and spectrum; the gradient's
    seed is a function of the shape, so a failing draw fails on every run."""
    seed = 1000 * m + n
    grad = gradient_like(m, n, seed, decay)
    rank = max(1, min(m, n) // 8)
    side = resolve_side("std", (m, n))
    options = {} if decay <= 0.9 else {"power_iters": 3}
    exact = captured_energy(grad, gp.PROJECTORS.create("svd"), rank, side)
    approx = captured_energy(grad, gp.PROJECTORS.create("randomized", **options), rank, side)
    assert approx >= 0.95 * exact


@pytest.mark.parametrize("m,n,seed,decay", [(64, 96, 1, 0.9), (128, 80, 2, 0.85), (160, 160, 3, 0.9),
                                             (48, 150, 4, 0.8)])
def test_randomized_range_finder_is_near_exact_on_fixed_draws(m, n, seed, decay):
    """Fixed gradients and seed: the range finder (p = 8, q = 1, final rotation by the small
    SVD) captures ≥ 99.9 % of the SVD's energy in the top-r subspace (measured 99.96 %
    at worst). Dropping the oversampling, the power iteration or the rotation falls to
    95-98 % on at least one of these draws."""
    grad = gradient_like(m, n, seed, decay)
    rank = min(m, n) // 8
    side = resolve_side("std", (m, n))
    exact = captured_energy(grad, gp.PROJECTORS.create("svd"), rank, side)
    approx = captured_energy(grad, gp.PROJECTORS.create("randomized"), rank, side)
    assert approx >= 0.999 * exact, approx / exact


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 40), group=st.sampled_from([2, 64, 256]),
       shift=st.floats(-3, 3), seed=st.integers(0, 1000))
def test_int4_codec_within_half_a_step(rows, cols, group, shift, seed):
    # `shift` makes whole groups one-signed: the case Q-GaLore's clamped zero-point clips
    x = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) + shift
    codes, scale, minimum = int4_quantize_ref(x, group)
    assert codes.dtype == torch.uint8 and codes.numel() * 2 >= x.numel()
    y = int4_dequantize_ref(codes, scale, minimum, x.shape)
    step = scale.repeat_interleave(group)[: x.numel()].view_as(x)
    assert ((y - x).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()


def test_int4_partial_group_scales_from_its_own_values():
    """The last group of 300 values (group 256) holds 44: its scale and minimum are those
    of the 44 values alone — padding repeats the last value, so it never widens [min, max]
    (zeros would, for a one-signed group: here every value is > 0)."""
    x = torch.rand(300, generator=torch.Generator().manual_seed(4)) + 2.0
    codes, scale, minimum = int4_quantize_ref(x, 256)
    tail = x[256:]
    assert minimum[1].item() == tail.min().item()
    assert scale[1].item() == ((tail.max() - tail.min()) / 15.0).item()
    assert scale[0].item() == ((x[:256].max() - x[:256].min()) / 15.0).item()
    y = int4_dequantize_ref(codes, scale, minimum, x.shape)
    assert ((y - x).abs() <= scale.repeat_interleave(256)[:300] / 2 * (1 + 1e-5)).all()


def test_int4_projector_reconstructs_basis_within_quantization_bound():
    grad = gradient_like(64, 96, 3)
    exact, packed = {}, {}
    gp.PROJECTORS.create("svd").fit(grad, exact, rank=8, side="left", seed=0, dtype=torch.float32)
    int4 = gp.PROJECTORS.create("int4", inner="svd", group_size=64)
    int4.fit(grad, packed, rank=8, side="left", seed=0, dtype=torch.float32)
    assert packed["proj_left.codes"].numel() == 64 * 8 // 2  # two codes per byte
    diff = int4.load_basis(packed, "left", (64, 96)) - exact["proj_left"]
    bound = packed["proj_left.scale"].max() / 2
    assert diff.abs().max() <= bound * (1 + 1e-5)


def test_svd_failure_falls_back_and_is_counted(monkeypatch):
    original = torch.linalg.svd
    calls = {"n": 0}

    def fail_first(*args, **kwargs):  # the exact SVD fails; the fallback's small SVD works
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("linalg.svd: The algorithm failed to converge")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", fail_first)
    state = {}
    gp.PROJECTORS.create("svd").fit(gradient_like(20, 30, 0), state, rank=4, side="left",
                                    seed=0, dtype=torch.float32)
    assert state["svd_fallbacks"] == 1
    p = state["proj_left"]
    assert torch.isfinite(p).all()
    assert (p.T @ p - torch.eye(4)).abs().max() <= 10 * FP32_EPS * 20


def test_nonfinite_gradient_does_not_crash_the_fit():
    grad = gradient_like(16, 24, 1)
    grad[3, 5] = float("nan")
    state = {}
    gp.PROJECTORS.create("svd").fit(grad, state, rank=4, side="right", seed=0, dtype=torch.float32)
    assert state["svd_fallbacks"] == 1 and torch.isfinite(state["proj_right"]).all()


@pytest.mark.parametrize("shape, proj_type, expected", [
    ((64, 32), "std", "right"), ((32, 64), "std", "left"),
    ((64, 32), "reverse_std", "left"), ((32, 64), "reverse_std", "right"),
    ((64, 32), "left", "left"), ((64, 32), "full", "full"),
    ((32, 32), "std", "right"), ((32, 32), "reverse_std", "left"),  # galore-torch: m >= n is right
])
def test_side_semantics_follow_galore_torch(shape, proj_type, expected):
    assert resolve_side(proj_type, shape) == expected


def test_auto_side_tie_keeps_the_std_side():
    assert resolve_side("auto", (32, 32), cost=lambda side: 100) == "right"
    assert resolve_side("auto", (32, 64), cost=lambda side: 100) == "left"
    assert resolve_side("auto", (64, 32), cost={"left": 99, "right": 100}.get) == "left"


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_basis_spans_the_top_singular_vectors(side):
    """GaLore's basis: the top-r left (or right) singular vectors, so the projection keeps
    exactly the top r squared singular values of the gradient's energy."""
    grad = gradient_like(40, 56, 9)
    r = 5
    state = {}
    projector = gp.PROJECTORS.create("svd")
    projector.fit(grad, state, rank=r, side=side, seed=0, dtype=torch.float32)
    p = projector.load_basis(state, side, (40, 56)).double()
    u, s, vh = torch.linalg.svd(grad.double(), full_matrices=False)
    top = u[:, :r] if side == "left" else vh[:r].T
    assert (p @ p.T - top @ top.T).abs().max() <= 1e-4
    energy = projector.project(grad, state, side).double().square().sum()
    assert abs(energy / s[:r].square().sum() - 1) <= 1e-5


@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_int4_basis_bytes_are_what_it_stores(side):
    """300 x 40 weight, rank 16: 4800 / 640 basis values per side, group 256 (so a wrong
    row count in the formula shows): bytes stored == basis_nbytes."""
    grad = gradient_like(300, 40, 2)
    projector = gp.PROJECTORS.create("int4", inner="svd", group_size=256)
    state = {}
    projector.fit(grad, state, rank=16, side=side, seed=0, dtype=torch.float32)
    stored = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    assert stored == projector.basis_nbytes((300, 40), 16, side, torch.float32)
    per_side = {"left": 19 * (128 + 8), "right": 3 * (128 + 8)}  # ceil(4800/256), ceil(640/256) groups
    assert stored == sum(per_side[s] for s in (("left", "right") if side == "full" else (side,)))


def test_auto_side_minimises_state_plus_basis_bytes():
    # 4096 x 11008 (LLaMA-7B down-projection transposed), rank 512, Adam fp32 states:
    # std projects on the right (states 4096x512 x 2 moments); auto prefers whichever total is smaller.
    p = torch.nn.Parameter(torch.empty(256, 64))
    opt = gp.LowRankOptimizer([{"params": [p], "rank": 8, "proj_type": "auto"}])
    rule, projector, fmt, _ = opt.plugins(opt.param_groups[0])
    costs = {}
    for side in ("left", "right"):
        low = (8, 64) if side == "left" else (256, 8)
        costs[side] = rule.state_nbytes(low, fmt) + projector.basis_nbytes((256, 64), 8, side, p.dtype)
    assert opt.side(p, opt.param_groups[0]) == min(costs, key=costs.get)
    assert resolve_side("std", (256, 64)) == "right" and min(costs, key=costs.get) == "left"


@pytest.mark.parametrize("side", ["left", "right"])
def test_svd_fallback_basis_is_the_cleaned_gradients_top_vectors_and_each_fallback_counts(side):
    """A NaN entry makes the exact SVD unusable: the fallback range finder runs on the
    cleaned gradient (NaN → 0), giving an m×r (left) or n×r (right) basis spanning its top-r
    singular vectors; every fallback adds one to `svd_fallbacks` (catches a right-side
    fallback run on G instead of Gᵀ, and a counter that only ever reads 1)."""
    m, n, r = 16, 24, 3
    grad = gradient_like(m, n, 5, decay=0.5)
    grad[3, 5] = float("nan")
    clean = torch.nan_to_num(grad, nan=0.0).double()
    u, _, vh = torch.linalg.svd(clean, full_matrices=False)
    top = u[:, :r] if side == "left" else vh[:r].T
    state = {}
    projector = gp.PROJECTORS.create("svd")
    for fits in (1, 2):
        projector.fit(grad, state, rank=r, side=side, seed=fits, dtype=torch.float32)
        assert state["svd_fallbacks"] == fits
    p = projector.load_basis(state, side, (m, n)).double()
    assert p.shape == top.shape
    assert (p @ p.T - top @ top.T).abs().max() <= 1e-3


def test_int4_bucket_of_bases_off_the_group_grid_reads_each_weights_own_basis():
    """A bucket (StackedState) of 3 INT4 bases of 10×3 = 30 values with groups of 16 (2 groups,
    2 padding values each): each slice of the bucket's basis is that weight's basis alone, its
    values within scale/2 of the fp32 basis (catches slicing the bucket's concatenated groups
    without dropping each weight's padding)."""
    from gradproj.stacked_state import StackedState
    proj = gp.PROJECTORS.create("int4", inner="randomized", group_size=16)
    gen = torch.Generator().manual_seed(2)
    states, grads = [], [torch.randn(10, 24, generator=gen) for _ in range(3)]
    for i, g in enumerate(grads):
        state: dict = {}
        proj.fit(g, state, rank=3, side="left", seed=i, dtype=torch.float32)
        states.append(state)
    bucket = proj.load_basis(StackedState(states), "left", (10, 24))
    assert bucket.shape == (3, 10, 3)
    for i, state in enumerate(states):
        alone = proj.load_basis(state, "left", (10, 24))
        torch.testing.assert_close(bucket[i], alone, rtol=0, atol=0)


def test_int4_quantizes_the_inner_fp32_basis_whatever_the_weight_dtype():
    """INT4 over SVD for a bf16 weight: each group's stored minimum and scale are the exact
    min and (max − min)/15 of the fp32 SVD basis (computed here by torch.linalg.svd) — not of
    a bf16-rounded copy (catches the inner projector fitting in the weight's dtype)."""
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(64, 16, generator=gen)
    proj = gp.PROJECTORS.create("int4", inner="svd", group_size=32)
    state: dict = {}
    proj.fit(g, state, rank=4, side="left", seed=0, dtype=torch.bfloat16)
    u = torch.linalg.svd(g, full_matrices=False)[0][:, :4]
    got = proj.load_basis(state, "left", (64, 16))
    # the SVD projector may flip column signs: match them to the reference's
    u = u * torch.sign((u * got).sum(dim=0, keepdim=True))
    groups = u.reshape(-1, 32)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    torch.testing.assert_close(state["proj_left.min"], lo, rtol=0, atol=1e-6)
    torch.testing.assert_close(state["proj_left.scale"], (hi - lo) / 15, rtol=0, atol=1e-6)
    assert (got - u).abs().max() <= float(state["proj_left.scale"].max()) / 2 + 1e-6


def test_int4_codes_round_to_the_nearest_level():
    """Group-wise INT4 of a ramp with known levels: (x − min)/scale rounds to the nearest
    integer, so every value is within scale/2 (catches floor instead of round)."""
    x = torch.tensor([0.0, 15.0, 0.7, 2.3, 4.6, 9.9, 14.2, 7.5])  # group of 8: min 0, scale 1
    codes, scale, minimum = int4_quantize_ref(x, 8)
    assert scale.tolist() == [1.0] and minimum.tolist() == [0.0]
    q = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1).tolist()
    assert q == [0, 15, 1, 2, 5, 10, 14, 8]  # 7.5: half to even
    assert int4_dequantize_ref(codes, scale, minimum, (8,)).tolist() == [float(v) for v in q]
