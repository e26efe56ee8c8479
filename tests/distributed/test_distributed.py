"""2-process gloo tests on CPU: DDP and FSDP2 match one process; kill + resume is exact.

One torchrun launch for the equivalence and checkpoint checks (every check in one process
group: torch start-up costs ~3 s a process), one of 4 ranks resuming their checkpoint,
and three for the CLI (uninterrupted, killed, resumed).

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
from gradproj.train.checkpoint import CheckpointManager

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worker import CHECKS, CKPT_STEPS, RESUME_AT, STEPS  # noqa: E402
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


def test_fsdp2_side_costs_are_exact_counts():
    from gradproj.distributed.costs import refresh_bytes, state_elements, step_bytes
    shape = (4096, 11008)  # LLaMA-7B's down projection, W = 8, r = 128
    assert step_bytes(shape, 128, "left", 8) == 2 * 7 * 128 * 11008 * 4 // 8 == 9_863_168
    assert step_bytes(shape, 128, "right", 8) == 0
    assert step_bytes(shape, 128, "full", 8) == 2 * 7 * 128 * 128 * 4 // 8
    assert step_bytes(shape, 128, "left", 1) == 0
    assert state_elements(shape, 128, "right", 8) == 512 * 128   # sharded rows
    assert state_elements(shape, 128, "left", 8) == 128 * 11008  # replicated
    # the left finder: (q+1)·(m·w + n·w) floats; the owner gather: m_k×n + the m×r basis
    w = 136
    assert refresh_bytes(shape, 128, "left", 2, collective=True) == 2 * 2 * (4096 * w + 11008 * w) * 4 // 2
    assert refresh_bytes(shape, 128, "left", 2, collective=False) == (2048 * 11008 + 4096 * 128) * 4


def test_parallel_needs_a_process_group_and_none_refuses_a_multi_process_launch(monkeypatch):
    with pytest.raises(ValueError, match="process group"):
        DistributedLowRankOptimizer([torch.nn.Parameter(torch.zeros(4, 4))], parallel="fsdp2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="parallel"):
        init_distributed("none")
    with pytest.raises(ValueError, match="'parallel'"):
        init_distributed("zero3")


def test_spec_accepts_ddp_and_fsdp2(tmp_path):
    from gradproj.train.spec import load_spec
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 2\n")
    assert load_spec(path, ['train.parallel="fsdp2"']).train.parallel == "fsdp2"
    # per-layer under DDP: test_perlayer_ddp.py


@pytest.mark.parametrize("int8", [['optimizer.preset="q-galore"'], ['model.parametrization.kind="int8"'],
                                  ['model.parametrization.kind="sltrain"', "model.parametrization.int8=true"]])
def test_fsdp2_refuses_int8_weights_in_the_spec_and_in_wrap_model(tmp_path, int8):
    """FSDP2 fails inside backward on INT8 weights (their fp32 gradient shard against int8
    codes): the spec names [train].parallel first, wrap_model the weight; DDP takes them."""
    from gradproj.distributed.env import DistEnv
    from gradproj.distributed.wrap import wrap_model
    from gradproj.quant.linear import quantize_weights
    from gradproj.train.spec import SpecError, load_spec
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 2\n")
    with pytest.raises(SpecError, match=r"\[train\]\.parallel.*: expected 'none' or 'ddp' with INT8"):
        load_spec(path, [*int8, 'train.parallel="fsdp2"'])
    assert load_spec(path, [*int8, 'train.parallel="ddp"']).train.parallel == "ddp"
    model = quantize_weights(torch.nn.ModuleDict({"mlp": torch.nn.Linear(8, 8)}))
    with pytest.raises(ValueError, match="cannot shard INT8 weights .* 'mlp.weight'"):
        wrap_model(model, DistEnv(parallel="fsdp2"))


# -- 2 processes: equivalence with one process -----------------------------------------------
@pytest.fixture(scope="module")
def worker_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    proc = torchrun(str(HERE / "worker.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def results(worker_out) -> dict:
    return json.loads((worker_out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_two_ranks_match_one_process(results, name):
    result = results[name]
    assert "error" not in result, result.get("error")
    tol = Q8_TOL if "q8" in name else FP32_TOL
    assert result["max_diff"] <= tol, f"{name}: max |ΔW| {result['max_diff']:.3g} > {tol:.3g}"
    assert result["bases_identical"], f"{name}: a basis differs between ranks"
    if "views" in name:
        assert result["views_kept"], f"{name}: DDP replaced the gradient views"


@pytest.mark.slow
def test_row_sharded_range_finder_equals_the_one_process_finder(results):
    result = results["rangefinder"]
    assert "error" not in result, result.get("error")
    assert result["max_diff"] <= FINDER_TOL
    assert result["orthonormality"] <= 8 * torch.finfo(torch.float32).eps * 4  # r = 4 columns


@pytest.mark.slow
def test_fsdp2_refuses_row_reducing_rules(results):
    messages = results["errors"]["messages"]
    assert "adafactor" in (messages["rule"] or "")
    assert "lamb" in (messages["finishing_rule"] or "")  # its trust ratio spans all rows


# -- FSDP2 checkpoints (torch.distributed.checkpoint): written by 2 ranks, read by 1, 2, 4 --------
# Global-batch losses after the resume: they differ from the uninterrupted run's only by
# reduction order, ~1e-6 of a loss of ~4 (measured ≤ 2e-6); a wrong shard, basis or
# moment after a reshard changes them by ≥ lr·|∇L| ~ 1e-3.
LOSS_TOL = 1e-5


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_exactly_on_the_same_ranks_and_in_one_process_and_ddp(results):
    result = results["checkpoint"]
    assert "error" not in result, result.get("error")
    assert result["same_world_exact"], "resume on the same 2 ranks is not bit-exact"
    assert result["one_process_diff"] <= FP32_TOL, result["one_process_diff"]
    assert result["ddp_diff"] <= FP32_TOL, result["ddp_diff"]  # read under DDP too
    assert max(abs(a - b) for a, b in zip(result["one_process_losses"], result["losses"])) <= LOSS_TOL


@pytest.mark.slow
def test_fsdp2_q8_checkpoint_is_exact_on_the_same_ranks_and_requantized_in_one_process(results):
    # q8 blocks follow each rank's rows: another world size dequantizes every writer's
    # blocks and requantizes in its own, within the q8 tolerance of the uninterrupted run
    result = results["checkpoint-q8"]
    assert "error" not in result, result.get("error")
    assert result["same_world_exact"]
    assert result["one_process_diff"] <= Q8_TOL, result["one_process_diff"]


@pytest.mark.slow
def test_fsdp2_checkpoint_of_two_ranks_resumes_on_four(worker_out, results):
    assert "error" not in results["checkpoint"], results["checkpoint"].get("error")
    proc = torchrun(str(HERE / "worker.py"), str(worker_out), "resume4", nproc=4)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((worker_out / "resume4.json").read_text())
    four = result["checkpoint"]
    assert four["max_diff"] <= FP32_TOL, four["max_diff"]
    assert max(abs(a - b) for a, b in zip(four["losses"], four["reference_losses"])) <= LOSS_TOL
    assert len(four["losses"]) == CKPT_STEPS - RESUME_AT
    assert result["checkpoint-q8"]["max_diff"] <= Q8_TOL, result["checkpoint-q8"]["max_diff"]


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

# Rank 1 kills itself (SIGKILL) right after DCP has written (and fsynced) its shard of the
# step-6 checkpoint, before the collective that ends the save; torchrun then stops rank 0.
KILLER = textwrap.dedent("""
    import os, signal, sys
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from gradproj.train.cli import main
    original = HuggingFaceStorageWriter.write_data
    def write_data(self, plan, planner):
        future = original(self, plan, planner)
        if os.environ["RANK"] == "1" and str(self.path).endswith(".tmp-step-6"):
            future.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        return future
    HuggingFaceStorageWriter.write_data = write_data
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
    assert (checkpoints / "latest").read_text().strip() == "step-3"
    partial = [p.name for p in (checkpoints / ".tmp-step-6").iterdir()]
    assert "shard-00002-model-00001-of-00001.safetensors" in partial  # written, never published
    assert CheckpointManager(killed / "run").latest() == checkpoints / "step-3"
    proc = torchrun("-m", "gradproj", "resume", str(killed / "run"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert losses(killed / "run") == losses(reference / "run")
    files = sorted(p.name for p in (checkpoints / "step-6").iterdir())
    assert files == ["meta.json", "shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"]
