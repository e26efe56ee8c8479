"""The planner's activation bytes against bytes saved for backward in a real CPU forward."""
from __future__ import annotations

import pytest
import torch

import gradproj as gp
from gradproj.memory import activation_bytes
from gradproj.train.model import build_model, model_config

CFG = model_config("tiny", n_layers=3)


def _saved_bytes(fn, exclude) -> int:
    """Distinct storages autograd saves while `fn` runs, minus `exclude` (weights, inputs)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _model(device, dtype, checkpointing=False, int8=False):
    model = build_model(CFG, device=device, activation_checkpointing=checkpointing).to(dtype)
    if int8:
        gp.quantize_weights(model)
    return model


def _weights(model):
    return [*model.parameters(), *model.buffers()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_activations_match_saved_tensors(dtype, int8):
    batch, seq = 3, 48
    model = _model("cpu", dtype, int8=int8)
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq))
    measured = _saved_bytes(lambda: model(tokens, tokens), _weights(model))
    planned = activation_bytes(_model("meta", dtype, int8=int8), batch, seq).total
    assert planned == measured  # exact: the README says the planned figure equals it


def test_checkpointed_activations_match_kept_inputs_plus_one_layer():
    batch, seq, dtype = 2, 64, torch.bfloat16
    model = _model("cpu", dtype, checkpointing=True)
    model.train()
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq))
    kept = _saved_bytes(lambda: model(tokens, tokens), _weights(model))
    # backward recomputes one block at a time: the largest block's own saved tensors
    x = torch.randn(batch, seq, CFG.dim, dtype=dtype, requires_grad=True)
    one_layer = max(_saved_bytes(lambda: layer(x, model.rope), [*_weights(model), x])
                    for layer in model.layers)
    planned = activation_bytes(_model("meta", dtype), batch, seq, checkpointing=True)
    measured = kept + one_layer
    assert planned.total == measured
    assert planned.kept < activation_bytes(_model("meta", dtype), batch, seq).total / 2


def test_fused_attention_keeps_activations_linear_in_sequence_length():
    # the math path would save B*H*T^2 fp32 probabilities: x4 when T doubles
    model = _model("meta", torch.bfloat16)
    short, long = (activation_bytes(model, 1, t).total for t in (256, 512))
    assert 1.9 < long / short < 2.1


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="batch and seq_len"):
        activation_bytes(_model("meta", torch.float32), 0, 8)


def test_checkpointed_fp32_layer_input_is_not_counted_twice():
    """In fp32 a block's RMSNorm saves the block input itself (bf16 saves an fp32 copy): that
    input is already among the kept checkpoint inputs, so the recomputed layer's bytes leave
    it out and the plan still equals kept + one layer's own saved tensors (catches the
    recompute term counting the layer's input again)."""
    batch, seq, dtype = 2, 32, torch.float32
    model = _model("cpu", dtype, checkpointing=True)
    model.train()
    tokens = torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    kept = _saved_bytes(lambda: model(tokens, tokens), _weights(model))
    x = torch.randn(batch, seq, CFG.dim, dtype=dtype, requires_grad=True)
    with_input = _saved_bytes(lambda: model.layers[0](x, model.rope), _weights(model))
    one_layer = max(_saved_bytes(lambda: layer(x, model.rope), [*_weights(model), x])
                    for layer in model.layers)
    assert with_input == one_layer + x.untyped_storage().nbytes()  # the input is saved
    planned = activation_bytes(_model("meta", dtype), batch, seq, checkpointing=True)
    assert planned.recompute == one_layer
    assert planned.total == kept + one_layer
