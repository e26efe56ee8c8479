"""Metric backends ([log] backends) and the progress bar."""
from __future__ import annotations

import io
import shutil

import pytest

from gradproj.train.checks import SpecError
from gradproj.train.cli import main
from gradproj.train.metrics import Progress, read_metrics
from gradproj.train.spec import load_spec

from trainhelpers import MICRO_SPEC, write_spec


def with_backends(backends: str) -> str:
    return MICRO_SPEC.replace("plot = false", f"plot = false\nbackends = {backends}")


def test_tensorboard_events_are_written_and_read_back_across_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = write_spec(tmp_path, with_backends('["jsonl", "tensorboard"]'))
    run = tmp_path / "run"
    assert main(["train", str(spec)]) == 0
    shutil.rmtree(run / "checkpoints" / "step-8")  # resume from step 6: steps 7, 8 again
    assert main(["resume", str(run)]) == 0
    jsonl = {r["step"]: r for r in read_metrics(run) if "loss/train" in r}
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss/train", "lr", "memory/optimizer_state(MiB)"):
        scalars = events.Scalars(key)
        steps = [s.step for s in scalars]
        assert steps == sorted(jsonl) == list(range(1, 9)), (key, steps)  # the purge dropped 7, 8
        for s in scalars:
            assert s.value == pytest.approx(jsonl[s.step][key], rel=1e-6)  # stored as float32
    assert "data/description/text_summary" in events.Tags()["tensors"]  # strings as text


def test_wandb_offline_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = write_spec(tmp_path, with_backends('["jsonl", "wandb"]'))
    assert main(["train", str(spec)]) == 0
    assert (tmp_path / "run" / "wandb-id").is_file()
    assert any((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_backend_mistakes_are_one_line(tmp_path, monkeypatch):
    import gradproj.train.loggers as loggers

    spec = write_spec(tmp_path, with_backends('["jsonl", "tensorbord"]'))
    with pytest.raises(SpecError, match=r"\[log\]\.backends: .* got 'tensorbord'; did you mean "
                                        r"'tensorboard'\?"):
        load_spec(spec)
    spec = write_spec(tmp_path, with_backends('["tensorboard"]'))
    with pytest.raises(SpecError, match="expected 'jsonl' among"):
        load_spec(spec)
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None)
    spec = write_spec(tmp_path, with_backends('["jsonl", "wandb"]'))
    with pytest.raises(SpecError, match="'wandb' needs its package here: pip install wandb"):
        load_spec(spec)


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_in_a_log_file_prints_a_tenth_of_the_updates():
    stream = _Stream(tty=False)
    progress = Progress(200, stream=stream)
    for step in range(1, 201):
        progress.update(step, 2.0, 1e4)
    progress.message("saved")
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 + 10 + 1 and lines[-1] == "saved"  # step 1, every 20th, message
    assert lines[0].startswith("step 1/200 loss 2.0000") and lines[-2].startswith("step 200/200")


def test_progress_on_a_terminal_is_one_redrawn_tqdm_bar():
    stream = _Stream(tty=True)
    progress = Progress(50, stream=stream)
    for step in range(1, 51):
        progress.update(step, 1.5, 2e4)
    progress.close()
    text = stream.getvalue()
    assert "\r" in text and "50/50" in text and "loss 1.5000" in text
    assert text.count("\n") <= 1  # redrawn in place, one line left at the end
