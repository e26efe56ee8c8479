"""The planner's weights, gradients and optimizer states equal what a real step allocates."""
from __future__ import annotations

import pytest
import torch

import gradproj as gp
from gradproj.memory import gradient_bytes, optimizer_bytes, split_codes_and_scales, weight_bytes
from gradproj.optimizers import matrix_shape, optimizer_state_nbytes
from gradproj.projectors.base import low_rank_shape
from gradproj.train.model import build_model, model_config
from gradproj.train.perlayer import PerLayerStepper

# tiny shape: dim 128, ffn 344, 2 layers; rank 32 gives 128x32 = 4096-element moments, the
# smallest size q8/q4 quantize, so both the quantized and the fp32 fallback paths occur
CFG = model_config("tiny", n_layers=2)
SETUPS = {
    "galore-fp32": dict(preset="galore", rank=32),
    "galore-bf16-weights": dict(preset="galore", rank=32, state_format="bf16"),
    "q8-int4-auto-fira": dict(preset="fira", rank=32, state_format="q8", proj_type="auto",
                              projector="int4", projector_options={"inner": "randomized"}),
    "q4-gaussian-auto": dict(preset="apollo", rank=32, state_format="q4", proj_type="auto"),
    "q-galore-int8-weights": dict(preset="q-galore", rank=32,
                                  projector_options={"inner": "randomized", "group_size": 256}),
    # three moments (G_prev too), quantized, the side chosen by their bytes
    "diffgrad-q8-auto": dict(preset="diffgrad", rank=32, state_format="q8", proj_type="auto"),
    # ZO-SGD (sgdm, momentum 0) keeps no rule state: the bases alone; with momentum, a buffer
    "mezo-q8": dict(preset="mezo", rank=32, state_format="q8"),
    "mezo-momentum-q8": dict(preset="mezo", rank=32, state_format="q8", momentum=0.9),
    # Adafactor's first moment (beta1 > 0) is made at its first update: counted all the same
    "adafactor-momentum-q8": dict(preset="galore", rule="adafactor", beta1=0.9, rank=32,
                                  state_format="q8"),
}
DTYPES = {"galore-bf16-weights": torch.bfloat16, "q-galore-int8-weights": torch.bfloat16}


def _planned(name: str, per_layer: bool = False):
    model = build_model(CFG, device="meta").to(DTYPES.get(name, torch.float32))
    options = dict(SETUPS[name])
    opt = gp.build_optimizer(model, options.pop("preset"), **options)
    names = {p: n for n, p in model.named_parameters()}
    return model, opt, optimizer_bytes(opt, names), gradient_bytes(opt, per_layer=per_layer)


def _real(name: str, per_layer: bool = False):
    model = build_model(CFG, device="cpu").to(DTYPES.get(name, torch.float32))
    options = dict(SETUPS[name])
    opt = gp.build_optimizer(model, options.pop("preset"), **options)
    stepper = PerLayerStepper(opt) if per_layer else None
    tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    model(tokens, tokens).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    if stepper:
        grads = stepper.grad_peak_bytes
    else:
        opt.step()
    return model, opt, grads


@pytest.mark.parametrize("name", SETUPS)
def test_planned_bytes_equal_a_real_step(name):
    meta_model, meta_opt, planned, planned_grads = _planned(name)
    model, opt, grads = _real(name)
    assert weight_bytes(meta_model) == weight_bytes(model)
    assert sum(weight_bytes(model)) == sum(t.numel() * t.element_size()
                                           for t in (*model.parameters(), *model.buffers()))
    assert planned_grads == grads
    assert planned.total == optimizer_state_nbytes(opt)
    bases = codes = scales = 0
    for state in opt.state.values():
        basis = {k: v for k, v in state.items() if k.startswith(("proj_left", "proj_right"))}
        values, basis_scales = split_codes_and_scales(basis)
        bases, scales = bases + values, scales + basis_scales
        codes += split_codes_and_scales(state)[1] - basis_scales
    assert (planned.bases, planned.basis_scales, planned.state_scales) == (bases, scales, codes)
    assert not meta_opt.state  # the planner leaves the optimizer as built


def test_quantized_setups_report_scales():
    _, _, planned, _ = _planned("q8-int4-auto-fira")
    assert planned.state_scales > 0 and planned.basis_scales > 0
    model, _, _, _ = _planned("q-galore-int8-weights")
    values, scales = weight_bytes(model)
    assert scales > 0 and any(p.dtype == torch.int8 for p in model.parameters())
    _, _, planned, _ = _planned("q4-gaussian-auto")
    assert planned.bases == planned.basis_scales == 0  # seed-regenerated basis


@pytest.mark.parametrize("name", ["galore-fp32", "galore-bf16-weights"])
def test_per_layer_gradient_peak_equals_the_stepper(name):
    _, _, _, planned = _planned(name, per_layer=True)
    _, _, measured = _real(name, per_layer=True)
    assert planned == measured


def test_auto_side_report_explains_the_choice():
    model = build_model(model_config("tiny", n_layers=1, dim=256, ffn_dim=1024), device="meta")
    # a seed-regenerated basis costs nothing, so "auto" keeps the moments on the short side
    opt = gp.build_optimizer(model, "galore", rank=64, proj_type="auto", state_format="q8",
                             projector="gaussian")
    rows = {r.name: r for r in optimizer_bytes(opt, {p: n for n, p in model.named_parameters()}).sides}
    up = rows["layers.*.mlp.up_proj.weight"]  # 1024x256: std would project the right side
    assert up.side == min(up.costs, key=up.costs.get) == "left"
    assert up.costs["left"] < up.costs["right"] and "auto: left" in up.reason
    # the optimizer itself picked that side: its moments have the left low-rank shape (64x256)
    p = model.layers[0].mlp.up_proj.weight
    assert opt.side(p, opt.param_groups[0]) == "left"
    q = rows["layers.*.attn.q_proj.weight"]  # square: a tie keeps galore-torch's side
    assert q.costs["left"] == q.costs["right"] and "tie" in q.reason


def test_real_parameters_are_refused():
    model = build_model(CFG, device="cpu")
    with pytest.raises(ValueError, match="meta device"):
        optimizer_bytes(gp.build_optimizer(model, "galore", rank=32))


def test_per_layer_accumulation_peak_is_what_coexists():
    # 3 micro-batches: on the middle one every full-rank .grad is kept, every projected
    # weight has its fp32 sum of R, and one projected .grad is alive: the planned peak
    _, opt, _, _ = _planned("galore-fp32")
    planned = gradient_bytes(opt, per_layer=True, grad_accum=3)
    model = build_model(CFG, device="cpu")
    stepper = PerLayerStepper(gp.build_optimizer(model, "galore", rank=32), grad_accum=3)
    hook, peak = stepper._hook, [0]

    def measuring_hook(p):  # bytes alive the moment p's gradient completes
        fresh = 0 if p in stepper.counted else p.grad.numel() * p.grad.element_size()
        sums = sum(t.numel() * t.element_size() for t in stepper.low_sums.values())
        peak[0] = max(peak[0], stepper.held_bytes + fresh + sums)
        hook(p)

    stepper.remove()
    stepper._handles = [p.register_post_accumulate_grad_hook(measuring_hook)
                        for p in model.parameters()]
    for micro in range(3):
        tokens = torch.randint(0, CFG.vocab_size, (2, 32), generator=torch.Generator().manual_seed(micro))
        stepper.begin_micro_batch(micro)
        (model(tokens, tokens) / 3).backward()
    stepper.end_step()
    assert planned == peak[0]


def test_int8_linear_bias_is_a_weight_not_a_scale():
    """An INT8 Linear with a bias: codes and the fp32 bias are weight bytes, only the
    per-group fp32 scales are quantization scales (Llama has no biases, so the paper
    tables do not see this)."""
    from gradproj.quant import QuantLinear

    layer = QuantLinear.from_linear(torch.nn.Linear(512, 6, bias=True), 256)
    values, scales = weight_bytes(torch.nn.Sequential(layer))
    assert layer.bias is not None and layer.bias.dtype == torch.float32
    assert values == 6 * 512 * 1 + 6 * 4  # int8 codes + fp32 bias
    assert scales == (6 * 512 // 256) * 4  # one fp32 scale per group of 256


def test_zo_sgd_plans_the_bases_alone():
    """MeZO's ZO-SGD: planned state = the projected weights' bases; momentum adds exactly
    one buffer per weight, in the projected shape where projected (sgdm's state_nbytes)."""
    _, opt, plain, _ = _planned("mezo-q8")
    _, _, momentum, _ = _planned("mezo-momentum-q8")
    assert plain.total == plain.bases + plain.basis_scales > 0
    assert plain.bases == momentum.bases and momentum.low_rank_weights == plain.low_rank_weights
    fmt = opt.plugins(opt.param_groups[0])[2]
    buffers = sum(gp.RULES.create("sgdm").state_nbytes(
        low_rank_shape(matrix_shape(p), g["rank"], opt.side(p, g)) if opt.is_low_rank(p, g)
        else tuple(p.shape), fmt) for g in opt.param_groups for p in g["params"])
    assert momentum.total - plain.total == buffers > 0


def test_side_rows_count_every_layer_and_give_the_saving_of_the_other_side():
    """Two layers of 1024×256 up-projections, rank 64, q8 AdamW moments, a seeded basis (0 B):
    side left keeps 2 moments of 64×256 = 16384 codes + 64 absmax (4 B) = 16640 B each,
    side right 2 of 1024×64 = 65536 + 4·256 = 66560 B; "auto" picks left, one row counts
    both layers, and the reason gives the saving over right, 1 − 33280/133120 = 75 %
    (catches a row count that does not add up and a saving taken relative to the cheaper side)."""
    model = build_model(model_config("tiny", n_layers=2, dim=256, ffn_dim=1024), device="meta")
    opt = gp.build_optimizer(model, "galore", rank=64, proj_type="auto", state_format="q8",
                             projector="gaussian")
    rows = {r.name: r for r in optimizer_bytes(opt, {p: n for n, p in model.named_parameters()}).sides}
    up = rows["layers.*.mlp.up_proj.weight"]
    assert (up.count, up.side, up.costs) == (2, "left", {"left": 33280, "right": 133120})
    assert up.reason == "auto: left 33,280 B < right 133,120 B of states + basis (-75%)"
