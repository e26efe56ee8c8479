"""Registry-driven properties of every projector, rule and state format (plugins added later included).

Each test draws the plugin name from its registry at collection time, so a plugin
registered tomorrow runs the same checks without editing this file.
"""
import io

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp
from gradproj.projectors.base import basis_shape, low_rank_shape, sides_of

EPS = torch.finfo(torch.float32).eps
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def plain(value) -> bool:
    return torch.is_tensor(value) or isinstance(value, (bool, int, float))


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))


@st.composite
def matrices(draw, max_side=24):
    """(grad, rank): m < n, m > n and square; transposed (non-contiguous) views half the time."""
    m = draw(st.integers(2, max_side))
    n = draw(st.sampled_from([m, draw(st.integers(2, max_side))]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        grad = torch.randn(n, m, generator=gen).T  # a strided view, as autograd may hand over
    else:
        grad = torch.randn(m, n, generator=gen)
    grad = grad * draw(st.sampled_from([1.0, 1e-4, 1e4]))
    rank = draw(st.integers(1, min(m, n) - 1)) if min(m, n) > 1 else 1
    return grad, rank


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(gp.PROJECTORS.names()), data=matrices(),
       side=st.sampled_from(["left", "right", "full"]), dtype=st.sampled_from(list(DTYPES)))
def test_projector_properties(name, data, side, dtype):
    grad, rank = data
    shape = tuple(grad.shape)
    projector = gp.PROJECTORS.create(name)
    state = {}
    projector.fit(grad, state, rank=rank, side=side, seed=11, dtype=DTYPES[dtype])
    # the bytes `fit` stores are exactly what "auto" and the memory planner are told
    assert tensor_bytes(state) == projector.basis_nbytes(shape, rank, side, DTYPES[dtype])
    assert all(plain(v) for v in state.values())
    low = projector.project(grad, state, side)
    assert tuple(low.shape) == low_rank_shape(shape, rank, side) and torch.isfinite(low).all()
    full = projector.project_back(low, state, side, shape)
    assert tuple(full.shape) == shape and torch.isfinite(full).all()
    reloaded = roundtrip(state)
    assert torch.equal(projector.project(grad, reloaded, side), low)
    again = {}
    projector.fit(grad, again, rank=rank, side=side, seed=11, dtype=DTYPES[dtype])
    assert torch.equal(projector.project(grad, again, side), low)  # deterministic per seed
    if getattr(projector, "orthonormal", False):
        for one in sides_of(side):
            p = projector.load_basis(state, one, shape)
            assert tuple(p.shape) == basis_shape(shape, rank, one)
            d = p.shape[0]
            # storage rounding: bf16 (2⁻⁸ per entry) or INT4 (the widest group's half step)
            unit = 2.0 ** -8 if dtype == "bf16" else 0.0
            for key in (k for k in state if k.endswith(".scale")):
                unit = max(unit, state[key].max().item() / 2)
            bound = 2 * d ** 0.5 * unit + d * unit ** 2 + 16 * EPS * d
            assert (p.T @ p - torch.eye(rank)).abs().max() <= bound


@st.composite
def gradients(draw):
    """Shapes a rule sees: 1-D (biases, norms), 2-D low-rank or full, and 3-D conv-like."""
    shape = draw(st.sampled_from([(7,), (5, 9), (9, 5), (6, 6), (3, 4, 5), (1,), (1, 8)]))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    steps = []
    for _ in range(4):
        g = torch.randn(*reversed(shape), generator=gen).permute(*reversed(range(len(shape))))
        steps.append(g * draw(st.sampled_from([1.0, 0.0, 1e-3, 1e3])))
    return steps


def run_rule(rule, fmt, grads, state, group):
    out = []
    for g in grads:
        state["step"] += 1
        out.append(rule.update(g.float(), state, group, fmt))
        if rule.uses_curvature:  # a GNB-like estimate ĥ = B·g⊙g (B = 8) after each step
            rule.update_curvature(g.float().square().mul(8), state, group, fmt)
    return out


# option values that change which state a rule keeps (`Rule.for_options`), drawn beside
# the defaults: SGD at momentum 0 keeps no buffer
STATE_OPTIONS = {"sgdm": [{"momentum": 0.0}]}


@settings(max_examples=60, deadline=None)
@given(rule_name=st.sampled_from(gp.RULES.names()), fmt_name=st.sampled_from(gp.STATE_FORMATS.names()),
       grads=gradients(), data=st.data())
def test_rule_and_format_properties(rule_name, fmt_name, grads, data):
    rule, fmt = gp.RULES.create(rule_name), gp.STATE_FORMATS.create(fmt_name)
    group = dict(rule.defaults, **data.draw(st.sampled_from([{}, *STATE_OPTIONS.get(rule_name, [])])))
    rule.validate(group)
    rule = rule.for_options(group)  # what the optimizer allocates, counts and steps through
    shape = tuple(grads[0].shape)
    state = {"step": 0}
    rule.init_state(state, shape, torch.device("cpu"), fmt)
    assert tensor_bytes(state) == rule.state_nbytes(shape, fmt)
    if fmt_name in ("q8", "q4") and rule.moments:  # conftest.py: every moment is quantized
        assert any(k.endswith(".codes") for k in state) and not any(
            torch.is_tensor(v) and v.dtype == torch.float32 and v.numel() > 1 for v in state.values())
    directions = run_rule(rule, fmt, grads, state, group)
    for d in directions:
        assert tuple(d.shape) == shape and d.dtype == torch.float32 and torch.isfinite(d).all()
    assert all(plain(v) for v in state.values())
    # resume: the state after 2 updates, through torch.save / weights_only load, continues
    # exactly as the uninterrupted run did
    resumed = {"step": 0}
    rule.init_state(resumed, shape, torch.device("cpu"), fmt)
    run_rule(rule, fmt, grads[:2], resumed, group)
    resumed = roundtrip(resumed)
    for got, want in zip(run_rule(rule, fmt, grads[2:], resumed, group), directions[2:]):
        assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(gp.RESIDUALS.names()), data=matrices(),
       side=st.sampled_from(["left", "right", "full"]))
def test_residual_properties(name, data, side):
    grad, rank = data
    shape = tuple(grad.shape)
    residual = gp.RESIDUALS.create(name)
    group = {"scale": 0.25, **residual.defaults}
    residual.validate(group)
    projector = gp.PROJECTORS.create("svd")
    state = {}
    projector.fit(grad.float(), state, rank=rank, side=side, seed=0, dtype=torch.float32)
    low = projector.project(grad.float(), state, side)
    for _ in range(3):  # repeated calls exercise stateful policies (the limiter's norm)
        update = residual.combine(grad.float(), low, low.clone(), lambda x: projector.project_back(
            x, state, side, shape), state, group)
        assert tuple(update.shape) == shape and torch.isfinite(update).all()
    assert all(plain(v) for v in state.values())
    roundtrip(state)


@settings(max_examples=40, deadline=None)
@given(rule_name=st.sampled_from([n for n in gp.RULES.names() if gp.RULES.get(n).finishes_update]),
       shape=st.sampled_from([(7,), (5, 9), (9, 5), (3, 4, 5), (1, 8)]), k=st.integers(1, 3),
       scale=st.sampled_from([1.0, 0.0, 1e-3, 1e3]), weight_decay=st.sampled_from([0.0, 0.1]),
       with_grad=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_finish_update_properties(rule_name, shape, k, scale, weight_decay, with_grad, seed):
    """A rule that finishes the full-size update: finite U' of U's shape, W left untouched,
    and each slice of a bucket's stack gets what that weight alone gets (per-slice norms)."""
    rule = gp.RULES.create(rule_name)
    group = {"weight_decay": weight_decay, **rule.defaults}
    rule.validate(group)
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(k, *shape, generator=gen) * scale  # scale 0: zero norms
    update = torch.randn(k, *shape, generator=gen)
    grad = torch.randn(k, *shape, generator=gen) if with_grad else None
    w_copy = weights.clone()
    out = rule.finish_update(weights, update.clone(), grad, group)
    assert out.shape == update.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert torch.equal(weights, w_copy)
    for i in range(k):
        alone = rule.finish_update(weights[i:i + 1], update[i:i + 1].clone(),
                                   None if grad is None else grad[i:i + 1], group)
        torch.testing.assert_close(out[i:i + 1], alone, rtol=4 * EPS, atol=0)
