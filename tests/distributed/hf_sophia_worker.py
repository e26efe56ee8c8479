"""Sophia through GradprojTrainer under torchrun: `hf_sophia_worker.py OUT` trains the tiny
LLaMA of tests/integrations for 3 steps (curvature pass after step 3) and saves, per rank,
OUT/rank<R>.pt: the weights the pass ran on, that step's inputs, and every state tensor."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from test_hf_trainer import Arithmetic, args, tiny_llama  # noqa: E402

from gradproj.integrations.transformers import GradprojTrainer  # noqa: E402

SOPHIA = "preset=sophia,rank=8,update_proj_gap=5,curvature_every=3"


class Snapshot(transformers.TrainerCallback):
    """Before the curvature callback (added after the user's) runs the pass of step 3."""

    def __init__(self):
        self.trainer, self.taken = None, None

    def on_step_end(self, args, state, control, model=None, **_):
        if state.global_step == 3:
            self.taken = (copy.deepcopy(model.state_dict()),
                          [x["input_ids"].clone() for x in self.trainer.curvature.window])


if __name__ == "__main__":
    out = Path(sys.argv[1])
    snap = Snapshot()
    trainer = GradprojTrainer(model=tiny_llama(), train_dataset=Arithmetic(), callbacks=[snap],
                              args=args(out / "run", optim_args=SOPHIA, steps=3,
                                        per_device_train_batch_size=2, ddp_backend="gloo"))
    snap.trainer = trainer
    trainer.train()
    opt = trainer.gradproj_optimizer
    names = {p: n for n, p in trainer.model.named_parameters()}
    state = {names[p]: {k: v for k, v in s.items() if torch.is_tensor(v)}
             for p, s in opt.state.items()}
    weights, window = snap.taken
    final = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"before": weights, "window": window, "state": state, "final": final},
               out / f"rank{os.environ['RANK']}.pt")
