"""The benchmark scripts run end to end in their smallest mode, so they cannot rot.

Nothing here times anything or checks a figure: the scripts' numbers are benchmarks
(benchmarks/README.md), not tests. They run in-process on the tiny model (~30 s total
on 2 shared CPU cores), overhead.py on its two tiny-tensor lists cut to 4 layers (~3 s)
— its test checks the one kind of figure that does not depend on the load, ATen op
counts — and kernels.py --cpu on a 64×64 weight.
"""
import importlib.util
import json
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


def test_overhead_smallest(tmp_path, capsys):
    overhead = load("overhead")
    raw, raw_1b = tmp_path / "overhead.json", tmp_path / "overhead_1b.json"
    # the lists cut to 4 layers: 6x fewer tensors, the same code paths (~3 s of CPU)
    overhead.main(["--quick", "--lists", "24layer", "--layers", "4", "--rounds", "1",
                   "--json", str(raw)])
    out = capsys.readouterr().out
    overhead.main(["--quick", "--lists", "1b", "--layers", "4", "--rounds", "1",
                   "--only", "gradproj galore", "--json", str(raw_1b)])
    assert "28 projected matrices at rank 8 + 11 full-rank tensors" in out
    for key in ("24layer", "1b"):  # the full lists split as the issue counts them
        spec = overhead.LISTS[key]
        assert overhead.check_split(overhead.make_model(spec), spec) == (168, 51)
    presets = overhead.gp.PRESETS.names()
    for name in ["torch AdamW (foreach)", *(f"gradproj {p}" for p in presets)]:
        assert f"| {name} | " in out
    assert len(out.splitlines()[-8:]) == 8 and out.splitlines()[-1].startswith("meeting both")
    lists = {**json.loads(raw.read_text())["lists"], **json.loads(raw_1b.read_text())["lists"]}
    rows = {key: {r["optimizer"]: r for r in lists[key]["rows"]} for key in lists}
    adamw = rows["24layer"]["torch AdamW (foreach)"]
    assert adamw["ops"] > 0 and adamw["ops_x_adamw"] == 1.0
    for key in rows:  # steady: no state allocation or refresh fell into a counted step
        for name, row in rows[key].items():
            assert len(set(row["ops_per_counted_step"])) == 1, (key, name, row["ops_per_counted_step"])
    # the 1b list stands for LLaMA-1B because op counts do not depend on tensor sizes: the
    # two lists (hidden 64 both, intermediate 172 vs 171, vocab 256 vs 1000) count alike.
    # Not asserted for q-galore: its INT8 groups of 256 pad a 64x171 weight (more ops).
    for name in ("torch AdamW (foreach)", "gradproj galore", "gradproj galore, randomized"):
        assert rows["24layer"][name]["ops"] == rows["1b"][name]["ops"], name


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
