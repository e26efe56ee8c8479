"""`plan_memory`: a run spec's training memory, next to AdamW-BF16 and 8-bit Adam baselines.

Each plan builds the spec's model on the meta device, then the optimizer through the
spec's own path (`OptimizerSpec.build` → `build_optimizer`, which also converts Linear
layers to INT8 when the options ask), and reads every byte from the tensors training
would create (`accounting.py`) and from a meta trace of the forward (`activations.py`).

Baselines share the spec's model, micro-batch, sequence length and activation
checkpointing; they train BF16 weights with whole-model gradients (no per-layer mode)
and full-rank Adam states in bf16 ("adamw-bf16") or blockwise 8-bit ("adam-8bit", the
`q8` format: bitsandbytes' layout, fp32 below 4096 elements) — the baselines of the
GaLore paper's Figure 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..optimizers.lowrank import LowRankOptimizer
from .accounting import gradient_bytes, optimizer_bytes, parametrization_bytes, weight_bytes
from .activations import activation_bytes

COMPONENTS = ("weights", "gradients", "optimizer_states", "projector_bases",
              "quantization_scales", "activations")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Plan:
    """Bytes of one training setup. Components are disjoint; `total` is their sum."""

    label: str
    weights: int
    gradients: int
    optimizer_states: int
    projector_bases: int
    quantization_scales: int
    activations: int
    scales: dict = field(default_factory=dict)    # where the scales sit: weights/states/bases
    settings: dict = field(default_factory=dict)
    sides: list = field(default_factory=list)     # SideChoice rows (projected weights)
    activation_detail: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    parametrization: dict = field(default_factory=dict)  # byte_breakdown of parametrized layers

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    @property
    def optimizer_memory(self) -> int:
        """Everything in `optimizer.state`: states + bases + their quantization scales."""
        return (self.optimizer_states + self.projector_bases + self.scales.get("optimizer_states", 0)
                + self.scales.get("projector_bases", 0))

    def as_dict(self) -> dict:
        out = {name: getattr(self, name) for name in COMPONENTS}
        out["total"] = self.total
        out["optimizer_memory"] = self.optimizer_memory
        out["scales_by_owner"] = dict(self.scales)
        out["settings"] = dict(self.settings)
        out["activation_detail"] = dict(self.activation_detail)
        out["projection_sides"] = [s.as_dict() for s in self.sides]
        out["notes"] = list(self.notes)
        out["parametrization"] = dict(self.parametrization)
        return out


@dataclass
class MemoryPlan:
    """The spec's plan and its baselines, keyed as `--json` prints them."""

    spec: Plan
    baselines: dict[str, Plan]

    def reduction(self, baseline: str = "adamw-bf16", what: str = "optimizer_memory") -> float:
        """Fraction of the baseline's `what` saved by the spec (0.65 = 65 % less)."""
        base = getattr(self.baselines[baseline], what)
        return 1.0 - getattr(self.spec, what) / base if base else 0.0

    def as_dict(self) -> dict:
        return {"spec": self.spec.as_dict(),
                "baselines": {name: plan.as_dict() for name, plan in self.baselines.items()}}


def plan_setup(label: str, build_model: Callable[[], torch.nn.Module],
               build_optimizer: Callable[[torch.nn.Module], LowRankOptimizer], *,
               batch: int, seq_len: int, checkpointing: bool = False, per_layer: bool = False,
               grad_accum: int = 1, notes: Iterable[str] = ()) -> Plan:
    """Plan one setup: `build_model()` must return a model on the meta device."""
    model = build_model()
    optimizer = build_optimizer(model)  # may swap Linear layers for INT8 ones in place
    names = {p: name for name, p in model.named_parameters()}
    weights, weight_scales = weight_bytes(model)
    opt = optimizer_bytes(optimizer, names)
    grads = gradient_bytes(optimizer, per_layer=per_layer, grad_accum=grad_accum)
    act = activation_bytes(model, batch, seq_len, checkpointing=checkpointing)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    settings = {"batch": batch, "seq_len": seq_len, "tokens": batch * seq_len,
                "activation_checkpointing": checkpointing, "per_layer": per_layer,
                "grad_accum": grad_accum, "weight_dtypes": dtypes,
                "parameters": sum(p.numel() for p in model.parameters()),
                "projected_weights": opt.low_rank_weights,
                "full_rank_weights": opt.full_rank_weights}
    group = optimizer.param_groups[0]
    for key in ("rule", "state_format", "projector", "residual", "rank", "proj_type"):
        settings[key] = group.get(key)
    notes = list(notes)
    window = sum(g.get("refresh_window", 0) * sum(optimizer.is_low_rank(p, g) for p in g["params"])
                 for g in optimizer.param_groups if g.get("refresh") == "adaptive")
    if window:  # created at the second refresh (refresh.py), so not in the first step's state
        notes.append(f"adaptive refresh: a {window * 4:,}-byte fp32 similarity window "
                     f"(refresh_window x 4 bytes per projected weight) appears at the second "
                     f"refresh; not in the figures above")
    return Plan(label=label, weights=weights, gradients=grads, optimizer_states=opt.states,
                projector_bases=opt.bases,
                quantization_scales=weight_scales + opt.state_scales + opt.basis_scales,
                activations=act.total,
                scales={"weights": weight_scales, "optimizer_states": opt.state_scales,
                        "projector_bases": opt.basis_scales},
                settings=settings, sides=opt.sides, activation_detail=act.as_dict(),
                notes=notes, parametrization=parametrization_bytes(model))


def _meta_model(spec, dtype: torch.dtype) -> Callable[[], torch.nn.Module]:
    from ..train.model import build_model

    def build() -> torch.nn.Module:
        model = build_model(spec.model, device="meta",
                            activation_checkpointing=spec.train.activation_checkpointing)
        return model.to(dtype)

    return build


def _full_rank(state_format: str) -> Callable[[torch.nn.Module], LowRankOptimizer]:
    def build(model: torch.nn.Module) -> LowRankOptimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        return LowRankOptimizer([{"params": params, "lowrank": False}], rule="adamw",
                                state_format=state_format)

    return build


def weight_dtype(spec, dtype: str | torch.dtype | None = None) -> tuple[torch.dtype, list[str]]:
    """The dtype weights are stored in, and notes on how it was chosen."""
    if isinstance(dtype, torch.dtype):
        return dtype, []
    name = dtype or spec.train.dtype
    if name not in DTYPES:
        raise ValueError(f"plan_memory: dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if DTYPES[name] == torch.float32 and spec.train.autocast == "bf16":
        return torch.float32, [
            "fp32 weights with bf16 autocast: activations traced in bf16 (meta tensors "
            "have no autocast); autocast's bf16 weight copies are not counted"]
    return DTYPES[name], []


def plan_memory(spec, overrides: Iterable[str] = (), *,
                dtype: str | torch.dtype | None = None) -> MemoryPlan:
    """Memory of training `spec` (a RunSpec or a TOML path), with the two baselines.

    `overrides` are `table.key=value` strings as for `--set`; `dtype` is the weights'
    storage dtype ("bfloat16" for the papers' pure-BF16 training; default: the spec's).
    """
    if isinstance(spec, (str, Path)):
        from ..train.spec import load_spec
        spec = load_spec(spec, list(overrides))
    elif list(overrides):
        raise ValueError("plan_memory: overrides apply to a spec path, not to a loaded RunSpec")
    dtype_, notes = weight_dtype(spec, dtype)
    t = spec.train
    parallel = getattr(t, "parallel", "none")
    if parallel != "none":  # the planner plans one process; say what a rank holds instead
        notes.append(f"parallel = {parallel!r}: figures are for one process holding everything; "
                     + ("each DDP rank holds all of it" if parallel == "ddp" else
                        "FSDP2 shards weights, gradients and optimizer states over the ranks "
                        "(divide those three by the world size), activations are per rank"))
    trace_dtype = torch.bfloat16 if t.autocast == "bf16" and dtype_ == torch.float32 else dtype_
    common = dict(batch=t.batch_size, seq_len=spec.data.seq_len,
                  checkpointing=t.activation_checkpointing)
    ours = plan_setup("spec", _meta_model(spec, dtype_), spec.optimizer.build,
                      per_layer=t.per_layer, grad_accum=t.grad_accum, notes=notes, **common)
    if trace_dtype != dtype_:  # autocast: activations of the bf16 compute
        bf16 = _meta_model(spec, trace_dtype)()
        spec.optimizer.build(bf16)  # same layers converted (INT8) as the real model
        act = activation_bytes(bf16, t.batch_size, spec.data.seq_len,
                               checkpointing=t.activation_checkpointing)
        ours.activations, ours.activation_detail = act.total, act.as_dict()
    baselines = {name: plan_setup(name, _meta_model(spec, torch.bfloat16), _full_rank(fmt),
                                  **common)
                 for name, fmt in (("adamw-bf16", "bf16"), ("adam-8bit", "q8"))}
    return MemoryPlan(spec=ours, baselines=baselines)


__all__ = ["COMPONENTS", "MemoryPlan", "Plan", "plan_memory", "plan_setup", "weight_dtype"]
