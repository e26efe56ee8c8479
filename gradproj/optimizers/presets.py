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


def preset_options(name: str) -> dict:
    """A copy of a preset's options (raises ValueError naming close matches)."""
    return dict(PRESETS.get(name))


def GaLoreAdamW(params: Iterable, lr: float = 1e-3, **options: Any) -> LowRankOptimizer:
    """galore-torch's GaLoreAdamW: SVD projector, side by `proj_type`, bias-corrected Adam."""
    merged = preset_options("galore")
    merged.update(options)
    return LowRankOptimizer(params, lr=lr, **merged)


def build_optimizer(model: torch.nn.Module, preset: str | None = None,
                    targets: Sequence[str] = DEFAULT_TARGETS, **overrides: Any) -> LowRankOptimizer:
    """The whole optimizer for `model`: parameter split by `targets`, preset, overrides.

    This is the function the TOML run spec goes through, so a run and a script that call
    it with the same options build the same optimizer.
    """
    options = preset_options(preset) if preset else {}
    options.update(overrides)
    return LowRankOptimizer(param_groups(model, targets), **options)
