"""Every registered preset builds an optimizer for a model and trains; the published defaults."""
import pytest
import torch

import gradproj as gp


def make_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"attn": torch.nn.Linear(48, 32), "mlp": torch.nn.Linear(32, 40),
                                "norm": torch.nn.LayerNorm(40)})


@pytest.mark.parametrize("preset", gp.PRESETS.names())
def test_every_preset_builds_and_trains(preset):
    model = make_model()
    opt = gp.build_optimizer(model, preset=preset, rank=4, update_gap=2, lr=1e-3)
    x = torch.randn(8, 48)
    for _ in range(4):
        opt.zero_grad()
        model["norm"](model["mlp"](model["attn"](x))).square().mean().backward()
        opt.step()
    assert all(torch.isfinite(p.float()).all() for p in model.parameters())
    assert gp.PRESETS.entry(preset).description


def test_published_defaults():
    get = gp.preset_options
    assert get("galore8bit")["state_format"] == "q8"
    q = get("q-galore")
    assert (q["projector"], q["refresh"], q["quantize_weights"], q["weight_group_size"]) == \
        ("int4", "adaptive", True, 256)
    assert (q["refresh_window"], q["refresh_threshold"]) == (5, 0.4)
    assert (get("fira")["residual"], get("fira")["norm_growth_limit"]) == ("fira", 1.01)
    assert (get("frugal")["residual"], get("frugal")["moments"]) == ("frugal", "reset")
    assert (get("apollo")["projector"], get("apollo")["scale_type"]) == ("gaussian", "channel")
    mini = get("apollo-mini")
    assert (mini["rank"], mini["scale_type"], mini["scale"]) == (1, "tensor", 128.0)


def test_quantize_weights_option_is_validated():
    with pytest.raises(ValueError, match="quantize_weights"):
        gp.build_optimizer(make_model(), preset="galore", quantize_weights="yes")


def test_a_preset_composes_with_another_projector():
    # a spec may keep q-galore's policies but swap the projector: no stale projector options
    model = make_model()
    opt = gp.build_optimizer(model, preset="q-galore", projector="randomized", rank=4)
    assert opt.param_groups[0]["projector"] == "randomized"
    assert isinstance(model["attn"], gp.QuantLinear)


def test_gradproj_list_shows_every_plugin_with_its_description(capsys):
    from gradproj.train.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for registry in (gp.PROJECTORS, gp.RULES, gp.STATE_FORMATS, gp.RESIDUALS, gp.PRESETS):
        for entry in registry:
            assert entry.description and entry.name in out and entry.description in out
