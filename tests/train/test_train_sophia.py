"""Sophia in the TOML loop: the curvature pass (`[optimizer] curvature_every`) runs, moves
training, resumes exactly (normal, per-layer and Hutchinson), and bad settings name their key."""
from __future__ import annotations

import pytest

from gradproj.train import loop
from gradproj.train.cli import main
from gradproj.train.metrics import read_metrics

from trainhelpers import MICRO_SPEC, write_spec

SOPHIA = MICRO_SPEC.replace('rule = "adamw"\nlr = 1e-2', 'rule = "sophia"\nlr = 1e-2\ncurvature_every = 2')


def losses(run_dir):
    return {r["step"]: (r.get("loss/train"), r.get("loss/eval")) for r in read_metrics(run_dir)
            if r["step"] > 0}


def test_sophia_run_lowers_the_loss_and_the_curvature_matters(tmp_path):
    text = SOPHIA.replace("steps = 8", "steps = 30")
    assert main(["train", str(write_spec(tmp_path, text, "a.toml", tmp_path / "a"))]) == 0
    curve = losses(tmp_path / "a")
    first, last = curve[1][0], curve[30][0]
    assert last < first - 1.0, (first, last)  # 30 steps of the micro model: 5.5 -> ~3.0 nats
    # with no curvature estimate (h = 0) every step is sign-momentum: another trajectory
    never = text.replace("curvature_every = 2", "curvature_every = 1000")
    assert main(["train", str(write_spec(tmp_path, never, "b.toml", tmp_path / "b"))]) == 0
    assert losses(tmp_path / "b")[30][0] != last


def test_per_layer_matches_normal_mode_bitwise(tmp_path):
    """grad_accum 1: the per-layer hooks feed the same ĝ to the same estimate."""
    normal = write_spec(tmp_path, SOPHIA, "n.toml", tmp_path / "n")
    per_layer = write_spec(tmp_path, SOPHIA.replace("threads = 1", "threads = 1\nper_layer = true"),
                           "p.toml", tmp_path / "p")
    assert main(["train", str(normal)]) == 0 and main(["train", str(per_layer)]) == 0
    assert losses(tmp_path / "n") == losses(tmp_path / "p")


class Stop(Exception):
    pass


@pytest.mark.parametrize("variant", ["gnb", "per-layer-accum", "hutchinson-q8"])
def test_resume_repeats_the_run_exactly(tmp_path, monkeypatch, variant):
    """Stopped after step 4 (checkpoint at 3, curvature passes after 2 and 4): resume
    re-runs 4..8 — curvature passes after 4, 6, 8 included — to the same bits."""
    text = {"gnb": SOPHIA,
            "per-layer-accum": SOPHIA.replace("threads = 1", "threads = 1\nper_layer = true\n"
                                                             "grad_accum = 2"),
            "hutchinson-q8": SOPHIA.replace("curvature_every = 2", 'curvature_every = 2\n'
                                            'curvature_estimator = "hutchinson"\n'
                                            'state_format = "q8"')}[variant]
    reference = write_spec(tmp_path, text, "ref.toml", tmp_path / "ref")
    assert main(["train", str(reference)]) == 0
    spec = write_spec(tmp_path, text, "run.toml", tmp_path / "run")
    original = loop.Trainer.train_step

    def train_step(self):
        if self.step == 4:
            raise Stop
        return original(self)

    monkeypatch.setattr(loop.Trainer, "train_step", train_step)
    with pytest.raises(Stop):
        main(["train", str(spec)])
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    assert main(["resume", str(tmp_path / "run")]) == 0
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


@pytest.mark.parametrize("change,needles", [
    (lambda t: t.replace("curvature_every = 2", "curvature_every = 0"),
     ["[optimizer].curvature_every", "an integer >= 1, got 0"]),
    (lambda t: t.replace('rule = "sophia"', 'rule = "adamw"'),
     ["[optimizer].curvature_every", "unknown option"]),
    (lambda t: t.replace("curvature_every = 2", 'curvature_every = 2\ncurvature_estimator = "fisher"'),
     ["[optimizer].curvature_estimator", "one of gnb, hutchinson"]),
    (lambda t: t.replace("curvature_every = 2", 'curvature_every = 2\ncurvature_estimator = "hutchinson"')
              .replace("threads = 1", "threads = 1\nper_layer = true"),
     ["[optimizer].curvature_estimator", "per_layer", "got 'hutchinson'"]),
    (lambda t: t.replace("threads = 1", 'threads = 1\nparallel = "ddp"\nper_layer = true'),
     ["[optimizer].curvature_every", "normal mode only", "'ddp'", "per_layer = true"]),
    (lambda t: t.replace("threads = 1", 'threads = 1\nparallel = "fsdp2"'),
     ["[optimizer].curvature_every", "normal mode only", "'fsdp2'"]),
    (lambda t: t.replace("threads = 1", 'threads = 1\ngradient = "zeroth-order"'),
     ["[optimizer].curvature_every", "backprop", "'zeroth-order'"]),
], ids=["zero", "not-sophia", "estimator", "hutchinson-per-layer", "ddp-per-layer", "fsdp2",
        "zeroth-order"])
def test_bad_curvature_settings_name_the_key(tmp_path, capsys, change, needles):
    spec = write_spec(tmp_path, change(SOPHIA))
    assert main(["train", str(spec)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(spec) in lines[0], lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "run").exists()


def test_the_pass_runs_after_every_kth_step_on_the_mean_of_fresh_micro_batches(tmp_path, monkeypatch):
    """k = 2, 6 steps, grad_accum 2: passes after steps 2, 4, 6 (the official script's
    `iter_num % k == k − 1`, 0-based), each on 2 fresh input batches; the GNB gradient is the
    mean of the micro-batches' gradients, recomputed here from the inputs the pass used with
    a deterministic stand-in for the sampled-label loss; B = batch·seq_len·grad_accum
    tokens; and the labels' generator is seeded afresh for every pass."""
    import copy

    import torch

    from gradproj.train import curvature as curvature_pass
    from gradproj.train.loop import Trainer
    from gradproj.train.spec import load_spec
    text = SOPHIA.replace("threads = 1", "threads = 1\ngrad_accum = 2").replace("steps = 8", "steps = 6")
    trainer = Trainer(load_spec(write_spec(tmp_path, text)))
    inputs, seeds, calls = [], [], []

    def stand_in(logits, generator=None):  # mean(logits²): a loss with no random labels
        seeds.append(generator.initial_seed())
        return logits.float().pow(2).mean(), logits.shape[0] * logits.shape[1]

    monkeypatch.setattr(curvature_pass, "sampled_label_loss", stand_in)
    batch = trainer.curvature.data.batch

    def recording_batch(step, micro=0):
        x, y = batch(step, micro)
        inputs.append(x)
        return x, y

    monkeypatch.setattr(trainer.curvature.data, "batch", recording_batch)
    opt = trainer.opt
    params = [p for g in opt.param_groups for p in g["params"]]

    def spy(estimator, batch_size=None, **_):
        xs = inputs[-2:]
        model = copy.deepcopy(trainer.model)
        mean = sum(model.logits(x).float().pow(2).mean() for x in xs) / len(xs)
        copies = dict(model.named_parameters())
        names = [n for n, q in trainer.model.named_parameters() if any(q is p for p in params)]
        want = torch.autograd.grad(mean, [copies[n] for n in names])
        got = [dict(trainer.model.named_parameters())[n].grad for n in names]
        calls.append((opt.state[params[0]]["step"], estimator, batch_size, len(inputs),
                      not torch.equal(xs[0], xs[1]),
                      all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(got, want))))

    monkeypatch.setattr(opt, "update_curvature", spy)
    trainer.run()
    tokens = 4 * 32 * 2
    assert calls == [(2, "gnb", tokens, 2, True, True), (4, "gnb", tokens, 4, True, True),
                     (6, "gnb", tokens, 6, True, True)]
    assert len(seeds) == 6 and len({seeds[0], seeds[2], seeds[4]}) == 3
