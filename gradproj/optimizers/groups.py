"""Split a model's parameters into a low-rank group and a full-rank group."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..parametrizations.base import ParametrizedLinear, role_of
from ..quant.linear import is_quantized

DEFAULT_TARGETS = ("attn", "mlp")  # GaLore's recipe: Linear layers of attention and MLP


def param_groups(model: torch.nn.Module, targets: Sequence[str] = DEFAULT_TARGETS,
                 **lowrank_options: Any) -> list[dict]:
    """[low-rank group, full-rank group] for `model`.

    A parameter is projected when it is at least 2-D, requires grad, and its module's
    qualified name contains one of `targets` (substring match, as galore-torch's recipe).
    Embeddings, norms, biases and the head stay at full rank. In a parametrized layer
    (`gradproj.parametrizations`) the layer decides: its `projected` tensors are
    projected, its other trainable ones full rank, its frozen ones in no group. `lowrank_options` (rank,
    update_gap, scale, proj_type, projector, ...) go into the low-rank group.
    """
    if isinstance(targets, str):
        targets = (targets,)
    lowrank, full = [], []
    for name, p in model.named_parameters():
        module_name, _, local = name.rpartition(".")
        owner = model.get_submodule(module_name) if module_name else model
        if isinstance(owner, ParametrizedLinear):
            role = role_of(owner, local, p)
            if role == "lowrank" and not any(t in module_name for t in targets):
                role = "full" if p.requires_grad or is_quantized(p) else None
            if role is not None:
                (lowrank if role == "lowrank" else full).append(p)
            continue
        if not p.requires_grad and not is_quantized(p):  # INT8 weights take grads by hand
            continue
        if p.dim() >= 2 and any(t in module_name for t in targets):
            lowrank.append(p)
        else:
            full.append(p)
    groups = []
    if lowrank:
        groups.append({"params": lowrank, "lowrank": True, **lowrank_options})
    if full:
        groups.append({"params": full, "lowrank": False})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups

