"""CPU lane: the C q8/q4 codecs and fused AdamW step (kernels/cpu_*.py, cpu_blockwise.c)
against the PyTorch references, bit for bit: the same codes, absmax, dequantized values and
Adam direction, and the same optimizer trajectory as GRADPROJ_KERNELS=reference; for the
native build (AVX-512 code where the CPU has it) and the portable one. No interpreter, no
GPU."""
import contextlib
import math
import shutil
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gradproj as gp
from gradproj.formats.blockwise import MIN_QUANTIZED_NUMEL
from gradproj.kernels import adam_q4, adam_q8, cpu_adam, cpu_blockwise, cpu_native, q4, q8
from gradproj.kernels.qmaps import tables

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the C path is off and the reference runs")

CODECS = {8: (q8.q8_quantize_ref, lambda c, a, s, shape: q8.q8_dequantize_ref(c, a, s)),
          4: (q4.q4_quantize_ref, q4.q4_dequantize_ref)}
MAPS = [(8, True), (8, False), (4, True), (4, False)]


VARIANTS = ["native", "portable"]  # -march=native (AVX-512 code where the CPU has it), and without


@pytest.fixture(autouse=True)
def _auto(monkeypatch):
    monkeypatch.setenv("GRADPROJ_KERNELS", "auto")


@contextlib.contextmanager
def variant(name: str):
    """Run the C path from the native or the portable build."""
    native = cpu_blockwise.library
    lib = native() if name == "native" else cpu_blockwise.portable_library()
    cpu_blockwise.library = lambda: lib
    try:
        yield
    finally:
        cpu_blockwise.library = native


def _cpu_has_avx512f() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def test_library_builds():
    # a machine with a compiler must get the C path; a silent fallback would make every
    # comparison below one of the reference with itself
    assert cpu_blockwise.library() is not None, cpu_native.load_error("cpu_blockwise")
    assert cpu_blockwise.portable_library().gp_avx512() == 0
    # where the CPU has AVX-512 the native build must run (and so test) that code
    assert cpu_blockwise.library().gp_avx512() == int(_cpu_has_avx512f())


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality; any NaN equals any NaN (payloads are not part of the contract)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(0.0).view(torch.int32), b.nan_to_num(0.0).view(torch.int32))


def check_codec(x: torch.Tensor, bits: int, signed: bool):
    quant_ref, dequant_ref = CODECS[bits]
    fast = cpu_blockwise.quantize(x, bits, signed)
    ref = quant_ref(x, signed)
    assert fast is not None
    assert same(fast[0], ref[0]), (fast[0] != ref[0]).nonzero()[:5]
    assert same(fast[1], ref[1])
    shape = tuple(x.shape)
    out = cpu_blockwise.dequantize(*ref, bits, signed, shape)
    assert same(out, dequant_ref(*ref, signed, shape))


@pytest.mark.parametrize("build", VARIANTS)
@pytest.mark.parametrize("bits,signed", MAPS)
def test_search_at_every_midpoint_and_its_neighbours(bits, signed, build):
    """With 1.0 in the block the scale is 1, so each midpoint m is searched exactly, with
    its float neighbours: ties go to the lower code, one ulp above to the upper; plus the
    codes themselves, ±1, ±0 and values just inside ±1."""
    code, mids = tables(bits, signed, "cpu")
    inf = torch.tensor(float("inf"))
    values = torch.cat([torch.ones(1), mids, torch.nextafter(mids, inf),
                        torch.nextafter(mids, -inf), code,
                        torch.tensor([-1.0, 0.0, -0.0, 1 - 2 ** -24, -1 + 2 ** -24])])
    with variant(build):
        check_codec(values, bits, signed)
    # and the rule itself, independently of the reference: midpoint i (between codes i and
    # i+1) is a tie and gets code i, one ulp above it gets code i+1
    for probe, expected in ((mids, 0), (torch.nextafter(mids, inf), 1)):
        with variant(build):
            codes, _ = cpu_blockwise.quantize(torch.cat([torch.ones(1), probe]), bits, signed)
        if bits == 4:
            codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1)
        assert torch.equal(codes[1:len(mids) + 1].long(), torch.arange(len(mids)) + expected)


@pytest.mark.parametrize("build", VARIANTS)
@pytest.mark.parametrize("signed", [True, False])
def test_every_bucket_of_the_q8_table(signed, build):
    """Both ends (lowest and highest float) of each of the 2^15 buckets of the q8 table, at
    scale 1: the table lookup plus two comparisons (portable build) and the permute binary
    search (AVX-512) are bucketize everywhere in [−1, 1]."""
    bits = 8
    shift = 23 - cpu_blockwise.MANTISSA_BITS
    keys = torch.arange(1 << (32 - shift), dtype=torch.int64)
    ends = torch.cat([cpu_blockwise._floats(keys << shift),
                      cpu_blockwise._floats((keys << shift) | ((1 << shift) - 1))])
    ends = ends[ends.abs() <= 1]  # the scaled value is clamped into [−1, 1]
    blocks = ends[: ends.numel() // 255 * 255].reshape(-1, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1)  # absmax 1 in every block
    with variant(build):
        check_codec(x, bits, signed)


def values(draw, n: int, signed: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
    scale = 10.0 ** draw(st.integers(-30, 30))
    x = torch.randn(n, generator=gen) * torch.exp(3 * torch.randn(n, generator=gen)) * scale
    for _ in range(draw(st.integers(0, 3))):  # all-zero blocks (any alignment)
        start = draw(st.integers(0, n - 1))
        x[start:start + draw(st.integers(1, 600))] = 0.0
    special = draw(st.lists(st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0,
                                             1e-45, 3e38]), max_size=3))
    for value in special:
        x[draw(st.integers(0, n - 1))] = value
    if draw(st.booleans()):  # −absmax next to +absmax: both scale to ±1 or one ulp inside
        i = draw(st.integers(0, n - 1))
        x[i] = -x[i - i % 128: i - i % 128 + 128].abs().max()
    return x if signed else x.abs()


sizes = st.one_of(st.sampled_from([1, 127, 128, 129, 255, 256, 257, MIN_QUANTIZED_NUMEL,
                                   MIN_QUANTIZED_NUMEL + 1, 3 * 4096 - 1]),
                  st.integers(1, 3 * 4096))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data(), sizes, st.sampled_from(MAPS), st.booleans(), st.sampled_from(VARIANTS))
def test_codec_matches_reference(data, n, bits_signed, as_matrix, build):
    bits, signed = bits_signed
    x = values(data.draw, n, signed)
    if as_matrix and n % 8 == 0:
        x = x.reshape(8, -1).t()  # non-contiguous input: the reference's reshape copies it
    with variant(build):
        check_codec(x, bits, signed)


def _quantized(shape, gen, bits, v_scale=1e-4):
    quant = CODECS[bits][0]
    m = torch.randn(shape, generator=gen) * 1e-2
    v = torch.rand(shape, generator=gen) * v_scale
    return [*quant(m, True), *quant(v, False)]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 3 * 4096), st.sampled_from([8, 4]), st.integers(1, 1000),
       st.sampled_from([256, 768, cpu_adam.SLICE]), st.booleans(), st.integers(0, 2 ** 31),
       st.sampled_from(VARIANTS))
def test_fused_adam_step_matches_reference(n, bits, step, slice_values, transposed, seed, build):
    """One step from random q8/q4 moments: direction, codes and absmax as the reference's,
    in slices of 256 or 768 values (a short last one) or one, and for a non-contiguous
    gradient (the whole-tensor path)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (n // 4, 4) if transposed and n >= 8 else (n,)
    grad = torch.randn(shape[::-1], generator=gen)
    grad = grad.t() if len(shape) == 2 else grad
    grad = grad * 10.0 ** torch.randint(-6, 1, (1,), generator=gen).item()
    grad[(0,) * grad.dim()] = 0.0  # a zero gradient: V only decays
    state = _quantized(shape, gen, bits)
    ours, theirs = [t.clone() for t in state], [t.clone() for t in state]
    hyper = (0.9, 0.999, 1e-8, math.sqrt(1 - 0.999 ** step) / (1 - 0.9 ** step))
    ref_step = adam_q8.adam_q8_step_ref if bits == 8 else adam_q4.adam_q4_step_ref
    default, cpu_adam.SLICE = cpu_adam.SLICE, slice_values
    try:
        with variant(build):
            direction = cpu_adam.adam_blockwise_step(bits, grad, *ours, *hyper)
    finally:
        cpu_adam.SLICE = default
    assert direction is not None
    assert same(direction, ref_step(grad, *theirs, *hyper))
    for a, b in zip(ours, theirs):
        assert same(a, b)


def test_threads_split_blocks_without_changing_results(monkeypatch):
    """3 threads: the C passes split over the pool and ATen splits its ops (above 32768
    values) over threads; results as the one-thread reference's."""
    monkeypatch.setattr(cpu_blockwise, "CHUNK_ELEMENTS", 1024)  # split small tensors too
    monkeypatch.setattr(cpu_adam, "SLICE", 768)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3 * 32768 + 1001, generator=gen)
        for bits, signed in MAPS:
            check_codec(x if signed else x.abs(), bits, signed)
        # V of the size of (1−β2)·G², where addcmul's fused multiply-add differs from a
        # product-then-add on 14 % of values
        state = _quantized((x.numel(),), gen, 8, v_scale=2e-3)
        ours, theirs = [t.clone() for t in state], [t.clone() for t in state]
        hyper = (0.9, 0.999, 1e-8, 0.3)
        assert same(cpu_adam.adam_blockwise_step(8, x, *ours, *hyper),
                    adam_q8.adam_q8_step_ref(x, *theirs, *hyper))
        assert all(same(a, b) for a, b in zip(ours, theirs))
    finally:
        torch.set_num_threads(threads)


def _train(state_format, rule, mode, monkeypatch, steps=4):
    monkeypatch.setenv("GRADPROJ_KERNELS", mode)
    # the biases' fp32 moments (below MIN_QUANTIZED_NUMEL) keep ATen's chain in both modes:
    # the dense C pass rounds differently by design (test_kernels_cpu_adam_dense.py)
    monkeypatch.setattr(cpu_adam, "adam_dense_step", lambda *args: None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 256), torch.nn.Tanh(), torch.nn.Linear(256, 41))
    # layer 0 projected (256×96 at rank 32: 8192 moment values), layer 2 full rank
    # (41×256 = 10496, a short last block for both q8 and q4); biases stay fp32
    groups = [{"params": [model[0].weight], "rank": 32, "update_gap": 3},
              {"params": [model[0].bias, model[2].weight, model[2].bias]}]
    opt = gp.LowRankOptimizer(groups, rule=rule, lr=1e-3, state_format=state_format)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 96, generator=gen)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rule == "sophia":  # h from the same gradients (GNB form), so H is not all zero
            opt.update_curvature("gnb", batch_size=32)
    return model, opt


@pytest.mark.parametrize("state_format", ["q8", "q4"])
@pytest.mark.parametrize("rule", ["adamw", "lion", "adabelief", "sgdm", "diffgrad", "sophia"])
def test_optimizer_on_c_path_is_bit_identical_to_reference(state_format, rule, monkeypatch):
    """Four steps (one refresh of the projected layer) through LowRankOptimizer: weights and
    every state tensor equal the GRADPROJ_KERNELS=reference run's; adamw takes the fused C
    step for both quantized weights, the other rules the C codec (diffGrad and Sophia
    inside their fused 8-/4-bit hosts, the rest through fmt.read/write)."""
    calls = {"fused": 0, "quantize": 0}
    fused, quantize = cpu_adam.adam_blockwise_step, cpu_blockwise.quantize

    def count(name, fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            calls[name] += out is not None
            return out
        return wrapped

    monkeypatch.setattr(cpu_adam, "adam_blockwise_step", count("fused", fused))
    monkeypatch.setattr(cpu_blockwise, "quantize", count("quantize", quantize))
    fast_model, fast_opt = _train(state_format, rule, "auto", monkeypatch)
    if rule == "adamw":
        assert calls["fused"] == 2 * 4 and calls["quantize"] == 0
    else:
        assert calls["quantize"] >= 2 * 4
    calls.update(fused=0, quantize=0)
    ref_model, ref_opt = _train(state_format, rule, "reference", monkeypatch)
    assert calls == {"fused": 0, "quantize": 0}  # the reference mode never runs C
    for p, q in zip(fast_model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
        a, b = fast_opt.state[p], ref_opt.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert same(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key
    assert any(k.endswith(".codes") for k in fast_opt.state[fast_model[2].weight])


def test_without_the_library_the_reference_runs(monkeypatch):
    monkeypatch.setattr(cpu_blockwise, "library", lambda: None)
    x = torch.randn(5000)
    for bits, signed in MAPS:
        assert cpu_blockwise.quantize(x, bits, signed) is None
    assert same(q8.q8_quantize(x)[0], q8.q8_quantize_ref(x)[0])
    assert same(q4.q4_quantize(x)[1], q4.q4_quantize_ref(x)[1])


def test_layouts_the_c_path_does_not_cover_fall_back():
    x = torch.randn(600)
    codes, absmax = q8.q8_quantize_ref(x)
    assert cpu_blockwise.dequantize(codes, absmax[:2], 8, True, (600,)) is None  # 3 blocks
    assert cpu_blockwise.dequantize(codes.long(), absmax, 8, True, (600,)) is None
    with pytest.raises(RuntimeError):  # the reference's own complaint, as before
        q8.q8_dequantize(codes, absmax[:2])


def test_build_failures_are_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADPROJ_CACHE_DIR", str(tmp_path))
    assert cpu_native.load("gp_test_broken", "this is not C;", {}) is None
    assert "error" in cpu_native.load_error("gp_test_broken")
    monkeypatch.setattr(cpu_native, "_compiler", lambda: None)
    assert cpu_native.load("gp_test_nocc", "int f(void) { return 1; }", {}) is None
    assert "no C compiler" in cpu_native.load_error("gp_test_nocc")
    monkeypatch.undo()
    monkeypatch.setenv("GRADPROJ_CACHE_DIR", str(tmp_path))
    import ctypes

    lib = cpu_native.load("gp_test_ok", "int gp_one(void) { return 1; }",
                          {"gp_one": (ctypes.c_int, [])})
    assert lib is not None and lib.gp_one() == 1
    assert list(tmp_path.glob("gp_test_ok-*.so"))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("GRADPROJ_CACHE_DIR", str(blocked / "cache"))  # cannot be created
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    lib = cpu_native.load("gp_test_tmp", "int gp_two(void) { return 2; }",
                          {"gp_two": (ctypes.c_int, [])})
    assert lib is not None and lib.gp_two() == 2  # built in the system temp dir instead
    assert list((tmp_path / "tmp").glob("gradproj-*/gp_test_tmp-*.so"))
