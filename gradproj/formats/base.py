"""How a rule's moment tensors are stored: the `STATE_FORMATS` plugin kind.

A format never owns state. It writes and reads entries of the optimizer's per-parameter
state dict under a key prefix, so state stays tensors and plain scalars only:

    fmt.zeros(state, "exp_avg", shape, device, signed=True)
    m = fmt.read(state, "exp_avg")          # fp32 tensor of `shape`
    fmt.write(state, "exp_avg", m)          # stores it back in the format

`nbytes(shape, signed)` is the exact storage cost (codes + scales), used by
`proj_type="auto"` and the memory planner, so they agree with what training allocates.
"""
from __future__ import annotations

import math

import torch

from ..registry import STATE_FORMATS


class StateFormat:
    """Base class: a storage layout for one moment tensor."""

    def zeros(self, state: dict, key: str, shape: tuple[int, ...], device, signed: bool) -> None:
        raise NotImplementedError

    def read(self, state: dict, key: str) -> torch.Tensor:
        raise NotImplementedError

    def write(self, state: dict, key: str, value: torch.Tensor) -> None:
        raise NotImplementedError

    def nbytes(self, shape: tuple[int, ...], signed: bool = True) -> int:
        raise NotImplementedError

    def bytes_per_element(self, numel: int = 1 << 20, signed: bool = True) -> float:
        """Average storage bytes per element for a tensor of `numel` elements."""
        return self.nbytes((numel,), signed) / numel


class DenseFormat(StateFormat):
    """A plain tensor of one dtype under `state[key]`."""

    dtype: torch.dtype = torch.float32

    def zeros(self, state, key, shape, device, signed):
        state[key] = torch.zeros(shape, dtype=self.dtype, device=device)

    def read(self, state, key):
        return state[key].float()

    def write(self, state, key, value):
        state[key].copy_(value)

    def nbytes(self, shape, signed=True):
        return math.prod(shape) * torch.finfo(self.dtype).bits // 8


@STATE_FORMATS.register("fp32", aliases=("float32",))
class FP32Format(DenseFormat):
    """Full-precision fp32 moments (4 bytes per element)."""

    dtype = torch.float32


@STATE_FORMATS.register("bf16", aliases=("bfloat16",))
class BF16Format(DenseFormat):
    """bfloat16 moments, round-to-nearest on write (2 bytes per element)."""

    dtype = torch.bfloat16
