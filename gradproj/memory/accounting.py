"""Tensor accounting: weights, gradients, optimizer states, projector bases, scales.

One source of truth: every byte here is a tensor that training's own code creates, built
on the meta device (shapes and dtypes, no storage):
  * optimizer states — `LowRankOptimizer.init_state(p, group)`, the call a real step makes
    on its first visit to p, then the residual's `combine` on meta tensors (Fira and
    APOLLO add their 4-byte limited norm there);
  * projector bases — `projector.basis_nbytes(...)` for the side `optimizer.side(p, group)`
    picks (the numbers `proj_type="auto"` minimises), split into codes and scales by
    storing a meta basis through `projector.store_basis`, the method `fit` stores with;
  * weights — the model's parameters and buffers as built (INT8 codes and their scales
    when Linear layers were quantized);
  * gradients — one per trained parameter, in its dtype (`.grad` has the parameter's
    dtype), or what per-layer mode keeps alive (see `gradient_bytes`).
Quantization scales are reported on their own: a floating tensor stored next to a
`<key>.codes` tensor (q8/q4 `absmax`, INT4 basis `scale`/`min`) or next to integer
weights in one module (INT8 weight scales).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..optimizers.lowrank import LowRankOptimizer, matrix_shape
from ..parametrizations.base import ParametrizedLinear
from ..projectors.base import basis_shape, low_rank_shape, sides_of
from ..quant.linear import compute_dtype, is_quantized


def nbytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor's elements (works on meta tensors)."""
    return t.numel() * t.element_size()


def grad_nbytes(p: torch.Tensor) -> int:
    """Bytes of p's `.grad`: its `grad_dtype` (fp32 for INT8 QuantLinear weights)."""
    dtype = getattr(p, "grad_dtype", None) or p.dtype
    return p.numel() * torch.empty((), dtype=dtype).element_size()


def _is_integer(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def split_codes_and_scales(tensors: dict) -> tuple[int, int]:
    """(value/code bytes, scale bytes) of a state-like dict of tensors and scalars.

    A floating tensor under `<prefix>.<name>` is a scale when `<prefix>.codes` exists and is
    an integer tensor: q8/q4 moments (`exp_avg.absmax`), INT4 bases (`proj_left.scale`).
    """
    codes = {key.rsplit(".", 1)[0] for key, t in tensors.items()
             if key.endswith(".codes") and torch.is_tensor(t) and _is_integer(t)}
    values = scales = 0
    for key, t in tensors.items():
        if not torch.is_tensor(t):
            continue
        prefix = key.rsplit(".", 1)[0] if "." in key else None
        if prefix in codes and not key.endswith(".codes") and t.dtype.is_floating_point:
            scales += nbytes(t)
        else:
            values += nbytes(t)
    return values, scales


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(weight bytes, scale bytes) of the model's parameters and buffers.

    In a module that holds an integer tensor directly (an INT8 Linear), its floating
    tensors other than a bias are that weight's quantization scales. A parametrized
    layer says itself what its tensors are (`byte_breakdown`; its "scales" are scales).
    """
    values = scales = 0
    for module in model.modules():
        if isinstance(module, ParametrizedLinear):
            parts = module.byte_breakdown()
            scales += parts.get("scales", 0)
            values += sum(parts.values()) - parts.get("scales", 0)
            continue
        own = dict(module.named_parameters(recurse=False))
        own.update(module.named_buffers(recurse=False))
        quantized = any(_is_integer(t) for t in own.values())
        for name, t in own.items():
            if quantized and t.dtype.is_floating_point and name != "bias":
                scales += nbytes(t)
            else:
                values += nbytes(t)
    return values, scales


def parametrization_bytes(model: torch.nn.Module) -> dict[str, int]:
    """{category: bytes} summed over the model's parametrized layers (`byte_breakdown`):
    frozen weights, factors, sparse values and indices, INT8 codes and scales, ..."""
    out: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, ParametrizedLinear):
            for key, value in module.byte_breakdown().items():
                out[key] = out.get(key, 0) + value
    return out


@dataclass
class SideChoice:
    """Which side a projected weight uses, and why (one row per distinct weight shape)."""

    name: str                    # parameter name, layer index replaced by '*'
    shape: tuple[int, int]
    count: int
    side: str
    proj_type: str
    costs: dict = field(default_factory=dict)   # side -> state + basis bytes, per weight

    @property
    def reason(self) -> str:
        m, n = self.shape
        if self.proj_type == "auto":
            other = "left" if self.side == "right" else "right"
            mine, theirs = self.costs[self.side], self.costs[other]
            if mine == theirs:
                return f"auto: tie at {mine:,} B of states + basis, keeps std ({self.side})"
            return (f"auto: {self.side} {mine:,} B < {other} {theirs:,} B of states + basis "
                    f"(-{100 * (theirs - mine) / theirs:.0f}%)")
        if self.proj_type in ("std", "reverse_std"):
            rel = "m >= n" if m >= n else "m < n"
            return f"{self.proj_type}: {rel} ({m}x{n})"
        return f"{self.proj_type}: forced"

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "count": self.count,
                "side": self.side, "proj_type": self.proj_type, "reason": self.reason,
                "bytes_per_side": dict(self.costs)}


@dataclass
class OptimizerBytes:
    states: int = 0            # moment values/codes and other state tensors
    state_scales: int = 0      # q8/q4 absmax
    bases: int = 0             # basis values/codes
    basis_scales: int = 0      # INT4 basis scale + min
    low_rank_weights: int = 0
    full_rank_weights: int = 0
    sides: list[SideChoice] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.states + self.state_scales + self.bases + self.basis_scales


_LAYER_INDEX = re.compile(r"\.\d+\.")


def _basis_bytes(projector, shape, rank: int, side: str, dtype) -> tuple[int, int]:
    """(codes, scales) of the basis `fit` stores, by the projector's own `basis_nbytes`."""
    total = projector.basis_nbytes(shape, rank, side, dtype)
    if total == 0:  # seed-regenerated projectors (gaussian, sparse) store no basis
        return 0, 0
    stored: dict = {"rank": rank}
    try:
        for one in sides_of(side):
            meta = torch.empty(basis_shape(shape, rank, one), device="meta")
            projector.store_basis(stored, one, meta, dtype)
    except (RuntimeError, NotImplementedError):  # store_basis not traceable on meta
        return total, 0
    values, scales = split_codes_and_scales(stored)
    if values + scales != total:  # trust basis_nbytes, the number "auto" decides by
        return total, 0
    return values, scales


def _residual_state(optimizer, p, group, state, side) -> dict:
    """State a residual creates on its first step (Fira/APOLLO's limited norm), on meta."""
    _, _, _, residual = optimizer.plugins(group)
    shape = matrix_shape(p)
    low = torch.zeros(low_rank_shape(shape, group["rank"], side), device="meta")
    probe = dict(state)
    try:
        residual.combine(torch.zeros(shape, device="meta"), low, low.clone(),
                         lambda x: torch.zeros(shape, device="meta"), probe, group)
    except RuntimeError:  # a residual that needs real values (.item()) adds nothing here
        return {}
    return {k: v for k, v in probe.items() if k not in state}


def optimizer_bytes(optimizer: LowRankOptimizer, names: dict | None = None) -> OptimizerBytes:
    """Bytes of every parameter's optimizer state, allocated on meta by `init_state`.

    The optimizer's parameters must be on the meta device; its state is cleared after,
    so the optimizer is left as built.
    """
    names = names or {}
    out = OptimizerBytes()
    rows: dict[tuple, SideChoice] = {}
    for group in optimizer.param_groups:
        _, projector, _, _ = optimizer.plugins(group)
        for p in group["params"]:
            if p.device.type != "meta":
                raise ValueError("optimizer_bytes: parameters must be on the meta device "
                                 f"(got {p.device}); build the model with device='meta'")
            state = optimizer.init_state(p, group)
            if optimizer.is_low_rank(p, group):
                side = optimizer.side(p, group)
                state.update(_residual_state(optimizer, p, group, state, side))
                codes, scales = _basis_bytes(projector, matrix_shape(p), group["rank"], side,
                                             compute_dtype(p))
                out.bases += codes
                out.basis_scales += scales
                out.low_rank_weights += 1
                _record_side(rows, optimizer, p, group, side, names.get(p, "?"))
            else:
                out.full_rank_weights += 1
            values, scales = split_codes_and_scales(state)
            out.states += values
            out.state_scales += scales
            optimizer.state.pop(p, None)
    out.sides = list(rows.values())
    return out


def _record_side(rows, optimizer, p, group, side, name) -> None:
    shape = matrix_shape(p)
    key = (_LAYER_INDEX.sub(".*.", name), shape, side)
    if key in rows:
        rows[key].count += 1
        return
    rule, projector, fmt, _ = optimizer.plugins(group)
    rank = group["rank"]
    # the same two terms LowRankOptimizer.side adds up to decide "auto"
    costs = {s: rule.state_nbytes(low_rank_shape(shape, rank, s), fmt)
             + projector.basis_nbytes(shape, rank, s, compute_dtype(p)) for s in ("left", "right")}
    rows[key] = SideChoice(name=key[0], shape=shape, count=1, side=side,
                           proj_type=group["proj_type"], costs=costs)


def gradient_bytes(optimizer: LowRankOptimizer, *, per_layer: bool = False,
                   grad_accum: int = 1) -> int:
    """Bytes of gradients alive at the peak of backward.

    Whole-model mode: every trained parameter's `.grad`. Per-layer mode (optimizer in
    backward, `train/perlayer.py`): each `.grad` is freed in its post-accumulate hook, so
    with one micro-batch only the largest one is alive; with k > 1 the weights that
    cannot accumulate after projection keep their full `.grad` across micro-batches,
    projected weights keep an fp32 sum of R (their low-rank shape), and one projected
    weight's `.grad` is alive at a time on top. All three coexist on every micro-batch
    but the first and the last, so the figure is exact for k >= 3 and a bound for k = 2
    (the last micro-batch steps and frees each full-rank weight as its gradient completes).
    """
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]
              if p.requires_grad or is_quantized(p)]
    if not per_layer:
        return sum(grad_nbytes(p) for p, _ in params)
    if grad_accum <= 1:
        return max((grad_nbytes(p) for p, _ in params), default=0)
    kept = transient = sums = 0
    for p, group in params:
        if optimizer.accumulates_low_rank(p, group):
            side = optimizer.side(p, group)
            sums += 4 * torch.Size(low_rank_shape(matrix_shape(p), group["rank"], side)).numel()
            transient = max(transient, grad_nbytes(p))
        else:
            kept += grad_nbytes(p)
    return kept + transient + sums


__all__ = ["OptimizerBytes", "SideChoice", "grad_nbytes", "gradient_bytes", "nbytes", "optimizer_bytes",
           "parametrization_bytes", "split_codes_and_scales", "weight_bytes"]
