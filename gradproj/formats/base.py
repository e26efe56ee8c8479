"""How a rule's moment tensors are stored: the `STATE_FORMATS` plugin kind.

A format never owns state. It writes and reads entries of the optimizer's per-parameter
state dict under a key prefix, so state stays tensors and plain scalars only:

    fmt.zeros(state, "exp_avg", shape, device, signed=True)
    m = fmt.read(state, "exp_avg")          # fp32 tensor of `shape`
    fmt.write(state, "exp_avg", m)          # stores it back in the format

`nbytes(shape, signed)` is the exact storage cost (codes + scales), used by
`proj_type="auto"` and the memory planner, so they agree with what training allocates.

A format also owns the fused moment updates that need its layout (`adam_step`,
`lion_step`, `diffgrad_step`): the
rule passes numbers and the moments' key names, and the format hands its own tensors
to the kernel. Rules never read a format's keys.

`stackable(shape)`: whether the entries of k same-shape moments may be stacked along a
new leading dimension and handled as one k×shape moment (the optimizer's buckets do
that); true for dense storage, and for blockwise storage whose blocks never straddle
two moments.
"""
from __future__ import annotations

import math

import torch

from ..kernels.adam import adam_step, adam_step_ref
from ..kernels.diffgrad import diffgrad_step, diffgrad_step_ref
from ..kernels.lion import lion_update, lion_update_ref
from ..kernels.sophia import sophia_step, sophia_step_ref
from ..registry import STATE_FORMATS


class StateFormat:
    """Base class: a storage layout for one moment tensor."""

    def stackable(self, shape: tuple[int, ...]) -> bool:
        return False

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

    def adam_step(self, state: dict, m_key: str, v_key: str, grad: torch.Tensor, beta1: float,
                  beta2: float, eps: float, step_size: float) -> torch.Tensor:
        """M ← β1·M + (1−β1)·G;  V ← β2·V + (1−β2)·G²;  return step_size·M/(√V + ε).

        This default reads both moments, runs the reference math and writes them back;
        formats with a fused kernel for their layout override it.
        """
        m, v = self.read(state, m_key), self.read(state, v_key)
        direction = adam_step_ref(grad, m, v, beta1, beta2, eps, step_size)
        self.write(state, m_key, m)
        self.write(state, v_key, v)
        return direction

    def lion_step(self, state: dict, m_key: str, grad: torch.Tensor, beta1: float,
                  beta2: float) -> torch.Tensor:
        """Return sign(lerp(G, M, β1)); then M ← β2·M + (1−β2)·G (Lion). Default: read,
        the reference math, write back."""
        m = self.read(state, m_key)
        direction = lion_update_ref(grad, m, beta1, beta2)
        self.write(state, m_key, m)
        return direction

    def diffgrad_step(self, state: dict, m_key: str, v_key: str, prev_key: str,
                      grad: torch.Tensor, beta1: float, beta2: float, eps: float,
                      step_size: float) -> torch.Tensor:
        """Adam's moments, ξ = sigmoid(|G_prev − G|), G_prev ← G; return step_size·ξ·M/(√V + ε)
        (diffGrad). Default: read the three, the reference math, write them back."""
        m, v, prev = (self.read(state, key) for key in (m_key, v_key, prev_key))
        direction = diffgrad_step_ref(grad, m, v, prev, beta1, beta2, eps, step_size)
        for key, value in ((m_key, m), (v_key, v), (prev_key, prev)):
            self.write(state, key, value)
        return direction

    def sophia_step(self, state: dict, m_key: str, h_key: str, grad: torch.Tensor, beta1: float,
                    rho: float, eps: float) -> torch.Tensor:
        """M ← β1·M + (1−β1)·G; return clip(M / max(ρ·H, ε), 1) (Sophia; H is only read).
        Default: read both, the reference math, write M back."""
        m, h = self.read(state, m_key), self.read(state, h_key)
        direction = sophia_step_ref(grad, m, h, beta1, rho, eps)
        self.write(state, m_key, m)
        return direction


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

    def stackable(self, shape):
        return True

    def adam_step(self, state, m_key, v_key, grad, beta1, beta2, eps, step_size):
        return adam_step(grad, state[m_key], state[v_key], beta1, beta2, eps, step_size)

    def lion_step(self, state, m_key, grad, beta1, beta2):
        return lion_update(grad, state[m_key], beta1, beta2)

    def diffgrad_step(self, state, m_key, v_key, prev_key, grad, beta1, beta2, eps, step_size):
        return diffgrad_step(grad, state[m_key], state[v_key], state[prev_key], beta1, beta2,
                             eps, step_size)

    def sophia_step(self, state, m_key, h_key, grad, beta1, rho, eps):
        return sophia_step(grad, state[m_key], state[h_key], beta1, rho, eps)


@STATE_FORMATS.register("fp32", aliases=("float32",))
class FP32Format(DenseFormat):
    """Full-precision fp32 moments (4 bytes per element)."""

    dtype = torch.float32


@STATE_FORMATS.register("bf16", aliases=("bfloat16",))
class BF16Format(DenseFormat):
    """bfloat16 moments, round-to-nearest on write (2 bytes per element)."""

    dtype = torch.bfloat16
