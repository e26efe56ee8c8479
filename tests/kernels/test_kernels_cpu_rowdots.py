"""AdamP's row reductions on CPU (`cpu_rowdots.row_dots`, C `gp_row_dots`).

Each of ⟨g,w⟩, ⟨g,g⟩, ⟨w,w⟩, ⟨w,u⟩ per row must be the float64 sum rounded once to fp32
(the C sums exact products in double), for any shape and thread split; AdamP's projection
must give the reference mode's detections and, to fp32 rounding, its update.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradproj.kernels import cpu_blockwise, cpu_rowdots
from gradproj.rules.adamp import project_scale_invariant

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the CPU fast path is not built")


def _exact(g, w, u):
    g, w, u = g.double(), w.double(), u.double()
    pairs = ((g, w), (g, g), (w, w), (w, u))
    sums = torch.stack([(a * b).sum(2) for a, b in pairs], 2)
    magnitude = torch.stack([(a * b).abs().sum(2) for a, b in pairs], 2)
    return sums, magnitude


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 3), rows=st.integers(1, 40), cols=st.integers(1, 700),
       seed=st.integers(0, 2 ** 16), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e15]))
def test_row_dots_are_the_exact_sums_rounded_once(k, rows, cols, seed, scale):
    gen = torch.Generator().manual_seed(seed)
    g, w, u = (torch.randn(k, rows, cols, generator=gen) * scale for _ in range(3))
    out = cpu_rowdots.row_dots(g, w, u)
    exact, magnitude = _exact(g, w, u)
    # one rounding to fp32 of a double sum that is exact up to cols·2⁻⁵³ of Σ|terms|
    bound = 2.0 ** -24 * exact.abs() + cols * 2.0 ** -52 * magnitude + 2.0 ** -149
    assert out.shape == (k, rows, 4) and out.dtype == torch.float32
    assert ((out.double() - exact).abs() <= bound).all()


def test_row_dots_do_not_depend_on_threads(monkeypatch):
    monkeypatch.setattr(cpu_blockwise, "CHUNK_ELEMENTS", 512)  # split small stacks too
    gen = torch.Generator().manual_seed(0)
    g, w, u = (torch.randn(5, 37, 129, generator=gen) for _ in range(3))
    one = cpu_rowdots.row_dots(g, w, u)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        three = cpu_rowdots.row_dots(g, w, u)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, three)
    assert torch.equal(cpu_rowdots.row_dots(g[2:3], w[2:3], u[2:3]), one[2:3])  # one slice alone


def test_row_dots_decline_what_they_cannot_read(monkeypatch):
    x = torch.randn(2, 8, 6)
    assert cpu_rowdots.row_dots(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2)) is None
    assert cpu_rowdots.row_dots(x.double(), x.double(), x.double()) is None
    assert cpu_rowdots.row_dots(x, x, x[:, :, :5].contiguous()) is None
    monkeypatch.setenv("GRADPROJ_KERNELS", "reference")
    assert cpu_rowdots.row_dots(x, x, x) is None


def test_projection_matches_the_reference_mode(monkeypatch):
    """A stack mixing a scale-invariant slice (G ⟂ W per channel), one invariant only as a
    layer, and a plain one: the same detections and, to fp32 rounding, the same update."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(3, 16, 48, generator=gen)
    g = torch.randn(3, 16, 48, generator=gen)
    # slice 0: G orthogonal to W row by row; slice 1: G = W (far from invariant)
    g[0] -= w[0] * ((g[0] * w[0]).sum(1, keepdim=True) / (w[0] * w[0]).sum(1, keepdim=True))
    g[1] = w[1]
    u = torch.randn(3, 16, 48, generator=gen)
    results = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("GRADPROJ_KERNELS", mode)
        results[mode] = project_scale_invariant(w, u.clone(), g, 0.1, 1e-8, 0.01, 0.1)
    (u_auto, inv_auto), (u_ref, inv_ref) = results["auto"], results["reference"]
    assert inv_auto.tolist() == inv_ref.tolist() and inv_auto[0] and not inv_auto[1]
    torch.testing.assert_close(u_auto, u_ref, rtol=1e-5, atol=1e-6)
