"""Gradient memory per rank: per-layer DDP vs plain DDP on the 60M LLaMA, against the planner.

    python benchmarks/perlayer_ddp_memory.py              # preset 60m, 2 gloo ranks, 3 steps
    python benchmarks/perlayer_ddp_memory.py --preset tiny

Spawns 2 gloo ranks per mode (a fresh process group each, so the peak RSS is that mode's),
trains the preset for --steps steps (GaLore, randomized, rank 128; 2 sequences of 64 tokens
per rank) and prints, per mode, the peak gradient bytes by exact tensor accounting —
plain DDP: every `.grad` plus the reducer's buckets (`_get_ddp_logging_data()`'s
bucket_sizes); per-layer DDP: the stepper's `.grad` + bucket buffers — the planner's figure
(`gradproj.memory.ranks.ddp_gradient_bytes`), and rank 0's peak RSS (ru_maxrss: weights,
states and activations included, so only the difference between the modes means much).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import gradproj as gp
from gradproj.distributed import distribute_optimizer, free_port
from gradproj.distributed.perlayer import DDPPerLayerStepper, replicate
from gradproj.memory.ranks import ddp_gradient_bytes
from gradproj.train.model import build_model, model_config

OPTIONS = dict(projector="randomized", rank=128, update_gap=200, scale=0.25, lr=1e-3)
MODES = ("ddp", "ddp-per-layer")


def build(preset: str, device: str = "cpu"):
    model = build_model(model_config(preset), seed=0, device=device)
    return model, gp.build_optimizer(model, None, targets=("attn", "mlp"), **OPTIONS)


def worker(rank: int, world: int, port: int, mode: str, preset: str, steps: int, out: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model, opt = build(preset)
    per_layer = mode == "ddp-per-layer"
    model = replicate(model) if per_layer else DistributedDataParallel(model)
    opt = distribute_optimizer(opt, "ddp")
    stepper = DDPPerLayerStepper(opt, module=model) if per_layer else None
    vocab = model_config(preset).vocab_size
    peak = 0
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        tokens = torch.randint(0, vocab, (2, 65), generator=gen)
        if stepper:
            stepper.reset_peak()
            stepper.begin_micro_batch(0)
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        if stepper:
            stepper.end_step()
            peak = max(peak, stepper.grad_peak_bytes)
        else:
            grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
            sizes = str(model._get_ddp_logging_data()["bucket_sizes"]).split(",")
            peak = max(peak, grads + sum(int(s) for s in sizes))
            opt.step()
            opt.zero_grad(set_to_none=True)
    if rank == 0:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        Path(out).write_text(json.dumps({"measured": peak, "rss": rss}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="60m")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    meta, meta_opt = build(args.preset, device="meta")
    grads = sum(p.numel() * p.element_size() for p in meta.parameters())
    print(f"{args.preset}: {sum(p.numel() for p in meta.parameters()) / 1e6:.1f}M parameters, "
          f"{grads / 2**20:.1f} MiB of fp32 gradients; 2 gloo ranks, {args.steps} steps")
    print(f"{'mode':<15}{'measured MiB':>14}{'planned MiB':>13}{'peak RSS MiB':>14}")
    rows = {}
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "result.json")
            mp.spawn(worker, args=(2, free_port(), mode, args.preset, args.steps, out), nprocs=2)
            rows[mode] = json.loads(Path(out).read_text())
        planned, _ = ddp_gradient_bytes(meta, meta_opt, per_layer=mode == "ddp-per-layer")
        r = rows[mode]
        print(f"{mode:<15}{r['measured'] / 2**20:>14.2f}{planned / 2**20:>13.2f}"
              f"{r['rss'] / 2**20:>14.0f}")
    a, b = rows["ddp"], rows["ddp-per-layer"]
    print(f"per-layer / plain: gradients {b['measured'] / a['measured']:.3f}x, "
          f"peak RSS {b['rss'] / a['rss']:.3f}x ({(a['rss'] - b['rss']) / 2**20:.0f} MiB less)")


if __name__ == "__main__":
    sys.exit(main())
