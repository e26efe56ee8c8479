"""Zeroth-order training under 2-process DDP (gloo, CPU) matches one process.

Every rank draws the same perturbations from the same seeds, each evaluates L± on its
half of the global batch, and one all-reduce per step averages the L₊ − L₋ differences
(one float per perturbation), so every rank applies the same update: the ranks' weights
must be bitwise identical. Against one process on the whole batch the losses differ
only in rounding (the mean of two half-batch means vs one mean: ~1e-7 of L ≈ 5.5), which
ĝ = ΔL/2ε amplifies by 1/2ε = 500: |δĝ| ≲ 1e-6·500 = 5e-4, an update difference of
lr·|δĝ|·|z| ≲ 1e-2·5e-4·5 = 2.5e-5 a step; the tolerance is 8 steps of it, 2e-4. A rank
drawing other perturbations, or skipping the all-reduce, moves ĝ by O(‖∇L‖) ≈ 1 (and
the ranks apart).

Subspace perturbations in the basis of the seeded Gaussian projector: a basis *fitted*
on the estimate (svd, randomized) turns the rounding above into a rotation of the
subspace (the top-r singular vectors of a nearly Gaussian matrix have small gaps):
measured 7.6e-3 apart after 8 steps with the randomized projector and n = 2 — not
a distributed effect (one rank under DDP matches one process bit for bit), so it is
not what this test is about.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "train"))
from test_distributed import torchrun  # noqa: E402
from trainhelpers import MICRO_SPEC, write_spec  # noqa: E402

from gradproj.distributed import unwrap  # noqa: E402
from gradproj.train.loop import Trainer  # noqa: E402
from gradproj.train.metrics import read_metrics  # noqa: E402
from gradproj.train.spec import load_spec  # noqa: E402

STEPS, LR = 8, 1e-2
SPEC = (MICRO_SPEC.replace('rule = "adamw"', 'rule = "sgdm"\nmomentum = 0.0')
        .replace('projector = "randomized"', 'projector = "gaussian"')
        .replace("[train]", '[train]\ngradient = "zeroth-order"\nzo_perturbations = 2\n'
                            'zo_subspace = true\ndevice = "cpu"'))
TOL = STEPS * LR * 5e-4 * 5


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss/train"] for r in read_metrics(run_dir) if "loss/train" in r]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for folder in (one, two):
        folder.mkdir()
    path = write_spec(two, SPEC.replace("[train]", '[train]\nparallel = "ddp"'))
    proc = torchrun(str(HERE / "zo_worker.py"), str(path), str(two))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(two / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["position"] == ranks[1]["position"] == 2 * STEPS
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), f"{key} differs between ranks"

    trainer = Trainer(load_spec(write_spec(one, SPEC)))
    trainer.run()
    ref = unwrap(trainer.model).state_dict()
    diff = max(float((ranks[0]["weights"][k] - v).abs().max()) for k, v in ref.items())
    moved = max(float((ranks[0]["weights"][k] - v).abs().max())
                for k, v in Trainer(load_spec(write_spec(tmp_path, SPEC, run_dir=tmp_path / "init"))
                                    ).model.state_dict().items())
    assert diff <= TOL, f"max |W_ddp - W_one| {diff:.3g} > {TOL:.3g}"
    assert moved > 100 * TOL  # the runs did move the weights, far beyond the tolerance
    got, want = train_losses(two / "run"), train_losses(one / "run")
    assert len(got) == len(want) == STEPS
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
