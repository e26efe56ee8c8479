"""A parametrization through Hugging Face's Trainer: the tiny LlamaForCausalLM of
test_hf_trainer.py (no download), its attention and MLP Linear layers converted before the
optimizer is built, trained, then merged into a plain model computing the same.

The fine-tuning kinds (lora, lora-ga, welore, gradnormlorp) start from the random model
pre-trained 20 steps with HF's AdamW (eval loss 4.16 -> 3.21); sltrain, a pre-training
method that ignores the weights it replaces, from the random model. "Trains" is measured
on a fixed eval set (64 sequences): deterministic, where 24 train losses are not."""
from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import gradproj as gp  # noqa: E402
from gradproj.integrations.hf_options import OptionError  # noqa: E402
from gradproj.integrations.transformers import GradprojTrainer  # noqa: E402
from gradproj.parametrizations import parametrized_modules  # noqa: E402
from gradproj.quant.linear import is_quantized  # noqa: E402

from test_hf_trainer import Arithmetic, StopAt, args, logged, tiny_llama  # noqa: E402

KINDS = {  # small options for 2 layers of hidden 32 / ffn 64
    "lora": {"rank": 4},
    "lora-ga": {"rank": 4, "batches": 2},
    "sltrain": {"rank": 4, "density": 0.05},
    "welore": {"ratio": 0.3},
    "gradnormlorp": {"rank": 4},
}
PROBE = torch.arange(2 * 16).view(2, 16) % 64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    model = tiny_llama()
    kw = dict(optim="adamw_torch", optim_args=None, optim_target_modules=None, steps=20)
    transformers.Trainer(model=model, args=args(tmp_path_factory.mktemp("pre"), **kw),
                         train_dataset=Arithmetic()).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


def trainer_for(out, parametrization=None, callbacks=None, start=None, **kw):
    kw = {"optim_args": "rank=4,update_proj_gap=5", "steps": 24, **kw}
    model = tiny_llama()
    if start is not None:
        model.load_state_dict(start)
    return GradprojTrainer(model=model, args=args(out, **kw), train_dataset=Arithmetic(),
                           eval_dataset=Arithmetic(64), parametrization=parametrization,
                           callbacks=callbacks)


def train_lowers_eval_loss(trainer, **kw):
    before = trainer.evaluate()["eval_loss"]
    trainer.train(**kw)
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.99 * before, (before, after)  # lora 3.21 -> 3.12, the least here


@torch.no_grad()
def logits(model):
    model.eval()
    out = model(PROBE).logits
    model.train()
    return out


def assert_merges(trainer, tmp_path):
    losses = logged(trainer, "loss")
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(v) for v in losses)
    model = trainer.model
    trained = logits(model)
    gp.merge_parametrizations(model)
    assert not parametrized_modules(model)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "export")  # a plain LLaMA checkpoint: no extra tensors
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "export")
    assert set(plain.state_dict()) == set(tiny_llama().state_dict())
    torch.testing.assert_close(logits(plain), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_converts_the_targets_trains_and_merges_to_a_plain_model(tmp_path, kind,
                                                                           pretrained):
    trainer = trainer_for(tmp_path, {"kind": kind, **KINDS[kind]},
                          start=None if kind == "sltrain" else pretrained)
    converted = parametrized_modules(trainer.model)
    # 2 layers × (q, k, v, o, gate, up, down), the head left alone
    assert len(converted) == 14 and all(n.endswith("_proj") for n in converted)
    train_lowers_eval_loss(trainer)
    assert_merges(trainer, tmp_path)


def test_optim_args_name_sltrain_int8_and_resume_is_bit_exact(tmp_path):
    """`parametrization=...` in optim_args, INT8 B, A, S stepped by our optimizer; the
    Trainer converts before `resume_from_checkpoint` loads the codes and scales."""
    kw = dict(optim_args="rank=4,update_proj_gap=5,parametrization=sltrain,"
                         "parametrization.rank=4,parametrization.int8=true,"
                         "parametrization.group_size=32",
              save_strategy="steps", save_steps=6, steps=12)
    full = trainer_for(tmp_path / "full", **kw)
    assert any(is_quantized(p) for p in full.model.parameters())
    train_lowers_eval_loss(full)
    part = trainer_for(tmp_path / "part", callbacks=[StopAt(6)], **kw)
    part.train()
    resumed = trainer_for(tmp_path / "part", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-6"))
    assert logged(resumed, "loss")[-6:] == logged(full, "loss")[-6:]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert_merges(full, tmp_path)


class Snapshot(transformers.TrainerCallback):
    """The model's logits and LoRA factors when training begins (after LoRA-GA's init)."""

    def on_train_begin(self, args, state, control, model=None, **_):
        self.logits = logits(model)
        self.b = [m.lora_B.detach().clone() for m in parametrized_modules(model).values()]


def test_lora_ga_initialises_from_the_train_dataloader_keeping_the_function(tmp_path):
    before = logits(tiny_llama())
    snap = Snapshot()
    trainer = trainer_for(tmp_path, {"kind": "lora-ga", "rank": 4, "batches": 2},
                          callbacks=[snap], steps=1)
    trainer.train()
    assert all(b.abs().sum() > 0 for b in snap.b)  # LoRA's B = 0; LoRA-GA's from the SVD
    torch.testing.assert_close(snap.logits, before, rtol=1e-4, atol=1e-5)  # W offset by B·A
    too_many = trainer_for(tmp_path / "x", {"kind": "lora-ga", "rank": 4, "batches": 99})
    with pytest.raises(OptionError, match="batches = 99 but the train dataloader has only 32"):
        too_many.train()


def test_hf_own_optimizer_trains_the_converted_model(tmp_path, pretrained):
    trainer = trainer_for(tmp_path, "lora", optim="adamw_torch", optim_args=None,
                          start=pretrained)
    train_lowers_eval_loss(trainer)
    assert not isinstance(trainer.optimizer, gp.LowRankOptimizer)
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    lora = {id(p) for m in parametrized_modules(trainer.model).values()
            for n, p in m.named_parameters() if n.startswith("lora_")}
    assert trained == lora  # LoRA: only the factors train
    assert_merges(trainer, tmp_path)


@pytest.mark.parametrize("kw, message", [
    (dict(parametrization={"kind": "sltrain", "rank": 4, "int8": True}, optim="adamw_torch",
          optim_args=None),
     "INT8 tensors are stepped by gradproj's optimizer only"),
    (dict(optim_args="parametrization=lora,parametrization.rnak=4"),
     "parametrization.rnak: unknown option of 'lora'; did you mean 'rank'"),
    (dict(optim_args="parametrization=lorra"), "'lorra' is not a parametrization"),
    (dict(optim_args="parametrization.rank=4"), "needs parametrization=KIND"),
    (dict(optim_args="parametrization=lora,parametrization.rank=x"), "is not an integer"),
    (dict(parametrization={"kind": "lora", "rank": 0}), "option 'rank' must be an integer >= 1"),
    (dict(parametrization="lora", optim_args="parametrization=sltrain"), "keep one"),
])
def test_bad_parametrizations_are_one_line(tmp_path, kw, message):
    with pytest.raises(OptionError, match=message) as info:
        trainer_for(tmp_path, **kw)
    assert len(str(info.value).splitlines()) == 1
