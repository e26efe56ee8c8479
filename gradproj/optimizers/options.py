"""The optimizer's generic options: defaults, galore-torch spellings, validation."""
from __future__ import annotations

from ..projectors.base import PROJ_TYPES
from .refresh import REFRESH_DEFAULTS, validate_refresh

GENERIC_DEFAULTS: dict = {
    "lr": 1e-3,
    "weight_decay": 0.0,
    "rule": "adamw",
    "projector": "svd",
    "projector_options": {},     # keyword options of the projector (oversample, inner, ...)
    "state_format": "fp32",
    "residual": "drop",
    "lowrank": False,            # param_groups() sets True on the projected group
    "rank": 128,                 # GaLore 60M recipe
    "update_gap": 200,           # steps between subspace refreshes (GaLore's T)
    "scale": 0.25,               # GaLore's alpha
    "proj_type": "std",
    "seed": 0,                   # seeds the randomized projectors, per parameter and step
    # most fp32 gradient MiB one bucket stacks (a step's temporaries are a few times it);
    # "auto": 256, and on a CPU weights of 256 KiB and more step alone (optimizers/buckets.py)
    "bucket_cap_mb": "auto",
    # a bucket's gradients live in one buffer (slices as .grad) that steps read without a
    # copy; they stay allocated between steps (zero_grad zeroes them in place)
    "gradient_as_bucket_view": False,
    **REFRESH_DEFAULTS,          # refresh fixed|adaptive, moments keep|reset|rotate (refresh.py)
}

# galore-torch's group keys, accepted so its param-group recipes work unchanged
GALORE_SPELLINGS = {"update_proj_gap": "update_gap"}


def normalize_group(group: dict) -> None:
    """Rename galore-torch keys; a group naming a `rank` is low-rank unless it says otherwise."""
    for old, new in GALORE_SPELLINGS.items():
        if old in group:
            group.setdefault(new, group.pop(old))
    if "lowrank" not in group and "rank" in group:
        group["lowrank"] = True


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_group(group: dict) -> None:
    """Raise ValueError naming the first bad generic option and its allowed values."""
    checks = (
        ("lr", _is_number(group["lr"]) and group["lr"] >= 0, "a number >= 0"),
        ("weight_decay", _is_number(group["weight_decay"]) and group["weight_decay"] >= 0,
         "a number >= 0"),
        ("rank", _is_int(group["rank"]) and group["rank"] >= 1, "an integer >= 1"),
        ("update_gap", _is_int(group["update_gap"]) and group["update_gap"] >= 1,
         "an integer >= 1"),
        ("scale", _is_number(group["scale"]), "a number"),
        ("proj_type", group["proj_type"] in PROJ_TYPES, f"one of {', '.join(PROJ_TYPES)}"),
        ("seed", _is_int(group["seed"]) and group["seed"] >= 0, "an integer >= 0"),
        ("lowrank", isinstance(group["lowrank"], bool), "true or false"),
        ("projector_options", isinstance(group["projector_options"], dict), "a dict"),
        ("bucket_cap_mb", group["bucket_cap_mb"] == "auto"
         or (_is_number(group["bucket_cap_mb"]) and group["bucket_cap_mb"] > 0),
         "a number > 0 or \"auto\" (by device)"),
        ("gradient_as_bucket_view", isinstance(group["gradient_as_bucket_view"], bool),
         "true or false"),
    )
    for name, ok, allowed in checks:
        if not ok:
            raise ValueError(f"option {name!r} must be {allowed}, got {group[name]!r}")
    validate_refresh(group)
