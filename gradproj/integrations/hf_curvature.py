"""Sophia's curvature pass inside Hugging Face's Trainer (`GradprojTrainer` adds it).

As in the TOML loop (train/curvature.py): after every k-th optimizer step (the group's
`curvature_every`, 10 in the `sophia` preset: after steps k, 2k, ...) one extra pass feeds
`opt.update_curvature`, with the group's `curvature_estimator`:

  "gnb" (Sophia-G, the default): logits of the micro-batches of the step just taken,
      labels sampled from them, Σ_i (n_i/B)·L̂_i back-propagated (n_i the tokens of
      micro-batch i with attention_mask 1, B = Σ n_i, so ĝ is the gradient of the mean
      over all B sampled labels), then ĥ = B·ĝ⊙ĝ. ĝ is clipped at `max_grad_norm` when
      that is > 0, as the official script clips it at its grad_clip; a non-finite ĝ
      skips the update. In per-layer mode (`*_layerwise`) the stepper's hooks feed each
      weight's ĝ to the curvature instead of a step (no clipping, as in its steps).
  "hutchinson": the first micro-batch's loss on its labels and a Rademacher probe per
      weight, attention through SDPA's math kernel (normal mode, one process).

Under DDP (GNB, normal mode) each rank runs the pass on its own micro-batches with labels
from a generator of its own, scales each loss by n_i over the global B (one all-reduce of
the token count) and sums ĝ over the ranks (one flat all-reduce): every rank feeds the
same ĥ, GNB on the global batch, as the TOML loop does (train/curvature.py says why).

Our loop draws a fresh batch from a stream of its own; the Trainer's data pipeline has no
second stream to draw from without moving its sampler or the global RNG, so the pass reuses
the step's own inputs (held for that one step: token ids, a few kB). GNB's labels are
sampled from the model, so ĝ is not the step's gradient even on the same inputs. Labels
and probes come from a generator seeded by (args.seed, step), and the pass runs in
`on_step_end`, before the Trainer saves that step's checkpoint, so a resumed run repeats
it exactly.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..optimizers.curvature import sampled_label_loss
from ..train.curvature import curvature_generator, curvature_settings


class CurvatureCallback(transformers.TrainerCallback):
    """Runs the pass for a `GradprojTrainer` (module docstring); the trainer hands it each
    micro-batch's inputs (`record`) and its optimizer."""

    def __init__(self, trainer: "transformers.Trainer"):
        self.trainer = trainer
        self.window: list[dict] = []   # the inputs of the current optimizer step
        self.closed = True             # the last micro-batch of the window was recorded

    def settings(self) -> tuple[int, str | None]:
        opt = self.trainer.gradproj_optimizer
        return curvature_settings(opt) if opt is not None else (0, None)

    def record(self, inputs: dict, last: bool) -> None:
        if self.closed:
            self.window = []
        self.window.append(inputs)
        self.closed = last

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every, estimator = self.settings()
        if not every or state.global_step % every or not self.window:
            return
        window, self.window = self.window, []
        step = state.global_step - 1  # 0-based, as the TOML loop's pass
        if estimator == "hutchinson":
            self._hutchinson(model, window[0], step)
        else:
            self._gnb(model, window, step)

    def _feed(self, inputs: dict) -> dict:
        device = self.trainer.args.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}

    def _gnb(self, model, window: list[dict], step: int) -> None:
        trainer, opt = self.trainer, self.trainer.gradproj_optimizer
        feeds = [{k: v for k, v in self._feed(x).items() if k != "labels"} for x in window]
        counts = [_tokens(feed) for feed in feeds]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        total = _sum_over_ranks(sum(counts), trainer.args.device) if world > 1 else sum(counts)
        stepper = trainer.stepper
        if stepper:
            stepper.begin_curvature(total)
        gen = None
        for i, (feed, count) in enumerate(zip(feeds, counts)):
            with trainer.compute_loss_context_manager():
                logits = model(**feed)["logits"]
            mask = feed.get("attention_mask")
            logits = logits[mask.bool()] if mask is not None else logits
            if gen is None:
                gen = curvature_generator(trainer.args.seed, step, logits.device,
                                          trainer.args.process_index)
            loss, _ = sampled_label_loss(logits, generator=gen)
            if stepper:
                stepper.begin_micro_batch(stepper.grad_accum - 1 if i == len(feeds) - 1 else 0)
            (loss * (count / total)).backward()
        if stepper:
            stepper.end_curvature()
            return
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = [p.grad for p in params if p.grad is not None]
        if world > 1 and grads:  # each rank's share of the global mean: their sum is ĝ
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat)
            for grad, value in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                grad.copy_(value)
        clip = trainer.args.max_grad_norm
        norm = (torch.nn.utils.clip_grad_norm_(params, clip) if clip and clip > 0
                else torch.nn.utils.get_total_norm(grads))
        if math.isfinite(float(norm)):
            opt.update_curvature("gnb", batch_size=total)
        opt.zero_grad(set_to_none=True)

    def _hutchinson(self, model, inputs: dict, step: int) -> None:
        trainer, opt = self.trainer, self.trainer.gradproj_optimizer
        # the fused attention kernels have no double backward; the math one has
        with trainer.compute_loss_context_manager(), sdpa_kernel(SDPBackend.MATH):
            loss = trainer.compute_loss(model, self._feed(inputs))
        opt.update_curvature("hutchinson", loss=loss,
                             generator=curvature_generator(trainer.args.seed, step, "cpu"))
        opt.zero_grad(set_to_none=True)


def _sum_over_ranks(value: int, device) -> int:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def _tokens(feed: dict) -> int:
    """The positions whose sampled labels GNB counts: attention_mask 1, else every token."""
    if feed.get("attention_mask") is not None:
        return int(feed["attention_mask"].sum())
    if feed.get("input_ids") is not None:
        return feed["input_ids"].numel()
    raise ValueError("Sophia's curvature pass (GNB) needs input_ids or an attention_mask in "
                     "the Trainer's batches, to count the sampled labels B")
