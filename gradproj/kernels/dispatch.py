"""Which implementation of a fused op runs: the Triton kernel or its PyTorch reference.

`GRADPROJ_KERNELS` (read on every call, so tests and scripts may change it) selects:

* ``auto`` (default): Triton when every tensor argument is on CUDA and triton imports;
  the reference otherwise (CPU tensors, no triton).
* ``interpret``: Triton on any device through Triton's interpreter. The interpreter is
  chosen when ``@triton.jit`` runs, i.e. at import: ``TRITON_INTERPRET=1`` must be set
  before triton or gradproj is imported (triton 3.9's own library functions such as
  ``tl.max`` are jitted at triton's import, and a compiled-mode one cannot be called from
  an interpreted kernel). Asking for ``interpret`` without it raises a ValueError.
* ``reference``: never Triton.

Every host function ``<op>()`` in this package asks `use_triton(*tensors)` and falls back to
``<op>_ref()``, so callers (rules, formats, the optimizer) call ``<op>()`` and nothing else.
Each op registers a `KernelSpec` in `KERNELS`; the compile-lane tests walk that registry.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..registry import KERNELS

ENV = "GRADPROJ_KERNELS"
MODES = ("auto", "interpret", "reference")

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # non-Linux: kernels never run, but their modules must import
    HAS_TRITON = False

    class _NoTriton:
        constexpr = object

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def cdiv(a, b):
            return -(-a // b)

    triton = tl = _NoTriton()


def mode() -> str:
    """The selected mode; a bad value raises ValueError naming the variable."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def interpreting() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels are interpreted)."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_probe, InterpretedFunction)


@triton.jit
def _probe(x_ptr):  # never launched: its type tells whether @triton.jit interprets
    tl.store(x_ptr, 0)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a host function should launch its Triton kernel for these tensors."""
    selected = mode()
    if selected == "reference":
        return False
    if selected == "interpret":
        if not interpreting():
            raise ValueError(f"{ENV}=interpret needs TRITON_INTERPRET=1 set before triton "
                             "and gradproj are imported")
        return True
    return HAS_TRITON and all(t.is_cuda for t in tensors)


def tile(gpu: int, interpreted: int) -> int:
    """A launch tile size: the GPU's, or a larger one under the interpreter, whose cost is
    per program (numpy call overhead), not per element."""
    return interpreted if interpreting() else gpu


@dataclass(frozen=True)
class CompileConfig:
    """One specialisation of a kernel for the compile lane (no GPU needed)."""

    kernel: Any
    signature: dict
    constexprs: dict = field(default_factory=dict)
    num_warps: int = 4
    tensor_cores: bool = False  # a GEMM: its sm_90 PTX must hold wgmma (mma on sm_80)


@dataclass(frozen=True)
class KernelSpec:
    """A fused op: Triton host function, PyTorch reference, and its compile configs."""

    name: str
    host: Callable
    reference: Callable
    configs: tuple[CompileConfig, ...]
    description: str = ""


def register_kernel(name: str, host: Callable, reference: Callable,
                    configs: tuple[CompileConfig, ...]) -> KernelSpec:
    """Add an op to `KERNELS` under `name` (its description is the host's first doc line)."""
    doc = (host.__doc__ or "").strip().splitlines()
    spec = KernelSpec(name, host, reference, tuple(configs), doc[0] if doc else "")
    KERNELS.add(name, spec, description=spec.description)
    return spec
