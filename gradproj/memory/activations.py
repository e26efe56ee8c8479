"""Activation memory: the bytes autograd keeps for backward, traced on the meta device.

Instead of a per-architecture formula, the planner runs the model's real forward pass
(and loss) on meta tensors under `torch.autograd.graph.saved_tensors_hooks` and adds up
the distinct storages autograd saves, leaving out parameters and buffers (those are
weights). Nothing is allocated, so a 7B model at 131K tokens traces in about a second,
and whatever the model code does (fp32 RMSNorm, fp32 logits for the loss) is counted
as it is. The validation test runs the same hooks on a real CPU forward.

Attention: on meta, `scaled_dot_product_attention` takes the math path, which would
save the T×T probabilities (B·H·T²·4 bytes: 8.6 GB for 7B at batch 1 × 4096). GPUs
(and this CPU build) run a fused kernel that saves q, k, v, the output and a
(B, H, T) fp32 log-sum-exp, so the trace routes attention through the fused op.

Activation checkpointing (per decoder layer, non-reentrant): between forward and
backward autograd keeps only each layer's inputs plus what is saved outside the layers
(embedding, final norm, head, loss); during backward one layer is recomputed at a time,
so the peak adds the largest single layer's saved bytes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class ActivationTrace:
    """Bytes held for backward, for one micro-batch."""

    total: int          # peak: kept + recompute
    kept: int           # saved by the forward and alive when backward starts
    recompute: int      # largest one layer's saved bytes, rebuilt in backward (checkpointing)
    batch: int
    seq_len: int
    checkpointing: bool

    def as_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "recompute": self.recompute,
                "batch": self.batch, "seq_len": self.seq_len,
                "checkpointing": self.checkpointing}


class _FusedAttention(TorchFunctionMode):
    """Route SDPA on meta tensors through the fused (flash) op, as GPUs and CPUs run it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            fused = _fused_sdpa(*args, **kwargs)
            if fused is not None:
                return fused
        return func(*args, **kwargs)


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
    # The fused op takes no mask and equal head counts; anything else keeps torch's choice.
    if q.device.type != "meta" or attn_mask is not None or q.shape[1] != k.shape[1]:
        return None
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, dropout_p, is_causal, scale=scale)
    return out


class _SavedBytes:
    """pack hook: record each distinct storage autograd saves, by the layer that saved it."""

    def __init__(self, model: torch.nn.Module):
        self.excluded = {t.untyped_storage()._cdata
                         for t in (*model.parameters(), *model.buffers())}
        self.seen: dict[int, int] = {}
        self.owner: dict[int, int | None] = {}
        self.layer: int | None = None
        self.layer_inputs: dict[int, set[int]] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage._cdata  # the StorageImpl address: equal for every view of one storage
        if key not in self.excluded and key not in self.seen:
            self.seen[key] = storage.nbytes()
            self.owner[key] = self.layer
        return tensor

    def total(self) -> int:
        return sum(self.seen.values())

    def largest_layer(self) -> int:
        per_layer: dict[int, int] = {}
        for key, layer in self.owner.items():
            if layer is not None and key not in self.layer_inputs.get(layer, ()):
                per_layer[layer] = per_layer.get(layer, 0) + self.seen[key]
        return max(per_layer.values(), default=0)


@contextmanager
def _layer_attribution(recorder: _SavedBytes, layers):
    def enter(index):
        def hook(module, args):
            recorder.layer = index
            recorder.layer_inputs[index] = {a.untyped_storage()._cdata for a in args
                                            if torch.is_tensor(a)}
        return hook

    def leave(module, args, output):
        recorder.layer = None

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(enter(i)))
        handles.append(layer.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _trace(model: torch.nn.Module, batch: int, seq_len: int, checkpointing: bool,
           attribute: bool) -> _SavedBytes:
    device = next(model.parameters()).device
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    recorder = _SavedBytes(model)
    previous = model.activation_checkpointing
    model.activation_checkpointing = checkpointing
    layers = model.layers if attribute else ()
    try:
        with _layer_attribution(recorder, layers), _FusedAttention(), \
                torch.autograd.graph.saved_tensors_hooks(recorder.pack, lambda t: t):
            loss = model(tokens, tokens)
        del loss  # frees the graph; the recorder kept only sizes
    finally:
        model.activation_checkpointing = previous
    return recorder


def activation_bytes(model: torch.nn.Module, batch: int, seq_len: int, *,
                     checkpointing: bool = False) -> ActivationTrace:
    """Bytes saved for backward by `model(tokens, targets)` on a batch × seq_len micro-batch.

    `model` is a gradproj LLaMA (it has `.layers` and `.activation_checkpointing`), best
    built on the meta device; its dtype (and INT8 Linear layers) are traced as they are.
    """
    if batch < 1 or seq_len < 1:
        raise ValueError(f"activation_bytes: batch and seq_len must be >= 1, got {batch}, {seq_len}")
    if not hasattr(model, "layers") or not hasattr(model, "activation_checkpointing"):
        raise ValueError(f"activation_bytes: {type(model).__name__} is not a gradproj LLaMA "
                         f"(needs .layers and .activation_checkpointing)")
    was_training = model.training
    model.train()  # checkpointing (and dropout, if any) only act in training mode
    try:
        kept = _trace(model, batch, seq_len, checkpointing, attribute=False).total()
        recompute = 0
        if checkpointing:
            recompute = _trace(model, batch, seq_len, False, attribute=True).largest_layer()
    finally:
        model.train(was_training)
    return ActivationTrace(total=kept + recompute, kept=kept, recompute=recompute,
                           batch=batch, seq_len=seq_len, checkpointing=checkpointing)


__all__ = ["ActivationTrace", "activation_bytes"]
