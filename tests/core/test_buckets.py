"""The bucketed step: same results as one weight at a time, and a host cost that does not
grow with the number of weights."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradproj as gp
from gradproj.stacked_state import StackedState


class _Block(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.attn = nn.Module()
        for name in "qkvo":
            setattr(self.attn, name, nn.Linear(width, width, bias=False))
        self.mlp = nn.Module()
        self.mlp.up = nn.Linear(width, hidden, bias=False)
        self.mlp.down = nn.Linear(hidden, width, bias=False)
        self.norm = nn.Parameter(torch.ones(width))


def _model(layers: int, width: int = 16, hidden: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.layers = nn.ModuleList(_Block(width, hidden) for _ in range(layers))
    model.embed = nn.Parameter(torch.randn(32, width))
    return model


def _grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=gen) for p in model.parameters()]


def _set_grads(model, grads):
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()


CASES = {
    "galore": {},
    "galore-randomized": {"projector": "randomized"},
    "galore8bit": {},
    "fira": {},
    "frugal": {},
    "apollo": {"rank": 4},
    "apollo-mini": {},
    "q-galore": {},
    "adafactor-left-rotate": {"rule": "adafactor", "proj_type": "left", "moments": "rotate"},
    "lion-full-reset": {"rule": "lion", "proj_type": "full", "moments": "reset"},
    "sgdm-q4-wd": {"rule": "sgdm", "state_format": "q4", "weight_decay": 0.1},
    "adabelief-int4-adaptive": {"rule": "adabelief", "projector": "int4", "refresh": "adaptive",
                                "refresh_window": 2, "refresh_threshold": 0.0},
    # moments of >= 4096 values, so q8/q4 store codes (stacked for q8: whole 256-blocks)
    "galore8bit-codes": {"rank": 32, "width": 128},
    "fira-q4-codes": {"rank": 32, "width": 128, "state_format": "q4"},
    # rules that finish the full-size update: per-slice norms over the stacked bucket
    "lamb-fira-wd": {"residual": "fira", "weight_decay": 0.1},
    "diffgrad-rotate": {"moments": "rotate"},
    "adamp-nesterov-q8-codes": {"rank": 32, "width": 128, "state_format": "q8", "nesterov": True,
                                "weight_decay": 0.1},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bmm splits work by batch with more threads (see README)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bucketed_step_equals_one_weight_at_a_time(name, one_thread):
    """Weights and every state tensor bit-identical after 7 steps with refreshes at 0, 3, 6."""
    preset = name.split("-")[0] if name.split("-")[0] in gp.PRESETS else "galore"
    if name in ("apollo-mini", "q-galore"):
        preset = name
    options = {"rank": 4, "update_gap": 3, "lr": 1e-2, **CASES[name]}
    width = options.pop("width", 16)
    if preset == "apollo-mini":
        options.pop("rank")
    hidden = 40 if width < 64 else 2 * width
    models = [_model(3, width, hidden), _model(3, width, hidden)]
    opts = [gp.build_optimizer(m, preset, **options) for m in models]
    for step in range(7):
        grads = _grads(models[0], step)
        for m in models:
            _set_grads(m, grads)
        opts[0].step()
        for p in models[1].parameters():  # per-layer mode's path: one weight, one call
            opts[1].step_param(p)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    if name.endswith("-codes"):
        assert sum("exp_avg.codes" in s for s in opts[0].state.values()) >= 13
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


class _OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _steady_ops(layers: int, preset: str, **options) -> int:
    model = _model(layers)
    opt = gp.build_optimizer(model, preset, rank=4, update_gap=100, **options)
    _set_grads(model, _grads(model, 0))
    opt.step()  # the refresh and the first allocation
    counter = _OpCount()
    with counter:
        opt.step()
    return counter.ops


@pytest.mark.parametrize("preset,options", [("galore", {}), ("galore", {"projector": "randomized"}),
                                            ("galore8bit", {}), ("fira", {}), ("frugal", {})])
def test_ops_per_step_do_not_grow_with_the_number_of_weights(preset, options):
    """A steady step dispatches the same ATen ops for 2 layers as for 24 (per-weight code
    would add ~15 per weight), and fewer than torch's AdamW(foreach) at 24 layers (whose
    count grows by 2 per tensor: its step counters are tensors)."""
    small, large = _steady_ops(2, preset, **options), _steady_ops(24, preset, **options)
    assert small == large
    model = _model(24)
    adamw = torch.optim.AdamW(model.parameters(), foreach=True)
    _set_grads(model, _grads(model, 0))
    adamw.step()
    counter = _OpCount()
    with counter:
        adamw.step()
    assert large < counter.ops


def test_stacked_state_keeps_views_and_restacks_replaced_entries():
    states = [{"m": torch.full((2,), float(i)), "step": 3} for i in range(3)]
    stacks: dict = {}
    stacked = StackedState(states, stacks)
    m = stacked["m"]
    assert m.shape == (3, 2) and stacked["step"] == 3
    m.add_(1.0)  # in place on the stack is in place on every parameter's entry
    assert [float(s["m"][0]) for s in states] == [1.0, 2.0, 3.0]
    assert StackedState(states, stacks)["m"] is m  # kept between steps
    states[1]["m"] = torch.zeros(2)  # e.g. a refresh stored a new tensor
    again = StackedState(states, stacks)["m"]
    assert again is not m and again[1].eq(0).all() and again[2].eq(3).all()
    stacked["n"] = torch.arange(6.0).view(3, 2)
    assert torch.equal(states[2]["n"], torch.tensor([4.0, 5.0]))
    with pytest.raises(ValueError, match="leading dimension 3"):
        stacked["bad"] = torch.zeros(2, 2)


@pytest.mark.parametrize("name", [n for n in gp.PROJECTORS.names()
                                  if gp.PROJECTORS.create(n).batched])
def test_batched_projectors_act_on_each_slice_as_on_one_weight(name, one_thread):
    """A projector that declares `batched` gives each slice of a k×m×n stack exactly what
    it gives that weight as a bucket of one (so a plugin that lies is caught here)."""
    projector = gp.PROJECTORS.create(name)
    gen = torch.Generator().manual_seed(7)
    for side in ("left", "right", "full"):
        grads = torch.randn(3, 12, 10, generator=gen)
        states = [{} for _ in range(3)]
        for i, state in enumerate(states):
            projector.fit(grads[i], state, rank=3, side=side, seed=i, dtype=torch.float32)
        low = projector.project(grads, StackedState(states), side)
        back = projector.project_back(low, StackedState(states), side, (12, 10))
        for i, state in enumerate(states):
            one = StackedState([state])
            assert torch.equal(low[i], projector.project(grads[i:i + 1], one, side)[0])
            assert torch.equal(back[i], projector.project_back(low[i:i + 1], one, side, (12, 10))[0])


@pytest.mark.parametrize("preset", sorted(gp.PRESETS.names()))
def test_steady_step_reads_no_tensor_value_on_the_host(preset):
    """No `.item()`, `float(t)`, `bool(t)` between refreshes (each is an
    `aten._local_scalar_dense`, a device sync on CUDA), so the step can be captured."""
    model = _model(2)
    opt = gp.build_optimizer(model, preset, update_gap=100,
                             **({} if preset == "apollo-mini" else {"rank": 4}))
    _set_grads(model, _grads(model, 0))
    opt.step()
    counter = _OpCount()
    with counter:
        opt.step()
    assert counter.ops and "aten._local_scalar_dense.default" not in counter.names


def test_bucket_cap_splits_buckets_without_changing_the_step(one_thread):
    """`bucket_cap_mb` bounds the gradient bytes one bucket stacks; the split changes how
    many buckets step, not a bit of the result."""
    models = [_model(5), _model(5)]
    cap = 2.5 * 16 * 16 * 4 / 2 ** 20  # room for two 16×16 fp32 gradients
    opts = [gp.build_optimizer(models[0], "galore", rank=4, update_gap=3),
            gp.build_optimizer(models[1], "galore", rank=4, update_gap=3, bucket_cap_mb=cap)]
    for step in range(4):
        grads = _grads(models[0], step)
        for m, opt in zip(models, opts):
            _set_grads(m, grads)
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
    group = opts[1].param_groups[0]
    sizes = sorted(len(b.params) for b in opts[1].buckets(0, group, list(group["params"])))
    # 20 q/k/v/o of 16×16 in pairs; 5 up and 5 down (40×16) one each
    assert sizes == [1] * 10 + [2] * 10
    with pytest.raises(ValueError, match="bucket_cap_mb"):
        gp.build_optimizer(_model(1), "galore", bucket_cap_mb=0)
