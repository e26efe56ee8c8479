"""SLTrain with INT8 weights (`int8 = true`): B, A and S's values as group-wise INT8 codes,
stepped by the optimizer with stochastic rounding; the spec, the trainer and a resume."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import gradproj as gp
from gradproj.parametrizations.sltrain import SLTrainLinear
from gradproj.parametrizations.sltrain_int8 import SLTrainInt8Linear
from gradproj.quant.linear import is_quantized
from gradproj.train.metrics import read_metrics
from gradproj.train.spec import SpecError, load_spec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from trainhelpers import MICRO_SPEC  # noqa: E402

CODES = ("lora_B", "lora_A", "sparse_values")


def layers(group_size=64, **options):
    """(float SLTrain layer, its INT8 conversion), from the same Linear and seed."""
    out = []
    for int8 in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(40, 48))
        table = {"kind": "sltrain", "rank": 4, "density": 0.1, "int8": int8,
                 "group_size": group_size, **options}
        gp.apply_parametrization(model, table, ["0"])
        out.append(model[0])
    return out


def test_conversion_rounds_the_float_layer_to_nearest_int8():
    flt, q = layers()
    assert isinstance(flt, SLTrainLinear) and isinstance(q, SLTrainInt8Linear)
    assert torch.equal(q.support(), flt.support())  # the same seed, the same support
    for name in CODES:
        codes, ref = getattr(q, name), getattr(flt, name).detach()
        assert codes.dtype == torch.int8 and is_quantized(codes) and not codes.requires_grad
        groups = F.pad(ref.reshape(-1), (0, (-ref.numel()) % 64)).view(-1, 64)
        absmax = groups.abs().amax(1)
        scale = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        assert torch.equal(getattr(q, f"{name}_scale"), scale)
        want = torch.round(groups / scale[:, None]).reshape(-1)[:ref.numel()].view(ref.shape)
        assert torch.equal(codes.float(), want), name
    assert not q.lora_B.any()  # B = 0 stays exactly 0: BA = 0 at init
    assert set(q.state_dict()) == {*CODES, *(f"{n}_scale" for n in CODES), "bias", "sparse_seed"}


def test_forward_keeps_only_the_input_and_the_scales_for_backward():
    _, q = layers()
    saved = []
    x = torch.randn(3, 40, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t,
                                                  lambda t: t):
        y = q(x)
    groups = [getattr(q, f"{n}_scale").numel() for n in CODES]
    assert sorted(saved) == sorted([(3, 40), *((g,) for g in groups)]), saved
    y.square().sum().backward()
    assert all(getattr(q, n).grad.dtype == torch.float32 for n in CODES)


def test_a_step_moves_each_tensor_to_a_stochastic_rounding_of_the_float_step():
    """The same AdamW step on the float twin (fp32, no rounding) and on the INT8 layer:
    every dequantized value lands within one new quantization step of the twin's, the
    rounding errors average out (unbiased), and some round away from nearest."""
    _, q = layers()
    twin = q.float_twin()
    x, target = torch.randn(16, 40), torch.randn(16, 48)
    with torch.no_grad():  # a non-zero B, so A's gradient is not 0
        twin.lora_B.normal_(0, 0.1)
        codes, scale = gp.quant.int8_quantize(twin.lora_B, 64)
        q.lora_B.copy_(codes)
        q.lora_B_scale.copy_(scale)
        twin.lora_B.copy_(gp.quant.int8_dequantize(codes, scale, 64))
    for model in (q, twin):
        opt = gp.build_optimizer(torch.nn.Sequential(model), targets=("none",), lr=1e-2)
        F.mse_loss(model(x), target).backward()
        opt.step()
    b, a, v = q.dequantized()
    for name, got in zip(CODES, (b, a, v)):
        want = getattr(twin, name).detach()
        step = getattr(q, f"{name}_scale")
        per = step.repeat_interleave(64)[:want.numel()].view(want.shape)
        err = got - want
        assert (err.abs() <= per * (1 + 1e-5)).all(), name
        assert abs(float((err / per).mean())) < 5 * 0.5 / math.sqrt(err.numel()), name  # sd <= 1/2
        nearest = torch.round(want / per) * per
        assert not torch.equal(got, nearest), f"{name}: no stochastic rounding"


def spec_text(tmp_path, parametrization, optimizer="", steps=8, extra=""):
    text = MICRO_SPEC.replace("[data]", f"[model.parametrization]\n{parametrization}\n\n[data]")
    text = text.replace('rule = "adamw"', f'rule = "adamw"\n{optimizer}')
    text = text.replace("steps = 8", f"steps = {steps}{extra}")
    path = tmp_path / "spec.toml"
    path.write_text(text.replace("{run_dir}", str(tmp_path / "run")))
    return path


def test_spec_accepts_int8_and_the_q_galore_combination_and_refuses_bad_values(tmp_path):
    spec = load_spec(spec_text(tmp_path, 'kind = "sltrain"\nrank = 4\nint8 = true'))
    assert spec.optimizer.parametrization["int8"] is True
    spec = load_spec(spec_text(tmp_path, 'kind = "sltrain"\nrank = 4',
                               'preset = "q-galore"\nweight_group_size = 128'))
    from gradproj.train.model import build_model
    model = build_model(spec.model)
    spec.optimizer.build(model)
    layers_ = [m for m in model.modules() if isinstance(m, SLTrainInt8Linear)]
    assert layers_ and all(m.group_size == 128 for m in layers_)
    for bad, message in (('int8 = "yes"', r"\[model.parametrization\].int8: expected true or false"),
                         ("int8 = true\ngroup_size = 0",
                          r"\[model.parametrization\].group_size: expected an integer >= 1")):
        with pytest.raises(SpecError, match=message) as info:
            load_spec(spec_text(tmp_path, f'kind = "sltrain"\nrank = 4\n{bad}'))
        assert len(str(info.value).splitlines()) == 1


def test_trains_per_layer_with_q8_states_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """Per-layer updates + q8 states + INT8 B, A, S: the loss falls, the codes move, and a
    run stopped after step 3's checkpoint resumes to the uninterrupted run's losses."""
    from gradproj.train.loop import Trainer
    param = 'kind = "sltrain"\nrank = 4\nint8 = true'
    options = dict(optimizer='state_format = "q8"', steps=9, extra="\nper_layer = true\ngrad_clip = 0.0")
    full = tmp_path / "full"
    full.mkdir()
    trainer = Trainer(load_spec(spec_text(full, param, **options)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.run()
    moved = {n.rsplit(".", 1)[1] for n, p in trainer.model.named_parameters()
             if p.dtype == torch.int8 and not torch.equal(p, before[n])}
    assert moved == set(CODES)
    want = {r["step"]: r["loss/train"] for r in read_metrics(full / "run") if "loss/train" in r}
    assert sum(list(want.values())[-3:]) < sum(list(want.values())[:3])

    part = tmp_path / "part"
    part.mkdir()
    path = spec_text(part, param, **options)
    original = Trainer.train_step

    def stop_after_3(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return original(self)
    monkeypatch.setattr(Trainer, "train_step", stop_after_3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(load_spec(path)).run()
    monkeypatch.setattr(Trainer, "train_step", original)
    Trainer(load_spec(path), resume=True).run()
    got = {r["step"]: r["loss/train"] for r in read_metrics(part / "run") if "loss/train" in r}
    assert got == want
