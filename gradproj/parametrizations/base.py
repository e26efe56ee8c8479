"""Parametrizations: the `PARAMETRIZATIONS` plugin kind — what a targeted weight *is*.

A parametrization replaces each targeted `nn.Linear` (m×n weight W) by a module that
represents W with other tensors: INT8 codes + scales (Q-GaLore), a frozen W plus a
trainable B·A (LoRA, LoRA-GA), B·A + a fixed-support sparse S (SLTrain), ... It is
applied to the model *before* the optimizer is built, by the one function every path
calls (`apply_parametrization`: `gp.build_optimizer`, the run spec, the memory planner).

The contract a plugin implements (two classes):

`Parametrization` (registered; one instance per run, holds the options)
  * `defaults`      {option: default}; `__init__(**options)` rejects unknown options and
                    `validate()` raises ValueError("option 'key' must be ..., got ...") —
                    the run spec turns that into `[model.parametrization].key: ...`.
  * `convert(linear, index)` → a `ParametrizedLinear` for one nn.Linear (its weight is the
                    starting W; `index` numbers the targeted layers in model order, so
                    seeds derive from (seed, index) and a rebuilt model is identical).
  * `needs_data`    True when `initialize(model, modules, loss_of)` must see batches
                    before training (LoRA-GA's gradient SVD). The trainer calls it once on
                    a fresh run (never on resume: the checkpoint holds the result).

`ParametrizedLinear` (the module; `nn.Module`)
  * `dense_weight()` the m×n weight it represents, differentiable w.r.t. its trainable
                    tensors (the reference the suite holds forward and gradients to).
  * `projected`     local names of 2-D trainable tensors that may be gradient-projected:
                    `param_groups` puts them in the low-rank group; every other trainable
                    tensor of the module goes to the full-rank group; frozen ones nowhere.
  * `merged()`      a plain nn.Linear with `dense_weight()` and the bias (export).
  * `byte_breakdown()` {category: bytes} of its own parameters and buffers, categories
                    from `BYTE_CATEGORIES`; the planner reports them and counts
                    "scales" as quantization scales. They must sum to the module's tensors.
  * INT8 tensors (an `Int8Owner` layer: Q-GaLore's weights, SLTrain's `int8`) are
    int8 parameters that do not require grad; the layer's backward writes their fp32
    `.grad` and the optimizer steps them with stochastic rounding. Such a layer has
    `float_twin()`: the float module computing the same, its tensors dequantized under
    the same names (the suite's gradient reference; a way back to float training).
  * state: tensors only (parameters and buffers), so checkpoints load with
    `torch.load(weights_only=True)` and safetensors; anything regenerated from a seed
    keeps the seed as a 0-d int64 buffer.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..quant.linear import is_quantized
from ..registry import PARAMETRIZATIONS

#: what `byte_breakdown` may report (the planner's per-parametrization detail)
BYTE_CATEGORIES = ("weights", "frozen", "factors", "sparse_values", "sparse_indices",
                   "codes", "scales", "bias", "seeds")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ParametrizedLinear(nn.Module):
    """A Linear layer whose m×n weight is represented by other tensors (see module doc)."""

    projected: tuple[str, ...] = ()

    in_features: int
    out_features: int

    def dense_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        w = self.dense_weight().detach()
        bias = getattr(self, "bias", None)
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                        device=w.device, dtype=w.dtype)
        out.weight.copy_(w)
        if bias is not None:
            out.bias.copy_(bias.detach())
        return out

    def float_twin(self) -> nn.Module:
        """Layers with INT8 tensors: the equivalent float module (see the module doc)."""
        raise NotImplementedError(f"{type(self).__name__} holds no INT8 tensors")

    def byte_breakdown(self) -> dict[str, int]:
        """Default: trainable 2-D tensors are factors, frozen ones frozen, 1-D bias."""
        out: dict[str, int] = {}
        for name, t in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]:
            kind = ("bias" if name == "bias" else "factors" if t.requires_grad and t.dim() >= 2
                    else "frozen")
            out[kind] = out.get(kind, 0) + nbytes(t)
        return out


class Parametrization:
    """Base class of a registered weight transform (see the module doc for the contract)."""

    defaults: ClassVar[dict[str, Any]] = {}
    needs_data: ClassVar[bool] = False

    def __init__(self, **options: Any):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            from difflib import get_close_matches
            close = get_close_matches(unknown[0], list(self.defaults), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"option '{unknown[0]}' is not an option of parametrization "
                             f"{self.name!r}{hint} (expected one of: "
                             f"{', '.join(self.defaults) or 'none'})")
        self.options = {**self.defaults, **options}
        self.validate()

    @property
    def name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)

    def validate(self) -> None:
        """Raise ValueError("option 'key' must be ..., got ...") for a bad option."""

    def convert(self, linear: nn.Linear, index: int) -> ParametrizedLinear:
        raise NotImplementedError

    def prepare(self, model: nn.Module, module_names: Sequence[str]) -> None:
        """Called by `apply_parametrization` once, before the first `convert`, with every
        name it will convert (in `index` order): a transform that decides across layers
        (WeLore's one global rank threshold) reads the model here. Default: nothing."""

    def freezes_rest(self) -> bool:
        """True when every tensor outside the parametrized layers is frozen (fine-tuning
        adapters: LoRA trains only B·A); False keeps them trainable (SLTrain pre-trains
        embeddings, norms and the head at full rank)."""
        return False

    def with_int8_weights(self, group_size: int) -> "Parametrization":
        """This transform with its trained tensors stored as INT8 (`quantize_weights =
        true`, the q-galore preset's key, combined with this kind); default: refused."""
        raise ValueError(f"option 'quantize_weights' (INT8 weights, from the q-galore preset) "
                         f"cannot be combined with parametrization {self.name!r}: it has no "
                         f"INT8 variant; set quantize_weights = false")

    def initialize(self, model: nn.Module, modules: dict[str, ParametrizedLinear],
                   loss_of: Callable[[int], torch.Tensor]) -> None:
        """Data-dependent init (`needs_data`): `loss_of(i)` is the loss on batch i."""

    def plan_notes(self, breakdown: dict[str, int]) -> list[str]:
        """Lines the memory planner prints for this transform, given the model's summed
        `byte_breakdown` (e.g. a one-time init cost that is in no component)."""
        return []

    # -- option checks shared by plugins ---------------------------------------------
    def _int(self, key: str, lo: int = 1) -> None:
        v = self.options[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"option '{key}' must be an integer >= {lo}, got {v!r}")

    def _number(self, key: str, lo: float | None = None, hi: float | None = None,
                open_lo: bool = True) -> None:
        v = self.options[key]
        bad = not isinstance(v, (int, float)) or isinstance(v, bool)
        if not bad and lo is not None:
            bad = v <= lo if open_lo else v < lo
        if not bad and hi is not None:
            bad = v > hi
        if bad:
            where = (f" in {'(' if open_lo else '['}{lo}, {hi}]" if hi is not None else
                     f" > {lo}" if lo is not None else "")
            raise ValueError(f"option '{key}' must be a number{where}, got {v!r}")

    def _choice(self, key: str, *choices: str) -> None:
        v = self.options[key]
        if v not in choices:
            raise ValueError(f"option '{key}' must be one of {', '.join(map(repr, choices))}, "
                             f"got {v!r}")


# -- the one path: resolve, select targets, apply ---------------------------------------
def create_parametrization(spec: "str | dict | Parametrization | None") -> Parametrization | None:
    """A Parametrization from a name, a `{"kind": name, **options}` table, or an instance."""
    if spec is None or isinstance(spec, Parametrization):
        return spec
    if isinstance(spec, str):
        return PARAMETRIZATIONS.create(spec)
    if isinstance(spec, dict):
        options = dict(spec)
        kind = options.pop("kind", None)
        if kind is None:
            raise ValueError("option 'kind' must name a parametrization "
                             f"({', '.join(PARAMETRIZATIONS.names())}), got nothing")
        if not isinstance(kind, str) or kind not in PARAMETRIZATIONS:
            PARAMETRIZATIONS.canonical(str(kind))  # raises, naming close matches
        return PARAMETRIZATIONS.create(kind, **options)
    raise ValueError(f"parametrization must be a name, a table with 'kind', or a "
                     f"Parametrization, got {type(spec).__name__}")


def linear_module_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Qualified names of the plain nn.Linear modules `targets` selects, in model order:
    the same substring match `param_groups` uses (galore-torch's recipe)."""
    if isinstance(targets, str):
        targets = (targets,)
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and any(t in name for t in targets)]


def apply_parametrization(model: nn.Module, parametrization, module_names: Sequence[str]
                          ) -> dict[str, ParametrizedLinear]:
    """Replace, in place, each named nn.Linear by `parametrization.convert(...)`.

    Idempotent: a name whose module is already parametrized is left as it is (a Trainer
    prepares the model before loading a checkpoint, then builds the optimizer). Returns
    {name: module} of every parametrized module among `module_names`.
    """
    param = create_parametrization(parametrization)
    out: dict[str, ParametrizedLinear] = {}
    if param is None:
        return out
    if any(not isinstance(model.get_submodule(n), ParametrizedLinear) for n in module_names):
        param.prepare(model, list(module_names))
    for index, name in enumerate(module_names):
        module = model.get_submodule(name)
        if isinstance(module, ParametrizedLinear):
            out[name] = module
            continue
        if type(module) is not nn.Linear:
            raise ValueError(f"parametrization {param.name!r}: {name} is a "
                             f"{type(module).__name__}, not an nn.Linear")
        new = param.convert(module, index)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        out[name] = new
    if param.freezes_rest():
        inside = {id(p) for m in parametrized_modules(model).values() for p in m.parameters()}
        for p in model.parameters():
            if id(p) not in inside:
                p.requires_grad_(False)
    return out


def initialize_parametrization(model: nn.Module, parametrization,
                               loss_of: Callable[[int], torch.Tensor]) -> bool:
    """Run a data-dependent init (`needs_data`, LoRA-GA) on the model's parametrized
    layers; `loss_of(i)` is the loss on batch i. Returns whether one ran. Call it once on a
    fresh model, after `apply_parametrization` and before training (not on resume)."""
    param = create_parametrization(parametrization)
    if param is None or not param.needs_data:
        return False
    param.initialize(model, parametrized_modules(model), loss_of)
    return True


def parametrized_modules(model: nn.Module) -> dict[str, ParametrizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ParametrizedLinear)}


@torch.no_grad()
def merge_parametrizations(model: nn.Module) -> nn.Module:
    """Export: every ParametrizedLinear replaced, in place, by its plain nn.Linear."""
    for name, module in list(parametrized_modules(model).items()):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.merged())
    return model


def role_of(owner: ParametrizedLinear, local_name: str, p: torch.Tensor) -> str | None:
    """How `param_groups` treats a tensor of a ParametrizedLinear: "lowrank" (named in
    `projected` and 2-D), "full" (any other trainable tensor), or None (frozen: no group)."""
    if local_name in owner.projected and p.dim() >= 2:
        return "lowrank"
    return "full" if p.requires_grad or is_quantized(p) else None


__all__ = ["BYTE_CATEGORIES", "Parametrization", "ParametrizedLinear", "apply_parametrization",
           "create_parametrization", "initialize_parametrization", "linear_module_names", "merge_parametrizations",
           "parametrized_modules", "role_of"]


def from_options(parametrization, options: dict) -> Parametrization | None:
    """The parametrization a build asks for: `parametrization` (name, table or instance),
    or the q-galore preset's legacy keys, popped from `options` (`quantize_weights = true`
    is `int8` with `group_size = weight_group_size`)."""
    quantize = options.pop("quantize_weights", False)
    group_size = options.pop("weight_group_size", None)
    if not isinstance(quantize, bool):
        raise ValueError(f"option 'quantize_weights' must be true or false, got {quantize!r}")
    param = create_parametrization(parametrization)
    if not quantize:
        return param
    if param is None:
        return PARAMETRIZATIONS.create("int8", **({} if group_size is None
                                                  else {"group_size": group_size}))
    return param.with_int8_weights(256 if group_size is None else group_size)


__all__ += ["from_options"]
