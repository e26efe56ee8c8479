"""Sophia's curvature pass under 2-process DDP (gloo, CPU): GNB on the global batch.

Each rank samples labels for its rows of the curvature batch (a generator per rank),
back-propagates on the unwrapped model and averages ĝ over the ranks, so both feed the
same ĥ = B·ĝ⊙ĝ (B: the global batch's 4 × 32 labels) and stay bitwise identical. The first
pass (after step 2) is recomputed here from the weights it ran on: each rank's shard and
labels spelled out, ĝ the mean of the two shards' gradients, h = (1 − β2)·B·ĝ⊙ĝ, projected
(Pᵀĝ or ĝP in the basis the state holds) for the projected weights. Without the average
each rank's h would be B·ĝ_r⊙ĝ_r and the ranks would part; with one label stream the
ranks' labels would come from the same uniforms. The same for Hugging Face's Trainer
(`GradprojTrainer`, each rank its own micro-batches from HF's distributed sampler).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "train"))
from test_distributed import torchrun  # noqa: E402
from trainhelpers import MICRO_SPEC, write_spec  # noqa: E402

from gradproj.distributed import unwrap  # noqa: E402
from gradproj.train.loop import Trainer  # noqa: E402
from gradproj.train.spec import load_spec  # noqa: E402

SPEC = (MICRO_SPEC.replace('rule = "adamw"\nlr = 1e-2', 'rule = "sophia"\nlr = 1e-2\ncurvature_every = 2')
        .replace("steps = 8", "steps = 5").replace("[train]", '[train]\ndevice = "cpu"'))


@pytest.mark.slow
def test_two_ranks_feed_the_gnb_estimate_of_the_global_batch(tmp_path):
    path = write_spec(tmp_path, SPEC.replace("[train]", '[train]\nparallel = "ddp"'))
    proc = torchrun(str(HERE / "curvature_worker.py"), str(path), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [p["step"] for p in ranks[0]["passes"]] == [1, 3]  # after steps 2 and 4
    for key, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][key]), f"{key} differs between ranks"
    for name, state in ranks[0]["state"].items():
        assert torch.equal(state["hessian"], ranks[1]["state"][name]["hessian"]), name

    # the reference: one process, the same model and curvature batch
    ref = Trainer(load_spec(write_spec(tmp_path, SPEC, "one.toml", tmp_path / "one")))
    model = unwrap(ref.model)
    first = ranks[0]["passes"][0]
    model.load_state_dict(first["weights"])
    x, _ = ref.curvature.data.batch(1, 0)  # step 1 (0-based), micro-batch 0: 4 × 32 tokens
    params = dict(model.named_parameters())
    shards = []
    for r in (0, 1):
        gen = torch.Generator().manual_seed((0 * 1_000_003 + 1) * 1_013 + 5 + 7 * r)
        logits = model.logits(x[2 * r:2 * r + 2]).float().reshape(-1, model.cfg.vocab_size)
        labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen).squeeze(1)
        shards.append(torch.autograd.grad(F.cross_entropy(logits, labels), list(params.values())))
    b = 4 * 32
    for (name, p), g0, g1 in zip(params.items(), *shards):
        g = (g0 + g1) / 2
        state = first["state"][name]
        if "proj_left" in state:
            g = state["proj_left"].float().T @ g
        elif "proj_right" in state:
            g = g @ state["proj_right"].float()
        torch.testing.assert_close(state["hessian"], 0.01 * b * g.square(), rtol=1e-4,
                                   atol=1e-12, msg=name)
    assert any("proj_left" in s or "proj_right" in s for s in first["state"].values())


@pytest.mark.slow
def test_two_trainer_ranks_feed_the_gnb_estimate_of_the_global_batch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    proc = torchrun(str(HERE / "hf_sophia_worker.py"), str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, value in ranks[0]["final"].items():
        assert torch.equal(value, ranks[1]["final"][key]), f"{key} differs between ranks"
    assert not torch.equal(ranks[0]["window"][0], ranks[1]["window"][0])  # own batches
    sys.path.insert(0, str(HERE.parent / "integrations"))
    from test_hf_trainer import tiny_llama
    model = tiny_llama()
    model.load_state_dict(ranks[0]["before"])
    params = dict(model.named_parameters())
    tokens = sum(x.numel() for r in ranks for x in r["window"])  # B: 2 ranks x 2 x 16
    total = [torch.zeros_like(p) for p in params.values()]
    for r, saved in enumerate(ranks):
        gen = torch.Generator().manual_seed((0 * 1_000_003 + 2) * 1_013 + 5 + 7 * r)
        for ids in saved["window"]:
            logits = model(input_ids=ids).logits.float().reshape(-1, 64)
            labels = torch.multinomial(logits.detach().softmax(-1), 1, generator=gen).squeeze(1)
            ce = F.cross_entropy(logits, labels, reduction="sum") / tokens
            for acc, g in zip(total, torch.autograd.grad(ce, list(params.values()))):
                acc += g
    assert tokens == 64
    for (name, _), g in zip(params.items(), total):
        state = ranks[0]["state"][name]
        assert torch.equal(state["hessian"], ranks[1]["state"][name]["hessian"]), name
        if "proj_left" in state:
            g = state["proj_left"].float().T @ g
        elif "proj_right" in state:
            g = g @ state["proj_right"].float()
        torch.testing.assert_close(state["hessian"], 0.01 * tokens * g.square(), rtol=1e-4,
                                   atol=1e-12, msg=name)
