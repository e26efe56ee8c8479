"""Fused kernels against the unfused PyTorch chain they replace, in the same run.

    python benchmarks/kernels.py                 # CUDA: GB/s, % of peak bandwidth, TFLOP/s
    python benchmarks/kernels.py --size 4096x1024 --rank 512

On CUDA each elementwise op reports the bytes it must move (reads + writes of every tensor
once), GB/s, and that as a fraction of the device's peak memory bandwidth (from the memory
clock and bus width torch reports, or --peak-gbs); the fused back-projection GEMM reports
TFLOP/s (2·m·n·r) and GB/s of its W traffic. The reference column is the PyTorch chain of
`rules/adamw.py` / `formats` / `LowRankOptimizer` on the same tensors.

On CPU it proves the script runs: the references in PyTorch against the kernels under the
Triton interpreter (re-executing itself with TRITON_INTERPRET=1), on a small size; those
timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch


def _time(fn, device, repeat):
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=repeat * 10) * 1e-3
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def peak_gbs(device) -> float | None:
    """Peak DRAM bandwidth from the device properties (2 transfers per clock, DDR/HBM)."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def cases(m, n, r, device):
    """(name, fused fn, reference fn, bytes moved by the fused op, flops or 0)."""
    from gradproj.kernels import adam, adam_q4, adam_q8, backproj, int8_sr, lion, q4, q8

    g = torch.randn(m, r, device=device)
    numel = g.numel()
    dense = [torch.randn(m, r, device=device) * 1e-2, torch.rand(m, r, device=device) * 1e-4]
    q8s = [*q8.q8_quantize_ref(dense[0].cpu(), True), *q8.q8_quantize_ref(dense[1].cpu(), False)]
    q8s = [t.to(device) for t in q8s]
    q4s = [*q4.q4_quantize_ref(dense[0].cpu(), True), *q4.q4_quantize_ref(dense[1].cpu(), False)]
    q4s = [t.to(device) for t in q4s]
    hp = (0.9, 0.999, 1e-8, 0.5)
    w = torch.randn(m, n, device=device)
    basis = torch.randn(n, r, device=device)
    x = torch.randn(m, n, device=device)
    blocks8, blocks4 = -(-numel // 256), -(-numel // 128)
    return [
        ("adam_step fp32", lambda: adam.adam_step(g, *dense, *hp),
         lambda: adam.adam_step_ref(g, *dense, *hp), 4 * numel * 5, 0),
        ("adam_q8_step", lambda: adam_q8.adam_q8_step(g, *q8s, *hp),
         lambda: adam_q8.adam_q8_step_ref(g, *q8s, *hp), numel * (8 + 4) + 16 * blocks8, 0),
        ("adam_q4_step", lambda: adam_q4.adam_q4_step(g, *q4s, *hp),
         lambda: adam_q4.adam_q4_step_ref(g, *q4s, *hp), numel * (8 + 2) + 16 * blocks4, 0),
        ("lion_update fp32", lambda: lion.lion_update(g, dense[0], 0.9, 0.99),
         lambda: lion.lion_update_ref(g, dense[0], 0.9, 0.99), 4 * numel * 4, 0),
        ("q8_quantize", lambda: q8.q8_quantize(x), lambda: q8.q8_quantize_ref(x),
         x.numel() * 5 + 4 * -(-x.numel() // 256), 0),
        ("int8_sr_quantize", lambda: int8_sr.int8_sr_quantize(x, 1),
         lambda: int8_sr.int8_sr_quantize_ref(x, 1), x.numel() * 5 + 4 * -(-x.numel() // 256), 0),
        ("backproject_update (right)",
         lambda: backproj.backproject_update(w, basis, g, "right", 1e-6, 0.25, 0.1),
         lambda: backproj.backproject_update_ref(w, basis, g, "right", 1e-6, 0.25, 0.1),
         4 * (2 * m * n + numel + basis.numel()), 2 * m * n * r),
    ]


def run(args) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m, n = (int(v) for v in args.size.split("x"))
    r = args.rank
    if device.type == "cpu":
        os.environ.setdefault("GRADPROJ_KERNELS", "interpret")
    peak = args.peak_gbs or (peak_gbs(device) if device.type == "cuda" else None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"device: {name}; weight {m}x{n}, rank {r} (low-rank state {m}x{r}); "
          f"peak bandwidth {peak:.0f} GB/s" if peak else f"device: {name}; weight {m}x{n}, rank {r}")
    print(f"{'op':28} {'fused ms':>9} {'ref ms':>9} {'speedup':>8} {'GB/s':>8} {'% peak':>7} {'TFLOP/s':>8}")
    for label, fused, ref, nbytes, flops in cases(m, n, r, device):
        t_fused = _time(fused, device, args.repeat)
        t_ref = _time(ref, device, args.repeat)
        gbs = nbytes / t_fused / 1e9
        frac = f"{100 * gbs / peak:6.1f}%" if peak else "      -"
        tflops = f"{flops / t_fused / 1e12:8.1f}" if flops else "       -"
        print(f"{label:28} {t_fused * 1e3:9.3f} {t_ref * 1e3:9.3f} {t_ref / t_fused:7.2f}x "
              f"{gbs:8.1f} {frac} {tflops}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="weight m x n (default 4096x4096 on CUDA, 256x128 on CPU)")
    parser.add_argument("--rank", type=int, default=None, help="projection rank r (default 512 on CUDA, 32 on CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions")
    parser.add_argument("--peak-gbs", type=float, default=None, help="override peak bandwidth")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.size = args.size or ("4096x4096" if cuda else "256x128")
    args.rank = args.rank or (512 if cuda else 32)
    args.repeat = args.repeat or (20 if cuda else 2)
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        # the interpreter is chosen at triton's import: re-run this script with it set
        env = dict(os.environ, TRITON_INTERPRET="1", GRADPROJ_KERNELS="interpret")
        sys.exit(subprocess.call([sys.executable, __file__, *(argv or sys.argv[1:])], env=env))
    run(args)


if __name__ == "__main__":
    main()
