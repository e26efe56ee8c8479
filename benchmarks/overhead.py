"""Host overhead of one optimizer step: ATen ops dispatched per step, and host time vs AdamW.

    python benchmarks/overhead.py                       # both lists, 61 rounds (1.5-3.5 min by load)
    python benchmarks/overhead.py --quick               # 24-layer list, 5 rounds, no peers (10-25 s)
    python benchmarks/overhead.py --lists 1b --rounds 101 --json overhead.json

Two figures per optimizer, over LLaMA-shaped parameter lists with tiny tensors (hidden 64),
so that a step costs its Python and dispatcher work, not its arithmetic:

- **ops/step**: every ATen op a `TorchDispatchMode` sees during one steady `opt.step()`
  (`_foreach_*` ops count once, whatever the number of tensors). The count does not depend
  on the load of the machine, nor on the tensor sizes: a step's code walks the same
  parameters with the same ops whether a weight is 64x64 or 2048x2048 (q-galore pads its
  INT8 groups of 256, a few ops more on a 64x171 weight), which is why a
  LLaMA scaled down by 32 per dimension has the op count of the real one (the `1b` list).
  This is the headline figure; on a GPU most ops are one kernel launch each (views and
  reads of CPU scalars are not). The script runs on CPU, where gradproj takes the PyTorch
  references of its Triton kernels (counted op by op), except for its C passes (fp32 Adam,
  the q8/q4 codecs), which bypass the dispatcher uncounted, as a Triton launch does.
- **host µs/step**: the median over interleaved rounds (the order rotates every round) of
  the step's wall time, and "× AdamW" the median over rounds of the per-round ratio to
  `torch.optim.AdamW(foreach=True)` stepping the same list in the same round.
- **faults/step**: the minor page faults (`getrusage`) of the timed steps, per step: a
  count that does not depend on the load either. Every contender steps under gradproj's
  malloc settings (`gradproj/optimizers/heap.py`, set before the first one is built);
  `GRADPROJ_KEEP_FREED_MEMORY=0` runs them all under glibc's defaults instead.

Steady: each optimizer takes WARMUP steps first (state allocation, the subspace refresh
at step 0), and all its counted and timed steps come before its next refresh (T = 200);
the script checks that no refresh happened during them (`gradproj.count_refreshes`).
Every optimizer steps its own fresh copy of the model (Q-GaLore converts the targeted
Linear layers to INT8 `QuantLinear` in place) with the same fixed seeded gradients; no
forward or backward runs. galore-torch's GaLoreAdamW runs when installed (the `bench`
extra) and is skipped, with the reason printed, when not; `--quick` leaves it out (its
import, transformers and bitsandbytes, costs ~3 s idle and 6+ s on the loaded 2 cores,
and the before-stop hook runs `--quick` under a 40 s timeout).
"""
from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import time
from collections import Counter

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradproj as gp
from gradproj.optimizers.heap import keep_freed_memory

RANK, GAP, SCALE, LR = 8, 200, 0.25, 1e-6
WARMUP = 2   # step 0 allocates state and refreshes every basis; step 1 warms the caches
COUNTED = 2  # steps whose ops are counted, one by one (they must agree: steady)
BASELINE = "torch AdamW (foreach)"
# LLaMA-1B (24 layers, hidden 2048, intermediate 5461, vocab 32000, untied head) / 32
LISTS = {
    "24layer": dict(title="24-layer", layers=24, dim=64, ffn=172, vocab=256),
    "1b": dict(title="1b-shaped (LLaMA-1B / 32)", layers=24, dim=64, ffn=171, vocab=1000),
}


# -- the parameter lists -------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))


class MLP(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.gate, self.up = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)


class Layer(nn.Module):
    def __init__(self, dim: int, ffn: int):
        super().__init__()
        self.attn, self.mlp = Attention(dim), MLP(dim, ffn)
        # norms held by the layer itself (module name `layers.i`): not matched by the
        # targets ("attn", "mlp"), so they stay full rank in every optimizer
        self.attn_norm = nn.Parameter(torch.ones(dim))
        self.mlp_norm = nn.Parameter(torch.ones(dim))


class Stack(nn.Module):
    """The parameters of a LLaMA (no forward: the benchmark only steps the optimizer)."""

    def __init__(self, layers: int, dim: int, ffn: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(Layer(dim, ffn) for _ in range(layers))
        self.norm = nn.Parameter(torch.ones(dim))
        self.head = nn.Linear(dim, vocab, bias=False)


def make_model(spec: dict, seed: int = 0) -> nn.Module:
    model = Stack(spec["layers"], spec["dim"], spec["ffn"], spec["vocab"])
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    return model


def set_grads(model: nn.Module, seed: int = 1) -> None:
    """Fixed seeded gradients; an INT8 QuantLinear weight takes an fp32 one (its grad_dtype)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        dtype = p.dtype if p.is_floating_point() else torch.float32
        p.grad = torch.randn(p.shape, generator=gen, dtype=dtype).mul_(1e-3)


def check_split(model: nn.Module, spec: dict) -> tuple[int, int]:
    """(projected, full-rank) tensor counts; 7 matrices per layer and 2L + 3 others."""
    low, full = (len(g["params"]) for g in gp.param_groups(model))
    want = (7 * spec["layers"], 2 * spec["layers"] + 3)
    if (low, full) != want:
        raise SystemExit(f"{spec['title']}: the targets split {low} projected + {full} full-rank "
                         f"tensors, expected {want[0]} + {want[1]}")
    return low, full


# -- the contenders ----------------------------------------------------------------------
def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)


def galore_torch(model):
    try:
        import galore_torch
    except Exception as exc:  # noqa: BLE001 - its imports (bitsandbytes, transformers) vary
        raise ImportError(f"galore-torch does not import ({type(exc).__name__}: {exc}); "
                          "install the `bench` extra with --no-deps") from None
    low = gp.param_groups(model)[0]["params"]
    ids = {id(p) for p in low}
    return galore_torch.GaLoreAdamW(
        [{"params": low, "rank": RANK, "update_proj_gap": GAP, "scale": SCALE, "proj_type": "std"},
         {"params": [p for p in model.parameters() if id(p) not in ids]}],
        lr=LR, no_deprecation_warning=True)


def preset(name: str, **extra):
    def build(model):
        # apollo-mini's rank is 1 by definition (its paper); every other preset takes rank 8
        rank = {} if name == "apollo-mini" else {"rank": RANK}
        return gp.build_optimizer(model, name, lr=LR, update_gap=GAP, **rank, **extra)
    return build


def contenders(peers: bool = True) -> dict:
    """name -> builder; GaLore (the issue's 1.0× rows) first, then the presets by name."""
    table = {BASELINE: adamw}
    if peers:
        table["galore-torch GaLoreAdamW"] = galore_torch
    names = gp.PRESETS.names()
    if "galore" in names:
        table["gradproj galore"] = preset("galore")
        table["gradproj galore, randomized"] = preset("galore", projector="randomized")
    table.update({f"gradproj {n}": preset(n) for n in names if n != "galore"})
    return table


def target(name: str) -> float | None:
    """The issue's ops/step target (× AdamW) for a gradproj row; None for the peers."""
    if not name.startswith("gradproj "):
        return None
    return 1.0 if name.split(" ", 1)[1] in ("galore", "galore, randomized") else 1.5


HOST_TARGET = 1.2
TARGET_LINE = ("target (issue): ops/step ≤ 1.0× AdamW(foreach) for galore (svd or randomized), "
               f"≤ 1.5× for every other preset; host time ≤ {HOST_TARGET}×")


# -- measurement ---------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active, by overload name."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func] += 1  # the overload itself: str() per op would cost ~1 µs more
        return func(*args, **(kwargs or {}))


def refreshes(opt) -> int | None:
    return gp.count_refreshes(opt) if isinstance(opt, gp.LowRankOptimizer) else None


def bench_list(key: str, rounds: int, only: list[str] | None, peers: bool = True,
               layers: int = 0) -> dict:
    spec = LISTS[key]
    if layers and layers != spec["layers"]:
        spec = dict(spec, layers=layers, title=f"{spec['title']} cut to {layers} layers")
    low, full = check_split(make_model(spec), spec)
    print(f"\n## {spec['title']}: {spec['layers']} layers, hidden {spec['dim']}, intermediate "
          f"{spec['ffn']}, vocab {spec['vocab']}; {low} projected matrices at rank {RANK} "
          f"+ {full} full-rank tensors, T {GAP}")
    opts, rows, skipped, models = {}, {}, {}, {}
    for name, build in contenders(peers).items():
        if only and name != BASELINE and not any(o.lower() in name.lower() for o in only):
            continue
        model = make_model(spec)
        try:
            opt = build(model)
        except ImportError as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            print(f"   skipped {name}: {skipped[name]}")
            continue
        set_grads(model)  # after build: Q-GaLore's INT8 weights exist only now
        for _ in range(WARMUP):
            opt.step()
        before = refreshes(opt)
        counts = []
        for _ in range(COUNTED):
            with OpCounter() as counter:
                opt.step()
            counts.append(counter.ops)
        opts[name] = (opt, before)
        models[name] = model  # alive: Q-GaLore's INT8 weights hold their QuantLinear weakly
        rows[name] = {"optimizer": name, "ops_per_counted_step": [sum(c.values()) for c in counts],
                      "top_ops": {str(f): n for f, n in counts[-1].most_common(12)}, "host_us_rounds": [],
                      "faults": 0}
    names = list(opts)
    for r in range(rounds + 1):  # round 0 warms up outside the op counter, untimed
        for name in names[r % len(names):] + names[:r % len(names)]:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            opts[name][0].step()
            elapsed = time.perf_counter() - start
            if r:
                rows[name]["host_us_rounds"].append(elapsed * 1e6)
                rows[name]["faults"] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    base = rows[BASELINE]
    for name, row in rows.items():
        opt, before = opts[name]
        if refreshes(opt) != before:
            raise SystemExit(f"{name}: a subspace refresh ran during the measured steps "
                             f"({before} -> {refreshes(opt)} refreshes); lower --rounds")
        row["ops"] = max(row["ops_per_counted_step"])
        row["ops_x_adamw"] = row["ops"] / base["ops"]
        row["host_us"] = statistics.median(row["host_us_rounds"])
        row["faults_per_step"] = row.pop("faults") / rounds
        row["host_x_adamw"] = statistics.median(
            t / b for t, b in zip(row["host_us_rounds"], base["host_us_rounds"]))
        ops_target = target(name)
        row["meets_ops_target"] = None if ops_target is None else row["ops_x_adamw"] <= ops_target
        row["meets_host_target"] = None if ops_target is None else row["host_x_adamw"] <= HOST_TARGET
    return {"title": spec["title"], "spec": spec, "projected": low, "full_rank": full,
            "rows": list(rows.values()), "skipped": skipped}


def yes_no(flag: bool | None) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def table(result: dict) -> str:
    lines = ["| optimizer | ops/step | ops × AdamW | host µs/step | host × AdamW | faults/step "
             "| meets ops / host target |", "|---|---:|---:|---:|---:|---:|:-:|"]
    for r in result["rows"]:
        steady = "" if len(set(r["ops_per_counted_step"])) == 1 else \
            f" (varies: {r['ops_per_counted_step']})"
        lines.append(f"| {r['optimizer']} | {r['ops']}{steady} | {r['ops_x_adamw']:.2f} | "
                     f"{r['host_us']:.0f} | {r['host_x_adamw']:.2f} | {r['faults_per_step']:.0f} | "
                     f"{yes_no(r['meets_ops_target'])} / {yes_no(r['meets_host_target'])} |")
    for name, why in result["skipped"].items():
        lines.append(f"| {name} | skipped: {why[:120]} | | | | | |")
    return "\n".join(lines)


def summary(result: dict, max_lines: int = 8) -> list[str]:
    """At most `max_lines` lines: the before-stop hook prints the last 8 of --quick."""
    base = next(r for r in result["rows"] if r["optimizer"] == BASELINE)
    others = [r for r in result["rows"] if r["optimizer"] != BASELINE]
    short = {"galore-torch GaLoreAdamW": "galore-torch"}
    cells = [f"{short.get(r['optimizer'], r['optimizer'].removeprefix('gradproj '))} "
             f"{r['ops_x_adamw']:.2f}/{r['host_x_adamw']:.2f}"
             + ("" if r["meets_ops_target"] is None else
                (" ok" if r["meets_ops_target"] and r["meets_host_target"] else " miss"))
             for r in others]
    per_line = max(1, math.ceil(len(cells) / (max_lines - 3)))
    met = [r for r in others if r["meets_ops_target"] and r["meets_host_target"]]
    graded = [r for r in others if r["meets_ops_target"] is not None]
    lines = [f"overhead {result['title']}: × AdamW(foreach) = {base['ops']} ops, "
             f"{base['host_us']:.0f} µs/step; cells are ops×/host×",
             TARGET_LINE]
    lines += [" | ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]
    lines.append(f"meeting both targets: {len(met)} of {len(graded)} gradproj rows"
                 + (f" ({', '.join(r['optimizer'] for r in met)})" if met else ""))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lists", default=None,
                        help=f"comma-separated of {', '.join(LISTS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="5 rounds, no galore-torch, the "
                        "24-layer list unless --lists is given (< 30 s on 2 loaded cores)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved timing rounds (default 61)")
    parser.add_argument("--only", default="", help="comma-separated substrings of optimizer names "
                        "(AdamW always runs: it is the baseline)")
    parser.add_argument("--layers", type=int, default=0,
                        help="override the lists' 24 layers (0: keep; the smoke test uses 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--json", default="", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.lists is None:
        args.lists = "24layer" if args.quick else ",".join(LISTS)
    keys = [k.strip() for k in args.lists.split(",") if k.strip()]
    for k in keys:
        if k not in LISTS:
            parser.error(f"--lists: unknown list {k!r}; available: {', '.join(LISTS)}")
    rounds = args.rounds or (5 if args.quick else 61)
    # every counted and timed step must come before the refresh at step T
    if not 1 <= rounds <= GAP - WARMUP - COUNTED - 2:
        parser.error(f"--rounds must be between 1 and {GAP - WARMUP - COUNTED - 2} "
                     f"(all steps before the refresh at T = {GAP}), got {rounds}")
    if args.layers < 0:
        parser.error(f"--layers must be positive, got {args.layers}")
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    only = [o.strip() for o in args.only.split(",") if o.strip()] or None
    tuned = keep_freed_memory()  # before the first contender: all step under the same malloc
    heap = "gradproj's (heap.py)" if tuned else "the C library's own"
    print(f"CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s), {rounds} rounds, "
          f"malloc thresholds: {heap}")
    results = {}
    for key in keys:
        results[key] = bench_list(key, rounds, only, peers=not args.quick, layers=args.layers)
        print(table(results[key]), flush=True)
    print()
    print("\n".join(summary(results[keys[0]])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "malloc_tuned": tuned,
                       "rounds": rounds, "rank": RANK, "update_gap": GAP, "lists": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
