"""`gradnormlorp`: GradNormLoRP (Huang et al., 2024) — a weight-normalised matrix whose
low-rank components are trained with gradient low-rank projection.

    W = m ⊙ V / ‖V‖_row,   V = W₀ + (α/r)·B·A   (rank r ≥ 1: W₀ frozen; m, B, A trained)
                           V trained itself       (rank = 0: the full-matrix variant)

`weightnorm.py` has the math and what it takes from the authors' reference code. B and A
(or V when rank = 0) are the layer's `projected` tensors: in the low-rank group their
gradients are projected by the run's projector (GaLore's Uᵀ·G, ...), with any rule and
state format; m is trained at full rank. `merged()` is one dense nn.Linear with W (the
paper's "no additional inference cost").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PARAMETRIZATIONS
from . import weightnorm
from .base import Parametrization, ParametrizedLinear, nbytes


class _WeightNormLinear(torch.autograd.Function):
    """y = (x·Vᵀ) ⊙ (m/‖V‖_row) + b for the rank-0 variant, saving only x (as nn.Linear does):
    the m×n weight W is never formed in forward, and backward writes V's gradient from the
    one m×n product Gᵀx a dense Linear also computes. Weight normalisation's gradient
    (Salimans & Kingma, 2016, eq. 3), with G = Gᵀx the gradient W would get:
        ∇m = (G ⊙ V̂)·1,   ∇V = (m/‖V‖) ⊙ (G − V̂ ⊙ ∇m)   (without the V̂ term: norm detached).
    Without it, autograd through `dense_weight()` keeps V in fp32, W and their product alive
    for every layer: 66 GB at LLaMA 7B (bf16, 256 tokens), against 1.6 GB for AdamW's run."""

    @staticmethod
    def forward(ctx, x, v, magnitude, bias, detach_norm):
        norm = weightnorm.row_norm(v) + weightnorm.EPS           # fp32 (out,)
        c = magnitude.to(norm.dtype) / norm
        ctx.save_for_backward(x, v, magnitude, norm)
        ctx.detach_norm = detach_norm
        return torch.addcmul(bias, F.linear(x, v), c.to(x.dtype)) if bias is not None \
            else F.linear(x, v) * c.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, v, magnitude, norm = ctx.saved_tensors
        c = magnitude.to(norm.dtype) / norm
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (grad_out * c.to(grad_out.dtype)) @ v if ctx.needs_input_grad[0] else None
        gw = g.T.to(norm.dtype) @ x.reshape(-1, x.shape[-1]).to(norm.dtype)   # G, out×in
        vhat = v.to(norm.dtype) / norm[:, None]
        grad_m = (gw * vhat).sum(1)
        if not ctx.detach_norm:
            gw.addcmul_(vhat, grad_m[:, None], value=-1.0)
        gw.mul_(c[:, None])
        grad_b = g.sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, gw.to(v.dtype), grad_m.to(magnitude.dtype), grad_b, None


class GradNormLoRPLinear(ParametrizedLinear):
    """m ⊙ V/‖V‖_row with V = W₀ + s·B·A (rank ≥ 1) or V itself trained (rank 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, *,
                 bias: bool, detach_norm: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.scale, self.detach_norm = rank, scale, detach_norm
        empty = dict(dtype=dtype, device=device)
        self.magnitude = nn.Parameter(torch.empty(out_features, **empty))
        if rank:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **empty),
                                       requires_grad=False)   # W₀, frozen
            self.B = nn.Parameter(torch.empty(out_features, rank, **empty))
            self.A = nn.Parameter(torch.empty(rank, in_features, **empty))
            self.projected = ("B", "A")
        else:
            self.direction = nn.Parameter(torch.empty(out_features, in_features, **empty))
            self.projected = ("direction",)
        self.bias = nn.Parameter(torch.empty(out_features, **empty)) if bias else None

    def dense_weight(self) -> torch.Tensor:
        if self.rank:
            return weightnorm.dense_weight(self.weight, self.magnitude, self.B, self.A,
                                           self.scale, self.detach_norm)
        return weightnorm.dense_weight(self.direction, self.magnitude, None, None, 1.0,
                                       self.detach_norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rank:  # V = W₀ + s·BA is formed (m×n) and saved by autograd, as in peft's DoRA
            return F.linear(x, self.dense_weight(), self.bias)
        return _WeightNormLinear.apply(x, self.direction, self.magnitude, self.bias,
                                       self.detach_norm)

    def byte_breakdown(self) -> dict[str, int]:
        out = {"weights": nbytes(self.magnitude)}
        if self.rank:
            out["frozen"] = nbytes(self.weight)
            out["factors"] = nbytes(self.B) + nbytes(self.A)
        else:
            out["weights"] += nbytes(self.direction)
        if self.bias is not None:
            out["bias"] = nbytes(self.bias)
        return out

    def extra_repr(self) -> str:
        form = f"rank {self.rank}, scale {self.scale:g}" if self.rank else "full direction"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {form}"
                f"{', norm detached' if self.detach_norm else ''}")


@PARAMETRIZATIONS.register("gradnormlorp", aliases=("gradnorm-lorp",))
class GradNormLoRP(Parametrization):
    """GradNormLoRP (Huang et al. 2024): W = m ⊙ (W₀ + BA)/‖·‖_row; B, A (or V, rank 0) projected."""

    defaults = {
        "rank": 8,              # r of B·A (the paper's GLUE runs; the reference LoraConfig r=8);
                                # 0 = train the normalised direction V itself
        "alpha": 16.0,          # scale α/r = 2 (the reference LoraConfig lora_alpha=16)
        "detach_norm": False,   # True: ‖V‖ a constant in backward, as peft's DoRA
        "seed": 0,              # A's init: seeded by (seed, layer index)
    }

    def validate(self) -> None:
        self._int("rank", lo=0)
        self._number("alpha", 0.0)
        self._int("seed", lo=0)
        if not isinstance(self.options["detach_norm"], bool):
            raise ValueError(f"option 'detach_norm' must be true or false, got "
                             f"{self.options['detach_norm']!r}")

    def convert(self, linear: nn.Linear, index: int) -> GradNormLoRPLinear:
        w = linear.weight
        rank = self.options["rank"]
        if rank >= min(w.shape):
            raise ValueError(f"option 'rank' must be below min{tuple(w.shape)} of the targeted "
                             f"layer (use rank = 0 to train the full direction), got {rank}")
        scale = self.options["alpha"] / rank if rank else 1.0
        layer = GradNormLoRPLinear(linear.in_features, linear.out_features, rank, scale,
                                   bias=linear.bias is not None,
                                   detach_norm=self.options["detach_norm"],
                                   dtype=w.dtype, device=w.device)
        if w.is_meta:
            return layer
        with torch.no_grad():
            layer.magnitude.copy_(weightnorm.initial_magnitude(w))
            if rank:
                gen = torch.Generator().manual_seed(self.options["seed"] * 1_000_003 + index)
                b, a = weightnorm.init_factors(linear.out_features, linear.in_features, rank, gen)
                layer.weight.copy_(w)
                layer.B.copy_(b)
                layer.A.copy_(a)
            else:
                layer.direction.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
                layer.bias.requires_grad_(linear.bias.requires_grad)
        return layer


__all__ = ["GradNormLoRP", "GradNormLoRPLinear"]
