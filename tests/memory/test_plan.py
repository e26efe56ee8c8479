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


# -- hand-counted figures of the tiny model (dim 128, 4 layers, SwiGLU 344, vocab 256) -----
# 28 projected weights: per layer q, k, v, o (128×128) and gate, up (344×128), down (128×344).
TINY = EXAMPLES / "tiny.toml"


def test_reduction_is_the_fraction_saved():
    """reduction() = 1 − spec / baseline: 35 bytes against 100 saves 65 %, a plan against
    itself saves nothing (catches the ratio spec / baseline returned as the saving)."""
    from gradproj.memory.plan import MemoryPlan, Plan

    def plan(states):
        return Plan("x", weights=0, gradients=0, optimizer_states=states, projector_bases=0,
                    quantization_scales=0, activations=0)

    mp = MemoryPlan(spec=plan(35), baselines={"adamw-bf16": plan(100), "same": plan(35)})
    assert mp.reduction() == pytest.approx(0.65)
    assert mp.reduction("same") == 0.0


def test_tokens_are_one_micro_batch_and_baselines_keep_bf16_weights():
    """tokens = batch × seq_len of one micro-batch (16 × 128), whatever grad_accum; the
    baselines store bf16 weights: half the bytes of the spec's fp32 ones (catches tokens
    multiplied by grad_accum and baselines planned in the spec's dtype)."""
    plan = gp.plan_memory(TINY, ["train.grad_accum=4"])
    assert plan.spec.settings["tokens"] == 16 * 128
    assert plan.spec.settings["weight_dtypes"] == ["float32"]
    for base in plan.baselines.values():
        assert base.settings["weight_dtypes"] == ["bfloat16"]
        assert 2 * base.weights == plan.spec.weights


def test_int4_bases_and_q8_states_scales_are_hand_counted():
    """int4 bases: 28 bases of 4096 values (128×32 each side), 16 groups of 256 with an
    8-byte fp32 scale and zero point = 3584 bytes; q8 states, one fp32 absmax per 256:
    per layer 4 attn weights × 2 moments × 16 blocks + 3 MLP weights × 2 × 43 blocks
    (344·32 = 11008 values), embedding and head 2 × 2 × 128 blocks, all × 4 bytes = 8224.
    `quantization_scales` is their sum (catches the bases' scales left out of it)."""
    plan = gp.plan_memory(TINY, ['optimizer.lowrank.projector="int4"', 'optimizer.state_format="q8"'])
    spec = plan.spec
    assert spec.projector_bases == 28 * 4096 // 2
    assert spec.scales["projector_bases"] == 28 * 16 * 8
    assert spec.scales["optimizer_states"] == 4 * (4 * (4 * 2 * 16 + 3 * 2 * 43) + 2 * 2 * 128)
    assert spec.quantization_scales == 8224 + 3584
    assert spec.optimizer_memory == spec.optimizer_states + 57344 + 8224 + 3584


def test_adaptive_refresh_note_counts_four_bytes_per_window_slot():
    """The similarity window is fp32: 5 slots × 28 projected weights × 4 bytes = 560."""
    plan = gp.plan_memory(TINY, ['optimizer.lowrank.refresh="adaptive"'])
    assert any("a 560-byte fp32 similarity window" in note for note in plan.spec.notes), plan.spec.notes


def test_ddp_rank_traces_its_share_of_the_batch_and_buckets_only_float_gradients():
    """[train] batch_size is global: with 4 ranks each traces 16 / 4 = 4 sequences. The DDP
    reducer buckets what requires grad, so with INT8 attn/MLP weights only the fp32
    embedding, head and norms are bucketed: (2·256·128 + 9·128)·4 = 266,752 bytes."""
    plan = gp.plan_memory(TINY, launch="ddp", nproc=4)
    assert plan.spec.settings["batch"] == 4 and plan.spec.settings["tokens"] == 4 * 128
    single = gp.plan_memory(TINY, ["train.batch_size=4"])
    assert plan.spec.activations == single.spec.activations
    int8 = gp.plan_memory(TINY, ['optimizer.preset="q-galore"'], launch="ddp", nproc=2)
    assert int8.spec.settings["gradient_detail"]["reducer buckets"] == (2 * 256 * 128 + 9 * 128) * 4


def test_fsdp2_shard_takes_the_ceiling_of_the_rows():
    """Rank 0's Shard(0) piece of 10 rows over 4 ranks has ceil(10/4) = 3 rows, not 2."""
    import torch

    from gradproj.memory.ranks import shard_rows

    assert shard_rows(torch.empty(10, 4, device="meta"), 4).shape == (3, 4)
    assert shard_rows(torch.empty(8, 4, device="meta"), 4).shape == (2, 4)


def test_backward_order_is_the_order_autograd_fills_gradients():
    """DDP's buckets fill in the order backward produces gradients: recorded here with
    post-accumulate hooks on a real backward, the last layer first (catches the module's
    own, forward, order)."""
    import torch

    from gradproj.memory.ranks import backward_order

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5, bias=False), torch.nn.Linear(5, 6, bias=False),
                                torch.nn.Linear(6, 3, bias=False))
    opt = gp.LowRankOptimizer([{"params": list(model.parameters()), "lowrank": False}])
    filled = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda t: filled.append(t))
    model(torch.randn(2, 4)).sum().backward()
    assert [id(p) for p, _ in backward_order(model, opt)] == [id(p) for p in filled]


def test_largest_fsdp2_unit_can_be_the_root():
    """With a 4096-token vocabulary the root's embedding + head + final norm,
    (2·4096·128 + 128)·4 bytes, outweigh one block (catches the root left out)."""
    from gradproj.memory.ranks import largest_unit_bytes
    from gradproj.train.model import build_model, model_config

    model = build_model(model_config("tiny", vocab_size=4096), device="meta")
    assert largest_unit_bytes(model) == (2 * 4096 * 128 + 128) * 4


def test_report_change_and_units():
    """change(): a negative saving reads as "more", positive; unit_for: exactly 1e9 bytes is
    1.00 GB, exactly 1e6 is 1.00 MB (decimal units, >=)."""
    from gradproj.memory.report import change, unit_for

    assert change(0.651) == "65.1% less"
    assert change(-0.25) == "25.0% more"
    assert unit_for(10 ** 9) == ("GB", 1e9) and unit_for(10 ** 9 - 1) == ("MB", 1e6)
    assert unit_for(10 ** 6) == ("MB", 1e6) and unit_for(10 ** 6 - 1) == ("kB", 1e3)


def test_table_compares_against_each_baseline_by_name():
    """The "vs adam-8bit" line uses adam-8bit's optimizer memory, not adamw-bf16's."""
    from gradproj.memory.report import format_table

    plan = gp.plan_memory(TINY)
    text = format_table(plan)
    for name, base in plan.baselines.items():
        saved = 1 - plan.spec.optimizer_memory / base.optimizer_memory
        word = "less" if saved >= 0 else "more"
        assert f"vs {name}: optimizer memory {abs(100 * saved):.1f}% {word}" in text, name


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
