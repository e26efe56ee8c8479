"""The benchmark scripts run end to end in their smallest mode, so they cannot rot.

Nothing here times anything or checks a figure: the scripts' numbers are benchmarks
(benchmarks/README.md), not tests. Both run in-process on the tiny model (~30 s total
on 2 shared CPU cores).
"""
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def load(name: str):
    sys.path.insert(0, str(BENCH))  # step_time imports nothing else from benchmarks/, but
    try:                            # a script run as a file sees its folder first; so do we
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_step_time_smallest(capsys):
    step_time = load("step_time")
    step_time.main(["--sizes", "tiny", "--repeats", "2", "--threads", "1",
                    "--only", "torch AdamW,gradproj GaLore svd,gradproj GaLore randomized"])
    out = capsys.readouterr().out
    for name in ("torch AdamW (foreach)", "gradproj GaLore svd", "gradproj GaLore randomized"):
        assert f"| tiny | {name} |" in out
    assert "| 1.00 |" in out  # AdamW's ratio to itself: the baseline was measured


def test_convergence_smallest(tmp_path, capsys):
    convergence = load("convergence")
    if "galore" not in convergence.gp.PRESETS:
        pytest.skip("the galore preset is not registered")
    convergence.main(["--quick", "--steps", "3", "--eval-batches", "1", "--out", str(tmp_path),
                      "--methods", "adamw,galore (svd)"])
    table = (tmp_path / "results.md").read_text()
    assert "| AdamW |" in table and "| GaLore (svd) |" in table
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "results.json").is_file()
