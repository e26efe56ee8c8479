"""WeLore's rank choice (Jaiswal et al., 2024, "From GaLore to WeLore"), as pure functions.

The reference code (VITA-Group/WeLore, utils.py `adaptive_rank_pruning`, lib/rank_reduction.py
`do_rank_reduction`, lib/LowRankLayer.py) does, per targeted matrix W (m×n, rank r = min(m, n)):

  1. s = singular values of W (fp32), min-max normalised: ŝ = (s − min s) / (max s − min s);
  2. pruned = #{ŝ_i < t} for one global threshold t; kept rank k = r − pruned;
  3. W is a low-rank component (LRC) when pruned / r > min_ratio (0.4999 in its fine-tuning
     script); an LRC is replaced by the factors B = U_k·√S_k (m×k) and A = √S_k·V_kᵀ (k×n),
     both trained; every other matrix (N-LRC) keeps its full weight, frozen.

The reference picks t from a hand-tuned table per target (LLaMA-2 7B: 50 % -> t = 0.175) and
measures the reduction in *rank* summed over all matrices. Interpretations here (documented in
the README):
  * the target is a share of the targeted matrices' *parameters* (what the issue and the
    paper's "50 % compressed" mean for memory), reached by searching t instead of a table:
    the smallest t whose compression is at least the target (compression is a non-decreasing
    step function of t, so the search is over the normalised singular values themselves);
  * an LRC must also be smaller as factors than dense, k·(m + n) < m·n (for a square matrix
    that is exactly pruned / r > 0.5, the reference's 0.4999);
  * t never exceeds 1, so every LRC keeps at least its largest singular value.
`rank_reduction_choices` is the reference's own accounting (rank share, min_ratio 0.0, as its
welore_rank_reduction.py), kept to compare with the paper's tables; `matched_uniform` is the
uniform baseline at the same parameter count (benchmarks/welore_compress.py).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

MIN_RATIO = 0.4999   # the reference fine-tuning script's --min_ratio default


@dataclass(frozen=True)
class Choice:
    """What WeLore does with one matrix: its kept rank and whether it becomes factors."""
    shape: tuple[int, int]
    kept: int          # rank kept (= min(m, n) for an N-LRC)
    low_rank: bool     # True: replaced by factors (trained); False: dense, frozen

    @property
    def full_rank(self) -> int:
        return min(self.shape)

    @property
    def params(self) -> int:
        m, n = self.shape
        return self.kept * (m + n) if self.low_rank else m * n


def normalized_spectrum(s: torch.Tensor) -> torch.Tensor:
    """(s − min) / (max − min) of a singular-value vector (float64); all ones for a flat
    spectrum, which has no tail to cut."""
    s = s.double()
    lo, hi = s.min(), s.max()
    if hi <= lo:
        return torch.ones_like(s)
    return (s - lo) / (hi - lo)


def pruned_count(normalized: torch.Tensor, threshold: float) -> int:
    """How many normalised singular values lie strictly below the threshold."""
    return int((normalized < threshold).sum())


def choose(normalized: torch.Tensor, shape: tuple[int, int], threshold: float,
           min_ratio: float = MIN_RATIO) -> Choice:
    """WeLore's decision for one matrix at one global threshold."""
    m, n = shape
    r = min(m, n)
    pruned = min(pruned_count(normalized, threshold), r - 1)
    kept = r - pruned
    low = pruned / r > min_ratio and kept * (m + n) < m * n
    return Choice(shape=(m, n), kept=kept if low else r, low_rank=low)


def compression(choices: dict[str, Choice]) -> float:
    """Share of the matrices' parameters removed: 1 − Σ params / Σ m·n."""
    dense = sum(c.shape[0] * c.shape[1] for c in choices.values())
    return 1.0 - sum(c.params for c in choices.values()) / dense


def spectra(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalised singular values of each matrix (fp32 SVD, as the reference)."""
    return {name: normalized_spectrum(torch.linalg.svdvals(w.detach().float()))
            for name, w in weights.items()}


def choices_at(normalized: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
               threshold: float, min_ratio: float = MIN_RATIO) -> dict[str, Choice]:
    return {name: choose(normalized[name], shapes[name], threshold, min_ratio) for name in normalized}


def search_threshold(normalized: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                     ratio: float, min_ratio: float = MIN_RATIO) -> tuple[float, dict[str, Choice]]:
    """The smallest global threshold whose compression reaches `ratio`, and its choices.

    Compression only changes where the threshold passes a normalised singular value, so the
    candidates are those values (a threshold t prunes every value < t); bisection over them
    finds the smallest sufficient one exactly. Raises ValueError naming the largest
    compression any threshold reaches when `ratio` is beyond it.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"option 'ratio' must lie in (0, 1), got {ratio!r}")
    if not normalized:
        raise ValueError("no matrices to compress (do the targets match any Linear layer?)")
    values = sorted({float(v) for s in normalized.values() for v in s.tolist() if 0.0 < v <= 1.0})
    best = choices_at(normalized, shapes, 1.0, min_ratio)
    if compression(best) < ratio:
        raise ValueError(f"option 'ratio' {ratio} is out of reach: WeLore's largest compression "
                         f"of these matrices is {compression(best):.4f} (threshold 1.0)")
    lo, hi = 0, len(values) - 1   # values[hi] == 1.0 reaches the ratio
    while lo < hi:
        mid = (lo + hi) // 2
        if compression(choices_at(normalized, shapes, values[mid], min_ratio)) >= ratio:
            hi = mid
        else:
            lo = mid + 1
    threshold = values[lo]
    return threshold, choices_at(normalized, shapes, threshold, min_ratio)


def _uniform_at(shapes: dict[str, tuple[int, int]], fraction: float) -> dict[str, Choice]:
    return {name: Choice(shape=s, kept=max(1, round(fraction * min(s))), low_rank=True)
            for name, s in shapes.items()}


def _uniform_index(shapes: dict[str, tuple[int, int]], params: int) -> tuple[list[float], int]:
    """The rank shares k / min(m, n) and the index of the smallest one holding >= `params`."""
    fractions = sorted({k / min(s) for s in shapes.values() for k in range(1, min(s) + 1)})
    totals = [sum(c.params for c in _uniform_at(shapes, f).values()) for f in fractions]
    return fractions, min(bisect.bisect_left(totals, params), len(fractions) - 1)


def uniform_choices(shapes: dict[str, tuple[int, int]], params: int) -> dict[str, Choice]:
    """The uniform baseline: every matrix factored with the same share of its rank, the
    smallest share whose factors hold at least `params` parameters (so the baseline is never
    given fewer parameters than the method it is compared with)."""
    fractions, i = _uniform_index(shapes, params)
    return _uniform_at(shapes, fractions[i])


def matched_uniform(shapes: dict[str, tuple[int, int]], params: int) -> dict[str, Choice]:
    """The uniform baseline at the same parameter count: every matrix at the largest uniform
    share whose factors hold fewer than `params`, then one more rank for the matrices in
    order until the total reaches `params` — every matrix keeps rank k or k + 1 and the
    baseline holds between `params` and `params` + max(m + n) (under 0.1 % of the tiny
    model's matrices; `uniform_choices` alone over-shoots by up to one whole share, 1.3 %)."""
    fractions, i = _uniform_index(shapes, params)
    above = _uniform_at(shapes, fractions[i])
    if i == 0 or sum(c.params for c in above.values()) == params:
        return above
    base = _uniform_at(shapes, fractions[i - 1])
    total = sum(c.params for c in base.values())
    for n, c in base.items():
        if total >= params:
            break
        if c.kept < c.full_rank:
            base[n] = Choice(shape=c.shape, kept=c.kept + 1, low_rank=True)
            total += sum(c.shape)
    return base if total >= params else above


def rank_reduction_choices(normalized: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]],
                           ratio: float) -> tuple[float, dict[str, Choice]]:
    """The reference's own compression experiment (welore_rank_reduction.py, --min_ratio 0.0):
    the smallest threshold whose pruned ranks reach `ratio` of the summed ranks, and every
    matrix with any rank pruned replaced by rank-k factors — even where k(m + n) > m·n, so
    its parameter saving is smaller than `ratio` (for a square matrix a 50 % rank cut saves
    nothing). For comparison with the paper's figures, not for `gradproj compress`."""
    total = sum(min(s) for s in shapes.values())
    values = sorted({float(v) for s in normalized.values() for v in s.tolist() if 0.0 < v <= 1.0})

    def at(t: float) -> dict[str, Choice]:
        out = {}
        for n, s in shapes.items():
            pruned = min(pruned_count(normalized[n], t), min(s) - 1)
            out[n] = Choice(shape=s, kept=min(s) - pruned, low_rank=pruned > 0)
        return out

    def reduced(ch: dict[str, Choice]) -> float:
        return sum(c.full_rank - c.kept for c in ch.values()) / total

    lo, hi = 0, len(values) - 1
    if reduced(at(values[hi])) < ratio:
        raise ValueError(f"option 'ratio' {ratio} is out of reach in rank terms")
    while lo < hi:
        mid = (lo + hi) // 2
        if reduced(at(values[mid])) >= ratio:
            hi = mid
        else:
            lo = mid + 1
    return values[lo], at(values[lo])


def factorize(w: torch.Tensor, kept: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B = U_k·√S_k (m×k), A = √S_k·V_kᵀ (k×n): the reference LowRankLayer's split of the
    best rank-k approximation (Eckart–Young), so B·A = U_k S_k V_kᵀ."""
    u, s, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
    root = s[:kept].sqrt()
    return (u[:, :kept] * root).to(w.dtype), (root[:, None] * vh[:kept]).to(w.dtype)
