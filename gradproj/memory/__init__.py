"""Memory planner: exact training-memory accounting from the code paths training runs.

    plan = gp.plan_memory("examples/llama-7b-galore.toml", dtype="bfloat16")
    print(plan.spec.total, plan.reduction("adamw-bf16"))

`gradproj memory SPEC [--set k=v] [--json]` prints the same as a table or JSON.
"""
from .accounting import (OptimizerBytes, SideChoice, gradient_bytes, optimizer_bytes,
                         split_codes_and_scales, weight_bytes)
from .activations import ActivationTrace, activation_bytes
from .plan import COMPONENTS, MemoryPlan, Plan, plan_memory, plan_setup
from .report import format_json, format_table

__all__ = ["COMPONENTS", "ActivationTrace", "MemoryPlan", "OptimizerBytes", "Plan", "SideChoice",
           "activation_bytes", "format_json", "format_table", "gradient_bytes", "optimizer_bytes",
           "plan_memory", "plan_setup", "split_codes_and_scales", "weight_bytes"]
