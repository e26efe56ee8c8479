"""Metrics: JSONL records, a progress bar (tqdm), and loss-curve plots.

Keys carry a group and a unit, as torchtitan names them: `loss/train`, `loss/eval`,
`ppl/eval`, `lr`, `time/step(s)`, `throughput/tokens_per_s`, `memory/optimizer_state(MiB)`,
`memory/grad_peak(MiB)`, `subspace/refreshes`, `steps/skipped`. Each record has `step`,
the number of optimizer steps completed. matplotlib is imported only when a plot is drawn.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterable, TextIO

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
MIB = float(1 << 20)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything after it is unwritten
    return records


class MetricsWriter:
    """Appends one JSON object per line and flushes it, so a killed run keeps its records."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None:
            # drop what the killed run logged after its checkpoint: the resumed run logs
            # those steps again, and the file must read as one uninterrupted run
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)
        self._file = self.path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Progress:
    """Training progress on stderr: a tqdm bar on a terminal; in a log file (not a TTY),
    one plain line per tenth of the run (and the last step), not one per update."""

    LINES = 10  # plain lines a whole run prints when stderr is not a terminal

    def __init__(self, total: int, start: int = 0, stream: TextIO | None = None,
                 enabled: bool = True):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.t0 = time.perf_counter()
        self.bar = None
        self.next_line = 0

    def _open_bar(self):
        from tqdm import tqdm
        self.bar = tqdm(total=self.total, initial=self.start, file=self.stream, unit="step",
                        dynamic_ncols=True, leave=True)

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.bar is None:
                self._open_bar()
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {loss:.4f} | {tokens_per_s / 1e3:.1f}k tok/s",
                                     refresh=True)
            return
        if step < self.next_line and step != self.total:
            return
        every = max(1, self.total // self.LINES)
        self.next_line = (step // every + 1) * every
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / done * (self.total - step) if done else float("inf")
        self.stream.write(f"step {step}/{self.total} loss {loss:.4f} | "
                          f"{tokens_per_s / 1e3:.1f}k tok/s | ETA {_duration(eta)}\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
            return
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


def _series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_runs(run_dirs: list[Path], out: Path, baseline: float | None = None) -> Path:
    """Train (solid) and eval (dashed, markers) loss of each run on one figure."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed; the PNG is the product
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, run_dir in enumerate(run_dirs):
        records = read_metrics(run_dir)
        color = f"C{i % 10}"
        label = Path(run_dir).name
        # the mean over each log interval: a single step's loss is noisy at batch 16
        key = "loss/train_avg" if any("loss/train_avg" in r for r in records) else "loss/train"
        steps, train = _series(records, key)
        ax.plot(steps, train, color=color, lw=1.2, label=f"{label} train")
        steps, evals = _series(records, "loss/eval")
        if evals:
            ax.plot(steps, evals, color=color, ls="--", marker="o", ms=3, label=f"{label} eval")
    if baseline is not None:
        ax.axhline(baseline, color="gray", ls=":", lw=1, label=f"unigram baseline {baseline:.3f}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
