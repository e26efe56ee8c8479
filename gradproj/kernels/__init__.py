"""Fused ops: each module holds `_<op>_kernel` (Triton), host `<op>()` and `<op>_ref()`.

Importing this package registers every op in `KERNELS`; `dispatch.py` decides per call
whether the Triton kernel or the PyTorch reference runs (GRADPROJ_KERNELS).
"""
from . import (adam, adam_q4, adam_q8, backproj, diffgrad, diffgrad_q4, diffgrad_q8,  # noqa: F401
               dispatch, int4, int8_sr, lion, q4, q8, sophia, sophia_q4, sophia_q8)
