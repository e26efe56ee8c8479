"""gradproj inside Hugging Face's Trainer: a tiny random LLaMA from a LlamaConfig (no download).

2 layers, hidden 32, vocab 64, sequences of 16 tokens with a learnable rule; a run of 12
steps takes about half a second on one CPU thread.
"""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from gradproj.integrations.hf_options import OptionError  # noqa: E402
from gradproj.integrations.transformers import (GradprojTrainer, gradproj_optimizer,  # noqa: E402
                                                llamafactory_optimizer)

VOCAB, SEQ = 64, 16


class Arithmetic(torch.utils.data.Dataset):
    """x_{t+1} = x_t + d (mod VOCAB), start and step d random per sequence: learnable."""

    def __init__(self, n: int = 128):
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, VOCAB, (n, 1), generator=g)
        step = torch.randint(1, 5, (n, 1), generator=g)
        self.rows = (start + step * torch.arange(SEQ)) % VOCAB

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg)


def args(out, optim="galore_adamw", optim_args="rank=8,update_proj_gap=5", steps=12, **kw):
    base = dict(optim=optim, optim_target_modules=["attn", "mlp"], optim_args=optim_args,
                learning_rate=1e-2, max_steps=steps, per_device_train_batch_size=4,
                logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                max_grad_norm=0.0, disable_tqdm=True, seed=0, lr_scheduler_type="cosine",
                warmup_steps=2)
    base.update(kw)
    return transformers.TrainingArguments(str(out), **base)


class StopAt(transformers.TrainerCallback):
    """Interrupt a run after step `step` (its checkpoint is saved first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **_):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(out, model=None, resume=None, stop_at=None, **kw):
    trainer = GradprojTrainer(model=model or tiny_llama(), args=args(out, **kw),
                              train_dataset=Arithmetic(),
                              callbacks=[StopAt(stop_at)] if stop_at else None)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def logged(trainer, key):
    return [r[key] for r in trainer.state.log_history if key in r and "train_runtime" not in r]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# every preset, through the HF names or optim_args preset=...
PRESET_RUNS = [("galore_adamw", "rank=8,update_proj_gap=5"),
               ("galore_adamw_8bit", "rank=8,update_proj_gap=5"),
               ("galore_adafactor", "rank=8,update_proj_gap=5"),
               ("apollo_adamw", "rank=8,update_proj_gap=5,proj=random,scale_type=channel"),
               ("adamw_torch", "preset=apollo-mini,update_proj_gap=5"),
               ("adamw_torch", "preset=fira,rank=8,update_proj_gap=5"),
               ("adamw_torch", "preset=frugal,rank=8,update_proj_gap=5"),
               ("adamw_torch", "preset=q-galore,rank=8,update_proj_gap=5,weight_group_size=32")]


@pytest.mark.parametrize("optim,optim_args", PRESET_RUNS, ids=lambda v: v)
def test_each_preset_trains_through_the_trainer(tmp_path, optim, optim_args):
    trainer = train(tmp_path, optim=optim, optim_args=optim_args, steps=24)
    losses = logged(trainer, "loss")
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3  # ln 64 = 4.16 at the start
    assert all(v > 0 for v in logged(trainer, "grad_norm"))
    # the projected weights are exactly the attention and MLP Linear weights
    low = [g for g in trainer.optimizer.param_groups if g["lowrank"]]
    assert sum(len(g["params"]) for g in low) == 2 * 7


class CountStacks(transformers.TrainerCallback):
    """Values of gradients the optimizer stacks (aten.stack/cat) at each optimizer step."""

    def __init__(self):
        self.stacked: list[int] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **_):
        from torch.utils._python_dispatch import TorchDispatchMode

        stacked = self.stacked

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, a=(), kw=None):
                if func in (torch.ops.aten.stack.default, torch.ops.aten.cat.default):
                    stacked[-1] += sum(t.numel() for t in a[0])
                return func(*a, **(kw or {}))

        stacked.append(0)
        step, mode = optimizer.step, Mode()

        def counted(*a, **kw):  # this step only
            optimizer.step = step
            with mode:
                return step(*a, **kw)
        optimizer.step = counted


def test_gradient_views_survive_the_trainers_zero_grad(tmp_path):
    """HF calls model.zero_grad() after each step; GradprojTrainer re-attaches the bucket
    views, so from the second step on nothing is stacked, with the losses of the copying run."""
    runs = {}
    for views in ("false", "true"):
        counter = CountStacks()
        trainer = GradprojTrainer(model=tiny_llama(), train_dataset=Arithmetic(),
                                  args=args(tmp_path / views, optim_args="rank=8,update_proj_gap=50,"
                                            f"gradient_as_bucket_view={views}", steps=6),
                                  callbacks=[counter])
        trainer.train()
        runs[views] = (logged(trainer, "loss"), counter.stacked)
    assert runs["true"][0] == runs["false"][0]
    copying, viewing = runs["false"][1], runs["true"][1]
    assert len(copying) == len(viewing) == 6 and min(copying) > 0
    assert viewing[0] == copying[0] and viewing[1:] == [0] * 5


@pytest.mark.parametrize("optim,optim_args", [
    ("galore_adamw", "rank=8,update_proj_gap=5"),
    # INT8 weights: the Trainer converts the layers before it loads the checkpoint into them
    ("adamw_torch", "preset=q-galore,rank=8,update_proj_gap=5,weight_group_size=32")])
def test_resume_from_a_trainer_checkpoint_is_bit_exact(tmp_path, optim, optim_args):
    kw = dict(save_strategy="steps", save_steps=6, optim=optim, optim_args=optim_args)
    full = train(tmp_path / "full", **kw)
    train(tmp_path / "part", stop_at=6, **kw)
    resumed = train(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-6"), **kw)
    assert logged(resumed, "loss")[-6:] == logged(full, "loss")[-6:]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_per_layer_equals_normal_mode_at_accumulation_1(tmp_path):
    normal = train(tmp_path / "n")
    per_layer = train(tmp_path / "p", optim="galore_adamw_layerwise")
    assert per_layer.stepper is not None and normal.stepper is None
    assert logged(per_layer, "loss") == logged(normal, "loss")  # same arithmetic, bit for bit
    lr_n, lr_p = logged(normal, "learning_rate"), logged(per_layer, "learning_rate")
    assert lr_p == lr_n and len(set(lr_p)) > 5  # the scheduler drives the per-layer steps
    norms_n, norms_p = logged(normal, "grad_norm"), logged(per_layer, "grad_norm")
    assert min(norms_p) > 0.1  # HF's own layer-wise GaLore logs 0.0 here
    # same norms, summed in another order (per tensor, then over tensors)
    assert norms_p == pytest.approx(norms_n, rel=1e-6)


def test_per_layer_with_accumulation_4(tmp_path):
    kw = dict(gradient_accumulation_steps=4, per_device_train_batch_size=2)
    normal = train(tmp_path / "n", **kw)
    per_layer = train(tmp_path / "p", optim="galore_adamw_layerwise", **kw)
    ln, lp = logged(normal, "loss"), logged(per_layer, "loss")
    # the documented bound (README, perlayer.py): within 1 % of normal mode
    assert max(abs(a - b) / a for a, b in zip(ln, lp)) < 0.01
    assert min(logged(per_layer, "grad_norm")) > 0.1


def test_per_layer_grad_norm_under_accumulation_is_the_documented_one(tmp_path):
    """Step 1 starts from the same weights in both modes, so normal mode's summed gradients
    ΣG are per-layer mode's too. Per-layer logs sqrt(Σ_full ‖ΣG‖² + Σ_projected ‖PᵀΣG‖²),
    P being the basis its step used (fit on the first micro-batch)."""
    kw = dict(gradient_accumulation_steps=4, per_device_train_batch_size=2, steps=1)
    grads = {}

    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **_):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters()})

    normal = GradprojTrainer(model=tiny_llama(), args=args(tmp_path / "n", **kw),
                             train_dataset=Arithmetic(), callbacks=[Capture()])
    normal.train()
    per_layer = train(tmp_path / "p", optim="galore_adamw_layerwise", **kw)
    opt = per_layer.stepper.opt  # Trainer.optimizer is accelerate's wrapper of it
    expected = 0.0
    for name, p in per_layer.model.named_parameters():
        g = grads[name]
        if opt.accumulates_low_rank(p):
            g = opt.project_grad(p, g)  # the basis of step 1, kept in the optimizer's state
        expected += g.double().pow(2).sum().item()
    full_norm = logged(normal, "grad_norm")[0]
    got = logged(per_layer, "grad_norm")[0]
    assert got == pytest.approx(math.sqrt(expected), rel=1e-5)
    assert 0.2 * full_norm < got < full_norm  # the in-subspace part of the projected weights


def test_per_layer_resume_is_bit_exact_with_accumulation(tmp_path):
    kw = dict(optim="galore_adamw_layerwise", gradient_accumulation_steps=2,
              per_device_train_batch_size=2, save_strategy="steps", save_steps=6)
    full = train(tmp_path / "full", **kw)
    train(tmp_path / "part", stop_at=6, **kw)
    resumed = train(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-6"), **kw)
    assert logged(resumed, "loss")[-6:] == logged(full, "loss")[-6:]
    assert logged(resumed, "grad_norm")[-6:] == logged(full, "grad_norm")[-6:]


def test_per_layer_refuses_clipping_and_bad_names_in_one_line(tmp_path):
    with pytest.raises(OptionError, match=r"max_grad_norm must be 0 .* got 1.0$"):
        GradprojTrainer(model=tiny_llama(), args=args(tmp_path, optim="galore_adamw_layerwise",
                                                      max_grad_norm=1.0))
    with pytest.raises(OptionError, match="unknown key 'rnak'"):
        GradprojTrainer(model=tiny_llama(), args=args(tmp_path, optim_args="rnak=8"))
    with pytest.raises(OptionError, match="per-layer mode runs inside the Trainer"):
        gradproj_optimizer(tiny_llama(), args(tmp_path, optim="galore_adamw_layerwise"))


def test_plain_trainer_with_our_optimizer_and_llamafactory_names(tmp_path):
    model = tiny_llama()
    hf_args = args(tmp_path, optim="adamw_torch", weight_decay=0.1, adam_epsilon=1e-7)
    opt = llamafactory_optimizer(model, {"use_galore": True, "galore_rank": 8,
                                         "galore_scale": 0.25}, hf_args)
    low, decay, plain = opt.param_groups
    assert low["lowrank"] and low["rank"] == 8 and low["eps"] == 1e-7  # LLaMA-Factory: args' eps
    assert len(low["params"]) == 2 * 7  # "all": every Linear but lm_head
    assert decay["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0  # norms not decayed
    assert {p.dim() for p in plain["params"]} == {1}
    trainer = transformers.Trainer(model=model, args=hf_args, train_dataset=Arithmetic(),
                                   optimizers=(opt, None))
    trainer.train()
    losses = logged(trainer, "loss")
    assert losses[-1] < 0.9 * losses[0]


def test_llamafactory_layerwise_runs_per_layer_in_gradproj_trainer(tmp_path):
    from gradproj.integrations.hf_options import from_llamafactory

    hf_args = args(tmp_path, optim="adamw_torch", gradient_accumulation_steps=2,
                   per_device_train_batch_size=2)
    choice = from_llamafactory({"use_galore": True, "galore_rank": 8, "galore_scale": 0.25,
                                "galore_layerwise": True}, hf_args.optim)
    trainer = GradprojTrainer(model=tiny_llama(), args=hf_args, train_dataset=Arithmetic(),
                              gradproj_choice=choice)
    trainer.train()
    assert trainer.stepper is not None and trainer.stepper.grad_accum == 2
    losses = logged(trainer, "loss")
    assert losses[-1] < 0.9 * losses[0] and min(logged(trainer, "grad_norm")) > 0.1
