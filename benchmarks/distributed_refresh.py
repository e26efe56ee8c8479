"""Distributed subspace refresh: time at world size 1 vs 2 on CPU, and bytes moved per refresh.

    python benchmarks/distributed_refresh.py            # one LLaMA-7B layer, r = 128
    python benchmarks/distributed_refresh.py --quick    # the same layer at 1/4 width, r = 32
    python benchmarks/distributed_refresh.py --projector svd --quick

Spawns a gloo process group of 1 and of 2 ranks (each rank one CPU thread: a rank stands
for one device, so W = 2 on this 2-core machine has twice the compute of W = 1).

1. DDP sharded refresh (`DistributedLowRankOptimizer.sharded_refresh`): all 7 matrices of a
   LLaMA-7B layer (q, k, v, o 4096², gate/up 11008×4096, down 4096×11008) are due; each
   rank fits its share (greedy by cost) and the bases are broadcast. Printed: the slowest
   rank's wall time, and the bytes broadcast.
2. FSDP2 row-sharded range finder (`sharded_range_finder`) per matrix: each rank holds
   m/W rows of G. Printed: time, and the payload bytes this rank puts into collectives,
   against the m·n·4 bytes an all-gather of the fp32 gradient moves into each rank.
Median of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refresh import gradient_like  # noqa: E402

from gradproj.distributed import DistributedLowRankOptimizer, free_port  # noqa: E402
from gradproj.distributed.rangefinder import sharded_range_finder  # noqa: E402

LAYER_7B = [("q", 4096, 4096), ("k", 4096, 4096), ("v", 4096, 4096), ("o", 4096, 4096),
            ("gate", 11008, 4096), ("up", 11008, 4096), ("down", 4096, 11008)]


class ByteCounter:
    """Counts the payload bytes this rank hands to collectives (patched around torch.distributed)."""

    NAMES = ("all_reduce", "all_gather", "broadcast", "gather", "all_gather_object")

    def __init__(self):
        self.bytes = 0
        self.originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self):
        def counted(name):
            original = self.originals[name]

            def call(*args, **kwargs):
                tensor = args[1] if name == "all_gather" else args[0]
                if torch.is_tensor(tensor) and not (name == "broadcast" and
                                                    kwargs.get("src", args[1] if len(args) > 1 else 0)
                                                    != dist.get_rank()):
                    self.bytes += tensor.numel() * tensor.element_size()
                return original(*args, **kwargs)
            return call
        for name in self.NAMES:
            setattr(dist, name, counted(name))
        return self

    def __exit__(self, *exc):
        for name, original in self.originals.items():
            setattr(dist, name, original)


def shapes(quick: bool):
    if not quick:
        return LAYER_7B
    return [(name, m // 4, n // 4) for name, m, n in LAYER_7B]


def ddp_refresh(args, world: int) -> tuple[float, int]:
    params = []
    for i, (_, m, n) in enumerate(shapes(args.quick)):
        p = torch.nn.Parameter(torch.zeros(m, n))
        p.grad = gradient_like(m, n, seed=i)
        params.append(p)
    times, sent = [], 0
    for repeat in range(args.repeats + 1):
        opt = DistributedLowRankOptimizer(
            [{"params": params, "lowrank": True}], parallel="ddp", projector=args.projector,
            projector_options=({"oversample": 8, "power_iters": 1}
                               if args.projector == "randomized" else {}),
            rank=args.rank, update_gap=200)
        dist.barrier()
        start = time.perf_counter()
        with ByteCounter() as counter:
            opt.sharded_refresh()
        elapsed = torch.tensor([time.perf_counter() - start])
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        if repeat:
            times.append(float(elapsed))
            sent = counter.bytes
    return statistics.median(times), sent


def fsdp_finder(args, world: int) -> list[tuple[str, int, int, float, int]]:
    rows = []
    me = dist.get_rank()
    for i, (name, m, n) in enumerate(shapes(args.quick)):
        g = gradient_like(m, n, seed=i)
        local = g.chunk(world)[me].contiguous()
        del g
        times, sent = [], 0
        for repeat in range(args.repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            with ByteCounter() as counter:
                sharded_range_finder(local, args.rank, oversample=8, power_iters=1, seed=repeat)
            elapsed = torch.tensor([time.perf_counter() - start])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if repeat:
                times.append(float(elapsed))
                sent = counter.bytes
        rows.append((name, m, n, statistics.median(times), sent))
    return rows


def worker(rank: int, world: int, port: int, args, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {"ddp": ddp_refresh(args, world)}
        if args.projector == "randomized":
            out["fsdp"] = fsdp_finder(args, world)
        if rank == 0:
            results[world] = out
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/4-width shapes, r = 32")
    parser.add_argument("--rank", type=int, default=None, help="default 128 (32 with --quick)")
    parser.add_argument("--projector", default="randomized", choices=("randomized", "svd"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.rank = args.rank or (32 if args.quick else 128)
    manager = mp.Manager()
    results = manager.dict()
    for world in (1, 2):
        mp.spawn(worker, args=(world, free_port(), args, results), nprocs=world, join=True)
    mib = 1 << 20
    print(f"torch {torch.__version__}, gloo on CPU, 1 thread per rank; projector "
          f"{args.projector}, rank {args.rank}, shapes {'1/4 of ' if args.quick else ''}LLaMA-7B")
    t1, _ = results[1]["ddp"]
    t2, sent2 = results[2]["ddp"]
    print(f"DDP sharded refresh of one layer (7 matrices): W=1 {t1:.2f} s, W=2 {t2:.2f} s "
          f"({t1 / t2:.2f}x faster; ideal 2x), rank 0 broadcast {sent2 / mib:.1f} MiB of bases")
    if "fsdp" in results[1]:
        print(f"{'FSDP2 finder':>14} {'W=1 (s)':>8} {'W=2 (s)':>8} {'speed-up':>8} "
              f"{'sent/rank (MiB)':>15} {'gather G (MiB)':>14} {'ratio':>6}")
        for (name, m, n, a, _), (_, _, _, b, sent) in zip(results[1]["fsdp"], results[2]["fsdp"]):
            full = m * n * 4
            print(f"{name + f' {m}x{n}':>14} {a:8.3f} {b:8.3f} {a / b:7.2f}x "
                  f"{sent / mib:15.1f} {full / mib:14.1f} {sent / full:6.1%}")


if __name__ == "__main__":
    main()
