"""Fused ops: each module holds `_<op>_kernel` (Triton), host `<op>()` and `<op>_ref()`.

Importing this package registers every op in `KERNELS`; `dispatch.py` decides per call
whether the Triton kernel or the PyTorch reference runs (GRADPROJ_KERNELS).
"""
from . import adam, adam_q4, adam_q8, backproj, diffgrad, diffgrad_q8, dispatch, int4, int8_sr, lion, q4, q8, sophia  # noqa: F401
