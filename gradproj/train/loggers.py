"""Metric sinks behind one interface: `write(record)` and `close()`.

    [log]
    backends = ["jsonl", "tensorboard"]     # "jsonl" always: plots and resume read it

* `jsonl`: `metrics.jsonl` (`metrics.MetricsWriter`), one JSON object per record, keys
  unchanged (`loss/train`, `lr`, ...).
* `tensorboard`: event files under `RUN_DIR/tensorboard/` (torch.utils.tensorboard; needs
  the `tensorboard` package): every numeric value as a scalar at `record["step"]`,
  strings as text. On resume, `purge_step` drops what a killed run logged after its
  checkpoint, as metrics.jsonl does.
* `wandb`: Weights & Biases in offline mode (`RUN_DIR/wandb/`, nothing is sent; `wandb
  sync` uploads later), the run id kept in `RUN_DIR/wandb-id` so a resume continues the
  same run.

The optional packages are imported when a run starts; the spec check refuses a backend
whose package is missing, in one line naming what to install.
"""
from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path
from typing import Iterable, Protocol

from .metrics import MetricsWriter

BACKENDS = ("jsonl", "tensorboard", "wandb")
PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard (or 'gradproj[hf]')"),
            "wandb": ("wandb", "pip install wandb")}
TB_DIR = "tensorboard"


class Logger(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


def missing_package(backend: str) -> str | None:
    """None when `backend` can run here, else what to install."""
    if backend not in PACKAGES:
        return None
    module, hint = PACKAGES[backend]
    return None if importlib.util.find_spec(module) is not None else hint


def _numeric(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class TensorBoardLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TB_DIR), purge_step=purge)

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if key == "step":
                continue
            if _numeric(value):
                self.writer.add_scalar(key, value, step)
            elif isinstance(value, str):
                self.writer.add_text(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None, config: dict | None = None):
        import wandb
        run_dir = Path(run_dir)
        id_file = run_dir / "wandb-id"
        if resume_step is None or not id_file.is_file():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(mode="offline", dir=str(run_dir), project="gradproj",
                              name=run_dir.name, id=id_file.read_text().strip(),
                              resume="allow", config=config or {})

    def write(self, record: dict) -> None:
        values = {k: v for k, v in record.items() if k != "step" and (_numeric(v) or isinstance(v, str))}
        self.run.log(values, step=int(record.get("step", 0)))

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every chosen backend; `write` goes to all of them, `close` closes all."""

    def __init__(self, sinks: Iterable[Logger]):
        self.sinks = list(sinks)

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def open_loggers(backends: Iterable[str], run_dir: Path, resume_step: int | None = None,
                 config: dict | None = None) -> Loggers:
    sinks: list[Logger] = []
    for name in backends:
        if name == "jsonl":
            sinks.append(MetricsWriter(run_dir, resume_step=resume_step))
        elif name == "tensorboard":
            sinks.append(TensorBoardLogger(run_dir, resume_step))
        elif name == "wandb":
            sinks.append(WandbLogger(run_dir, resume_step, config))
        else:
            raise ValueError(f"unknown log backend {name!r} (expected one of {', '.join(BACKENDS)})")
    return Loggers(sinks)
