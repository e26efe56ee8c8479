"""state_dict round trip: weights_only-safe, and a resumed run is bit-identical."""
import io

import pytest
import torch

import gradproj as gp


def make_model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({
        "attn": torch.nn.Linear(24, 16),
        "mlp": torch.nn.Linear(16, 40, bias=False),
        "norm": torch.nn.LayerNorm(16),
    })
    return model


def loss_fn(model, x):
    h = model["norm"](model["attn"](x))
    return model["mlp"](h).pow(2).mean()


def batches(n, seed=123):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 24, generator=gen) for _ in range(n)]


def build(model, projector):
    return gp.LowRankOptimizer(gp.param_groups(model, rank=4, update_gap=3, projector=projector),
                               lr=1e-2, weight_decay=0.01)


def train(model, opt, data):
    for x in data:
        opt.zero_grad()
        loss_fn(model, x).backward()
        opt.step()


@pytest.mark.parametrize("projector", gp.PROJECTORS.names())
def test_resume_is_bit_identical(projector):
    data = batches(8)
    model = make_model()
    opt = build(model, projector)
    train(model, opt, data)
    expected = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    opt = build(model, projector)
    train(model, opt, data[:4])  # k = 4 is past a refresh (steps 0, 3) and mid-gap
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed = make_model(seed=99)  # different init: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = build(resumed, projector)
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, data[4:])
    for p, q in zip(resumed.parameters(), expected):
        assert torch.equal(p.detach(), q)


def test_bf16_params_keep_fp32_state_dtypes_on_load():
    model = make_model().to(torch.bfloat16)
    opt = build(model, "svd")
    train(model, opt, [x.bfloat16() for x in batches(2)])
    opt2 = build(model, "svd")
    opt2.load_state_dict(opt.state_dict())
    for p in model.parameters():
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert opt2.state[p][key].dtype == value.dtype, key
                assert opt2.state[p][key] is not value  # a copy, not an alias


def test_state_is_tensors_and_plain_scalars():
    model = make_model()
    opt = build(model, "int4")
    train(model, opt, batches(2))
    for state in opt.state.values():
        for key, value in state.items():
            assert torch.is_tensor(value) or type(value) in (int, float, bool), (key, type(value))
