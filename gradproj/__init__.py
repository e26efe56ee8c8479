"""gradproj: memory-efficient training by gradient low-rank projection (the GaLore family).

    import gradproj as gp
    groups = gp.param_groups(model, targets=["attn", "mlp"], rank=128, update_gap=200, scale=0.25)
    opt = gp.LowRankOptimizer(groups, rule="adamw", projector="randomized", lr=1e-2)
"""
from . import formats, parametrizations, projectors, residuals, rules  # noqa: F401  (register built-ins)
from .optimizers import (DEFAULT_TARGETS, GaLoreAdamW, LowRankOptimizer, build_optimizer,
                         count_refreshes, count_svd_fallbacks, optimizer_state_nbytes,
                         param_groups, preset_options)
from .quant import QuantLinear, quantize_weights
from .parametrizations import apply_parametrization, merge_parametrizations
from .memory import plan_memory
from .optimizers.refresh import subspace_similarity
from .registry import (KERNELS, PARAMETRIZATIONS, PRESETS, PROJECTORS, RESIDUALS, RULES, STATE_FORMATS, Registry,
                       load_plugins)

__version__ = "0.1.0"

load_plugins()

__all__ = ["DEFAULT_TARGETS", "GaLoreAdamW", "KERNELS", "LowRankOptimizer", "PARAMETRIZATIONS",
           "PRESETS", "apply_parametrization", "merge_parametrizations",
           "PROJECTORS", "RESIDUALS", "RULES", "Registry", "STATE_FORMATS", "build_optimizer",
           "count_refreshes", "count_svd_fallbacks", "load_plugins", "optimizer_state_nbytes",
           "param_groups", "plan_memory", "preset_options", "QuantLinear", "quantize_weights",
           "subspace_similarity"]
