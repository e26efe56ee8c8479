"""The randomized range finder on a row-sharded gradient (FSDP2), communicating only thin pieces.

Each rank holds G_k, rows [o_k, o_k + m_k) of the m×n gradient G. A right basis (P is
n×r, R = G·P row-sharded like G, so projection never communicates) is `range_finder(Gᵀ)` — the same algorithm the single-process projector runs
(Halko, Martinsson & Tropp 2011), with every large product split by rows:

    Ω  (m×w, w = r + p) drawn from the same seed on every rank; rank k uses rows Ω_k
    Y  = Gᵀ·Ω = Σ_k G_kᵀ·Ω_k                  all-reduce n×w
    Q  = qr(Y)                                 local Householder QR, same on every rank
    q power iterations:
        Z_k = G_k·Q  → Cholesky-QR2            all-reduce w×w (twice), fp64 Gram
        Q   = qr(Σ_k G_kᵀ·Z_k)                 all-reduce n×w, local QR
    C_k = G_k·Q;  Bᵀ = C = [C_1; …; C_W]       all-gather m×w
    basis = Q · svd(B).U[:, :r]

Floats per refresh, all collectives together: (q+1)·n·w (all-reduces of Y) + 2q·w²
(Grams) + m·w (the gather of C), against m·n to gather G. At LLaMA-7B's down projection
(4096×11008, p = 8, q = 1): 3.6 M vs 45.1 M floats at r = 128 (8 %), 14.1 M at r = 512
(31 %). Measured per rank by benchmarks/distributed_refresh.py: 12.8 MiB sent vs 172 MiB.

Why each piece is what it is, so that the result equals the single-process basis to
fp32 rounding (signs included, which matters: GaLore keeps its moments across refreshes):
- Y and the Q of every half step are Householder QRs of the same replicated matrix as in
  the single-process code, so they carry LAPACK's sign choices.
- Cholesky-QR returns Z with a positive-diagonal R; Householder's Z differs only by column
  signs, and the Householder Q of Gᵀ·Z is invariant to column signs of its input (each
  reflector depends on v·vᵀ only), so the next Q is unchanged.
- The final small SVD is of the same w×m matrix B the single-process code factors; an SVD
  of an equivalent w×w factor would pick its own signs, hence the m×w gather.
Rounding can still tip LAPACK's sign for a column now and then (so can the all-reduce
order under DDP, or a different BLAS thread count in one process): with moments = "keep"
such a flip moves a run by O(lr); moments = "rotate" makes the step sign-invariant.

A left basis (P is m×r, R = Pᵀ·G = Σ_k P_kᵀ·G_k) is `range_finder(G)`:
`sharded_left_range_finder` below, which all-gathers the thin m×w sketches instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..projectors.randomized import seeded_generator


def row_layout(local_rows: int, group=None, device=None) -> tuple[int, int, list[int]]:
    """(this rank's first global row, global rows, every rank's row count).

    `device`: where the collective runs — the gradient's device (NCCL has no CPU tensors)."""
    counts = torch.tensor([local_rows], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(counts) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, counts, group=group)
    sizes = [int(t) for t in gathered]
    me = dist.get_rank(group)
    return sum(sizes[:me]), sum(sizes), sizes


def all_gather_rows(local: torch.Tensor, sizes: list[int], group=None) -> torch.Tensor:
    """Concatenate every rank's rows (uneven counts: gloo wants equal buffers, so pad)."""
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


def gather_rows(local: torch.Tensor, sizes: list[int], dst: int, group=None) -> torch.Tensor | None:
    """The full matrix on rank `dst` (of `group`), None elsewhere."""
    width = max(sizes)
    padded = local.new_zeros((width, *local.shape[1:]))
    padded[: local.shape[0]] = local
    me = dist.get_rank(group)
    parts = [torch.empty_like(padded) for _ in sizes] if me == dst else None
    dist.gather(padded, parts, dst=dst if group is None else dist.get_global_rank(group, dst),
                group=group)
    if me != dst:
        return None
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


def cholesky_qr(z: torch.Tensor, group=None, passes: int = 2) -> torch.Tensor:
    """Orthonormalise the row-sharded tall matrix z (m_k×w per rank) with w×w all-reduces.

    One pass: Gram = Σ_k Z_kᵀ·Z_k, R = chol(Gram), Z_k ← Z_k·R⁻¹. The Gram is formed in
    fp64 so one pass loses at most κ(Z)²·1e-16 of orthogonality; the second pass (CholQR2,
    Yamamoto et al. 2015) brings it to fp32 level for κ(Z) up to ~1e7. A rank-deficient Z
    (a zero gradient, rank(G) < w) makes the Gram singular: then shift it by
    11·(m·w + w²)·u·‖Gram‖ (Fukaya et al. 2020's shifted CholQR), which always factors.
    """
    q = z.double()
    for _ in range(passes):
        gram = q.T @ q
        dist.all_reduce(gram, group=group)
        upper, info = torch.linalg.cholesky_ex(gram, upper=True)
        if info.item() != 0:
            rows = q.shape[0] * dist.get_world_size(group)
            shift = 11 * (rows * gram.shape[0] + gram.shape[0] ** 2) * 1.1e-16 * gram.norm()
            upper = torch.linalg.cholesky(gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype,
                                                                   device=gram.device),
                                          upper=True)
        q = torch.linalg.solve_triangular(upper, q, upper=True, left=False)
    return q.to(z.dtype)


def sharded_range_finder(g_local: torch.Tensor, rank: int, *, oversample: int, power_iters: int,
                         seed: int, group=None) -> torch.Tensor:
    """n×rank orthonormal right basis of the row-sharded G; equals
    `range_finder(G.T, rank, oversample=, power_iters=, seed=)` to fp32 rounding on every rank."""
    g = g_local.float()
    offset, rows, sizes = row_layout(g.shape[0], group, g.device)
    cols = g.shape[1]
    width = min(rank + oversample, cols, rows)
    # the single-process code draws Ω (m×w) in one call; draw it whole and keep our rows
    omega = torch.randn(rows, width, generator=seeded_generator(g.device, seed),
                        device=g.device, dtype=g.dtype)[offset: offset + g.shape[0]]
    y = g.T @ omega
    dist.all_reduce(y, group=group)
    q, _ = torch.linalg.qr(y)
    for _ in range(power_iters):
        z = cholesky_qr(g @ q, group)
        y = g.T @ z
        dist.all_reduce(y, group=group)
        q, _ = torch.linalg.qr(y)
    c = all_gather_rows(g @ q, sizes, group)       # m×w: Bᵀ
    u_small, _, _ = torch.linalg.svd(c.T, full_matrices=False)
    return q @ u_small[:, :rank]


def sharded_left_range_finder(g_local: torch.Tensor, rank: int, *, oversample: int,
                              power_iters: int, seed: int, group=None) -> torch.Tensor:
    """m×rank orthonormal *left* basis of the row-sharded G, whole on every rank; equals
    `range_finder(G, rank, oversample=, power_iters=, seed=)` to fp32 rounding.

    The left basis spans G's columns, so its rows are G's rows. Every tall m×w sketch
    (Y = G·Ω, G·Z) is formed locally on this rank's rows and all-gathered (m×w), so each
    Householder QR factors the same replicated matrix as the one-process code and keeps
    LAPACK's column signs; the products that sum over rows (Gᵀ·Q, B = Qᵀ·G) all-reduce
    n×w and w×n partials. Floats per refresh: (q+1)·m·w gathered + (q+1)·n·w reduced.
    """
    g = g_local.float()
    offset, rows, sizes = row_layout(g.shape[0], group, g.device)
    cols = g.shape[1]
    width = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, width, generator=seeded_generator(g.device, seed),
                        device=g.device, dtype=g.dtype)  # n×w: the same whole Ω everywhere
    q, _ = torch.linalg.qr(all_gather_rows(g @ omega, sizes, group))
    for _ in range(power_iters):
        y = g.T @ q[offset: offset + g.shape[0]]
        dist.all_reduce(y, group=group)
        z, _ = torch.linalg.qr(y)
        q, _ = torch.linalg.qr(all_gather_rows(g @ z, sizes, group))
    b = q[offset: offset + g.shape[0]].T @ g           # w×n partial of Qᵀ·G
    dist.all_reduce(b, group=group)
    u_small, _, _ = torch.linalg.svd(b, full_matrices=False)
    return q @ u_small[:, :rank]


def range_finder_floats(m: int, n: int, rank: int, oversample: int, power_iters: int,
                        side: str = "right") -> int:
    """Floats in the collectives of one sharded refresh of an m×n gradient (m rows sharded),
    for the right basis (`sharded_range_finder`) or the left one (`sharded_left_range_finder`)."""
    w = min(rank + oversample, m, n)
    if side == "left":
        return (power_iters + 1) * (m * w + n * w)
    return (power_iters + 1) * n * w + 2 * power_iters * w * w + m * w
