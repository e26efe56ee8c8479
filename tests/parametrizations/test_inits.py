"""The initialisations and the scale α/r of the B·A parametrizations, against the papers'
formulas written out here: A ~ U(±1/√in) (peft's kaiming_uniform_(a=√5); SLTrain's sparse
values too), a different A for every layer (seeded by (seed, layer index)), and LoRA's
output x·W₀ᵀ + (α/r)·(x·Aᵀ)·Bᵀ + b with B ≠ 0. The layers are 16 in × 64 out, so the
bound 1/√in = 0.25 is twice the 1/√out a swapped fan would give; with 4·16 = 64 draws per
A the largest |A| exceeds 0.9·bound except with probability 0.95⁶⁴ ≈ 4 % — the seeds
are fixed, so the tests are deterministic."""
from __future__ import annotations

import math

import pytest
import torch

from gradproj.parametrizations import apply_parametrization

IN, OUT, RANK = 16, 64, 4
KINDS = {"lora": ("lora_A",), "sltrain": ("lora_A", "sparse_values"), "gradnormlorp": ("A",)}


def two_layers(kind: str, **options):
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(IN, OUT), "b": torch.nn.Linear(IN, OUT)})
    table = {"kind": kind, "rank": RANK, **options}
    return apply_parametrization(model, table, ["a", "b"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_factors_are_uniform_in_one_over_root_fan_in_and_differ_per_layer(kind):
    layers = two_layers(kind, **({"density": 0.2} if kind == "sltrain" else {}))
    bound = 1 / math.sqrt(IN)
    for name in KINDS[kind]:
        a, b = (getattr(layers[key], name).detach() for key in ("a", "b"))
        for t in (a, b):
            assert float(t.abs().max()) <= bound and float(t.abs().max()) > 0.9 * bound, name
            # U(±c) has E[x²] = c²/3; over ≥ 64 draws the mean is within 40 % (sd ~ 11 %)
            assert abs(float(t.pow(2).mean()) / (bound ** 2 / 3) - 1) < 0.4, name
        assert not torch.equal(a, b), f"{kind}: both layers drew the same {name}"


def test_lora_output_is_w0_plus_alpha_over_r_times_b_a():
    layer = two_layers("lora", alpha=8.0)["a"]
    with torch.no_grad():
        layer.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(2))
    w0, a, b = layer.weight, layer.lora_A, layer.lora_B
    expect = x @ w0.T + (8.0 / RANK) * (x @ a.T) @ b.T + layer.bias
    torch.testing.assert_close(layer(x), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.merged()(x), expect, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_rest", [False, True])
def test_lora_trains_only_the_factors_unless_train_rest(train_rest):
    """peft's default: only A and B train; W₀ and every tensor outside the targeted layers
    are frozen. `train_rest = true` leaves the rest (not W₀) trainable."""
    torch.manual_seed(0)
    # (no bias in the layer: whether train_rest should also train it, the module doc leaves open)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(IN, OUT, bias=False), "norm": torch.nn.LayerNorm(OUT)})
    apply_parametrization(model, {"kind": "lora", "rank": RANK, "train_rest": train_rest}, ["a"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    rest = {"norm.weight", "norm.bias"} if train_rest else set()
    assert trained == {"a.lora_A", "a.lora_B"} | rest


def test_sltrain_b_is_zero_with_a_sparse_part_and_kaiming_without_one():
    """SLTrain's B starts at 0 (the authors' SpLoRaLinear); at density 0 (pure B·A) it is
    U(±1/√r) as ReLoRA's lora_only, or W = 0 and its gradients, which pass through
    other zero weights, stay 0: the bias-free two-layer B·A net below, with B = 0, gets a
    zero gradient on all four factors (checked by hand); with the Kaiming B none is zero."""
    with_s, pure = two_layers("sltrain", density=0.2)["a"], two_layers("sltrain", density=0.0)["a"]
    assert not with_s.lora_B.any()
    bound = 1 / math.sqrt(RANK)
    b = pure.lora_B.detach()
    assert float(b.abs().max()) <= bound and float(b.abs().max()) > 0.9 * bound
    assert abs(float(b.pow(2).mean()) / (bound ** 2 / 3) - 1) < 0.4
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(IN, IN, bias=False), torch.nn.Linear(IN, IN, bias=False))
    apply_parametrization(net, {"kind": "sltrain", "rank": RANK, "density": 0.0}, ["0", "1"])
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(3))
    net(x).square().sum().backward()
    assert all(float(p.grad.abs().max()) > 0 for n, p in net.named_parameters() if "lora" in n)
