"""Convergence: the same small LLaMA, data and token budget under every method, lr swept, 2 seeds.

    python benchmarks/convergence.py                   # full: 2000 steps, every lr a full run
    python benchmarks/convergence.py --jobs 16         # the same, 16 runs at a time
    python benchmarks/convergence.py --max-runs 10     # at most 10 new runs, then the table so far
    python benchmarks/convergence.py --quick           # smoke: 40 steps, one lr, 2 seeds
    python benchmarks/convergence.py --device cuda --jobs 8   # a GPU table (its own ledger)
    python benchmarks/convergence.py --methods adamw,galore --rerun "GaLore (svd)"

Each method is a run spec that differs from the others only in its `[optimizer]` tables
(a preset from the `PRESETS` registry plus rank and refresh gap; SLTrain's rows in their
`[model.parametrization]`), trained by the package's own `Trainer` on the tiny
byte-level model (0.86M parameters), 2000 steps × 2048 tokens.

* **lr, swept on full-length runs.** Each value of the method's half-decade grid is a
  full 2000-step run at the first seed. The best value (final eval loss) must lie strictly
  inside the grid: while it is at an edge the grid grows one half-decade past that edge
  (up to --extend times) — a best lr at an edge says only that the optimum is beyond it.
  A method still at an edge after that is starred in the table.
* **2 seeds.** The best lr is re-run at the second seed (model init and data order);
  the table gives both, their mean and the half-range (the spread). A difference between
  two methods smaller than their spreads is not a result.
* **AdamW is GaLore without projection:** the `galore` preset with no projected targets,
  so its embeddings, head and norms take exactly the rule, ε (1e-6), betas, weight decay
  and code path they take in the GaLore runs, and every other weight takes the same
  full-rank AdamW. Only the projection differs.
* **A ledger, so the table fills in across sittings** (convergence_ledger.py): one
  2000-step run takes ~8.5 CPU-minutes here and the table needs ~100 runs (~14 CPU-hours).
  Every finished run is one JSON record under OUT/ledger, stamped with the sha of its
  whole run spec and the commit it ran at; a later invocation reuses matching records and
  runs only what is missing, in table order (rows finish one after the other).

Writes, under --out (default benchmarks/results/convergence, checked in): `ledger/`,
`results.md` (per method the lr sweep, final eval loss per seed, mean ± spread, vs AdamW,
optimizer-state memory, step time relative to AdamW's; unfinished methods with their runs
so far), `results.json` and `loss.png` (the best-lr runs, first seed); run folders go to
OUT/work (not checked in). A method whose preset is not registered is reported missing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

import gradproj as gp
from gradproj.train.loop import Trainer
from gradproj.train.metrics import read_metrics
from gradproj.train.model import MODEL_PRESETS, build_model
from gradproj.train.spec import spec_from_dict

from convergence_ledger import Ledger, Sweep, commit, fingerprint, run_sweeps, stamp

STEPS = 2000   # the side-by-side run: 2000 × 2048 tokens (the 300 of before: warm-up)
RANK = 32      # a quarter of the tiny model's width 128, as GaLore's 60M recipe (128 of 512)
GAP = 200      # refresh gap T, GaLore's: 10 refreshes in 2000 steps
SEEDS = (0, 1)
LEDGER = Path(__file__).resolve().parent / "results" / "convergence"
# "(none)" matches no module name, so no weight is projected; see the module docstring
NO_PROJECTION = {"lowrank": {"targets": ["(none)"]}}

# name -> (preset, overrides of the preset, initial lr grid). Half-decade grids around each
# method's published lr: AdamW and FRUGAL 1e-3..1e-2 (the 2000-step AdamW sweep
# found 3e-3 best of 1e-3/3e-3/6e-3), the GaLore family 3e-3..3e-2 (galore-torch's best at
# 2000 steps there was 2e-2, 1e-2 worse). The middle value is --quick's lr.
ADAMW_GRID = (1e-3, 3e-3, 1e-2)
LOW = (3e-3, 1e-2, 3e-2)
SOPHIA_GRID = (3e-4, 1e-3, 3e-3)
ZO_GRID = (1e-4, 3e-4, 1e-3)


def sltrain(rank: int, density: float) -> dict:
    """SLTrain's table at α/r = 0.25, as their 60M recipe (α 32, r 128) and examples/sltrain.toml."""
    return {"kind": "sltrain", "rank": rank, "alpha": 0.25 * rank, "density": density}


def equal_trainable_rank(rank: int, density: float) -> int:
    """The rank r' of pure B·A with SLTrain's trainable count: r'(m+n) ≈ r(m+n) + δmn."""
    shapes = [(m.out_features, m.in_features)
              for n, m in build_model(MODEL_PRESETS["tiny"], device="meta").named_modules()
              if type(m) is torch.nn.Linear and any(t in n for t in ("attn", "mlp"))]
    sparse = sum(int(density * m * n) for m, n in shapes)
    return rank + round(sparse / sum(m + n for m, n in shapes))


METHODS: dict[str, tuple[str, dict, tuple[float, ...]]] = {
    "AdamW": ("galore", NO_PROJECTION, ADAMW_GRID),
    "GaLore (svd)": ("galore", {}, LOW),
    "GaLore (randomized)": ("galore", {"projector": "randomized"}, LOW),
    "GaLore 8-bit": ("galore8bit", {}, LOW),
    "Q-GaLore": ("q-galore", {}, LOW),
    "Fira": ("fira", {}, LOW),
    "FRUGAL": ("frugal", {}, ADAMW_GRID),
    "APOLLO": ("apollo", {}, LOW),
    "APOLLO-Mini": ("apollo-mini", {"rank": 1}, LOW),  # rank 1 by definition
    # the other base optimizers, at full rank (as "AdamW": no projected weights) and behind
    # GaLore's projection. LAMB's trust ratio fixes each step's norm at lr·min(‖W‖, 10), so
    # GaLore's α no longer shrinks it: AdamW's grid for both.
    "LAMB": ("lamb", NO_PROJECTION, ADAMW_GRID),
    "GaLore-LAMB": ("lamb", {}, ADAMW_GRID),
    "diffGrad": ("diffgrad", NO_PROJECTION, ADAMW_GRID),
    "GaLore-diffGrad": ("diffgrad", {}, LOW),
    "AdamP": ("adamp", NO_PROJECTION, ADAMW_GRID),
    "GaLore-AdamP": ("adamp", {}, LOW),
    # Sophia-G, full rank (as the paper) and in GaLore's subspace; its steps are at most lr
    # per coordinate (clipped, Lion-like), so its grid sits below AdamW's (the official
    # GPT-2 small recipe: lr 6e-4). Its GNB curvature pass runs every 10 steps
    "Sophia": ("sophia", NO_PROJECTION, SOPHIA_GRID),
    "GaLore-Sophia": ("sophia", {}, SOPHIA_GRID),
    # zeroth-order (MeZO, ZO-SGD: forwards only, see benchmarks/zeroth_order.py): full z on
    # every weight, and z in the projected weights' basis (zo_subspace); `train` keys go
    # to [train]. Grid below the backprop methods': at 8 x 64 tokens 2e-3 diverged
    "MeZO": ("mezo", {**NO_PROJECTION, "train": {"gradient": "zeroth-order"}}, ZO_GRID),
    "MeZO (low-rank z)": ("mezo", {"train": {"gradient": "zeroth-order", "zo_subspace": True}},
                          ZO_GRID),
    # weight-side pre-training (SLTrain, Han et al. 2024): every attention and MLP weight is
    # (α/r)·B·A + S, S 3 % sparse on a seeded support, trained by full-rank AdamW; against
    # pure low-rank B·A (density 0; B starts U(±1/√r) there, as ReLoRA's lora_only: with
    # B = 0 it cannot train) at the rank with the same trainable count (issue 16).
    # The parametrization converts the projection targets; SLTrain's factors are not
    # projected (project_factors false), so every parameter takes AdamW's full-rank rule
    "SLTrain": ("galore", {"model": {"parametrization": sltrain(RANK, 0.03)}}, ADAMW_GRID),
    "Low-rank B·A": ("galore", {"model": {"parametrization": sltrain(
        equal_trainable_rank(RANK, 0.03), 0.0)}}, ADAMW_GRID),
}
LOWRANK_KEYS = {"projector", "rank", "update_gap", "scale", "residual", "targets"}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def spec_dict(name: str, lr: float, seed: int, steps: int, run_dir: Path, args) -> dict:
    preset, overrides, _ = METHODS[name]
    optimizer: dict = {"lr": lr, "weight_decay": 0.0, "preset": preset}
    lowrank: dict = {"rank": RANK, "update_gap": GAP}
    train = dict(overrides.get("train", {}))
    for key, value in overrides.items():
        if key in ("train", "model"):
            continue
        if key == "lowrank":
            lowrank.update(value)
        else:
            (lowrank if key in LOWRANK_KEYS else optimizer)[key] = value
    optimizer["lowrank"] = lowrank
    return {
        "model": {"preset": "tiny",  # 0.86M-parameter byte-level LLaMA (dim 128, 4 layers)
                  **overrides.get("model", {})},
        "data": {"source": "embedded", "seq_len": 128},
        "optimizer": optimizer,
        "train": {"steps": steps, "batch_size": 16,        # 2048 tokens per step
                  "warmup_steps": max(1, steps // 10),     # 10 % warmup, cosine to 0.1·lr
                  "lr_schedule": "cosine", "seed": seed, "grad_clip": 0.0,
                  "eval_every": max(1, steps // 10), "eval_batches": args.eval_batches,
                  "threads": args.threads, **train,
                  # "cpu" is the spec's default: left out, so the CPU ledger's fingerprints
                  # are those of the runs made before this option existed
                  **({"device": args.device} if args.device != "cpu" else {})},
        "checkpoint": {"dir": str(run_dir), "every": 0, "keep_last": 1},
        "log": {"every": 10, "progress": False, "plot": False},
    }


def run_key(name: str, lr: float, seed: int, steps: int) -> str:
    return f"{slug(name)}-lr{lr:g}-seed{seed}-{steps}"


def train(job: tuple) -> dict:
    """One run (a pure function of its arguments, so runs may go to worker processes)."""
    name, lr, seed, steps, work, args = job
    run_dir = Path(work) / run_key(name, lr, seed, steps)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: Trainer refuses a used folder
    start, cpu = time.perf_counter(), time.process_time()
    result = {"method": name, "lr": lr, "seed": seed, "steps": steps, "run_dir": str(run_dir)}
    try:
        summary = Trainer(spec_from_dict(spec_dict(name, lr, seed, steps, run_dir, args))).run()
    except Exception as exc:  # noqa: BLE001 - a diverged lr is a sweep result
        return {**result, "eval_loss": math.inf, "error": f"{type(exc).__name__}: {exc}",
                "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu}
    records = read_metrics(run_dir)
    memory = [r["memory/optimizer_state(MiB)"] for r in records if "memory/optimizer_state(MiB)" in r]
    eval_loss = summary["final_eval_loss"]
    return {**result,
            "eval_loss": eval_loss if eval_loss is not None and math.isfinite(eval_loss) else math.inf,
            "train_loss": summary["final_train_loss"], "skipped": summary["skipped"],
            "wall_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "state_mib": memory[-1] if memory else math.nan,
            "curve": {"train": [(r["step"], r["loss/train_avg"]) for r in records if "loss/train_avg" in r],
                      "eval": [(r["step"], r["loss/eval"]) for r in records if "loss/eval" in r]}}


def describe(r: dict) -> str:
    what = f"eval {r['eval_loss']:.4f}" if "error" not in r else r["error"]
    return f"  {r['method']} lr {r['lr']:g} seed {r['seed']}: {what} ({r.get('cpu_s', r['wall_s']):.0f} s)"


def time_steps(methods: dict[str, dict], steps: int, out: Path, args) -> None:
    """Training-step time relative to AdamW, interleaved so that it holds under load.

    Sequential runs' wall times move with whatever else the machine runs. Here one
    Trainer per method (its best lr) takes `train_step` in rotating round-robin order;
    each round's ratio to AdamW's step, median over rounds, goes into the table."""
    if not args.timing_rounds or "AdamW" not in methods:
        return
    trainers = {}
    for name, m in methods.items():
        run_dir = out / "timing" / slug(name)
        shutil.rmtree(run_dir, ignore_errors=True)
        trainers[name] = Trainer(spec_from_dict(spec_dict(name, m["lr"], SEEDS[0], steps, run_dir, args)))
    for trainer in trainers.values():
        for _ in range(2):  # the first step allocates state and fits the first basis
            trainer.train_step()
    times: dict[str, list[float]] = {name: [] for name in trainers}
    names = list(trainers)
    for k in range(args.timing_rounds):
        for name in names[k % len(names):] + names[:k % len(names)]:
            start = time.process_time()  # one thread: CPU time does not move with the load
            trainers[name].train_step()
            times[name].append(time.process_time() - start)
    for name, m in methods.items():
        m["step_ms"] = statistics.median(times[name]) * 1e3
        m["step_x_adamw"] = statistics.median(t / b for t, b in zip(times[name], times["AdamW"]))


def summarize(sweep: Sweep, quick: bool) -> dict:
    """A finished sweep's row: the first seed's sweep, the best lr's runs over the seeds."""
    lr, edge = sweep.best()
    first = sweep.first_seed()
    runs = [sweep.results[(lr, seed)] for seed in sweep.seeds]
    losses = [r["eval_loss"] for r in runs]
    finite = all(math.isfinite(x) for x in losses)
    return {"method": sweep.name, "lr": lr, "lr_at_edge": edge and not quick,
            "sweep": {f"{k:g}": first[k]["eval_loss"] for k in sorted(sweep.grid())},
            "seeds": {r["seed"]: r["eval_loss"] for r in runs},
            "mean": statistics.fmean(losses) if finite else math.inf,
            "spread": (max(losses) - min(losses)) / 2 if finite else math.inf,
            "state_mib": first[lr].get("state_mib", math.nan), "curve": first[lr].get("curve"),
            "commits": sorted({r.get("commit", "unknown") for r in sweep.results.values()}),
            "cpu_s": sum(r.get("cpu_s", r["wall_s"]) for r in sweep.results.values())}


def markdown(methods: dict[str, dict], missing: dict[str, str], args, steps: int) -> str:
    """The table; a `missing` entry is a row with only its reason (not registered, or the
    runs the ledger has so far for a sweep that is not finished)."""
    base = methods.get("AdamW")
    sweep_text = ("no sweep (--quick: the grid's middle lr)" if args.quick else
                  "lr swept on full-length runs at the first seed, best strictly inside the grid "
                  f"(grown past an edge up to {args.extend} times)")
    lines = [f"Tiny LLaMA (0.86M parameters, byte-level), embedded corpus, {steps} steps × 2048 "
             f"tokens, rank {RANK}, T {GAP}, seeds {', '.join(map(str, args.seeds))}; {sweep_text}. "
             "AdamW = the galore preset with no projected weights.",
             "",
             "| method | lr sweep (final eval loss, first seed) | best lr | eval loss per seed | "
             "mean ± spread | vs AdamW | optimizer state (MiB) | train step × AdamW |",
             "|---|---|---:|---|---:|---:|---:|---:|"]
    for name, m in methods.items():
        sweep = ", ".join(f"{lr}: {loss:.4f}" for lr, loss in m["sweep"].items())
        seeds = " / ".join(f"{loss:.4f}" for loss in m["seeds"].values())
        rel = f"{(m['mean'] / base['mean'] - 1) * 100:+.2f} %" if base else "—"
        speed = f"{m['step_x_adamw']:.2f}" if "step_x_adamw" in m else "—"
        edge = "*" if m["lr_at_edge"] else ""
        lines.append(f"| {name} | {sweep} | {m['lr']:g}{edge} | {seeds} | {m['mean']:.4f} ± "
                     f"{m['spread']:.4f} | {rel} | {m['state_mib']:.2f} | {speed} |")
    for name, why in missing.items():
        lines.append(f"| {name} | {why} | | | | | | |")
    lines += ["", "spread: half the range over the seeds. \\* best lr still at an edge of its grid "
              "after extending it (the optimum lies beyond). train step × AdamW: median over "
              f"{args.timing_rounds} interleaved rounds of forward, backward and optimizer step.",
              ""] + targets(methods)
    return "\n".join(lines)


def targets(methods: dict[str, dict]) -> list[str]:
    """Issue 8's convergence targets, each checked on the mean final eval losses."""
    checks = [("GaLore (svd) within 2 % of AdamW", ("GaLore (svd)", "AdamW"), 0.02),
              ("GaLore 8-bit within 0.5 % of GaLore (fp32 states)", ("GaLore 8-bit", "GaLore (svd)"), 0.005),
              ("Q-GaLore within 1 % of GaLore", ("Q-GaLore", "GaLore (svd)"), 0.01),
              ("Fira at or below GaLore", ("Fira", "GaLore (svd)"), 0.0),
              ("APOLLO at or below GaLore", ("APOLLO", "GaLore (svd)"), 0.0)]
    lines = ["| target | measured (means) | met |", "|---|---:|:-:|"]
    for text, (a, b), bound in checks:
        if a in methods and b in methods:
            value = methods[a]["mean"] / methods[b]["mean"] - 1.0
            lines.append(f"| {text} | {value * 100:+.2f} % | {'yes' if value <= bound else 'no'} |")
        else:
            lines.append(f"| {text} | not run | — |")
    return lines


def plot(methods: dict[str, dict], path: Path) -> None:
    """Train loss (averaged over each logging window, solid) and eval loss (dashed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=120)
    for i, (name, m) in enumerate(methods.items()):
        curve = m.get("curve") or {"train": [], "eval": []}
        color = f"C{i % 10}"
        train_loss, evals = curve["train"], curve["eval"]
        if train_loss:
            ax.plot(*zip(*train_loss), color=color, lw=1.0, alpha=0.8, label=f"{name} (lr {m['lr']:g})")
        if evals:
            ax.plot(*zip(*evals), color=color, ls="--", marker="o", ms=3)
    ax.set_xlabel("optimizer step (2048 tokens each)")
    ax.set_ylabel("loss (nats/byte); solid train, dashed eval")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 40 steps, the grid's middle lr")
    parser.add_argument("--steps", type=int, default=0, help=f"steps per run (default {STEPS}, --quick 40)")
    parser.add_argument("--methods", default="", help="comma-separated substrings of method names")
    parser.add_argument("--out", default="",
                        help=f"ledger and tables (default {LEDGER} for full-length runs, "
                             "runs/convergence-quick otherwise); run folders go to OUT/work")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="comma-separated; the first one runs the lr sweep")
    parser.add_argument("--extend", type=int, default=3,
                        help="times a sweep may grow past the grid edge holding its best lr")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (worker processes)")
    parser.add_argument("--max-runs", type=int, default=None,
                        help="start at most this many new runs, then write the table so far")
    parser.add_argument("--rerun", default="",
                        help="comma-separated method names whose ledger records are dropped first")
    parser.add_argument("--eval-batches", type=int, default=8, help="16 × 128 tokens each")
    # 1 thread: with other jobs on the 2 cores, 2 OpenMP threads spin against them and a
    # tiny-model step took 3.6 s instead of 0.59 s (measured here at load average 10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where every run trains (a GPU's runs are another table: "
                             "their default --out is benchmarks/results/convergence-cuda)")
    parser.add_argument("--timing-rounds", type=int, default=-1,
                        help="interleaved timing rounds (default 15, --quick 5; 0 skips)")
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    steps = args.steps or (40 if args.quick else STEPS)
    if args.timing_rounds < 0:
        args.timing_rounds = 5 if args.quick else 15
    if args.quick:
        args.eval_batches = min(args.eval_batches, 4)
    wanted = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    names = [n for n in METHODS if not wanted or any(w in n.lower() for w in wanted)]
    missing = {n: f"missing: preset {METHODS[n][0]!r} is not registered"
               for n in names if METHODS[n][0] not in gp.PRESETS}
    names = [n for n in names if n not in missing]
    full = steps == STEPS and not args.quick
    suffix = "" if args.device == "cpu" else f"-{args.device}"
    out = Path(args.out or f"{LEDGER if full else 'runs/convergence-quick'}{suffix}")
    ledger = Ledger(out / "ledger")
    commit()  # the code the runs are made with: stamped into every record
    for name in filter(None, (n.strip() for n in args.rerun.split(","))):
        print(f"--rerun: dropped {ledger.drop(slug(name))} record(s) of {name!r}")
    begin = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - begin:6.0f} s] {message}", flush=True)

    def spec_sha(name: str, lr: float, seed: int) -> str:  # the run folder is not the run
        return fingerprint(spec_dict(name, lr, seed, steps, Path("RUN"), args))

    def start(name: str, lr: float, seed: int) -> dict | None:
        return ledger.get(run_key(name, lr, seed, steps), spec_sha(name, lr, seed))

    def finish(record: dict) -> dict:
        name, lr, seed = record["method"], record["lr"], record["seed"]
        record = stamp(record, spec_sha(name, lr, seed))
        ledger.put(run_key(name, lr, seed, steps), record)
        log(describe(record))
        return record

    log(f"{len(names)} methods, {steps} steps per run, seeds {args.seeds}, {args.jobs} at a time, "
        f"load average {os.getloadavg()[0]:.1f}, ledger {ledger.folder}")
    sweeps = [Sweep(n, [METHODS[n][2][len(METHODS[n][2]) // 2]] if args.quick else list(METHODS[n][2]),
                    args.seeds, 0 if args.quick else args.extend) for n in names]
    made = run_sweeps(sweeps, start, train,
                      lambda n, lr, seed: (n, lr, seed, steps, str(out / "work"), args),
                      finish, args.jobs, args.max_runs, log)
    methods = {s.name: summarize(s, args.quick) for s in sweeps if s.done()}
    for s in sweeps:
        if not s.done():
            so_far = ", ".join(f"{lr:g}/seed {seed}: {r['eval_loss']:.4f}"
                               for (lr, seed), r in sorted(s.results.items()))
            missing[s.name] = (f"not finished ({len(s.results)} of its runs so far: {so_far})"
                               if s.results else "not started")
    log(f"{made} new runs; {len(methods)} of {len(sweeps)} methods finished; interleaved step timing")
    time_steps(methods, steps, out / "work", args)
    text = markdown(methods, missing, args, steps)
    cpu_h = sum(r.get("cpu_s", r["wall_s"]) for s in sweeps for r in s.results.values()) / 3600
    commits = sorted({r.get("commit", "unknown") for s in sweeps for r in s.results.values()})
    text += (f"\n\nRuns made at commits {', '.join(commits) or '—'}; "
             f"{cpu_h:.1f} CPU-hours of training in the ledger. This sitting: {made} new runs, "
             f"{time.perf_counter() - begin:.0f} s with {args.jobs} run(s) at a time; load average "
             f"{os.getloadavg()[0]:.1f} at the end.\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"methods": methods, "missing": missing},
                                                 indent=1, default=str))
    plot(methods, out / "loss.png")
    print("\n" + text)
    print(f"wrote {out / 'results.md'}, {out / 'loss.png'}")


if __name__ == "__main__":
    main()
