"""Kernel tests. The interpreter lane (interp/) needs TRITON_INTERPRET=1 set before triton is
imported, so it is collected only in a process started that way: test_kernels_interpreter_lane
starts one. Run it directly with
    TRITON_INTERPRET=1 GRADPROJ_KERNELS=interpret python -m pytest tests/kernels/interp
"""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # kernel_helpers, for interp/ too

collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interp"]
