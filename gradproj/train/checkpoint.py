"""Atomic, exactly resumable checkpoints: safetensors for tensors, one JSON for the rest.

Layout of a run folder's `checkpoints/`:

    step-200/  model.safetensors  optimizer.safetensors  extra.safetensors  meta.json
    step-300/  ...
    latest     the name of the newest complete folder ("step-300")

A checkpoint is written into `.tmp-step-N/`, every file is fsynced, `meta.json` (which
lists every file with its size) is written last, and only then is the folder renamed to
`step-N/` — a rename is atomic, so a `step-N/` folder is complete or absent. The `latest`
pointer is replaced atomically after that. A process killed at any point leaves either
the previous checkpoint as latest, or the new one; `.tmp-*` folders are never read and are
swept on the next write. Old checkpoints beyond keep-last-K are renamed to `.trash-*`
before deletion, so a half-deleted folder never looks complete.

Optimizer state is tensors and plain scalars only (see LowRankOptimizer): tensors go to
`optimizer.safetensors` under `<param index>/<key>`, scalars and param-group options to
JSON. JSON round-trips every float64 exactly (repr), so resume is bit-identical.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the run's model/optimizer."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(value: Any, where: str) -> Any:
    """JSON-ready copy of a scalar / list / dict of scalars; anything else is a bug to name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise CheckpointError(f"{where} is a {type(value).__name__}; optimizer state and options "
                          f"must be tensors or plain scalars to be checkpointed")


def optimizer_to_flat(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = _plain(value, f"state[{idx}].{key}")
    groups = [_plain(g, f"param_groups[{i}]") for i, g in enumerate(sd["param_groups"])]
    return tensors, {"state": scalars, "param_groups": groups}


def optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = tensor
    for idx, scalars in meta["state"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = []
    for saved, current in zip(meta["param_groups"], opt.param_groups):
        # JSON has no tuples: give back the tuple type an option had (betas)
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) and isinstance(v, list)
                       else v for k, v in saved.items()})
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"checkpoint has {len(groups)} parameter groups, the optimizer "
                              f"{len(opt.param_groups)}")
    opt.load_state_dict({"state": state, "param_groups": groups})


@dataclass(frozen=True)
class Loaded:
    step: int
    path: Path
    loop: dict      # the training loop's own counters (skipped steps, tokens, ...)


class CheckpointManager:
    def __init__(self, run_dir: Path, keep_last: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    # -- writing -----------------------------------------------------------------
    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
             scheduler: Any, loop: dict) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-*"):  # a write killed earlier
            shutil.rmtree(stale, ignore_errors=True)
        final = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        tmp.mkdir()
        opt_tensors, opt_meta = optimizer_to_flat(opt)
        extra = {"rng/torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                extra[f"rng/cuda{i}"] = s
        model_sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        self._write_tensors(tmp / "model.safetensors", model_sd)
        self._write_tensors(tmp / "optimizer.safetensors", opt_tensors)
        self._write_tensors(tmp / "extra.safetensors", extra)
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        meta = {"format": FORMAT_VERSION, "step": step, "optimizer": opt_meta,
                "scheduler": _plain(sched, "scheduler"), "loop": _plain(loop, "loop")}
        return self._publish(tmp, final, meta)

    def _publish(self, tmp: Path, final: Path, meta: dict) -> Path:
        """Write meta.json (with every file's size) last, then rename tmp -> final and
        repoint `latest`, each step fsynced: a reader sees a whole checkpoint or none."""
        meta["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _fsync_file(tmp / "meta.json")
        _fsync_dir(tmp)
        if final.exists():  # a resumed run re-reaching a step it saved before being killed
            self._discard(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        _fsync_file(pointer)
        os.replace(pointer, self.root / "latest")
        _fsync_dir(self.root)
        self._prune()
        return final

    @staticmethod
    def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(path), metadata={"format": str(FORMAT_VERSION)})
        _fsync_file(path)

    def _discard(self, folder: Path) -> None:
        trash = folder.with_name(f".trash-{folder.name}")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(folder, trash)  # atomic: the folder stops looking complete at once
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        complete = self.complete_steps()
        for step in complete[:-self.keep_last]:
            self._discard(self.root / f"step-{step}")

    # -- reading -----------------------------------------------------------------
    def damage(self, folder: Path) -> str | None:
        """Why `folder` is not a complete checkpoint, in a few words; None when it is."""
        try:
            files = json.loads((folder / "meta.json").read_text())["files"]
            sizes = {str(name): int(size) for name, size in files.items()}
        except FileNotFoundError:
            return "meta.json is missing" if folder.is_dir() else "the folder is missing"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            return f"meta.json is unreadable ({type(exc).__name__})"
        for name, size in sizes.items():
            try:
                actual = (folder / name).stat().st_size
            except OSError:
                return f"{name} is missing"
            if actual != size:
                return f"{name} is {actual} bytes, meta.json lists {size}"
        return None

    def is_complete(self, folder: Path) -> bool:
        return self.damage(folder) is None

    def complete_steps(self) -> list[int]:
        if not self.root.is_dir():
            return []
        steps = [int(m.group(1)) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name))]
        return sorted(s for s in steps if self.is_complete(self.root / f"step-{s}"))

    def latest(self) -> Path | None:
        """The folder `latest` names if it is complete, else the newest complete one.

        Skipping the folder `latest` names prints one line to stderr (rank 0 only) saying
        which and why, so a resume from an older step is never silent."""
        try:
            name = (self.root / "latest").read_text().strip()
        except OSError:  # no pointer yet: nothing was skipped
            name = None
        why = None
        if name is not None:
            named = self.root / name
            why = self.damage(named) if STEP_DIR.match(named.name) else "not a step-N folder"
            if why is None:
                return named
        steps = self.complete_steps()
        found = self.root / f"step-{steps[-1]}" if steps else None
        if why is not None and os.environ.get("RANK", "0") == "0":
            instead = f"using {found.name}" if found else "no other complete checkpoint"
            print(f"checkpoint: skipping the latest one, {self.root / name} ({why}); {instead}",
                  file=sys.stderr, flush=True)
        return found

    def load(self, model: torch.nn.Module, opt: torch.optim.Optimizer, scheduler: Any,
             folder: Path | None = None) -> Loaded:
        folder = folder or self.latest()
        if folder is None:
            raise CheckpointError(f"no complete checkpoint under {self.root}")
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{folder}: checkpoint format {meta.get('format')}, "
                                  f"this gradproj reads {FORMAT_VERSION}")
        if meta.get("layout") == "dcp":  # written under FSDP2: read at this world size (one)
            from ..distributed.dcp import load_checkpoint
            return load_checkpoint(folder, meta, model, opt, scheduler)
        model_sd = load_file(str(folder / "model.safetensors"))
        missing, unexpected = model.load_state_dict(model_sd, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{folder}: model does not match the spec "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        optimizer_from_flat(opt, load_file(str(folder / "optimizer.safetensors")),
                            meta["optimizer"])
        scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
        extra = load_file(str(folder / "extra.safetensors"))
        torch.set_rng_state(extra["rng/torch_cpu"])
        if torch.cuda.is_available():
            states = [extra[k] for k in sorted(extra) if k.startswith("rng/cuda")]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        return Loaded(step=int(meta["step"]), path=folder, loop=meta["loop"])
