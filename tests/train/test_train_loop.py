"""End-to-end runs of the loop on the micro model: run folder, schedule, non-finite steps,
autocast and activation checkpointing, `list` and `plot`."""
from __future__ import annotations

import math

import pytest
import torch

from gradproj.registry import ALL_REGISTRIES
from gradproj.train.cli import main
from gradproj.train.loop import lr_factor
from gradproj.train.metrics import read_metrics
from gradproj.train.model import Llama
from gradproj.train.spec import TrainSpec, load_spec

from trainhelpers import MICRO_SPEC, write_spec


def test_run_folder_holds_spec_metrics_plot_checkpoints(tmp_path, capsys):
    spec = write_spec(tmp_path, MICRO_SPEC.replace("plot = false", "plot = true"))
    assert main(["train", str(spec)]) == 0
    assert "vs unigram baseline" in capsys.readouterr().out
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 10_000
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-8"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-6", "step-8"]
    records = read_metrics(run)
    assert records[0]["step"] == 0 and records[0]["data/unigram_entropy(nats)"] > 2.5
    last = records[-1]
    for key in ("loss/train", "loss/eval", "ppl/eval", "lr", "time/step(s)",
                "memory/optimizer_state(MiB)", "memory/grad_peak(MiB)", "subspace/refreshes",
                "throughput/tokens_per_s", "steps/skipped"):
        assert key in last, key
    assert last["subspace/refreshes"] == 2 * 14  # 14 projected weights, refreshed at 0 and 4
    assert math.isclose(last["ppl/eval"], math.exp(last["loss/eval"]))
    # the resolved spec loads back to itself
    first = load_spec(spec).resolved()
    again = load_spec(run / "spec.toml").resolved()
    assert again == first


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = lr_factor(TrainSpec(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(99) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55, abs=0.01)  # cosine midpoint
    lin = lr_factor(TrainSpec(steps=11, lr_schedule="linear", min_lr_ratio=0.0))
    assert [round(lin(s), 6) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]


def nan_on_calls(monkeypatch, bad_calls):
    original = Llama.forward
    calls = {"n": 0}

    def forward(self, tokens, targets):
        loss = original(self, tokens, targets)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if bad_calls(calls["n"]):
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Llama, "forward", forward)


@pytest.mark.parametrize("per_layer", [False, True])
def test_non_finite_step_is_skipped_and_counted(tmp_path, monkeypatch, per_layer):
    nan_on_calls(monkeypatch, lambda n: n == 3)
    text = MICRO_SPEC.replace("threads = 1", f"threads = 1\nper_layer = {str(per_layer).lower()}")
    assert main(["train", str(write_spec(tmp_path, text))]) == 0
    records = {r["step"]: r for r in read_metrics(tmp_path / "run")}
    assert math.isnan(records[3]["loss/train"])
    assert records[2]["steps/skipped"] == 0 and records[8]["steps/skipped"] == 1
    assert math.isfinite(records[8]["loss/eval"])


def test_non_finite_gradient_in_per_layer_mode_skips_only_that_weight():
    from gradproj.optimizers import build_optimizer
    from gradproj.train.model import build_model, model_config
    from gradproj.train.perlayer import PerLayerStepper

    model = build_model(model_config("tiny", dim=32, n_layers=1, n_heads=2, ffn_dim=64))
    opt = build_optimizer(model, projector="randomized", rank=8, lr=1e-2)
    stepper = PerLayerStepper(opt)
    bad = model.layers[0].mlp.up_proj.weight
    bad.register_hook(lambda g: g * float("inf"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    assert stepper.end_step() is True
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (p is not bad), name
    stepper.remove()


def test_diverging_run_stops_with_one_line(tmp_path, monkeypatch, capsys):
    nan_on_calls(monkeypatch, lambda n: n >= 2)
    text = MICRO_SPEC.replace("threads = 1", "threads = 1\nmax_bad_steps = 3")
    assert main(["train", str(write_spec(tmp_path, text))]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "stopped at step 4: 3 steps in a row" in lines[0]


def test_bf16_autocast_and_activation_checkpointing_run(tmp_path):
    text = MICRO_SPEC.replace("steps = 8", "steps = 2").replace(
        "threads = 1", 'threads = 1\nautocast = "bf16"\nactivation_checkpointing = true')
    assert main(["train", str(write_spec(tmp_path, text))]) == 0
    assert math.isfinite(read_metrics(tmp_path / "run")[-1]["loss/eval"])


def test_list_prints_every_registry_and_model(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind, registry in ALL_REGISTRIES.items():
        assert f"{kind}:" in out
        for entry in registry:
            assert f"  {entry.name}" in out and entry.description in out
    assert "7b: 6738.4M parameters" in out
    assert main(["list", "rules"]) == 0
    assert "projectors:" not in capsys.readouterr().out


def test_plot_overlays_runs(tmp_path, capsys):
    for name, scale in (("a", 1.0), ("b", 0.9)):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            f'{{"step": {s}, "loss/train": {scale * 5 / s}}}\n' for s in range(1, 20)))
    out = tmp_path / "both.png"
    assert main(["plot", str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(out)]) == 0
    assert out.stat().st_size > 10_000



def test_gradient_as_bucket_view_trains_as_the_copying_step(tmp_path):
    """The [optimizer] option through the loop's accumulation, clipping and zero_grad:
    the same loss at every step (tests/core/test_gradient_views.py: the step itself)."""
    losses = []
    for view in ("false", "true"):
        text = MICRO_SPEC.replace("lr = 1e-2", f"lr = 1e-2\ngradient_as_bucket_view = {view}").replace(
            "threads = 1", "threads = 1\ngrad_accum = 2\ngrad_clip = 0.5")
        run = tmp_path / view
        assert main(["train", str(write_spec(tmp_path, text, f"{view}.toml", run))]) == 0
        losses.append([r["loss/train"] for r in read_metrics(run) if "loss/train" in r])
    assert len(losses[0]) == 8 and losses[0] == losses[1]
