"""Build a LowRankOptimizer for any model from a `Resolved` choice (no transformers needed).

Parameter groups, as HF's Trainer and LLaMA-Factory form them:
  1. the targeted weights (see `targets.py`), projected, with `weight_decay`;
  2. every other parameter HF decays (not a bias, not a norm), full rank, `weight_decay`;
  3. biases and norms, full rank, weight decay 0.
HF's own GaLore/APOLLO path drops `weight_decay` altogether (its groups carry none and
galore-torch defaults to 0); LLaMA-Factory applies it as above, and so do we.
A preset with `quantize_weights` (q-galore) first turns exactly the targeted `nn.Linear`
layers into INT8 `QuantLinear` (the `int8` parametrization); a `Resolved.parametrization`
(lora, lora-ga, sltrain, welore, gradnormlorp, ...) converts the same layers, and
`build_by_names` takes one the same way (`gradproj.parametrizations`).
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

from torch import nn

from ..optimizers import LowRankOptimizer
from ..optimizers.presets import MODEL_KEYS, preset_options
from ..parametrizations import (ParametrizedLinear, apply_parametrization, from_options,
                                role_of)
from ..quant.linear import is_quantized
from .hf_options import LLAMAFACTORY_ALL, Resolved, build_options
from .targets import llamafactory_all_linear, target_parameter_names

# transformers' Trainer.get_decay_parameter_names: no decay for LayerNorm modules, biases, norms
NO_DECAY_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decays(name: str, module: nn.Module | None) -> bool:
    if isinstance(module, nn.LayerNorm):
        return False
    return not any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)


def resolve_target_names(model: nn.Module, targets) -> list[str]:
    if targets == LLAMAFACTORY_ALL:
        targets = llamafactory_all_linear(model)
    return target_parameter_names(model, targets)


def lowrank_groups(model: nn.Module, target_names: Sequence[str], weight_decay: float) -> list[dict]:
    """The three groups above (empty ones left out); INT8 weights count as trainable."""
    wanted = set(target_names)
    owners = {}
    for module_name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{pname}" if module_name else pname] = module
    low, decay, plain = [], [], []
    for name, p in model.named_parameters():
        role = _role(model, name, p, wanted)
        if role is None:
            continue
        if role == "lowrank":
            low.append(p)
        elif decays(name, owners.get(name)):
            decay.append(p)
        else:
            plain.append(p)
    groups = [{"params": low, "lowrank": True, "weight_decay": weight_decay},
              {"params": decay, "lowrank": False, "weight_decay": weight_decay},
              {"params": plain, "lowrank": False, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _role(model: nn.Module, name: str, p, wanted: set) -> str | None:
    """"lowrank", "full" or None (no group): a parametrized layer decides for its tensors."""
    module_name, _, local = name.rpartition(".")
    owner = model.get_submodule(module_name) if module_name else model
    if isinstance(owner, ParametrizedLinear):
        return role_of(owner, local, p)
    if not p.requires_grad and not is_quantized(p):
        return None
    return "lowrank" if name in wanted else "full"


def _modules(names: Sequence[str]) -> list[str]:
    """The modules owning `names`, each once, in order."""
    return list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))


def quantize_named(model: nn.Module, names: Sequence[str], group_size: int) -> None:
    """INT8 QuantLinear for exactly the nn.Linear layers owning `names` (q-galore)."""
    apply_parametrization(model, {"kind": "int8", "group_size": group_size}, _modules(names))


def build_by_names(model: nn.Module, preset: str | None, names: Sequence[str],
                   parametrization=None, **overrides) -> LowRankOptimizer:
    """`build_optimizer` with the projected weights given by parameter name: two groups,
    [projected, everything else], the options applying to both (run-spec semantics)."""
    options = preset_options(preset) if preset else {}
    options.update(overrides)
    param = from_options(parametrization, options)
    if param is not None:
        apply_parametrization(model, param, _modules(names))
    wanted = set(names)
    low, rest = [], []
    for name, p in model.named_parameters():
        role = _role(model, name, p, wanted)
        if role is not None:
            (low if role == "lowrank" else rest).append(p)
    groups = [{"params": low, "lowrank": True}, {"params": rest, "lowrank": False}]
    return LowRankOptimizer([g for g in groups if g["params"]], **options)


def prepare_model(model: nn.Module, choice: Resolved) -> dict:
    """Convert the targeted Linear layers by the choice's parametrization (a name or table,
    `choice.parametrization`) and/or to INT8 (q-galore's `quantize_weights`; with sltrain,
    its INT8 variant); idempotent. A Trainer calls it before loading a checkpoint, whose
    tensors are the converted layers'. Returns {name: layer} of the converted layers."""
    options = {**preset_options(choice.preset), **choice.options}
    return apply_to_targets(model, from_options(choice.parametrization, options), choice.targets)


def apply_to_targets(model: nn.Module, parametrization, targets) -> dict:
    """`apply_parametrization` on the nn.Linear layers HF-style `targets` select."""
    if parametrization is None:
        return {}
    return apply_parametrization(model, parametrization,
                                 _modules(resolve_target_names(model, targets)))


def build_from_resolved(model: nn.Module, choice: Resolved, *, lr: float,
                        weight_decay: float | None = 0.0, adam: Mapping[str, float] | None = None,
                        explicit=()) -> LowRankOptimizer:
    """The optimizer for `model`: `choice`'s preset and options (`hf_options.build_options`,
    with the TrainingArguments' Adam arguments `adam`, `explicit` the ones the user set),
    HF-style target matching. `weight_decay` None: the preset's (Sophia's 0.1), else 0."""
    options = build_options(choice.preset, choice.options, adam_from_args=choice.adam_from_args,
                            adam=adam, explicit=explicit)
    if weight_decay is None:
        weight_decay = options.get("weight_decay", 0.0)
    for key in MODEL_KEYS:
        options.pop(key, None)
    prepare_model(model, choice)  # exactly the targeted nn.Linear layers become INT8
    names = resolve_target_names(model, choice.targets)
    return LowRankOptimizer(lowrank_groups(model, names, weight_decay), lr=lr, **options)
