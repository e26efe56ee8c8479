"""Tiny-model training shared by the distributed checks and their single-process references.

The model is the project's LLaMA at a toy size whose MLP weights (512×32) give each rank
a 256×16 = 4096-value moment under FSDP2 — exactly q8's quantization threshold and a
multiple of its 256-value block, so q8 blocks fall on the same values sharded or not.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

import gradproj as gp
from gradproj.distributed import distribute_optimizer, unwrap, wrap_model
from gradproj.train.model import build_model, model_config

CONFIG = dict(vocab_size=64, dim=32, n_layers=2, n_heads=2, ffn_dim=512, max_seq_len=16)
GLOBAL_BATCH, SEQ = 4, 16
BASE = dict(rank=16, update_gap=5, scale=0.25, lr=1e-2)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def local_batch(step: int, env) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal share of the global batch (the mean of the shares' mean losses is
    the global mean loss, so averaged gradients equal the single-process gradient)."""
    x, y = global_batch(step)
    if env.parallel == "none":
        return x, y
    rows = GLOBAL_BATCH // env.world_size
    sl = slice(env.rank * rows, (env.rank + 1) * rows)
    return x[sl], y[sl]


def build(env, options: dict):
    model = wrap_model(build_model(model_config(**CONFIG), seed=0), env)
    opt = gp.build_optimizer(unwrap(model), None, targets=("attn", "mlp"), **{**BASE, **options})
    return model, distribute_optimizer(opt, env.parallel)


def per_layer_hooks(opt) -> list:
    """Optimizer-in-backward: step each weight as soon as its (reduced) gradient exists."""
    def hook(p):
        opt.step_param(p)
        p.grad = None
    return [p.register_post_accumulate_grad_hook(hook)
            for g in opt.param_groups for p in g["params"]]


def train(model, opt, env, start: int, stop: int, per_layer: bool = False) -> list[float]:
    losses = []
    handles = per_layer_hooks(opt) if per_layer else []
    for step in range(start, stop):
        x, y = local_batch(step, env)
        loss = model(x, y)
        loss.backward()
        if not per_layer:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for h in handles:
        h.remove()
    return losses


def full_weights(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (FSDP2 shards all-gathered), under the user's names."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def bases_identical(opt) -> bool:
    """Every basis tensor in the optimizer state is bitwise the same on all ranks."""
    same = True
    for state in opt.state.values():
        for key in sorted(state):
            value = state[key]
            if not key.startswith("proj_") or not torch.is_tensor(value):
                continue
            parts = [torch.empty_like(value) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, value.contiguous())
            same &= all(torch.equal(parts[0], part) for part in parts)
    return bool(same)
