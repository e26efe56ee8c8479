"""Named combinations of plugins with the papers' defaults (the `PRESETS` registry)."""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch

from ..registry import PRESETS
from .groups import DEFAULT_TARGETS, param_groups
from .lowrank import LowRankOptimizer

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

#: preset keys that configure the model (weight quantization), not the optimizer
MODEL_KEYS = ("quantize_weights", "weight_group_size")


def preset_options(name: str) -> dict:
    """A copy of a preset's options (raises ValueError naming close matches)."""
    return dict(PRESETS.get(name))


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
    options = preset_options(preset) if preset else {}
    options.update(overrides)
    param = from_options(parametrization, options)
    if param is not None:
        apply_parametrization(model, param, linear_module_names(model, targets))
    return LowRankOptimizer(param_groups(model, targets), **options)
