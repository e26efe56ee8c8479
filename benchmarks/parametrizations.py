"""Weight-side methods on the default data (embedded byte-level corpus, tiny LLaMA 0.86M):

  A. LoRA-GA vs plain LoRA: pre-train the tiny model briefly with AdamW, then fine-tune it
     (continuing on the training stream) with each adapter, same rank, steps, batches and
     lr grid; final eval loss per lr. LoRA-GA's init costs `batches` extra forward/backward
     passes (counted in its row).
  B. SLTrain vs pure low-rank B·A at equal trainable parameters, pre-training the tiny
     model from scratch: SLTrain rank r with δ = 0.03, low rank r' (density 0) with r'
     chosen so that the trainable counts match as closely as an integer rank allows.

    python benchmarks/parametrizations.py              # A: 150 + 50 steps, B: 200 steps (~25 min here)
    python benchmarks/parametrizations.py --quick      # a few steps each (~5 min here)
    python benchmarks/parametrizations.py --smoke      # 2-step runs: that the script runs

Both are small and CPU-sized (one thread); figures are end-of-run eval losses on 8
held-out batches, one seed — a difference smaller than the seed-to-seed spread of
benchmarks/convergence.py (~0.01 nats at 2000 steps) is not a result.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import gradproj as gp
from gradproj.parametrizations import initialize_parametrization
from gradproj.train.data import Batches, load_embedded
from gradproj.train.model import MODEL_PRESETS, build_model

SEQ, BATCH, EVAL_BATCHES = 128, 8, 8


def data(seed: int = 0):
    corpus = load_embedded()
    vocab = MODEL_PRESETS["tiny"].vocab_size
    return (Batches(corpus.train, SEQ, BATCH, seed, vocab, "train"),
            Batches(corpus.eval, SEQ, BATCH, seed + 1, vocab, "eval"))


@torch.no_grad()
def evaluate(model, eval_data, batches: int | None = None) -> float:
    batches = batches or EVAL_BATCHES
    return sum(model(*eval_data.batch(i)).item() for i in range(batches)) / batches


def train(model, opt, train_data, steps: range, lr: float) -> None:
    total = len(steps)
    for k, s in enumerate(steps):  # linear warmup 10 %, cosine to 10 %
        warm = max(1, total // 10)
        f = (k + 1) / warm if k < warm else 0.1 + 0.9 * 0.5 * (1 + torch.cos(
            torch.tensor(torch.pi * (k - warm) / max(1, total - warm - 1))).item())
        for g in opt.param_groups:
            g["lr"] = lr * f
        opt.zero_grad(set_to_none=True)
        model(*train_data.batch(s)).backward()
        opt.step()


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_vs_lora_ga(pre_steps: int, ft_steps: int, lrs, rank: int) -> dict:
    train_data, eval_data = data()
    base = build_model(MODEL_PRESETS["tiny"], seed=0)
    opt = gp.build_optimizer(base, targets=("(none)",), lr=3e-3, weight_decay=0.0)  # AdamW
    train(base, opt, train_data, range(pre_steps), 3e-3)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {"pretrained_eval": evaluate(base, eval_data), "runs": []}
    later = range(pre_steps, pre_steps + ft_steps)  # fine-tune on batches not yet seen
    for kind in ("lora", "lora-ga"):
        for lr in lrs:
            model = build_model(MODEL_PRESETS["tiny"], seed=0)
            model.load_state_dict(state)
            table = {"kind": kind, "rank": rank, "alpha": 2.0 * rank}
            t0 = time.perf_counter()
            opt = gp.build_optimizer(model, parametrization=table, lr=lr, weight_decay=0.0)
            initialize_parametrization(model, table, lambda i: model(*train_data.batch(later[0] + i)))
            train(model, opt, train_data, later, lr)
            out["runs"].append({"kind": kind, "lr": lr, "eval": evaluate(model, eval_data),
                                "trainable": trainable(model), "seconds": time.perf_counter() - t0})
            print(json.dumps(out["runs"][-1]), flush=True)
    return out


def sltrain_vs_low_rank(steps: int, rank: int, lr: float) -> dict:
    train_data, eval_data = data()
    shapes = [(m.out_features, m.in_features) for n, m in build_model(MODEL_PRESETS["tiny"], device="meta")
              .named_modules() if type(m) is torch.nn.Linear and any(t in n for t in ("attn", "mlp"))]
    sparse = sum(int(0.03 * m * n) for m, n in shapes)
    edges = sum(m + n for m, n in shapes)
    low_rank = rank + round(sparse / edges)  # r'(m+n) ≈ r(m+n) + δmn, summed over layers
    out = {"runs": []}
    for name, table in (("sltrain", {"kind": "sltrain", "rank": rank, "density": 0.03}),
                        ("low-rank", {"kind": "sltrain", "rank": low_rank, "density": 0.0})):
        model = build_model(MODEL_PRESETS["tiny"], seed=0)
        t0 = time.perf_counter()
        opt = gp.build_optimizer(model, parametrization={**table, "alpha": 32.0 * table["rank"] / 128},
                                 lr=lr, weight_decay=0.0)
        train(model, opt, train_data, range(steps), lr)
        out["runs"].append({"name": name, "rank": table["rank"], "density": table["density"],
                            "eval": evaluate(model, eval_data), "trainable": trainable(model),
                            "seconds": time.perf_counter() - t0})
        print(json.dumps(out["runs"][-1]), flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2-step runs, one lr (the test suite's)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    global EVAL_BATCHES
    pre, ft, sl = (2, 1, 2) if args.smoke else (20, 10, 20) if args.quick else (150, 50, 200)
    lrs = (1e-3,) if args.smoke else (1e-3, 3e-3)
    EVAL_BATCHES = 1 if args.smoke else EVAL_BATCHES
    result = {"lora_vs_lora_ga": lora_vs_lora_ga(pre, ft, lrs, rank=8),
              "sltrain_vs_low_rank": sltrain_vs_low_rank(sl, rank=32, lr=3e-3)}
    a = result["lora_vs_lora_ga"]
    print(f"\nA. fine-tuning after {pre} AdamW steps (eval {a['pretrained_eval']:.4f}), {ft} steps, r 8:")
    for run in a["runs"]:
        print(f"  {run['kind']:8s} lr {run['lr']:.0e}: eval {run['eval']:.4f}  "
              f"({run['trainable']} trainable, {run['seconds']:.0f} s)")
    print(f"\nB. pre-training {sl} steps, lr 3e-3:")
    for run in result["sltrain_vs_low_rank"]["runs"]:
        print(f"  {run['name']:8s} r {run['rank']} δ {run['density']}: eval {run['eval']:.4f}  "
              f"({run['trainable']} trainable, {run['seconds']:.0f} s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
