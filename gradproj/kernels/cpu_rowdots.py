"""AdamP's row reductions on CPU in one C pass (`rules/adamp.py`'s `project_scale_invariant`).

The scale-invariance test needs, per channel row of a k×rows×cols stack, ⟨G,W⟩, ‖G‖², ‖W‖²
and ⟨W,U⟩. As ATen ops that is two products into a buffer, two sums and two norms: ten
passes over full-size tensors, ~60 % of AdamP's projection (a 48×172×64 stack, one thread:
~1.3 of ~2.1 ms). `cpu_rowdots.c` reads G, W and U once and sums each row in double
(products of floats are exact there), so a result is the exact sum rounded once to fp32;
the ATen sums round as they go. Rows are independent: the values do not depend on how
rows are split over threads or stacked into buckets.
"""
from __future__ import annotations

import ctypes

import torch

from . import cpu_blockwise
from .cpu_native import load, package_source
from .dispatch import mode

_I, _P = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {"gp_row_dots": (None, [_I, _I, _I, _P, _P, _P, _I, _P])}


def library():
    """The compiled reduction, or None (no compiler; see `cpu_native.load_error`)."""
    source = package_source("cpu_rowdots.c")
    return None if source is None else load("cpu_rowdots", source, SIGNATURES)


def row_dots(g: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """k×rows×4 fp32: ⟨g,w⟩, ⟨g,g⟩, ⟨w,w⟩, ⟨w,u⟩ over the last dim of three k×rows×cols
    tensors; None where the C path does not run (GRADPROJ_KERNELS≠auto, no compiler, or
    not three contiguous fp32 CPU tensors of one shape: the caller's ATen ops then run)."""
    tensors = (g, w, u)
    if not (mode() == "auto" and g.dim() == 3
            and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                    and t.shape == g.shape for t in tensors)):
        return None
    lib = library()
    if lib is None:
        return None
    k, rows, cols = g.shape
    out = torch.empty(k, rows, 4, dtype=torch.float32)
    cpu_blockwise.run_blocks(lib.gp_row_dots, g.numel(), cols, 0, k * rows,
                             tuple(t.data_ptr() for t in tensors), (cols, out.data_ptr()))
    return out
