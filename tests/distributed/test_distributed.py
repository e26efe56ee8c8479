"""2-process gloo tests on CPU: DDP and FSDP2 match one process; kill + resume is exact.

Two torchrun launches for the equivalence checks (every check in one process group: torch
start-up costs ~3 s a process) and three for the CLI (uninterrupted, killed, resumed).

Tolerances (max |W_dist − W_one| over all weights after 20 steps at lr 1e-2, |W| ≤ 1.2):
- fp32: 0.01·lr = 1e-4, one hundredth of one step's largest update. The runs differ only
  in reduction order (all-reduce / reduce-scatter of the gradient, sharded products in the
  range finder): measured ≤ 1.2e-5. A wrong shard offset, basis or sign moves weights by
  O(lr) — a flipped basis column measured 6.5e-3, two orders above the tolerance.
- q8: STEPS·lr·2⁻⁷ = 1.6e-3. A reduction-order difference can move a moment across an 8-bit
  rounding boundary; one code shifts a normalised Adam update (|N| ≲ 1) by ≤ 2⁻⁷ of it,
  at most once a step: measured ≤ 8.4e-4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gradproj.distributed import DistributedLowRankOptimizer, free_port, init_distributed
from gradproj.distributed.exchange import assign_owners, fitted_entries
from gradproj.distributed.rangefinder import range_finder_floats

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worker import CHECKS, STEPS  # noqa: E402
from harness import BASE  # noqa: E402

LR = BASE["lr"]
FP32_TOL = 0.01 * LR
Q8_TOL = STEPS * LR * 2 ** -7
# the finder's basis vs the one-process finder's: singular-vector rounding of a 0.9-decay
# spectrum (relative gap 0.1): 10 · √513 · 2⁻²³ ≈ 2.7e-5 … bounded by 100·√n·ε_fp32
FINDER_TOL = 100 * 513 ** 0.5 * torch.finfo(torch.float32).eps
TIMEOUT_S = 240


def torchrun(*args: str, nproc: int = 2, cwd: Path | None = None, timeout: int = TIMEOUT_S):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


# -- in-process ------------------------------------------------------------------------
def test_owners_balance_the_refit_cost():
    # a LLaMA-7B layer's 7 matrices at r = 512: four 4096² and three 4096×11008 (cost m·n·r)
    costs = [4096 * 4096] * 4 + [4096 * 11008] * 3
    owners = assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(2)]
    assert max(load) / (sum(costs) / 2) < 1.1  # round-robin by index: 1.19
    assert assign_owners(costs, 2) == owners  # deterministic: every rank agrees


def test_fitted_entries_are_what_the_fit_wrote():
    old = {"proj_right": torch.zeros(2), "step": 3, "svd_fallbacks": 0}
    new = dict(old, proj_right=torch.ones(2), svd_fallbacks=1, rank=4)
    assert sorted(fitted_entries(old, new)) == ["proj_right", "rank", "svd_fallbacks"]


def test_sharded_refresh_moves_fewer_bytes_than_the_gradient():
    # 4096×11008 at r = 128 (p 8, q 1): 3.6 M floats vs 45.1 M to gather the gradient
    assert range_finder_floats(4096, 11008, 128, 8, 1) == 2 * 11008 * 136 + 2 * 136**2 + 4096 * 136
    assert range_finder_floats(4096, 11008, 128, 8, 1) < 0.08 * 4096 * 11008


def test_parallel_needs_a_process_group_and_none_refuses_a_multi_process_launch(monkeypatch):
    with pytest.raises(ValueError, match="process group"):
        DistributedLowRankOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], parallel="fsdp2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="parallel"):
        init_distributed("none")
    with pytest.raises(ValueError, match="'parallel'"):
        init_distributed("zero3")


def test_spec_accepts_ddp_and_fsdp2_and_refuses_per_layer_ddp(tmp_path):
    from gradproj.train.checks import SpecError
    from gradproj.train.spec import load_spec
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 2\n")
    assert load_spec(path, ['train.parallel="fsdp2"']).train.parallel == "fsdp2"
    with pytest.raises(SpecError, match="per_layer"):
        load_spec(path, ['train.parallel="ddp"', "train.per_layer=true"])


# -- 2 processes: equivalence with one process -----------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("distributed")
    proc = torchrun(str(HERE / "worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks_match_one_process(results, name):
    result = results[name]
    assert "error" not in result, result.get("error")
    tol = Q8_TOL if "q8" in name else FP32_TOL
    assert result["max_diff"] <= tol, f"{name}: max |ΔW| {result['max_diff']:.3g} > {tol:.3g}"
    assert result["bases_identical"], f"{name}: a basis differs between ranks"


@pytest.mark.slow
def test_row_sharded_range_finder_equals_the_one_process_finder(results):
    result = results["rangefinder"]
    assert "error" not in result, result.get("error")
    assert result["max_diff"] <= FINDER_TOL
    assert result["orthonormality"] <= 8 * torch.finfo(torch.float32).eps * 4  # r = 4 columns


@pytest.mark.slow
def test_fsdp2_refuses_a_left_basis_and_row_reducing_rules(results):
    messages = results["errors"]["messages"]
    assert "proj_type" in (messages["proj_type"] or "")
    assert "adafactor" in (messages["rule"] or "")
    assert "lamb" in (messages["finishing_rule"] or "")  # its trust ratio spans all rows


# -- 2 processes: the CLI, SIGKILL in the middle of a checkpoint, resume -----------------------
SPEC = """
[model]
preset = "tiny"
dim = 32
n_layers = 2
n_heads = 2
ffn_dim = 64

[data]
seq_len = 32

[optimizer]
rule = "adamw"
lr = 1e-2
state_format = "q8"

[optimizer.lowrank]
projector = "randomized"
rank = 8
update_gap = 3
residual = "fira"

[train]
steps = 8
batch_size = 4
threads = 1
eval_batches = 2
warmup_steps = 1
parallel = "fsdp2"
device = "cpu"
per_layer = true             # FSDP2 runs the hooks after each reduce-scatter
grad_accum = 2

[checkpoint]
dir = "{run_dir}"
every = 3

[log]
every = 1
progress = false
plot = false
"""

# Rank 1 kills itself (SIGKILL) while writing its optimizer shard of the step-6 checkpoint,
# after its model shard is on disk; torchrun then stops rank 0, which waits at the barrier.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from gradproj.train import checkpoint
    from gradproj.train.cli import main
    original = checkpoint.CheckpointManager._write_tensors
    def write(path, tensors):
        if (os.environ["RANK"] == "1" and path.parent.name == ".tmp-step-6"
                and path.name.startswith("optimizer")):
            os.kill(os.getpid(), signal.SIGKILL)
        original(path, tensors)
    checkpoint.CheckpointManager._write_tensors = staticmethod(write)
    sys.exit(main(sys.argv[1:]))
""")


def losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r.get("loss/train"), r.get("loss/eval")) for r in records if r["step"] > 0}


@pytest.mark.slow
def test_fsdp2_cli_per_layer_q8_fira_killed_mid_checkpoint_resumes_exactly(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    for folder in (reference, killed):
        folder.mkdir()
        (folder / "spec.toml").write_text(SPEC.replace("{run_dir}", str(folder / "run")))
    proc = torchrun("-m", "gradproj", "train", str(reference / "spec.toml"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("done:") == 1  # rank 0 alone reports
    (killed / "killer.py").write_text(KILLER)
    proc = torchrun(str(killed / "killer.py"), "train", str(killed / "spec.toml"))
    assert proc.returncode != 0, "the run was meant to be killed"
    checkpoints = killed / "run" / "checkpoints"
    assert (checkpoints / "step-3").is_dir() and not (checkpoints / "step-6").exists()
    proc = torchrun("-m", "gradproj", "resume", str(killed / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(killed / "run") == losses(reference / "run")
    files = sorted(p.name for p in (checkpoints / "step-6").iterdir())
    assert "model.rank1-of-2.safetensors" in files and "optimizer.rank0-of-2.safetensors" in files
