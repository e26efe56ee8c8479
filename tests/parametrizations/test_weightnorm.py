"""GradNormLoRP's weight W = m ⊙ V/‖V‖_row: value at init, and autograd's gradients against
the closed-form weight-normalisation gradient (Salimans & Kingma, 2016, eq. 3)."""
from __future__ import annotations

import torch

from gradproj.parametrizations import weightnorm as wn


def _setup(out=6, inp=5, rank=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, inp, generator=g, dtype=torch.float64)
    b = torch.randn(out, rank, generator=g, dtype=torch.float64)
    a = torch.randn(rank, inp, generator=g, dtype=torch.float64)
    m = torch.rand(out, generator=g, dtype=torch.float64) + 0.5
    return w0, b, a, m


def test_initial_weight_is_w0():
    w0, *_ = _setup()
    b, a = wn.init_factors(6, 5, 2, torch.Generator().manual_seed(1), torch.float64)
    assert torch.equal(b, torch.zeros(6, 2)) and a.abs().max() <= 1 / 5 ** 0.5
    w = wn.dense_weight(w0, wn.initial_magnitude(w0), b, a, scale=8.0)
    torch.testing.assert_close(w, w0, rtol=1e-15, atol=0)
    w_full = wn.dense_weight(w0, wn.initial_magnitude(w0), None, None, scale=1.0)
    torch.testing.assert_close(w_full, w0, rtol=1e-15, atol=0)


def test_rows_have_the_magnitudes():
    w0, b, a, m = _setup()
    w = wn.dense_weight(w0, m, b, a, scale=0.5)
    torch.testing.assert_close(torch.linalg.vector_norm(w, dim=1), m, rtol=1e-12, atol=0)


def test_gradients_are_weight_normalisation_gradients():
    w0, b, a, m = _setup()
    g_w = torch.randn(6, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for detach in (False, True):
        v = (w0 + 0.5 * b @ a).requires_grad_(True)
        mm = m.clone().requires_grad_(True)
        w = wn.dense_weight(v, mm, None, None, scale=1.0, detach_norm=detach)
        (w * g_w).sum().backward()
        norm = torch.linalg.vector_norm(v.detach(), dim=1, keepdim=True)
        vhat = v.detach() / norm
        # ∇m = v̂ᵀ∇W per row; ∇v = (m/‖v‖)(∇W − v̂ (v̂ᵀ∇W)), or (m/‖v‖)∇W with the norm detached
        torch.testing.assert_close(mm.grad, (vhat * g_w).sum(1), rtol=1e-5, atol=1e-7)
        expect = g_w - (vhat * (vhat * g_w).sum(1, keepdim=True) if not detach else 0)
        torch.testing.assert_close(v.grad, m[:, None] / norm * expect, rtol=1e-5, atol=1e-7)
