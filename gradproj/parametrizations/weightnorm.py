"""GradNormLoRP's weight (Huang et al., 2024, "Gradient Weight-normalized Low-rank Projection"),
as pure functions.

    W = m ⊙ V / ‖V‖_row,    V = W₀ + s·B·A   (rank r > 0)     or   V trained itself (r = 0)

m (one magnitude per output feature, initialised to ‖W₀‖_row) and the low-rank components
B (out×r, zeros) and A (r×in) are trained; W₀ is frozen; s = α / r. At initialisation B = 0,
so W = W₀ exactly. The trained result merges into one dense W (no inference cost).

What the authors' reference code does (github.com/Jhhuangkay/Gradient-Weight-normalized-
Low-rank-Projection-for-Efficient-LLM-Training), and how this follows it:
  * torchrun_main.py wraps the model with peft `LoraConfig(r=8, lora_alpha=16,
    use_dora=True)` — DoRA's W = m·(W₀ + s·BA)/‖W₀ + s·BA‖ with the norm per output row —
    and hands every nn.Linear under "attn"/"mlp" to its GaLore AdamW, i.e. the LoRA factors'
    gradients are low-rank projected (rank `--rank`). That is r > 0 here.
  * GradNormLoRP/LowRankWeightNormAdamW.py instead weight-normalises the full matrix
    (v = W, g = ‖v‖ per row) and projects v's gradient with GaLore. That is r = 0 here: V is
    the trained direction (initialised to W₀), projectable, and m its magnitude.
  * peft's DoRA treats ‖V‖ as a constant in backward (DoRA §4.3, to save memory); the
    paper's weight normalisation (Salimans & Kingma, 2016) differentiates through it — that
    is what conditions the gradient: ∇_V = (m/‖V‖)(I − V̂V̂ᵀ)∇_W per row. Default: through
    the norm (`detach_norm = False`); `detach_norm = True` is the peft behaviour.
  * A is initialised as peft's LoRA A (kaiming-uniform, a = √5) from a seeded generator;
    LoRA dropout (0.1 in the reference) is left out: the layer stays a deterministic
    function of its weights, so it merges exactly.
"""
from __future__ import annotations

import math

import torch

EPS = 1e-12   # the reference's epsilon in WeightNormGaLore.weight_norm_decompose


def _wide(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16 weights (a bf16 sum of squares keeps ~3 digits), else the dtype."""
    return torch.promote_types(dtype, torch.float32)


def row_norm(v: torch.Tensor) -> torch.Tensor:
    """‖v‖ of each output row of a (out×in) matrix, at least in fp32, shape (out,)."""
    return torch.linalg.vector_norm(v.to(_wide(v.dtype)), dim=1)


def direction(w0: torch.Tensor, b: torch.Tensor | None, a: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """V = W₀ + s·B·A (or W₀ itself when there are no factors)."""
    if b is None:
        return w0
    return w0 + scale * (b @ a)


def dense_weight(w0: torch.Tensor, magnitude: torch.Tensor, b: torch.Tensor | None,
                 a: torch.Tensor | None, scale: float, detach_norm: bool = False) -> torch.Tensor:
    """W = m ⊙ V / ‖V‖_row, in V's dtype (computed at least in fp32)."""
    v = direction(w0, b, a, scale)
    norm = row_norm(v) + EPS
    if detach_norm:
        norm = norm.detach()
    wide = _wide(v.dtype)
    return (v.to(wide) * (magnitude.to(wide) / norm)[:, None]).to(v.dtype)


def init_factors(out_features: int, in_features: int, rank: int, generator: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A): B = 0 (out×r), A ~ kaiming_uniform(a=√5) (r×in), as peft's LoRA init:
    bound = √(6 / ((1 + a²)·fan_in)) = 1/√in for a = √5."""
    bound = 1.0 / math.sqrt(in_features)
    a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    return torch.zeros(out_features, rank, dtype=dtype), a.to(dtype)


def initial_magnitude(w0: torch.Tensor) -> torch.Tensor:
    """m₀ = ‖W₀‖_row, so that W = W₀ at initialisation."""
    return (row_norm(w0) + EPS).to(w0.dtype)
