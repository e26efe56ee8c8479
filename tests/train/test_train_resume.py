"""Kill a run (SIGKILL, at a chosen step or in the middle of a checkpoint write), resume it,
and get exactly the losses of the uninterrupted run; a partial checkpoint is never read."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gradproj.train.checkpoint import CheckpointManager
from gradproj.train.cli import main
from gradproj.train.metrics import read_metrics

from trainhelpers import MICRO_SPEC, write_spec

STEPS, EVERY = 10, 3
SPEC = (MICRO_SPEC.replace("steps = 8", f"steps = {STEPS}")
        .replace("every = 3", f"every = {EVERY}")
        .replace("eval_batches = 2", "eval_batches = 2\neval_every = 4"))

# The child process kills itself with SIGKILL at the chosen moment: the same signal an
# OOM killer or `kill -9` sends, at an exactly known point (fixed per test).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from gradproj.train import checkpoint, loop
    from gradproj.train.cli import main
    mode, k = sys.argv[1], int(sys.argv[2])
    if mode == "step":
        original_step = loop.Trainer.train_step
        def train_step(self):
            if self.step == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return original_step(self)
        loop.Trainer.train_step = train_step
    else:
        original_write = checkpoint.CheckpointManager._write_tensors
        def write(path, tensors):
            if path.parent.name == f".tmp-step-{k}" and path.name == "optimizer.safetensors":
                os.kill(os.getpid(), signal.SIGKILL)  # model.safetensors is already written
            original_write(path, tensors)
        checkpoint.CheckpointManager._write_tensors = staticmethod(write)
    sys.exit(main(sys.argv[3:]))
""")


def losses(run_dir: Path) -> dict[int, tuple]:
    return {r["step"]: (r.get("loss/train"), r.get("loss/eval"))
            for r in read_metrics(run_dir) if r["step"] > 0}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, tuple]:
    folder = tmp_path_factory.mktemp("reference")
    assert main(["train", str(write_spec(folder, SPEC))]) == 0
    result = losses(folder / "run")
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def kill_and_resume(tmp_path: Path, mode: str, k: int) -> Path:
    spec = write_spec(tmp_path, SPEC)
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(k), "train", str(spec)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr  # killed by SIGKILL, not finished
    run_dir = tmp_path / "run"
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("k", [2, 7])
def test_sigkill_at_a_step_then_resume_is_exact(tmp_path, reference, capsys, k):
    """Killed after 7 steps (checkpoints 3 and 6 on disk, one step past the last): resume
    reads step-6 and re-runs 7..10 exactly. Killed after 2 (before the first checkpoint):
    resume has nothing to read and says so. Fixed steps: both outcomes are checked on
    every run (an unseeded draw skipped the comparison in 2 of 9 draws)."""
    run_dir = kill_and_resume(tmp_path, "step", k)
    saved = CheckpointManager(run_dir).complete_steps()
    assert saved == [s for s in range(EVERY, k + 1, EVERY)][-2:], (k, saved)
    if not saved:  # killed before the first checkpoint: resume has nothing to read
        assert main(["resume", str(run_dir)]) == 2
        assert "no complete checkpoint" in capsys.readouterr().err
        return
    assert saved == [3, 6]
    assert main(["resume", str(run_dir)]) == 0
    assert losses(run_dir) == reference, f"killed after step {k}"


def test_damaged_latest_checkpoint_is_skipped_with_one_line(tmp_path, reference, capsys):
    """`latest` names step-10 but its optimizer file was truncated (a disk fault, a copy cut
    short): resume uses step-9, says so in one stderr line naming the folder and the file,
    and re-runs step 10 exactly."""
    spec = write_spec(tmp_path, SPEC)
    assert main(["train", str(spec)]) == 0
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == f"step-{STEPS}"
    victim = root / f"step-{STEPS}" / "optimizer.safetensors"
    size = victim.stat().st_size
    victim.write_bytes(victim.read_bytes()[: size // 2])
    capsys.readouterr()
    assert main(["resume", str(run_dir)]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "skipping" in line]
    assert len(err) == 1, err
    assert f"step-{STEPS}" in err[0] and "optimizer.safetensors" in err[0]
    assert f"is {size // 2} bytes, meta.json lists {size}" in err[0] and "using step-9" in err[0]
    assert losses(run_dir) == reference
    manager = CheckpointManager(run_dir)
    (root / "latest").write_text("step-99\n")  # a pointer to a folder that is not there
    assert manager.latest() == root / f"step-{STEPS}"  # the resumed run rewrote step 10
    assert "step-99 (the folder is missing)" in capsys.readouterr().err
    (root / "latest").write_text("step-9\n")  # an intact pointer: silent
    assert manager.latest() == root / "step-9" and capsys.readouterr().err == ""


@pytest.mark.slow
def test_external_sigkill_at_a_random_moment_then_resume_is_exact(tmp_path):
    """`kill -9` from outside, whenever the run has logged a random step k."""
    steps = 60
    text = SPEC.replace(f"steps = {STEPS}", f"steps = {steps}")
    reference_dir = tmp_path / "reference"
    assert main(["train", str(write_spec(tmp_path, text, "ref.toml", reference_dir))]) == 0
    k = 17  # after the first checkpoint, mid-interval (fixed: the kill's timing varies enough)
    run_dir = tmp_path / "run"
    spec = write_spec(tmp_path, text, "run.toml", run_dir)
    proc = subprocess.Popen([sys.executable, "-m", "gradproj", "train", str(spec)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not any(r["step"] >= k for r in read_metrics(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before the kill"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed_at = max(r["step"] for r in read_metrics(run_dir))
    assert proc.returncode == -9 and killed_at < steps
    assert main(["resume", str(run_dir)]) == 0
    assert losses(run_dir) == losses(reference_dir), f"killed after step {killed_at}"


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_never_uses_the_partial_one(tmp_path, reference):
    k = EVERY * 2  # a checkpoint with one before it
    run_dir = kill_and_resume(tmp_path, "checkpoint", k)
    root = run_dir / "checkpoints"
    partial = root / f".tmp-step-{k}"
    assert (partial / "model.safetensors").is_file()
    assert not (partial / "meta.json").exists()
    assert not (root / f"step-{k}").exists()
    assert CheckpointManager(run_dir).latest().name == f"step-{k - EVERY}"
    assert main(["resume", str(run_dir)]) == 0
    assert losses(run_dir) == reference, f"killed while writing step {k}"
    assert not partial.exists()  # swept by the next write
    assert (root / "latest").read_text().strip() == f"step-{STEPS}"


def test_crash_in_process_and_resume_per_layer_with_accumulation(tmp_path, monkeypatch):
    """Per-layer mode with grad_accum 2 (projected-gradient sums) also resumes exactly."""
    from gradproj.train import loop

    spec_text = SPEC.replace("threads = 1", "threads = 1\nper_layer = true\ngrad_accum = 2")
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert main(["train", str(write_spec(tmp_path, spec_text, "a.toml", ref_dir))]) == 0
    original = loop.Trainer.train_step

    def crash(self):
        if self.step == 7:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", crash)
    assert main(["train", str(write_spec(tmp_path, spec_text, "b.toml", run_dir))]) == 130
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert main(["resume", str(run_dir)]) == 0
    assert losses(run_dir) == losses(ref_dir)


def test_incomplete_folders_are_never_picked(tmp_path):
    spec = write_spec(tmp_path, SPEC.replace(f"steps = {STEPS}", "steps = 3"))
    assert main(["train", str(spec)]) == 0
    manager = CheckpointManager(tmp_path / "run")
    good = manager.latest()
    assert good.name == "step-3"
    # a step folder whose file is shorter than meta.json says (cut short), and one
    # without meta.json: neither is complete, even when `latest` names it
    for name, damage in (("step-9", "truncate"), ("step-12", "no-meta")):
        bad = good.parent / name
        bad.mkdir()
        for f in good.iterdir():
            (bad / f.name).write_bytes(f.read_bytes())
        if damage == "truncate":
            model = bad / "model.safetensors"
            model.write_bytes(model.read_bytes()[:-7])
        else:
            (bad / "meta.json").unlink()
        (good.parent / "latest").write_text(name + "\n")
        assert manager.latest() == good
    meta = json.loads((good / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "optimizer.safetensors",
                                  "extra.safetensors"}


def test_resume_extends_a_finished_run(tmp_path, reference):
    spec = write_spec(tmp_path, SPEC.replace(f"steps = {STEPS}", "steps = 6"))
    assert main(["train", str(spec)]) == 0
    run_dir = tmp_path / "run"
    assert main(["resume", str(run_dir), "--set", f"train.steps={STEPS}"]) == 0
    got = losses(run_dir)
    # the cosine schedule depends on the total steps, so only the first step is shared...
    assert got[1] == reference[1]
    assert sorted(got) == list(range(1, STEPS + 1))
    # ...and a second `train` into the same folder is refused with a pointer to resume
    assert main(["train", str(spec)]) == 2


def test_bf16_weights_resume_exactly(tmp_path, monkeypatch):
    """[train] dtype = "bfloat16" (the papers' pure-BF16 weights) checkpoints and resumes
    exactly: weights stay bf16, the optimizer keeps its own fp32 state dtypes."""
    from gradproj.train import loop

    spec_text = SPEC.replace("threads = 1", 'threads = 1\ndtype = "bfloat16"')
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    assert main(["train", str(write_spec(tmp_path, spec_text, "a.toml", ref_dir))]) == 0
    original = loop.Trainer.train_step
    dtypes = set()

    def crash(self):
        dtypes.update(p.dtype for p in self.model.parameters())
        if self.step == 5:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", crash)
    assert main(["train", str(write_spec(tmp_path, spec_text, "b.toml", run_dir))]) == 130
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert main(["resume", str(run_dir)]) == 0
    assert dtypes == {torch.bfloat16}
    assert losses(run_dir) == losses(ref_dir)
