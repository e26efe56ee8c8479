"""`lora-ga`: LoRA initialised from the gradient's SVD (Wang et al., NeurIPS 2024).

Follows the authors' code (github.com/Outsider565/LoRA-GA, as merged into peft's
`loraga.py` / `layer.py`), defaults `direction = "ArB2r"`, `scale = "stable"`, γ = 16:

  1. G = the mean gradient of each targeted W over `batches` batches (W temporarily
     trainable, everything else frozen; the trainer calls this once on a fresh run);
  2. its top 2r singular triplets through the PROJECTORS registry: Q = the projector's
     left basis of rank 2r (`svd`: exact; `randomized`: a range finder for large
     layers), then the exact SVD of the small 2r×n matrix QᵀG = Ũ·S·Vᵀ, U = Q·Ũ —
     the standard randomized SVD, exact when Q is; the authors call torch.svd_lowrank;
  3. ArB2r: A = Vᵀ[:r], B = U[:, r:2r] (A2rBr, ArBr: the paper's other splits);
  4. "stable" scale: A, B ×= m^¼/√γ (m = out features; the output scale then does not
     grow with width); "gd": A, B ÷= α/r; "unit": none;
  5. W ← W − (α/r)·B·A, so the model computes exactly what it did before (up to the
     rounding of W's dtype).

Why: one SGD step of lr η on (A, B) then moves the dense weight, to first order, by
    (α/r)·(ΔB·A + B·ΔA) = −η·(α/r)²·(G·AᵀA + B·BᵀG) = −η·(α/r)²·c²·G₂ᵣ,   c = m^¼/√γ,
where G₂ᵣ is the best rank-2r approximation of G (AᵀA and BBᵀ are c² times projections
on the top-r right / the next r left singular vectors): full fine-tuning's first step,
truncated to rank 2r. tests/parametrizations/test_lora_ga.py checks exactly this.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..registry import PARAMETRIZATIONS, PROJECTORS
from .base import ParametrizedLinear
from .lora import SEED_STRIDE, LoRA, LoRALinear

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr")
SCALES = ("stable", "gd", "unit")


def top_singular(grad: torch.Tensor, k: int, projector, seed: int):
    """(U m×k, S k, Vh k×n): the top-k singular triplets of fp32 `grad`, by `projector`'s
    left basis and an exact SVD of the k×n projection."""
    q = projector.fit_side(grad, k, "left", seed)
    u_small, s, vh = torch.linalg.svd(q.T @ grad, full_matrices=False)
    return q @ u_small, s, vh


@torch.no_grad()
def init_from_gradient(module: LoRALinear, grad: torch.Tensor, projector, *, seed: int,
                       direction: str = "ArB2r", scale: str = "stable",
                       stable_gamma: float = 16.0) -> None:
    """Steps 2–5 of the module doc for one layer; `grad` is the m×n gradient of W."""
    r = module.rank
    u, _, vh = top_singular(grad.float(), 2 * r, projector, seed)
    if direction == "ArB2r":
        a, b = vh[:r], u[:, r:2 * r]
    elif direction == "A2rBr":
        a, b = vh[r:2 * r], u[:, :r]
    else:  # "ArBr": interleaved, as the reference
        a, b = vh[1:2 * r:2], u[:, 0:2 * r:2]
    if scale == "stable":
        c = module.out_features ** 0.25 / stable_gamma ** 0.5
        a, b = a * c, b * c
    elif scale == "gd":
        a, b = a / module.scaling, b / module.scaling
    module.lora_A.copy_(a)
    module.lora_B.copy_(b)
    offset = module.scaling * (module.lora_B.float() @ module.lora_A.float())
    module.weight.copy_(module.weight.float() - offset)


@PARAMETRIZATIONS.register("lora-ga", aliases=("loraga",))
class LoRAGA(LoRA):
    """LoRA-GA (Wang et al. 2024): A, B from the top-2r SVD of the first batches' gradient, stable scale."""

    defaults = {**LoRA.defaults, "batches": 8, "direction": "ArB2r", "scale": "stable",
                "stable_gamma": 16.0, "projector": "svd", "projector_options": {}}
    needs_data = True

    def validate(self) -> None:
        super().validate()
        self._int("batches")
        self._choice("direction", *DIRECTIONS)
        self._choice("scale", *SCALES)
        self._number("stable_gamma", 0)
        if self.options["projector"] not in PROJECTORS:
            PROJECTORS.canonical(str(self.options["projector"]))  # raises, naming close ones
        if not isinstance(self.options["projector_options"], dict):
            raise ValueError(f"option 'projector_options' must be a table, got "
                             f"{self.options['projector_options']!r}")
        self.projector()  # the projector's own option checks

    def projector(self):
        return PROJECTORS.create(self.options["projector"], **self.options["projector_options"])

    def convert(self, linear: nn.Linear, index: int) -> LoRALinear:
        if 2 * self.options["rank"] > min(linear.in_features, linear.out_features):
            raise ValueError(f"option 'rank' must be <= min(in, out)/2 = "
                             f"{min(linear.in_features, linear.out_features) // 2} of every "
                             f"targeted layer (LoRA-GA takes 2r singular vectors), got "
                             f"{self.options['rank']}")
        return super().convert(linear, index)

    def initialize(self, model: nn.Module, modules: dict[str, ParametrizedLinear],
                   loss_of: Callable[[int], torch.Tensor]) -> None:
        """Step 1 (mean gradient of each targeted W over `batches` batches), then 2–5."""
        layers = {n: m for n, m in modules.items() if isinstance(m, LoRALinear)}
        trainable = {p: p.requires_grad for p in model.parameters()}
        for p in trainable:
            p.requires_grad_(False)
            p.grad = None
        for m in layers.values():
            m.weight.requires_grad_(True)
        try:
            batches = self.options["batches"]
            with torch.enable_grad():
                for i in range(batches):
                    (loss_of(i) / batches).backward()
            projector = self.projector()
            for index, (name, m) in enumerate(layers.items()):
                grad, m.weight.grad = m.weight.grad, None
                if grad is None:
                    raise RuntimeError(f"lora-ga: {name} got no gradient from the loss "
                                       f"(is the layer used in the forward?)")
                init_from_gradient(m, grad, projector, seed=self.options["seed"] + SEED_STRIDE * index,
                                   direction=self.options["direction"], scale=self.options["scale"],
                                   stable_gamma=float(self.options["stable_gamma"]))
        finally:
            for p, flag in trainable.items():
                p.requires_grad_(flag)
                p.grad = None


__all__ = ["DIRECTIONS", "LoRAGA", "SCALES", "init_from_gradient", "top_singular"]
