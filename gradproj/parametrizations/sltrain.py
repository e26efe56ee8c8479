"""`sltrain`: W = (α/r)·B·A + S, S sparse on a fixed random support (Han et al., NeurIPS 2024).

Follows the authors' code (github.com/andyjm3/SLTrain, `SpLoRaLinear`): B m×r = 0,
A r×n Kaiming-uniform (a = √5), scaling α/r (their 60M recipe: r 128, α 32, δ 0.03,
lr 3e-3), S has `int(δ·m·n)` nonzeros with values uniform in ±1/√n, and only the values
are trained: the support is fixed. At density 0 (pure low-rank B·A, the papers' "Low-Rank"
baseline) B starts Kaiming-uniform too, U(±1/√r), as in ReLoRA's `lora_only` mode that
baseline comes from: with B = 0 and no S every attention and MLP weight is 0, each
factor's gradient passes through another zero weight, and the body never trains (the
tiny model stayed at eval loss 2.3427 at lr 1e-3 and 3e-3 alike).

Two departures, both memory: the support is regenerated from a per-layer seed
(`sparse_support.support`, a keyed permutation) instead of stored as an int64 buffer
(8 bytes per nonzero; only the 8-byte seed is kept, as a 0-d buffer, so a checkpoint
fixes it), and the forward/backward is a custom
autograd Function in PyTorch, as their C++ extension does: the dense m×n weight is
formed in forward, used, and dropped; backward rebuilds it (support included). Saved
for backward: the input, as for any Linear — never W, never the positions.

Parameters per layer: r·(m+n) + δ·m·n (+ bias). Every trainable tensor composes with
the optimizer as any other: A and B are 2-D (projected when `project_factors = true`),
the values 1-D (full rank, any state format), and per-layer updates see their
gradients arrive in backward as usual. `int8 = true` stores all three as INT8 codes +
group scales, stepped with stochastic rounding (`sltrain_int8.py`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import PARAMETRIZATIONS
from .base import Parametrization, ParametrizedLinear, nbytes
from .lora import SEED_STRIDE
from .sparse_support import support


def sparse_lowrank_weight(b, a, values, index, scaling, shape) -> torch.Tensor:
    """Dense (α/r)·B·A + S for a support `index` (flat positions) holding `values`."""
    w = (b @ a) * scaling if scaling != 1.0 else b @ a
    w.view(-1).index_add_(0, index, values.to(w.dtype))
    return w.view(shape)


class _SLTrainFn(torch.autograd.Function):
    """y = x·Wᵀ + b with W = (α/r)·B·A + S formed inside forward and again inside backward:
    between them autograd keeps x (as F.linear would) and nothing else — no W, no support
    (re-drawn from the seed: at 7B, 324M positions, 2.6 GB of int64 saved otherwise)."""

    @staticmethod
    def forward(ctx, x, b, a, values, bias, numel_seed, scaling):
        numel, count, seed = numel_seed
        shape = (b.shape[0], a.shape[1])
        w = sparse_lowrank_weight(b, a, values, support(numel, count, seed, x.device), scaling, shape)
        ctx.save_for_backward(x, b, a, values)
        ctx.scaling, ctx.has_bias, ctx.numel_seed = scaling, bias is not None, numel_seed
        return F.linear(x, w.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, b, a, values = ctx.saved_tensors
        s = ctx.scaling
        index = support(*ctx.numel_seed, x.device)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_b = grad_a = grad_v = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = sparse_lowrank_weight(b, a, values, index, s, (b.shape[0], a.shape[1]))
            grad_x = (g2 @ w.to(g2.dtype)).view(*grad_out.shape[:-1], w.shape[1])
        if any(ctx.needs_input_grad[1:4]):
            grad_w = g2.T @ x.reshape(-1, x.shape[-1]).to(g2.dtype)   # m×n, freed on return
            if ctx.needs_input_grad[1]:
                grad_b = (grad_w @ a.to(grad_w.dtype).T) * s
            if ctx.needs_input_grad[2]:
                grad_a = (b.to(grad_w.dtype).T @ grad_w) * s
            if ctx.needs_input_grad[3]:
                grad_v = grad_w.view(-1).gather(0, index)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2.sum(0)
        return grad_x, grad_b, grad_a, grad_v, grad_bias, None, None


class SLTrainLinear(ParametrizedLinear):
    """(α/r)·B·A + S with S on a seeded random support; see the module doc."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, density: float, seed: int,
                 project_factors: bool = False):
        super().__init__()
        w = linear.weight.detach()
        m, n = linear.out_features, linear.in_features
        self.in_features, self.out_features = n, m
        self.rank, self.alpha, self.density = rank, alpha, density
        self.scaling = alpha / rank
        self.count = int(density * m * n)
        kw = dict(dtype=w.dtype, device=w.device)
        self.lora_A = nn.Parameter(torch.empty(rank, n, **kw))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, **kw))
        self.sparse_values = nn.Parameter(torch.empty(self.count, **kw))
        self.bias = (nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None
                     else None)
        self.register_buffer("sparse_seed", torch.tensor(seed, dtype=torch.int64, device=w.device))
        if w.device.type != "meta":
            gen = torch.Generator(device=w.device).manual_seed(seed)
            bound = 1 / math.sqrt(n)  # A: kaiming_uniform_(a=√5) = U(±1/√n); S: U(±1/√n)
            with torch.no_grad():
                self.lora_A.uniform_(-bound, bound, generator=gen)
                self.sparse_values.uniform_(-bound, bound, generator=gen)
                if self.count == 0:  # pure B·A: see the module doc
                    self.lora_B.uniform_(-1 / math.sqrt(rank), 1 / math.sqrt(rank), generator=gen)
        self.projected = ("lora_A", "lora_B") if project_factors else ()

    def support(self) -> torch.Tensor:
        """Flat positions of S's nonzeros (regenerated from `sparse_seed`)."""
        return support(self.out_features * self.in_features, self.count,
                       int(self.sparse_seed), self.lora_A.device)

    def dense_weight(self) -> torch.Tensor:
        return sparse_lowrank_weight(self.lora_B, self.lora_A, self.sparse_values, self.support(),
                                     self.scaling, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seed = 0 if self.sparse_seed.device.type == "meta" else int(self.sparse_seed)
        return _SLTrainFn.apply(x, self.lora_B, self.lora_A, self.sparse_values, self.bias,
                                (self.out_features * self.in_features, self.count, seed),
                                self.scaling)

    def byte_breakdown(self) -> dict[str, int]:
        out = {"factors": nbytes(self.lora_A) + nbytes(self.lora_B),
               "sparse_values": nbytes(self.sparse_values), "sparse_indices": 0,
               "seeds": nbytes(self.sparse_seed)}
        if self.bias is not None:
            out["bias"] = nbytes(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}, density={self.density}, "
                f"nonzeros={self.count}, bias={self.bias is not None}")


@PARAMETRIZATIONS.register("sltrain")
class SLTrain(Parametrization):
    """SLTrain (Han et al. 2024): W = (alpha/r)·B·A + S, S on a seeded random support (density 0.03); int8 = true: B, A, S as INT8."""

    # int8: B, A and S's values as INT8 codes + one fp32 scale per group_size values,
    # trained with stochastic rounding (sltrain_int8.py; Q-GaLore's group 256)
    defaults = {"rank": 128, "alpha": 32.0, "density": 0.03, "seed": 0, "project_factors": False,
                "int8": False, "group_size": 256}

    def validate(self) -> None:
        self._int("rank")
        self._number("alpha", 0)
        self._number("density", 0, 1, open_lo=False)  # 0: pure low-rank B·A (their baseline)
        self._int("seed", 0)
        for key in ("project_factors", "int8"):
            if not isinstance(self.options[key], bool):
                raise ValueError(f"option '{key}' must be true or false, got "
                                 f"{self.options[key]!r}")
        self._int("group_size")

    def with_int8_weights(self, group_size: int) -> "SLTrain":
        return SLTrain(**{**self.options, "int8": True, "group_size": group_size})

    def convert(self, linear: nn.Linear, index: int) -> SLTrainLinear:
        o = self.options
        if o["rank"] > min(linear.in_features, linear.out_features):
            raise ValueError(f"option 'rank' must be <= min(in, out) = "
                             f"{min(linear.in_features, linear.out_features)} of every targeted "
                             f"layer, got {o['rank']}")
        layer = SLTrainLinear(linear, o["rank"], float(o["alpha"]), float(o["density"]),
                              o["seed"] + SEED_STRIDE * index, o["project_factors"])
        if not o["int8"]:
            return layer
        from .sltrain_int8 import SLTrainInt8Linear
        return SLTrainInt8Linear(layer, o["group_size"])


__all__ = ["SLTrain", "SLTrainLinear", "sparse_lowrank_weight"]
