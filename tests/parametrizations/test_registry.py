"""The PARAMETRIZATIONS registry and its one path: spec table, build_optimizer, planner, list."""
from pathlib import Path

import pytest
import torch

import gradproj as gp
from gradproj.parametrizations import Parametrization, ParametrizedLinear
from gradproj.parametrizations.int8 import Int8Linear
from gradproj.train.checks import SpecError
from gradproj.train.cli import main
from gradproj.train.model import build_model
from gradproj.train.spec import load_spec

SPEC = """
[model]
preset = "tiny"
dim = 32
n_layers = 1
n_heads = 2
ffn_dim = 64
{param}
[data]
seq_len = 16

[optimizer]
{opt}
lr = 1e-2

[optimizer.lowrank]
projector = "svd"
rank = 4

[train]
steps = 2
batch_size = 2
"""


def spec_of(tmp_path: Path, param: str = "", opt: str = 'rule = "adamw"') -> Path:
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(param=param, opt=opt))
    return path


def test_int8_is_registered_and_listed(capsys):
    assert "int8" in gp.PARAMETRIZATIONS.names()
    assert main(["list", "parametrizations"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("parametrizations:") and "int8" in out and "Q-GaLore" in out


def test_spec_table_converts_the_targeted_layers_and_projects_their_weight(tmp_path):
    spec = load_spec(spec_of(tmp_path, '[model.parametrization]\nkind = "int8"\ngroup_size = 128\n'))
    assert spec.optimizer.parametrization == {"kind": "int8", "group_size": 128}
    assert spec.resolved()["model"]["parametrization"] == {"kind": "int8", "group_size": 128}
    model = build_model(spec.model)
    opt = spec.optimizer.build(model)
    converted = {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert set(converted) == {n for n, _ in build_model(spec.model).named_modules()
                              if n.endswith("_proj")}  # attention + MLP, not the head
    assert all(m.group_size == 128 for m in converted.values())
    low = {id(p) for g in opt.param_groups if g["lowrank"] for p in g["params"]}
    assert low == {id(m.weight) for m in converted.values()}


def test_legacy_quantize_weights_is_the_int8_parametrization():
    """q-galore's `quantize_weights` and `[model.parametrization] kind = "int8"` build the
    same layers and take the same first step, code for code."""
    def run(**kwargs):
        torch.manual_seed(0)
        model = torch.nn.ModuleDict({"attn": torch.nn.Linear(48, 32), "mlp": torch.nn.Linear(32, 40)})
        opt = gp.build_optimizer(model, rank=4, update_gap=2, lr=1e-2, **kwargs)
        x = torch.randn(8, 48)
        model["mlp"](model["attn"](x)).square().mean().backward()
        opt.step()
        return model
    a = run(preset="q-galore")
    b = run(preset="q-galore", quantize_weights=False, parametrization={"kind": "int8", "group_size": 256})
    for name in ("attn", "mlp"):
        assert type(a[name]) is Int8Linear and type(b[name]) is Int8Linear
        assert torch.equal(a[name].weight, b[name].weight)
        assert torch.equal(a[name].weight_scale, b[name].weight_scale)


def test_merge_exports_plain_linear_layers_with_the_same_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    gp.apply_parametrization(model, "int8", ["0", "2"])
    x = torch.randn(5, 24)
    before = model(x)
    gp.merge_parametrizations(model)
    assert [type(m) for m in model] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert torch.equal(model(x), before)


@pytest.mark.parametrize("table, where, words", [
    ('kind = "int9"', "[model.parametrization].kind", ["did you mean 'int8'"]),
    ('group_size = 128', "[model.parametrization].kind", ["expected a parametrization name"]),
    ('kind = "int8"\ngroup_size = 0', "[model.parametrization].group_size", ["expected an integer >= 1"]),
    ('kind = "int8"\ngroup = 128', "[model.parametrization].group", ["did you mean 'group_size'"]),
])
def test_bad_table_is_one_line_naming_the_key(tmp_path, table, where, words):
    with pytest.raises(SpecError) as info:
        load_spec(spec_of(tmp_path, f"[model.parametrization]\n{table}\n"))
    lines = str(info.value).splitlines()
    assert len(lines) == 1 and where in lines[0], lines
    assert all(w in lines[0] for w in words), lines[0]


def test_a_plugin_registers_and_validates_like_the_built_ins(tmp_path):
    """A third-party parametrization: its options reach the spec and its errors name them."""
    class Scaled(ParametrizedLinear):
        def __init__(self, linear, factor):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            self.weight = torch.nn.Parameter(linear.weight.detach().clone())
            self.factor = factor

        def dense_weight(self):
            return self.weight * self.factor

        def forward(self, x):
            return torch.nn.functional.linear(x, self.dense_weight())

    @gp.PARAMETRIZATIONS.register("test-scaled")
    class ScaledParam(Parametrization):
        """test only: W·factor"""
        defaults = {"factor": 2.0}

        def validate(self):
            self._number("factor", 0)

        def convert(self, linear, index):
            return Scaled(linear, self.options["factor"])

    try:
        spec = load_spec(spec_of(tmp_path, '[model.parametrization]\nkind = "test-scaled"\n'))
        model = build_model(spec.model)
        spec.optimizer.build(model)
        assert isinstance(model.layers[0].attn.q_proj, Scaled)
        with pytest.raises(SpecError, match=r"\[model.parametrization\].factor: expected a number > 0"):
            load_spec(spec_of(tmp_path, '[model.parametrization]\nkind = "test-scaled"\nfactor = -1\n'))
    finally:
        gp.PARAMETRIZATIONS._entries.pop("test-scaled")


def test_planner_goes_through_the_same_build(tmp_path):
    path = spec_of(tmp_path, '[model.parametrization]\nkind = "int8"\n')
    plan = gp.plan_memory(path).spec
    model = build_model(load_spec(path).model, device="meta")
    gp.apply_parametrization(model, "int8", gp.parametrizations.linear_module_names(model, ("attn", "mlp")))
    codes = sum(m.weight.numel() for m in model.modules() if isinstance(m, Int8Linear))
    scales = sum(4 * m.weight_scale.numel() for m in model.modules() if isinstance(m, Int8Linear))
    assert plan.parametrization == {"codes": codes, "scales": scales}
    assert plan.scales["weights"] == scales
