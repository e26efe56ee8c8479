"""The gradnormlorp parametrization: the model is unchanged at conversion, the layer computes
DoRA's output formula (written independently, as peft evaluates it), the rank-0 variant's
gradients, the planner to the byte of a real step, option errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradproj as gp
from gradproj.memory import gradient_bytes, optimizer_bytes, weight_bytes
from gradproj.memory.accounting import parametrization_bytes
from gradproj.optimizers import optimizer_state_nbytes
from gradproj.parametrizations import apply_parametrization, linear_module_names
from gradproj.train.model import build_model, model_config

CFG = model_config("tiny", n_layers=2)  # dim 128, ffn 344
TOKENS = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rank", [8, 0])
def test_conversion_leaves_the_model_unchanged(rank):
    model = build_model(CFG)
    before = model(TOKENS, TOKENS).item()
    layers = apply_parametrization(model, {"kind": "gradnormlorp", "rank": rank},
                                   linear_module_names(model, ("attn", "mlp")))
    assert len(layers) == 14 and model(TOKENS, TOKENS).item() == pytest.approx(before, rel=1e-6)
    layer = layers["layers.0.mlp.down_proj"]
    trained = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trained == ({"magnitude", "B", "A"} if rank else {"magnitude", "direction"})
    assert layer.projected == (("B", "A") if rank else ("direction",))


def test_forward_is_doras_output_formula():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 16)
    layer = apply_parametrization(torch.nn.ModuleDict({"attn": linear}),
                                  {"kind": "gradnormlorp", "rank": 4, "alpha": 8.0}, ["attn"])["attn"]
    with torch.no_grad():
        layer.B.normal_()
        layer.magnitude.uniform_(0.5, 2.0)
    w0, b, a, m, s = layer.weight, layer.B, layer.A, layer.magnitude, 8.0 / 4
    x = torch.randn(5, 24)
    # peft's DoRA: (m / ‖W₀ + s·B·A‖_row) ⊙ (x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ) + bias, norm per output row
    norm = (w0 + s * b @ a).norm(dim=1)
    expect = (m / norm) * (x @ w0.T + s * (x @ a.T) @ b.T) + linear.bias
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-6)
    merged = layer.merged()
    assert type(merged) is torch.nn.Linear
    torch.testing.assert_close(merged(x), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_rank0_gradients_match_the_dense_form(detach):
    torch.manual_seed(1)
    layer = apply_parametrization(torch.nn.ModuleDict({"mlp": torch.nn.Linear(12, 10)}),
                                  {"kind": "gradnormlorp", "rank": 0, "detach_norm": detach},
                                  ["mlp"])["mlp"]
    with torch.no_grad():
        layer.magnitude.uniform_(0.5, 2.0)
    x, t = torch.randn(3, 7, 12, requires_grad=True), torch.randn(3, 7, 10)
    y = layer(x)
    F.mse_loss(y, t).backward()
    v, m = layer.direction.detach(), layer.magnitude.detach()
    w = ((m / v.norm(dim=1))[:, None] * v).requires_grad_(True)
    bias = layer.bias.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref @ w.T + bias   # the dense form, differentiated by autograd
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    F.mse_loss(y_ref, t).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(layer.bias.grad, bias.grad, rtol=1e-5, atol=1e-7)
    g, vhat = w.grad, v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer.magnitude.grad, (g * vhat).sum(1), rtol=1e-5, atol=1e-7)
    radial = 0 if detach else vhat * (g * vhat).sum(1, keepdim=True)
    torch.testing.assert_close(layer.direction.grad, (m / v.norm(dim=1))[:, None] * (g - radial),
                               rtol=1e-5, atol=1e-7)


SETUPS = {
    "rank8-galore": ({"kind": "gradnormlorp", "rank": 8}, dict(preset="galore", rank=4)),
    "rank0-galore8bit": ({"kind": "gradnormlorp", "rank": 0}, dict(preset="galore8bit", rank=32)),
}


@pytest.mark.parametrize("name", SETUPS)
def test_planner_accounts_weights_factors_and_states_of_a_real_step(name):
    table, options = SETUPS[name]
    options = dict(options)
    preset = options.pop("preset")

    def build(device):
        model = build_model(CFG, device=device)
        return model, gp.build_optimizer(model, preset, parametrization=table, **options)

    shapes = [(m.out_features, m.in_features) for n, m in build_model(CFG, device="meta").named_modules()
              if isinstance(m, torch.nn.Linear) and (".attn." in n or ".mlp." in n)]
    r = table["rank"]
    magnitudes = 4 * sum(m for m, _ in shapes)
    expect = ({"weights": magnitudes, "frozen": 4 * sum(m * n for m, n in shapes),
               "factors": 4 * sum(r * (m + n) for m, n in shapes)} if r else
              {"weights": magnitudes + 4 * sum(m * n for m, n in shapes)})
    meta, meta_opt = build("meta")
    assert parametrization_bytes(meta) == expect
    model, opt = build("cpu")
    assert weight_bytes(meta) == weight_bytes(model)
    model(TOKENS, TOKENS).backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    assert gradient_bytes(meta_opt) == grads
    opt.step()
    assert optimizer_bytes(meta_opt).total == optimizer_state_nbytes(opt)
    assert all(p.grad is None and p not in opt.state for p in model.parameters() if not p.requires_grad)


def test_options_are_checked():
    with pytest.raises(ValueError, match="option 'rank' must be an integer >= 0"):
        gp.PARAMETRIZATIONS.create("gradnormlorp", rank=-1)
    with pytest.raises(ValueError, match="option 'detach_norm' must be true or false"):
        gp.PARAMETRIZATIONS.create("gradnormlorp", detach_norm=1)
    with pytest.raises(ValueError, match=r"option 'rank' must be below min\(16, 12\)"):
        apply_parametrization(torch.nn.ModuleDict({"mlp": torch.nn.Linear(12, 16)}),
                              {"kind": "gradnormlorp", "rank": 12}, ["mlp"])
