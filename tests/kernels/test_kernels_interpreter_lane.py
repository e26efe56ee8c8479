"""The interpreter lane: runs tests/kernels/interp in a fresh process under TRITON_INTERPRET=1.

Triton decides between compiled and interpreted kernels when `@triton.jit` runs (at import),
for its own library functions too, so the lane cannot share a process with the compile lane
or with tests that imported triton normally.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

LANE = Path(__file__).parent / "interp"


@pytest.mark.interpreter
def test_interpreter_lane():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process interprets already: the lane's tests are collected directly")
    env = dict(os.environ, TRITON_INTERPRET="1", GRADPROJ_KERNELS="interpret",
               TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-W", "ignore::UserWarning", str(LANE)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-8000:] + result.stderr[-2000:])
