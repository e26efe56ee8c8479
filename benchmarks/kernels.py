"""Fused kernels against the unfused PyTorch chain they replace, in the same run.

    python benchmarks/kernels.py                 # CUDA: GB/s, % of peak bandwidth, TFLOP/s
    python benchmarks/kernels.py --size 4096x1024 --rank 512

On CUDA each elementwise op reports the bytes it must move (reads + writes of every tensor
once), GB/s, and that as a fraction of the device's peak memory bandwidth (from the memory
clock and bus width torch reports, or --peak-gbs); the fused back-projection GEMM reports
TFLOP/s (2·m·n·r) and GB/s of its W traffic. The reference column is the PyTorch chain of
`rules/adamw.py` / `formats` / `LowRankOptimizer` on the same tensors.

On CPU (or with --cpu) it times one full-rank AdamW step of a 1024×1024 weight per
optimizer, one thread by default: torch.optim.AdamW(foreach) on fp32 states against
gradproj's `adamw` with fp32, q8 and q4 states (q8/q4 on the C path of
`kernels/cpu_blockwise.py`, and under GRADPROJ_KERNELS=reference), and bitsandbytes'
AdamW8bit when installed. Rounds interleave the optimizers in rotating order; each figure is
the median per-round ratio to torch AdamW, so it holds on a loaded machine. Every optimizer
takes the same steps on the same gradient, so the C-path and reference q8/q4 states must end
bit-identical, which the script checks and prints.

    python benchmarks/kernels.py --cpu --threads 1 --rounds 7
    python benchmarks/kernels.py --cpu --rules adamw,diffgrad,sophia   # + their q8/q4 rows

--interpret instead proves the Triton kernels run on CPU: the references in PyTorch against
the kernels under the Triton interpreter (re-executing itself with TRITON_INTERPRET=1), on a
small size; those timings say nothing about GPU speed.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
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
    from gradproj.kernels import (adam, adam_q4, adam_q8, backproj, diffgrad_q4, diffgrad_q8,
                                  int8_sr, lion, q4, q8, sophia_q4, sophia_q8)

    g = torch.randn(m, r, device=device)
    numel = g.numel()
    dense = [torch.randn(m, r, device=device) * 1e-2, torch.rand(m, r, device=device) * 1e-4]
    q8s = [*q8.q8_quantize_ref(dense[0].cpu(), True), *q8.q8_quantize_ref(dense[1].cpu(), False)]
    q8s = [t.to(device) for t in q8s]
    q4s = [*q4.q4_quantize_ref(dense[0].cpu(), True), *q4.q4_quantize_ref(dense[1].cpu(), False)]
    q4s = [t.to(device) for t in q4s]
    hp = (0.9, 0.999, 1e-8, 0.5)
    sp = (0.965, 0.04, 1e-15)
    # diffGrad's third state (G_prev) and Sophia's H: one more signed / unsigned moment
    q8d = [*q8s, *[t.to(device) for t in q8.q8_quantize_ref(dense[0].cpu(), True)]]
    q4d = [*q4s, *[t.to(device) for t in q4.q4_quantize_ref(dense[0].cpu(), True)]]
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
        # 3 states read + written (1 / 0.5 B each way) and G, N
        ("diffgrad_q8_step", lambda: diffgrad_q8.diffgrad_q8_step(g, *q8d, *hp),
         lambda: diffgrad_q8.diffgrad_q8_step_ref(g, *q8d, *hp), numel * (8 + 6) + 24 * blocks8, 0),
        ("diffgrad_q4_step", lambda: diffgrad_q4.diffgrad_q4_step(g, *q4d, *hp),
         lambda: diffgrad_q4.diffgrad_q4_step_ref(g, *q4d, *hp), numel * (8 + 3) + 24 * blocks4, 0),
        # M read + written, H (q8s[2:]: the unsigned moment) read, G, N
        ("sophia_q8_step", lambda: sophia_q8.sophia_q8_step(g, *q8s, *sp),
         lambda: sophia_q8.sophia_q8_step_ref(g, *q8s, *sp), numel * (8 + 3) + 12 * blocks8, 0),
        ("sophia_q4_step", lambda: sophia_q4.sophia_q4_step(g, *q4s, *sp),
         lambda: sophia_q4.sophia_q4_step_ref(g, *q4s, *sp),
         numel * 8 + numel * 3 // 2 + 12 * blocks4, 0),
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


# -- CPU: one full-rank AdamW step ------------------------------------------------------
@contextlib.contextmanager
def kernels_mode(value: str | None):
    old = os.environ.get("GRADPROJ_KERNELS")
    if value is not None:
        os.environ["GRADPROJ_KERNELS"] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GRADPROJ_KERNELS", None)
        else:
            os.environ["GRADPROJ_KERNELS"] = old


def cpu_contenders(lr: float, rules=("adamw",)):
    """name -> (build(param) -> optimizer, GRADPROJ_KERNELS value while it steps); rules
    other than adamw add their fp32 and q8/q4 rows (C path and reference) after AdamW's."""
    import gradproj as gp

    def ours(state_format, rule="adamw"):
        return lambda p: gp.LowRankOptimizer([p], rule=rule, lr=lr, weight_decay=0.0,
                                             state_format=state_format)

    extra = {}
    for rule in rules:
        if rule == "adamw":
            continue
        extra[f"gradproj {rule}, fp32"] = (ours("fp32", rule), None)
        for fmt in ("q8", "q4"):
            extra[f"gradproj {rule}, {fmt} (C path)"] = (ours(fmt, rule), "auto")
            extra[f"gradproj {rule}, {fmt} (reference)"] = (ours(fmt, rule), "reference")

    def bnb(p):
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit([p], lr=lr, weight_decay=0.0)

    return {
        "torch AdamW (foreach), fp32": (lambda p: torch.optim.AdamW([p], lr=lr, weight_decay=0.0,
                                                                    foreach=True), None),
        "gradproj adamw, fp32": (ours("fp32"), None),
        "gradproj adamw, q8 (C path)": (ours("q8"), "auto"),
        "gradproj adamw, q4 (C path)": (ours("q4"), "auto"),
        "gradproj adamw, q8 (reference)": (ours("q8"), "reference"),
        "gradproj adamw, q4 (reference)": (ours("q4"), "reference"),
        "bitsandbytes AdamW8bit (CPU)": (bnb, None),
        **extra,
    }


def _states_equal(a, b) -> bool:
    sa, sb = next(iter(a.state.values())), next(iter(b.state.values()))
    return sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k] for k in sa)


def run_cpu(args) -> None:
    from gradproj.kernels import cpu_blockwise, cpu_native

    torch.set_num_threads(args.threads)
    m, n = (int(v) for v in args.size.split("x"))
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(m, n, generator=gen) * 0.02
    grad = torch.randn(m, n, generator=gen) * 1e-3
    lib = cpu_blockwise.library()
    print(f"cpu, {torch.get_num_threads()} thread(s); one full-rank AdamW step of a {m}x{n} "
          f"weight; {args.rounds} rounds x {args.steps} steps, {args.clock} time; C library: "
          f"{'built' if lib is not None else cpu_native.load_error('cpu_blockwise')}")
    opts, modes, params = {}, {}, {}
    for name, (build, mode) in cpu_contenders(1e-3, args.rules.split(",")).items():
        p = torch.nn.Parameter(weight.clone())
        p.grad = grad.clone()
        try:
            with kernels_mode(mode):
                opt = build(p)
                opt.step()  # allocates the state
        except Exception as exc:  # noqa: BLE001 - an optional peer that fails is reported
            print(f"   skipped {name}: {type(exc).__name__}: {' '.join(str(exc).split())[:160]}")
            continue
        opts[name], modes[name], params[name] = opt, mode, p
    names = list(opts)
    times = {name: [] for name in names}
    # CPU time of the process: on a shared machine, time spent descheduled is not the
    # optimizer's (all of its threads are counted, so it is no wall time with --threads > 1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for r in range(args.rounds):  # rotate the order so no one always runs first
        for name in names[r % len(names):] + names[:r % len(names)]:
            with kernels_mode(modes[name]):
                start = clock()
                for _ in range(args.steps):
                    opts[name].step()
                times[name].append((clock() - start) / args.steps)
    base = times[names[0]]
    print("\n| optimizer | ms per step | × torch AdamW (foreach) |\n|---|---|---|")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.2f} | {ratio:.2f} |")
    for rule in dict.fromkeys(["adamw", *args.rules.split(",")]):
        for fmt in ("q8", "q4"):
            fast, ref = f"gradproj {rule}, {fmt} (C path)", f"gradproj {rule}, {fmt} (reference)"
            if fast in opts and ref in opts:
                same = (_states_equal(opts[fast], opts[ref])
                        and torch.equal(params[fast], params[ref]))
                print(f"{rule} {fmt}: C path and reference states and weights after the same "
                      f"steps: {'bit-identical' if same else 'DIFFERENT'}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default=None, help="weight m x n (default 4096x4096 on CUDA, 256x128 on CPU)")
    parser.add_argument("--rank", type=int, default=None, help="projection rank r (default 512 on CUDA, 32 on CPU)")
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions")
    parser.add_argument("--peak-gbs", type=float, default=None, help="override peak bandwidth")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU AdamW-step table (the default without CUDA)")
    parser.add_argument("--interpret", action="store_true",
                        help="without CUDA: run the Triton kernels under the interpreter instead")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for --cpu")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds for --cpu")
    parser.add_argument("--steps", type=int, default=3, help="steps per optimizer per round (--cpu)")
    parser.add_argument("--rules", default="adamw",
                        help="--cpu: also time these rules on q8/q4 (C path and reference), "
                             "e.g. adamw,diffgrad,sophia")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="--cpu: process CPU time (default: robust to a loaded machine) "
                             "or wall time")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if args.cpu or not (cuda or args.interpret):
        args.size = args.size or "1024x1024"
        run_cpu(args)
        return
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
