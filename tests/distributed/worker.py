"""The distributed checks, run by `torchrun --nproc_per_node=2 tests/distributed/worker.py OUT`.

One process group runs every check (torch start-up costs ~3 s per process, so the suite
starts it once). Each check trains the tiny model for STEPS steps under DDP or FSDP2 and,
on rank 0, the same model in one process on the same global batch; rank 0 writes
OUT/results.json: per check the largest weight difference, whether every basis is
bitwise identical on all ranks, and the time it took. test_distributed.py asserts.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import bases_identical, build, full_weights, max_diff, train  # noqa: E402

from gradproj.distributed import DistEnv, init_distributed, shutdown  # noqa: E402
from gradproj.distributed.rangefinder import sharded_range_finder  # noqa: E402
from gradproj.projectors.randomized import range_finder  # noqa: E402

STEPS = 20
# Why multi-refresh checks rotate the moments: an SVD's column signs are arbitrary, and
# rounding decides them. GaLore keeps M across refreshes (moments = "keep"), so a column
# that LAPACK returns as −u instead of u — measured here: 1 of 14 bases at the step-5
# refit of plain DDP + svd, whose all-reduced gradient differs from the one-process
# gradient only in summation order — moves the run by O(lr) (2e-2 after 20 steps). The
# same happens between two single-process runs with different BLAS threads. With
# moments = "rotate" (M' = M·P_oldᵀ·P_new) the step is exactly invariant to column signs,
# so these checks measure the distributed code, not a coin. "keep" is checked with one
# refresh (update_gap > STEPS): at the first fit M = 0 and signs cannot matter.
MULTI = {"update_gap": 5, "moments": "rotate"}   # refits at steps 0, 5, 10, 15
KEEP = {"update_gap": 100, "moments": "keep"}    # GaLore as published, one fit at step 0

CHECKS = {  # name: (parallel, options, extra options of the single-process reference, per-layer)
    "ddp-svd-keep": ("ddp", {"projector": "svd", **KEEP}, {}, False),
    "ddp-svd": ("ddp", {"projector": "svd", **MULTI}, {}, False),
    "ddp-randomized": ("ddp", {"projector": "randomized", **MULTI}, {}, False),
    "ddp-fira": ("ddp", {"projector": "svd", "residual": "fira", **MULTI}, {}, False),
    "ddp-q8": ("ddp", {"projector": "randomized", "state_format": "q8", **MULTI}, {}, False),
    # gradients as bucket views: DDP (its own gradient_as_bucket_view off) copies the
    # all-reduced values into the existing .grad, so the views survive its reduction
    "ddp-views": ("ddp", {"projector": "svd", "gradient_as_bucket_view": True, **MULTI}, {}, False),
    # FSDP2 computes the spec's side: the reference is the same spec in one process
    "fsdp2-svd-keep": ("fsdp2", {"projector": "svd", **KEEP}, {}, False),
    "fsdp2-svd": ("fsdp2", {"projector": "svd", **MULTI}, {}, False),
    "fsdp2-randomized": ("fsdp2", {"projector": "randomized", **MULTI}, {}, False),
    "fsdp2-fira": ("fsdp2", {"projector": "randomized", "residual": "fira", **MULTI}, {}, False),
    "fsdp2-q8": ("fsdp2", {"projector": "svd", "state_format": "q8", **MULTI}, {}, False),
    "fsdp2-per-layer": ("fsdp2", {"projector": "randomized", **MULTI}, {}, True),
    # every proj_type (fsdp2-randomized above is "std": its 32×512 down projections are
    # left, the rest right). "full" steps with sgdm: Adam's first steps are sign-like,
    # N ≈ sign(R), and on a 16×16 core R some entries are ~0, so reduction order alone
    # moves DDP by 1.2e-4 there (measured), above FP32_TOL; sgdm is linear in R (1e-8).
    "fsdp2-left": ("fsdp2", {"projector": "gaussian", "proj_type": "left", "residual": "apollo",
                             **MULTI}, {}, False),
    "fsdp2-right": ("fsdp2", {"projector": "randomized", "proj_type": "right", **MULTI}, {}, False),
    "fsdp2-reverse_std": ("fsdp2", {"projector": "svd", "proj_type": "reverse_std", **MULTI}, {},
                          False),
    "fsdp2-full": ("fsdp2", {"projector": "randomized", "proj_type": "full", "rule": "sgdm",
                             **MULTI}, {}, False),
    "fsdp2-auto": ("fsdp2", {"projector": "randomized", "proj_type": "auto", **MULTI}, {}, False),
}


def run_check(name: str, env: DistEnv) -> dict:
    parallel, options, ref_options, per_layer = CHECKS[name]
    t0 = time.perf_counter()
    denv = DistEnv(parallel, env.rank, env.world_size, env.local_rank, env.backend, env.device)
    model, opt = build(denv, options)
    losses = train(model, opt, denv, 0, STEPS, per_layer=per_layer)
    weights = full_weights(model)
    same = bases_identical(opt)
    seconds = time.perf_counter() - t0
    result = {"bases_identical": same, "seconds": seconds}
    if options.get("gradient_as_bucket_view"):  # every stacked bucket's .grad still its slices
        stacked = [b for bs in opt._bucket_cache.values() for b in bs if len(b.params) > 1]
        result["views_kept"] = bool(stacked) and all(b.viewed() for b in stacked)
    if env.rank == 0:
        ref_model, ref_opt = build(DistEnv(), {**options, **ref_options})
        ref_losses = train(ref_model, ref_opt, DistEnv(), 0, STEPS)
        ref = full_weights(ref_model)
        result.update(max_diff=max_diff(weights, ref),
                      max_weight=max(float(w.abs().max()) for w in ref.values()),
                      final_loss=ref_losses[-1], first_loss=ref_losses[0],
                      refreshes=sum(s.get("refreshes", 0) for s in opt.state.values()))
        result["local_loss_rank0"] = losses[-1]
    dist.barrier()
    return result


def check_rangefinder(env: DistEnv) -> dict:
    """The row-sharded finder against the one-process `range_finder(G.T)`: same basis, signs
    included, on uneven row splits; orthonormal on a rank-deficient G (shifted CholQR)."""
    worst, worst_ortho = 0.0, 0.0
    gen = torch.Generator().manual_seed(0)
    for m, n, r, q in [(64, 32, 8, 1), (513, 32, 16, 1), (33, 40, 4, 2), (32, 512, 16, 0)]:
        g = torch.randn(m, n, generator=gen) * 0.9 ** torch.arange(n, dtype=torch.float32)
        ref = range_finder(g.T, r, oversample=8, power_iters=q, seed=7)
        rows = [len(part) for part in torch.arange(m).chunk(env.world_size)]
        start = sum(rows[:env.rank])
        got = sharded_range_finder(g[start:start + rows[env.rank]], r, oversample=8,
                                   power_iters=q, seed=7)
        worst = max(worst, float((got - ref).abs().max()))
    low = torch.randn(40, 3, generator=gen) @ torch.randn(3, 24, generator=gen)  # rank 3 < w
    rows = [len(part) for part in torch.arange(40).chunk(env.world_size)]
    start = sum(rows[:env.rank])
    got = sharded_range_finder(low[start:start + rows[env.rank]], 4, oversample=4, power_iters=2,
                               seed=1)
    worst_ortho = float((got.T @ got - torch.eye(4)).abs().max())
    return {"max_diff": worst, "orthonormality": worst_ortho, "bases_identical": True}


def check_errors(env: DistEnv) -> dict:
    """Unsupported FSDP2 combinations fail with a message naming the option."""
    fenv = DistEnv("fsdp2", env.rank, env.world_size, env.local_rank, env.backend, env.device)
    messages = {}
    for label, options in (("rule", {"rule": "adafactor"}), ("finishing_rule", {"rule": "lamb"})):
        try:
            model, opt = build(fenv, {"projector": "svd", **options})
            train(model, opt, fenv, 0, 1)
            messages[label] = None
        except ValueError as exc:
            messages[label] = str(exc)
    return {"messages": messages, "bases_identical": True}


# Checkpoints: FSDP2 saves at step RESUME_AT through torch.distributed.checkpoint; the
# uninterrupted run, a resume on the same ranks, one in a single process (rank 0) and one
# on 4 ranks (a second launch, `resume4`) all continue to CKPT_STEPS on the same batches.
# q8: the 512×32 MLP weights' right-side moments are 256×16 codes per rank on 2 ranks
# (blocks follow the rows), 512×16 in one process, 128×16 fp32 (< 4096) on 4 ranks.
RESUME_AT, CKPT_STEPS = 6, 12   # refits at 0 and 5 before the checkpoint, at 10 after it
CKPT = {"projector": "randomized", "residual": "fira", **MULTI}   # std: left and right sides
CKPT_Q8 = {"projector": "svd", "state_format": "q8", **MULTI}


def _schedule(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def _manager(run_dir: Path, env: DistEnv):
    from gradproj.distributed.checkpoint import DistributedCheckpointManager
    from gradproj.train.checkpoint import CheckpointManager
    return (CheckpointManager(run_dir) if env.parallel == "none"
            else DistributedCheckpointManager(run_dir, parallel=env.parallel))


def global_losses(model, opt, env: DistEnv, start: int, stop: int) -> list[float]:
    """`train`, returning each step's global-batch mean loss (comparable across world sizes)."""
    losses = []
    for step in range(start, stop):
        loss = torch.tensor(train(model, opt, env, step, step + 1), dtype=torch.float64)
        if env.parallel != "none":
            dist.all_reduce(loss)
            loss /= env.world_size
        losses.append(float(loss))
    return losses


def resumed(run_dir: Path, env: DistEnv, options: dict) -> tuple[dict, list[float]]:
    """A fresh model and optimizer loaded from run_dir's latest checkpoint, trained to CKPT_STEPS."""
    model, opt = build(env, options)
    sched = _schedule(opt)
    loaded = _manager(run_dir, env).load(model, opt, sched)
    losses = global_losses(model, opt, env, loaded.step, CKPT_STEPS)
    return full_weights(model), losses


def check_checkpoint(env: DistEnv, out: Path, options: dict, label: str) -> dict:
    t0 = time.perf_counter()
    fenv = DistEnv("fsdp2", env.rank, env.world_size, env.local_rank, env.backend, env.device)
    run_dir = out / label
    model, opt = build(fenv, options)
    train(model, opt, fenv, 0, RESUME_AT)
    _manager(run_dir, fenv).save(RESUME_AT, model, opt, _schedule(opt), {})
    losses = global_losses(model, opt, fenv, RESUME_AT, CKPT_STEPS)
    weights = full_weights(model)
    again, again_losses = resumed(run_dir, fenv, options)
    result = {"bases_identical": True, "same_world_exact": again_losses == losses
              and max_diff(again, weights) == 0.0, "losses": losses}
    denv = DistEnv("ddp", env.rank, env.world_size, env.local_rank, env.backend, env.device)
    ddp, _ = resumed(run_dir, denv, options)  # the FSDP2 checkpoint under DDP (plain tensors)
    result["ddp_diff"] = max_diff(ddp, weights)
    if env.rank == 0:
        save_file(weights, str(out / f"{label}-uninterrupted.safetensors"))
        (out / f"{label}-losses.json").write_text(json.dumps(losses))
        one, one_losses = resumed(run_dir, DistEnv(), options)
        result.update(one_process_diff=max_diff(one, weights), one_process_losses=one_losses)
    dist.barrier()
    result["seconds"] = time.perf_counter() - t0
    return result


def resume4(env: DistEnv, out: Path) -> None:
    """Resume the 2-rank checkpoint on this launch's ranks (4) and compare on rank 0."""
    fenv = DistEnv("fsdp2", env.rank, env.world_size, env.local_rank, env.backend, env.device)
    results = {}
    weights, losses = resumed(out / "checkpoint", fenv, CKPT)
    if env.rank == 0:
        reference = load_file(str(out / "checkpoint-uninterrupted.safetensors"))
        results["checkpoint"] = {"max_diff": max_diff(weights, reference), "losses": losses,
                                 "reference_losses": json.loads((out / "checkpoint-losses.json")
                                                                .read_text())}
    weights, losses = resumed(out / "checkpoint-q8", fenv, CKPT_Q8)
    if env.rank == 0:
        reference = load_file(str(out / "checkpoint-q8-uninterrupted.safetensors"))
        results["checkpoint-q8"] = {"max_diff": max_diff(weights, reference), "losses": losses,
                                    "reference_losses": json.loads(
                                        (out / "checkpoint-q8-losses.json").read_text())}
    if env.rank == 0:
        (out / "resume4.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    out = Path(sys.argv[1])
    names = (sys.argv[2].split(",") if len(sys.argv) > 2
             else [*CHECKS, "rangefinder", "errors", "checkpoint", "checkpoint-q8"])
    torch.set_num_threads(1)  # two ranks on two cores
    env = init_distributed("ddp", device="cpu")  # gloo on CPU, also on a GPU machine
    if names == ["resume4"]:
        resume4(env, out)
        shutdown()
        return
    results = {}
    special = {"rangefinder": check_rangefinder, "errors": check_errors,
               "checkpoint": lambda env: check_checkpoint(env, out, CKPT, "checkpoint"),
               "checkpoint-q8": lambda env: check_checkpoint(env, out, CKPT_Q8, "checkpoint-q8")}
    for name in names:
        try:
            results[name] = special[name](env) if name in special else run_check(name, env)
        except Exception:  # record and go on: one broken check must not hide the others
            results[name] = {"error": traceback.format_exc()}
            if env.rank == 0:
                print(results[name]["error"], file=sys.stderr, flush=True)
    if env.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
