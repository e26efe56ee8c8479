"""One zeroth-order training run under torchrun: `zo_worker.py SPEC OUT` trains SPEC with
the package's Trainer and saves this rank's final weights to OUT/rank<R>.pt."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from gradproj.distributed import unwrap
from gradproj.train.loop import Trainer
from gradproj.train.spec import load_spec

if __name__ == "__main__":
    spec, out = load_spec(sys.argv[1]), Path(sys.argv[2])
    trainer = Trainer(spec)
    trainer.run()
    weights = {k: v.detach().clone() for k, v in unwrap(trainer.model).state_dict().items()}
    torch.save({"weights": weights, "position": trainer.zo.position},
               out / f"rank{os.environ['RANK']}.pt")
