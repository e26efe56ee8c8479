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

import gc
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


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




class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create and keep alive (a no-grad forward's working set).

    Every op output's storage is counted from its creation until the last tensor that views
    it is garbage-collected (a `weakref.finalize` per tensor, a count per storage), which is
    when the caching allocator gets it back; storages of weights, buffers and the inputs
    are left out."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded
        self.live: dict[int, list[int]] = {}   # storage key -> [bytes, tensors viewing it]
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.excluded:
            return
        entry = self.live.get(key)
        if entry is None:
            entry = self.live[key] = [storage.nbytes(), 0]
            self.current += entry[0]
            self.peak = max(self.peak, self.current)
        entry[1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


def forward_peak_bytes(model: torch.nn.Module, batch: int, seq_len: int) -> int:
    """Peak bytes of the activations alive at once in `model(tokens, targets)` under
    `torch.no_grad()`: the working set of an inference forward (zeroth-order training),
    where each intermediate is freed as soon as nothing refers to it. For the gradproj
    LLaMA at a real vocabulary the peak is at the loss: bf16 logits, their fp32 copy and
    the fp32 log-softmax (B·T·V·10 bytes) and two fp32 scalars (loss, total weight); at
    the tiny preset's vocabulary of 256 the MLP's intermediates are larger."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"forward_peak_bytes: batch and seq_len must be >= 1, got {batch}, {seq_len}")
    device = next(model.parameters()).device
    tokens = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    targets = torch.zeros(batch, seq_len, dtype=torch.long, device=device)
    excluded = {t.untyped_storage()._cdata
                for t in (*model.parameters(), *model.buffers(), tokens, targets)}
    was_training = model.training
    model.eval()
    recorder = _LiveBytes(excluded)
    try:
        with torch.no_grad(), _FusedAttention(), recorder:
            loss = model(tokens, targets)
            del loss
        gc.collect()
    finally:
        model.train(was_training)
    return recorder.peak


__all__ = ["ActivationTrace", "activation_bytes", "forward_peak_bytes"]
