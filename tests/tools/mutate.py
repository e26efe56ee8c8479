"""Mutation pass: plant one-line bugs one at a time and run the test modules that guard the file.

    python tests/tools/mutate.py [--only SUBSTRING,SUBSTRING...] [--timeout 600] [--extra | --new | --more | --more2]

Each mutation of a set in SETS (tests/tools/mutations.py) is (file, old text, new text): `old`
must occur exactly once in the file. The worktree is copied to a scratch folder (never
edited in place), the mutation applied there, and `pytest -x -q -p no:randomly` runs the
guarding modules of GUARDS. A mutant is caught when pytest fails (or times out). Each set of
guard modules first runs once on the unmutated tree: if it fails there, its mutants are
skipped, not counted as caught. Not collected by pytest (no test_ prefix); it prints
caught/planted per file.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).parent))
from mutations import GUARDS, SETS  # noqa: E402


def guards_of(path: str) -> list[str]:
    for prefix, modules in GUARDS:
        if path.startswith(prefix):
            return modules
    raise SystemExit(f"no guard modules for {path}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="")
    parser.add_argument("--timeout", type=int, default=600)
    which = parser.add_mutually_exclusive_group()
    for name in filter(None, SETS):  # --extra, --new, ...: mutations.SETS[name]
        which.add_argument(f"--{name}", dest="set", action="store_const", const=name, default="",
                           help=f"the set mutations.SETS[{name!r}] (default: the first set)")
    parser.add_argument("--root", default=str(ROOT), help="the tree to mutate (default: this one)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="gradproj-mut-"))
    shutil.copytree(Path(args.root), scratch / "wt", ignore=shutil.ignore_patterns(".git", "__pycache__", ".venv",
                                                                         "runs", ".hypothesis"))
    wt = scratch / "wt"
    env = {**os.environ, "PYTHONPATH": str(wt), "OMP_NUM_THREADS": "1",
           "HYPOTHESIS_STORAGE_DIRECTORY": str(scratch / "hyp")}
    results = defaultdict(lambda: [0, 0])
    survivors = []
    baseline: dict[tuple[str, ...], bool] = {}  # guard modules -> they pass on the clean tree

    def guards_fail(modules: tuple[str, ...]) -> bool:
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:randomly",
                                   "-p", "no:cacheprovider", *modules], cwd=wt, env=env,
                                  capture_output=True, text=True, timeout=args.timeout)
            return proc.returncode != 0
        except subprocess.TimeoutExpired:
            return True

    for path, old, new in SETS[args.set]:
        only = [o for o in args.only.split(",") if o]
        if only and not any(o in path or o in old for o in only):
            continue
        target = wt / path
        original = target.read_text()
        if original.count(old) != 1:
            print(f"SKIP {path}: {old!r} occurs {original.count(old)} times")
            continue
        modules = tuple(m for m in guards_of(path) if (wt / m).exists())
        if modules not in baseline:  # a guard failing unmutated would "catch" every mutant
            baseline[modules] = not guards_fail(modules)
            if not baseline[modules]:
                print(f"BASELINE FAILS: {' '.join(modules)} fail on the unmutated tree")
        if not baseline[modules]:
            print(f"SKIP {path}: its guards fail unmutated")
            continue
        target.write_text(original.replace(old, new))
        start = time.time()
        try:
            caught = guards_fail(modules)
        finally:
            target.write_text(original)
        results[path][0] += caught
        results[path][1] += 1
        tag = "caught  " if caught else "SURVIVED"
        print(f"{tag} {time.time() - start:5.1f}s {path}: {old.strip()!r} -> {new.strip()!r}", flush=True)
        if not caught:
            survivors.append((path, old, new))
    total = [sum(v[0] for v in results.values()), sum(v[1] for v in results.values())]
    print("\ncaught/planted per file:")
    for path, (c, n) in sorted(results.items()):
        print(f"  {c}/{n}  {path}")
    print(f"  {total[0]}/{total[1]}  total")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
