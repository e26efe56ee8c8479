"""gradproj/optimizers/heap.py: glibc's thresholds set once, only where asked, and to effect.

The unit tests hand `keep_freed_memory` a stand-in C library that records its mallopt
calls (glibc's parameter numbers and sizes are spelled out here, not imported); the last
test runs `benchmarks/overhead.py` twice in fresh processes and counts page faults.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradproj as gp
from gradproj.optimizers import heap, lowrank

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("GRADPROJ_KEEP_FREED_MEMORY", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def fresh(monkeypatch):
    """A process that has not tried yet, with a recording libc and no user settings."""
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_applied", None)
    monkeypatch.setattr(heap, "_libc", lambda: libc)
    for key in SETTINGS:
        monkeypatch.delenv(key, raising=False)
    return libc


def test_sets_mmap_then_trim_threshold_once_a_process(fresh):
    assert heap.keep_freed_memory() is True
    assert heap.keep_freed_memory() is True
    # M_MMAP_THRESHOLD (-3) at glibc's 64-bit ceiling, M_TRIM_THRESHOLD (-1) at 128 MiB
    assert fresh.calls == [(-3, 32 * 1024 * 1024), (-1, 128 * 1024 * 1024)]


@pytest.mark.parametrize("env", [("GRADPROJ_KEEP_FREED_MEMORY", "0"), ("GRADPROJ_KEEP_FREED_MEMORY", "off"),
                                 ("MALLOC_TRIM_THRESHOLD_", "1000000"), ("MALLOC_MMAP_THRESHOLD_", "65536")])
def test_opt_out_and_the_users_own_settings_leave_malloc_alone(fresh, monkeypatch, env):
    monkeypatch.setenv(*env)
    assert heap.keep_freed_memory() is False
    assert fresh.calls == []


def test_a_refused_mallopt_reports_false(fresh):
    fresh.result = 0
    assert heap.keep_freed_memory() is False


def test_no_glibc_no_call(monkeypatch):
    monkeypatch.setattr(heap.platform, "libc_ver", lambda: ("", ""))
    assert heap._libc() is None
    monkeypatch.setattr(heap.platform, "system", lambda: "Darwin")
    assert heap._libc() is None


def test_the_optimizer_asks_for_cpu_parameters_only(monkeypatch):
    asked = []
    monkeypatch.setattr(lowrank, "keep_freed_memory", lambda: asked.append(True))
    weight = torch.nn.Parameter(torch.randn(16, 12))
    meta = torch.nn.Parameter(torch.empty(16, 12, device="meta"))
    planned = gp.LowRankOptimizer([{"params": [meta], "lowrank": True, "rank": 2}])
    planned.init_state(meta, planned.param_groups[0])
    assert asked == []  # the memory planner's meta parameters change nothing
    weight.grad = torch.randn(16, 12)
    gp.LowRankOptimizer([{"params": [weight], "lowrank": True, "rank": 2}], lr=1e-3).step()
    assert asked == [True]


def faults_per_step(env_extra: dict, tmp_path: Path) -> float:
    out = tmp_path / f"overhead{len(env_extra)}.json"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--quick", "--only",
                    "fira", "--rounds", "10", "--json", str(out)], env={**env, **env_extra},
                   check=True, capture_output=True, timeout=120)
    rows = json.loads(out.read_text())["lists"]["24layer"]["rows"]
    return next(r for r in rows if r["optimizer"] == "gradproj fira")["faults_per_step"]


@pytest.mark.skipif(heap._libc() is None, reason="glibc only")
def test_fira_steps_stop_faulting_their_temporaries_back_in(tmp_path):
    """Fira on the 24-layer list: ~1,000-2,200 minor faults a step under glibc's defaults
    here, 0-40 with the thresholds set (its k×m×n temporaries are 1.5-2.1 MB)."""
    untuned = faults_per_step({"GRADPROJ_KEEP_FREED_MEMORY": "0"}, tmp_path)
    if untuned < 200:
        pytest.skip(f"this libc did not return the step's memory to the kernel ({untuned} faults a step)")
    tuned = faults_per_step({}, tmp_path)
    assert tuned <= untuned / 10, (tuned, untuned)
