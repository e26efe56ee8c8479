"""Which weights are projected: Hugging Face's `optim_target_modules` matching.

HF's Trainer (`trainer_optimizer._setup_low_rank_optimizer`) projects the weight of every
`nn.Linear` module whose qualified name matches `optim_target_modules`:

  * a string: `re.fullmatch(pattern, name)` (a plain name therefore matches only itself);
  * a list of strings: the name equals an entry, contains an entry as a substring, or
    fullmatches an entry as a regex;
  * `"all-linear"` (or `"all_linear"`): every `nn.Linear`, the output head included.

We match the same way, with two differences, both said in the error or here:
transformers' `Conv1D` (GPT-2's attention and MLP layers, weights stored in×out) counts as
linear (HF's matcher skips it, so `all-linear` on GPT-2 finds nothing there); and a weight
tied to a non-linear module (GPT-2's head is the token embedding) is not projected, as in
HF, because `named_parameters()` names it once, under the embedding.
"""
from __future__ import annotations

import re
import sys
from typing import Sequence

from torch import nn

ALL_LINEAR = "all-linear"


def linear_types() -> tuple[type, ...]:
    """nn.Linear, our INT8 QuantLinear and any parametrized Linear (converted Linears),
    plus transformers' Conv1D when transformers is already imported."""
    from ..parametrizations.base import ParametrizedLinear
    from ..quant.linear import QuantLinear
    types: tuple[type, ...] = (nn.Linear, QuantLinear, ParametrizedLinear)
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    return types + ((conv1d,) if conv1d is not None else ())


def is_all_linear(targets) -> bool:
    if isinstance(targets, str):
        return targets.replace("_", "-") == ALL_LINEAR
    return (isinstance(targets, (list, tuple)) and len(targets) == 1
            and isinstance(targets[0], str) and targets[0].replace("_", "-") == ALL_LINEAR)


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error as exc:
        raise ValueError(f"optim_target_modules: {pattern!r} is not a valid regular "
                         f"expression ({exc})") from None


def matches(targets: str | Sequence[str], name: str) -> bool:
    """HF's `check_target_module_exists` for one module name."""
    if isinstance(targets, str):
        return _fullmatch(targets, name)
    return (name in targets or any(t in name for t in targets)
            or any(_fullmatch(t, name) for t in targets))


def target_parameter_names(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names (as `named_parameters()` gives them) of the weights `targets` selects."""
    if not isinstance(targets, (str, list, tuple)) or (
            not isinstance(targets, str) and not all(isinstance(t, str) and t for t in targets)):
        raise ValueError(f"optim_target_modules: expected a list of module names or regexes, "
                         f"a regex string, or 'all-linear', got {targets!r}")
    everything = is_all_linear(targets)
    kinds = linear_types()
    from ..parametrizations.base import ParametrizedLinear
    wanted = set()
    for name, module in model.named_modules():
        if isinstance(module, kinds) and (everything or matches(targets, name)):
            # a parametrized layer (converted already) is named by all its own tensors
            own = ([p for p, _ in module.named_parameters(recurse=False)]
                   if isinstance(module, ParametrizedLinear) else ["weight"])
            wanted.update(f"{name}.{p}" for p in own)
    found = [name for name, _ in model.named_parameters() if name in wanted]
    if not found:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                         if isinstance(m, kinds)})
        raise ValueError(f"optim_target_modules {targets!r} matches no linear layer of "
                         f"{type(model).__name__} (its linear layers are named: "
                         f"{', '.join(linear) or 'none'})")
    return found


def llamafactory_all_linear(model: nn.Module) -> list[str]:
    """LLaMA-Factory's `galore_target = "all"`: the leaf names of every linear layer except
    the output layer (`lm_head`, and ChatGLM's `output_layer`, InternLM2's `output`)."""
    output = {"lm_head", "output_layer", "output"}
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, linear_types()) and name.rsplit(".", 1)[-1] not in output})
