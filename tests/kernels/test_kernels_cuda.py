"""GPU lane (skipped without CUDA): every kernel on a real device against its reference,
with the interpreter lane's dtype-derived bounds; run where a GPU is lent:
    python -m pytest tests/kernels/test_kernels_cuda.py

Codes are compared exactly where the kernel performs the reference's IEEE operations
(`tl.div_rn` for every division, products without a fused add, the same counter-based
random bits): q4, INT4 and INT8-SR codes and all scales. README.md says "the same codes on
CPU and GPU"; these tests are what that claim rests on. q8 keeps `codes_agree` (equal, or
one apart at a midpoint within 2u), the bound its binary search is derived for."""
import pytest
import torch
from kernel_helpers import (U, adam_direction_bound, adam_moment_bounds, assert_within,
                            codes_agree, storage_rounding)

from gradproj.kernels import adam, adam_q8, backproj, int4, int8_sr, lion, q4, q8
from gradproj.kernels.qmaps import tables

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SIZES = [1, 255, 257, 4097, 65536 + 3, 1 << 22]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_adam_cuda(n, storage):
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen)
    m0, v0 = (torch.randn(n, generator=gen) * 0.1).to(storage), (torch.rand(n, generator=gen) * 0.01).to(storage)
    m, v = m0.cuda(), v0.cuda()
    d = adam.adam_step(g.cuda(), m, v, 0.9, 0.999, 1e-6, 0.7).cpu()
    mr, vr = m0.clone(), v0.clone()
    dr = adam.adam_step_ref(g, mr, vr, 0.9, 0.999, 1e-6, 0.7)
    err_m, err_v = adam_moment_bounds(g, m0.float(), v0.float(), 0.9, 0.999)
    mf, vf = m0.float() * 0.9 + 0.1 * g, v0.float() * 0.999 + 0.001 * g * g
    assert_within(d, dr, adam_direction_bound(mf, vf, err_m, err_v, 1e-6, 0.7), "direction")
    assert_within(m.cpu().float(), mr.float(), err_m + 2 * storage_rounding(mf, storage), "m")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("signed", [True, False])
def test_codecs_cuda(n, signed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    x = x if signed else x.abs()
    c, a = q8.q8_quantize(x.cuda(), signed)
    cr, ar = q8.q8_quantize_ref(x, signed)
    assert torch.equal(a.cpu(), ar)
    _, mids = tables(8, signed, "cpu")
    scaled = (torch.nn.functional.pad(x, (0, (-n) % 256)).view(-1, 256) / ar.clamp(min=1e-38)[:, None]).reshape(-1)[:n]
    codes_agree(c.cpu(), cr, scaled, mids, 2 * U[torch.float32])
    assert torch.equal(q8.q8_dequantize(cr.cuda(), ar.cuda(), signed).cpu(), q8.q8_dequantize_ref(cr, ar, signed))
    c4, a4 = q4.q4_quantize(x.cuda(), signed)
    c4r, a4r = q4.q4_quantize_ref(x, signed)
    assert torch.equal(a4.cpu(), a4r) and torch.equal(c4.cpu(), c4r)
    assert torch.equal(q4.q4_dequantize(c4r.cuda(), a4r.cuda(), signed, (n,)).cpu(),
                       q4.q4_dequantize_ref(c4r, a4r, signed, (n,)))
    ci, si = int8_sr.int8_sr_quantize(x.cuda(), 11)
    cir, sir = int8_sr.int8_sr_quantize_ref(x, 11)
    assert torch.equal(si.cpu(), sir) and torch.equal(ci.cpu(), cir)
    c1, s1, m1 = int4.int4_quantize(x.cuda())
    c1r, s1r, m1r = int4.int4_quantize_ref(x)
    assert torch.equal(s1.cpu(), s1r) and torch.equal(m1.cpu(), m1r) and torch.equal(c1.cpu(), c1r)


@pytest.mark.parametrize("n", SIZES)
def test_quantized_adam_and_lion_cuda(n):
    gen = torch.Generator().manual_seed(n)
    g = torch.randn(n, generator=gen) * 1e-2
    st = [*q8.q8_quantize_ref(torch.randn(n, generator=gen) * 1e-2, True),
          *q8.q8_quantize_ref(torch.rand(n, generator=gen) * 1e-4, False)]
    dev = [t.cuda() for t in st]
    d = adam_q8.adam_q8_step(g.cuda(), *dev, 0.9, 0.999, 1e-8, 0.5).cpu()
    m0, v0 = q8.q8_dequantize_ref(st[0], st[1], True), q8.q8_dequantize_ref(st[2], st[3], False)
    dr = adam_q8.adam_q8_step_ref(g, *st, 0.9, 0.999, 1e-8, 0.5)
    err_m, err_v = adam_moment_bounds(g, m0, v0, 0.9, 0.999)
    mf, vf = m0 * 0.9 + 0.1 * g, v0 * 0.999 + 0.001 * g * g
    assert_within(d, dr, adam_direction_bound(mf, vf, err_m, err_v, 1e-8, 0.5), "q8 direction")
    assert (dev[0].cpu() != st[0]).float().mean() < 1e-3
    m = torch.randn(n, generator=gen)
    mc = m.cuda()
    dl = lion.lion_update(g.cuda(), mc, 0.9, 0.99).cpu()
    m_before = m.clone().double()
    dlr = lion.lion_update_ref(g, m, 0.9, 0.99)
    # signs may differ only where c is within its rounding error (3 roundings) of zero
    c = torch.lerp(g.double(), m_before, 0.9)
    near_zero = c.abs() <= 3 * U[torch.float32] * (m_before.abs() + g.double().abs())
    assert torch.equal(dl[~near_zero], dlr[~near_zero])


@pytest.mark.parametrize("shape,r,side", [((4096, 1024), 128, "right"), ((1000, 3000), 64, "left"),
                                          ((257, 129), 17, "right")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backproject_cuda(shape, r, side, dtype):
    gen = torch.Generator().manual_seed(r)
    m, n = shape
    w = torch.randn(m, n, generator=gen).to(dtype)
    basis = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=gen))[0].to(dtype)
    low = torch.randn(*((r, n) if side == "left" else (m, r)), generator=gen)
    wc = w.cuda()
    backproj.backproject_update(wc, basis.cuda(), low.cuda(), side, 0.5, 0.25, 0.1)
    wr = backproj.backproject_update_ref(w.clone(), basis, low, side, 0.5, 0.25, 0.1)
    p, q = (basis.float(), low) if side == "left" else (low, basis.float().T)
    exact = (p.double() @ q.double()).abs()
    gemm = (r + 2) * U[torch.float32] * (p.abs().double() @ q.abs().double())
    w1 = wr.double().abs() + 0.5 * 0.25 * exact
    bound = 0.5 * 0.25 * (gemm + 2 * U[dtype] * exact) + 4 * U[dtype] * w1
    assert_within(wc.cpu().float(), wr.float(), bound, f"weight {side} {dtype}")
