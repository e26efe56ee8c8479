"""The benchmark scripts run end to end in their smallest mode, so they cannot rot.

Nothing here times anything or checks a figure: the scripts' numbers are benchmarks
(benchmarks/README.md), not tests. They run in-process, step_time and convergence on the
tiny model, kernels.py --cpu on a 64×64 weight (~35 s total on 2 shared CPU cores).
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


def test_kernels_cpu_smallest(capsys, monkeypatch):
    kernels = load("kernels")
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")
    threads = kernels.torch.get_num_threads()
    try:  # 64x64 = 4096 values: the smallest weight whose q8/q4 moments are quantized
        kernels.main(["--cpu", "--size", "64x64", "--rounds", "2", "--steps", "1"])
    finally:
        kernels.torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| torch AdamW (foreach), fp32 | " in out and "| 1.00 |" in out
    assert "q8: C path and reference states and weights after the same steps: bit-identical" in out
    assert "q4: C path and reference states and weights after the same steps: bit-identical" in out
