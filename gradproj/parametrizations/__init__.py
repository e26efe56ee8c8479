"""Weight-side transforms of the targeted Linear layers (the `PARAMETRIZATIONS` kind)."""
from . import gradnormlorp, int8, lora, lora_ga, sltrain, welore  # noqa: F401  (register the built-ins)
from .base import (BYTE_CATEGORIES, Parametrization, ParametrizedLinear, apply_parametrization,
                   create_parametrization, from_options, initialize_parametrization, linear_module_names, merge_parametrizations,
                   parametrized_modules, role_of)

__all__ = ["BYTE_CATEGORIES", "Parametrization", "ParametrizedLinear", "apply_parametrization",
           "create_parametrization", "from_options", "initialize_parametrization", "linear_module_names", "merge_parametrizations",
           "parametrized_modules", "role_of"]
