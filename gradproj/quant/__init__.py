"""INT8 weights trained with stochastic rounding (Q-GaLore): QuantLinear and the converter."""
from .int8 import int8_dequantize, int8_nbytes, int8_quantize
from .linear import (QuantLinear, apply_quantized_updates, compute_dtype, int8_weight_bytes,
                     is_quantized, quantize_weights)

__all__ = ["QuantLinear", "apply_quantized_updates", "compute_dtype", "int8_dequantize",
           "int8_nbytes", "int8_quantize", "int8_weight_bytes", "is_quantized", "quantize_weights"]
