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

A parametrization (`GradprojTrainer(parametrization=...)` or `optim_args`
`parametrization=KIND,parametrization.OPTION=...`) converts the targeted Linear layers
first (class docstring).

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

Sophia (`optim_args="preset=sophia"`, or `rule=sophia`) keeps its paper defaults: β (0.965,
0.99), ε 1e-15 and, with the preset, weight decay 0.1. A TrainingArguments field is read as
set when it differs from HF's default (adam_beta1 0.9, adam_beta2 0.999, adam_epsilon 1e-8,
weight_decay 0.0; a dataclass cannot tell a value passed from its default, so passing the
default reads as unset): set ones apply to Sophia's betas, ε and decay; optim_args
(`betas=0.9:0.99`, `eps=1e-12`) win over both. `GradprojTrainer` runs its curvature pass
every `curvature_every` steps (hf_curvature.py); a plain `Trainer` cannot, so
`gradproj_optimizer` refuses such a rule. Under DDP the GNB pass averages over the ranks.
"""
from __future__ import annotations

from typing import Any, Mapping

try:
    import transformers
except ImportError as exc:  # pragma: no cover - the extra is installed in CI
    raise ImportError("gradproj.integrations.transformers needs Hugging Face transformers: "
                      "pip install 'gradproj[hf]'") from exc
import dataclasses

import torch
from transformers.training_args import ParallelMode

from dataclasses import replace

from ..optimizers import LowRankOptimizer
from ..parametrizations import create_parametrization, initialize_parametrization
from ..quant.linear import is_quantized
from ..train.perlayer import PerLayerStepper
from ..train.curvature import curvature_settings
from .build import apply_to_targets, build_from_resolved, prepare_model
from .hf_curvature import CurvatureCallback
from .hf_options import (ADAM_ARGS, PARAM_KEY, OptionError, Resolved, from_hf, from_llamafactory,
                         maps_optim, parametrization_table, parse_optim_args)

__all__ = ["GradprojTrainer", "OptionError", "gradproj_optimizer", "llamafactory_optimizer",
           "resolve_training_args"]


def resolve_training_args(args: "transformers.TrainingArguments") -> Resolved:
    return from_hf(args.optim, args.optim_args, args.optim_target_modules)


def explicit_training_args(args: "transformers.TrainingArguments") -> set[str]:
    """Which of adam_beta1, adam_beta2, adam_epsilon, weight_decay the user set: those
    whose value differs from the TrainingArguments dataclass default (module docstring)."""
    defaults = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    return {name for name in (*ADAM_ARGS, "weight_decay") if getattr(args, name) != defaults[name]}


def _build(model, choice: Resolved, args) -> LowRankOptimizer:
    explicit = explicit_training_args(args)
    return build_from_resolved(
        model, choice, lr=args.learning_rate,
        weight_decay=args.weight_decay if "weight_decay" in explicit else None,
        adam={name: getattr(args, name) for name in ADAM_ARGS}, explicit=explicit)


def _refuse_without_curvature_pass(opt: LowRankOptimizer, what: str) -> LowRankOptimizer:
    if curvature_settings(opt)[0]:
        raise OptionError(f"{what}: rule 'sophia' needs its curvature pass every "
                          f"curvature_every steps, which GradprojTrainer runs; use "
                          f"GradprojTrainer (a plain Trainer would leave h = 0)")
    return opt


def gradproj_optimizer(model: torch.nn.Module, args: "transformers.TrainingArguments"
                       ) -> LowRankOptimizer:
    """The optimizer HF would build for `args.optim` (GaLore/APOLLO), as ours. Per-layer
    (`*_layerwise`) needs the Trainer's cooperation: use `GradprojTrainer` for it."""
    choice = resolve_training_args(args)
    if choice.per_layer:
        raise OptionError(f"optim {args.optim!r}: per-layer mode runs inside the Trainer; use "
                          f"GradprojTrainer instead of Trainer(optimizers=(opt, None))")
    return _refuse_without_curvature_pass(_build(model, choice, args), "gradproj_optimizer")


def llamafactory_optimizer(model: torch.nn.Module, finetuning_args: Mapping[str, Any] | Any,
                           args: "transformers.TrainingArguments") -> LowRankOptimizer:
    """LLaMA-Factory's `use_galore`/`galore_*` or `use_apollo`/`apollo_*` (a dict or its
    FinetuningArguments) with its TrainingArguments; non-layerwise only, as above."""
    cfg = finetuning_args if isinstance(finetuning_args, Mapping) else vars(finetuning_args)
    choice = from_llamafactory(cfg, args.optim)
    if choice.per_layer:
        raise OptionError("LLaMA-Factory: galore_layerwise/apollo_layerwise run inside the "
                          "Trainer; use GradprojTrainer(gradproj_choice=...)")
    return _refuse_without_curvature_pass(_build(model, choice, args), "llamafactory_optimizer")


class _GradientViews(transformers.TrainerCallback):
    """HF's loop calls `model.zero_grad()` (set to None) after every step, which takes the
    gradients out of their bucket buffers (`gradient_as_bucket_view`); this puts them back
    before the next backward, so every step reads the buffer without a stack."""

    def __init__(self, trainer: "transformers.Trainer"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **_):
        if self.trainer.gradproj_optimizer is not None:
            self.trainer.gradproj_optimizer.restore_gradient_views()


class GradprojTrainer(transformers.Trainer):
    """`transformers.Trainer` building gradproj's optimizer from `args` (module docstring).

    `gradproj_choice`: a `Resolved` (e.g. `hf_options.from_llamafactory(cfg)`) used instead
    of reading `args.optim`. A rule with a curvature estimate (Sophia) gets its pass
    (`hf_curvature.CurvatureCallback`), with our optimizer or one passed in `optimizers`.

    `parametrization`: a weight-side transform of the `optim_target_modules` Linear layers
    (a name or `{"kind": ..., **options}`: lora, lora-ga, sltrain, welore, gradnormlorp,
    int8; or `optim_args="parametrization=lora,parametrization.rank=8"`). The layers are
    converted here, before a checkpoint loads and before any optimizer is built: ours when
    `optim` is one we map, else HF's own (`adamw_torch`, ...) over what then trains (not
    for INT8 tensors, which only our optimizer steps). LoRA-GA's data init runs at the
    start of a fresh `train()` on the first `batches` batches of the train dataloader
    (skipped on `resume_from_checkpoint`: the checkpoint holds its result).
    `gradproj.merge_parametrizations(trainer.model)` then exports a plain model.
    """

    def __init__(self, *args, gradproj_choice: Resolved | None = None,
                 parametrization: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        table = parametrization_table(parametrization)
        ours = gradproj_choice is not None or (
            self.optimizer is None and (table is None or maps_optim(self.args.optim,
                                                                    self.args.optim_args)))
        choice = gradproj_choice or (resolve_training_args(self.args) if ours else None)
        if choice is not None and table is not None:
            if choice.parametrization not in (None, table):
                raise OptionError(f"parametrization: given both as GradprojTrainer("
                                  f"parametrization=...) and in optim_args "
                                  f"({choice.parametrization['kind']!r}); keep one")
            choice = replace(choice, parametrization=table)
        self.gradproj_choice = choice
        self.parametrization = choice.parametrization if choice is not None else table
        self._needs_init = self.parametrization is not None and create_parametrization(
            self.parametrization).needs_data
        self.stepper: PerLayerStepper | None = None
        self._last_grad_norm: float | None = None
        self.gradproj_optimizer = (self.optimizer if isinstance(self.optimizer, LowRankOptimizer)
                                   else None)
        self.curvature = CurvatureCallback(self)
        self.add_callback(self.curvature)
        self.add_callback(_GradientViews(self))
        if self.gradproj_choice is not None:
            # converted now (q-galore's INT8, a parametrization), so resume_from_checkpoint
            # loads the converted layers' tensors into them
            prepare_model(self.model, self.gradproj_choice)
            if self.gradproj_choice.per_layer:
                self._check_per_layer()
        elif table is not None:
            self._prepare_for_hf_optimizer(table)

    def _prepare_for_hf_optimizer(self, table: dict) -> None:
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if any(k == PARAM_KEY or k.startswith(PARAM_KEY + ".")
               for k in parse_optim_args(self.args.optim_args)):
            raise OptionError(f"optim_args: parametrization keys are read with gradproj's "
                              f"optimizers; with optim {optim!r} pass GradprojTrainer("
                              f"parametrization=...) only")
        if self.args.optim_target_modules is None:
            raise OptionError(f"optim_target_modules: parametrization {table['kind']!r} needs "
                              f"the Linear layers to convert, e.g. ['attn', 'mlp'] or "
                              f"'all-linear'")
        try:
            apply_to_targets(self.model, table, self.args.optim_target_modules)
        except ValueError as exc:
            raise OptionError(str(exc)) from None
        if any(is_quantized(p) for p in self.model.parameters()):
            raise OptionError(f"parametrization {table['kind']!r}: its INT8 tensors are stepped "
                              f"by gradproj's optimizer only, not by HF's {optim!r}; use e.g. "
                              f"optim='galore_adamw' or optim_args='preset=...'")

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self._needs_init and not resume_from_checkpoint:
            self._initialize_parametrization()
        self._needs_init = False  # once: a later train() continues from the same init
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _initialize_parametrization(self) -> None:
        """LoRA-GA: `loss_of(i)` is the Trainer's loss on the i-th train batch."""
        param = create_parametrization(self.parametrization)
        if self.args.world_size > 1:
            raise OptionError(f"parametrization {param.name!r}: its data init would see "
                              f"different batches on each of the {self.args.world_size} "
                              f"processes; initialise once "
                              f"(gradproj.parametrizations.initialize_parametrization) "
                              f"and save the model, or train with one process")
        batches = iter(self.get_train_dataloader())
        needed = param.options.get("batches")

        def loss_of(i: int) -> torch.Tensor:
            try:
                inputs = next(batches)
            except StopIteration:
                raise OptionError(f"parametrization {param.name!r}: batches = {needed} but the "
                                  f"train dataloader has only {i}") from None
            return self.compute_loss(self.model, self._prepare_inputs(inputs))

        self.model.train()
        initialize_parametrization(self.model, param, loss_of)

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
        if self.gradproj_choice is None:  # HF's own optimizer over the converted model
            return super().create_optimizer(model)
        if self.optimizer is None:
            model = self.model if model is None else model
            self.optimizer = self.gradproj_optimizer = _build(model, self.gradproj_choice,
                                                              self.args)
            if self.gradproj_choice.per_layer:
                self.stepper = PerLayerStepper(self.optimizer,
                                               self.args.gradient_accumulation_steps,
                                               track_norms=True)
        self._check_curvature()
        return self.optimizer

    def _check_curvature(self) -> None:
        every, estimator = self.curvature.settings()
        if every and estimator == "hutchinson" and self.stepper is not None:
            raise OptionError("curvature_estimator 'hutchinson' needs a double backward, which "
                              "per-layer mode's hooks cannot run; use 'gnb' or drop *_layerwise")
        if (every and estimator == "hutchinson"
                and self.args.parallel_mode == ParallelMode.DISTRIBUTED):
            raise OptionError("curvature_estimator 'hutchinson' runs in one process only; "
                              "use 'gnb' (averaged over the ranks) or train with one process")

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.curvature.settings()[0]:  # the pass reuses the step's inputs (hf_curvature)
            self.curvature.record(inputs, self.accelerator.sync_gradients)
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
