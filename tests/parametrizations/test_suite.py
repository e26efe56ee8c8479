"""The registry-driven suite: every registered parametrization, the same checks.

A kind registered later (a plugin, or a new built-in) must add its small options to
`SUITE_OPTIONS`; the first test fails until it does, so no kind goes untested.
Layers: `attn` 32×24 with a bias and `mlp` 40×32 without (both targeted), `head` 8×40
(not targeted). Before each check every tensor of each parametrized layer is randomised
(LoRA's B = 0 at init would make "forward equals the dense weight" vacuous).
"""
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import gradproj as gp
from gradproj.parametrizations import (ParametrizedLinear, apply_parametrization,
                                       initialize_parametrization, linear_module_names,
                                       merge_parametrizations, parametrized_modules)
from gradproj.quant.linear import is_quantized

SUITE_OPTIONS = {
    "int8": {"group_size": 100},                         # 768 / 100: a partial last group
    "lora": {"rank": 4, "alpha": 8.0, "project_factors": True},
    "lora-ga": {"rank": 4, "alpha": 8.0, "batches": 2, "project_factors": True},
    "sltrain": {"rank": 4, "alpha": 8.0, "density": 0.1, "project_factors": True},
    # B, A and S's values INT8 (group 64: partial last groups in A 4×24, B and S)
    "sltrain+int8": {"kind": "sltrain", "rank": 4, "alpha": 8.0, "density": 0.1,
                     "project_factors": True, "int8": True, "group_size": 64},
    "gradnormlorp": {"rank": 4, "alpha": 8.0},
    # WeLore's layer shapes follow the weights it compresses, so the suite fine-tunes from a
    # `gradproj compress`-style file (filled in by `welore_checkpoint` below): the structure
    # and every tensor come from it, as `[model.parametrization] compressed = PATH` does
    "welore": {"ratio": 0.5, "project_factors": True, "compressed": None},
}
KINDS = gp.PARAMETRIZATIONS.names()
CASES = [*KINDS, *(c for c in SUITE_OPTIONS if c not in KINDS)]  # kinds, then variants
TARGETS = ("attn", "mlp")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict({"attn": torch.nn.Linear(24, 32), "mlp": torch.nn.Linear(32, 40, bias=False),
                                "head": torch.nn.Linear(40, 8)})


@pytest.fixture(scope="module", autouse=True)
def welore_checkpoint(tmp_path_factory):
    from safetensors.torch import save_file
    from gradproj.parametrizations.welore import WeLore, compressed_metadata
    model, param = make_model(0), WeLore(ratio=0.5)
    apply_parametrization(model, param, linear_module_names(model, TARGETS))
    path = tmp_path_factory.mktemp("welore") / "compressed.safetensors"
    save_file(dict(model.state_dict()), str(path), metadata=compressed_metadata(param))
    SUITE_OPTIONS["welore"]["compressed"] = str(path)


def forward(model, x):
    return model["head"](torch.tanh(model["mlp"](torch.tanh(model["attn"](x)))))


def batch(i):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(6, 24, generator=gen), torch.randn(6, 8, generator=gen)


def loss_of(model):
    return lambda i: F.mse_loss(forward(model, batch(i)[0]), batch(i)[1])


def parametrized(kind, seed=0):
    model = make_model(seed)
    table = {"kind": kind, **SUITE_OPTIONS[kind]}  # a variant names its kind itself
    apply_parametrization(model, table, linear_module_names(model, TARGETS))
    initialize_parametrization(model, table, loss_of(model))
    return model, table


@torch.no_grad()
def randomise(module: ParametrizedLinear, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if t.dtype == torch.int8:
            t.copy_(torch.randint(-127, 128, t.shape, generator=gen, dtype=torch.int8))
        elif t.dtype.is_floating_point:
            t.copy_(torch.randn(t.shape, generator=gen) * 0.3)


def test_every_registered_kind_is_in_the_suite():
    assert set(KINDS) <= set(SUITE_OPTIONS), f"add options for {set(KINDS) - set(SUITE_OPTIONS)}"


@pytest.mark.parametrize("kind", CASES)
def test_forward_equals_the_dense_weight_and_gradients_match_autograd(kind):
    model, _ = parametrized(kind)
    for name, module in parametrized_modules(model).items():
        randomise(module)
        x = torch.randn(2, 3, module.in_features, requires_grad=True)
        target = torch.randn(2, 3, module.out_features)
        y = module(x)
        (y - target).square().sum().backward()
        got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        got_x = x.grad.clone()
        module.zero_grad(set_to_none=True)
        x.grad = None

        quantized = {n for n, p in module.named_parameters() if is_quantized(p)}
        # INT8 codes: the reference is the float layer of the dequantized tensors (same
        # names), whose own forward is held to its dense weight in its kind's case
        ref = module.float_twin() if quantized else module
        dense = ref.dense_weight() if isinstance(ref, ParametrizedLinear) else ref.weight
        y_ref = F.linear(x, dense, ref.bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module(x), ref(x), rtol=1e-5, atol=1e-5)
        (y_ref - target).square().sum().backward()
        torch.testing.assert_close(got_x, x.grad, rtol=1e-5, atol=1e-5)
        trained = {n for n, p in module.named_parameters() if p.requires_grad} | quantized
        assert set(got) == trained, (name, set(got), trained)
        for n, p in ref.named_parameters():
            if n in trained:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-5, msg=f"{kind} {name}.{n}")


@pytest.mark.parametrize("kind", CASES)
def test_merge_exports_plain_linear_layers_computing_the_same(kind, tmp_path):
    model, _ = parametrized(kind)
    for module in parametrized_modules(model).values():
        randomise(module)
    x = batch(0)[0]
    before = forward(model, x).detach()
    merge_parametrizations(model)
    assert not parametrized_modules(model)
    assert all(type(model[k]) is torch.nn.Linear for k in ("attn", "mlp"))
    torch.testing.assert_close(forward(model, x), before, rtol=1e-5, atol=1e-6)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    plain = make_model(1)
    plain.load_state_dict(torch.load(tmp_path / "plain.pt", weights_only=True))
    torch.testing.assert_close(forward(plain, x), before, rtol=1e-5, atol=1e-6)


def build(model, table, **options):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rank .* full rank")
        return gp.build_optimizer(model, targets=TARGETS, parametrization=table, rank=2,
                                  update_gap=2, lr=1e-2, **options)


def train(model, opt, steps):
    for s in steps:
        opt.zero_grad(set_to_none=True)
        loss_of(model)(s).backward()
        opt.step()


@pytest.mark.parametrize("kind", CASES)
def test_checkpoint_loads_weights_only_and_resumes_bit_exactly(kind):
    model, table = parametrized(kind)
    opt = build(model, table)
    train(model, opt, range(5))
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    model, table = parametrized(kind)
    opt = build(model, table)
    train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make_model(seed=5)  # a different init: everything must come from the checkpoint
    apply_parametrization(resumed, table, linear_module_names(resumed, TARGETS))
    resumed.load_state_dict(saved["model"])
    opt2 = build(resumed, table)
    opt2.load_state_dict(saved["optim"])
    train(resumed, opt2, range(3, 5))
    got = resumed.state_dict()
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert torch.equal(got[k], v), f"{kind}: {k} differs after resume"


@pytest.mark.parametrize("fmt", gp.STATE_FORMATS.names())
@pytest.mark.parametrize("projector", gp.PROJECTORS.names())
@pytest.mark.parametrize("kind", CASES)
def test_combines_with_every_projector_and_state_format(kind, projector, fmt):
    model, table = parametrized(kind)
    opt = build(model, table, projector=projector, state_format=fmt)
    low = [p for g in opt.param_groups if g["lowrank"] for p in g["params"]]
    assert low, f"{kind}: nothing projected"
    projected = {id(getattr(m, n)) for m in parametrized_modules(model).values() for n in m.projected}
    assert {id(p) for p in low} == projected
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    train(model, opt, range(3))
    for g in opt.param_groups:
        for p in g["params"]:
            assert torch.isfinite(p.float()).all()
            assert not torch.equal(p.detach(), before[id(p)]), f"{kind}: a trained tensor did not move"
    for p in low:
        state = opt.state[p]
        if fmt in ("q8", "q4"):
            assert any(k.endswith(".codes") for k in state), sorted(state)
