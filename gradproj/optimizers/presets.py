"""Named combinations of plugins with the papers' defaults (the `PRESETS` registry)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from ..registry import PRESETS, RULES
from .groups import DEFAULT_TARGETS, param_groups
from .lowrank import LowRankOptimizer
from .options import GENERIC_DEFAULTS

PRESETS.add("galore", {
    "rule": "adamw", "projector": "svd", "proj_type": "std", "residual": "drop",
    "state_format": "fp32", "rank": 128, "update_gap": 200, "scale": 0.25, "eps": 1e-6,
}, description="GaLore (Zhao et al. 2024): exact SVD basis, Adam on R, scale 0.25, T 200")

# The family, each with its paper's defaults (60M-scale recipes; rank/lr scale with the model).
PRESETS.add("galore8bit", {**PRESETS.get("galore"), "state_format": "q8"},
            description="8-bit GaLore: GaLore with blockwise 8-bit Adam states (bitsandbytes layout)")
PRESETS.add("q-galore", {
    # int4's own defaults are Q-GaLore's (inner svd, group 256); naming them here as
    # projector_options would break a spec that swaps the projector but keeps the preset
    **PRESETS.get("galore"), "projector": "int4",
    "state_format": "q8", "betas": (0.9, 0.95), "refresh": "adaptive", "refresh_window": 5,
    "refresh_threshold": 0.4, "quantize_weights": True, "weight_group_size": 256,
}, description="Q-GaLore (Zhang et al. 2024): INT4 basis, INT8 weights with stochastic rounding, "
               "adaptive refresh, 8-bit states")
PRESETS.add("fira", {**PRESETS.get("galore"), "residual": "fira", "norm_growth_limit": 1.01},
            description="Fira (Chen et al. 2024): GaLore + residual scaled per channel by |N|/|R|, "
                        "limiter 1.01")
PRESETS.add("frugal", {
    "rule": "adamw", "projector": "svd", "proj_type": "std", "residual": "frugal",
    "state_format": "fp32", "rank": 128, "update_gap": 200, "scale": 1.0, "eps": 1e-8,
    "free_lr_scale": 1.0, "moments": "reset",
}, description="FRUGAL (Zmushko et al. 2024): Adam in the subspace, signSGD outside, "
               "moments reset on refresh")
PRESETS.add("apollo", {
    "rule": "adamw", "projector": "gaussian", "proj_type": "std", "residual": "apollo",
    "state_format": "fp32", "rank": 256, "update_gap": 200, "scale": 1.0, "eps": 1e-6,
    "scale_type": "channel", "norm_growth_limit": 1.01,
}, description="APOLLO (Zhu et al. 2024): seeded Gaussian projection, channel-wise scaling "
               "of the raw gradient")
PRESETS.add("apollo-mini", {**PRESETS.get("apollo"), "rank": 1, "scale_type": "tensor", "scale": 128.0},
            description="APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (SGD-like memory)")

# The seeds' other base optimizers behind GaLore's projection (any projector composes); the
# rule options are each paper's defaults, named so a spec shows them.
PRESETS.add("lamb", {**PRESETS.get("galore"), "rule": "lamb", "betas": (0.9, 0.999), "eps": 1e-6,
                     "correct_bias": True, "clamp_value": 10.0},
            description="LAMB (You et al. 2020): Adam + decay rescaled per weight by the trust "
                        "ratio ‖W‖/‖u‖ of the full-size update, φ clamp 10")
PRESETS.add("diffgrad", {**PRESETS.get("galore"), "rule": "diffgrad", "betas": (0.9, 0.999),
                         "eps": 1e-8},
            description="diffGrad (Dubey et al. 2019): Adam with friction sigmoid(|G_prev − G|) "
                        "on the first moment")
PRESETS.add("adamp", {**PRESETS.get("galore"), "rule": "adamp", "betas": (0.9, 0.999),
                      "eps": 1e-8, "delta": 0.1, "wd_ratio": 0.1, "nesterov": False},
            description="AdamP (Heo et al. 2021): Adam with the radial part removed on "
                        "scale-invariant weights, δ 0.1, wd_ratio 0.1")
PRESETS.add("sophia", {
    # GaLore's projection around Sophia-G with the paper's defaults (official SophiaG:
    # β (0.965, 0.99), ρ 0.04 with B in tokens, wd 0.1, ε 1e-15; curvature every k = 10)
    **PRESETS.get("galore"), "rule": "sophia", "betas": (0.965, 0.99), "rho": 0.04,
    "eps": 1e-15, "weight_decay": 0.1, "curvature_every": 10, "curvature_estimator": "gnb",
}, description="Sophia-G (Liu et al. 2023) in GaLore's subspace: clipped momentum over a GNB "
               "curvature EMA (every 10 steps), rho 0.04, wd 0.1")
PRESETS.add("mezo", {"rule": "sgdm", "momentum": 0.0, "dampening": 0.0, "nesterov": False,
                     "weight_decay": 0.0, "state_format": "fp32"},
            description="MeZO (Malladi et al. 2023): ZO-SGD, sgdm with momentum 0 on SPSA "
                        "estimates; needs [train] gradient = \"zeroth-order\" (zo_eps 1e-3)")

#: preset keys that configure the model (weight quantization), not the optimizer
MODEL_KEYS = ("quantize_weights", "weight_group_size")


def preset_options(name: str) -> dict:
    """A copy of a preset's options (raises ValueError naming close matches)."""
    return dict(PRESETS.get(name))


def canonical_rule(name: str) -> str:
    """A rule's registered name for an alias (sgd -> sgdm); an unknown name as it is."""
    return RULES.canonical(name) if name in RULES else name


def with_overrides(preset: str | None, overrides: Mapping[str, Any]) -> dict:
    """A preset's options with `overrides` on top (no preset: the overrides alone).

    Where `overrides` switches the rule, the options both rules have (betas, eps, ...)
    first take the new rule's defaults: `preset = "galore"` with `rule = "sophia"` is
    GaLore's projection around Sophia with Sophia's ε 1e-15 and β (0.965, 0.99), not the
    1e-6 and (0.9, 0.999) GaLore's preset names for its AdamW. An override still wins."""
    options = preset_options(preset) if preset else {}
    before, after = (canonical_rule(r) for r in (options.get("rule", GENERIC_DEFAULTS["rule"]),
                                                 overrides.get("rule", options.get("rule"))))
    if preset and after != before and before in RULES and after in RULES:
        own = RULES.get(after).defaults
        for key in RULES.get(before).defaults.keys() & own.keys():
            options[key] = own[key]
    options.update(overrides)
    return options


def GaLoreAdamW(params: Iterable, lr: float = 1e-3, **options: Any) -> LowRankOptimizer:
    """galore-torch's GaLoreAdamW: SVD projector, side by `proj_type`, bias-corrected Adam."""
    merged = preset_options("galore")
    merged.update(options)
    return LowRankOptimizer(params, lr=lr, **merged)


def build_optimizer(model: torch.nn.Module, preset: str | None = None,
                    targets: Sequence[str] = DEFAULT_TARGETS, parametrization: Any = None,
                    **overrides: Any) -> LowRankOptimizer:
    """The whole optimizer for `model`: parameter split by `targets`, preset, overrides.

    This is the function the TOML run spec goes through, so a run and a script that call
    it with the same options build the same optimizer. `parametrization` (a registered
    name, a `{"kind": ..., **options}` table or a Parametrization) first replaces the
    targeted nn.Linear layers in place (`gradproj.parametrizations`); a preset (or
    override) with `quantize_weights = True` is the `int8` parametrization (group
    `weight_group_size`, 256), as Q-GaLore trains. The split then follows what each
    parametrized layer declares: its `projected` tensors are low-rank, its other trainable
    tensors full-rank, its frozen ones in no group.
    """
    from ..parametrizations import apply_parametrization, from_options, linear_module_names
    options = with_overrides(preset, overrides)
    param = from_options(parametrization, options)
    if param is not None:
        apply_parametrization(model, param, linear_module_names(model, targets))
    return LowRankOptimizer(param_groups(model, targets), **options)
