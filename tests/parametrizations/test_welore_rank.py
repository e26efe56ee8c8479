"""WeLore's rank choice: the normalised-spectrum criterion, the global threshold search,
the LRC rule and the factor split, each against an independent computation."""
from __future__ import annotations

import pytest
import torch

from gradproj.parametrizations import welore_rank as wr


def _matrix(m: int, n: int, spectrum: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))
    return (u * torch.tensor(spectrum, dtype=torch.float64)) @ v.T


def test_normalized_spectrum_maps_min_to_0_and_max_to_1():
    s = torch.tensor([8.0, 4.0, 2.0, 0.0 + 1.0])
    assert wr.normalized_spectrum(s).tolist() == [1.0, 3 / 7, 1 / 7, 0.0]
    assert wr.normalized_spectrum(torch.full((5,), 3.0)).tolist() == [1.0] * 5  # flat: no tail


def test_choose_counts_values_below_threshold_and_applies_the_lrc_rule():
    # 8×8 with normalised spectrum [1, .5, .3, .2, .1, .05, .02, 0]
    norm = torch.tensor([1, .5, .3, .2, .1, .05, .02, 0], dtype=torch.float64)
    c = wr.choose(norm, (8, 8), threshold=0.25)        # prunes .2 .1 .05 .02 0 -> 5 of 8
    assert (c.kept, c.low_rank, c.params) == (3, True, 3 * 16)
    c = wr.choose(norm, (8, 8), threshold=0.3)         # strictly below: .3 itself is kept
    assert (c.kept, c.low_rank) == (3, True)
    c = wr.choose(norm, (8, 8), threshold=0.15)        # prunes 4 of 8 (0.5 > 0.4999), yet
    assert c.low_rank is False and c.kept == 8 and c.params == 64  # factors 4·16 = 64 ≮ 64
    c = wr.choose(norm, (8, 8), threshold=0.15, min_ratio=0.6)
    assert c.low_rank is False
    c = wr.choose(norm, (8, 8), threshold=2.0)         # never below rank 1
    assert c.kept == 1 and c.low_rank


def test_search_finds_the_smallest_sufficient_threshold():
    shapes = {"a": (24, 24), "b": (24, 40), "c": (40, 24), "d": (16, 48)}
    gen = torch.Generator().manual_seed(0)
    mats = {k: _matrix(*s, torch.rand(min(s), generator=gen, dtype=torch.float64)
                       .pow(3 + 2 * i).sort(descending=True).values.tolist(), seed=i)
            for i, (k, s) in enumerate(shapes.items())}
    norm = wr.spectra(mats)
    for ratio in (0.2, 0.35, 0.5, 0.6):
        t, choices = wr.search_threshold(norm, shapes, ratio)
        assert wr.compression(choices) >= ratio
        # brute force over every candidate threshold: none smaller reaches the ratio
        for v in sorted({float(x) for s in norm.values() for x in s if 0 < x < t}):
            assert wr.compression(wr.choices_at(norm, shapes, v)) < ratio
        kept = {k: c.kept for k, c in choices.items()}
        # non-uniform: the faster-decaying spectra (later matrices) keep fewer ranks per width
        assert len({c.kept / c.full_rank for c in choices.values() if c.low_rank}) > 1, kept


def test_search_stops_at_a_ratio_reached_exactly():
    """16×16: k kept ranks as factors hold 32·k of 256 parameters, so k = 4 compresses by
    exactly 0.5; the smallest threshold reaching 0.5 keeps 4, not 3 (0.625)."""
    shapes = {"a": (16, 16)}
    norm = wr.spectra({"a": _matrix(16, 16, [1.5 ** -i for i in range(16)], seed=2)})
    t, choices = wr.search_threshold(norm, shapes, 0.5)
    assert choices["a"].kept == 4 and wr.compression(choices) == 0.5


def test_search_rejects_unreachable_ratio_with_the_reachable_one():
    shapes = {"a": (16, 16)}
    norm = wr.spectra({"a": _matrix(16, 16, [2.0 ** -i for i in range(16)], seed=1)})
    # at most 15 of 16 ranks can go (15/16 < 0.95): no matrix qualifies as low-rank
    with pytest.raises(ValueError, match="out of reach.*largest compression of these matrices is 0.0000"):
        wr.search_threshold(norm, shapes, 0.5, min_ratio=0.95)
    with pytest.raises(ValueError, match="option 'ratio'"):
        wr.search_threshold(norm, shapes, 1.5)


def test_factorize_is_the_best_rank_k_approximation_split_by_root_s():
    s = [9.0, 7.0, 4.0, 2.0, 1.0, 0.5]
    w = _matrix(10, 12, s, seed=3).float()
    b, a = wr.factorize(w, 3)
    assert b.shape == (10, 3) and a.shape == (3, 12)
    err = torch.linalg.matrix_norm(w - b @ a).item()
    assert err == pytest.approx(sum(x * x for x in s[3:]) ** 0.5, rel=1e-4)  # Eckart–Young
    assert torch.linalg.vector_norm(b, dim=0).tolist() == pytest.approx([x ** 0.5 for x in s[:3]], rel=1e-4)
    assert torch.linalg.vector_norm(a, dim=1).tolist() == pytest.approx([x ** 0.5 for x in s[:3]], rel=1e-4)


def test_uniform_baseline_holds_at_least_the_parameters_and_no_more_than_one_step():
    shapes = {"q": (32, 32), "up": (32, 88), "down": (88, 32)}
    target = 3000
    u = wr.uniform_choices(shapes, target)
    total = sum(c.params for c in u.values())
    assert total >= target and all(c.low_rank for c in u.values())
    fewer = {k: wr.Choice(c.shape, c.kept - 1, True) for k, c in u.items()}
    assert sum(c.params for c in fewer.values()) < target
    assert len({c.kept for c in u.values()}) == 1  # same rank share of equal-width matrices


def test_matched_uniform_reaches_the_count_within_one_rank_step():
    shapes = {"q": (32, 32), "k": (32, 32), "up": (88, 32), "down": (32, 88)}
    for target in (3000, 7777, 9120):
        coarse = wr.uniform_choices(shapes, target)
        u = wr.matched_uniform(shapes, target)
        total = sum(c.params for c in u.values())
        # at least the target, less than one more rank of the widest matrix above it
        assert target <= total < target + max(sum(s) for s in shapes.values()), (target, total)
        assert total <= sum(c.params for c in coarse.values())
        assert all(c.low_rank for c in u.values())
        kept = {c.kept for c in u.values()}  # equal-width matrices: ranks k or k + 1 only
        assert max(kept) - min(kept) <= 1, kept


def test_rank_reduction_choices_are_the_references_rank_accounting():
    shapes = {"a": (24, 24), "b": (24, 40), "c": (40, 24)}
    gen = torch.Generator().manual_seed(1)
    mats = {k: _matrix(*s, torch.rand(min(s), generator=gen, dtype=torch.float64)
                       .pow(2 + 3 * i).sort(descending=True).values.tolist(), seed=i)
            for i, (k, s) in enumerate(shapes.items())}
    norm = wr.spectra(mats)
    total = sum(min(s) for s in shapes.values())
    for ratio in (0.1, 0.3, 0.5):
        t, choices = wr.rank_reduction_choices(norm, shapes, ratio)
        pruned = {k: int((norm[k] < t).sum()) for k in shapes}  # counted here, not by the module
        assert {k: c.kept for k, c in choices.items()} == {k: min(shapes[k]) - p for k, p in pruned.items()}
        assert sum(pruned.values()) / total >= ratio
        smaller = max(float(x) for s in norm.values() for x in s if x < t)
        assert sum(int((norm[k] < smaller).sum()) for k in shapes) / total < ratio
        # min_ratio 0: any pruned rank means factors, even those bigger than the dense matrix
        assert all(c.low_rank == (pruned[k] > 0) for k, c in choices.items())


def test_uniform_baseline_meets_a_target_reached_exactly():
    # k ranks of each hold 304·k parameters: a target of exactly 304·10 is met by k = 10
    shapes = {"q": (32, 32), "up": (32, 88), "down": (88, 32)}
    assert sum(c.params for c in wr.uniform_choices(shapes, 3040).values()) == 3040
