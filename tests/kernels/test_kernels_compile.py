"""Compile lane: every registered kernel builds for sm_80 and sm_90 on this CPU-only machine,
with zero local-memory spills in its cubin; GEMM kernels use tensor-core instructions."""
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

import gradproj.kernels  # noqa: F401  (registers every op)
from gradproj.registry import KERNELS

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.compile

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
TARGETS = (80, 90)
CONFIGS = [(entry.name, i, config) for entry in KERNELS for i, config in enumerate(entry.obj.configs)]


def _compile(config, capability):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=config.kernel, signature=config.signature, constexprs=config.constexprs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config.num_warps})


def _resource_usage(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def test_every_kernel_has_a_compile_config():
    assert KERNELS.names(), "no kernels registered"
    for entry in KERNELS:
        assert entry.obj.configs, f"kernel {entry.name!r} has no compile config"
        assert callable(entry.obj.host) and callable(entry.obj.reference)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                    reason="interpreted kernels cannot be compiled")
@pytest.mark.skipif(not CUOBJDUMP.exists(), reason="the triton wheel ships no cuobjdump here")
@pytest.mark.parametrize("capability", TARGETS)
@pytest.mark.parametrize("name,index,config", CONFIGS,
                         ids=[f"{name}-{i}" for name, i, _ in CONFIGS])
def test_kernel_compiles_without_spills(name, index, config, capability):
    compiled = _compile(config, capability)
    usage = _resource_usage(compiled.asm["cubin"])
    local = [int(v) for v in re.findall(r"LOCAL:(\d+)", usage)]
    registers = [int(v) for v in re.findall(r"REG:(\d+)", usage)]
    assert local and all(v == 0 for v in local), f"{name} sm_{capability} spills:\n{usage}"
    assert registers and max(registers) <= 255, usage
    if config.tensor_cores:
        ptx = compiled.asm["ptx"]
        instruction = "wgmma" if capability >= 90 else "mma.sync"
        assert instruction in ptx, f"{name} sm_{capability}: no {instruction} in the PTX"
