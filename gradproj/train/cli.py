"""`gradproj` command line: train, resume, list, plot, memory, tokenize, compress.

A subcommand is one entry of `COMMANDS`: (one-line help, a function adding its
arguments, a handler returning the exit code). Adding one is a few lines:

    COMMANDS["memory"] = ("estimate memory", add_memory_args, run_memory)

User mistakes (bad spec, missing file, run folder in use) exit with code 2 and one line
per problem on stderr, never a traceback; a diverged run exits 1 with one line.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import warnings
from pathlib import Path
from typing import Callable

from ..memory.cli import HELP as MEMORY_HELP, add_memory_args, cmd_memory
from .checkpoint import CheckpointError
from .checks import Issue, SpecError
from .compress import HELP as COMPRESS_HELP, add_compress_args, cmd_compress
from .data import DataError
from .metrics import METRICS_FILE, PLOT_FILE, plot_runs
from .pretokenize import add_tokenize_args, cmd_tokenize
from .spec import load_spec, spec_from_dict
from .tomlio import apply_overrides, parse_override, read_toml

USAGE_ERROR = 2


class UserError(Exception):
    """One-line message for the user; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + message; we print one line
        raise UserError(f"{self.prog}: {message} (see {self.prog} --help)")


def _format_duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def _report(summary: dict) -> None:
    ev = summary["final_eval_loss"]
    print(f"done: {summary['steps']} steps, {summary['tokens']} tokens in "
          f"{_format_duration(summary['train_seconds'])}; train loss "
          f"{summary['final_train_loss']:.4f}, eval loss "
          f"{ev:.4f} vs unigram baseline {summary['unigram_entropy']:.4f} nats/token; "
          f"skipped steps {summary['skipped']}; run folder {summary['run_dir']}")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning as one line (`warning: ...`), without the source line it came from."""
    text = str(message).splitlines()[0] if str(message) else category.__name__
    print(f"warning: {text}", file=file or sys.stderr)


def _run(spec, resume: bool) -> int:
    from .loop import RunDirInUse, Trainer  # torch-heavy: imported when a run starts

    for notice in spec.notices:
        print(f"notice: {notice.line(spec.source)}", file=sys.stderr)
    try:
        try:
            trainer = Trainer(spec, resume=resume)
        except (DataError, RunDirInUse):
            raise
        except ValueError as exc:
            # an option only the real model can reject (a weight group size that does not
            # fit a layer, a projector option checked at fit time): the spec's fault
            raise SpecError(spec.source, [Issue("[optimizer]", str(exc))]) from None
        summary = trainer.run()
    except DataError as exc:
        raise SpecError(spec.source, [Issue(f"[data].{exc.key}", str(exc))]) from None
    except RunDirInUse as exc:
        raise SpecError(spec.source, [Issue("[checkpoint].dir", str(exc))]) from None
    if trainer.dist.is_main:  # torchrun: one summary line, not one per rank
        _report(summary)
    return 0


# -- train ---------------------------------------------------------------------
def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="TOML run spec, e.g. examples/tiny.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set train.steps=50 (value parsed as TOML)")
    p.add_argument("--fresh", action="store_true",
                   help="delete a previous run in [checkpoint].dir first")


def cmd_train(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec, args.overrides)
    if args.fresh:
        for name in ("checkpoints", METRICS_FILE, PLOT_FILE, "spec.toml"):
            target = spec.run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    return _run(spec, resume=False)


# -- resume --------------------------------------------------------------------
def add_resume_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `gradproj train`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of the saved spec, e.g. --set train.steps=600")


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    spec_path = run_dir / "spec.toml"
    if not spec_path.is_file():
        raise UserError(f"{run_dir}: not a run folder (no spec.toml); start one with "
                        f"`gradproj train SPEC`")
    raw = read_toml(spec_path)
    try:
        overridden = apply_overrides(raw, [parse_override(o) for o in args.overrides])
    except ValueError as exc:
        raise SpecError(str(spec_path), [Issue("--set", str(exc).removeprefix("--set "))]) from None
    if isinstance(raw.get("checkpoint"), dict):  # the folder may have moved since
        raw["checkpoint"]["dir"] = str(run_dir.resolve())
    spec = spec_from_dict(raw, str(spec_path), spec_path.resolve().parent, overridden)
    return _run(spec, resume=True)


# -- list ----------------------------------------------------------------------
def add_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("kind", nargs="?", help="only this registry (projectors, rules, ...)")


def cmd_list(args: argparse.Namespace) -> int:
    from ..registry import ALL_REGISTRIES
    from .model import MODEL_PRESETS, count_parameters, build_model

    kinds = dict(ALL_REGISTRIES)
    if args.kind and args.kind not in kinds and args.kind != "models":
        from .checks import did_you_mean
        raise UserError(f"list: unknown kind {args.kind!r}"
                        f"{did_you_mean(args.kind, [*kinds, 'models'])} "
                        f"(expected one of: {', '.join([*kinds, 'models'])})")
    for kind, registry in kinds.items():
        if args.kind and args.kind != kind:
            continue
        print(f"{kind}:")
        for entry in registry:
            aliases = f" ({', '.join(entry.aliases)})" if entry.aliases else ""
            print(f"  {entry.name}{aliases}: {entry.description}")
    if not args.kind or args.kind == "models":
        print("models:")
        for name, cfg in MODEL_PRESETS.items():
            params = count_parameters(build_model(cfg, device="meta"))
            print(f"  {name}: {params / 1e6:.1f}M parameters, dim {cfg.dim}, {cfg.n_layers} "
                  f"layers, {cfg.n_heads} heads, ffn {cfg.ffn_dim}, vocab {cfg.vocab_size}")
    return 0


# -- plot ----------------------------------------------------------------------
def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run folders to overlay")
    p.add_argument("-o", "--out", help="PNG path (default: RUN_DIR/loss.png for one run, "
                                       "compare.png in the working directory for several)")


def cmd_plot(args: argparse.Namespace) -> int:
    runs = [Path(d) for d in args.run_dirs]
    for run in runs:
        if not (run / METRICS_FILE).is_file():
            raise UserError(f"{run}: no {METRICS_FILE} (not a run folder written by gradproj)")
    out = Path(args.out) if args.out else (runs[0] / PLOT_FILE if len(runs) == 1
                                           else Path("compare.png"))
    print(plot_runs(runs, out))
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], int]]] = {
    "train": ("train from a TOML run spec", add_train_args, cmd_train),
    "resume": ("continue a run from its latest complete checkpoint", add_resume_args, cmd_resume),
    "memory": (MEMORY_HELP, add_memory_args, cmd_memory),
    "list": ("list every registered plugin and model preset", add_list_args, cmd_list),
    "plot": ("plot train/eval loss of one or more runs", add_plot_args, cmd_plot),
    "tokenize": ("pre-tokenize text/JSONL into a .bin of token ids", add_tokenize_args,
                 cmd_tokenize),
    "compress": (COMPRESS_HELP, add_compress_args, cmd_compress),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gradproj", description="GaLore-family low-rank gradient "
                     "projection training.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_text, add_args, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gradproj` console script and of `python -m gradproj`."""
    parser = build_parser()
    warnings.showwarning = _show_warning
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help(sys.stderr)
            return USAGE_ERROR
        return args.handler(args)
    except SpecError as exc:
        for issue in exc.issues:
            print(f"error: {issue.line(exc.source)}", file=sys.stderr)
        return USAGE_ERROR
    except (UserError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted; continue with `gradproj resume RUN_DIR` (from the last checkpoint)",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a diverged run is not a bug: one line, exit 1
        from .loop import TrainingError
        if isinstance(exc, TrainingError):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
