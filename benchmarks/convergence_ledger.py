"""The convergence benchmark's run ledger and sweep scheduler (used by convergence.py).

The full table is ~100 runs of 8.5 CPU-minutes each: more than one sitting on a small
machine. So every finished run is written down as one JSON record, named by its method,
lr, seed and steps and stamped with a fingerprint of its complete run spec (and the commit
it ran at). A later invocation reuses every record whose fingerprint still matches and
runs only what is missing, so the table fills in across sittings and machines, and a
changed spec (another rank, data size, eval batches, ...) is never mixed with old runs.
`--rerun METHOD` drops a method's records after a change to its code.

Each method's sweep is a small state machine driven only by the records it has:
the initial grid at the first seed, then one half-decade past the edge holding the best lr
(up to `extend` times) while the best is at an edge, then the best lr at the other seeds.
The scheduler keeps `jobs` runs in flight, taking the next runnable run of the
first unfinished method in table order, so the rows complete one after the other.
"""
from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import subprocess
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Callable


def half_decade(lr: float, up: bool) -> float:
    """The next value of the 1-3-10 grid: 3e-2 -> 1e-1 up, 1e-3 -> 3e-4 down."""
    three = float(f"{lr:.0e}".split("e")[0]) >= 3
    factor = 10 / 3 if three == up else 3
    return float(f"{lr * factor if up else lr / factor:.0e}")


def best_of(sweep: dict[float, dict]) -> tuple[float, bool]:
    """(best lr, whether it is at an edge of the grid swept so far)."""
    grid = sorted(sweep)
    best = min(grid, key=lambda lr: sweep[lr]["eval_loss"])
    return best, best in (grid[0], grid[-1])  # a one-value grid: at both edges


def fingerprint(spec: dict) -> str:
    """16 hex digits of the sha256 of the canonical JSON of a run spec."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


@functools.cache
def commit() -> str:
    """The commit the runs are made at, '-dirty' with uncommitted changes under gradproj/,
    or 'unknown' (read once per process, at the first call)."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gradproj"], cwd=here,
                               check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


class Ledger:
    """One JSON record per finished run under `folder`; written atomically (a kill mid-write
    leaves the previous state), read back only when the fingerprint matches."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def get(self, key: str, spec_sha: str) -> dict | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
        return record if record.get("spec_sha") == spec_sha else None

    def put(self, key: str, record: dict) -> None:
        tmp = self.path(key).with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, self.path(key))

    def drop(self, prefix: str) -> int:
        paths = list(self.folder.glob(f"{prefix}-lr*.json"))
        for path in paths:
            path.unlink()
        return len(paths)


class Sweep:
    """One method's lr sweep and seed re-runs, as a function of the results it has."""

    def __init__(self, name: str, grid: list[float], seeds: list[int], extend: int):
        self.name, self.initial, self.seeds, self.extend = name, list(grid), list(seeds), extend
        self.results: dict[tuple[float, int], dict] = {}

    def first_seed(self) -> dict[float, dict]:
        return {lr: r for (lr, seed), r in self.results.items() if seed == self.seeds[0]}

    def grid(self) -> list[float]:
        """The initial grid grown past its best edge while every value so far has run."""
        grid, runs = list(self.initial), self.first_seed()
        for _ in range(self.extend):
            if len(self.initial) == 1 or not all(lr in runs for lr in grid):
                break  # a one-value grid (--quick) is not a sweep
            best, edge = best_of({lr: runs[lr] for lr in grid})
            if not edge:
                break
            low, high = min(grid), max(grid)
            grid.append(half_decade(low, up=False) if best == low else half_decade(high, up=True))
        return grid

    def best(self) -> tuple[float, bool] | None:
        """(best lr, at an edge) once the whole grid has run, else None."""
        grid, runs = self.grid(), self.first_seed()
        if not all(lr in runs for lr in grid):
            return None
        return best_of({lr: runs[lr] for lr in grid})

    def wanted(self) -> list[tuple[float, int]]:
        """Every run that is needed next and whose prerequisites have finished."""
        missing = [(lr, self.seeds[0]) for lr in self.grid() if (lr, self.seeds[0]) not in self.results]
        if missing:
            return missing
        lr, _ = self.best()
        return [(lr, seed) for seed in self.seeds[1:] if (lr, seed) not in self.results]

    def done(self) -> bool:
        return not self.wanted()


def run_sweeps(sweeps: list[Sweep], start: Callable[[str, float, int], dict | None],
               train: Callable[[tuple], dict], job: Callable[[str, float, int], tuple],
               finish: Callable[[dict], dict], jobs: int, max_new: int | None,
               log: Callable[[str], None]) -> int:
    """Drive every sweep to completion (or until `max_new` new runs have started).

    `start(name, lr, seed)` returns the ledger's record when it has one; otherwise
    `train(job(name, lr, seed))` runs in a worker (inline when jobs is 1) and `finish`
    stores its record and returns it as stored. Returns the number of new runs made."""
    made, in_flight = 0, {}  # future -> (sweep, lr, seed)
    # spawned, not forked: a CUDA run's workers each start CUDA afresh (a forked child
    # cannot), and no worker inherits the parent's thread pools
    pool = (ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
            if jobs > 1 else None)
    try:
        while True:
            progressed = True
            while progressed:
                progressed = take_cached(sweeps, start)  # first every record there is, so
                if progressed:                           # a later row never takes a slot
                    continue                             # an earlier row's grown grid needs
                for sweep in sweeps:  # then the free slots, in table order
                    for lr, seed in sweep.wanted():
                        if any((s, l, e) == (sweep, lr, seed) for s, l, e in in_flight.values()):
                            continue
                        if max_new is not None and made >= max_new:
                            continue
                        if pool is None:
                            made += 1
                            sweep.results[(lr, seed)] = finish(train(job(sweep.name, lr, seed)))
                            progressed = True
                        elif len(in_flight) < jobs:
                            made += 1
                            in_flight[pool.submit(train, job(sweep.name, lr, seed))] = (sweep, lr, seed)
                    if progressed:  # inline: its result may grow this sweep's grid
                        break
            if not in_flight:
                return made
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in finished:
                sweep, lr, seed = in_flight.pop(future)
                sweep.results[(lr, seed)] = finish(future.result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def take_cached(sweeps: list[Sweep], start: Callable[[str, float, int], dict | None]) -> bool:
    """Every wanted run the ledger already has, into its sweep; whether any was."""
    took = False
    for sweep in sweeps:
        while True:
            found = [(key, start(sweep.name, *key)) for key in sweep.wanted()]
            found = [(key, record) for key, record in found if record is not None]
            if not found:
                break
            sweep.results.update(found)
            took = True
    return took


def stamp(record: dict, spec_sha: str) -> dict:
    """A run's result as the ledger keeps it."""
    return {**record, "spec_sha": spec_sha, "commit": commit(),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
