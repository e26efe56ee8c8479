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
SLTRAIN = {"60m": (128, 0.03), "130m": (256, 0.03), "350m": (256, 0.03), "1b": (512, 0.03),
           "7b": (1024, 0.05)}
METHODS: dict[str, list[str] | Callable[[str], list[str]] | None] = {
    "AdamW BF16": None,              # the baselines of every plan
    "8-bit Adam": None,
    "GaLore": [],                    # the example as written: BF16 states, whole-model grads
    "GaLore 8-bit": ['optimizer.preset="galore8bit"', 'optimizer.state_format="q8"', *PER_LAYER],
    "Q-GaLore": ['optimizer.preset="q-galore"', 'optimizer.state_format="q8"', *PER_LAYER],
    # SLTrain (Han et al. 2024): W = B·A + S at each size's rank (their scripts: 128, 256, 256,
    # 512, 1024 = the GaLore examples' ranks) and density (0.03; 0.05 at 7B), Adam 8-bit
    # states on the factors and values, per-layer updates — the paper's memory setting
    "SLTrain 8-bit": lambda size: [
        "model.parametrization={kind=\"sltrain\", rank=%d, density=%s}" % SLTRAIN[size],
        'optimizer.state_format="q8"', *PER_LAYER],
    # GradNormLoRP (Huang et al. 2024), 8-bit: the weight-normalised direction V (rank 0, the
    # reference's LowRankWeightNormAdamW) GaLore-projected at the example's rank, q8 states
    "GradNormLoRP 8-bit": ['model.parametrization={kind="gradnormlorp", rank=0}',
                           'optimizer.preset="galore8bit"', 'optimizer.state_format="q8"',
                           *PER_LAYER],
    "ours (best)": ['optimizer.preset="q-galore"', 'optimizer.state_format="q4"',
                    'optimizer.lowrank.refresh="fixed"', 'optimizer.lowrank.projector="gaussian"',
                    "optimizer.lowrank.projector_options={}",
                    'optimizer.lowrank.residual="apollo"', 'optimizer.lowrank.proj_type="auto"',
                    "optimizer.lowrank.scale=1.0", *PER_LAYER],
}


def example(size: str, root: Path | None = None) -> Path:
    root = root or Path(__file__).resolve().parents[2] / "examples"
    return root / f"llama-{size}-galore.toml"


def overrides_of(method: str, size: str) -> list[str]:
    overrides = METHODS[method]
    return overrides(size) if callable(overrides) else list(overrides or [])


def plan_cell(size: str, method: str, root: Path | None = None) -> MemoryPlan:
    overrides = overrides_of(method, size)
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
    text, plans = table(args.sizes)
    print("optimizer memory (states + bases + scales), % less than BF16 AdamW / total training "
          "memory, GB = 1e9 bytes; bf16 weights, 1 x 256 tokens, no activation checkpointing")
    print(text)
    print("\ntotal training memory, % less than BF16 AdamW's total (SLTrain's \"up to 73 %\" "
          "is this figure at 7B):")
    for size in args.sizes:
        adamw = plans[size, "AdamW BF16"][1]
        print(f"  {size.upper()}: " + ", ".join(
            f"{m} {100 * (1 - plans[size, m][1] / adamw):.1f}%" for m in METHODS if m != "AdamW BF16"))
    print("\noverrides of examples/llama-SIZE-galore.toml per method:")
    for method, overrides in METHODS.items():
        if overrides:
            shown = overrides_of(method, "7b")
            where = " (7B; rank/density per size: tables.SLTRAIN)" if callable(overrides) else ""
            print(f"  {method}{where}: " + " ".join(f"--set '{o}'" for o in shown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
