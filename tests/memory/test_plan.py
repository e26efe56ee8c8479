"""`gradproj memory` / `gp.plan_memory`: JSON shape, table, errors, and the papers' 7B figures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import gradproj as gp
from gradproj.train.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
REQUIRED = ("weights", "gradients", "optimizer_states", "projector_bases", "activations", "total")


def test_json_has_the_spec_and_both_baselines(capsys):
    assert main(["memory", str(EXAMPLES / "tiny.toml"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"spec", "baselines"} and set(out["baselines"]) == {"adamw-bf16", "adam-8bit"}
    for plan in (out["spec"], *out["baselines"].values()):
        assert all(isinstance(plan[key], int) and plan[key] >= 0 for key in REQUIRED)
        parts = [k for k in REQUIRED if k != "total"] + ["quantization_scales"]
        assert plan["total"] == sum(plan[k] for k in parts)
    base = out["baselines"]
    assert base["adam-8bit"]["optimizer_states"] < base["adamw-bf16"]["optimizer_states"]
    assert base["adam-8bit"]["quantization_scales"] > 0
    assert out["spec"]["projection_sides"][0]["reason"]


def test_table_lists_every_component_and_the_sides(capsys):
    assert main(["memory", str(EXAMPLES / "tiny.toml"), "--set", "optimizer.lowrank.proj_type=\"auto\"",
                 "--set", "train.per_layer=true", "--set", "train.activation_checkpointing=true"]) == 0
    text = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer states", "projector bases",
                "quantization scales", "activations", "total", "adamw-bf16", "adam-8bit",
                "per-layer", "projection side per weight", "auto:", "recomputed"):
        assert row in text, row


def test_bad_override_is_one_line_exit_2(capsys):
    assert main(["memory", str(EXAMPLES / "tiny.toml"), "--set", "train.batch_size=0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "[train].batch_size" in err[0]


def test_bad_dtype_names_the_option():
    with pytest.raises(ValueError, match="plan_memory: dtype"):
        gp.plan_memory(EXAMPLES / "tiny.toml", dtype="int3")


def test_galore_7b_matches_the_paper_65_5_percent():
    plan = gp.plan_memory(EXAMPLES / "llama-7b-galore.toml", dtype="bfloat16")
    # the paper's accounting, spelled out: bf16 M and V on the low-rank side plus the bf16
    # basis for the 224 projected weights (std side), full-rank M and V for the rest
    r, d, f, layers = 1024, 4096, 11008, 32
    per_layer = 4 * (2 * d * r + d * r) + 2 * (2 * f * r + d * r) + (2 * r * f + d * r)
    full_rank = 2 * 32000 * d + (2 * layers + 1) * d  # embedding, head, norms
    assert plan.spec.optimizer_memory == 2 * (2 * full_rank + layers * per_layer)
    adamw = plan.baselines["adamw-bf16"].optimizer_memory
    assert adamw == 2 * 2 * 6_738_415_616  # two bf16 moments per parameter
    assert abs(plan.reduction() - 0.655) <= 0.01  # 65.1 % here


def test_best_7b_is_90_percent_smaller_and_under_12_gb():
    plan = gp.plan_memory(EXAMPLES / "llama-7b-best.toml", dtype="bfloat16")
    assert plan.reduction() >= 0.90
    assert plan.spec.total < 12e9
    assert plan.spec.projector_bases == 0  # seed-regenerated
    assert plan.spec.scales["weights"] > 0  # INT8 weights carry fp32 group scales


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("llama-*.toml")), ids=lambda p: p.stem)
def test_paper_examples_plan_below_bf16_adamw(path):
    plan = gp.plan_memory(path, dtype="bfloat16")
    assert 0 < plan.spec.optimizer_memory < plan.baselines["adamw-bf16"].optimizer_memory
    assert plan.spec.total < plan.baselines["adamw-bf16"].total


def test_memory_table_overrides_stay_valid():
    from gradproj.memory.tables import METHODS, table

    text, plans = table(["60m"])
    assert text.count("|") > len(METHODS) and len(plans) == len(METHODS)
    opt = {method: plans["60m", method][0] for method in METHODS}
    # each step of the family saves optimizer memory over the one before it
    assert opt["ours (best)"] < opt["Q-GaLore"] < opt["GaLore 8-bit"] < opt["GaLore"] < opt["AdamW BF16"]
