"""SLTrain with INT8 weights: B, A and S's values stored as Q-GaLore's group-wise INT8.

`[model.parametrization] kind = "sltrain"`, `int8 = true` (or the `q-galore` preset's
`quantize_weights = true` with kind "sltrain"). What the paper's 7B "up to 73 %" figure
quantizes is the *optimizer states* (the authors' code: bitsandbytes `Adam8bit`, per layer
through post-accumulate-grad hooks — `state_format = "q8"` + `per_layer` here; the
`SLTrain 8-bit` row of `python -m gradproj.memory.tables`). This module goes one step
further, as Q-GaLore does for dense weights: every trained tensor of the layer is INT8
codes (1 byte) + one fp32 scale per `group_size` (256) values, trained in place by the
optimizer with stochastic rounding (`quant.linear.apply_quantized_updates`: dequantize,
step in fp32, re-quantize with noise seeded by (seed, step), so a resume is bit-exact).
At 7B (rank 1024, δ 0.05) that is 3.08 B trained values at 1.016 bytes instead of 2.

Forward/backward is one autograd Function, as the float layer's: W = (α/r)·B·A + S is
formed from the dequantized tensors in the compute dtype inside forward and again inside
backward; autograd keeps x and the three scale vectors, never W or the support. Backward
writes fp32 gradients of B, A and the values into the codes' `.grad` (their `grad_dtype`
is fp32), as QuantLinear does, so accumulation, clipping, per-layer hooks and DDP's
`average_unreduced_grads` treat them like Q-GaLore's weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant.int8 import int8_dequantize, int8_quantize
from ..quant.linear import Int8Owner, bind_int8
from .base import ParametrizedLinear, nbytes
from .sltrain import SLTrainLinear, sparse_lowrank_weight
from .sparse_support import support

CODES = ("lora_B", "lora_A", "sparse_values")


class _SLTrainInt8Fn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, scales, module, anchored):
        w = module.weight_from(scales).to(x.dtype)
        ctx.save_for_backward(x, *scales)
        ctx.module, ctx.anchored = module, anchored
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, *scales = ctx.saved_tensors
        module = ctx.module
        b, a, _ = module.dequantized(scales)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0] and not ctx.anchored:
            grad_x = (g2 @ module.weight_from(scales).to(g2.dtype)).view(
                *grad_out.shape[:-1], module.in_features)
        if ctx.needs_input_grad[1]:
            grad_bias = g2.sum(0)
        # fp32 gradients whatever the compute dtype, as QuantLinear's; m×n, freed on return
        grad_w = g2.float().T @ x.reshape(-1, x.shape[-1]).float()
        s = module.scaling
        grads = ((grad_w @ a.float().T) * s, (b.float().T @ grad_w) * s,
                 grad_w.view(-1).gather(0, module.support()))
        module._bind()
        for name, g in zip(CODES, grads):
            p = getattr(module, name)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        return grad_x, grad_bias, None, None, None


class SLTrainInt8Linear(ParametrizedLinear, Int8Owner):
    """(α/r)·B·A + S with B, A and S's values as INT8 codes + fp32 group scales."""

    def __init__(self, layer: SLTrainLinear, group_size: int):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.rank, self.alpha, self.density = layer.rank, layer.alpha, layer.density
        self.scaling, self.count = layer.scaling, layer.count
        self.group_size = group_size
        self.compute_dtype = layer.lora_A.dtype
        self.projected = layer.projected
        for name in CODES:
            w = getattr(layer, name).detach()
            groups = -(-w.numel() // group_size)
            setattr(self, name, nn.Parameter(torch.zeros(w.shape, dtype=torch.int8, device=w.device),
                                             requires_grad=False))
            self.register_buffer(f"{name}_scale", torch.ones(groups, dtype=torch.float32,
                                                            device=w.device))
            if w.device.type != "meta":  # round to nearest, as QuantLinear.from_linear
                codes, scale = int8_quantize(w, group_size)
                getattr(self, name).data.copy_(codes)
                getattr(self, f"{name}_scale").copy_(scale)
        self.bias = layer.bias
        self.register_buffer("sparse_seed", layer.sparse_seed.clone())
        self._bind()

    def _bind(self) -> None:
        for name in CODES:
            bind_int8(getattr(self, name), self, self.compute_dtype)

    def int8_scale(self, p: torch.Tensor) -> torch.Tensor:
        for name in CODES:
            if getattr(self, name) is p:
                return getattr(self, f"{name}_scale")
        raise ValueError(f"{tuple(p.shape)} tensor is not an INT8 tensor of this SLTrain layer")

    def scales(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"{name}_scale") for name in CODES)

    def support(self) -> torch.Tensor:
        seed = 0 if self.sparse_seed.device.type == "meta" else int(self.sparse_seed)
        return support(self.out_features * self.in_features, self.count, seed,
                       self.lora_A.device)

    def dequantized(self, scales=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, A, S's values) in the compute dtype, from the codes and `scales`."""
        scales = self.scales() if scales is None else scales
        return tuple(int8_dequantize(getattr(self, n), s, self.group_size).to(self.compute_dtype)
                     for n, s in zip(CODES, scales))

    def weight_from(self, scales=None) -> torch.Tensor:
        b, a, v = self.dequantized(scales)
        return sparse_lowrank_weight(b, a, v, self.support(), self.scaling,
                                     (self.out_features, self.in_features))

    def dense_weight(self) -> torch.Tensor:
        return self.weight_from()

    @torch.no_grad()
    def float_twin(self) -> SLTrainLinear:
        """The float SLTrain layer holding the dequantized tensors (same names, same
        support): what this layer computes, with autograd's gradients (the suite's
        reference), or a way back to float training."""
        plain = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.lora_A.device, dtype=self.compute_dtype)
        twin = SLTrainLinear(plain, self.rank, self.alpha, self.density, int(self.sparse_seed),
                             bool(self.projected))
        for name, value in zip(CODES, self.dequantized()):
            getattr(twin, name).copy_(value)
        if self.bias is not None:
            twin.bias.copy_(self.bias)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._bind()
        anchored = False
        if torch.is_grad_enabled() and not x.requires_grad and not (
                self.bias is not None and self.bias.requires_grad):
            # backward runs only if an input needs a gradient: x carries the graph (its
            # gradient is never computed) so the INT8 tensors still receive theirs
            x = x.detach().requires_grad_(True)
            anchored = True
        return _SLTrainInt8Fn.apply(x, self.bias, self.scales(), self, anchored)

    def byte_breakdown(self) -> dict[str, int]:
        out = {"codes": sum(nbytes(getattr(self, n)) for n in CODES),
               "scales": sum(nbytes(s) for s in self.scales()),
               "sparse_indices": 0, "seeds": nbytes(self.sparse_seed)}
        if self.bias is not None:
            out["bias"] = nbytes(self.bias)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, alpha={self.alpha}, density={self.density}, "
                f"nonzeros={self.count}, int8 group={self.group_size}, "
                f"bias={self.bias is not None}")


__all__ = ["SLTrainInt8Linear"]
