"""Every planted bug of tests/tools/mutations.py still applies: mutate.py skips a mutation
whose line the code no longer has, so a refactor would silently shrink the mutation check."""
from pathlib import Path

from mutations import SETS

ROOT = Path(__file__).resolve().parents[2]
ALL = [m for mutations in SETS.values() for m in mutations]


def test_every_mutation_names_one_line_of_the_current_code():
    stale = [(path, old[:70]) for path, old, _ in ALL
             if (ROOT / path).read_text().count(old) != 1]
    assert not stale, f"mutations whose line is gone or repeated (update mutations.py): {stale}"


def test_every_mutation_changes_its_line():
    assert all(old != new for _, old, new in ALL)
