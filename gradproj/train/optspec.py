"""The `[optimizer]` and `[optimizer.lowrank]` tables of a run spec.

Which keys a table accepts is read from the registries when the spec is checked:

  [optimizer]          preset, rule, lr, weight_decay, state_format, any other generic
                       optimizer option, and every option the chosen rule declares in
                       its `defaults` (adamw: betas, eps, correct_bias);
  [optimizer.lowrank]  projector, projector_options (a table of the projector's keyword
                       options), rank, update_gap, scale, proj_type, seed, residual,
                       targets, and every option the chosen residual declares.

So a new rule or residual plugin brings its options into the spec with no change here.
Values of the options gradproj knows are type-checked here; the rest are checked by the
plugin's own `validate`, run on a 4×4 dummy weight while the spec loads.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import torch

from ..optimizers import DEFAULT_TARGETS, LowRankOptimizer, build_optimizer
from ..optimizers.options import GENERIC_DEFAULTS
from ..optimizers.presets import MODEL_KEYS, with_overrides
from ..projectors.base import PROJ_TYPES
from ..registry import PRESETS, PROJECTORS, RESIDUALS, RULES, STATE_FORMATS
from .checks import (Check, boolean, choice, did_you_mean, integer, number, registry_name,
                     string_list)  # noqa: F401

# keys that go in [optimizer.lowrank] when the optimizer knows them (the refresh policy's
# keys exist once the adaptive refresh is in GENERIC_DEFAULTS); all others in [optimizer]
LOWRANK_KEYS = ("projector", "projector_options", "rank", "update_gap", "scale", "proj_type",
                "seed", "residual", "targets", "refresh", "refresh_window", "refresh_threshold",
                "refresh_max_factor", "moments")
KNOWN_CHECKS: dict[str, Check] = {
    "preset": registry_name(PRESETS),
    "rule": registry_name(RULES),
    "state_format": registry_name(STATE_FORMATS),
    "projector": registry_name(PROJECTORS),
    "residual": registry_name(RESIDUALS),
    "lr": number(0),
    "weight_decay": number(0),
    "rank": Check('an integer >= 1 or a fraction of the model width such as "1/4"',
                  lambda v: _rank_fraction(v) is not None or (isinstance(v, int) and not
                                                               isinstance(v, bool) and v >= 1)),
    "update_gap": integer(1),
    "scale": number(),
    "proj_type": choice(*PROJ_TYPES),
    "seed": integer(0),
    "targets": string_list(),
    "projector_options": Check("a table of the projector's options", lambda v: isinstance(v, dict)),
    "quantize_weights": boolean(),
    "weight_group_size": integer(1),
}
_INTERNAL = ("params", "lowrank")  # group keys that are not user options
# GaLore's recipes use a quarter of the hidden size (60M: 128 of 512, 1B: 512 of 2048,
# 7B: 1024 of 4096): the rank when neither the spec nor its preset names one
DEFAULT_RANK = "1/4"


def _rank_fraction(value: Any) -> Fraction | None:
    """"1/4" -> Fraction(1, 4) when it lies in (0, 1]; None for anything else."""
    if not isinstance(value, str) or not re.fullmatch(r"\s*\d+\s*/\s*\d+\s*", value):
        return None
    num, den = (int(x) for x in value.split("/"))
    return Fraction(num, den) if den and 0 < num <= den else None


def rank_for_width(fraction: Fraction, width: int) -> int:
    return max(1, round(width * fraction))


@dataclass(frozen=True, kw_only=True)
class OptimizerSpec:
    preset: str | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    options: dict = field(default_factory=dict)    # the spec's overrides of the preset
    effective: dict = field(default_factory=dict)  # every option the optimizer will use
    lowrank_keys: frozenset = frozenset(LOWRANK_KEYS)
    rank_fraction: str | None = None               # "1/4": resolved against the model width
    parametrization: dict | None = None            # [model.parametrization], resolved

    def with_width(self, width: int) -> "OptimizerSpec":
        """The spec with a fractional rank turned into an integer for this model width."""
        if self.rank_fraction is None:
            return self
        rank = rank_for_width(_rank_fraction(self.rank_fraction), width)
        return replace(self, options={**self.options, "rank": rank},
                       effective={**self.effective, "rank": rank} if self.effective else {},
                       rank_fraction=None)

    def build(self, model: torch.nn.Module) -> LowRankOptimizer:
        """The optimizer for `model`, through the same `build_optimizer` scripts use (which
        first applies `[model.parametrization]` to the targeted layers); for a
        transformers model, or `targets = ["all-linear"]`, targets are matched as HF's
        Trainer matches `optim_target_modules` (integrations/targets.py)."""
        from ..integrations.targets import is_all_linear
        from .hfmodel import HFCausalLM
        if isinstance(model, HFCausalLM) or is_all_linear(self.targets):
            from ..integrations.build import build_by_names
            from ..integrations.targets import target_parameter_names
            targets = "all-linear" if is_all_linear(self.targets) else list(self.targets)
            return build_by_names(model, self.preset, target_parameter_names(model, targets),
                                  parametrization=self.parametrization, **self.options)
        return build_optimizer(model, self.preset, self.targets,
                               parametrization=self.parametrization, **self.options)

    def prepare(self, model: torch.nn.Module) -> None:
        """Apply the parametrization (or the preset's INT8 weights) to `model` in place,
        before it is wrapped for DDP/FSDP; `build` then finds the layers converted."""
        from ..parametrizations import apply_parametrization, from_options, linear_module_names
        param = from_options(self.parametrization, {**(dict(PRESETS.get(self.preset))
                                                       if self.preset else {}), **self.options})
        if param is None:
            return
        from ..integrations.targets import is_all_linear
        from .hfmodel import HFCausalLM
        if isinstance(model, HFCausalLM) or is_all_linear(self.targets):
            from ..integrations.targets import target_parameter_names
            targets = "all-linear" if is_all_linear(self.targets) else list(self.targets)
            names = list(dict.fromkeys(n.rsplit(".", 1)[0]
                                       for n in target_parameter_names(model, targets)))
        else:
            names = linear_module_names(model, self.targets)
        apply_parametrization(model, param, names)

    def resolved(self) -> dict:
        opt: dict[str, Any] = {"preset": self.preset} if self.preset else {}
        low: dict[str, Any] = {"targets": list(self.targets)}
        for key, value in self.effective.items():
            value = list(value) if isinstance(value, tuple) else value
            (low if key in self.lowrank_keys else opt)[key] = value
        opt["lowrank"] = low
        return opt


def _table(raw: Any, name: str, out) -> dict:
    if isinstance(raw, dict):
        return dict(raw)
    out.add(name, None, f"expected a table, got {type(raw).__name__}")
    return {}


def parse_optimizer(raw: Any, out, *, seed: int) -> OptimizerSpec:
    """Check the optimizer tables; problems go to `out` (a spec issue collector)."""
    top = _table(raw, "optimizer", out)
    low = _table(top.pop("lowrank", {}), "optimizer.lowrank", out)
    before = len(out.issues)
    values: dict[str, Any] = {}
    where: dict[str, str] = {}
    for table, entries in (("optimizer", top), ("optimizer.lowrank", low)):
        for key, value in entries.items():
            where[key] = table
            if key in KNOWN_CHECKS:
                converted, problem = KNOWN_CHECKS[key](value)
                if problem:
                    out.add(table, key, problem)
                    continue
                values[key] = converted
            else:
                values[key] = value
    preset = values.pop("preset", None)
    targets = values.pop("targets", DEFAULT_TARGETS)
    base = with_overrides(preset, {"rule": values["rule"]} if "rule" in values else {}) \
        if preset else {}
    fraction = values.get("rank") if isinstance(values.get("rank"), str) else None
    if "rank" not in values and "rank" not in base:
        fraction = DEFAULT_RANK
    if fraction is not None:
        values["rank"] = 1  # validated as an integer; the width is known once the model is
    merged = {**GENERIC_DEFAULTS, **base, **values}

    # the tables accept generic options, the model keys of presets (INT8 weights), the
    # preset's own keys, and what the chosen rule and residual declare
    rule_keys = set(RULES.get(merged["rule"]).defaults) if merged["rule"] in RULES else set()
    residual_keys = (set(RESIDUALS.get(merged["residual"]).defaults)
                     if merged["residual"] in RESIDUALS else set())
    known = ({"preset", "targets"} | set(GENERIC_DEFAULTS) | set(MODEL_KEYS) | set(base)
             | rule_keys | residual_keys) - set(_INTERNAL)
    lowrank_keys = (set(LOWRANK_KEYS) | residual_keys) & known
    top_keys = known - lowrank_keys
    for table, entries, allowed, other in (("optimizer", top, top_keys, lowrank_keys),
                                           ("optimizer.lowrank", low, lowrank_keys, top_keys)):
        for key in entries:
            if key in allowed:
                continue
            values.pop(key, None)
            other_table = "optimizer.lowrank" if table == "optimizer" else "optimizer"
            if key in other:
                out.add(table, key, f"belongs in [{other_table}], not [{table}]")
            else:
                out.add(table, key, f"unknown option{did_you_mean(key, allowed | other)} "
                                    f"(expected one of: {', '.join(sorted(allowed))})")
    for key, value in values.items():  # TOML arrays -> tuples where the plugin uses a tuple
        default = {**RULES.get(merged["rule"]).defaults}.get(key) if merged["rule"] in RULES else None
        if isinstance(default, tuple) and isinstance(value, list):
            values[key] = tuple(value)
    values.setdefault("seed", seed)
    if len(out.issues) > before:
        return OptimizerSpec(preset=preset, targets=targets, options=values,
                             rank_fraction=fraction)

    effective = _validate(preset, values, where, out)
    return OptimizerSpec(preset=preset, targets=tuple(targets), options=values,
                         effective=effective, lowrank_keys=frozenset(lowrank_keys),
                         rank_fraction=fraction)


_OPTION = re.compile(r"option '([A-Za-z0-9_]+)'")


def _validate(preset: str | None, values: dict, where: dict, out) -> dict:
    """Run the optimizer's own checks on a dummy weight; returns the effective options."""
    weight = torch.nn.Parameter(torch.zeros(4, 4))
    options = with_overrides(preset, values)
    model_options = {k: options.pop(k) for k in MODEL_KEYS if k in options}
    for key, value in model_options.items():  # a preset's values are checked here too
        converted, problem = KNOWN_CHECKS[key](value)
        if problem:
            out.add(where.get(key, "optimizer"), key if key in where else "preset", problem)
            return {}
    try:
        opt = LowRankOptimizer([{"params": [weight], "lowrank": True}], **options)
    except (ValueError, TypeError) as exc:
        message = str(exc)
        match = _OPTION.search(message)
        key = match.group(1) if match else None
        projector_options = values.get("projector_options") or {}
        if key in projector_options:
            table = "optimizer.lowrank.projector_options"
        elif key == "projector_options" or (key is None and projector_options):
            table, key = "optimizer.lowrank", "projector_options"
        elif key in where:
            table = where[key]
        elif key is not None and preset:
            table, key, message = "optimizer", "preset", f"preset {preset!r}: {message}"
        else:
            table = "optimizer"
        if match:
            message = message.replace(f"{match.group(0)} must be", "expected", 1)
        out.add(table, key, message)
        return {}
    return {**{k: v for k, v in opt.param_groups[0].items() if k not in _INTERNAL},
            **model_options}
