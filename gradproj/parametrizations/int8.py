"""`int8`: Q-GaLore's INT8 weights as a parametrization (the codec lives in `gradproj.quant`).

Each targeted nn.Linear becomes an `Int8Linear` — a `QuantLinear` (group-wise INT8 codes
+ fp32 scales, trained in place with stochastic rounding by the optimizer) that also
speaks the parametrization contract: its one weight is projected (Q-GaLore projects the
INT8 weights' gradients), it merges back to a dense nn.Linear with the dequantized
weight (exactly what the forward computes with), and it reports codes and scales.
`quantize_weights = true` / `weight_group_size` (the q-galore preset's keys) are this
parametrization under their old names.
"""
from __future__ import annotations

from torch import nn

from ..quant.linear import QuantLinear
from ..registry import PARAMETRIZATIONS
from .base import Parametrization, ParametrizedLinear, nbytes


class Int8Linear(QuantLinear, ParametrizedLinear):
    """QuantLinear with the parametrization contract (see module doc)."""

    projected = ("weight",)

    def dense_weight(self):
        return self.dequantized_weight()

    def float_twin(self) -> nn.Linear:
        return self.merged()

    def byte_breakdown(self) -> dict[str, int]:
        out = {"codes": nbytes(self.weight), "scales": nbytes(self.weight_scale)}
        if self.bias is not None:
            out["bias"] = nbytes(self.bias)
        return out


@PARAMETRIZATIONS.register("int8", aliases=("q-galore-int8",))
class Int8(Parametrization):
    """INT8 group-wise weights trained with stochastic rounding (Q-GaLore); group 256."""

    defaults = {"group_size": 256}  # Q-GaLore: one fp32 scale per 256 weights (1.016 B/weight)

    def validate(self) -> None:
        self._int("group_size")

    def with_int8_weights(self, group_size: int) -> "Int8":
        return self  # already INT8: its own group_size wins

    def convert(self, linear: nn.Linear, index: int) -> Int8Linear:
        return Int8Linear.from_linear(linear, self.options["group_size"])


__all__ = ["Int8", "Int8Linear"]
