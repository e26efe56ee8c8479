"""Subspace refresh cost: exact SVD vs the randomized range finder at LLaMA-7B shapes.

    python benchmarks/refresh.py            # 4096x4096 r=128 and 4096x11008 r=512
    python benchmarks/refresh.py --quick    # 1024x1024 r=32 and 1024x2752 r=128

Prints, per shape, the median time of one refresh for each projector, the speed-up of the
randomized finder over the SVD (a ratio measured in the same run), and the fraction of the
SVD's captured gradient energy ‖Pᵀ·G‖² that the randomized basis captures.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import gradproj as gp
from gradproj.projectors.base import resolve_side

FULL_SHAPES = [((4096, 4096), 128), ((4096, 11008), 512)]
QUICK_SHAPES = [((1024, 1024), 32), ((1024, 2752), 128)]


def gradient_like(m: int, n: int, seed: int = 0, k: int = 256, decay: float = 0.98) -> torch.Tensor:
    """Rank-k signal with a geometric spectrum plus dense noise, the shape of LLM gradients."""
    gen = torch.Generator().manual_seed(seed)
    spectrum = decay ** torch.arange(k, dtype=torch.float32)
    a = torch.randn(m, k, generator=gen) / m ** 0.5
    b = torch.randn(k, n, generator=gen) / n ** 0.5
    return (a * spectrum) @ b + 0.02 * torch.randn(m, n, generator=gen) / (m * n) ** 0.25


def time_refresh(name: str, grad: torch.Tensor, rank: int, side: str, repeats: int, **options):
    projector = gp.PROJECTORS.create(name, **options)
    projector.fit(grad, {}, rank=rank, side=side, seed=0, dtype=torch.float32)  # warm-up
    times, state = [], {}
    for i in range(repeats):
        state = {}
        start = time.perf_counter()
        projector.fit(grad, state, rank=rank, side=side, seed=i, dtype=torch.float32)
        times.append(time.perf_counter() - start)
    energy = projector.project(grad, state, side).square().sum().item()
    return statistics.median(times), energy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a few seconds")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--power-iters", type=int, default=1)
    parser.add_argument("--oversample", type=int, default=8)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'shape':>12} {'rank':>5} {'svd (s)':>9} {'randomized (s)':>15} {'speed-up':>9} {'energy':>8}")
    for (m, n), rank in QUICK_SHAPES if args.quick else FULL_SHAPES:
        grad = gradient_like(m, n)
        side = resolve_side("std", (m, n))
        svd_time, svd_energy = time_refresh("svd", grad, rank, side, max(1, args.repeats // 2))
        rnd_time, rnd_energy = time_refresh("randomized", grad, rank, side, args.repeats,
                                            power_iters=args.power_iters, oversample=args.oversample)
        print(f"{m}x{n:<7} {rank:>5} {svd_time:9.2f} {rnd_time:15.3f} {svd_time / rnd_time:8.1f}x"
              f" {rnd_energy / svd_energy:8.1%}")


if __name__ == "__main__":
    main()
