"""`QuantLinear`: an nn.Linear whose weight is stored INT8 group-wise and trained in place.

The weight is an int8 `nn.Parameter` (codes, requires_grad False: autograd cannot
differentiate integer tensors) plus an fp32 buffer `weight_scale`. Forward dequantizes
to the input's dtype; backward computes the fp32 weight gradient and accumulates it in
`weight.grad` (the parameter's `grad_dtype` is set to fp32, so a float gradient on an
int8 tensor is allowed), so `zero_grad`, gradient accumulation and clipping work as
for any weight. `LowRankOptimizer` recognises such a parameter (`is_quantized`) and
applies its update as `apply_quantized_updates`: dequantize, W ← W − lr·U − lr·wd·W in
fp32, re-quantize with stochastic rounding seeded by the parameter's
seed and step — so a resumed run draws the same rounding noise (bit-exact resume) and
the optimizer state stays tensors and plain ints.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import nn

from ..kernels.int8_sr import int8_dequantize_rows, int8_sr_quantize_rows, int8_step_rows
from ..seeds import rounding_seed
from ..stacked_state import StackedState
from .int8 import DEFAULT_GROUP, int8_dequantize, int8_quantize

OWNER_ATTR = "quant_owner"      # weakref to the module owning an int8 weight (`Int8Owner`)
DTYPE_ATTR = "quant_dtype"      # dtype the weight computes in (and its projector basis uses)


def is_quantized(p: torch.Tensor) -> bool:
    return getattr(p, OWNER_ATTR, None) is not None


def compute_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype a weight computes in: its own, or a quantized weight's dequantized dtype."""
    return getattr(p, DTYPE_ATTR, p.dtype)


def bind_int8(p: torch.Tensor, owner: Int8Owner, dtype: torch.dtype) -> None:
    """Mark `p` (int8 codes) as an INT8 weight of `owner` computing in `dtype`; its float
    gradient (written by the owner's backward) is fp32."""
    setattr(p, OWNER_ATTR, weakref.ref(owner))
    setattr(p, DTYPE_ATTR, dtype)
    if p.grad_dtype != torch.float32:
        p.grad_dtype = torch.float32


class _QuantLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, weight, scale, module, anchored):
        w = int8_dequantize(weight, scale, module.group_size).to(x.dtype)
        ctx.save_for_backward(x, scale)
        ctx.weight, ctx.module, ctx.anchored = weight, module, anchored
        return nn.functional.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale = ctx.saved_tensors
        weight, module = ctx.weight, ctx.module
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0] and not ctx.anchored:
            w = int8_dequantize(weight, scale, module.group_size).to(grad_out.dtype)
            grad_x = grad_out @ w
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        # fp32 accumulation whatever the compute dtype, as bf16 autocast does for weights
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
        module._bind()
        if weight.grad is None:
            weight.grad = grad_w
        else:
            weight.grad.add_(grad_w)
        return grad_x, grad_bias, None, None, None, None


class Int8Owner:
    """What the optimizer reads from the module owning INT8 parameters (their OWNER_ATTR):
    `group_size` and, per parameter, `int8_scale(p)` (its fp32 group scales, updated in
    place). QuantLinear owns one (its weight); SLTrain's INT8 variant owns B, A and S."""

    group_size: int

    def int8_scale(self, p: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class QuantLinear(nn.Module, Int8Owner):
    """Linear layer with INT8 group-wise weights (group 256), updated with stochastic rounding."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = DEFAULT_GROUP, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not hasattr(torch.Tensor, "grad_dtype"):
            # a float gradient on an int8 weight needs Tensor.grad_dtype (tested on 2.11, 2.13)
            raise RuntimeError(f"QuantLinear needs a torch with Tensor.grad_dtype; this is {torch.__version__}")
        if not isinstance(group_size, int) or group_size <= 0:
            raise ValueError(f"option 'weight_group_size' must be a positive integer, got {group_size!r}")
        self.in_features, self.out_features = in_features, out_features
        self.group_size = group_size
        self.compute_dtype = dtype
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        groups = -(-in_features * out_features // group_size)
        self.register_buffer("weight_scale", torch.ones(groups, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._bind()

    def _bind(self) -> None:
        """(Re)attach the parameter attributes the optimizer reads; copies lose them."""
        bind_int8(self.weight, self, self.compute_dtype)

    def int8_scale(self, p: torch.Tensor) -> torch.Tensor:
        return self.weight_scale

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP) -> "QuantLinear":
        w = linear.weight.detach()
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                group_size=group_size, dtype=w.dtype, device=w.device)
        q.set_weight(w)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
            q.bias.requires_grad_(linear.bias.requires_grad)
        return q

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor, seed: int | None = None) -> None:
        """Quantize `w` into this layer: round to nearest, or stochastically with `seed`."""
        codes, scale = int8_quantize(w, self.group_size, seed)
        self.weight.data.copy_(codes)
        self.weight_scale.copy_(scale)

    def dequantized_weight(self) -> torch.Tensor:
        return int8_dequantize(self.weight, self.weight_scale, self.group_size).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._bind()
        anchored = False
        if torch.is_grad_enabled() and not x.requires_grad and not (
                self.bias is not None and self.bias.requires_grad):
            # backward only runs if some input needs a gradient: let x carry the graph
            # (its gradient is never computed) so the weight still receives one
            x = x.detach().requires_grad_(True)
            anchored = True
        return _QuantLinearFn.apply(x, self.bias, self.weight, self.weight_scale, self, anchored)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 group={self.group_size}, "
                f"compute={str(self.compute_dtype).replace('torch.', '')}")


def quantize_weights(model: nn.Module, targets: Sequence[str] = ("attn", "mlp"),
                     group_size: int = DEFAULT_GROUP) -> nn.Module:
    """Replace, in place, every nn.Linear whose qualified name contains a target by a QuantLinear.

    Same name matching as `param_groups` (substring of the module's name), so the layers
    quantized are exactly the ones projected. The `int8` parametrization does the work
    (its layers are QuantLinear subclasses). Returns `model`.
    """
    from ..parametrizations import apply_parametrization, linear_module_names
    apply_parametrization(model, {"kind": "int8", "group_size": group_size},
                          linear_module_names(model, targets))
    return model


@torch.no_grad()
def apply_quantized_updates(params: list[torch.Tensor], update: torch.Tensor,
                            state: StackedState, group: dict, finish=None) -> None:
    """W ← W − lr·U − lr·wd·W on k INT8 weights of one shape (U stacked k×…): dequantize,
    step in fp32, re-quantize with stochastic rounding seeded by each weight's seed and step.

    The k weights go as one stack (one dequantize, one update, one stochastic rounding of
    k counter streams), giving each weight the codes it would get alone; on CPU, unless a
    rule `finish`es the update, the whole chain is one C pass a group with the same codes
    (`kernels/int8_sr.py`'s `int8_step_rows`). `state` holds the weights' states (seed
    and step).
    """
    modules = [getattr(p, OWNER_ATTR)() for p in params]
    if any(m is None for m in modules):
        raise ValueError("quantized weight lost its owning module (was the module deleted?)")
    size = modules[0].group_size
    # plain ints: the Triton kernel takes its keys as launch arguments (no copy to the GPU)
    seeds = [rounding_seed(s["seed"], s["step"]) for s in state.states]
    lr, decay = group["lr"], group["weight_decay"]
    if any(m.group_size != size for m in modules):
        raise ValueError("INT8 weights of one shape must share one weight_group_size")
    own_scales = [m.int8_scale(p) for m, p in zip(modules, params)]
    if finish is None and int8_step_rows(params, own_scales, update, lr, decay, seeds, size):
        return  # on CPU the chain below in one C pass a group: the same codes and scales
    codes = params[0].unsqueeze(0) if len(params) == 1 else torch.stack(params)
    scales = torch.stack(own_scales)
    w = int8_dequantize_rows(codes, scales, size)
    if finish is not None:  # a rule that finishes the update owns its decay (rules/base.py)
        update, decay = finish(w, update.reshape(w.shape).float()), 0.0
    w.add_(update.reshape(w.shape).float(), alpha=-lr)
    if decay:
        w.add_(w, alpha=-lr * decay)  # as the float path: after the step
    codes, scales = int8_sr_quantize_rows(w, seeds, size)
    torch._foreach_copy_(params, codes.unbind(0))
    torch._foreach_copy_(own_scales, scales.unbind(0))


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of all QuantLinear weights (codes + scales)."""
    return sum(m.weight.numel() + 4 * m.weight_scale.numel()
               for m in model.modules() if isinstance(m, QuantLinear))


__all__ = ["Int8Owner", "QuantLinear", "apply_quantized_updates", "bind_int8", "compute_dtype", "int8_weight_bytes",
           "is_quantized", "quantize_weights"]
