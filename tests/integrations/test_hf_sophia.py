"""Sophia through Hugging Face's Trainer: its defaults, and its curvature pass.

The same tiny random LLaMA as test_hf_trainer.py (LlamaConfig, no download).
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_hf_trainer import Arithmetic, args, logged, tiny_llama, train  # noqa: E402

from gradproj.integrations.hf_options import OptionError  # noqa: E402
from gradproj.integrations.transformers import GradprojTrainer, gradproj_optimizer  # noqa: E402

SOPHIA = "preset=sophia,rank=8,update_proj_gap=5,curvature_every=3"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def built(tmp_path, optim="galore_adamw", optim_args=SOPHIA, **kw):
    trainer = GradprojTrainer(model=tiny_llama(), args=args(tmp_path, optim=optim,
                                                            optim_args=optim_args, **kw),
                              train_dataset=Arithmetic())
    return trainer.create_optimizer().param_groups


@pytest.mark.parametrize("optim,optim_args", [
    ("galore_adamw", SOPHIA),
    ("galore_adamw", "rule=sophia,rank=8"),      # over GaLore's preset: not its Adam ε 1e-6
    ("apollo_adamw", "rule=sophia,rank=8"),      # APOLLO passes HF's Adam args to AdamW only
    ("galore_adamw", SOPHIA + ",betas=0.9:0.95"),  # optim_args: ours, explicit
])
def test_sophia_keeps_its_defaults_unless_set(tmp_path, optim, optim_args):
    groups = built(tmp_path, optim, optim_args)
    betas = (0.9, 0.95) if "betas" in optim_args else (0.965, 0.99)
    assert {(g["rule"], g["betas"], g["eps"]) for g in groups} == {("sophia", betas, 1e-15)}
    decay = 0.1 if "preset=sophia" in optim_args else 0.0  # the preset's wd; HF's 0.0 reads unset
    assert [g["weight_decay"] for g in groups] == [decay, decay, 0.0]  # norms never decay


def test_explicit_training_args_apply_and_defaults_read_as_unset(tmp_path):
    groups = built(tmp_path, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-12,
                   weight_decay=0.05)
    # adam_beta1 = 0.9 is HF's default: indistinguishable from unset, Sophia's 0.965 stays
    assert {(g["betas"], g["eps"]) for g in groups} == {((0.965, 0.95), 1e-12)}
    assert [g["weight_decay"] for g in groups] == [0.05, 0.05, 0.0]
    # optim_args win over the TrainingArguments
    groups = built(tmp_path, optim_args=SOPHIA + ",betas=0.9:0.98,eps=1e-9", adam_beta2=0.95,
                   adam_epsilon=1e-12)
    assert {(g["betas"], g["eps"]) for g in groups} == {((0.9, 0.98), 1e-9)}


def test_adamw_mappings_keep_hfs_behaviour(tmp_path):
    """GaLore's AdamW takes none of the Trainer's Adam args, APOLLO's all of them (HF)."""
    kw = dict(adam_beta1=0.8, adam_epsilon=1e-7)
    galore = built(tmp_path, "galore_adamw", "rank=8", **kw)
    assert {(g["betas"], g["eps"]) for g in galore} == {((0.9, 0.999), 1e-6)}
    apollo = built(tmp_path, "apollo_adamw", "rank=8", **kw)
    assert {(g["betas"], g["eps"]) for g in apollo} == {((0.8, 0.999), 1e-7)}


def test_a_bad_tuple_in_optim_args_is_one_line(tmp_path):
    with pytest.raises(OptionError, match=r"betas='0.9' is not 2 numbers joined by ':'"):
        built(tmp_path, optim_args=SOPHIA + ",betas=0.9")


class Snapshot(transformers.TrainerCallback):
    """Copies the model and the step's inputs at the first step end, before the curvature
    callback (added after the user's callbacks) runs its pass."""

    def __init__(self, trainer_ref, step):
        self.trainer_ref, self.step, self.taken = trainer_ref, step, None

    def on_step_end(self, args, state, control, model=None, **_):
        if state.global_step == self.step:
            window = [dict(x) for x in self.trainer_ref[0].curvature.window]
            self.taken = (copy.deepcopy(model), window)


@pytest.mark.filterwarnings("ignore:rank 64 >= min")
@pytest.mark.parametrize("accum", [1, 2])
def test_the_pass_feeds_the_gnb_estimate_of_the_steps_inputs(tmp_path, accum):
    """Full rank (rank 64 >= every weight's smaller side), no clipping: after the first
    pass (step 3) Sophia's
    h = (1 − β2)·B·ĝ⊙ĝ, ĝ the gradient of the mean cross-entropy on labels drawn from the
    model's own softmax over the step's B tokens, recomputed here on a copy of the model."""
    ref = []
    snap = Snapshot(ref, 3)
    hf_args = args(tmp_path, optim_args="preset=sophia,curvature_every=3,rank=64", steps=3,
                   gradient_accumulation_steps=accum,
                   per_device_train_batch_size=4 // accum)
    trainer = GradprojTrainer(model=tiny_llama(), args=hf_args, train_dataset=Arithmetic(),
                              callbacks=[snap])
    ref.append(trainer)
    trainer.train()
    model, window = snap.taken
    assert len(window) == accum
    from gradproj.train.curvature import curvature_generator
    gen = curvature_generator(0, 2, "cpu")  # seed 0, after the 3rd step (0-based 2)
    b_total = sum(x["input_ids"].numel() for x in window)
    for x in window:
        logits = model(input_ids=x["input_ids"]).logits.float().reshape(-1, 64)
        with torch.no_grad():
            labels = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        ce = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
        (ce / b_total).backward()
    assert b_total == 4 * 16  # 4 sequences of 16 tokens, no padding
    opt = trainer.gradproj_optimizer
    assert not any(opt.is_low_rank(p, g) for g in opt.param_groups for p in g["params"])
    for p, q in zip(trainer.model.parameters(), model.parameters()):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.01 * b_total * q.grad.square(),
                                   rtol=1e-4, atol=1e-12)


def test_the_pass_runs_every_k_steps_and_changes_the_run(tmp_path, monkeypatch):
    from gradproj.optimizers import LowRankOptimizer
    steps = []
    original = LowRankOptimizer.update_curvature

    def counting(self, *a, **kw):
        steps.append(trainer_ref[0].state.global_step)
        return original(self, *a, **kw)

    trainer_ref = []
    monkeypatch.setattr(LowRankOptimizer, "update_curvature", counting)
    trainer = GradprojTrainer(model=tiny_llama(), args=args(tmp_path / "k3", optim_args=SOPHIA,
                                                            steps=10),
                              train_dataset=Arithmetic())
    trainer_ref.append(trainer)
    trainer.train()
    assert steps == [3, 6, 9]
    with_pass = logged(trainer, "loss")
    assert all(math.isfinite(v) for v in with_pass) and with_pass[-1] < with_pass[0]
    monkeypatch.setattr(LowRankOptimizer, "update_curvature", lambda self, *a, **kw: None)
    without = logged(train(tmp_path / "none", optim_args=SOPHIA, steps=10), "loss")
    assert without[:3] == with_pass[:3] and without[3:] != with_pass[3:]  # h = 0 until step 3


def test_resume_with_the_pass_is_bit_exact(tmp_path):
    kw = dict(save_strategy="steps", save_steps=4, optim_args=SOPHIA, steps=8)
    full = train(tmp_path / "full", **kw)
    train(tmp_path / "part", stop_at=4, **kw)
    resumed = train(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-4"), **kw)
    assert logged(resumed, "loss")[-4:] == logged(full, "loss")[-4:]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_per_layer_pass_equals_normal_mode(tmp_path):
    """Per-layer mode feeds ĝ through the stepper's hooks: the same h as normal mode."""
    normal = train(tmp_path / "n", optim_args=SOPHIA, steps=4)
    per_layer = train(tmp_path / "p", optim="galore_adamw_layerwise", optim_args=SOPHIA, steps=4)
    assert per_layer.stepper is not None
    opt_n, opt_p = normal.gradproj_optimizer, per_layer.gradproj_optimizer
    for p, q in zip(normal.model.parameters(), per_layer.model.parameters()):
        h = opt_n.state[p]["hessian"]
        assert h.abs().max() > 0
        torch.testing.assert_close(opt_p.state[q]["hessian"], h, rtol=1e-4, atol=1e-10)


def test_hutchinson_runs_in_normal_mode_and_is_refused_per_layer(tmp_path):
    hutch = SOPHIA + ",curvature_estimator=hutchinson"
    trainer = train(tmp_path / "h", optim_args=hutch, steps=3)
    hs = [s["hessian"] for s in trainer.gradproj_optimizer.state.values()]
    assert any(h.abs().max() > 0 for h in hs) and any((h < 0).any() for h in hs)  # u⊙Hu
    with pytest.raises(OptionError, match="'hutchinson' needs a double backward"):
        train(tmp_path / "p", optim="galore_adamw_layerwise", optim_args=hutch, steps=3)


def test_a_plain_trainer_cannot_run_the_pass(tmp_path):
    with pytest.raises(OptionError, match="gradproj_optimizer: rule 'sophia' needs its "
                                          "curvature pass .* use GradprojTrainer"):
        gradproj_optimizer(tiny_llama(), args(tmp_path, optim_args=SOPHIA))
