"""WeLore's non-uniform ranks vs one uniform rank share, at the same parameter count.

    python benchmarks/welore_compress.py                 # train (or reuse) two tiny models, compare
    python benchmarks/welore_compress.py --ratios 0.5    # one compression ratio
    python benchmarks/welore_compress.py --finetune 100  # then fine-tune only the factors
    python benchmarks/welore_compress.py --steps 3 --eval-batches 2 --ratios 0.5   # smoke run

Two tiny models (examples/tiny.toml, 600 steps, the default embedded data) are trained — with
the spec as written (GaLore rank 32) and with full-rank AdamW (`optimizer.lowrank.rank=128`,
lr 3e-3) — or reused when their run folder already holds the final checkpoint. For each
ratio, the targeted matrices (attn, mlp) are compressed by

  * welore: one global threshold on the normalised spectra, searched so that the matrices lose
    `ratio` of their parameters; low-rank components become rank-k factors, the rest dense;
  * uniform: every matrix factored at the same share of its rank, the smallest share whose
    factors hold at least as many parameters as WeLore's (the baseline is never smaller);

and the held-out loss of the compressed model is measured on the same 32 eval batches. A
factored matrix is evaluated as B·A, the weight `WeLoreLinear` computes with. With
`--finetune N`, each compressed model then trains only its factors for N steps (AdamW, lr
1e-3 constant) and is evaluated again. Loss differences are load-independent (a fixed
eval split, deterministic CPU math); the run time is not reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gradproj.parametrizations import welore_rank  # noqa: E402
from gradproj.parametrizations.welore import WeLoreLinear  # noqa: E402
from gradproj.train.loop import Trainer  # noqa: E402
from gradproj.train.spec import load_spec  # noqa: E402

COMMON = ["log.progress=false", "log.plot=false", "checkpoint.every=0"]
RECIPES = {
    "galore-r32 (tiny.toml)": [],
    "full-rank adamw": ["optimizer.lowrank.rank=128", "optimizer.lr=3e-3"],
}


def trained(name: str, overrides: list[str], runs: Path, steps: int,
            eval_batches: int) -> tuple[Trainer, dict]:
    """A Trainer holding the recipe's trained model (trained here unless its run exists)."""
    folder = runs / name.split(" ")[0]
    spec = load_spec(ROOT / "examples" / "tiny.toml",
                     [*COMMON, f"train.steps={steps}", f"train.eval_batches={eval_batches}",
                      *overrides, f'checkpoint.dir="{folder}"'])
    done = (folder / "checkpoints" / f"step-{steps}").is_dir()
    trainer = Trainer(spec, resume=done)
    trainer.run()  # a complete run resumes at its last step: nothing left to train
    return trainer, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def compressed_loss(trainer: Trainer, state: dict, choices: dict, finetune: int) -> tuple[float, float | None]:
    model = trainer.model
    model.load_state_dict(state)
    with torch.no_grad():
        for name, c in choices.items():
            if c.low_rank:
                b, a = welore_rank.factorize(state[f"{name}.weight"], c.kept)
                model.get_submodule(name).weight.copy_(b @ a)
    loss = trainer.evaluate()
    if not finetune:
        return loss, None
    # fine-tune the factors only: the same layers as WeLoreLinear, everything else frozen
    for name, c in choices.items():
        parent, _, child = name.rpartition(".")
        layer = WeLoreLinear(c.shape[1], c.shape[0], c.kept if c.low_rank else None, bias=False,
                             dtype=torch.float32)
        with torch.no_grad():
            if c.low_rank:
                b, a = welore_rank.factorize(state[f"{name}.weight"], c.kept)
                layer.B.copy_(b)
                layer.A.copy_(a)
            else:
                layer.weight.copy_(state[f"{name}.weight"])
        setattr(model.get_submodule(parent), child, layer)
    for p in model.parameters():
        p.requires_grad_(False)
    factors = [p for m in model.modules() if isinstance(m, WeLoreLinear) and m.low_rank
               for p in (m.B, m.A)]
    for p in factors:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(factors, lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(finetune):
        x, y = trainer.train_data.batch(trainer.step + step, 0)  # batches training never saw
        opt.zero_grad(set_to_none=True)
        model(x, y).backward()
        opt.step()
    tuned = trainer.evaluate()
    for name, c in choices.items():  # back to the dense layers for the next comparison
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child,
                torch.nn.Linear(c.shape[1], c.shape[0], bias=False))
    model.load_state_dict(state)
    return loss, tuned


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/welore-bench", help="folder of the two runs")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    parser.add_argument("--finetune", type=int, default=0, help="factor-only steps after compressing")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model")
    parser.add_argument("--eval-batches", type=int, default=32, help="held-out batches per eval")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | ratio | params kept (welore / uniform) | dense loss | welore loss (Δ) "
          "| uniform loss (Δ) | LRCs | ranks kept, welore (attn q k v o, mlp g u d, layer 0) |"
          + (" welore tuned | uniform tuned |" if args.finetune else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if args.finetune else ""))
    for name, overrides in RECIPES.items():
        trainer, state = trained(name, overrides, Path(args.runs), args.steps, args.eval_batches)
        dense = trainer.evaluate()
        names = [n.removesuffix(".weight") for n in state
                 if n.endswith(".weight") and (".attn." in n or ".mlp." in n)]
        weights = {n: state[f"{n}.weight"] for n in names}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        spectra = welore_rank.spectra(weights)
        for ratio in args.ratios:
            _, welore = welore_rank.search_threshold(spectra, shapes, ratio)
            uniform = welore_rank.uniform_choices(shapes, sum(c.params for c in welore.values()))
            wl, wt = compressed_loss(trainer, state, welore, args.finetune)
            ul, ut = compressed_loss(trainer, state, uniform, args.finetune)
            kept = ", ".join(str(welore[n].kept) if welore[n].low_rank else "dense"
                             for n in names if n.startswith("layers.0."))
            lrc = sum(c.low_rank for c in welore.values())
            row = (f"| {name} | {ratio:g} | {sum(c.params for c in welore.values())} / "
                   f"{sum(c.params for c in uniform.values())} | {dense:.4f} | {wl:.4f} "
                   f"(+{wl - dense:.4f}) | {ul:.4f} (+{ul - dense:.4f}) | {lrc}/{len(names)} | "
                   f"{kept} |")
            if args.finetune:
                row += f" {wt:.4f} | {ut:.4f} |"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
