"""The benchmark scripts run end to end in their smallest mode, so they cannot rot.

Nothing here times anything or checks a figure: the scripts' numbers are benchmarks
(benchmarks/README.md), not tests. They run in-process on the tiny model (~30 s total
on 2 shared CPU cores), overhead.py on its two tiny-tensor lists cut to 4 layers (~3 s)
— its test checks the one kind of figure that does not depend on the load, ATen op
counts — and kernels.py --cpu on a 64×64 weight.
"""
import importlib.util
import json
import math
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
    for name in ("torch AdamW (foreach)", "gradproj GaLore svd", "gradproj GaLore randomized",
                 "gradproj GaLore randomized, gradient views"):
        assert f"| tiny | {name} |" in out
    assert "| 1.00 |" in out  # AdamW's ratio to itself: the baseline was measured


def test_convergence_smallest(tmp_path, capsys):
    convergence = load("convergence")
    if "galore" not in convergence.gp.PRESETS:
        pytest.skip("the galore preset is not registered")
    convergence.main(["--quick", "--steps", "3", "--eval-batches", "1", "--out", str(tmp_path),
                      "--methods", "adamw,galore (svd)", "--timing-rounds", "2"])
    table = (tmp_path / "results.md").read_text()
    assert "| AdamW |" in table and "| GaLore (svd) |" in table
    assert (tmp_path / "loss.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["methods"]["AdamW"]["seeds"]) == {"0", "1"}  # two seeds, spread reported


def test_zeroth_order_smallest(tmp_path, capsys):
    zeroth_order = load("zeroth_order")
    zeroth_order.main(["--steps", "2", "--lrs", "1e-3", "--eval-batches", "1", "--out", str(tmp_path)])
    table = (tmp_path / "results.md").read_text()
    for method in zeroth_order.METHODS:
        assert f"| {method} | 0.001 |" in table
    rows = json.loads((tmp_path / "results.json").read_text())
    entries = {r["method"]: r["entries"] for r in rows}
    assert entries["low-rank z"] < entries["full z"] == entries["full z + projected step"]


def test_convergence_sweep_runs_full_length_until_the_best_lr_is_inside(monkeypatch, tmp_path):
    """The sweep logic with a stand-in for training (eval loss = distance in decades from
    a per-method optimum): every run is full length, the grid grows past an edge until the
    best lr is strictly inside it, and the best lr is re-run at the second seed."""
    convergence = load("convergence")
    optimum = {"AdamW": 3e-3, "GaLore (svd)": 1e-1}  # 1e-1: two half-decades past 3e-2
    calls = []

    def fake_train(job):
        name, lr, seed, steps, out, args = job
        calls.append((name, lr, seed, steps))
        loss = 1.0 + abs(math.log10(lr / optimum[name])) + 0.01 * seed
        return {"method": name, "lr": lr, "seed": seed, "steps": steps, "eval_loss": loss,
                "wall_s": 0.0, "state_mib": 1.0, "run_dir": str(tmp_path / "none")}

    monkeypatch.setattr(convergence, "train", fake_train)
    monkeypatch.setattr(convergence, "plot", lambda methods, path: None)
    convergence.main(["--out", str(tmp_path), "--methods", "adamw,galore (svd)", "--timing-rounds", "0"])
    assert {steps for *_, steps in calls} == {convergence.STEPS} and convergence.STEPS >= 2000
    results = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert results["AdamW"]["lr"] == 3e-3 and not results["AdamW"]["lr_at_edge"]
    galore = results["GaLore (svd)"]
    assert galore["lr"] == 1e-1 and not galore["lr_at_edge"]
    assert list(galore["sweep"]) == ["0.003", "0.01", "0.03", "0.1", "0.3"]  # grown twice
    assert {seed for name, lr, seed, _ in calls if name == "GaLore (svd)" and lr == 1e-1} == {0, 1}
    assert galore["spread"] == pytest.approx(0.005)
    assert "| GaLore (svd) |" in (tmp_path / "results.md").read_text()


def test_convergence_ledger_reuses_matching_runs_only(monkeypatch, tmp_path):
    """A second sitting runs nothing the ledger has; --max-runs stops early and leaves the
    method unfinished in the table; a changed spec (eval batches) or --rerun runs anew."""
    convergence = load("convergence")
    calls = []

    def fake_train(job):
        name, lr, seed, steps, work, args = job
        calls.append((name, lr, seed))
        return {"method": name, "lr": lr, "seed": seed, "steps": steps, "wall_s": 0.0,
                "eval_loss": 1.0 + abs(math.log10(lr / 3e-3)) + 0.01 * seed}

    monkeypatch.setattr(convergence, "train", fake_train)
    monkeypatch.setattr(convergence, "plot", lambda methods, path: None)
    base = ["--out", str(tmp_path), "--methods", "adamw", "--timing-rounds", "0"]
    convergence.main(base + ["--max-runs", "2"])
    assert len(calls) == 2
    assert "| AdamW | not finished (2 of its runs so far" in (tmp_path / "results.md").read_text()
    convergence.main(base)
    assert len(calls) == 4  # the third grid value and the second seed: nothing run twice
    assert len(set(calls)) == 4
    results = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert results["AdamW"]["lr"] == 3e-3 and set(results["AdamW"]["seeds"]) == {"0", "1"}
    convergence.main(base)
    assert len(calls) == 4
    convergence.main(base + ["--eval-batches", "4"])  # another spec: none of the records match
    assert len(calls) == 8
    convergence.main(base + ["--eval-batches", "4", "--rerun", "AdamW"])
    assert len(calls) == 12


def test_convergence_rows_finish_in_table_order():
    """An earlier row whose cached grid grows past an edge runs its new lr before a later
    row starts (in a sitting that begins with that row's grid already in the ledger)."""
    sys.path.insert(0, str(BENCH))
    try:
        from convergence_ledger import Sweep, run_sweeps
    finally:
        sys.path.remove(str(BENCH))
    cached = {("A", lr, 0): {"eval_loss": 2.0 - lr} for lr in (1e-3, 3e-3, 1e-2)}  # best: edge
    calls = []

    def train(job):
        calls.append(job)
        name, lr, seed = job
        return {"eval_loss": 1.0 + abs(math.log10(lr / 1e-2))}

    sweeps = [Sweep("A", [1e-3, 3e-3, 1e-2], [0, 1], 1), Sweep("B", [1e-3, 3e-3, 1e-2], [0], 0)]
    made = run_sweeps(sweeps, lambda *key: cached.get(key), train, lambda *key: key,
                      lambda record: record, jobs=1, max_new=None, log=print)
    assert calls[:2] == [("A", 0.03, 0), ("A", 0.03, 1)] and made == 5


def test_convergence_adamw_is_galore_without_projection(tmp_path):
    """AdamW's run spec is GaLore's with no projected targets: its embeddings, head and
    norms get exactly the options they get in the GaLore runs (preset, ε, betas, wd)."""
    convergence = load("convergence")
    args = convergence.argparse.Namespace(eval_batches=8, threads=1, device="cpu")
    adamw = convergence.spec_dict("AdamW", 1e-3, 0, 2000, tmp_path, args)
    galore = convergence.spec_dict("GaLore (svd)", 1e-3, 0, 2000, tmp_path, args)
    assert adamw["optimizer"]["lowrank"].pop("targets") == ["(none)"]
    assert adamw == galore


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


def test_parametrizations_smoke(capsys):
    load("parametrizations").main(["--smoke"])
    out = capsys.readouterr().out
    for line in ("lora     lr 1e-03", "lora-ga  lr 1e-03", "sltrain  r 32", "low-rank r 34"):
        assert line in out


def test_welore_compress_smallest(tmp_path, capsys):
    welore = load("welore_compress")
    welore.main(["--runs", str(tmp_path), "--steps", "3", "--eval-batches", "2",
                 "--ratios", "0.5", "--finetune", "1"])
    rows = [line for line in capsys.readouterr().out.splitlines() if "| 0.5 |" in line]
    for accounting in ("| params (min_ratio 0) |", "| params (min_ratio 0.4999) |",
                       "| rank (reference, min_ratio 0) |"):
        assert sum(accounting in r for r in rows) == 2, accounting  # one per training recipe
    assert len(rows) == 2 * 3 + 2  # and one fine-tuned row per recipe
