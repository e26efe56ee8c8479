"""SLTrain: the seeded support, the dense form built independently, no dense weight kept."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import gradproj as gp
from gradproj.parametrizations.sltrain import SLTrainLinear
from gradproj.parametrizations.sparse_support import support


@pytest.mark.parametrize("numel, count", [(1, 1), (7, 7), (1000, 30), (4096, 1), (65536, 1966)])
def test_support_is_count_distinct_positions_in_range(numel, count):
    s = support(numel, count, seed=3)
    assert s.dtype == torch.int64 and s.numel() == count
    assert s.unique().numel() == count and int(s.min()) >= 0 and int(s.max()) < numel
    assert torch.equal(s, support(numel, count, seed=3))          # regenerated, not stored
    if count < numel and count > 1:
        assert not torch.equal(s, support(numel, count, seed=4))  # the seed matters


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 1 << 18), st.floats(0.0, 1.0), st.integers(0, 2 ** 63 - 1))
def test_support_c_path_gives_the_reference_positions(numel, fraction, seed):
    """The C loop (kernels/cpu_feistel.c) against the tensor reference, position for
    position, over sizes whose Feistel halves run from 1 to 9 bits and any seed."""
    from gradproj.kernels import cpu_feistel
    if cpu_feistel.library() is None:
        pytest.skip("no C compiler")
    count = int(fraction * numel)
    fast = support(numel, count, seed)
    with mock.patch.dict(os.environ, {"GRADPROJ_KERNELS": "reference"}):
        assert cpu_feistel.support(numel, count, 4, [1, 2, 3, 4]) is None
        reference = support(numel, count, seed)
    assert torch.equal(fast, reference)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_support_is_uniform_over_rows_columns_and_cells(seed):
    """Chi-square of the per-row, per-column and per-cell (8×8 blocks) counts against the
    uniform expectation, for a 96×80 matrix at δ = 0.1 (fixed seeds: deterministic)."""
    m, n = 96, 80
    count = int(0.1 * m * n)
    s = support(m * n, count, seed)
    rows, cols = s // n, s % n
    for counts in (torch.bincount(rows, minlength=m), torch.bincount(cols, minlength=n),
                   torch.bincount((rows // 8) * (n // 8) + cols // 8, minlength=(m // 8) * (n // 8))):
        k = counts.numel()
        expected = count / k
        chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
        # dof = k − 1; mean k−1, sd √(2(k−1)); 5 sd is p < 1e-6 for a uniform sample
        assert abs(chi2 - (k - 1)) < 5 * math.sqrt(2 * (k - 1)), (k, chi2)
    # no structure along the permutation order either: first and second half look alike
    first, second = s[: count // 2] // n, s[count // 2:] // n
    assert abs(first.double().mean() - second.double().mean()) < 4 * m / math.sqrt(12 * count / 2)


def layer(bias=True, **options):
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 48, bias=bias)
    model = torch.nn.Sequential(lin)
    gp.apply_parametrization(model, {"kind": "sltrain", **options}, ["0"])
    return model[0]


def test_init_and_parameter_count_follow_the_paper():
    m, n, r, d = 48, 40, 4, 0.03
    mod = layer(rank=r, density=d, alpha=8.0)
    assert isinstance(mod, SLTrainLinear)
    assert mod.count == int(d * m * n) and mod.scaling == 8.0 / r
    assert torch.equal(mod.lora_B, torch.zeros(m, r))              # B = 0: BA = 0 at init
    bound = 1 / math.sqrt(n)
    for t in (mod.lora_A, mod.sparse_values):                        # U(±1/√n), as their code
        assert t.abs().max() <= bound and t.abs().max() > 0.8 * bound
    trainable = sum(p.numel() for p in mod.parameters() if p.requires_grad)
    assert trainable == r * (m + n) + int(d * m * n) + m
    assert set(mod.state_dict()) == {"lora_A", "lora_B", "sparse_values", "bias", "sparse_seed"}


def test_dense_weight_is_low_rank_plus_the_sparse_matrix_built_independently():
    mod = layer(rank=4, density=0.1)
    with torch.no_grad():
        mod.lora_B.normal_()
    index = mod.support()
    rows, cols = index // mod.in_features, index % mod.in_features
    sparse = torch.sparse_coo_tensor(torch.stack([rows, cols]), mod.sparse_values.detach(),
                                     (mod.out_features, mod.in_features),
                                     check_invariants=True).to_dense()
    want = mod.scaling * mod.lora_B.detach() @ mod.lora_A.detach() + sparse
    torch.testing.assert_close(mod.dense_weight().detach(), want, rtol=1e-6, atol=1e-6)
    assert int((sparse != 0).sum()) == mod.count


def test_forward_keeps_no_dense_weight_for_backward():
    """What autograd saves for backward: the input, the factors and the values — no m×n
    tensor (the dense W lives only inside forward/backward) and no positions (re-drawn)."""
    mod = layer(rank=4, density=0.1)
    saved = []
    x = torch.randn(3, 40, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t,
                                                  lambda t: t):
        y = mod(x)
    shapes = {shape for shape, _ in saved}
    assert (48, 40) not in shapes and (40, 48) not in shapes, saved
    assert ((3, 40), torch.float32) in saved and all(d.is_floating_point for _, d in saved), saved
    y.sum().backward()
    assert all(p.grad is not None for p in mod.parameters())


def test_trains_with_per_layer_updates_and_q8_states(tmp_path):
    """SLTrain in a run with per-layer updates and 8-bit states trains (finite, moving)."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
    from trainhelpers import MICRO_SPEC
    from gradproj.train.loop import Trainer
    from gradproj.train.spec import load_spec
    text = MICRO_SPEC.replace("[data]", '[model.parametrization]\nkind = "sltrain"\nrank = 4\n\n[data]')
    text = text.replace('rule = "adamw"', 'rule = "adamw"\nstate_format = "q8"')
    text = text.replace("steps = 8", "steps = 4\nper_layer = true")
    path = tmp_path / "spec.toml"
    path.write_text(text.replace("{run_dir}", str(tmp_path / "run")))
    trainer = Trainer(load_spec(path))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.run()
    assert math.isfinite(summary["final_train_loss"]) and summary["skipped"] == 0
    moved = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.endswith("sparse_values") for n in moved) and any(n.endswith("lora_B") for n in moved)
