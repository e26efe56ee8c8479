"""Every pair of plugins, through the whole optimizer: no crash, finite, bit-exact resume.

The configurations are a pairwise covering array over the registries (projector, rule,
state format, residual) and the refresh/moment policies: every value of every kind meets
every value of every other kind in at least one configuration — ~30 configurations
instead of the full product (≈ 500 today, growing multiplicatively with each plugin).
It is computed from the registries at collection time, so new plugins are covered.
"""
import io
import itertools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp

POLICIES = ("fixed/keep", "adaptive/keep", "fixed/reset", "adaptive/rotate", "fixed/rotate")
KINDS = ("projector", "rule", "state_format", "residual", "policy")


def pairwise(dims: list[list[str]]) -> list[tuple[str, ...]]:
    """A greedy (AETG-style) covering array: rows covering every value pair of every two dims."""
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(dims)), 2)
                 for a in dims[i] for b in dims[j]}
    rows = []
    while uncovered:
        i, a, j, b = min(uncovered)
        row: list = [None] * len(dims)
        row[i], row[j] = a, b
        for d in range(len(dims)):
            if row[d] is None:
                def gain(value, d=d):
                    return sum((min(d, e), (value, row[e])[d > e], max(d, e), (row[e], value)[d > e])
                               in uncovered for e in range(len(dims)) if row[e] is not None)
                row[d] = max(dims[d], key=gain)  # ties keep the first (sorted) value
        for x, y in itertools.combinations(range(len(dims)), 2):
            uncovered.discard((x, row[x], y, row[y]))
        rows.append(tuple(row))
    return rows


CONFIGS = pairwise([gp.PROJECTORS.names(), gp.RULES.names(), gp.STATE_FORMATS.names(),
                    gp.RESIDUALS.names(), list(POLICIES)])


def options_of(config) -> dict:
    opts = dict(zip(KINDS, config))
    refresh, moments = opts.pop("policy").split("/")
    return {**opts, "refresh": refresh, "moments": moments, "refresh_window": 2}


def make_model(dtype):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "attn": torch.nn.Linear(20, 12),           # 12×20: m < n
        "mlp": torch.nn.Linear(12, 20, bias=False),  # 20×12: m > n
        "sq_mlp": torch.nn.Linear(16, 16),          # square
        "thin_attn": torch.nn.Linear(40, 6),        # 6×40 with rank 8 ≥ min: full rank
    })
    return model.to(dtype)


def grads_for(model, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    # non-contiguous (transposed) gradients, as a custom autograd function may produce
    return [[torch.randn(*reversed(p.shape), generator=gen).T.to(p.dtype) if p.dim() == 2
             else torch.randn(p.shape, generator=gen).to(p.dtype) for p in model.parameters()]
            for _ in range(steps)]


def build(model, options):
    return gp.LowRankOptimizer(gp.param_groups(model, rank=8, update_gap=2), lr=1e-3,
                               weight_decay=0.01, **options)


def train(model, opt, grads):
    for step in grads:
        for p, g in zip(model.parameters(), step):
            p.grad = g
        opt.step()
        if opt.plugins(opt.param_groups[0])[0].uses_curvature:
            # the step's G stands in for a GNB gradient (B = 4): h lives in the subspace
            # and is kept / reset / rotated by the refresh policy like the other moments
            opt.update_curvature("gnb", batch_size=4)


def check_config(options, dtype, steps=6, split=3):
    grads = grads_for(make_model(dtype), steps, seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rank .* full rank")
        model = make_model(dtype)
        opt = build(model, options)
        train(model, opt, grads)
        expected = [p.detach().clone() for p in model.parameters()]
        for p in expected:
            assert torch.isfinite(p.float()).all()
        for state in opt.state.values():
            assert all(torch.is_tensor(v) or isinstance(v, (bool, int, float)) for v in state.values())
        if options["state_format"] in ("q8", "q4") and opt.plugins(opt.param_groups[0])[0].moments:
            # conftest.py quantizes every moment: the pair really tests the format
            assert all(any(k.endswith(".codes") for k in state) for state in opt.state.values())

        model = make_model(dtype)
        opt = build(model, options)
        train(model, opt, grads[:split])  # split after a refresh (steps 0, 2) and mid-gap
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        resumed = make_model(dtype)
        for p in resumed.parameters():
            p.data.zero_()  # everything must come from the checkpoint
        resumed.load_state_dict(saved["model"])
        opt2 = build(resumed, options)
        opt2.load_state_dict(saved["optim"])
        train(resumed, opt2, grads[split:])
    for got, want in zip(resumed.parameters(), expected):
        assert torch.equal(got.detach(), want)


def test_covering_array_covers_every_pair():
    dims = [gp.PROJECTORS.names(), gp.RULES.names(), gp.STATE_FORMATS.names(),
            gp.RESIDUALS.names(), list(POLICIES)]
    for i, j in itertools.combinations(range(len(dims)), 2):
        seen = {(row[i], row[j]) for row in CONFIGS}
        assert seen == set(itertools.product(dims[i], dims[j]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("config", CONFIGS, ids=["-".join(c) for c in CONFIGS])
def test_pair(config, dtype):
    check_config(options_of(config), dtype)


# options that change which state a rule keeps (`Rule.for_options`), each run with every
# state format and moment policy: SGD at momentum 0 (MeZO's ZO-SGD) keeps no buffer
STATE_OPTIONS = [{"rule": "sgdm", "momentum": 0.0}]
VARIANTS = [(extra, fmt, policy) for extra in STATE_OPTIONS for fmt, policy in
            zip(gp.STATE_FORMATS.names(), itertools.cycle(POLICIES))]


@pytest.mark.parametrize("extra,state_format,policy", VARIANTS,
                         ids=[f"{e['rule']}-{f}-{p}" for e, f, p in VARIANTS])
def test_state_shaping_options(extra, state_format, policy):
    check_config({**options_of(("svd", extra["rule"], state_format, "drop", policy)), **extra},
                 torch.float32)


@settings(max_examples=10, deadline=None)
@given(config=st.tuples(*(st.sampled_from(names) for names in (
           gp.PROJECTORS.names(), gp.RULES.names(), gp.STATE_FORMATS.names(),
           gp.RESIDUALS.names(), list(POLICIES)))),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), split=st.integers(1, 5))
def test_random_combination(config, dtype, split):
    check_config(options_of(config), dtype, steps=6, split=split)
