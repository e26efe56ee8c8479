"""Generate qmaps_golden.json: code maps and codes from bitsandbytes and torchao themselves.

Run once, by hand, where both packages import (they do on CPU):

    pip install -c constraints.txt --no-deps --target /tmp/goldpkgs bitsandbytes torchao
    PYTHONPATH=/tmp/goldpkgs python tests/kernels/golden/make_qmaps_golden.py

The file it writes is what tests/kernels/test_qmaps_golden.py compares gradproj with, so the
q8/q4 maps and codes have a reference that is not gradproj's own `dynamic_map`. Nothing
here imports gradproj. Made with bitsandbytes 0.50.2 and torchao 0.18.0 on torch
2.13.0+cpu (the versions are recorded in the file; the generator refuses others unless
--any-version is given).

Contents:
  maps: bnb create_dynamic_map(signed=True / False) (256 values each) and torchao's
        get_qmap_signed / get_qmap_unsigned (16 each), as float32 values.
  q8:   for signed and unsigned inputs (3 blocks of 256, the last one short: 589 values,
        magnitudes over 6 decades, a few exact zeros), bnb quantize_blockwise's absmax and
        codes, and `bnb_nearest`: whether bnb's code is the nearest code to x/absmax in
        float64. bnb's CPU kernel is not an exact nearest-code search: it picks the
        farther neighbour for ~1 % of values; for those the file also carries the float64
        nearest code ("nearest").
  q4:   for signed and unsigned inputs (3 blocks of 128), torchao's scale_tensor +
        quantize_4bit_with_qmap codes (one per value, unpacked) and scales. torchao rounds
        ties up and divides by the scale, gradproj rounds ties down and multiplies by 1/scale;
        inputs whose scaled value lies within 1e-5 of a midpoint between codes are
        resampled, so the two agree exactly on every recorded value.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

EXPECTED = {"bitsandbytes": "0.50.2", "torchao": "0.18.0"}
OUT = Path(__file__).with_name("qmaps_golden.json")


def floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.float().reshape(-1).tolist()]


def adam_like(n: int, signed: bool, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * torch.exp(2.0 * torch.randn(n, generator=gen))
    x[::97] = 0.0  # exact zeros: the zero code
    return x if signed else x.abs()


def nearest64(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    return (scaled.double()[:, None] - code.double()[None, :]).abs().argmin(dim=1)


def q8_case(bnb_f, signed: bool, seed: int) -> dict:
    x = adam_like(2 * 256 + 77, signed, seed)
    code = bnb_f.create_dynamic_map(signed=signed)
    q, state = bnb_f.quantize_blockwise(x, code=code, blocksize=256)
    absmax = state.absmax.float()
    scaled = x / absmax.repeat_interleave(256)[: x.numel()]
    nearest = nearest64(scaled, code)
    return {"signed": signed, "x": floats(x), "absmax": floats(absmax),
            "codes": [int(c) for c in q.tolist()],
            "bnb_nearest": [bool(b) for b in (q.long() == nearest).tolist()],
            "nearest": [int(c) for c in nearest.tolist()]}


def q4_case(signed: bool, seed: int) -> dict:
    from torchao.optim.quant_utils import quantize_4bit_with_qmap, scale_tensor
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    qmap = torch.tensor(get_qmap_signed() if signed else get_qmap_unsigned(), dtype=torch.float32)
    mids = (qmap[:-1] + qmap[1:]) / 2
    x = adam_like(3 * 128, signed, seed)
    for _ in range(100):  # resample values too close to a tie (see the module docstring)
        scaled, scale = scale_tensor(x.clone(), 128)
        close = (scaled[:, None] - mids[None, :]).abs().amin(dim=1) < 1e-5
        if not close.any():
            break
        x[close] = x[close] * 1.01
    else:
        raise RuntimeError("could not move the inputs off the ties")
    codes = quantize_4bit_with_qmap(scaled, qmap)
    return {"signed": signed, "x": floats(x), "scale": floats(scale),
            "codes": [int(c) for c in codes.tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--any-version", action="store_true")
    args = parser.parse_args()
    import bitsandbytes
    import bitsandbytes.functional as bnb_f
    import torchao
    from torchao.optim.subclass_4bit import get_qmap_signed, get_qmap_unsigned

    versions = {"bitsandbytes": bitsandbytes.__version__, "torchao": torchao.__version__,
                "torch": torch.__version__}
    for name, want in EXPECTED.items():
        if versions[name] != want and not args.any_version:
            raise SystemExit(f"{name} {versions[name]} installed, the golden file is from {want}")
    golden = {
        "how": "tests/kernels/golden/make_qmaps_golden.py (see its docstring)",
        "versions": versions,
        "maps": {
            "bnb_dynamic_signed": floats(bnb_f.create_dynamic_map(signed=True)),
            "bnb_dynamic_unsigned": floats(bnb_f.create_dynamic_map(signed=False)),
            "torchao_4bit_signed": floats(torch.tensor(get_qmap_signed())),
            "torchao_4bit_unsigned": floats(torch.tensor(get_qmap_unsigned())),
        },
        "q8": [q8_case(bnb_f, True, 1), q8_case(bnb_f, False, 2)],
        "q4": [q4_case(True, 3), q4_case(False, 4)],
    }
    OUT.write_text(json.dumps(golden, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
