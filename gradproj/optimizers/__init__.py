"""The low-rank optimizer, its parameter groups and named presets."""
from .groups import DEFAULT_TARGETS, param_groups
from .lowrank import LowRankOptimizer, matrix_shape
from .stats import count_refreshes, count_svd_fallbacks, optimizer_state_nbytes
from .presets import GaLoreAdamW, build_optimizer, preset_options

__all__ = ["DEFAULT_TARGETS", "GaLoreAdamW", "LowRankOptimizer", "build_optimizer",
           "count_refreshes", "count_svd_fallbacks", "matrix_shape", "optimizer_state_nbytes",
           "param_groups", "preset_options"]
