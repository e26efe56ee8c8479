"""Coherent defaults: a rank relative to the model, warmup as a fraction, one-line warnings."""
from __future__ import annotations

import warnings

import pytest

from gradproj.train.checks import SpecError
from gradproj.train.cli import main
from gradproj.train.loop import Trainer
from gradproj.train.spec import load_spec, spec_from_dict

from trainhelpers import MICRO_SPEC, write_spec


def test_an_empty_spec_projects_at_a_quarter_of_the_width(tmp_path):
    spec = spec_from_dict({"checkpoint": {"dir": str(tmp_path / "run")}})
    assert spec.model.dim == 128 and spec.optimizer.options["rank"] == 32
    assert spec.resolved()["optimizer"]["lowrank"]["rank"] == 32  # the saved spec has the integer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the old default (rank 128 of width 128) warned 3 times
        trainer = Trainer(spec)
        trainer.train_step()
    low = [p for g in trainer.opt.param_groups if g["lowrank"] for p in g["params"]]
    assert low and all(trainer.opt.is_low_rank(p, trainer.opt.param_groups[0]) for p in low)


@pytest.mark.parametrize("rank,expected", [('"1/8"', 4), ('"1/2"', 16), ("8", 8), ('"1/1"', 32)])
def test_rank_may_be_a_fraction_of_the_width(tmp_path, rank, expected):
    spec = load_spec(write_spec(tmp_path, MICRO_SPEC.replace("rank = 8", f"rank = {rank}")))
    assert spec.model.dim == 32 and spec.optimizer.options["rank"] == expected


def test_a_presets_rank_is_kept_and_bad_fractions_refused(tmp_path):
    spec = spec_from_dict({"optimizer": {"preset": "galore"}})
    assert spec.optimizer.options.get("rank", spec.optimizer.effective["rank"]) == 128
    for bad in ('"3/2"', '"0/4"', '"quarter"', "0"):
        path = write_spec(tmp_path, MICRO_SPEC.replace("rank = 8", f"rank = {bad}"))
        with pytest.raises(SpecError) as info:
            load_spec(path)
        assert len(info.value.issues) == 1
        assert 'an integer >= 1 or a fraction of the model width such as "1/4"' in str(info.value)


def test_warmup_as_a_fraction_and_clamped_with_a_notice(tmp_path):
    frac = write_spec(tmp_path, MICRO_SPEC.replace("warmup_steps = 1", "warmup = 0.25"), "f.toml")
    assert load_spec(frac).train.warmup_steps == 2  # 0.25 of 8 steps
    assert load_spec(frac, ["train.steps=40"]).train.warmup_steps == 10
    both = write_spec(tmp_path, MICRO_SPEC.replace("warmup_steps = 1",
                                                   "warmup_steps = 1\nwarmup = 0.1"), "b.toml")
    with pytest.raises(SpecError, match="expected warmup .* or warmup_steps, not both"):
        load_spec(both)
    long = write_spec(tmp_path, MICRO_SPEC.replace("warmup_steps = 1", "warmup_steps = 6"), "l.toml")
    spec = load_spec(long, ["train.steps=5"])
    assert spec.train.warmup_steps == 0 and len(spec.notices) == 1
    assert "warmup clamped to 0 steps" in spec.notices[0].line("l.toml")
    with pytest.raises(SpecError, match=r"fewer than \[train\].steps 5, got 6 \(or set "
                                        r"\[train\].warmup = 0.1"):
        load_spec(long, ["train.steps=5", "train.warmup_steps=6"])


def test_warnings_and_notices_print_as_one_line_each(tmp_path, capsys):
    text = (MICRO_SPEC.replace("rank = 8", "rank = 32").replace("steps = 8", "steps = 2")
            .replace("warmup_steps = 1", "warmup_steps = 3"))
    assert main(["train", str(write_spec(tmp_path, text)), "--set", "train.steps=2"]) == 0
    err = capsys.readouterr().err.splitlines()
    warned = [line for line in err if line.startswith("warning: ")]
    assert len(warned) == 3 and all("rank 32 >= min(" in line for line in warned)
    assert any(line.startswith("notice: ") and "warmup clamped" in line for line in err)
    assert not any("UserWarning" in line or "warnings.warn" in line for line in err)


@pytest.mark.parametrize("through", ["spec", "python"])
def test_switching_a_presets_rule_takes_the_new_rules_own_defaults(through):
    """preset galore + rule sophia: GaLore's projection around Sophia with Sophia's ε and β,
    not the 1e-6 and (0.9, 0.999) the galore preset names for its AdamW; its own options
    (rank, T, scale) stay, and an explicit value still wins."""
    import torch

    import gradproj as gp
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    for extra, eps in (({}, 1e-15), ({"eps": 1e-9}, 1e-9)):
        if through == "spec":
            spec = spec_from_dict({"optimizer": {"preset": "galore", "rule": "sophia", **extra,
                                                 "lowrank": {"targets": ["0"]}}})
            assert spec.optimizer.effective["eps"] == eps
            opt = spec.optimizer.build(model)
        else:
            opt = gp.build_optimizer(model, "galore", targets=["0"], rule="sophia", **extra)
        group = next(g for g in opt.param_groups if g["lowrank"])
        assert (group["rule"], group["eps"], group["betas"]) == ("sophia", eps, (0.965, 0.99))
        assert (group["update_gap"], group["scale"]) == (200, 0.25)
