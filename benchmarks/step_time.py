"""Optimizer step time at LLaMA 60M / 130M / 350M weight shapes, low-rank vs the baselines.

    python benchmarks/step_time.py --threads 1          # 60m, 130m, 350m on CPU (~35 min)
    python benchmarks/step_time.py --quick              # the "tiny" model, 10 s idle, ~1 min loaded
    python benchmarks/step_time.py --device cuda        # on a GPU
    python benchmarks/step_time.py --sizes 60m --repeats 9 --out results.md

Every optimizer steps the *same* parameters with the *same* fixed gradients (a step only
reads p.grad and its own state, so sharing the weights changes no cost); the
"gradient views" rows hold those values in their buckets' buffers (`gradient_as_bucket_view`),
set as .grad before each of their steps, untimed, as backward would leave them. Rounds interleave
the optimizers, rotating their order, and each figure is the median over rounds of the
per-round ratio to `torch.optim.AdamW` measured in that round: the ratios hold on a
machine shared with other jobs even when the absolute times drift.

The low-rank step is reported amortized: the steady step (no refresh) plus the cost of
one subspace refresh of every projected weight divided by the refresh gap T. The refresh
is timed per distinct weight shape (a LLaMA block has three: dim², ffn×dim, dim×ffn), for
our projectors and for galore-torch's SVD alike. Rank, T and α follow GaLore's recipe.

Peers run when installed (the optional `bench` extra) and are skipped, with the reason
printed, when not: galore-torch (GaLoreAdamW, GaLoreAdamW8bit), bitsandbytes AdamW8bit,
torchao AdamW8bit. Our 8-bit-state preset runs when the `q8` state format is registered.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from typing import Callable

# torchao's AdamW8bit compiles its step with inductor, whose default pool of compile-worker
# processes kept both cores busy for ~10 s after the compile and made the next timings
# (measured here) 5-30x slower; compiling in-process avoids the background load.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import torch  # noqa: E402

import gradproj as gp  # noqa: E402
from gradproj.optimizers.heap import keep_freed_memory  # noqa: E402
from gradproj.projectors.base import resolve_side  # noqa: E402
from gradproj.train.model import build_model, model_config  # noqa: E402

# GaLore's recipe (PAPERS.md): 60M r 128, 130M and 350M r 256; T 200, α 0.25 everywhere.
RANKS = {"tiny": 32, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
GAP, SCALE = 200, 0.25
LR = 1e-6  # tiny: weights barely move over the ~20 steps each optimizer takes


def make_model(size: str, device: str, seed: int = 0) -> torch.nn.Module:
    """The LLaMA at `size` with random weights and fixed random gradients (dense, 1e-3 scale).

    Built on the meta device and materialised with plain randn: the benchmark needs the
    shapes and names, not the seeded init (which costs ~10 s at 350M on 2 cores).
    """
    model = build_model(model_config(size), device="meta").to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
            p.grad = torch.randn(p.shape, generator=gen, device=device).mul_(1e-3)
    return model


def lowrank_params(model) -> list[torch.nn.Parameter]:
    return gp.param_groups(model)[0]["params"]


# -- the contenders ----------------------------------------------------------------------
def ours(projector: str, state_format: str = "fp32", views: bool = False, **projector_options):
    def build(model, rank):
        return gp.build_optimizer(model, "galore", lr=LR, rank=rank, update_gap=GAP, scale=SCALE,
                                  projector=projector, state_format=state_format,
                                  projector_options=projector_options,
                                  gradient_as_bucket_view=views)
    return build


def galore_torch(eight_bit: bool):
    def build(model, rank):
        import galore_torch
        low = lowrank_params(model)
        ids = {id(p) for p in low}
        groups = [{"params": [p for p in model.parameters() if id(p) not in ids]},
                  {"params": low, "rank": rank, "update_proj_gap": GAP, "scale": SCALE,
                   "proj_type": "std"}]
        cls = galore_torch.GaLoreAdamW8bit if eight_bit else galore_torch.GaLoreAdamW
        return cls(groups, lr=LR)
    return build


def adamw(model, rank):
    # foreach is torch's default and the baseline
    return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)


def adamw_fused(model, rank):
    # torch's one-pass kernel (CPU and CUDA): the full-rank step at its fastest, beside
    # our own one-pass Adam (kernels/cpu_adam.py on CPU, Triton on CUDA)
    return torch.optim.AdamW(model.parameters(), lr=LR, fused=True)


def bnb_adamw8bit(model, rank):
    import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(model.parameters(), lr=LR)


def torchao_adamw8bit(model, rank):
    from torchao.optim import AdamW8bit
    return AdamW8bit(model.parameters(), lr=LR)


def contenders() -> dict[str, tuple[Callable, str | None]]:
    """name -> (builder, refresh kind or None). Refresh kind names what `refresh_costs` times."""
    table = {
        "torch AdamW (foreach)": (adamw, None),
        "torch AdamW (fused)": (adamw_fused, None),
        "gradproj GaLore svd": (ours("svd"), "svd"),
        "gradproj GaLore randomized": (ours("randomized"), "randomized"),
        "gradproj GaLore svd, gradient views": (ours("svd", views=True), "svd"),
        "gradproj GaLore randomized, gradient views": (ours("randomized", views=True), "randomized"),
    }
    if "q8" in gp.STATE_FORMATS:
        table["gradproj GaLore svd, q8 states"] = (ours("svd", "q8"), "svd")
    table.update({
        "galore-torch GaLoreAdamW": (galore_torch(False), "galore-torch"),
        "galore-torch GaLoreAdamW8bit": (galore_torch(True), "galore-torch"),
        "bitsandbytes AdamW8bit": (bnb_adamw8bit, None),
        "torchao AdamW8bit": (torchao_adamw8bit, None),
    })
    return table


# -- measurement ---------------------------------------------------------------------------
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def state_nbytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's state tensors; tensor subclasses (torchao's 8-bit states)
    are counted through their inner tensors, since their element_size() reports fp32."""
    def nbytes(t) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor \
                and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    return sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def refresh_costs(model, rank: int, device: str, repeats: int,
                  kinds: set, clock=time.perf_counter) -> dict[str, float]:
    """Seconds of one refresh of every projected weight, per refresh kind.

    Timed once per distinct shape and multiplied by its count; the kinds fit the same
    gradient in interleaved rounds (median), galore-torch's refresh being its projector's
    SVD call."""
    shapes: dict[tuple[int, int], int] = {}
    for p in lowrank_params(model):
        shapes[tuple(p.shape)] = shapes.get(tuple(p.shape), 0) + 1
    total: dict[str, float] = {}
    for shape, count in shapes.items():
        g = torch.randn(shape, device=device)
        side = resolve_side("std", shape)
        fits = {name: (lambda proj=gp.PROJECTORS.create(name):
                       proj.fit(g, {}, rank=rank, side=side, seed=0, dtype=torch.float32))
                for name in ("svd", "randomized") if name in kinds}
        if "galore-torch" in kinds:  # built above, so its import works
            from galore_torch.galore_projector import GaLoreProjector
            gt = GaLoreProjector(rank, update_proj_gap=GAP, scale=SCALE)
            fits["galore-torch"] = lambda: gt.get_orthogonal_matrix(g, rank, side)
        times: dict[str, list[float]] = {name: [] for name in fits}
        for r in range(repeats + 1):  # round 0 warms up LAPACK workspaces / cuSOLVER handles
            for name, fit in fits.items():
                sync(device)
                start = clock()
                fit()
                sync(device)
                if r:
                    times[name].append(clock() - start)
        for name in fits:
            total[name] = total.get(name, 0.0) + statistics.median(times[name]) * count
    return total


def bench_size(size: str, device: str, repeats: int, only: list[str] | None,
               clock=time.perf_counter) -> list[dict]:
    rank = RANKS[size]
    model = make_model(size, device)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    n_low = sum(p.numel() for p in lowrank_params(model))
    print(f"\n## {size}: {n_params / 1e6:.1f}M parameters, {n_low / 1e6:.1f}M projected; "
          f"rank {rank}, T {GAP}, alpha {SCALE}, {device}")
    opts, kinds, own, rows = {}, {}, {}, []
    # galore-torch's 8-bit step swaps p.data and p.grad for low-rank tensors and restores
    # them at its end; one that raises midway (it does with bitsandbytes 0.50) would leave
    # the shared weights low-rank for every later optimizer, so they are put back.
    tensors = [(p.data, p.grad) for p in params]
    for name, (build, kind) in contenders().items():
        if only and not any(o.lower() in name.lower() for o in only):
            continue
        try:
            opt = build(model, rank)
            for _ in range(2):  # state allocation, first refresh, torch.compile (torchao)
                opt.step()
            sync(device)
        except Exception as exc:  # noqa: BLE001 - a peer that fails here is reported, not fatal
            for p, (data, grad) in zip(params, tensors):
                p.data, p.grad = data, grad
            message = " ".join(str(exc).split())[:200]
            print(f"   skipped {name}: {type(exc).__name__}: {message}")
            continue
        opts[name], kinds[name] = opt, kind
        # its own .grad tensors: with gradient_as_bucket_view the first steps made them
        # slices of its buckets' buffers (the values are the fixed gradients all share)
        own[name] = [p.grad for p in params]
        for p, (_, grad) in zip(params, tensors):
            p.grad = grad
    used = {k for k in kinds.values() if k}
    refresh = refresh_costs(model, rank, device, 3, used, clock) if used else {}
    times = {name: [] for name in opts}
    names = list(opts)
    for r in range(repeats):  # rotate the order every round so no one always runs first
        for name in names[r % len(names):] + names[:r % len(names)]:
            for p, grad in zip(params, own[name]):
                p.grad = grad
            sync(device)
            start = clock()
            opts[name].step()
            sync(device)
            times[name].append(clock() - start)
    base = times.get("torch AdamW (foreach)")
    for name in names:
        amort = refresh.get(kinds[name], 0.0) / GAP if kinds[name] else 0.0
        row = {"size": size, "method": name, "state_MiB": state_nbytes(opts[name]) / 2 ** 20,
               "step_ms": statistics.median(times[name]) * 1e3, "refresh_ms": amort * 1e3,
               "refresh_all_s": refresh.get(kinds[name], 0.0) if kinds[name] else 0.0}
        row["amortized_ms"] = row["step_ms"] + row["refresh_ms"]
        if base:
            row["x_adamw"] = statistics.median((t + amort) / b for t, b in zip(times[name], base))
        rows.append(row)
    del opts, model, params
    gc.collect()
    return rows


def table(rows: list[dict]) -> str:
    head = ("| size | method | state (MiB) | steady step (ms) | refresh/T (ms) | "
            "amortized step (ms) | × AdamW |\n|---|---|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in rows:
        ratio = f"{r['x_adamw']:.2f}" if "x_adamw" in r else "—"
        lines.append(f"| {r['size']} | {r['method']} | {r['state_MiB']:.0f} | {r['step_ms']:.1f} | "
                     f"{r['refresh_ms']:.1f} | {r['amortized_ms']:.1f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="60m,130m,350m", help="comma-separated model presets")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 15 rounds (seconds)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds per size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default="", help="comma-separated substrings of method names")
    parser.add_argument("--out", default="", help="also write the markdown table here")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: process CPU time, robust to a shared machine (all threads "
                             "counted: use with --threads 1); auto: cpu for --threads 1 on "
                             "CPU, else wall")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default); 1 resists oversubscription "
                             "when other jobs share the cores")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = ["tiny"] if args.quick else [s.strip() for s in args.sizes.split(",") if s.strip()]
    repeats = 15 if args.quick else args.repeats
    only = [o.strip() for o in args.only.split(",") if o.strip()] or None
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and args.device == "cpu"
                                        and torch.get_num_threads() == 1)
    clock = time.process_time if cpu_clock else time.perf_counter
    if args.device.startswith("cuda"):
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        # every contender under the malloc settings gradproj's first CPU step would make
        heap = "gradproj's" if keep_freed_memory() else "the C library's own"
        print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"{'process CPU' if cpu_clock else 'wall'} time, malloc thresholds: {heap}")
    rows = []
    for size in sizes:
        rows += bench_size(size, args.device, repeats, only, clock)
        print(table([r for r in rows if r["size"] == size]), flush=True)
    text = table(rows)
    if len(sizes) > 1:  # each size's table was printed as it finished
        print("\n" + text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
