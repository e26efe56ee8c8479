"""The training loop: one spec in, a run folder out.

    trainer = Trainer(load_spec("examples/tiny.toml"))
    summary = trainer.run()

Per step: k = grad_accum micro-batches, each loss scaled by 1/k and back-propagated; then
(normal mode) the global gradient norm is taken, clipped if asked, and a non-finite norm
skips the step; or (per-layer mode) the hooks of `PerLayerStepper` have already updated
every weight during the last backward. The LR scheduler steps once per optimizer step in
both modes. With `[train] gradient = "zeroth-order"` a step is two no-grad forwards per
SPSA perturbation and no backward (`ZerothOrder`, train/zeroth_order.py), whose
estimate the optimizer steps one weight at a time. A step whose loss or gradient is not
finite is skipped and counted; `max_bad_steps` of them in a row stop the run with a
message.

The data for step s is a pure function of (seed, s), and checkpoints hold the model,
optimizer, scheduler, RNG and counters, so a resumed run repeats the uninterrupted
run's losses bit for bit on CPU — with the same `[train].threads` (the saved spec keeps
it): a different thread count splits float reductions differently (measured on the tiny
demo: final train loss 1.3011 with 2 threads, 1.3022 with 1).
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

from ..distributed.rank0 import Rank0
from ..distributed.run import RunContext
from ..optimizers import count_refreshes, optimizer_state_nbytes
from ..parametrizations import initialize_parametrization
from .curvature import CurvaturePass
from .data import Batches, Corpus, DataError, load_embedded, load_jsonl, load_text, load_tokens
from .loggers import open_loggers
from .metrics import METRICS_FILE, MIB, PLOT_FILE, Progress, plot_runs
from .model import build_model, count_parameters
from .spec import RunSpec, TrainSpec, write_resolved
from .tokenizer import load_tokenizer
from .zeroth_order import ZerothOrder

SPEC_FILE = "spec.toml"


class TrainingError(RuntimeError):
    """The run cannot go on (it diverged); the message says what to change."""


class RunDirInUse(TrainingError, ValueError):
    """`train` pointed at a folder that already holds a run: a user error (exit 2)."""


def lr_factor(train: TrainSpec) -> Callable[[int], float]:
    """Multiplier of the peak lr for the step with index s (0-based): linear warmup from 0
    over `warmup_steps`, then cosine / linear decay to `min_lr_ratio` at the last step."""
    warm, total, floor = train.warmup_steps, train.steps, train.min_lr_ratio

    def factor(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        progress = min(1.0, (s - warm) / max(1, total - warm - 1))
        if train.lr_schedule == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if train.lr_schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return 1.0

    return factor


def load_corpus(spec: RunSpec) -> Corpus:
    d = spec.data
    tokenizer = load_tokenizer(d.tokenizer)
    if d.source == "embedded":
        return load_embedded(tokenizer)
    if d.source == "text":
        return load_text(Path(d.path), d.glob, d.eval_fraction, tokenizer)
    if d.source == "jsonl":
        return load_jsonl(Path(d.path), d.text_key, d.eval_fraction, tokenizer)
    return load_tokens(Path(d.path), Path(d.eval_path) if d.eval_path else None, d.dtype,
                       spec.model.vocab_size, d.eval_fraction)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Trainer:
    def __init__(self, spec: RunSpec, *, resume: bool = False, stream: TextIO | None = None):
        self.spec, self.resume = spec, resume
        t = spec.train
        if t.threads:
            torch.set_num_threads(t.threads)
        # torchrun: join the process group (gloo on CPU, NCCL on CUDA); "none": no-op
        self.dist = RunContext.start(t.parallel, t.device)
        self.dist.check(t.batch_size, t.per_layer)
        self.device = self.dist.env.device if self.dist.distributed else resolve_device(t.device)
        self.run_dir = spec.run_dir
        self.ckpt = self.dist.checkpoints(self.run_dir, spec.checkpoint.keep_last)
        if not resume and self.ckpt.complete_steps():
            raise RunDirInUse(f"{self.run_dir} already holds a run (checkpoint step-"
                                f"{self.ckpt.complete_steps()[-1]}); continue it with `gradproj "
                                f"resume {self.run_dir}` or choose another [checkpoint].dir")
        self.corpus = load_corpus(spec)
        vocab = spec.model.vocab_size
        self.train_data = Batches(self.corpus.train, spec.data.seq_len, t.batch_size, t.seed,
                                  vocab, "train")
        self.eval_data = Batches(self.corpus.eval, spec.data.seq_len, t.batch_size, t.seed + 1,
                                 vocab, "eval")
        model = build_model(spec.model, seed=t.seed, device=self.device,
                            activation_checkpointing=t.activation_checkpointing)
        model = model.to(getattr(torch, t.dtype))
        spec.optimizer.prepare(model)  # [model.parametrization]: layers converted before wrapping
        if not resume:  # LoRA-GA: init from the first batches' gradient (a resume loads it)
            initialize_parametrization(model, spec.optimizer.parametrization,
                                       lambda i: model(*(b.to(self.device)
                                                         for b in self.train_data.batch(i, 0))))
        self.model = self.dist.wrap(model, per_layer=t.per_layer)
        # after wrapping: under FSDP2 the optimizer must hold the sharded (DTensor) weights
        self.opt = self.dist.optimizer(spec.optimizer.build(self.dist.module(self.model)))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(t))
        self.stepper = (self.dist.per_layer_stepper(self.opt, t.grad_accum, self.model)
                        if t.per_layer else None)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.curvature = CurvaturePass(self.opt, spec, self.corpus, self.device,  # Sophia's h
                                       self.dist)
        self.zo = (ZerothOrder(self.opt, eps=t.zo_eps, perturbations=t.zo_perturbations,
                               subspace=t.zo_subspace, seed=t.seed)
                   if t.gradient == "zeroth-order" else None)
        self.progress = Progress(t.steps, stream=stream,
                                 enabled=spec.log.progress and self.dist.is_main)
        self.step, self.skipped, self.bad_in_row, self.tokens = 0, 0, 0, 0
        self.elapsed = 0.0
        self.last_eval: float | None = None

    # -- pieces ------------------------------------------------------------------
    def _autocast(self):
        if self.spec.train.autocast == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        losses = []
        for i in range(self.spec.train.eval_batches):
            x, y = self.eval_data.batch(i)
            with self._autocast():
                losses.append(self.model(x.to(self.device), y.to(self.device)).item())
        self.model.train()
        return sum(losses) / len(losses)

    def train_step(self) -> tuple[float, bool, int]:
        """One optimizer step; (mean micro-batch loss, skipped?, peak gradient bytes)."""
        t, step = self.spec.train, self.step
        if self.zo:
            return self._zo_step()
        losses = []
        bad = False
        if self.stepper:
            self.stepper.reset_peak()
        for micro in range(t.grad_accum):
            x, y = self.dist.shard(*self.train_data.batch(step, micro))  # this rank's rows
            with self._autocast():
                loss = self.model(x.to(self.device), y.to(self.device))
            losses.append(self.dist.mean(loss.item()))  # global-batch loss, same on every rank
            if not math.isfinite(losses[-1]):
                bad = True  # no backward: nothing of this step reaches the weights
                break
            if self.stepper:
                self.stepper.begin_micro_batch(micro)
            (loss / t.grad_accum).backward()
        if self.stepper:
            if bad:
                self.stepper.abort()
            bad = self.stepper.end_step() or bad
            peak = self.stepper.grad_peak_bytes
            # every weight was updated in backward and no .grad is left, so this step() is
            # a no-op; it keeps the LR scheduler's optimizer-before-scheduler check honest
            self.opt.step()
        else:
            if not bad:
                self.dist.average_unreduced_grads(self.params)  # INT8 weights under DDP
            grads = [p.grad for p in self.params if p.grad is not None]
            # + DDP's reducer buckets: a flat copy of every gradient, alive all run
            peak = sum(g.numel() * g.element_size() for g in grads) + self.dist.bucket_bytes(self.model)
            if not bad and grads:
                if t.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip)
                else:
                    norm = torch.nn.utils.get_total_norm(grads)
                bad = not math.isfinite(self.dist.total_norm(norm))
                if not bad:
                    self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if not bad and self.curvature.due(step + 1):
            self.curvature.run(self.dist.module(self.model), step, self._autocast, self.stepper)
        self.scheduler.step()
        return sum(losses) / len(losses), bad, peak

    @torch.no_grad()
    def _zo_step(self) -> tuple[float, bool, int]:
        """A zeroth-order step (train/zeroth_order.py): forwards only, no gradient tensors."""
        t, step = self.spec.train, self.step

        def loss_fn() -> float:  # this rank's mean loss over the step's micro-batches
            total = 0.0
            for micro in range(t.grad_accum):
                x, y = self.dist.shard(*self.train_data.batch(step, micro))
                with self._autocast():
                    total += self.model(x.to(self.device), y.to(self.device)).item()
            return total / t.grad_accum

        self.model.eval()  # as MeZO: L₊ and L₋ must differ by the perturbation alone (no dropout)
        try:
            loss, ok = self.zo.step(loss_fn, mean=self.dist.mean_all)
        finally:
            self.model.train()
        self.opt.step()  # no .grad anywhere: a no-op that keeps the LR scheduler's check honest
        self.scheduler.step()
        return loss, not ok, 0

    def _loop_state(self) -> dict:
        state = {"skipped": self.skipped, "bad_in_row": self.bad_in_row, "tokens": self.tokens,
                 "elapsed": self.elapsed, "last_eval": self.last_eval}
        if self.zo:  # the perturbation seed stream's position
            state["zeroth_order"] = self.zo.state_dict()
        return state

    def _save(self) -> None:
        self.ckpt.save(self.step, self.model, self.opt, self.scheduler, self._loop_state())

    # -- the run -----------------------------------------------------------------
    def run(self) -> dict:
        spec, t = self.spec, self.spec.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            loaded = self.ckpt.load(self.model, self.opt, self.scheduler)
            self.step = loaded.step
            for key in ("skipped", "bad_in_row", "tokens", "elapsed", "last_eval"):
                setattr(self, key, loaded.loop[key])
            if self.zo:
                self.zo.load_state_dict(loaded.loop["zeroth_order"])
            metrics = Rank0(lambda: open_loggers(spec.log.backends, self.run_dir,
                                                 resume_step=self.step, config=spec.resolved()))
            self.progress.start = self.step
            if self.dist.is_main:
                self.progress.message(f"resumed {self.run_dir} from {loaded.path.name}")
        else:
            if self.dist.is_main:  # torchrun: one writer of the run folder
                write_resolved(spec, self.run_dir / SPEC_FILE)
                (self.run_dir / METRICS_FILE).unlink(missing_ok=True)  # left by a run killed early
            metrics = Rank0(lambda: open_loggers(spec.log.backends, self.run_dir,
                                                 config=spec.resolved()))
            metrics.write({"step": 0, "model/params": count_parameters(self.model),
                           "data/unigram_entropy(nats)": self.corpus.unigram_entropy(),
                           "data/train_tokens": int(self.corpus.train.size),
                           "data/digest": self.corpus.digest,
                           "data/description": self.corpus.description})
        baseline = self.corpus.unigram_entropy()
        tokens_per_step = t.batch_size * spec.data.seq_len * t.grad_accum
        window: list[float] = []
        loss = None
        try:
            while self.step < t.steps:
                t0 = time.perf_counter()
                loss, bad, grad_peak = self.train_step()
                dt = time.perf_counter() - t0
                self.step += 1
                self.elapsed += dt
                self.tokens += tokens_per_step
                if bad:
                    self.skipped += 1
                    self.bad_in_row += 1
                    if self.bad_in_row >= t.max_bad_steps:
                        raise TrainingError(
                            f"stopped at step {self.step}: {self.bad_in_row} steps in a row had a "
                            f"non-finite loss or gradient; lower [optimizer].lr, set "
                            f"[train].grad_clip, or use [train].autocast = 'none'")
                else:
                    self.bad_in_row = 0
                window.append(loss)
                last = self.step == t.steps
                record = None
                if self.step % spec.log.every == 0 or last:
                    record = {"step": self.step, "loss/train": loss,
                              "loss/train_avg": sum(window) / len(window),
                              "lr": self.scheduler.get_last_lr()[0], "time/step(s)": dt,
                              "throughput/tokens_per_s": tokens_per_step / dt,
                              "memory/optimizer_state(MiB)": optimizer_state_nbytes(self.opt) / MIB,
                              "memory/grad_peak(MiB)": grad_peak / MIB,
                              "subspace/refreshes": count_refreshes(self.opt),
                              "steps/skipped": self.skipped, "tokens": self.tokens}
                    window = []
                if (t.eval_every and self.step % t.eval_every == 0) or last:
                    self.last_eval = self.evaluate()
                    record = record or {"step": self.step}
                    record.update({"loss/eval": self.last_eval,
                                   "ppl/eval": math.exp(min(self.last_eval, 50.0))})
                if record:
                    metrics.write(record)
                    self.progress.update(self.step, loss, tokens_per_step / dt)
                every = spec.checkpoint.every
                if (every and self.step % every == 0) or last:
                    self._save()
        finally:
            metrics.close()
            self.progress.close()
            if self.stepper:
                self.stepper.remove()
            self.dist.close()
        if spec.log.plot and self.dist.is_main:
            plot_runs([self.run_dir], self.run_dir / PLOT_FILE, baseline=baseline)
        return {"run_dir": str(self.run_dir), "steps": self.step, "final_train_loss": loss,
                "final_eval_loss": self.last_eval, "unigram_entropy": baseline,
                "skipped": self.skipped, "train_seconds": self.elapsed, "tokens": self.tokens}


__all__ = ["DataError", "RunDirInUse", "SPEC_FILE", "Trainer", "TrainingError", "lr_factor"]
