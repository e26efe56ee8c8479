"""SGD (sgdm at momentum 0: MeZO's ZO-SGD) keeps no rule state; with momentum it is torch's.

`Rule.for_options` sizes a rule's state from its group's options: at momentum 0 no buffer
is allocated, counted, reset, rotated or saved, at full rank and in a projected group alike,
and the step with momentum is torch.optim.SGD's to the bit.
"""
from __future__ import annotations

import pytest
import torch

import gradproj as gp
from gradproj.formats import blockwise
from gradproj.optimizers import optimizer_state_nbytes

LR = 0.05


def _model(seed: int = 0) -> torch.nn.ModuleDict:
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({  # three 24×16 weights step as one bucket
        "attn_q": torch.nn.Linear(16, 24), "attn_k": torch.nn.Linear(16, 24),
        "attn_v": torch.nn.Linear(16, 24), "mlp": torch.nn.Linear(24, 16, bias=False)})


def _grads(model, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in model.parameters()] for _ in range(steps)]


def _step(model, opt, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    opt.step()


@pytest.fixture
def quantize_every_moment(monkeypatch):
    # q8/q4 keep moments below 4096 values in fp32; quantize these small ones too, so a
    # buffer that came back would be codes + absmax, as at scale
    monkeypatch.setattr(blockwise, "MIN_QUANTIZED_NUMEL", 1)


@pytest.mark.usefixtures("quantize_every_moment")
@pytest.mark.parametrize("state_format", gp.STATE_FORMATS.names())
@pytest.mark.parametrize("moments", ["rotate", "reset"])
def test_momentum_zero_keeps_no_rule_state(state_format, moments):
    """Full-rank weights hold only the step count and seed; projected ones only their basis.
    Each projected step is W − lr·scale·P·(PᵀG) with the basis the state holds (GaLore with
    plain SGD, spelled out), the full-rank ones W − lr·G; refreshes at steps 0, 2, 4."""
    model = _model()
    opt = gp.LowRankOptimizer(gp.param_groups(model, targets=("attn", "mlp"), rank=4,
                                              update_gap=2, scale=0.5, moments=moments),
                              lr=LR, rule="sgdm", momentum=0.0, state_format=state_format)
    lowrank = {p for p in opt.param_groups[0]["params"]}
    for grads in _grads(model, 5):
        before = [p.detach().clone() for p in model.parameters()]
        _step(model, opt, grads)
        for p, w, g in zip(model.parameters(), before, grads):
            state = opt.state[p]
            if p in lowrank:
                basis = state["proj_left"] if "proj_left" in state else state["proj_right"]
                low = basis.T @ g if "proj_left" in state else g @ basis
                back = basis @ low if "proj_left" in state else low @ basis.T
                torch.testing.assert_close(p.detach(), w - LR * 0.5 * back, rtol=1e-6, atol=1e-6)
            else:
                torch.testing.assert_close(p.detach(), w - LR * g, rtol=1e-6, atol=1e-7)
    basis_bytes = 0
    for p, state in opt.state.items():
        assert not any(key.startswith("momentum_buffer") for key in state), sorted(state)
        tensors = {k for k, v in state.items() if torch.is_tensor(v)}
        assert tensors == ({"proj_left"} if "proj_left" in state else {"proj_right"}
                           if p in lowrank else set())
        basis_bytes += sum(state[k].numel() * state[k].element_size() for k in tensors)
    assert optimizer_state_nbytes(opt) == basis_bytes > 0


def test_the_rule_as_configured_for_momentum_zero_counts_nothing():
    rule, fmt = gp.RULES.create("sgdm"), gp.STATE_FORMATS.create("fp32")
    group = dict(rule.defaults, momentum=0.0)
    plain = rule.for_options(group)
    assert plain.state_nbytes((64, 32), fmt) == 0 and plain.for_options(group) is plain
    state = {"step": 0}
    plain.init_state(state, (64, 32), torch.device("cpu"), fmt)
    assert state == {"step": 0}
    # the default momentum keeps its buffer: one fp32 tensor of the gradient's shape
    full = rule.for_options(dict(rule.defaults))
    assert full is rule and full.state_nbytes((64, 32), fmt) == 4 * 64 * 32


@pytest.mark.parametrize("momentum,dampening,nesterov", [(0.9, 0.0, False), (0.8, 0.3, False),
                                                          (0.9, 0.0, True)])
def test_momentum_steps_are_torch_sgds_bit_for_bit(momentum, dampening, nesterov):
    """fp32, full rank, no decay: the same elementwise ops as torch.optim.SGD (for-loop)."""
    model, ref = _model(), _model()
    opt = gp.LowRankOptimizer([{"params": list(model.parameters()), "lowrank": False}], lr=LR,
                              rule="sgdm", momentum=momentum, dampening=dampening,
                              nesterov=nesterov)
    sgd = torch.optim.SGD(ref.parameters(), lr=LR, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, foreach=False)
    for grads in _grads(model, 4):
        _step(model, opt, grads)
        _step(ref, sgd, grads)
    for got, want in zip(model.parameters(), ref.parameters()):
        assert torch.equal(got, want)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


@pytest.mark.parametrize("bucket_cap_mb", ["auto", 1e-6], ids=["bucketed", "per-weight"])
def test_momentum_switched_on_later_starts_the_buffer_as_torch(bucket_cap_mb):
    """Momentum 0 for two steps (no buffer), then 0.9: torch.optim.SGD makes its buffer at
    the first step that needs it, B = G (undampened: dampening 0.3 would give 0.7·G); so
    does sgdm, for a stacked bucket too."""
    model, ref = _model(), _model()
    opt = gp.LowRankOptimizer([{"params": list(model.parameters()), "lowrank": False}], lr=LR,
                              rule="sgdm", momentum=0.0, dampening=0.3,
                              bucket_cap_mb=bucket_cap_mb)
    sgd = torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.0, dampening=0.3, foreach=False)
    for t, grads in enumerate(_grads(model, 5)):
        if t == 2:
            opt.param_groups[0]["momentum"] = sgd.param_groups[0]["momentum"] = 0.9
        _step(model, opt, grads)
        _step(ref, sgd, grads)
        assert all(("momentum_buffer" in s) == (t >= 2) for s in opt.state.values())
    for got, want in zip(model.parameters(), ref.parameters()):
        assert torch.equal(got, want)


@pytest.mark.usefixtures("quantize_every_moment")
@pytest.mark.parametrize("state_format", ["fp32", "q8", "q4"])
def test_momentum_switched_on_at_a_rotating_refresh(state_format):
    """The switch lands on a refresh step with moments = "rotate": there is no buffer to
    rotate yet, it starts as G's projection, and from then on it is stored and rotated
    like any moment (codes in q8/q4)."""
    model = _model()
    opt = gp.LowRankOptimizer(gp.param_groups(model, targets=("attn", "mlp"), rank=4,
                                              update_gap=2, moments="rotate"),
                              lr=LR, rule="sgdm", momentum=0.0, state_format=state_format)
    for t, grads in enumerate(_grads(model, 5)):
        if t == 2:
            for group in opt.param_groups:
                group["momentum"] = 0.9
        _step(model, opt, grads)
    for state in opt.state.values():
        assert any(k.startswith("momentum_buffer") for k in state)
        if state_format != "fp32":
            assert "momentum_buffer.codes" in state
    assert all(torch.isfinite(p).all() for p in model.parameters())
