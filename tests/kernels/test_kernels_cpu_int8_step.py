"""CPU lane: the INT8 weight step in one C pass (`gp_int8_step_rows`, cpu_counter_rng.c)
gives the codes and scales of the chain it replaces — dequantize, ATen's W.add_(U, alpha=−lr)
(and the decay), stochastic rounding — spelled out here from the per-tensor references."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp
from gradproj.kernels import cpu_adam, cpu_counter_rng, int8_sr
from gradproj.quant.linear import QuantLinear


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")
    if cpu_counter_rng.library() is None:
        pytest.skip("no C compiler: the INT8 step keeps its chain")
    if not cpu_counter_rng.aten_add_fuses():
        pytest.skip("this torch build's CPU add_ does not fuse its multiply-add: the C step declines")


def _chain(codes, scale, update, lr, weight_decay, seed, group_size):
    """One weight's step from the references: W = code·scale, W += −lr·U, W += −lr·wd·W, SR."""
    w = int8_sr.int8_dequantize_ref(codes, scale, group_size)
    w.add_(update.reshape(w.shape), alpha=-lr)
    if weight_decay:
        w.add_(w, alpha=-lr * weight_decay)
    return int8_sr.int8_sr_quantize_ref(w, seed, group_size)


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 3), n=st.integers(1, 3000), group_size=st.sampled_from([1, 64, 100, 256, 4096]),
       lr=st.sampled_from([1e-4, 3e-2, 1.0]), weight_decay=st.sampled_from([0.0, 0.1]),
       weight_scale=st.sampled_from([1e-30, 0.02, 100.0]), update_scale=st.sampled_from([0.0, 1e-3, 10.0]),
       zero_rows=st.booleans(), seed=st.integers(0, 2 ** 62))
def test_c_step_equals_the_reference_chain(k, n, group_size, lr, weight_decay, weight_scale,
                                           update_scale, zero_rows, seed):
    gen = torch.Generator().manual_seed(seed % 1000)
    w = torch.randn(k, n, generator=gen) * weight_scale
    if zero_rows:
        w[0] = 0.0  # all-zero groups: scale 1
    pairs = [int8_sr.int8_sr_quantize_ref(row, seed + i, group_size) for i, row in enumerate(w)]
    codes, scales = [c for c, _ in pairs], [s for _, s in pairs]
    update = torch.randn(k, n, generator=gen) * update_scale * weight_scale
    seeds = [seed + 7 * i + 1 for i in range(k)]
    want = [_chain(c, s, u, lr, weight_decay, sd, group_size)
            for c, s, u, sd in zip(codes, scales, update, seeds)]
    got_codes, got_scales = [c.clone() for c in codes], [s.clone() for s in scales]
    assert int8_sr.int8_step_rows(got_codes, got_scales, update, lr, weight_decay, seeds, group_size)
    for i, (c, s) in enumerate(want):
        assert torch.equal(got_scales[i], s), f"weight {i}: scales"
        assert torch.equal(got_codes[i], c), f"weight {i}: codes"


def test_c_step_writes_in_place_and_bumps_the_version():
    codes, scale = int8_sr.int8_sr_quantize_ref(torch.randn(3, 300), 5, 64)
    before, address = codes._version, codes.data_ptr()
    assert int8_sr.int8_step_rows([codes], [scale], torch.randn(1, 900), 0.5, 0.0, [9], 64)
    assert codes.data_ptr() == address and codes._version > before


@pytest.mark.parametrize("why", ["reference mode", "no fused add", "non-contiguous", "fp64 update",
                                 "wrong scale count", "tensor subclass"])
def test_c_step_declines_and_writes_nothing(monkeypatch, why):
    codes, scale = int8_sr.int8_sr_quantize_ref(torch.randn(8, 64), 5, 64)
    update = torch.randn(1, 512)
    if why == "reference mode":
        monkeypatch.setenv("GRADPROJ_KERNELS", "reference")
    elif why == "no fused add":
        monkeypatch.setattr(cpu_counter_rng, "aten_add_fuses", lambda: False)
    elif why == "non-contiguous":
        codes = codes.t()
    elif why == "fp64 update":
        assert not cpu_counter_rng.int8_step_rows([codes], [scale], update.double(), 0.1, 0.0,
                                                  [1], [2], 64)
        return
    elif why == "wrong scale count":
        scale = scale[:-1]
    else:  # a DTensor shard's numel and data_ptr are not one local block's
        codes = codes.as_subclass(_Subclass)
    kept = codes.clone()
    assert not int8_sr.int8_step_rows([codes], [scale], update, 0.1, 0.0, [3], 64)
    assert torch.equal(codes, kept)


class _Subclass(torch.Tensor):
    pass


def _int8_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 172, bias=False), torch.nn.Linear(64, 172, bias=False),
                                torch.nn.Linear(172, 64, bias=False))
    return torch.nn.ModuleDict({f"mlp{i}": QuantLinear.from_linear(m) for i, m in enumerate(model)})


def _train(preset, steps=3):
    model = _int8_model()
    opt = gp.build_optimizer(model, preset, lr=1e-2, rank=8, update_gap=2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        opt.step()
    return [t.clone() for m in model.values() for t in (m.weight, m.weight_scale)]


@pytest.mark.parametrize("preset", ["q-galore", "lamb", "adamp"])
def test_int8_weights_step_with_the_chain_bits(monkeypatch, preset):
    """q-galore takes the C pass; LAMB and AdamP finish the update on the dequantized
    weights (trust ratio, projection), so theirs keep the chain."""
    # these moments (8×64) are below q8's 4096 values, so fp32: their C Adam pass rounds
    # op by op where the reference chain fuses (ulps, test_kernels_cpu_adam_dense.py) —
    # pinned to the chain here, so the weights' codes differ only if the INT8 step does
    monkeypatch.setattr(cpu_adam, "adam_dense_step", lambda *args, **kwargs: None)
    calls = []
    real = cpu_counter_rng.int8_step_rows
    monkeypatch.setattr(cpu_counter_rng, "int8_step_rows", lambda *a: calls.append(1) or real(*a))
    fast = _train(preset)
    assert bool(calls) == (preset == "q-galore")
    monkeypatch.setenv("GRADPROJ_KERNELS", "reference")
    for a, b in zip(fast, _train(preset)):
        assert torch.equal(a, b)
