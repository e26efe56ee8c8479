"""Sophia's curvature pass in the training loop (`[optimizer] curvature_every = k`).

After every k-th optimizer step (steps k, 2k, ...: the official script's
`iter_num % k == k − 1`) the loop runs one extra pass and calls
`opt.update_curvature` (optimizers/curvature.py), with `[optimizer] curvature_estimator`:

  "gnb" (Sophia-G): for each of the step's `grad_accum` micro-batches, logits of a fresh
      batch, labels sampled from them, (L̂ / grad_accum).backward(); then ĥ = B·ĝ⊙ĝ with
      B = every sampled label (batch_size · seq_len · grad_accum tokens, the official
      `bs = total_bs · block_size`). As the official script, ĝ is clipped at
      [train].grad_clip when that is set; a non-finite ĝ skips the update. In per-layer
      mode the stepper's hooks feed each weight's ĝ to the curvature instead of a step
      (projected and summed over micro-batches for a projected weight), so the full
      gradient never exists at once here either (and there is no clipping, as in its steps).
  "hutchinson": one micro-batch's loss on its true labels and a Rademacher probe per
      weight, Hu by double backward (normal mode only: per-layer hooks cannot run it),
      attention through SDPA's math kernel (the fused ones have no double backward).

The inputs come from their own seeded stream (the official script also draws a new batch
for it) and the labels and probes from a generator seeded by (seed, step): the pass is a
pure function of the step and the checkpointed state, so a resumed run repeats it exactly.
"""
from __future__ import annotations

import math

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..optimizers.curvature import sampled_label_loss
from .data import Batches

SEED_STRIDE = 1_000_003


def curvature_settings(opt) -> tuple[int, str | None]:
    """(k, estimator) of the optimizer's curvature rules, (0, None) without one. The spec
    sets one value for every group; a script mixing them gets the smallest k."""
    settings = {(g["curvature_every"], g["curvature_estimator"]) for g in opt.param_groups
                if opt.plugins(g)[0].uses_curvature}
    return min(settings) if settings else (0, None)


def curvature_generator(seed: int, step: int, device) -> torch.Generator:
    """The generator of the pass after optimizer step `step` (0-based) of a run seeded
    `seed`: GNB's sampled labels, Hutchinson's probes (also the HF Trainer's pass)."""
    return torch.Generator(device=device).manual_seed((seed * SEED_STRIDE + step) * 1_013 + 5)


class CurvaturePass:
    def __init__(self, opt, spec, corpus, device):
        self.every, self.estimator = curvature_settings(opt)
        t = spec.train
        self.opt, self.device, self.train = opt, device, t
        self.batch_size = t.batch_size * spec.data.seq_len * t.grad_accum  # GNB's B
        self.data = Batches(corpus.train, spec.data.seq_len, t.batch_size, t.seed + 2,
                            spec.model.vocab_size, "curvature") if self.every else None

    def due(self, steps_taken: int) -> bool:
        return bool(self.every) and steps_taken % self.every == 0

    def _generator(self, step: int, device) -> torch.Generator:
        return curvature_generator(self.train.seed, step, device)

    def run(self, model, step: int, autocast, stepper=None) -> None:
        """The pass after optimizer step `step` (0-based), on `model` (unwrapped)."""
        params = [p for g in self.opt.param_groups for p in g["params"]]
        if self.estimator == "hutchinson":
            x, y = self.data.batch(step, 0)
            # the fused attention kernels have no double backward (flash on CPU: "derivative
            # ... not implemented"); the math one, differentiated op by op, has
            with autocast(), sdpa_kernel(SDPBackend.MATH):
                loss = model(x.to(self.device), y.to(self.device))
            self.opt.update_curvature("hutchinson", loss=loss, generator=self._generator(step, "cpu"))
            self.opt.zero_grad(set_to_none=True)
            return
        gen = self._generator(step, self.device)
        k = self.train.grad_accum
        if stepper:
            stepper.begin_curvature(self.batch_size)
        for micro in range(k):
            x, _ = self.data.batch(step, micro)
            with autocast():
                logits = model.logits(x.to(self.device))
            loss, _ = sampled_label_loss(logits, generator=gen)
            if stepper:
                stepper.begin_micro_batch(micro)
            (loss / k).backward()
        if stepper:
            stepper.end_curvature()
            return
        grads = [p.grad for p in params if p.grad is not None]
        if self.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        if math.isfinite(float(norm)):
            self.opt.update_curvature("gnb", batch_size=self.batch_size)
        self.opt.zero_grad(set_to_none=True)
