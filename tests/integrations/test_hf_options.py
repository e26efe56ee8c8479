"""The names users type in HF, galore-torch, APOLLO and LLaMA-Factory, mapped onto ours."""
from __future__ import annotations

import pytest
from torch import nn

from gradproj.integrations.hf_options import (LLAMAFACTORY_ALL, OptionError, from_hf,
                                              from_llamafactory, parse_optim_args)
from gradproj.integrations.targets import llamafactory_all_linear, matches, target_parameter_names

# (optim, optim_args) -> (preset, options, per_layer)
HF_TABLE = [
    ("galore_adamw", "rank=64, update_proj_gap=100, scale=0.10", "galore",
     {"rank": 64, "update_gap": 100, "scale": 0.10}, False),
    ("galore_adamw_8bit", "rank=32,proj_type=reverse_std", "galore8bit",
     {"rank": 32, "proj_type": "reverse_std"}, False),
    ("galore_adafactor", "", "galore", {"rule": "adafactor"}, False),
    ("galore_adamw_layerwise", "rank=16", "galore", {"rank": 16}, True),
    ("galore_adamw_8bit_layerwise", None, "galore8bit", {}, True),
    ("galore_adafactor_layerwise", "scale=0.5", "galore", {"rule": "adafactor", "scale": 0.5}, True),
    # APOLLO through HF: rank 128 is HF's default; proj random -> our seeded gaussian
    ("apollo_adamw", "proj=random,scale_type=tensor,rank=1,scale=128", "apollo",
     {"rank": 1, "projector": "gaussian", "scale_type": "tensor", "scale": 128.0}, False),
    ("apollo_adamw", "proj=svd", "apollo", {"rank": 128, "projector": "svd"}, False),
    ("apollo_adamw_layerwise", "update_proj_gap=50", "apollo", {"rank": 128, "update_gap": 50}, True),
    # gradproj's own names in optim_args
    ("galore_adamw", "preset=fira,projector=randomized,seed=3", "fira",
     {"projector": "randomized", "seed": 3}, False),
    ("adamw_torch", "preset=q-galore,state_format=q4,refresh_threshold=0.8", "q-galore",
     {"state_format": "q4", "refresh_threshold": 0.8}, False),
    ("galore_adamw_layerwise", "preset=frugal,free_lr_scale=0.1,correct_bias=false", "frugal",
     {"free_lr_scale": 0.1, "correct_bias": False}, True),
    # a preset replaces the HF name's own defaults (APOLLO's rank 128, its adam args)
    ("apollo_adamw_layerwise", "preset=fira", "fira", {}, True),
]


@pytest.mark.parametrize("optim,optim_args,preset,options,per_layer", HF_TABLE)
def test_hf_names_map_onto_presets(optim, optim_args, preset, options, per_layer):
    choice = from_hf(optim, optim_args, ["attn", "mlp"])
    assert (choice.preset, choice.options, choice.per_layer) == (preset, options, per_layer)
    # as HF's handlers: only APOLLO takes the TrainingArguments' betas and epsilon
    assert choice.adam_from_args == (optim.startswith("apollo") and "preset" not in (optim_args or ""))


LLAMAFACTORY_TABLE = [
    ({"use_galore": True}, "adamw_torch", "galore",
     {"rank": 16, "update_gap": 200, "scale": 2.0, "proj_type": "std"}, False, LLAMAFACTORY_ALL),
    ({"use_galore": True, "galore_rank": 64, "galore_update_interval": 100, "galore_scale": 0.25,
      "galore_proj_type": "left", "galore_layerwise": True, "galore_target": "q_proj, v_proj"},
     "adamw_torch", "galore",
     {"rank": 64, "update_gap": 100, "scale": 0.25, "proj_type": "left"}, True, ["q_proj", "v_proj"]),
    ({"use_galore": True, "lora_rank": 8}, "adamw_8bit", "galore8bit",
     {"rank": 16, "update_gap": 200, "scale": 2.0, "proj_type": "std"}, False, LLAMAFACTORY_ALL),
    ({"use_galore": True}, "adafactor", "galore",
     {"rank": 16, "update_gap": 200, "scale": 2.0, "proj_type": "std", "rule": "adafactor"},
     False, LLAMAFACTORY_ALL),
    ({"use_apollo": True, "apollo_rank": 1, "apollo_scale_type": "tensor", "apollo_scale": 128,
      "apollo_proj": "svd", "apollo_layerwise": True}, "adamw_torch", "apollo",
     {"rank": 1, "update_gap": 200, "scale": 128.0, "projector": "svd", "proj_type": "std",
      "scale_type": "tensor"}, True, LLAMAFACTORY_ALL),
]


@pytest.mark.parametrize("cfg,optim,preset,options,per_layer,targets", LLAMAFACTORY_TABLE)
def test_llamafactory_names_map_onto_presets(cfg, optim, preset, options, per_layer, targets):
    choice = from_llamafactory(cfg, optim)
    assert (choice.preset, choice.options, choice.per_layer, choice.targets) == \
        (preset, options, per_layer, targets)
    assert choice.adam_from_args  # LLaMA-Factory passes the TrainingArguments' betas/eps


BAD = [
    (lambda: from_hf("galore_adamw", "rnak=4", ["attn"]), "unknown key 'rnak'; did you mean 'rank'?"),
    (lambda: from_hf("galore_adamw", "rank=big", ["attn"]), "rank='big' is not an integer"),
    (lambda: from_hf("galore_adamw", "rank=0", ["attn"]), "option 'rank' must be an integer >= 1"),
    (lambda: from_hf("galore_adamw", "proj=gauss", ["attn"]), "proj='gauss' is not one of random, svd"),
    (lambda: from_hf("galore_adamw", "rank8", ["attn"]), "expected key=value pairs"),
    (lambda: from_hf("galore_adamw", "lr=1e-3", ["attn"]), "TrainingArguments.learning_rate"),
    (lambda: from_hf("galore_adamw", "preset=fria", ["attn"]), "did you mean 'fira'"),
    (lambda: from_hf("galore_adamw", "proj_type=diagonal", ["attn"]), "option 'proj_type' must be"),
    (lambda: from_hf("adamw_torch", "rank=8", ["attn"]), "optim 'adamw_torch' is not a low-rank"),
    (lambda: from_hf("galore_adamw", "rank=8", None), "optim_target_modules"),
    (lambda: from_hf("adamw_torch", "preset=apollo,scale_type=row", ["a"]),
     "option 'scale_type' must be one of channel, tensor"),
    (lambda: from_llamafactory({"use_galore": True, "galore_rnak": 4}),
     "unknown key 'galore_rnak'; did you mean 'galore_rank'"),
    (lambda: from_llamafactory({"use_galore": True, "use_apollo": True}),
     "exactly one of use_galore, use_apollo"),
    (lambda: from_llamafactory({"lora_rank": 8}), "got neither"),
    (lambda: from_llamafactory({"use_galore": True}, "sgd"), "GaLore with optim 'sgd'"),
    (lambda: from_llamafactory({"use_apollo": True, "apollo_scale_front": True}),
     "apollo_scale_front = true is not supported"),
    (lambda: from_llamafactory({"use_apollo": True, "apollo_rank": "sixteen"}),
     "apollo_rank='sixteen' is not an integer"),
]


@pytest.mark.parametrize("call,fragment", BAD, ids=[b[1][:30] for b in BAD])
def test_unknown_or_bad_names_are_refused_in_one_line(call, fragment):
    with pytest.raises(OptionError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_optim_args_parser_matches_hf():
    assert parse_optim_args(" rank = 64 ,scale=0.1,") == {"rank": "64", "scale": "0.1"}
    assert parse_optim_args(None) == {} and parse_optim_args({"rank": 4}) == {"rank": 4}


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(8, 8)
        self.self_attn.o_proj = nn.Linear(8, 8)
        self.mlp = nn.Module()
        self.mlp.up_proj = nn.Linear(8, 16)
        self.mlp.act = nn.GELU()
        self.input_layernorm = nn.LayerNorm(8)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(32, 8)
        self.layers = nn.ModuleList([_Block() for _ in range(11)])
        self.lm_head = nn.Linear(8, 32, bias=False)


TARGETS = [["attn", "mlp"], ["self_attn.q_proj"], r".*\.1\.mlp\.up_proj", [r".*\.1\.mlp.*"],
           ["layers.1.self_attn.o_proj", "lm_head"], "lm_head", "q_proj", ["mlp.act"]]


@pytest.mark.parametrize("targets", TARGETS, ids=str)
def test_target_matching_equals_hf(targets):
    """Against transformers' own `check_target_module_exists` (the independent reference)."""
    trainer_utils = pytest.importorskip("transformers.trainer_utils")
    model = _Model()
    for name, _ in model.named_modules():
        assert matches(targets, name) == bool(
            trainer_utils.check_target_module_exists(targets, name)), name


def test_target_parameter_names():
    model = _Model()
    assert target_parameter_names(model, r".*\.1\.mlp\.up_proj") == ["layers.1.mlp.up_proj.weight"]
    every = target_parameter_names(model, "all-linear")
    assert len(every) == 11 * 3 + 1 and "lm_head.weight" in every  # HF: the head too
    assert "lm_head" not in llamafactory_all_linear(model)          # LLaMA-Factory: not the head
    with pytest.raises(ValueError, match="matches no linear layer .* named: lm_head, o_proj"):
        target_parameter_names(model, ["mlp.act"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        target_parameter_names(model, ["attn("])
