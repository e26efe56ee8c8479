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

Under DDP (GNB, normal mode) each rank takes its rows of the global curvature batch, as
its training steps do, samples their labels from a generator of its own (seeded by
(seed, step, rank): one shared stream would draw the ranks' labels from the same uniforms,
correlating them, and E[B·ĝ⊙ĝ] is the Gauss-Newton diagonal only for independent labels),
back-propagates on the unwrapped model and averages ĝ over the ranks with one flat
all-reduce: every rank then feeds the same ĥ = B·ĝ⊙ĝ, B the global batch's labels, and the
ranks stay identical. It is GNB on the global batch, as the official script's DDP run
(whose backward all-reduces); the labels differ from one process's draw, so a 2-rank run
matches one process in distribution, not bit for bit. The all-reduce moves every weight's
gradient once per k steps (a training step's traffic, 1/k of it over the run). Averaging
the ranks' own ĥ_r = B_r·ĝ_r⊙ĝ_r instead would move only the moments' (projected) size and
is unbiased too, with fewer of GNB's zero-mean cross terms g_b·g_b' (b ≠ b'), but its
variance would then depend on the number of ranks; here it is one process's at any N.
Per-layer mode, Hutchinson and FSDP2 stay single-process (spec errors).
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


def curvature_generator(seed: int, step: int, device, rank: int = 0) -> torch.Generator:
    """The generator of the pass after optimizer step `step` (0-based) of a run seeded
    `seed`, on DDP rank `rank`: GNB's sampled labels, Hutchinson's probes (also the HF
    Trainer's pass). 1013 is prime, so no (step, rank < 1013) pair shares a seed."""
    return torch.Generator(device=device).manual_seed(
        (seed * SEED_STRIDE + step) * 1_013 + 5 + 7 * rank)


class CurvaturePass:
    def __init__(self, opt, spec, corpus, device, dist=None):
        self.every, self.estimator = curvature_settings(opt)
        self.dist = dist  # the loop's RunContext: this rank's rows, the gradient average
        t = spec.train
        self.opt, self.device, self.train = opt, device, t
        self.batch_size = t.batch_size * spec.data.seq_len * t.grad_accum  # GNB's B
        self.data = Batches(corpus.train, spec.data.seq_len, t.batch_size, t.seed + 2,
                            spec.model.vocab_size, "curvature") if self.every else None

    def due(self, steps_taken: int) -> bool:
        return bool(self.every) and steps_taken % self.every == 0

    def _generator(self, step: int, device) -> torch.Generator:
        return curvature_generator(self.train.seed, step, device,
                                   self.dist.rank if self.dist else 0)

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
            x, y = self.data.batch(step, micro)
            if self.dist:
                x, _ = self.dist.shard(x, y)  # this rank's rows of the global batch
            with autocast():
                logits = model.logits(x.to(self.device))
            loss, _ = sampled_label_loss(logits, generator=gen)
            if stepper:
                stepper.begin_micro_batch(micro)
            (loss / k).backward()
        if stepper:
            stepper.end_curvature()
            return
        if self.dist:
            self.dist.average_grads(params)  # ĝ of the global batch on every rank
        grads = [p.grad for p in params if p.grad is not None]
        if self.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads)
        if math.isfinite(float(norm)):
            self.opt.update_curvature("gnb", batch_size=self.batch_size)
        self.opt.zero_grad(set_to_none=True)
