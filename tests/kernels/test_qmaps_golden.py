"""q8/q4 code maps and codes against bitsandbytes and torchao themselves.

The golden file (golden/qmaps_golden.json) was written by golden/make_qmaps_golden.py with
bitsandbytes 0.50.2 and torchao 0.18.0 (how, and why its inputs look as they do, is in that
script's docstring); it needs neither package at test time. Where the packages are
installed (the `dev` extra lists them) the last tests compare with them directly as well.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from gradproj.formats import blockwise
from gradproj.kernels import q4, q8
from gradproj.kernels.qmaps import dynamic_map, linear_map, tables, zero_code
from gradproj.registry import STATE_FORMATS

GOLDEN = json.loads((Path(__file__).parent / "golden" / "qmaps_golden.json").read_text())
MAPS = GOLDEN["maps"]


def f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_q8_maps_are_bitsandbytes_dynamic_maps(signed):
    golden = f32(MAPS["bnb_dynamic_signed" if signed else "bnb_dynamic_unsigned"])
    assert torch.equal(dynamic_map(signed), golden)
    assert torch.equal(tables(8, signed, "cpu")[0], golden)  # the table the codec searches


@pytest.mark.parametrize("signed", [True, False])
def test_q4_maps_are_torchaos_4bit_maps(signed):
    golden = f32(MAPS["torchao_4bit_signed" if signed else "torchao_4bit_unsigned"])
    ours = dynamic_map(True, 3, 4) if signed else linear_map(4)
    assert torch.equal(ours, golden)
    assert torch.equal(tables(4, signed, "cpu")[0], golden)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_zero_code_decodes_to_zero_or_the_smallest_value(bits, signed):
    # all-zero storage must read back as the code nearest to 0: exactly 0 where the map
    # has it, torchao's smallest second-moment value 1/16 where it does not
    code = tables(bits, signed, "cpu")[0]
    expected = 1 / 16 if (bits, signed) == (4, False) else 0.0
    assert code[zero_code(bits, signed)].item() == expected


@pytest.mark.parametrize("case", GOLDEN["q8"], ids=lambda c: "signed" if c["signed"] else "unsigned")
def test_q8_codes_match_bitsandbytes(case):
    """Codes and absmax of bnb.functional.quantize_blockwise (block 256, a short last
    block) — exactly where bnb's code is the nearest one, and the float64 nearest code
    where bnb's CPU search picks a farther one (recorded in the file: 53 and 61 of 589)."""
    x = f32(case["x"])
    codes, absmax = q8.q8_quantize(x, case["signed"])
    assert torch.equal(absmax, f32(case["absmax"]))
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    bnb, nearest = torch.tensor(case["codes"]), torch.tensor(case["nearest"])
    exact = torch.tensor(case["bnb_nearest"])
    assert exact.float().mean() > 0.85
    assert torch.equal(codes.long()[exact], bnb[exact])
    assert torch.equal(codes.long(), nearest)
    decoded = q8.q8_dequantize(codes, absmax, case["signed"])
    code = f32(MAPS["bnb_dynamic_signed" if case["signed"] else "bnb_dynamic_unsigned"])
    assert torch.equal(decoded, code[nearest] * f32(case["absmax"]).repeat_interleave(256)[:x.numel()])


@pytest.mark.parametrize("case", GOLDEN["q4"], ids=lambda c: "signed" if c["signed"] else "unsigned")
def test_q4_codes_match_torchao(case):
    """torchao's scale_tensor + quantize_4bit_with_qmap (block 128), code for code; our
    packing is low nibble first."""
    x = f32(case["x"])
    packed, absmax = q4.q4_quantize(x, case["signed"])
    assert torch.equal(absmax, f32(case["scale"]))
    assert packed.numel() == x.numel() // 2
    unpacked = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    assert torch.equal(unpacked.long(), torch.tensor(case["codes"]))
    code = f32(MAPS["torchao_4bit_signed" if case["signed"] else "torchao_4bit_unsigned"])
    decoded = q4.q4_dequantize(packed, absmax, case["signed"], (x.numel(),))
    expected = code[torch.tensor(case["codes"])] * f32(case["scale"]).repeat_interleave(128)
    assert torch.equal(decoded, expected)


@pytest.mark.parametrize("name,case", [("q8", GOLDEN["q8"][0]), ("q8", GOLDEN["q8"][1]),
                                       ("q4", GOLDEN["q4"][0]), ("q4", GOLDEN["q4"][1])],
                         ids=["q8-signed", "q8-unsigned", "q4-signed", "q4-unsigned"])
def test_state_format_stores_the_golden_codes(name, case):
    """Through StateFormat.zeros/write/read: a moment of ≥ 4096 values is stored as the
    packages' codes. The golden inputs are zero-padded to whole blocks (589 → 768 for q8;
    q4's 384 are whole) and tiled past the 4096 threshold (6 · 768, 11 · 384 values)."""
    block = 256 if name == "q8" else 128
    x = f32(case["x"])
    pad = -x.numel() % block
    x = torch.cat([x, x.new_zeros(pad)])
    copies = -(-blockwise.MIN_QUANTIZED_NUMEL // x.numel())
    x = torch.cat([x] * copies)
    fmt = STATE_FORMATS.create(name)
    state = {}
    fmt.zeros(state, "m", tuple(x.shape), torch.device("cpu"), signed=case["signed"])
    fmt.write(state, "m", x)
    assert "m" not in state and state["m.codes"].dtype == torch.uint8
    assert torch.equal(state["m.absmax"], torch.cat([f32(case["absmax" if name == "q8" else "scale"])] * copies))
    if name == "q8":
        golden_map = f32(MAPS["bnb_dynamic_signed" if case["signed"] else "bnb_dynamic_unsigned"])
        zero = int(golden_map.abs().argmin())  # the code bnb stores for 0
        expected = torch.tensor((case["nearest"] + [zero] * pad) * copies)
        stored = state["m.codes"].reshape(-1).long()
    else:
        expected = torch.tensor(case["codes"] * copies)
        stored = torch.stack([state["m.codes"] & 15, state["m.codes"] >> 4], dim=-1).reshape(-1).long()
    assert torch.equal(stored, expected)
    assert torch.equal(fmt.read(state, "m"), (q8.q8_dequantize_ref(state["m.codes"], state["m.absmax"], case["signed"])
                                              if name == "q8" else q4.q4_dequantize_ref(
                                                  state["m.codes"], state["m.absmax"], case["signed"], tuple(x.shape))))


def test_quantized_storage_starts_at_bitsandbytes_min_8bit_size():
    """The production threshold is bitsandbytes' `min_8bit_size` = 4096: a moment of 4095
    values stays fp32, one of 4096 is quantized (and costs what nbytes says)."""
    assert blockwise.MIN_QUANTIZED_NUMEL == 4096
    for name, per_block, block in (("q8", 256 + 4, 256), ("q4", 64 + 4, 128)):
        fmt = STATE_FORMATS.create(name)
        small, large = {}, {}
        fmt.zeros(small, "v", (4095,), torch.device("cpu"), signed=False)
        fmt.zeros(large, "v", (64, 64), torch.device("cpu"), signed=False)
        assert set(small) == {"v"} and small["v"].dtype == torch.float32
        assert "v" not in large and large["v.codes"].dtype == torch.uint8
        assert fmt.nbytes((4095,)) == 4 * 4095
        assert fmt.nbytes((64, 64)) == 4096 // block * per_block
        stored = sum(t.numel() * t.element_size() for t in large.values() if torch.is_tensor(t))
        assert stored == fmt.nbytes((64, 64))
        # a short last block costs a whole scale: 4097 values = 17 blocks of 256 / 33 of 128
        odd = {}
        fmt.zeros(odd, "v", (4097,), torch.device("cpu"), signed=True)
        expected = 4097 + 4 * 17 if name == "q8" else 33 * (64 + 4)
        assert fmt.nbytes((4097,)) == expected
        assert sum(t.numel() * t.element_size() for t in odd.values() if torch.is_tensor(t)) == expected


@pytest.mark.parametrize("name,signed", [("q8", True), ("q8", False), ("q4", True), ("q4", False)])
def test_fresh_storage_holds_the_code_of_zero(name, signed):
    """zeros() fills the codes with the code nearest to 0 in the packages' maps (bnb: the
    0.0 entry; torchao's unsigned 4-bit map has no 0, its nearest is 1/16), and reads 0."""
    golden = f32(MAPS[{("q8", True): "bnb_dynamic_signed", ("q8", False): "bnb_dynamic_unsigned",
                       ("q4", True): "torchao_4bit_signed", ("q4", False): "torchao_4bit_unsigned"}[name, signed]])
    zero = int(golden.abs().argmin())
    fmt = STATE_FORMATS.create(name)
    state = {}
    fmt.zeros(state, "m", (64, 80), torch.device("cpu"), signed=signed)
    expected = zero if name == "q8" else zero | (zero << 4)
    assert torch.all(state["m.codes"] == expected)
    assert torch.equal(fmt.read(state, "m"), torch.zeros(64, 80))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_a_value_exactly_between_two_codes_takes_the_lower_one(bits, signed):
    """qmaps.py's documented tie rule (bitsandbytes' CPU reference: ties to the lower code;
    torchao rounds them up). Block absmax 1, so x/absmax is each midpoint exactly."""
    code, mids = tables(bits, signed, "cpu")
    block = 256 if bits == 8 else 128
    x = torch.cat([torch.ones(1), mids])[:block]
    x = torch.cat([x, x.new_zeros(block - x.numel())])
    quantize = q8.q8_quantize if bits == 8 else q4.q4_quantize
    codes, absmax = quantize(x, signed)
    assert absmax.tolist() == [1.0]
    if bits == 4:
        codes = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1)
    k = min(mids.numel(), block - 1)
    assert torch.equal(codes[1:k + 1].long(), torch.arange(k))


@pytest.mark.parametrize("name", ["fp32", "bf16", "q8", "q4"])
@pytest.mark.parametrize("shape", [(7, 9), (64, 80)])
def test_every_format_reads_back_fp32_of_the_moments_shape(name, shape):
    """read() is the rule's working copy: fp32 and the moment's shape for every format
    (a bf16 read would make the rule's arithmetic bf16), within the format's rounding."""
    fmt = STATE_FORMATS.create(name)
    state = {}
    fmt.zeros(state, "m", shape, torch.device("cpu"), signed=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    fmt.write(state, "m", x)
    y = fmt.read(state, "m")
    assert y.dtype == torch.float32 and tuple(y.shape) == shape
    quantized = name in ("q8", "q4") and math.prod(shape) >= 4096
    bound = {"fp32": 0.0, "bf16": 2.0 ** -8}.get(name, 0.0) * x.abs().max().item()
    if quantized:  # half the widest gap between neighbouring codes, times absmax
        code = tables(8 if name == "q8" else 4, True, "cpu")[0]
        bound = code.diff().max().item() / 2 * x.abs().max().item()
    assert (y - x).abs().max().item() <= bound * (1 + 1e-6)


def test_golden_file_records_how_it_was_made():
    assert GOLDEN["versions"]["bitsandbytes"] == "0.50.2" and GOLDEN["versions"]["torchao"] == "0.18.0"
    assert (Path(__file__).parent / "golden" / "make_qmaps_golden.py").is_file()


@pytest.mark.parametrize("signed", [True, False])
def test_q8_against_installed_bitsandbytes(signed):
    """Live comparison where bitsandbytes is installed (the `dev` extra): same map, same
    absmax, and our codes are the float64 nearest ones wherever bnb's differ."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(256 * 20 + 31, generator=gen) * torch.exp(2 * torch.randn(256 * 20 + 31, generator=gen))
    x = x if signed else x.abs()
    code = bnb_f.create_dynamic_map(signed=signed)
    assert torch.equal(code, dynamic_map(signed))
    q, st = bnb_f.quantize_blockwise(x, code=code, blocksize=256)
    codes, absmax = q8.q8_quantize(x, signed)
    assert torch.equal(absmax, st.absmax)
    scaled = (x / absmax.repeat_interleave(256)[:x.numel()]).double()
    dist = (scaled[:, None] - code.double()[None, :]).abs()
    ours, theirs = dist.gather(1, codes.long()[:, None]), dist.gather(1, q.long()[:, None])
    assert torch.all(ours <= theirs) and torch.equal(codes.long(), dist.argmin(dim=1))


@pytest.mark.parametrize("signed", [True, False])
def test_q4_against_installed_torchao(signed):
    pytest.importorskip("torchao")
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, scale_tensor
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32)
    assert torch.equal(qmap, tables(4, signed, "cpu")[0])
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(128 * 40, generator=gen) * torch.exp(torch.randn(128 * 40, generator=gen))
    x = x if signed else x.abs()
    scaled, scale = scale_tensor(x.clone(), 128)
    theirs = quantize_4bit_with_qmap(scaled, qmap)
    packed, absmax = q4.q4_quantize(x, signed)
    ours = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(-1)
    assert torch.equal(absmax, scale)
    # torchao rounds ties up, we round them down: they may differ only at a midpoint
    mids = (qmap[:-1] + qmap[1:]) / 2
    differ = ours != theirs
    at_tie = (scaled[:, None] - mids[None, :]).abs().amin(dim=1) <= 1e-6
    assert differ.float().mean() < 0.01 and torch.all(at_tie[differ])
