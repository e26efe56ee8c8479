"""`gradient_as_bucket_view`: a bucket's gradients live in one buffer that the step reads
without a copy, and every result is the one the copying step gives."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import gradproj as gp


def _model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    """4 same-shape projected weights, 4 biases (one full-rank bucket), and an odd 24×16
    weight that steps alone (a bucket of one: no buffer, its .grad is its own)."""
    torch.manual_seed(seed)
    layers = [nn.Linear(16, 16) for _ in range(4)] + [nn.Linear(16, 24, bias=False)]
    return nn.Sequential(*layers).to(dtype)


def _backward(model: nn.Module, step: int, micro_batches: int = 1) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for _ in range(micro_batches):
        x = torch.randn(8, 16, generator=gen).to(next(model.parameters()).dtype)
        model(x).float().square().mean().backward()


def _pair(preset: str, dtype=torch.float32, **options):
    models = [_model(dtype=dtype), _model(dtype=dtype)]
    opts = [gp.build_optimizer(m, preset, update_gap=3, lr=1e-2, gradient_as_bucket_view=view,
                               **options) for m, view in zip(models, (False, True))]
    return models, opts


def _assert_same(models, opts) -> None:
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
        sa, sb = opts[0].state[a], opts[1].state[b]
        for key in sa:
            assert (torch.equal(sa[key], sb[key]) if torch.is_tensor(sa[key])
                    else sa[key] == sb[key]), key


@pytest.mark.parametrize("preset,dtype,options", [
    ("galore", torch.float32, {"rank": 4}),
    ("galore", torch.bfloat16, {"rank": 4}),
    ("fira", torch.float32, {"rank": 4}),          # its residual reads the full G
    ("apollo", torch.float32, {"rank": 4}),
    ("lamb", torch.float32, {"rank": 4, "weight_decay": 0.1}),  # finishes the update from G
    ("galore8bit", torch.float32, {"rank": 4}),
], ids=["galore", "galore-bf16", "fira", "apollo", "lamb-wd", "galore8bit"])
def test_views_step_exactly_as_copies(preset, dtype, options):
    """7 steps with refreshes at 0, 3, 6, two micro-batches accumulating into the views and
    torch's in-place gradient clipping between: weights and states bit-identical."""
    models, opts = _pair(preset, dtype, **options)
    for step in range(7):
        for model, opt in zip(models, opts):
            _backward(model, step, micro_batches=2)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
    _assert_same(models, opts)
    weights, biases = ([p.grad for p in models[1][:4].parameters() if p.dim() == d] for d in (2, 1))
    for grads in (weights, biases):  # each bucket's gradients: slices of one buffer
        assert len({g.untyped_storage().data_ptr() for g in grads}) == 1
        assert all(g._base is grads[0]._base for g in grads) and grads[0].dtype == dtype


class _Stacks(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.stacked = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.stack.default, torch.ops.aten.cat.default):
            self.stacked += sum(t.numel() for t in args[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("view", [False, True], ids=["copy", "view"])
def test_steady_step_copies_no_gradient(view):
    """After the first step the buffer is the gradients: a steady step stacks none of
    them (the copying step stacks all 4·16·16 + 4·16 bucketed values)."""
    model = _model()
    opt = gp.build_optimizer(model, "galore", rank=4, update_gap=100, gradient_as_bucket_view=view)
    for step in range(3):
        _backward(model, step)
        if step == 2:
            counter = _Stacks()
            with counter:
                opt.step()
        else:
            opt.step()
        opt.zero_grad()
    assert counter.stacked == (0 if view else 4 * 16 * 16 + 4 * 16)


def test_zero_grad_zeroes_buffers_in_place_and_the_rest_as_torch():
    model = _model()
    opt = gp.build_optimizer(model, "galore", rank=4, gradient_as_bucket_view=True)
    _backward(model, 0)
    opt.step()
    views = [p.grad for p in model[:4].parameters()]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is v and not v.any() for p, v in zip(model[:4].parameters(), views))
    assert model[4].weight.grad is None  # steps alone: torch's set_to_none
    _backward(model, 1)
    opt.zero_grad(set_to_none=False)
    assert model[4].weight.grad is not None and not model[4].weight.grad.any()


def test_gradients_reset_outside_the_optimizer_are_stacked_again():
    """`model.zero_grad()` (HF Trainer's call) drops the views: the next step stacks as
    without the option, gives the same result and makes the new stack the buffer."""
    models, opts = _pair("galore", rank=4)
    for step in range(5):
        for model, opt in zip(models, opts):
            _backward(model, step)
            opt.step()
            model.zero_grad()
    _assert_same(models, opts)
    _backward(models[1], 5)
    opts[1].step()
    assert len({p.grad.untyped_storage().data_ptr() for p in models[1][:4].parameters()
                if p.dim() == 2}) == 1


def test_views_restored_after_model_zero_grad_step_without_a_stack():
    """`restore_gradient_views` after `model.zero_grad()` (what GradprojTrainer does after
    HF's call) re-attaches zeroed views: steady steps stack nothing again, same results."""
    models, opts = _pair("galore", rank=4)
    for step in range(5):
        for model, opt in zip(models, opts):
            _backward(model, step)
            if step == 4 and opt is opts[1]:
                counter = _Stacks()
                with counter:
                    opt.step()
            else:
                opt.step()
            model.zero_grad()
            opt.restore_gradient_views()
    _assert_same(models, opts)
    assert counter.stacked == 0
    grads = [p.grad for p in models[1][:4].parameters() if p.dim() == 2]
    assert all(g is not None and not g.any() for g in grads)
    assert len({g.untyped_storage().data_ptr() for g in grads}) == 1
    assert models[1][4].weight.grad is None  # steps alone: no buffer to restore
    assert all(p.grad is None for p in models[0].parameters())  # without the option


def test_option_is_validated():
    with pytest.raises(ValueError, match="gradient_as_bucket_view"):
        gp.build_optimizer(_model(), "galore", gradient_as_bucket_view="yes")


def test_explicit_cap_stacks_large_cpu_weights_as_views_with_the_same_result():
    """3 weights of 320 KiB (on a CPU "auto" steps them alone) stacked by `bucket_cap_mb`
    into one bucket of views: bit-identical to the copying step with them alone, after
    refreshes at 0 and 3 (one thread: bmm splits by batch with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            models.append(nn.Sequential(*(nn.Linear(320, 256, bias=False) for _ in range(3))))
        opts = [gp.build_optimizer(models[0], "galore", rank=16, update_gap=3, lr=1e-2),
                gp.build_optimizer(models[1], "galore", rank=16, update_gap=3, lr=1e-2,
                                   bucket_cap_mb=4, gradient_as_bucket_view=True)]
        for step in range(5):
            x = torch.randn(16, 320, generator=torch.Generator().manual_seed(step))
            for model, opt in zip(models, opts):
                sum(layer(x).square().mean() for layer in model).backward()
                opt.step()
                opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    _assert_same(models, opts)
    sizes = [[len(b.params) for b in opt.buckets(0, opt.param_groups[0],
                                                 list(opt.param_groups[0]["params"]))]
             for opt in opts]
    assert sizes == [[1, 1, 1], [3]]
    assert len({p.grad.untyped_storage().data_ptr() for p in models[1].parameters()}) == 1
