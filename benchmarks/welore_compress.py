"""WeLore's non-uniform ranks vs one uniform rank share, at the same parameter count.

    python benchmarks/welore_compress.py                 # train (or reuse) two tiny models, compare
    python benchmarks/welore_compress.py --ratios 0.5    # one compression ratio
    python benchmarks/welore_compress.py --finetune 100  # then fine-tune (LRCs; LRCs + N-LRCs)
    python benchmarks/welore_compress.py --ratios 0.5 --by-type   # where the loss comes from
    python benchmarks/welore_compress.py --steps 3 --eval-batches 2 --ratios 0.5   # smoke run

Two tiny models (examples/tiny.toml, 600 steps, the default embedded data) are trained — with
the spec as written (GaLore rank 32) and with full-rank AdamW (`optimizer.lowrank.rank=128`,
lr 3e-3) — or reused when their run folder already holds the final checkpoint. For each
ratio, the targeted matrices (attn, mlp) are compressed three ways, each against its own
uniform baseline:

  * params, LRC rule min_ratio 0 (the issue's claim): one global threshold on the normalised
    spectra, searched so that the matrices lose `ratio` of their *parameters*; a matrix
    becomes rank-k factors when that saves parameters (k(m + n) < m·n), else stays dense —
    the reference's compression script (welore_rank_reduction.py) runs with --min_ratio 0.0;
  * params, min_ratio 0.4999: the same with the reference fine-tuning script's LRC rule
    (a matrix is factored only when it loses more than half its rank) — `gradproj compress`;
  * rank (the reference's accounting): the threshold reaches `ratio` of the summed *ranks*,
    every matrix with a pruned rank is factored (min_ratio 0.0), uniform prunes
    int(ratio · r) of every matrix's rank (its uniform_rank_pruning) — what the paper's
    "x % rank reduction" tables compare; parameters saved are far fewer (a square matrix at
    half its rank holds as many parameters as factors as dense);

the parameter-accounted uniform baseline keeps every matrix at rank k or k + 1 so it holds
at least WeLore's parameters and less than one rank step (m + n) more. The held-out loss of
the compressed model is measured on the same 32 eval batches; a factored matrix is
evaluated as B·A, the weight `WeLoreLinear` computes with. With `--finetune N`, the
min_ratio 0.4999 split then trains for N steps (AdamW, lr 1e-3 constant, batches training
never saw): WeLore's factors only (its recipe), WeLore's factors and dense matrices (the
paper's "full fine-tuning" of the compressed model, which its LRC-only fine-tuning is
claimed to match), and the uniform model's factors. Loss differences are load-independent
(a fixed eval split, deterministic CPU math); the run time is not reported.
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


def compressed_loss(trainer: Trainer, state: dict, choices: dict) -> float:
    """Held-out loss with every factored matrix replaced by its rank-k B·A."""
    model = trainer.model
    model.load_state_dict(state)
    with torch.no_grad():
        for name, c in choices.items():
            if c.low_rank:
                b, a = welore_rank.factorize(state[f"{name}.weight"], c.kept)
                model.get_submodule(name).weight.copy_(b @ a)
    return trainer.evaluate()


def tuned_loss(trainer: Trainer, state: dict, choices: dict, steps: int,
               train_dense: bool) -> tuple[float, int]:
    """Held-out loss after `steps` AdamW steps on the factors (and, with `train_dense`, the
    dense matrices too) of the compressed model as `WeLoreLinear` layers; everything else
    frozen. Returns the loss and the number of trained parameters."""
    model = trainer.model
    model.load_state_dict(state)
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
    trained_params = [p for m in model.modules() if isinstance(m, WeLoreLinear)
                      for p in ((m.B, m.A) if m.low_rank else (m.weight,) if train_dense else ())]
    for p in trained_params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(trained_params, lr=1e-3, weight_decay=0.0)
    model.train()
    for step in range(steps):
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
    return tuned, sum(p.numel() for p in trained_params)


def type_rows(trainer: Trainer, state: dict, model: str, ratio: float, dense: float,
              spectra: dict, shapes: dict) -> list[str]:
    """Where the loss comes from: each matrix type (q_proj, ..., down_proj) compressed alone."""
    _, welore = welore_rank.search_threshold(spectra, shapes, ratio, 0.0)
    uniform = welore_rank.matched_uniform(shapes, params(welore))
    rows = []
    for kind in dict.fromkeys(n.rsplit(".", 1)[1] for n in shapes):
        sel = [n for n in shapes if n.endswith("." + kind)]
        full = sum(shapes[n][0] * shapes[n][1] for n in sel)
        w = {n: welore[n] for n in sel}
        u = {n: uniform[n] for n in sel}
        wl, ul = compressed_loss(trainer, state, w), compressed_loss(trainer, state, u)
        kept = ", ".join(str(c.kept) if c.low_rank else "dense" for c in w.values())
        rows.append(f"| {model} | {ratio:g} | {kind} | {kept} | {full - params(w)} / "
                    f"{full - params(u)} | {wl - dense:+.4f} | {ul - dense:+.4f} |")
    return rows


def rank_uniform(shapes: dict, ratio: float) -> dict:
    """The reference's uniform_rank_pruning: int(ratio · r) of every matrix's rank pruned."""
    return {n: welore_rank.Choice(shape=s, kept=min(s) - int(ratio * min(s)), low_rank=True)
            for n, s in shapes.items()}


def params(choices: dict) -> int:
    return sum(c.params for c in choices.values())


def ranks(choices: dict) -> int:
    return sum(c.kept for c in choices.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="runs/welore-bench", help="folder of the two runs")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.6])
    parser.add_argument("--finetune", type=int, default=0,
                        help="steps of fine-tuning after compressing (min_ratio 0.4999 split)")
    parser.add_argument("--steps", type=int, default=600, help="training steps of each model")
    parser.add_argument("--eval-batches", type=int, default=32, help="held-out batches per eval")
    parser.add_argument("--by-type", action="store_true",
                        help="also: each matrix type compressed alone (params, min_ratio 0)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | ratio | accounting (LRC rule) | threshold | params kept (welore / uniform) "
          "| rank kept (welore / uniform) | dense loss | welore loss (Δ) | uniform loss (Δ) | LRCs "
          "| ranks kept, welore (attn q k v o, mlp g u d, layer 0) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    tuned_rows, by_type = [], []
    for name, overrides in RECIPES.items():
        trainer, state = trained(name, overrides, Path(args.runs), args.steps, args.eval_batches)
        dense = trainer.evaluate()
        names = [n.removesuffix(".weight") for n in state
                 if n.endswith(".weight") and (".attn." in n or ".mlp." in n)]
        weights = {n: state[f"{n}.weight"] for n in names}
        shapes = {n: tuple(w.shape) for n, w in weights.items()}
        spectra = welore_rank.spectra(weights)
        for ratio in args.ratios:
            if args.by_type:
                by_type.extend(type_rows(trainer, state, name, ratio, dense, spectra, shapes))
            cases = []
            for label, min_ratio in (("params (min_ratio 0)", 0.0),
                                     ("params (min_ratio 0.4999)", welore_rank.MIN_RATIO)):
                t, welore = welore_rank.search_threshold(spectra, shapes, ratio, min_ratio)
                cases.append((label, t, welore, welore_rank.matched_uniform(shapes, params(welore))))
            t, welore = welore_rank.rank_reduction_choices(spectra, shapes, ratio)
            cases.append(("rank (reference, min_ratio 0)", t, welore, rank_uniform(shapes, ratio)))
            for label, t, welore, uniform in cases:
                wl = compressed_loss(trainer, state, welore)
                ul = compressed_loss(trainer, state, uniform)
                kept = ", ".join(str(welore[n].kept) if welore[n].low_rank else "dense"
                                 for n in names if n.startswith("layers.0."))
                lrc = sum(c.low_rank for c in welore.values())
                print(f"| {name} | {ratio:g} | {label} | {t:.4f} | {params(welore)} / "
                      f"{params(uniform)} | {ranks(welore)} / {ranks(uniform)} | {dense:.4f} | "
                      f"{wl:.4f} ({wl - dense:+.4f}) | {ul:.4f} ({ul - dense:+.4f}) | "
                      f"{lrc}/{len(names)} | {kept} |", flush=True)
                if args.finetune and min_ratio and label.endswith("0.4999)"):
                    lrc_only, n_lrc = tuned_loss(trainer, state, welore, args.finetune, False)
                    both, n_both = tuned_loss(trainer, state, welore, args.finetune, True)
                    uni, n_uni = tuned_loss(trainer, state, uniform, args.finetune, True)
                    tuned_rows.append(f"| {name} | {ratio:g} | {dense:.4f} | {wl:.4f} | "
                                      f"{lrc_only:.4f} ({n_lrc}) | {both:.4f} ({n_both}) | "
                                      f"{ul:.4f} | {uni:.4f} ({n_uni}) |")
    if by_type:
        print("\nOne matrix type compressed at a time, the rest dense (the choices of the "
              "params / min_ratio 0 row and its matched uniform baseline):\n")
        print("| model | ratio | type | welore ranks kept (layers 0-3) | params saved (welore / "
              "uniform) | welore Δ loss | uniform Δ loss |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(by_type))
    if tuned_rows:
        print(f"\nAfter {args.finetune} fine-tuning steps (min_ratio 0.4999 split; trained "
              "parameters in brackets):\n")
        print("| model | ratio | dense loss | welore compressed | welore, factors only (LRCs) "
              "| welore, factors + dense (LRCs + N-LRCs) | uniform compressed | uniform, factors |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(tuned_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
