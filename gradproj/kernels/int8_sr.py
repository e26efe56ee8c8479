"""Group-wise symmetric INT8 weight codec with seeded stochastic rounding (Q-GaLore weights).

Layout (the same as `gradproj/quant/int8.py`): the flattened tensor is cut into groups of
`group_size` (256) values; each group stores fp32 scale = absmax/127 (1 for an all-zero
group) and int8 codes in the tensor's own shape, x ≈ code·scale.

    codes, scale = int8_sr_quantize(x, seed, group_size=256, stochastic=True)
    x_hat = int8_dequantize(codes, scale, group_size=256)          # fp32, codes' shape

Rounding: y = x/scale, r = floor(y), code = r + [u < y − r] with u ∈ [0, 1) drawn per
element from a counter-based hash of (seed, flat index) — 24 random bits, so
P(code = r + 1) = y − r up to 2⁻²⁴ and E[code·scale] = x: the mean of many roundings
converges to the fp32 value. The same seed gives the same codes on every device and in
both implementations (no torch.Generator state); change the seed every step. With
`stochastic=False` the code is round-half-to-even(y), as `torch.round`.
`sr_uniform_ref(numel, seed)` returns the u's, for callers that want to reproduce them.
"""
import torch

from . import cpu_counter_rng
from .counter_rng import seed_keys, uniform, uniforms
from .dispatch import CompileConfig, register_kernel, tile, tl, triton, use_triton

DEFAULT_GROUP = 256
QMAX = 127
def sr_uniform_ref(numel: int, seed: int, device=None) -> torch.Tensor:
    """The fp32 u ∈ [0, 1) used for element i of a tensor: hash(hash(i ^ k0) ^ k1) >> 8 · 2⁻²⁴
    (`counter_rng.uniform`; the kernel computes the same hash in registers)."""
    return uniform(numel, seed, device)


def _signed32(k: int) -> int:  # launch argument as i32; the kernel bitcasts it back
    return k - (1 << 32) if k >= 1 << 31 else k


@triton.jit
def _hash32_tl(x):
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _int8_quantize_kernel(x_ptr, codes_ptr, scale_ptr, n, group, k0, k1,
                          STOCHASTIC: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * group + cols[None, :]
    valid = (cols[None, :] < group) & (offs < n)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    absmax = tl.max(tl.abs(x), axis=1)
    scale = tl.div_rn(absmax, tl.full(absmax.shape, 127.0, tl.float32))
    scale = tl.where(scale > 0, scale, 1.0)
    y = tl.div_rn(x, scale[:, None])
    r = tl.floor(y)
    frac = y - r  # exact for |y| ≤ 127
    if STOCHASTIC:
        idx = offs.to(tl.uint32)
        h = _hash32_tl(_hash32_tl(idx ^ k0.to(tl.uint32, bitcast=True)) ^ k1.to(tl.uint32, bitcast=True))
        u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
        q = r + tl.where(u < frac, 1.0, 0.0)
    else:  # half to even, as torch.round
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        q = r + tl.where((frac > 0.5) | ((frac == 0.5) & odd), 1.0, 0.0)
    q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=valid)
    tl.store(scale_ptr + rows, scale, mask=rows * group < n)


@triton.jit
def _int8_dequantize_kernel(codes_ptr, scale_ptr, out_ptr, n, group,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * group + cols[None, :]
    valid = (cols[None, :] < group) & (offs < n)
    codes = tl.load(codes_ptr + offs, mask=valid, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows * group < n, other=0.0)
    tl.store(out_ptr + offs, (codes * scale[:, None]).to(out_ptr.dtype.element_ty), mask=valid)


def _check_group(group_size):
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"option 'group_size' must be a positive integer, got {group_size!r}")


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:  # zeros never raise a group's absmax; their codes are dropped
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


def int8_sr_quantize_ref(x, seed, group_size=DEFAULT_GROUP, stochastic=True):
    """Reference: (codes int8 of x's shape, scale fp32 [ceil(numel/group_size)])."""
    _check_group(group_size)
    groups = _groups(x, group_size)
    scale = groups.abs().amax(dim=1) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = groups / scale[:, None]
    r = torch.floor(y)
    frac = y - r
    if stochastic:
        u = sr_uniform_ref(groups.numel(), seed, x.device).view_as(y)
        q = r + (u < frac).float()
    else:
        q = torch.round(y)
    codes = q.clamp_(-QMAX, QMAX).to(torch.int8).reshape(-1)[:x.numel()]
    return codes.reshape(x.shape), scale


def int8_dequantize_ref(codes, scale, group_size=DEFAULT_GROUP):
    """Reference: fp32 tensor of codes' shape, code · scale of its group."""
    _check_group(group_size)
    groups = _groups(codes, group_size)
    return (groups * scale[:, None]).reshape(-1)[:codes.numel()].reshape(codes.shape)


def _launch(numel, group_size):
    block = triton.next_power_of_2(group_size) if hasattr(triton, "next_power_of_2") else group_size
    rows = max(1, tile(1024, 1 << 15) // block)
    return -(-numel // group_size), rows, block


def int8_sr_quantize(x, seed, group_size=DEFAULT_GROUP, stochastic=True):
    """Quantize to group-wise int8 with seeded stochastic rounding: (codes, scale)."""
    _check_group(group_size)
    k0, k1 = seed_keys(seed)
    if not use_triton(x):
        return int8_sr_quantize_ref(x, seed, group_size, stochastic)
    x = x.contiguous()
    groups, rows, block = _launch(x.numel(), group_size)
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(groups, dtype=torch.float32, device=x.device)
    if groups:
        _int8_quantize_kernel[(triton.cdiv(groups, rows),)](
            x, codes, scale, x.numel(), group_size, _signed32(k0), _signed32(k1),
            STOCHASTIC=bool(stochastic), ROWS=rows, BLOCK=block)
    return codes, scale


def _row_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """k rows (x is k×…) cut into groups as `_groups` cuts each: k×groups×group_size,
    each row's last group padded with zeros."""
    flat = x.reshape(x.shape[0], -1).float()
    pad = (-flat.shape[1]) % group_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(x.shape[0], -1, group_size)


def int8_sr_quantize_rows(x, seeds, group_size=DEFAULT_GROUP):
    """k tensors at once, row i of `x` (k×…) rounded stochastically with seeds[i]: the
    codes (int8, x's shape) and scales (k×groups) `int8_sr_quantize` gives each row.

    Triton: one launch per row; on CPU the C loop of `cpu_counter_rng.py`; elsewhere (and
    with GRADPROJ_KERNELS=reference) the reference's math on the k rows together, with the
    k counter streams drawn in one pass.
    """
    _check_group(group_size)
    if use_triton(x):
        pairs = [int8_sr_quantize(row, seed, group_size) for row, seed in zip(x, seeds)]
        return torch.stack([c for c, _ in pairs]), torch.stack([s for _, s in pairs])
    if x.device.type == "cpu" and x.shape[0] and x[0].numel():
        fast = cpu_counter_rng.int8_sr_rows(x, *_row_keys(seeds), group_size)
        if fast is not None:  # the C loop of cpu_counter_rng.py: the same codes and scales
            return fast
    groups = _row_groups(x, group_size)
    scale = groups.abs().amax(dim=2) / QMAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = groups / scale[..., None]
    r = torch.floor(y)
    u = uniforms(seeds, groups[0].numel(), x.device).view_as(y)
    q = r + (u < y - r).float()
    codes = q.clamp_(-QMAX, QMAX).to(torch.int8).view(x.shape[0], -1)[:, :x[0].numel()]
    return codes.reshape(x.shape), scale


def _row_keys(seeds) -> tuple[list[int], list[int]]:
    """The k0 and k1 keys of each row's counter stream (as `int8_sr_quantize` derives them)."""
    pairs = [seed_keys(int(s) % (1 << 63)) for s in seeds]
    return [a for a, _ in pairs], [b for _, b in pairs]


def int8_step_rows(codes, scales, update, lr, weight_decay, seeds, group_size=DEFAULT_GROUP):
    """W ← W − lr·U, then W ← W − lr·wd·W (wd ≠ 0), on k INT8 weights in place (codes[i],
    scales[i], row i of `update`, re-quantized as `int8_sr_quantize_rows` with seeds[i]):
    True where the C pass of `cpu_counter_rng.py` ran it (CPU, GRADPROJ_KERNELS=auto),
    False (nothing written) elsewhere."""
    _check_group(group_size)
    if update.device.type != "cpu":
        return False
    codes = list(codes)
    ran = cpu_counter_rng.int8_step_rows(
        codes, list(scales), update.reshape(len(codes), -1).float().contiguous(), lr,
        weight_decay, *_row_keys(seeds), group_size)
    if ran:  # written through their addresses: tell autograd, as an in-place op would
        torch.autograd.graph.increment_version(codes)
    return ran


def int8_dequantize_rows(codes, scale, group_size=DEFAULT_GROUP):
    """`int8_dequantize` of k tensors at once: codes k×…, scale k×groups; fp32, codes' shape."""
    _check_group(group_size)
    if use_triton(codes, scale):
        return torch.stack([int8_dequantize(c, s, group_size) for c, s in zip(codes, scale)])
    if codes.shape[0] and codes[0].numel():
        fast = cpu_counter_rng.int8_dequantize_rows(codes, scale, group_size)
        if fast is not None:  # C on CPU: the same products
            return fast
    values = _row_groups(codes, group_size) * scale[..., None]
    return values.view(codes.shape[0], -1)[:, :codes[0].numel()].reshape(codes.shape)


def int8_dequantize(codes, scale, group_size=DEFAULT_GROUP):
    """fp32 tensor of codes' shape: code · scale of its group."""
    _check_group(group_size)
    if not use_triton(codes, scale):
        return int8_dequantize_ref(codes, scale, group_size)
    codes = codes.contiguous()
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    groups, rows, block = _launch(codes.numel(), group_size)
    if groups:
        _int8_dequantize_kernel[(triton.cdiv(groups, rows),)](
            codes, scale, out, codes.numel(), group_size, ROWS=rows, BLOCK=block)
    return out


def _configs():
    q = {"x_ptr": "*fp32", "codes_ptr": "*i8", "scale_ptr": "*fp32", "n": "i32", "group": "i32",
         "k0": "i32", "k1": "i32", "STOCHASTIC": "constexpr", "ROWS": "constexpr",
         "BLOCK": "constexpr"}
    d = {"codes_ptr": "*i8", "scale_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "group": "i32",
         "ROWS": "constexpr", "BLOCK": "constexpr"}
    return ((CompileConfig(_int8_quantize_kernel, q, {"STOCHASTIC": True, "ROWS": 4, "BLOCK": 256}),
             CompileConfig(_int8_quantize_kernel, q, {"STOCHASTIC": False, "ROWS": 4, "BLOCK": 256})),
            (CompileConfig(_int8_dequantize_kernel, d, {"ROWS": 4, "BLOCK": 256}),))


register_kernel("int8_sr_quantize", int8_sr_quantize, int8_sr_quantize_ref, _configs()[0])
register_kernel("int8_dequantize", int8_dequantize, int8_dequantize_ref, _configs()[1])
