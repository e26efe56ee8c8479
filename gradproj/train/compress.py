"""`gradproj compress SPEC --ratio 0.5`: WeLore-compress a trained run's model into one file.

SPEC is the spec the run was trained with (its `[checkpoint].dir` holds the checkpoints;
a run folder's own spec.toml works too). The latest complete checkpoint's weights are
compressed with the `welore` parametrization — per-matrix ranks from the singular values,
one global threshold for `--ratio` of the targeted matrices' parameters — and the
converted model's state dict is written as safetensors, the kept ranks in its metadata.
Fine-tune from it with

    [model.parametrization]
    kind = "welore"
    compressed = "PATH"          # trains only the low-rank factors (train_rest = false)
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

HELP = "WeLore-compress a trained run's model (safetensors, for fine-tuning its factors)"


def add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="the TOML spec the run was trained with")
    p.add_argument("--ratio", type=float, default=0.5,
                   help="share of the targeted matrices' parameters to remove (default 0.5)")
    p.add_argument("--min-ratio", type=float, default=None,
                   help="a matrix becomes factors only if it drops more than this share of "
                        "its rank (default 0.4999, WeLore's fine-tuning script; its "
                        "compression-only script uses 0)")
    p.add_argument("--out", default=None,
                   help="output file (default: RUN_DIR/welore-RATIO.safetensors)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec value, e.g. --set checkpoint.dir=\"runs/x\"")


def _flags(exc: Exception) -> str:
    """The plugin's "option 'min_ratio' ..." as the command's "--min-ratio ..."."""
    return re.sub(r"option '(\w+)'", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))


def cmd_compress(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    from ..parametrizations import apply_parametrization, linear_module_names
    from ..parametrizations.welore import WeLore, compressed_metadata
    from .checkpoint import CheckpointManager
    from .cli import UserError
    from .model import build_model
    from .spec import load_spec

    spec = load_spec(args.spec, args.overrides)  # SpecError: one line per problem, exit 2
    if spec.optimizer.parametrization:
        raise UserError(f"compress: {args.spec} trains with [model.parametrization] kind = "
                        f"{spec.optimizer.parametrization['kind']!r}; compress a run with "
                        f"dense weights")
    folder = CheckpointManager(spec.run_dir).latest()
    if folder is None:
        raise UserError(f"compress: no complete checkpoint under {spec.run_dir / 'checkpoints'}; "
                        f"train first with `gradproj train {args.spec}`")
    options = {"ratio": args.ratio}
    if args.min_ratio is not None:
        options["min_ratio"] = args.min_ratio
    try:
        param = WeLore(**options)
    except ValueError as exc:
        raise UserError(f"compress: {_flags(exc)}") from None
    model = build_model(spec.model).to(getattr(torch, spec.train.dtype))
    missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")),
                                                strict=False)
    if missing or unexpected:
        raise UserError(f"compress: {folder} does not match {args.spec}'s [model] "
                        f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    names = linear_module_names(model, spec.optimizer.targets)
    dense = sum(model.get_submodule(n).weight.numel() for n in names)
    try:
        layers = apply_parametrization(model, param, names)
    except ValueError as exc:
        raise UserError(f"compress: {_flags(exc)}") from None
    out = Path(args.out) if args.out else spec.run_dir / f"welore-{args.ratio:g}.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(out), metadata=compressed_metadata(param))
    kept = sum(m.dense_weight().numel() if not m.low_rank else m.A.numel() + m.B.numel()
               for m in layers.values())
    lrc = sum(m.low_rank for m in layers.values())
    print(f"compressed {len(layers)} matrices of {folder}: {lrc} low-rank (factors, trained), "
          f"{len(layers) - lrc} dense (frozen); parameters {dense} -> {kept} "
          f"({1 - kept / dense:.1%} less), threshold {param.info['threshold']:.4f}; wrote {out}")
    return 0


__all__ = ["HELP", "add_compress_args", "cmd_compress"]
