"""Per-layer mode under DDP, run by `torchrun --nproc_per_node=2 worker_perlayer.py OUT`.

One process group for every check. Each check trains the tiny model of `harness.py` in
per-layer mode under DDP (`DDPPerLayerStepper`) and, on rank 0, the same model in one
process with `PerLayerStepper` on the same global micro-batches; the memory check
measures the peak gradient bytes of per-layer DDP against plain DDP on the same model.
Rank 0 writes OUT/results.json; test_perlayer_ddp.py asserts.
"""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import BASE, CONFIG, GLOBAL_BATCH, SEQ, bases_identical, full_weights, max_diff  # noqa: E402

import gradproj as gp  # noqa: E402
from gradproj.distributed import DistEnv, distribute_optimizer, init_distributed, shutdown  # noqa: E402
from gradproj.distributed.perlayer import DDPPerLayerStepper, replicate  # noqa: E402
from gradproj.train.model import build_model, model_config  # noqa: E402
from gradproj.train.perlayer import PerLayerStepper  # noqa: E402

MULTI = {"update_gap": 5, "moments": "rotate"}  # refits at steps 0, 5, 10 (worker.py: why rotate)
CHECKS = {  # name: (options, grad_accum, steps)
    "per-layer": ({"projector": "randomized", **MULTI}, 1, 12),
    "per-layer-accum4": ({"projector": "randomized", **MULTI}, 4, 8),   # projected sums
    "per-layer-accum4-fira": ({"projector": "svd", "residual": "fira", **MULTI}, 4, 8),  # full G
}
SMALL_BUCKET = 64 * 1024  # one 512×32 fp32 MLP weight: several buckets on the tiny model


def micro_batch(step: int, micro: int, env) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5000 + 16 * step + micro)
    tokens = torch.randint(0, CONFIG["vocab_size"], (GLOBAL_BATCH, SEQ + 1), generator=gen)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if env.parallel == "none":
        return x, y
    rows = GLOBAL_BATCH // env.world_size
    part = slice(env.rank * rows, (env.rank + 1) * rows)
    return x[part], y[part]


def build(env, options: dict, wrap=None):
    model = build_model(model_config(**CONFIG), seed=0)
    model = replicate(model) if wrap is None and env.parallel == "ddp" else (wrap or (lambda m: m))(model)
    module = model.module if isinstance(model, DistributedDataParallel) else model
    opt = gp.build_optimizer(module, None, targets=("attn", "mlp"), **{**BASE, **options})
    return model, distribute_optimizer(opt, env.parallel)


def mean(value: float, env) -> float:
    if env.parallel == "none":
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


def train_per_layer(model, stepper, env, steps: int, k: int) -> tuple[list[float], dict]:
    """Per-layer training; returns the global-batch losses and the largest peaks seen."""
    losses, peaks = [], {"grad": 0, "bucket": 0, "accum": 0, "left_after_step": 0}
    for step in range(steps):
        stepper.reset_peak()
        total = 0.0
        for micro in range(k):
            x, y = micro_batch(step, micro, env)
            loss = model(x, y)
            total += mean(loss.item(), env) / k
            stepper.begin_micro_batch(micro)
            (loss / k).backward()
        assert not stepper.end_step(), "a step was skipped"
        stepper.opt.step()  # as the Trainer does: a no-op, every weight stepped in backward
        losses.append(total)
        peaks["grad"] = max(peaks["grad"], stepper.grad_peak_bytes)
        peaks["bucket"] = max(peaks["bucket"], getattr(stepper, "bucket_peak_bytes", 0))
        peaks["accum"] = max(peaks["accum"], stepper.accum_peak_bytes)
        left = sum(p.grad.numel() * p.grad.element_size() for p in stepper.group_index
                   if p.grad is not None) + getattr(stepper, "bucket_bytes", 0)
        peaks["left_after_step"] = max(peaks["left_after_step"], left)
    return losses, peaks


def run_check(name: str, env: DistEnv) -> dict:
    options, k, steps = CHECKS[name]
    t0 = time.perf_counter()
    model, opt = build(env, options)
    stepper = DDPPerLayerStepper(opt, k, module=model)
    losses, peaks = train_per_layer(model, stepper, env, steps, k)
    stepper.remove()
    result = {"bases_identical": bases_identical(opt), "seconds": time.perf_counter() - t0,
              "peaks": peaks}
    if env.rank == 0:
        one = DistEnv()
        ref_model, ref_opt = build(one, options)
        ref_stepper = PerLayerStepper(ref_opt, k)
        ref_losses, _ = train_per_layer(ref_model, ref_stepper, one, steps, k)
        ref = full_weights(ref_model)
        result.update(max_diff=max_diff(full_weights(model), ref),
                      max_loss_diff=max(abs(a - b) for a, b in zip(losses, ref_losses)),
                      losses=losses, ref_losses=ref_losses,
                      refreshes=sum(s.get("refreshes", 0) for s in opt.state.values()))
    dist.barrier()
    return result


def check_memory(env: DistEnv) -> dict:
    """Peak gradient bytes per rank: per-layer DDP (64 KiB buckets) vs plain DDP."""
    options = {"projector": "randomized", **MULTI}
    model, opt = build(env, options)
    stepper = DDPPerLayerStepper(opt, 1, module=model, bucket_cap_bytes=SMALL_BUCKET,
                                 first_bucket_bytes=SMALL_BUCKET)
    _, peaks = train_per_layer(model, stepper, env, 3, 1)
    stepper.remove()
    _, peaks4 = train_per_layer(model, DDPPerLayerStepper(opt, 4, module=model, bucket_cap_bytes=SMALL_BUCKET,
                                                           first_bucket_bytes=SMALL_BUCKET),
                                env, 3, 4)
    cap_mb = SMALL_BUCKET / 2**20
    ddp, ddp_opt = build(env, options, wrap=lambda m: DistributedDataParallel(
        m, bucket_cap_mb=cap_mb))
    plain = 0
    for step in range(3):  # DDP rebuilds its buckets after the first step
        x, y = micro_batch(step, 0, env)
        ddp(x, y).backward()
        grads = sum(p.grad.numel() * p.grad.element_size() for p in ddp.parameters())
        buckets = sum(int(s) for s in str(ddp._get_ddp_logging_data()["bucket_sizes"]).split(","))
        plain = max(plain, grads + buckets)
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)
    return {"per_layer": peaks, "per_layer_accum4": peaks4, "plain_ddp": plain,
            "plain_ddp_buckets": buckets, "bases_identical": True}


def check_int8(env: DistEnv) -> dict:
    """q-galore's INT8 weights (their layer's backward writes `.grad`; DDP's reducer never
    sees them, as they do not require grad): per-layer DDP reduces them like any other, so
    every weight stays bitwise the same on both ranks (unreduced, the ranks' gradients
    differ from the first step)."""
    from gradproj.quant.linear import is_quantized
    model = replicate(build_model(model_config("tiny", n_layers=1), seed=0))
    opt = distribute_optimizer(gp.build_optimizer(model, "q-galore", rank=32), "ddp")
    stepper = DDPPerLayerStepper(opt, 2, module=model)
    vocab = model_config("tiny").vocab_size
    for step in range(3):
        for micro in range(2):
            gen = torch.Generator().manual_seed(100 * env.rank + 10 * step + micro)
            x = torch.randint(0, vocab, (2, 16), generator=gen)
            stepper.begin_micro_batch(micro)
            (model(x, x) / 2).backward()
        stepper.end_step()
    stepper.remove()
    same = True
    for p in model.parameters():
        parts = [torch.empty_like(p) for _ in range(env.world_size)]
        dist.all_gather(parts, p.detach().contiguous())
        same &= all(torch.equal(parts[0], part) for part in parts)
    return {"int8_weights": sum(is_quantized(p) for p in model.parameters()),
            "weights_identical": bool(same), "bases_identical": bases_identical(opt)}


def check_int8_plain_ddp(env: DistEnv) -> dict:
    """The same under plain DDP: the reducer skips the INT8 weights (requires_grad False),
    so `RunContext.average_unreduced_grads` averages them; without it the ranks' weights
    part at the first step."""
    from gradproj.distributed.run import RunContext
    ctx = RunContext(env)
    bare = build_model(model_config("tiny", n_layers=1), seed=0)
    opt = ctx.optimizer(gp.build_optimizer(bare, "q-galore", rank=32))  # quantizes, then DDP
    model = ctx.wrap(bare)
    params = [p for g in opt.param_groups for p in g["params"]]
    vocab = model_config("tiny").vocab_size
    for step in range(3):
        gen = torch.Generator().manual_seed(100 * env.rank + 10 * step)
        x = torch.randint(0, vocab, (2, 16), generator=gen)
        model(x, x).backward()
        ctx.average_unreduced_grads(params)
        opt.step()
        opt.zero_grad(set_to_none=True)
    same = True
    for p in ctx.module(model).parameters():
        parts = [torch.empty_like(p) for _ in range(env.world_size)]
        dist.all_gather(parts, p.detach().contiguous())
        same &= all(torch.equal(parts[0], part) for part in parts)
    return {"weights_identical": bool(same), "bases_identical": bases_identical(opt)}


SPEC = """
[model]
preset = "tiny"
dim = 32
n_layers = 2
n_heads = 2
ffn_dim = 64

[data]
seq_len = 32

[optimizer]
lr = 1e-2

[optimizer.lowrank]
rank = 8
update_gap = 2
moments = "rotate"

[train]
steps = 4
batch_size = 4
threads = 1
eval_batches = 1
warmup_steps = 1
parallel = "ddp"
device = "cpu"

[checkpoint]
dir = "{run_dir}"
every = 0

[log]
every = 1
progress = false
plot = false
"""


def check_trainer(env: DistEnv, out: Path) -> dict:
    """`gradproj train` under DDP: per_layer = true against the same spec in normal mode,
    which it equals up to fp32 rounding (one micro-batch: the same steps, in another order)."""
    from gradproj.train.loop import Trainer
    from gradproj.train.spec import load_spec
    path = out / "spec.toml"
    if env.rank == 0:
        path.write_text(SPEC)
    dist.barrier()
    results = {}
    for name, sets in (("normal", []), ("per_layer", ["train.per_layer=true"])):
        run_dir = out / f"run-{name}"
        spec = load_spec(path, [f'checkpoint.dir="{run_dir}"', *sets])
        trainer = Trainer(spec)
        trainer.dist.close = lambda: None  # keep the process group for the next run
        summary = trainer.run()
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = {"losses": [r["loss/train"] for r in records if "loss/train" in r],
                         "grad_peak_mib": max(r.get("memory/grad_peak(MiB)", 0) for r in records),
                         "final_eval": summary["final_eval_loss"]}
    return {**results, "bases_identical": True}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)  # two ranks on two cores
    env = init_distributed("ddp", device="cpu")
    results = {}
    special = {"memory": check_memory, "int8": check_int8, "int8_plain": check_int8_plain_ddp,
               "trainer": lambda env: check_trainer(env, out)}
    for name in [*CHECKS, *special]:
        try:
            results[name] = special[name](env) if name in special else run_check(name, env)
        except Exception:  # record and go on: one broken check must not hide the others
            results[name] = {"error": traceback.format_exc()}
            print(results[name]["error"], file=sys.stderr, flush=True)
    if env.rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    shutdown()


if __name__ == "__main__":
    main()
