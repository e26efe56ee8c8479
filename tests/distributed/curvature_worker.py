"""One Sophia run under torchrun: `curvature_worker.py SPEC OUT` trains SPEC with the
package's Trainer and saves, per rank, OUT/rank<R>.pt: the final weights and curvature,
and for each curvature pass the weights it ran on and every state tensor right after it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gradproj.distributed import unwrap
from gradproj.train.curvature import CurvaturePass
from gradproj.train.loop import Trainer
from gradproj.train.spec import load_spec


def tensors(trainer) -> dict:
    names = {p: n for n, p in unwrap(trainer.model).named_parameters()}
    return {names[p]: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
            for p, s in trainer.opt.state.items()}


if __name__ == "__main__":
    spec, out = load_spec(sys.argv[1]), Path(sys.argv[2])
    trainer = Trainer(spec)
    passes = []
    original = CurvaturePass.run

    def recording(self, model, step, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        original(self, model, step, *args, **kwargs)
        passes.append({"step": step, "weights": before, "state": tensors(trainer)})

    CurvaturePass.run = recording
    trainer.run()
    weights = {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items()}
    torch.save({"weights": weights, "state": tensors(trainer), "passes": passes},
               out / f"rank{os.environ['RANK']}.pt")
