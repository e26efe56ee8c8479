"""The names users already type, mapped onto gradproj presets and options.

Three vocabularies, each mirroring what its framework does today:

* Hugging Face `TrainingArguments(optim=..., optim_args="k=v,...")`: `galore_adamw`,
  `galore_adamw_8bit`, `galore_adafactor`, `apollo_adamw`, each also `*_layerwise`
  (per-layer mode). HF's defaults are kept (APOLLO through HF: rank 128, not the paper's
  256) and, as HF does, only APOLLO takes `adam_beta1/2` and `adam_epsilon` (GaLore keeps
  galore-torch's ε = 1e-6).
* `optim_args` keys of galore-torch (`rank`, `update_proj_gap`, `scale`, `proj_type`) and
  APOLLO (`proj` random|svd, `scale_type` channel|tensor), plus gradproj's own option
  names (`preset=fira`, `projector=randomized`, `state_format=q8`, `seed=3`, ...).
* `optim_args` `parametrization=KIND` and `parametrization.OPTION=VALUE` (a weight-side
  transform of the targeted Linear layers, `gradproj.parametrizations`), e.g.
  `parametrization=lora,parametrization.rank=8`.
* LLaMA-Factory's `use_galore`, `galore_target`, `galore_rank`, `galore_update_interval`,
  `galore_scale`, `galore_proj_type`, `galore_layerwise` and the `apollo_*` equivalents,
  with LLaMA-Factory's defaults (rank 16, GaLore scale 2.0, APOLLO scale 32) and its
  `optim` → GaLore class choice (adamw_torch, adamw_8bit, adafactor).

Anything else is refused with one line naming the key and the close matches.

`build_options` layers what a choice builds: the preset; where optim_args switch the rule
(`rule=sophia` over GaLore), the new rule's own defaults for the options both rules name
(GaLore's Adam ε 1e-6 is not Sophia's 1e-15); the TrainingArguments' Adam arguments
(all of them where HF passes them: APOLLO, LLaMA-Factory's AdamW; for any other rule
only the ones the user set, `explicit`); then optim_args, which win. A tuple option is
given as numbers joined by ':' (`betas=0.965:0.99`), since HF splits optim_args on commas.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..train.checks import did_you_mean
from ..optimizers import LowRankOptimizer
from ..optimizers.options import GENERIC_DEFAULTS
from ..optimizers.presets import MODEL_KEYS, canonical_rule, with_overrides
from ..registry import PRESETS, RESIDUALS, RULES


@dataclass(frozen=True)
class Resolved:
    """What to build: a preset, the options over it, per-layer or not, and the targets."""
    preset: str
    options: dict = field(default_factory=dict)
    per_layer: bool = False
    targets: Any = None           # names/regexes, "all-linear", or LLAMAFACTORY_ALL
    adam_from_args: bool = False  # take betas/eps from the TrainingArguments (APOLLO, LLaMA-Factory)
    parametrization: dict | None = None  # {"kind": name, **options}: applied to the targets


LLAMAFACTORY_ALL = "llamafactory:all"  # every linear layer but the output head

# HF optim name -> (preset, overrides of it that HF's handler applies)
HF_OPTIMS: dict[str, tuple[str, dict]] = {
    "galore_adamw": ("galore", {}),
    "galore_adamw_8bit": ("galore8bit", {}),
    "galore_adafactor": ("galore", {"rule": "adafactor"}),
    "apollo_adamw": ("apollo", {"rank": 128}),  # HF's `rank` default for APOLLO
}
LAYERWISE = "_layerwise"

# optim_args keys of galore-torch / APOLLO -> (our option, how to read the string)
_PROJ = {"random": "gaussian", "svd": "svd"}
FOREIGN_KEYS: dict[str, tuple[str, Any]] = {
    "rank": ("rank", int),
    "update_proj_gap": ("update_gap", int),
    "scale": ("scale", float),
    "proj_type": ("proj_type", str),
    "proj": ("projector", _PROJ),
    "scale_type": ("scale_type", str),
}
# set through TrainingArguments, not optim_args; internal group keys
_NOT_IN_OPTIM_ARGS = {"lr": "learning_rate", "weight_decay": "weight_decay"}
_INTERNAL = {"lowrank", "projector_options", "params"}
_MODEL_DEFAULTS = {"quantize_weights": False, "weight_group_size": 256}  # INT8 weights (q-galore)
# TrainingArguments' Adam arguments -> (our option, index into it; None: the whole value)
ADAM_ARGS: dict[str, tuple[str, int | None]] = {
    "adam_beta1": ("betas", 0), "adam_beta2": ("betas", 1), "adam_epsilon": ("eps", None)}


class OptionError(ValueError):
    """One line naming the option that is wrong."""


def parse_optim_args(text: str | Mapping | None) -> dict[str, str]:
    """HF's parser: spaces dropped, `k=v` pairs split on commas; a dict passes through."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return {str(k): v for k, v in text.items()}
    pairs = {}
    for piece in str(text).replace(" ", "").split(","):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        if not sep or not key:
            raise OptionError(f"optim_args: expected key=value pairs separated by commas, "
                              f"got {piece!r}")
        pairs[key] = value
    return pairs


def _as(kind, key: str, value: Any, source: str) -> Any:
    """Read an optim_args string (or an already typed value) as `kind`."""
    if isinstance(kind, dict):
        if value not in kind:
            raise OptionError(f"{source}: {key}={value!r} is not one of {', '.join(kind)}")
        return kind[value]
    if not isinstance(value, str):
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not ok:
            raise OptionError(f"{source}: {key}={value!r} is not {_NAMES[kind]}")
        return value
    try:
        if kind is bool:
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise OptionError(f"{source}: {key}={value!r} is not {_NAMES[kind]}") from None


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _own_keys(preset: str, options: dict) -> dict[str, Any]:
    """Our option names settable from a string, with the default that fixes their type."""
    base = {**GENERIC_DEFAULTS, **PRESETS.get(preset), **options}
    known = {**GENERIC_DEFAULTS, **_MODEL_DEFAULTS}
    for registry, name in ((RULES, base["rule"]), (RESIDUALS, base["residual"])):
        if name in registry:
            known.update(registry.get(name).defaults)
    known.update(PRESETS.get(preset))
    return {k: v for k, v in known.items() if k not in _INTERNAL and k not in _NOT_IN_OPTIM_ARGS
            and (isinstance(v, (bool, int, float, str)) or _is_numbers(v))}


def _is_numbers(value) -> bool:
    return isinstance(value, tuple) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in value)


def _numbers(key: str, value: Any, count: int, source: str) -> tuple:
    """A tuple option from optim_args: `count` numbers joined by ':' (or a typed sequence)."""
    parts = value.split(":") if isinstance(value, str) else value
    try:
        numbers = tuple(float(x) for x in parts)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count:
        example = ":".join(["0.9"] * count)
        raise OptionError(f"{source}: {key}={value!r} is not {count} numbers joined by ':' "
                          f"(e.g. {key}={example})")
    return numbers


def apply_optim_args(preset: str, options: dict, args: Mapping[str, Any],
                     source: str = "optim_args") -> tuple[str, dict]:
    """(preset, options) with `args` applied: foreign keys renamed, ours type-converted."""
    options = dict(options)
    if "preset" in args:
        preset = str(args["preset"])
        if preset not in PRESETS:
            raise OptionError(f"{source}: preset={preset!r} is not a gradproj preset "
                              f"({', '.join(PRESETS.names())}){did_you_mean(preset, PRESETS.names())}")
    for key, value in args.items():
        if key == "preset":
            continue
        if key in _NOT_IN_OPTIM_ARGS:
            raise OptionError(f"{source}: {key!r} is set through TrainingArguments."
                              f"{_NOT_IN_OPTIM_ARGS[key]}, not optim_args")
        if key in FOREIGN_KEYS:
            ours, kind = FOREIGN_KEYS[key]
            options[ours] = _as(kind, key, value, source)
            continue
        own = _own_keys(preset, options)
        if key not in own:
            names = sorted(set(FOREIGN_KEYS) | set(own) | {"preset"})
            raise OptionError(f"{source}: unknown key {key!r}{did_you_mean(key, names)} "
                              f"(galore-torch/APOLLO keys: {', '.join(FOREIGN_KEYS)}; or any "
                              f"gradproj option, e.g. preset, projector, state_format)")
        default = own[key]
        options[key] = (_numbers(key, value, len(default), source) if isinstance(default, tuple)
                        else _as(type(default), key, value, source))
    return preset, options


PARAM_KEY = "parametrization"  # optim_args: parametrization=KIND,parametrization.rank=8,...


def parametrization_table(spec: Any, source: str = "parametrization") -> dict | None:
    """The checked table {"kind": name, **every option} of a name, a table or None; a bad
    name or option is one OptionError line."""
    from ..parametrizations import create_parametrization
    if spec is None:
        return None
    try:
        param = create_parametrization(spec)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"{source}: {exc}") from None
    return {"kind": param.name, **param.options}


def split_parametrization(args: dict[str, Any], source: str = "optim_args") -> dict | None:
    """Pop `parametrization=KIND` and `parametrization.OPTION=VALUE` from optim_args: the
    table, each value read as its option's default's type (bool, int, float, str)."""
    from ..registry import PARAMETRIZATIONS
    prefix = PARAM_KEY + "."
    own = {k[len(prefix):]: args.pop(k) for k in [k for k in args if k.startswith(prefix)]}
    kind = args.pop(PARAM_KEY, None)
    if kind is None:
        if own:
            raise OptionError(f"{source}: {prefix}{next(iter(own))} needs {PARAM_KEY}=KIND "
                              f"({', '.join(PARAMETRIZATIONS.names())})")
        return None
    if kind not in PARAMETRIZATIONS:
        names = PARAMETRIZATIONS.names()
        raise OptionError(f"{source}: {PARAM_KEY}={kind!r} is not a parametrization "
                          f"({', '.join(names)}){did_you_mean(str(kind), names)}")
    defaults = PARAMETRIZATIONS.get(kind).defaults
    table: dict[str, Any] = {"kind": kind}
    for key, value in own.items():
        if key not in defaults:
            raise OptionError(f"{source}: {prefix}{key}: unknown option of {kind!r}"
                              f"{did_you_mean(key, defaults)} (expected one of: "
                              f"{', '.join(defaults)})")
        default = defaults[key]
        if not isinstance(default, (bool, int, float, str)) or default is None:
            raise OptionError(f"{source}: {prefix}{key} cannot be given as text; pass "
                              f"GradprojTrainer(parametrization={{'kind': {kind!r}, "
                              f"{key!r}: ...}}) instead")
        table[key] = _as(type(default), prefix + key, value, source)
    return parametrization_table(table, source)


def build_options(preset: str, options: Mapping[str, Any], *, adam_from_args: bool = False,
                  adam: Mapping[str, float] | None = None, explicit: Any = ()) -> dict:
    """The optimizer options of `preset` + `options`, in the layers of the module docstring.

    `adam`: the TrainingArguments' adam_beta1, adam_beta2, adam_epsilon; `explicit`: the
    names among them the user set. HF's AdamW mappings that take them (`adam_from_args`)
    get all three, as HF's handlers pass them; GaLore's AdamW none, as HF's; any other rule
    (Sophia, LAMB, ...: HF has no handler for them) only the explicit ones, so it keeps its
    paper defaults otherwise. A rule without the option (sgdm has no betas) skips it.
    """
    merged = with_overrides(preset, {"rule": options["rule"]} if "rule" in options else {})
    rule = canonical_rule(merged.get("rule", GENERIC_DEFAULTS["rule"]))
    own = RULES.get(rule).defaults if rule in RULES else {}
    if adam:
        names = (ADAM_ARGS if adam_from_args else ()) if rule == "adamw" else [
            name for name in ADAM_ARGS if name in explicit]
        for name in names:
            key, index = ADAM_ARGS[name]
            if key not in own:
                continue
            if index is None:
                merged[key] = adam[name]
            else:
                value = list(merged.get(key, own[key]))
                value[index] = adam[name]
                merged[key] = tuple(value)
    merged.update(options)
    return merged


def check(preset: str, options: dict, source: str) -> None:
    """The optimizer's own validation on a 4×4 dummy weight, as the run spec does."""
    merged = build_options(preset, options)
    for key in MODEL_KEYS:
        merged.pop(key, None)
    try:
        LowRankOptimizer([{"params": [torch.nn.Parameter(torch.zeros(4, 4))], "lowrank": True}],
                         **merged)
    except (ValueError, TypeError) as exc:
        raise OptionError(f"{source}: {exc}") from None


def maps_optim(optim: str, optim_args: str | Mapping | None = None) -> bool:
    """Whether `from_hf` builds gradproj's optimizer for these arguments (a GaLore/APOLLO
    name HF knows, or `optim_args` naming one of our presets)."""
    optim = str(getattr(optim, "value", optim))
    base = optim[: -len(LAYERWISE)] if optim.endswith(LAYERWISE) else optim
    return base in HF_OPTIMS or "preset" in parse_optim_args(optim_args)


def from_hf(optim: str, optim_args: str | Mapping | None = None,
            optim_target_modules: Any = None) -> Resolved:
    """TrainingArguments' `optim`, `optim_args`, `optim_target_modules` -> what to build."""
    optim = str(getattr(optim, "value", optim))  # OptimizerNames is a str enum
    args = parse_optim_args(optim_args)
    parametrization = split_parametrization(args)
    per_layer = optim.endswith(LAYERWISE)
    base = optim[: -len(LAYERWISE)] if per_layer else optim
    if "preset" in args:  # ours wins, without the HF name's own overrides; *_layerwise stays
        preset, options = str(args["preset"]), {}
        per_layer = per_layer and base in HF_OPTIMS
    elif base in HF_OPTIMS:
        preset, options = HF_OPTIMS[base]
    else:
        names = sorted(HF_OPTIMS) + sorted(n + LAYERWISE for n in HF_OPTIMS)
        raise OptionError(f"optim {optim!r} is not a low-rank optimizer gradproj maps; expected "
                          f"one of {', '.join(names)}, or optim_args='preset=NAME,...' with a "
                          f"gradproj preset ({', '.join(PRESETS.names())})")
    if optim_target_modules is None:
        raise OptionError(f"optim_target_modules: {optim!r} needs the modules to project, e.g. "
                          f"['attn', 'mlp'] or 'all-linear' (as HF's Trainer requires)")
    preset, options = apply_optim_args(preset, options, args)
    check(preset, options, "optim_args")
    return Resolved(preset, options, per_layer, optim_target_modules,
                    adam_from_args=base == "apollo_adamw" and "preset" not in args,
                    parametrization=parametrization)


# -- LLaMA-Factory -------------------------------------------------------------------
# key -> (our option or a meta key, type); defaults are LLaMA-Factory's
LLAMAFACTORY_KEYS: dict[str, dict[str, tuple[str, Any, Any]]] = {
    "galore": {
        "galore_target": ("targets", str, "all"),
        "galore_rank": ("rank", int, 16),
        "galore_update_interval": ("update_gap", int, 200),
        "galore_scale": ("scale", float, 2.0),
        "galore_proj_type": ("proj_type", str, "std"),
        "galore_layerwise": ("per_layer", bool, False),
    },
    "apollo": {
        "apollo_target": ("targets", str, "all"),
        "apollo_rank": ("rank", int, 16),
        "apollo_update_interval": ("update_gap", int, 200),
        "apollo_scale": ("scale", float, 32.0),
        "apollo_proj": ("projector", _PROJ, "random"),
        "apollo_proj_type": ("proj_type", str, "std"),
        "apollo_scale_type": ("scale_type", str, "channel"),
        "apollo_layerwise": ("per_layer", bool, False),
        "apollo_scale_front": ("scale_front", bool, False),
    },
}
# LLaMA-Factory's GaLore class by TrainingArguments.optim
LLAMAFACTORY_GALORE_OPTIM = {"adamw_torch": "galore", "adamw_8bit": "galore8bit",
                             "adamw_bnb_8bit": "galore8bit", "paged_adamw_8bit": "galore8bit",
                             "adafactor": "galore+adafactor"}


def from_llamafactory(cfg: Mapping[str, Any], optim: str = "adamw_torch") -> Resolved:
    """LLaMA-Factory's finetuning arguments (its YAML keys) -> what to build."""
    source = "LLaMA-Factory"
    use = [m for m in ("galore", "apollo") if cfg.get(f"use_{m}")]
    if len(use) != 1:
        raise OptionError(f"{source}: expected exactly one of use_galore, use_apollo to be true, "
                          f"got {', '.join(f'use_{m}' for m in use) or 'neither'}")
    method = use[0]
    table = LLAMAFACTORY_KEYS[method]
    for key in cfg:
        other = "apollo" if method == "galore" else "galore"
        if key.startswith(f"{method}_") and key not in table:
            raise OptionError(f"{source}: unknown key {key!r}{did_you_mean(key, table)}")
        if key.startswith(f"{other}_") and key not in LLAMAFACTORY_KEYS[other]:
            raise OptionError(f"{source}: unknown key {key!r}"
                              f"{did_you_mean(key, LLAMAFACTORY_KEYS[other])}")
    values = {ours: _as(kind, key, cfg.get(key, default), source)
              for key, (ours, kind, default) in table.items()}
    if values.pop("scale_front", False):
        raise OptionError(f"{source}: apollo_scale_front = true is not supported (gradproj's "
                          f"APOLLO applies the norm-growth limiter before the √scale factor, "
                          f"APOLLO's default)")
    per_layer = values.pop("per_layer")
    target = values.pop("targets")
    targets = (LLAMAFACTORY_ALL if target.strip() == "all"
               else [t.strip() for t in target.split(",") if t.strip()])
    if method == "galore":
        optim = str(getattr(optim, "value", optim))
        if optim not in LLAMAFACTORY_GALORE_OPTIM:
            raise OptionError(f"{source}: GaLore with optim {optim!r} is not supported "
                              f"(LLaMA-Factory accepts {', '.join(LLAMAFACTORY_GALORE_OPTIM)})")
        preset = LLAMAFACTORY_GALORE_OPTIM[optim]
        if preset == "galore+adafactor":
            preset, values["rule"] = "galore", "adafactor"
    else:
        preset = "apollo"
    check(preset, values, source)
    return Resolved(preset, values, per_layer, targets, adam_from_args=True)
