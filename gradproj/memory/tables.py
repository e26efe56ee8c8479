"""The papers' memory table, reproduced by the planner: `python -m gradproj.memory.tables`.

One row per paper size (examples/llama-{60m,130m,350m,1b,7b}-galore.toml), one column per
method. Every method is the size's GaLore example with `--set` overrides, so a cell is
reproduced by `gradproj memory EXAMPLE --set ...` with the overrides below.
All rows store weights in bfloat16 (the examples' `[train] dtype`, the papers' setting) and use a 256-token micro-batch
(1 x 256, the token batch of GaLore's Figure 1) without activation checkpointing.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..train.spec import load_spec
from .plan import MemoryPlan, plan_memory
from .report import GB, change

SIZES = ("60m", "130m", "350m", "1b", "7b")
PER_LAYER = ["train.per_layer=true", "train.grad_clip=0.0"]  # per-layer forbids a global clip
METHODS: dict[str, list[str] | None] = {
    "AdamW BF16": None,              # the baselines of every plan
    "8-bit Adam": None,
    "GaLore": [],                    # the example as written: BF16 states, whole-model grads
    "GaLore 8-bit": ['optimizer.preset="galore8bit"', 'optimizer.state_format="q8"', *PER_LAYER],
    "Q-GaLore": ['optimizer.preset="q-galore"', 'optimizer.state_format="q8"', *PER_LAYER],
    "ours (best)": ['optimizer.preset="q-galore"', 'optimizer.state_format="q4"',
                    'optimizer.lowrank.refresh="fixed"', 'optimizer.lowrank.projector="gaussian"',
                    "optimizer.lowrank.projector_options={}",
                    'optimizer.lowrank.residual="apollo"', 'optimizer.lowrank.proj_type="auto"',
                    "optimizer.lowrank.scale=1.0", *PER_LAYER],
}


# Weight-side methods (a [model.parametrization]), a table of their own: total training
# memory against BF16 AdamW's total, the figure their papers quote. A method maps a size
# to its overrides of the size's GaLore example.
SLTRAIN = {"60m": (128, 0.03), "130m": (256, 0.03), "350m": (256, 0.03), "1b": (512, 0.03),
           "7b": (1024, 0.05)}  # their scripts' rank (= the GaLore examples') and density
WEIGHT_SIDE: dict[str, Callable[[str], list[str]]] = {
    # SLTrain (Han et al. 2024): W = B·A + S, Adam 8-bit states on the factors and values,
    # per-layer updates — the paper's "up to 73 % less memory" setting at 7B
    "SLTrain 8-bit": lambda size: [
        "model.parametrization={kind=\"sltrain\", rank=%d, density=%s}" % SLTRAIN[size],
        'optimizer.state_format="q8"', *PER_LAYER],
    # ... and B, A and S's values stored INT8 (+ fp32 scale per 256), trained with
    # stochastic rounding as Q-GaLore's weights: beyond the paper (its code quantizes the
    # optimizer states only: bitsandbytes Adam8bit)
    "SLTrain 8-bit + INT8": lambda size: [
        "model.parametrization={kind=\"sltrain\", rank=%d, density=%s, int8=true}" % SLTRAIN[size],
        'optimizer.state_format="q8"', *PER_LAYER],
    # GradNormLoRP (Huang et al. 2024), 8-bit: the weight-normalised direction V (rank 0, the
    # reference's LowRankWeightNormAdamW) GaLore-projected at the example's rank, q8 states
    "GradNormLoRP 8-bit": lambda size: [
        'model.parametrization={kind="gradnormlorp", rank=0}', 'optimizer.preset="galore8bit"',
        'optimizer.state_format="q8"', *PER_LAYER],
}


def weight_side_table(sizes=SIZES, root: Path | None = None) -> tuple[str, dict]:
    """Markdown table (total GB, % less than BF16 AdamW's total) and the plans' totals."""
    totals: dict[tuple[str, str], tuple[int, int]] = {}
    for size in sizes:
        for method, overrides in WEIGHT_SIDE.items():
            plan = plan_memory(load_spec(example(size, root), overrides(size)), dtype="bfloat16")
            totals[size, method] = (plan.spec.total, plan.baselines["adamw-bf16"].total)
    lines = ["| model | AdamW BF16 total | " + " | ".join(WEIGHT_SIDE) + " |",
             "|" + "---|" * (len(WEIGHT_SIDE) + 2)]
    for size in sizes:
        base = totals[size, next(iter(WEIGHT_SIDE))][1]
        cells = [f"{t / GB:.2f} ({change(1 - t / b)})" for (t, b) in
                 (totals[size, m] for m in WEIGHT_SIDE)]
        lines.append(f"| {size.upper()} | {base / GB:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines), totals


def example(size: str, root: Path | None = None) -> Path:
    root = root or Path(__file__).resolve().parents[2] / "examples"
    return root / f"llama-{size}-galore.toml"


def plan_cell(size: str, method: str, root: Path | None = None) -> MemoryPlan:
    overrides = METHODS[method] or []
    return plan_memory(load_spec(example(size, root), overrides), dtype="bfloat16")


def table(sizes=SIZES, root: Path | None = None) -> tuple[str, dict]:
    """Markdown table (optimizer memory / total, GB) and the plans behind it."""
    plans: dict[tuple[str, str], tuple[int, int]] = {}
    for size in sizes:
        for method, overrides in METHODS.items():
            if overrides is None:
                continue
            plan = plan_cell(size, method, root)
            plans[size, method] = (plan.spec.optimizer_memory, plan.spec.total)
            if method == "GaLore":
                for name, key in (("AdamW BF16", "adamw-bf16"), ("8-bit Adam", "adam-8bit")):
                    base = plan.baselines[key]
                    plans[size, name] = (base.optimizer_memory, base.total)
    head = "| model | " + " | ".join(METHODS) + " |"
    lines = [head, "|" + "---|" * (len(METHODS) + 1)]
    for size in sizes:
        adamw = plans[size, "AdamW BF16"][0]
        cells = []
        for method in METHODS:
            opt, total = plans[size, method]
            saved = "" if method == "AdamW BF16" else f" ({change(1 - opt / adamw)})"
            cells.append(f"{opt / GB:.2f}{saved} / {total / GB:.2f}")
        lines.append(f"| {size.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines), plans


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gradproj.memory.tables",
                                     description="the papers' memory table, from the planner")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    args = parser.parse_args(argv)
    text, _ = table(args.sizes)
    print("optimizer memory (states + bases + scales), % less than BF16 AdamW / total training "
          "memory, GB = 1e9 bytes; bf16 weights, 1 x 256 tokens, no activation checkpointing")
    print(text)
    print("\noverrides of examples/llama-SIZE-galore.toml per method:")
    for method, overrides in METHODS.items():
        if overrides:
            print(f"  {method}: " + " ".join(f"--set {o}" for o in overrides))
    text, totals = weight_side_table(args.sizes)
    print("\nweight-side methods ([model.parametrization]): total training memory, GB "
          "(% less than BF16 AdamW's total), same setting")
    print(text)
    for method, overrides in WEIGHT_SIDE.items():
        where = " (7B; per size: tables.SLTRAIN)" if method.startswith("SLTrain") else ""
        print(f"  {method}{where}: " + " ".join(f"--set '{o}'" for o in overrides("7b")))
    if "7b" in args.sizes:  # SLTrain's abstract: "up to 73 %" at 7B
        cuts = {m: 1 - t / b for (size, m), (t, b) in totals.items()
                if size == "7b" and m.startswith("SLTrain")}
        print(f"  SLTrain at 7B (rank 1024, δ 0.05, bf16, q8 states, per-layer updates): "
              f"{change(cuts['SLTrain 8-bit'])} than BF16 AdamW (the paper: up to 73 %, its "
              f"code's Adam8bit per layer); B, A, S also INT8: "
              f"{change(cuts['SLTrain 8-bit + INT8'])}")
    if "7b" in args.sizes:  # GradNormLoRP quotes optimizer memory, not the total
        plan = plan_memory(load_spec(example("7b"), WEIGHT_SIDE["GradNormLoRP 8-bit"]("7b")),
                           dtype="bfloat16")
        opt, base = plan.spec.optimizer_memory, plan.baselines["adamw-bf16"].optimizer_memory
        print(f"  GradNormLoRP 8-bit optimizer memory at 7B: {opt / GB:.2f} GB, "
              f"{change(1 - opt / base)} than BF16 AdamW's {base / GB:.2f} GB (the paper: "
              f"up to -89.5 %, not derivable from its setting: see README)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
