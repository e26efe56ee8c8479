"""Back-projection GEMM with the parameter update fused into its epilogue.

For a low-rank step with the "drop" residual the optimizer computes, for W (m×n),

    U = α·back(N)      back(N) = P·N ("left", P m×r)  or  N·Pᵀ ("right", P n×r)
    W ← W − lr·U;  then W ← W − lr·wd·W   (decoupled weight decay on the updated W)

`backproject_update` does it as one tiled matmul whose epilogue reads W once and writes it
once, so the m×n update U is never materialised: 2·m·n·bytes(W) of traffic instead of
~5·m·n·4 for matmul, scale, cast, add and decay through PyTorch. The epilogue rounds where
`LowRankOptimizer` rounds (U to W's dtype, then W after each of the two adds), so bf16
weights see the same rounding points. The products run on tensor cores as 3×TF32
(`input_precision="tf32x3"`, error ≈ fp32's over the r-long reduction; wgmma on sm_90,
mma.sync on sm_80) with operands up-cast to fp32, as the reference's `load_basis().float()`.

On CPU (GRADPROJ_KERNELS=auto) an fp32 weight of at least `CPU_FUSE_MIN_NUMEL` values takes
`W.addmm_(P, N, alpha=−lr·α)` instead: the GEMM accumulates into W, so U is not materialised
either. One thread, fp32, r 128: 512×512 0.65 ms against 1.44 ms for the batched matmul,
scale and foreach add (0.45×); 512×1376 0.53×; 768×2048 r 256 0.78× (the GEMM itself
dominates). Smaller weights keep the bucket's one batched matmul: there the host cost of
one call per weight outweighs the traffic saved.

The "drop" residual calls it (`Drop.fused_step`), once per weight of a bucket, where the
optimizer finds it exact and `fuses` says it pays: a dense contiguous fp32/bf16/fp16 weight,
a one-sided stored basis, Triton selected for the weight's device or the CPU rule above.
Elsewhere the bucket's batched matmul runs.
"""
import torch

from .dispatch import CompileConfig, interpreting, mode, register_kernel, tl, triton, use_triton

# 64K values (256 KiB of fp32): the size from which CPU weights also step alone in their
# bucket (optimizers/buckets.py), so the fused call replaces a bucket of one's batched matmul
CPU_FUSE_MIN_NUMEL = 1 << 16


@triton.jit
def _backproj_update_kernel(w_ptr, a_ptr, b_ptr, M, N, K, stride_wm, stride_wn,
                            stride_am, stride_ak, stride_bk, stride_bn, neg_lr, alpha, decay,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            GROUP_M: tl.constexpr):
    # grouped launch order: GROUP_M row-tiles share their B column panel in L2
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None].to(tl.int64) * stride_am + kk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0).to(tl.float32)
        b = tl.load(b_ptr + kk[:, None] * stride_bk + rn[None, :].to(tl.int64) * stride_bn,
                    mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="tf32x3")

    mask = (rm[:, None] < M) & (rn[None, :] < N)
    w_offs = rm[:, None].to(tl.int64) * stride_wm + rn[None, :].to(tl.int64) * stride_wn
    w = tl.load(w_ptr + w_offs, mask=mask, other=0.0)
    update = (acc * alpha).to(w.dtype).to(tl.float32)        # update.to(p.dtype)
    w = (w.to(tl.float32) + neg_lr * update).to(w.dtype)     # p.add_(U, alpha=-lr)
    w = (w.to(tl.float32) + decay * w.to(tl.float32)).to(w.dtype)  # p.add_(p, alpha=-lr·wd)
    tl.store(w_ptr + w_offs, w, mask=mask)


def _operands(basis, low, side):
    if side == "left":   # W (m×n) += P (m×r) · N (r×n)
        return basis, low
    if side == "right":  # W (m×n) += N (m×r) · Pᵀ (r×n)
        return low, basis.T
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def backproject_update_ref(weight, basis, low, side, lr, scale, weight_decay):
    """Reference: `LowRankOptimizer`'s drop-residual step, op for op; `weight` (m×n) in place."""
    a, b = _operands(basis.float(), low.float(), side)
    update = (a @ b).mul_(scale)
    weight.add_(update.to(weight.dtype), alpha=-lr)
    if weight_decay:
        weight.add_(weight, alpha=-lr * weight_decay)
    return weight


def _cpu_fuses(weight) -> bool:
    return (mode() == "auto" and weight.device.type == "cpu" and weight.dtype == torch.float32
            and weight.numel() >= CPU_FUSE_MIN_NUMEL)


def fuses(weight, *operands) -> bool:
    """Whether `backproject_update` runs fused (Triton, or addmm_ on CPU) for these tensors."""
    return use_triton(weight, *operands) or _cpu_fuses(weight)


def _backproject_update_cpu(weight, basis, low, side, lr, scale, weight_decay):
    # C ← C + α·A·B inside the GEMM: one rounding of the update where the reference has
    # three (the product, ·scale, ·lr), so it agrees with it to the Triton kernel's bound
    a, b = _operands(basis.float(), low.float(), side)
    weight.addmm_(a, b, alpha=-lr * scale)
    if weight_decay:
        weight.add_(weight, alpha=-lr * weight_decay)
    return weight


def _tiles():
    # 128×64×32 tiles, 4 warps. Measured on an H100 (fp32 W, N·Pᵀ, right side): 4096×4096 r512
    # 0.272 ms (63 TFLOP/s; 128×128×32/8 warps 0.277, 128×128×64/8 warps 0.257), 4096×11008
    # r1024 1.263 ms (73; 128×128×64: 1.147), 4096×4096 r128 0.103 ms (42; 128×128×64: 0.111):
    # within 10 % of the best everywhere, with half the accumulator registers of 128×128.
    # The interpreter runs a few large tiles (its cost is per program).
    return (128, 64, 32, 4) if not interpreting() else (64, 64, 32, 4)


def backproject_update(weight, basis, low, side, lr, scale, weight_decay):
    """W ← W − lr·(scale·back(low)) − lr·wd·W with back by `side`, fused; `weight` (m×n) in place."""
    a, b = _operands(basis, low, side)
    m, n = weight.shape
    if a.shape[0] != m or b.shape[1] != n or a.shape[1] != b.shape[0]:
        raise ValueError(f"back-projection of shapes {tuple(a.shape)}·{tuple(b.shape)} does not "
                         f"match the weight's {tuple(weight.shape)}")
    if not use_triton(weight, basis, low):
        if _cpu_fuses(weight):
            return _backproject_update_cpu(weight, basis, low, side, lr, scale, weight_decay)
        return backproject_update_ref(weight, basis, low, side, lr, scale, weight_decay)
    block_m, block_n, block_k, warps = _tiles()
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    decay = -lr * weight_decay if weight_decay else 0.0
    _backproj_update_kernel[grid](weight, a, b, m, n, a.shape[1], weight.stride(0),
                                  weight.stride(1), a.stride(0), a.stride(1), b.stride(0),
                                  b.stride(1), -lr, scale, decay, BLOCK_M=block_m,
                                  BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8, num_warps=warps)
    return weight


def _configs():
    sig = {"w_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_wm": "i32", "stride_wn": "i32", "stride_am": "i32",
           "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32", "neg_lr": "fp32",
           "alpha": "fp32", "decay": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "GROUP_M": "constexpr"}
    const = {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}
    return (CompileConfig(_backproj_update_kernel, sig, const, num_warps=4, tensor_cores=True),
            CompileConfig(_backproj_update_kernel, dict(sig, w_ptr="*bf16", a_ptr="*bf16"), const,
                          num_warps=4, tensor_cores=True))


register_kernel("backproject_update", backproject_update, backproject_update_ref, _configs())
