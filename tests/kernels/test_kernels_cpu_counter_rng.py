"""CPU lane: the C counter streams and INT8 stochastic rounding (`cpu_counter_rng.c`) give
the reference's bits."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradproj.kernels import counter_rng, cpu_counter_rng, int8_sr


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")


def _python_uniform(seed: int, index: int, offset: int = 0) -> float:
    """One value of the stream from the Python-int hash, independent of both tensor paths."""
    k0, k1 = counter_rng.seed_keys(seed % (1 << 63))
    bits = counter_rng.hash32(counter_rng.hash32((index ^ k0) & 0xFFFFFFFF) ^ k1) >> 8
    return (bits + offset) * 2.0 ** -24


def test_library_builds():
    assert cpu_counter_rng.library() is not None, "no C compiler? the CPU fast path is off"


def _tensor_streams(seeds, numel, start, stride, offset):
    """The stream arithmetic on tensors, built here from the reference hash (`uniform_bits`)."""
    k0, k1 = counter_rng.keys(seeds, "cpu")
    index = torch.arange(numel, dtype=torch.int64) * stride + start
    return (counter_rng.uniform_bits(index, k0, k1) + offset).float() * 2.0 ** -24


@settings(max_examples=25, deadline=None)
@given(seeds=st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=3),
       numel=st.integers(0, 3000), start=st.sampled_from([0, 1, 12345]),
       stride=st.sampled_from([1, 2]), offset=st.sampled_from([0, 1]))
def test_c_streams_equal_the_tensor_reference(seeds, numel, start, stride, offset):
    k0, k1 = counter_rng._list_keys(seeds)
    fast = cpu_counter_rng.uniform_rows(k0, k1, numel, start, stride, offset)
    ref = _tensor_streams(seeds, numel, start, stride, offset)
    assert fast.dtype == ref.dtype == torch.float32 and fast.shape == ref.shape == (len(seeds), numel)
    assert torch.equal(fast, ref)
    for i in range(0, numel, max(1, numel // 7)):  # spot checks against the Python hash
        assert fast[0, i].item() == _python_uniform(seeds[0], start + stride * i, offset)


def test_public_streams_match_with_and_without_the_c_path(monkeypatch):
    def streams():
        return (counter_rng.uniform(4097, 7), counter_rng.uniform(300, 2 ** 64 - 1),
                counter_rng.uniforms([1, 2 ** 63 + 9], 513, "cpu"),
                counter_rng.normals([5, 6], 1001, "cpu"))
    fast = streams()
    monkeypatch.setenv("GRADPROJ_KERNELS", "reference")
    for a, b in zip(fast, streams()):
        assert torch.equal(a, b)
    # one seed's stream takes all 64 bits of it (the Triton kernel's keys), unlike a bucket's
    k0, k1 = counter_rng.seed_keys(2 ** 64 - 1)
    assert fast[1][5].item() == (counter_rng.hash32(counter_rng.hash32(5 ^ k0) ^ k1) >> 8) * 2.0 ** -24


def test_indices_past_two_to_the_32_keep_the_reference_bits():
    """The int64 reference mixes an index's high bits into its hash; the C loop must too."""
    k0, k1 = counter_rng._list_keys([3])
    fast = cpu_counter_rng.uniform_rows(k0, k1, 16, start=2 ** 32 - 8)
    assert torch.equal(fast, _tensor_streams([3], 16, 2 ** 32 - 8, 1, 0))


@st.composite
def weight_rows(draw):
    k, n = draw(st.integers(1, 3)), draw(st.integers(1, 700))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    x = torch.randn(k, n, generator=gen) * 10.0 ** draw(st.integers(-40, 30))
    kind = draw(st.sampled_from(["plain", "grid", "zeros", "subnormal"]))
    if kind == "grid":      # values on the code grid: y - floor(y) = 0, never rounded up
        x = torch.randint(-127, 128, (k, n), generator=gen).float() * 0.03125
    elif kind == "zeros":   # all-zero groups take scale 1
        x[:, : n // 2] = 0.0
    elif kind == "subnormal":
        x = x.sign() * torch.rand(k, n, generator=gen) * 1e-39
    return x


@settings(max_examples=40, deadline=None)
@given(x=weight_rows(), group_size=st.sampled_from([1, 7, 128, 256]),
       seeds=st.lists(st.integers(0, 2 ** 64 - 1), min_size=3, max_size=3))
def test_c_int8_stochastic_rounding_equals_the_reference(x, group_size, seeds):
    seeds = seeds[: x.shape[0]]
    codes, scales = int8_sr.int8_sr_quantize_rows(x, seeds, group_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADPROJ_KERNELS", "reference")
        ref_codes, ref_scales = int8_sr.int8_sr_quantize_rows(x, seeds, group_size)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    assert torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales)
    # and each row is what the one-tensor reference (its own code) gives it
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADPROJ_KERNELS", "reference")
        one_codes, one_scale = int8_sr.int8_sr_quantize_ref(x[0], seeds[0] % (1 << 63), group_size)
    assert torch.equal(codes[0], one_codes) and torch.equal(scales[0], one_scale)
    values = int8_sr.int8_dequantize_rows(codes, scales, group_size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADPROJ_KERNELS", "reference")
        assert torch.equal(values, int8_sr.int8_dequantize_rows(codes, scales, group_size))


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_all_zero_groups_take_scale_one(monkeypatch, kernels):
    """Deterministically (the hypothesis lane draws such groups only by chance): a group of
    zeros gets scale 1 and codes 0 on both paths, the group after it its own absmax/127."""
    monkeypatch.setenv("GRADPROJ_KERNELS", kernels)
    x = torch.zeros(2, 300)
    x[1, 256:] = 1.0
    codes, scales = int8_sr.int8_sr_quantize_rows(x, [1, 2], 256)
    assert scales.tolist() == [[1.0, 1.0], [1.0, torch.tensor(1.0 / 127).item()]]
    assert torch.equal(codes[0], torch.zeros(300, dtype=torch.int8))
    assert torch.equal(codes[1, 256:], torch.full((44,), 127, dtype=torch.int8))
