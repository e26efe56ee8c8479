"""QuantLinear: INT8 group-wise weights trained with stochastic rounding (Q-GaLore)."""
import io

import pytest
import torch

import gradproj as gp
from gradproj.quant import QuantLinear, int8_dequantize, int8_nbytes, int8_quantize

EPS = torch.finfo(torch.float32).eps


def step_of(codes_scale_group):
    _, scale, group = codes_scale_group
    return scale.repeat_interleave(group)


def test_round_to_nearest_within_half_a_step_and_sr_within_one():
    x = torch.randn(37, 300)  # 11100 values: the last group is partial
    steps = None
    for seed in (None, 5):
        codes, scale = int8_quantize(x, 256, seed)
        steps = scale.repeat_interleave(256)[: x.numel()].view_as(x)
        err = (int8_dequantize(codes, scale, 256) - x).abs()
        bound = steps / 2 if seed is None else steps
        assert (err <= bound * (1 + 4 * EPS)).all()
    assert codes.dtype == torch.int8 and scale.numel() == -(-x.numel() // 256)
    assert int8_nbytes(x.numel()) == x.numel() + 4 * scale.numel()


@pytest.mark.parametrize("seed", [None, 3])
def test_all_zero_group_has_scale_one_and_zero_codes(seed):
    """A group of zeros stores scale 1 (not 0: x/0 would be NaN) and codes 0, both roundings."""
    x = torch.cat([torch.zeros(256), torch.linspace(-1, 1, 256)])
    codes, scale = int8_quantize(x, 256, seed)
    assert scale[0].item() == 1.0 and torch.all(codes[:256] == 0)
    assert scale[1].item() == pytest.approx(1 / 127)
    assert torch.equal(int8_dequantize(codes, scale, 256)[:256], torch.zeros(256))


def test_stochastic_rounding_is_unbiased():
    # a value 0.3 of a step above a code: SR goes up 30 % of the time, mean error → 0
    scale = 0.01
    x = torch.full((256,), 127 * scale)
    x[1:] = (5 + 0.3) * scale  # element 0 pins absmax, so scale = 0.01 exactly
    draws = torch.stack([int8_dequantize(*int8_quantize(x, 256, seed), 256) for seed in range(200)])
    mean_err = (draws[:, 1:].mean(0) - x[1:]).mean().item()
    # 200 draws × 255 elements of a Bernoulli(0.3)·step: std of the mean ≈ step·0.46/226
    assert abs(mean_err) < 4 * scale * 0.46 / 226
    assert ((draws[:, 1:] - x[1:]).abs() <= scale * (1 + 1e-5)).all()


def test_stochastic_rounding_draws_fresh_noise_at_every_step():
    """Through the optimizer: every weight sits exactly half a step from two codes at every
    step (grid weights, update lr·g = step/2, element 0 of each group pins absmax so the
    step stays 2⁻⁷), so each rounds up or down with probability 1/2. Fresh noise per step
    (rounding_seed(seed, step)) makes consecutive steps' up/down patterns agree on half the
    elements; a seed that ignored the step would repeat the pattern (agreement 1).
    1020 elements × 11 step pairs: the agreement's std is 0.5/√11220 = 0.0047; 5σ bound."""
    from gradproj.seeds import rounding_seed as sr_seed

    layer = QuantLinear(256, 4, bias=False)
    step = 2.0 ** -7
    w = torch.zeros(4, 256)
    w[:, 0] = 127 * step  # absmax → scale = absmax / 127 = 2⁻⁷ exactly
    layer.set_weight(w)
    assert torch.all(layer.weight_scale == step)
    opt = gp.LowRankOptimizer([layer.weight], lr=1.0, rule="sgdm", momentum=0.0)
    grad = torch.full((4, 256), step / 2)
    grad[:, 0] = 0.0
    moved, codes = [], layer.weight.detach().clone()
    for _ in range(12):
        layer.weight.grad = grad.clone()
        opt.step()
        assert torch.all(layer.weight_scale == step)
        new = layer.weight.detach().clone()
        delta = (codes.int() - new.int())[:, 1:]  # 0 (rounded up) or 1 (rounded down)
        assert set(delta.unique().tolist()) <= {0, 1}
        moved.append(delta.reshape(-1).bool())
        codes = new
    agree = torch.stack([(a == b).float().mean() for a, b in zip(moved, moved[1:])]).mean().item()
    assert abs(agree - 0.5) <= 5 * 0.5 / (1020 * 11) ** 0.5, agree
    rate = torch.stack(moved).float().mean().item()  # unbiased: half of them move each step
    assert abs(rate - 0.5) <= 5 * 0.5 / (1020 * 12) ** 0.5, rate
    seeds = [sr_seed(opt.state[layer.weight]["seed"], t) for t in range(1, 13)]
    assert len(set(seeds)) == 12


def test_rounding_noise_of_consecutive_seeds_is_uncorrelated():
    """The u ∈ [0, 1) behind SR for two consecutive steps' seeds: uniform (mean 1/2,
    variance 1/12) and uncorrelated, 5σ bounds over 65536 elements."""
    from gradproj.kernels.int8_sr import sr_uniform_ref
    from gradproj.seeds import rounding_seed as sr_seed

    n = 65536
    a, b = (sr_uniform_ref(n, sr_seed(3, t)).double() for t in (41, 42))
    for u in (a, b):
        assert abs(u.mean().item() - 0.5) <= 5 * (1 / 12 / n) ** 0.5
        assert abs(u.var().item() - 1 / 12) <= 5 * (1 / 180 / n) ** 0.5  # (μ4 − σ⁴)/n = (1/80 − 1/144)/n
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) <= 5 / n ** 0.5


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"attn": torch.nn.Linear(48, 32), "mlp": torch.nn.Linear(32, 40, bias=False),
                                "head": torch.nn.Linear(40, 4)}).to(dtype)


def forward(model, x):
    return model["head"](torch.relu(model["mlp"](torch.relu(model["attn"](x)))))


def test_quantize_weights_converts_only_targets_and_grads_match_float():
    model = make_model()
    reference = make_model()
    gp.quantize_weights(model, targets=("attn", "mlp"))
    assert isinstance(model["attn"], QuantLinear) and isinstance(model["mlp"], QuantLinear)
    assert type(model["head"]) is torch.nn.Linear
    for name in ("attn", "mlp"):  # the float twin uses exactly the dequantized weights
        reference[name].weight.data.copy_(model[name].dequantized_weight())
    x = torch.randn(6, 48)  # no grad on the input: the first layer's weight still gets one
    for _ in range(2):      # two backward passes accumulate, as for float weights
        forward(model, x).square().mean().backward()
        forward(reference, x).square().mean().backward()
    torch.testing.assert_close(forward(model, x), forward(reference, x), rtol=16 * EPS, atol=16 * EPS)
    for name in ("attn", "mlp"):
        got, want = model[name].weight.grad, reference[name].weight.grad
        assert got.dtype == torch.float32 and model[name].weight.dtype == torch.int8
        torch.testing.assert_close(got, want, rtol=64 * EPS, atol=64 * EPS)
    groups = gp.param_groups(model)
    assert any(p is model["attn"].weight for p in groups[0]["params"])


def test_optimizer_update_on_int8_weights_tracks_the_float_update():
    model = gp.quantize_weights(make_model())
    w0 = model["attn"].dequantized_weight().clone()
    opt = gp.LowRankOptimizer(gp.param_groups(model, rank=4), lr=1e-2, weight_decay=0.1)
    forward(model, torch.randn(8, 48)).square().mean().backward()
    grad = model["attn"].weight.grad.clone()
    opt.step()
    # replay the float update of the same step and compare within one quantization step
    float_w = torch.nn.Parameter(w0.clone())
    ref_opt = gp.LowRankOptimizer([{"params": [float_w], "rank": 4}], lr=1e-2, weight_decay=0.1)
    float_w.grad = grad
    ref_opt.step()
    step = model["attn"].weight_scale.repeat_interleave(256)[: w0.numel()].view_as(w0)
    assert ((model["attn"].dequantized_weight() - float_w.detach()).abs() <= step * (1 + 1e-5)).all()
    assert all(torch.is_tensor(v) or isinstance(v, (int, float)) for v in opt.state[model["attn"].weight].values())


def test_tiny_updates_move_int8_weights_on_average():
    # lr·|U| = 1e-4 of a step: round-to-nearest would never move; SR moves the mean
    layer = QuantLinear(256, 4, bias=False)
    layer.set_weight(torch.linspace(-1, 1, 1024).view(4, 256))
    start = layer.dequantized_weight().clone()
    opt = gp.LowRankOptimizer([layer.weight], lr=1.0, rule="sgdm", momentum=0.0)
    step = layer.weight_scale[0].item()
    for _ in range(200):
        layer.weight.grad = torch.full((4, 256), -1e-2 * step)
        opt.step()
    drift = (layer.dequantized_weight() - start).mean().item()
    assert drift == pytest.approx(200 * 1e-2 * step, rel=0.25)


def test_q_galore_preset_trains_and_resumes_bit_exactly():
    data = [torch.randn(8, 48, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    overrides = dict(rank=4, update_gap=2, lr=1e-2, state_format="fp32")

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            forward(model, x).square().mean().backward()
            opt.step()

    model = make_model()
    opt = gp.build_optimizer(model, preset="q-galore", **overrides)
    assert isinstance(model["attn"], QuantLinear)
    train(model, opt, data)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model = make_model()
    opt = gp.build_optimizer(model, preset="q-galore", **overrides)
    train(model, opt, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=7)
    opt2 = gp.build_optimizer(resumed, preset="q-galore", **overrides)
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, data[3:])
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, expected[key]), key
    state = opt2.state[resumed["attn"].weight]
    assert state["update_gap"] >= 2 and ("proj_left.codes" in state or "proj_right.codes" in state)


def test_quant_linear_bias_gradient_is_the_sum_over_positions():
    """out = x·Wᵀ + b over a 2×3 batch of positions: ∂(Σ c∘out)/∂b = Σ over positions of c
    (catches a mean over positions instead of the sum)."""
    layer = QuantLinear(8, 5, bias=True)
    layer.set_weight(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, generator=gen)
    c = torch.randn(2, 3, 5, generator=gen)
    (layer(x) * c).sum().backward()
    torch.testing.assert_close(layer.bias.grad, c.sum(dim=(0, 1)), rtol=1e-6, atol=1e-6)


def test_quant_linear_keeps_a_scale_for_the_partial_last_group():
    """10·30 = 300 weights in groups of 256: two groups, the second holding 44 weights
    (catches a floor division that drops the partial group)."""
    layer = QuantLinear(10, 30, bias=False)
    assert layer.weight_scale.shape == (2,)
    w = torch.randn(30, 10, generator=torch.Generator().manual_seed(2))
    layer.set_weight(w)
    step = layer.weight_scale.repeat_interleave(256)[:300].view(30, 10)
    assert ((layer.dequantized_weight() - w).abs() <= step / 2 * (1 + 1e-5)).all()
    tail = w.reshape(-1)[256:]
    assert layer.weight_scale[1].item() == pytest.approx(tail.abs().max().item() / 127, rel=1e-6)


def test_int8_weight_bytes_is_codes_plus_fp32_scales():
    """A 300×10 QuantLinear: 3000 one-byte codes + ceil(3000/256) = 12 fp32 scales = 3048
    bytes; an nn.Linear beside it counts nothing."""
    from gradproj.quant.linear import int8_weight_bytes

    model = torch.nn.Sequential(QuantLinear(10, 300, bias=True), torch.nn.Linear(300, 4))
    assert int8_weight_bytes(model) == 3000 + 4 * 12
