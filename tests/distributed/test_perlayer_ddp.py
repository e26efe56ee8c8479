"""Per-layer mode under DDP: 2 gloo processes equal one process; gradient memory falls to
about one bucket, and the planner says so.

One torchrun launch (`worker_perlayer.py`) runs every 2-process check. Tolerances are
those of test_distributed.py (fp32: 0.01·lr on the weights; the runs differ only in the
order of the gradient reduction): measured ≤ 2.3e-6 on the weights, ≤ 7.2e-7 on the losses.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import gradproj as gp
from gradproj.distributed.perlayer import bucket_assignment
from gradproj.memory.ranks import ddp_gradient_bytes
from gradproj.train.model import build_model, model_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from harness import BASE, CONFIG  # noqa: E402
from test_distributed import FP32_TOL, torchrun  # noqa: E402
from worker_perlayer import CHECKS, MULTI, SMALL_BUCKET  # noqa: E402


# -- in-process ------------------------------------------------------------------------------
def test_buckets_are_ddps():
    # the reducer's own assignment (torch's C++) on mixed sizes and dtypes, first bucket smaller
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.empty(int(n), dtype=torch.float32 if i % 3 else torch.bfloat16)
               for i, n in enumerate(torch.randint(1, 600, (40,), generator=gen))]
    for limits in ([256, 1024], [1024, 1024], [4, 8]):
        expected, _ = dist._compute_bucket_assignment_by_size(tensors, limits)
        sizes = [(t.numel() * t.element_size(), t.dtype) for t in tensors]
        assert bucket_assignment(sizes, limits) == expected, limits
        # per-layer DDP's variant: a tensor that fills a bucket by itself is alone in one
        alone = bucket_assignment(sizes, limits, large_alone=True)
        assert sorted(i for b in alone for i in b) == list(range(len(tensors)))
        for bucket in alone:
            big = [i for i in bucket if sizes[i][0] >= limits[-1]]
            assert not big or bucket == big, (limits, bucket)
            assert len({sizes[i][1] for i in bucket}) == 1
        assert len(alone) > len(expected) or limits == [4, 8]


def test_planned_bucket_peak_follows_the_stepper_event_by_event():
    """Hand-counted peaks of per-layer DDP's reduction (limits 100 B): a bucket of several
    tensors is a new buffer, so when its last tensor arrives the buffer, that tensor's .grad
    and the previous bucket (in flight) coexist; a bucket of one is the gradient itself."""
    from gradproj.memory.ranks import ddp_bucket_peak
    f32 = torch.float32
    # [60, 60] fill one bucket: buffer 120 + the arriving 60
    assert ddp_bucket_peak([(60, f32), (60, f32)], (100, 100)) == 180
    # [150] alone (its own bucket, no copy), then [30, 80] while 150 is in flight: 150 + 110 + 80
    assert ddp_bucket_peak([(150, f32), (30, f32), (80, f32)], (100, 100)) == 340


def test_planned_accumulation_peak_hand_counted():
    """grad_accum 4, limits 100 B, galore rank 2 on a 16×8 weight (right side: R is 16×2,
    a 128-byte fp32 sum). Alone: 512 (its .grad) + 128 (the sum), and the buckets' peak is
    the refresh step's first micro-batch, which reduces the full 512-byte gradient (the
    last one reduces only the 128-byte sum). Behind a 64×64 full-rank weight (16 KiB,
    kept across micro-batches): 16384 + 512 + 128, and the last micro-batch's buckets
    peak as the 16 KiB gradient (its own bucket) arrives while R's sum is in flight."""
    shapes = []
    for modules, target in (([torch.nn.Linear(8, 16, bias=False)], "0"),
                            ([torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(8, 16, bias=False)], "1")):
        model = torch.nn.Sequential(*modules).to("meta")
        opt = gp.build_optimizer(model, "galore", targets=(target,), rank=2)
        shapes.append(ddp_gradient_bytes(model, opt, per_layer=True, grad_accum=4, limits=(100, 100))[0])
    assert shapes == [512 + 128 + 512, 16384 + 512 + 128 + (128 + 16384)]


def test_spec_accepts_per_layer_ddp_and_still_refuses_clipping(tmp_path):
    from gradproj.train.checks import SpecError
    from gradproj.train.spec import load_spec
    path = tmp_path / "s.toml"
    path.write_text("[train]\nsteps = 2\n")
    spec = load_spec(path, ['train.parallel="ddp"', "train.per_layer=true", "train.grad_accum=4"])
    assert spec.train.per_layer and spec.train.parallel == "ddp"
    with pytest.raises(SpecError, match="grad_clip"):
        load_spec(path, ['train.parallel="ddp"', "train.per_layer=true", "train.grad_clip=1.0"])


def test_planner_errors_name_the_option():
    spec = Path(__file__).resolve().parents[2] / "examples" / "tiny.toml"
    for kwargs, words in (({"launch": "ddp"}, "nproc"), ({"nproc": 2}, "launch"),
                          ({"launch": "ddp", "nproc": 3}, "batch_size"),
                          ({"launch": "zero3", "nproc": 2}, "launch")):
        with pytest.raises(ValueError, match=words):
            gp.plan_memory(spec, **kwargs)


def test_planner_per_rank_figures_for_a_7b_launch():
    # LLaMA-7B's shapes, 2 of its 32 layers (the planner's time goes into the meta trace)
    spec = Path(__file__).resolve().parents[2] / "examples" / "llama-7b-galore.toml"
    sets = ["train.batch_size=8", "train.grad_clip=0", "model.n_layers=2"]
    one = gp.plan_memory(spec, sets, dtype="bfloat16").spec
    ddp = gp.plan_memory(spec, sets, dtype="bfloat16", launch="ddp", nproc=8).spec
    per_layer = gp.plan_memory(spec, [*sets, "train.per_layer=true"], dtype="bfloat16",
                               launch="ddp", nproc=8).spec
    fsdp2 = gp.plan_memory(spec, sets, dtype="bfloat16", launch="fsdp2", nproc=8).spec
    grads = sum(2 * m * n for m, n in _shapes_7b())  # bf16 .grad of every parameter
    assert one.gradients == grads and ddp.gradients == 2 * grads  # + the reducer's flat copy
    assert ddp.weights == one.weights and ddp.optimizer_states == one.optimizer_states
    # per-layer: the embedding's 262 MB gradient (a bucket of its own) while the 8 kB
    # bucket of the first norm is in flight — at any depth; plain DDP: 2.7 GB here, 27 GB
    # with all 32 layers
    embed, norm = 2 * 32000 * 4096, 2 * 4096
    assert per_layer.gradients == embed + norm
    assert fsdp2.gradients == sum(2 * -(-p // 8) * q for p, q in _shapes_7b())
    assert fsdp2.activations == ddp.activations < one.activations  # 1 of 8 sequences a rank
    assert fsdp2.optimizer_states < one.optimizer_states / 2  # moments m/8 x r (right side)


def _shapes_7b():
    d, f, layers, vocab = 4096, 11008, 2, 32000
    block = [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d, 1), (d, 1)]
    return [(vocab, d), (vocab, d), (d, 1), *block * layers]


# -- 2 processes -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("perlayer_ddp")
    proc = torchrun(str(HERE / "worker_perlayer.py"), str(out))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHECKS))
def test_per_layer_ddp_matches_one_process_per_layer(results, name):
    result = results[name]
    assert "error" not in result, result.get("error")
    assert result["max_diff"] <= FP32_TOL, f"{name}: max |ΔW| {result['max_diff']:.3g}"
    assert result["max_loss_diff"] <= FP32_TOL, f"{name}: loss differs by {result['max_loss_diff']:.3g}"
    assert result["bases_identical"] and result["refreshes"] > 0
    assert result["peaks"]["left_after_step"] == 0  # no gradient or bucket outlives a step


@pytest.mark.slow
def test_per_layer_ddp_gradient_peak_is_about_one_bucket_and_planned(results):
    result = results["memory"]
    assert "error" not in result, result.get("error")
    model = build_model(model_config(**CONFIG), device="meta")
    opt = gp.build_optimizer(model, None, targets=("attn", "mlp"),
                             **{**BASE, "projector": "randomized", **MULTI})
    grads = sum(p.numel() * p.element_size() for p in model.parameters())
    plain, detail = ddp_gradient_bytes(model, opt)
    assert result["plain_ddp"] == plain == 2 * grads  # .grad + the reducer's flat copy
    assert result["plain_ddp_buckets"] == detail["reducer buckets"]
    limits = (SMALL_BUCKET, SMALL_BUCKET)
    planned, _ = ddp_gradient_bytes(model, opt, per_layer=True, limits=limits)
    measured = result["per_layer"]
    assert measured["grad"] == planned  # the planner follows the stepper event by event
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    # one bucket filling + the one in flight + the gradient being copied in; the tiny
    # model's 443 KB of gradients in 64 KiB buckets peak at 131 KB (an MLP gradient, a
    # bucket of its own, while the previous one is all-reduced): 0.15x plain DDP's 886 KB
    assert measured["bucket"] <= 2 * (SMALL_BUCKET + largest)  # never more than two buckets
    assert measured["grad"] < 0.2 * plain
    planned4, _ = ddp_gradient_bytes(model, opt, per_layer=True, grad_accum=4, limits=limits)
    accum = result["per_layer_accum4"]
    assert accum["grad"] + accum["accum"] <= planned4 < 0.6 * plain  # a bound for k > 1


@pytest.mark.slow
def test_gradproj_train_per_layer_ddp_equals_normal_ddp(results):
    result = results["trainer"]
    assert "error" not in result, result.get("error")
    normal, per_layer = result["normal"], result["per_layer"]
    assert len(per_layer["losses"]) == 4
    assert max(abs(a - b) for a, b in zip(normal["losses"], per_layer["losses"])) <= FP32_TOL
    assert abs(normal["final_eval"] - per_layer["final_eval"]) <= FP32_TOL


@pytest.mark.slow
def test_per_layer_ddp_reduces_int8_weights_too(results):
    result = results["int8"]
    assert "error" not in result, result.get("error")
    assert result["int8_weights"] == 7  # q, k, v, o, gate, up, down of the one layer
    assert result["weights_identical"] and result["bases_identical"]


@pytest.mark.slow
def test_plain_ddp_averages_int8_weight_gradients(results):
    result = results["int8_plain"]
    assert "error" not in result, result.get("error")
    assert result["weights_identical"] and result["bases_identical"]
