"""`gradproj memory SPEC [--set k=v] [--dtype D] [--launch ddp|fsdp2 --nproc N] [--json]`:
the planner on the command line.

Registered in `gradproj/train/cli.py` as one `COMMANDS` entry.
"""
from __future__ import annotations

import argparse

HELP = "training memory of a spec, next to AdamW-BF16 and 8-bit Adam"


def add_memory_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="TOML run spec, e.g. examples/llama-7b-galore.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.batch_size=1 (value parsed as TOML)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weight storage dtype (the papers train pure bfloat16); default: the "
                        "spec's (float32 unless it says otherwise)")
    p.add_argument("--launch", choices=("none", "ddp", "fsdp2"), default=None,
                   help="plan one rank of this launch (default: the spec's [train].parallel); "
                        "needs --nproc")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="number of ranks (torchrun --nproc_per_node x nodes): per-rank figures, "
                        "the global [train].batch_size split over them")
    p.add_argument("--json", action="store_true",
                   help='print {"spec": {...}, "baselines": {"adamw-bf16": {...}, '
                        '"adam-8bit": {...}}} with every component in bytes')


def cmd_memory(args: argparse.Namespace) -> int:
    from ..train.cli import UserError
    from ..train.spec import load_spec
    from .plan import plan_memory
    from .report import format_json, format_table

    spec = load_spec(args.spec, args.overrides)  # SpecError: one line per problem, exit 2
    try:
        plan = plan_memory(spec, dtype=args.dtype, launch=args.launch, nproc=args.nproc)
    except ValueError as exc:
        raise UserError(f"memory: {exc}") from None
    print(format_json(plan) if args.json else format_table(plan, args.spec))
    return 0


__all__ = ["HELP", "add_memory_args", "cmd_memory"]
