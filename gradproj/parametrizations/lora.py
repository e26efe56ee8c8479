"""`lora`: a frozen W plus a trainable low-rank B·A, scaled by α/r (Hu et al., 2021).

    y = x·Wᵀ + (α/r)·(x·Aᵀ)·Bᵀ + b          W m×n frozen, A r×n, B m×r trained

As peft initialises it: A Kaiming-uniform (a = √5, seeded per layer), B = 0, so the
model is unchanged at step 0. The targeted layers' W and bias stay frozen (peft's
bias = "none"); everything outside them is frozen too, unless `train_rest = true` keeps
it trainable. The forward never forms W + (α/r)·B·A
(two thin matmuls: r·(m+n) per token instead of m·n); `merged()` folds it into one
dense weight for inference at no extra cost. `project_factors = true` puts A and B in
the low-rank group (GaLore on the factors); by default they are stepped at full rank.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PARAMETRIZATIONS
from .base import Parametrization, ParametrizedLinear, nbytes

SEED_STRIDE = 1_000_003  # per-layer seeds: seed + stride·index (distinct for any seed < stride)


class LoRALinear(ParametrizedLinear):
    """W (frozen) + (α/r)·B·A; see the module doc."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, seed: int,
                 project_factors: bool = False):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        self.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.bias = (nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
                     if linear.bias is not None else None)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=w.dtype, device=w.device))
        if w.device.type != "meta":
            gen = torch.Generator(device=w.device).manual_seed(seed)
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5): gain·√(3/fan_in)
            with torch.no_grad():
                self.lora_A.uniform_(-bound, bound, generator=gen)
        self.projected = ("lora_A", "lora_B") if project_factors else ()

    def dense_weight(self) -> torch.Tensor:
        return self.weight + self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (F.linear(x, self.weight, self.bias)
                + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B))

    def byte_breakdown(self) -> dict[str, int]:
        out = {"frozen": nbytes(self.weight), "factors": nbytes(self.lora_A) + nbytes(self.lora_B)}
        if self.bias is not None:
            out["bias"] = nbytes(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}, bias={self.bias is not None}")


@PARAMETRIZATIONS.register("lora")
class LoRA(Parametrization):
    """LoRA (Hu et al. 2021): frozen W + (alpha/r)·B·A, A Kaiming, B = 0; merges to one W."""

    defaults = {"rank": 8, "alpha": 16.0, "seed": 0, "train_rest": False,
                "project_factors": False}

    def validate(self) -> None:
        self._int("rank")
        self._number("alpha", 0)
        self._int("seed", 0)
        for key in ("train_rest", "project_factors"):
            if not isinstance(self.options[key], bool):
                raise ValueError(f"option '{key}' must be true or false, got {self.options[key]!r}")

    def freezes_rest(self) -> bool:
        return not self.options["train_rest"]

    def convert(self, linear: nn.Linear, index: int) -> LoRALinear:
        o = self.options
        if o["rank"] > min(linear.in_features, linear.out_features):
            raise ValueError(f"option 'rank' must be <= min(in, out) = "
                             f"{min(linear.in_features, linear.out_features)} of every targeted "
                             f"layer, got {o['rank']}")
        return LoRALinear(linear, o["rank"], float(o["alpha"]), o["seed"] + SEED_STRIDE * index,
                          o["project_factors"])


__all__ = ["LoRA", "LoRALinear"]
