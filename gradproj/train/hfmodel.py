"""Hugging Face causal LMs in run specs, from local files only (nothing is downloaded).

    [model]
    hf_config = "tiny-llama/config.json"   # random init, any causal LM transformers knows
    # or
    hf_pretrained = "my-model/"            # config.json + *.safetensors, for fine-tuning

`HFCausalLM` adapts the model to the loop's `model(tokens, targets) -> mean cross-entropy`
without renaming anything: it registers the HF model's own children (`model`, `lm_head`
for LLaMA; `transformer`, `lm_head` for GPT-2), so parameter and module names, the
optimizer's targets and the checkpoint keys are the names transformers uses. A weight
tied to another (GPT-2's head is its token embedding) is saved once.

Random init is seeded: `torch.manual_seed(seed)` inside a forked RNG, so a run and its
resume build the same initial weights and the loop's own RNG stream is untouched.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True, kw_only=True)
class HFModelSpec:
    config: str | None = None       # absolute path of a config.json (random init)
    pretrained: str | None = None   # absolute path of a folder with config.json + safetensors
    vocab_size: int = 0             # the embedding rows the run uses
    width: int = 0                  # hidden size: what a fractional rank ("1/4") is of

    @property
    def config_file(self) -> Path:
        return Path(self.config) if self.config else Path(self.pretrained) / "config.json"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("hf_config / hf_pretrained need Hugging Face transformers: "
                         "pip install 'gradproj[hf]'") from None
    return transformers


def read_config(path: Path) -> "transformers.PretrainedConfig":  # noqa: F821
    """The config object of a config.json; ValueError (one line) when it is not usable."""
    transformers = _transformers()
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{path} has no \"model_type\" (expected a transformers config.json)")
    model_type = raw.pop("model_type")
    try:
        config = transformers.AutoConfig.for_model(model_type, **raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: model_type {model_type!r} is not one transformers "
                         f"{transformers.__version__} knows ({str(exc).splitlines()[0][:80]})") from None
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        raise ValueError(f"{path}: model_type {model_type!r} has no causal-LM class in "
                         f"transformers (AutoModelForCausalLM cannot build it)")
    return config


def check_pretrained(folder: Path) -> None:
    if not folder.is_dir():
        raise ValueError(f"expected a local folder with config.json and *.safetensors, got {folder}")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder} has no *.safetensors weights (only local safetensors "
                         f"checkpoints are read; nothing is downloaded)")


class HFCausalLM(nn.Module):
    """`forward(tokens, targets)` = mean next-token cross-entropy of a transformers model."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if list(hf_model.named_parameters(recurse=False)):
            raise ValueError(f"{type(hf_model).__name__} keeps parameters at its root; "
                             f"gradproj cannot adapt it")
        for name, child in hf_model.named_children():
            self.add_module(name, child)  # same objects: names are transformers' names
        self.__dict__["hf"] = hf_model    # not a submodule: its children are ours already
        self.config = hf_model.config

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=tokens, use_cache=False).logits

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.logits(tokens)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    def _tied(self) -> set[str]:
        """Second and later names of a tensor that has several (tied weights)."""
        seen, tied = set(), set()
        for name, tensor in super().state_dict(keep_vars=True).items():
            (tied.add(name) if id(tensor) in seen else seen.add(id(tensor)))
        return tied

    def state_dict(self, *args, **kwargs):
        sd = super().state_dict(*args, **kwargs)
        if not kwargs.get("keep_vars"):  # safetensors saves a shared tensor once
            for name in self._tied():
                sd.pop(name, None)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        tied = self._tied()
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if k not in tied]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state dict does not match: missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]}")
        return type(result)(missing, result.unexpected_keys)


def build_hf_model(spec: HFModelSpec, *, seed: int = 0, device: str | torch.device = "cpu",
                   activation_checkpointing: bool = False) -> HFCausalLM:
    transformers = _transformers()
    if spec.pretrained:
        check_pretrained(Path(spec.pretrained))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            spec.pretrained, local_files_only=True, use_safetensors=True,
            dtype=torch.float32)
        if model.config.vocab_size < spec.vocab_size:
            raise ValueError(f"{spec.pretrained}: the model has {model.config.vocab_size} "
                             f"token embeddings, the tokenizer {spec.vocab_size}")
        model = model.to(device)
    else:
        config = read_config(Path(spec.config))
        if spec.vocab_size and spec.vocab_size != config.vocab_size:
            config.vocab_size = spec.vocab_size  # the tokenizer's; special ids past it go
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                ids = getattr(config, key, None)
                if isinstance(ids, int) and ids >= spec.vocab_size:
                    setattr(config, key, None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return HFCausalLM(model)
