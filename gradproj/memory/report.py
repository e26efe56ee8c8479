"""The `gradproj memory` table: components × (spec, adamw-bf16, adam-8bit), sides, notes."""
from __future__ import annotations

import json

from .plan import COMPONENTS, MemoryPlan, Plan

GB = 1e9  # decimal GB, as the papers print; a 12 GB bound in GB is the stricter one
LABELS = {"weights": "weights", "gradients": "gradients", "optimizer_states": "optimizer states",
          "projector_bases": "projector bases", "quantization_scales": "quantization scales",
          "activations": "activations", "total": "total",
          "optimizer_memory": "optimizer memory (states+bases+their scales)"}
COUNTED = ("Counted: parameters and buffers, gradients alive at the peak of backward, every "
           "optimizer-state tensor after the first step (moments, bases, scales), and the "
           "tensors autograd saves for backward on one micro-batch. Not counted: temporaries "
           "of one bucket's update (stacked fp32 gradients and update, a few times "
           "bucket_cap_mb; dequantized moments), the "
           "activation gradients of backward, the CUDA context and allocator fragmentation. The total "
           "is the sum: backward frees activations as whole-model gradients appear, so such a "
           "step peaks lower (130M GaLore on an H100: 1.21 GB measured, 1.46 GB planned).")


def gb(nbytes: int, unit: tuple[str, float] = ("GB", GB)) -> str:
    return f"{nbytes / unit[1]:.2f} {unit[0]}"


def unit_for(largest: int) -> tuple[str, float]:
    """GB for real models, MB (1e6) or kB (1e3) so a tiny model's table is not all 0.00."""
    for name, size in (("GB", GB), ("MB", 1e6)):
        if largest >= size:
            return name, size
    return "kB", 1e3


def change(saved: float) -> str:
    """0.651 -> '65.1% less'; -0.25 -> '25.0% more'."""
    return f"{100 * saved:.1f}% less" if saved >= 0 else f"{-100 * saved:.1f}% more"


def _describe(plan: Plan) -> str:
    s = plan.settings
    parts = [f"rule {s['rule']}", f"states {s['state_format']}"]
    if s["projected_weights"]:
        parts += [f"projector {s['projector']}", f"rank {s['rank']}",
                  f"proj_type {s['proj_type']}", f"residual {s['residual']}"]
    parts.append("weights " + "+".join(s["weight_dtypes"]))
    parts.append("zeroth-order (forwards only, no gradients)"
                 if s.get("gradient") == "zeroth-order"
                 else "per-layer" if s["per_layer"] else "whole-model gradients")
    if s.get("launch", "none") != "none":
        parts.append(f"one rank of {s['launch']} x {s['nproc']}")
    return ", ".join(parts)


def format_table(plan: MemoryPlan, source: str = "spec") -> str:
    plans = {"spec": plan.spec, **plan.baselines}
    s = plan.spec.settings
    lines = [f"gradproj memory: {source}",
             f"  {s['parameters'] / 1e6:,.1f}M parameters; micro-batch {s['batch']} x seq "
             f"{s['seq_len']} = {s['tokens']:,} tokens; activation checkpointing "
             f"{'on' if s['activation_checkpointing'] else 'off'}",
             f"  spec: {_describe(plan.spec)}",
             "  baselines: full-rank AdamW, bf16 weights, whole-model gradients; "
             "adamw-bf16 keeps bf16 moments, adam-8bit q8 (blockwise 8-bit) moments", ""]
    width = max(len(v) for v in LABELS.values())
    lines.append(f"{'':<{width}}  " + "  ".join(f"{name:>12}" for name in plans))
    unit = unit_for(max(p.total for p in plans.values()))
    for key in (*COMPONENTS, "total", "optimizer_memory"):
        cells = "  ".join(f"{gb(getattr(p, key), unit):>12}" for p in plans.values())
        lines.append(f"{LABELS[key]:<{width}}  {cells}")
    lines.append("")
    for name in plan.baselines:
        lines.append(f"vs {name}: optimizer memory {change(plan.reduction(name))}, "
                     f"total {change(plan.reduction(name, 'total'))}")
    sides = plan.spec.sides
    if sides:
        lines += ["", "projection side per weight (bytes of states + basis, one weight):"]
        for row in sides:
            m, n = row.shape
            lines.append(f"  {row.name} ({m}x{n}) x{row.count}: {row.side} -- {row.reason}")
    parts = plan.spec.parametrization
    if parts:  # weight-side transform: what its weights are made of (inside "weights")
        lines += ["", "parametrized layers: " + ", ".join(
            f"{k.replace('_', ' ')} {gb(v, unit)}" for k, v in parts.items())]
    a = plan.spec.activation_detail
    if a.get("checkpointing"):
        lines += ["", f"activations: {gb(a['kept'], unit)} kept between forward and backward "
                      f"+ {gb(a['recompute'], unit)} for the one layer recomputed at a time"]
    detail = s.get("gradient_detail") or {}
    if detail:
        lines += ["", "gradients on one rank: " + ", ".join(f"{name} {gb(n, unit)}"
                                                         for name, n in detail.items())]
    lines += ["", *plan.spec.notes, COUNTED]
    return "\n".join(lines)


def format_json(plan: MemoryPlan) -> str:
    return json.dumps(plan.as_dict(), indent=2)


__all__ = ["change", "format_json", "format_table", "gb", "unit_for"]
