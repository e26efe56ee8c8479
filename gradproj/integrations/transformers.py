"""Hugging Face `Trainer` with gradproj's optimizers (`pip install "gradproj[hf]"`).

    from gradproj.integrations.transformers import GradprojTrainer
    args = TrainingArguments("out", optim="galore_adamw", optim_target_modules=["attn", "mlp"],
                             optim_args="rank=64,update_proj_gap=100,scale=0.10")
    GradprojTrainer(model=model, args=args, train_dataset=data).train()

`GradprojTrainer` is `transformers.Trainer` whose `create_optimizer` reads the
TrainingArguments' `optim`, `optim_args` and `optim_target_modules` (see `hf_options` for
every name understood) and builds a `LowRankOptimizer` instead of importing galore-torch
or apollo-torch. Everything else is HF's: the LR scheduler wraps our optimizer (so the
logged `learning_rate` is the one each step uses), checkpoints save its state dict
(tensors and plain scalars) and `resume_from_checkpoint` continues bit for bit.
`gradproj_optimizer(model, args)` builds the same optimizer for
`Trainer(optimizers=(opt, None))`; `llamafactory_optimizer` takes LLaMA-Factory's names.

`*_layerwise` (or LLaMA-Factory's `galore_layerwise`) is per-layer mode: the optimizer runs
in backward through `gradproj.train.perlayer.PerLayerStepper`, so at most one weight's
full gradient is alive. Unlike HF's layer-wise GaLore it works with
`gradient_accumulation_steps > 1` (projected weights sum their projected micro-batch
gradients; the basis of a refresh step is fit on the first micro-batch), and the logged
`grad_norm` is real (HF's reads 0): with accumulation 1 it is the global gradient norm
normal mode logs; with accumulation k it is the norm of what the steps used (see
`PerLayerStepper`), the full ‖ΣG‖ for every weight but projected ones, which contribute
‖Σ project(G_i)‖. Per-layer mode cannot clip a global norm (each weight is updated before
the norm exists), so it needs `max_grad_norm=0`, and refuses multi-process training.
"""
from __future__ import annotations

from typing import Any, Mapping

try:
    import transformers
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise ImportError("gradproj.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'gradproj[hf]'") from exc
import torch
from transformers.training_args import ParallelMode

from ..optimizers import LowRankOptimizer
from ..train.perlayer import PerLayerStepper
from .build import build_from_resolved, prepare_model
from .hf_options import OptionError, Resolved, from_hf, from_llamafactory

__all__ = ["GradprojTrainer", "OptionError", "gradproj_optimizer", "llamafactory_optimizer",
           "resolve_training_args"]


def resolve_training_args(args: "transformers.TrainingArguments") -> Resolved:
    return from_hf(args.optim, args.optim_args, args.optim_target_modules)


def _build(model, choice: Resolved, args) -> LowRankOptimizer:
    return build_from_resolved(model, choice, lr=args.learning_rate,
                               weight_decay=args.weight_decay,
                               betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)


def gradproj_optimizer(model: torch.nn.Module, args: "transformers.TrainingArguments"
                       ) -> LowRankOptimizer:
    """The optimizer HF would build for `args.optim` (GaLore/APOLLO), as ours. Per-layer
    (`*_layerwise`) needs the Trainer's cooperation: use `GradprojTrainer` for it."""
    choice = resolve_training_args(args)
    if choice.per_layer:
        raise OptionError(f"optim {args.optim!r}: per-layer mode runs inside the Trainer; use "
                          f"GradprojTrainer instead of Trainer(optimizers=(opt, None))")
    return _build(model, choice, args)


def llamafactory_optimizer(model: torch.nn.Module, finetuning_args: Mapping[str, Any] | Any,
                           args: "transformers.TrainingArguments") -> LowRankOptimizer:
    """LLaMA-Factory's `use_galore`/`galore_*` or `use_apollo`/`apollo_*` (a dict or its
    FinetuningArguments) with its TrainingArguments; non-layerwise only, as above."""
    cfg = finetuning_args if isinstance(finetuning_args, Mapping) else vars(finetuning_args)
    choice = from_llamafactory(cfg, args.optim)
    if choice.per_layer:
        raise OptionError("LLaMA-Factory: galore_layerwise/apollo_layerwise run inside the "
                          "Trainer; use GradprojTrainer(gradproj_choice=...)")
    return _build(model, choice, args)


class GradprojTrainer(transformers.Trainer):
    """`transformers.Trainer` building gradproj's optimizer from `args` (module docstring).

    `gradproj_choice`: a `Resolved` (e.g. `hf_options.from_llamafactory(cfg)`) used instead
    of reading `args.optim`.
    """

    def __init__(self, *args, gradproj_choice: Resolved | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.gradproj_choice = gradproj_choice or (
            None if self.optimizer is not None else resolve_training_args(self.args))
        self.stepper: PerLayerStepper | None = None
        self._last_grad_norm: float | None = None
        if self.gradproj_choice is not None:
            # q-galore: INT8 layers now, so resume_from_checkpoint loads INT8 weights into them
            prepare_model(self.model, self.gradproj_choice)
            if self.gradproj_choice.per_layer:
                self._check_per_layer()

    def _check_per_layer(self) -> None:
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            raise OptionError(f"per-layer mode ({self.args.optim}): max_grad_norm must be 0 "
                              f"(each weight is updated during backward, before a global "
                              f"norm exists), got {self.args.max_grad_norm}")
        if self.args.parallel_mode == ParallelMode.DISTRIBUTED:
            raise OptionError("per-layer mode: multi-process Trainer runs are not supported "
                              "(updates run inside backward, before DDP has averaged the "
                              "gradient); drop *_layerwise or train with one process")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = _build(model, self.gradproj_choice, self.args)
            if self.gradproj_choice.per_layer:
                self.stepper = PerLayerStepper(self.optimizer,
                                               self.args.gradient_accumulation_steps,
                                               track_norms=True)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.stepper is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # the Trainer marks the micro-batch that ends an accumulation window (also the
        # shorter last window of an epoch) as the one whose gradients are synced
        last = self.accelerator.sync_gradients
        self.stepper.begin_micro_batch(self.stepper.grad_accum - 1 if last else 0)
        loss = super().training_step(model, inputs, num_items_in_batch)
        if last:
            self._last_grad_norm = self.stepper.grad_norm().item()
            self.stepper.end_step()  # a non-finite gradient skipped that weight's update
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # HF takes the norm of .grad after backward, which per-layer mode has freed (0.0)
        if self.stepper is not None and "loss" in logs and self._last_grad_norm is not None:
            logs["grad_norm"] = self._last_grad_norm
        super().log(logs, *args, **kwargs)
