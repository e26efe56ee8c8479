"""Fast CPU twins of the q8/q4 blockwise codecs (`q8.py`, `q4.py`): one pass per block, in C.

The reference quantizer is `scale_ref` + `torch.bucketize` over the map's midpoints; on CPU
`bucketize` alone takes ~90 ns an element (90 ms for 1M values on one thread), the rest of
the chain ~10 passes over memory. Here each block of 256 (q8) or 128 (q4) values is done
in one pass while it sits in L1, by a few lines of C (`cpu_native.py` compiles them once
per machine; without a compiler every function here returns None and callers run the
reference). Per block, exactly the reference's operations:

    absmax = max |x|            integer max of the sign-cleared float bits: for non-negative
                                floats the bit order is the value order, and a NaN's bits
                                exceed +inf's, so a NaN anywhere makes absmax NaN (torch.amax)
    inv    = 1 / max(absmax, (float)1e-38)      1.0 / absmax.clamp(min=1e-38); NaN stays NaN
    s      = clamp(x · inv, −1, 1)              NaN passes through, as torch.clamp
    code   = #{midpoints m : !(m ≥ s)}          torch.bucketize's lower_bound predicate:
                                                ties go to the lower code, NaN to the last

That count is found without bucketize's per-element loop. q4: all 15 midpoints are
compared at once (a vectorised count). q8 with AVX-512 (where `-march=native` has it): the
8-level binary search over the 255 midpoints for 16 values at once, each level's candidate
midpoints picked from registers by permutes. q8 elsewhere (the portable build): floats
sharing their sign, exponent and top 6 mantissa bits form a bucket, an interval [lo, hi];
a 32 KiB table built from `torch.bucketize` itself gives first = #{m < lo}, and since no
bucket holds more than 2 of the 255 midpoints,
code = first + [mids[first] < s] + [mids[first+1] < s] (see `codebook`): the same count
by construction. Both builds are tested against the reference on every machine.
Every step is one IEEE operation rounded as written (no FMA contraction, no fast-math), so
codes and absmax are bit-identical to the reference; the q4 tail block is zero-padded (and
its padding codes stored) as `q4_quantize_ref` does. Dequantization is code[c] · absmax,
optionally times a `scale` (one more rounding: the fused Adam step's β·M).

With several torch threads, large tensors are split into block ranges run on a thread pool
(ctypes releases the GIL); the result does not depend on the split.
"""
from __future__ import annotations

import ctypes
import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .cpu_native import load
from .dispatch import mode
from .qmaps import tables

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 1e-38 as ATen casts the double scalar of clamp(min=1e-38) to float (a subnormal) */
#define TINY ((float)1e-38)

static inline float block_absmax(const float* x, int len) {
    uint32_t m = 0;
    for (int i = 0; i < len; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b &= 0x7fffffffu;
        m = b > m ? b : m;
    }
    float r;
    memcpy(&r, &m, 4);
    return r;
}

static inline float inverse(float absmax) {
    return 1.0f / (absmax < TINY ? TINY : absmax);
}

static inline float clamp1(float s) {  /* NaN passes through, as torch.clamp */
    s = s < -1.0f ? -1.0f : s;
    return s > 1.0f ? 1.0f : s;
}

/* The 8-bit search: a table over buckets of floats sharing their top bits (built by
   `codebook()` in Python) gives the code below the bucket's lowest value; at most K = 2
   midpoints lie inside a bucket, so two comparisons finish it. The scaling and the bucket
   keys are one vectorised loop, the lookups a scalar one: 1M values in ~1.4 ms on one
   core here, against 2.3 ms for one scalar loop doing both and 2.1-4 ms for gcc's
   gather-vectorised lookups. */
typedef struct {
    const uint8_t* first;
    const float* mids;   /* 255 midpoints, then 2 +inf */
    int32_t shift;       /* bucket = float bits >> shift */
} codebook;

static inline void q8_block(const float* restrict x, int len, const codebook* cb,
                            uint8_t* restrict codes, float* absmax) {
    const uint8_t* restrict first_of = cb->first;
    const float* restrict mids = cb->mids;
    int shift = cb->shift;
    float s[256];
    uint32_t key[256];
    float a = block_absmax(x, len);
    float inv = inverse(a);
    *absmax = a;
    for (int i = 0; i < len; i++) {
        float t = clamp1(x[i] * inv);
        uint32_t bits;
        memcpy(&bits, &t, 4);
        s[i] = t;
        key[i] = bits >> shift;
    }
    for (int i = 0; i < len; i++) {
        int first = first_of[key[i]];
        codes[i] = (uint8_t)(first + (mids[first] < s[i]) + (mids[first + 1] < s[i]));
    }
}

/* The 4-bit search: count the 15 midpoints m with !(m >= s), all at once (vectorises
   without gathers: each midpoint is one broadcast compare) */
static inline void q4_block(const float* restrict x, int len, const float* restrict mids,
                            uint8_t* restrict codes, float* absmax) {
    float pad[128];
    int32_t pos[128];
    if (len < 128) {  /* the reference zero-pads the last block and stores those codes */
        memset(pad, 0, sizeof pad);
        memcpy(pad, x, (size_t)len * 4);
        x = pad;
    }
    float a = block_absmax(x, 128);
    float inv = inverse(a);
    *absmax = a;
    for (int i = 0; i < 128; i++) {
        float s = clamp1(x[i] * inv);
        int count = 0;
        for (int j = 0; j < 15; j++) count += !(mids[j] >= s);
        pos[i] = count;
    }
    for (int j = 0; j < 64; j++) codes[j] = (uint8_t)(pos[2 * j] | (pos[2 * j + 1] << 4));
}

#if defined(__AVX512F__) && !defined(GP_PORTABLE)
/* AVX-512 (compiled where -march=native has it): the q8 search as a binary search with
   all 16 lanes at once, each level's candidate midpoints picked by register permutes
   (no memory gathers), and q8 dequantization the same way from the 256 codes in 16
   registers. Same comparisons (!(m >= s), NaN counts), same roundings as above: 1M values
   quantize in ~1.1 ms and dequantize in ~0.43 ms here, against ~2.4 and ~1.3 ms. */
#include <immintrin.h>
#define GP_AVX512 1

/* the 255 midpoints regrouped by binary-search level: level L (7..0) probes
   mids[j * 2^(L+1) + 2^L - 1], j < 2^(7-L); each level's candidates padded to 16 floats */
typedef struct { __m512 l7, l6, l5, l4, l3, l2[2], l1[4], l0[8]; } levels8;

static void build_levels(const float* mids, levels8* lv) {
    float buf[16];
    __m512* dst[] = {&lv->l7, &lv->l6, &lv->l5, &lv->l4, &lv->l3};
    for (int L = 7; L >= 3; L--) {
        int count = 1 << (7 - L);
        for (int j = 0; j < 16; j++) buf[j] = mids[(j % count) * (2 << L) + (1 << L) - 1];
        *dst[7 - L] = _mm512_loadu_ps(buf);
    }
    __m512* big[] = {lv->l2, lv->l1, lv->l0};
    for (int L = 2; L >= 0; L--) {
        int count = 1 << (7 - L);
        for (int r = 0; r < count / 16; r++) {
            for (int j = 0; j < 16; j++) buf[j] = mids[(r * 16 + j) * (2 << L) + (1 << L) - 1];
            big[2 - L][r] = _mm512_loadu_ps(buf);
        }
    }
}

static inline __m512 pick32(__m512 lo, __m512 hi, __m512i j) { return _mm512_permutex2var_ps(lo, j, hi); }

static inline __m512i search8(const levels8* lv, __m512 s) {
    __m512i pos = _mm512_setzero_si512();
    __mmask16 k;
    k = _mm512_cmp_ps_mask(lv->l7, s, _CMP_NGE_UQ);
    pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(128));
    const __m512* small[] = {&lv->l6, &lv->l5, &lv->l4, &lv->l3};
    for (int L = 6; L >= 3; L--) {
        __m512i j = _mm512_srli_epi32(pos, L + 1);
        __m512 probe = _mm512_permutexvar_ps(j, *small[6 - L]);
        k = _mm512_cmp_ps_mask(probe, s, _CMP_NGE_UQ);
        pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(1 << L));
    }
    { /* level 2: 32 candidates */
        __m512i j = _mm512_srli_epi32(pos, 3);
        __m512 probe = pick32(lv->l2[0], lv->l2[1], j);
        k = _mm512_cmp_ps_mask(probe, s, _CMP_NGE_UQ);
        pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(4));
    }
    { /* level 1: 64 candidates */
        __m512i j = _mm512_srli_epi32(pos, 2);
        __mmask16 b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
        __m512 probe = _mm512_mask_blend_ps(b5, pick32(lv->l1[0], lv->l1[1], j), pick32(lv->l1[2], lv->l1[3], j));
        k = _mm512_cmp_ps_mask(probe, s, _CMP_NGE_UQ);
        pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(2));
    }
    { /* level 0: 128 candidates */
        __m512i j = _mm512_srli_epi32(pos, 1);
        __mmask16 b5 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(32));
        __mmask16 b6 = _mm512_test_epi32_mask(j, _mm512_set1_epi32(64));
        __m512 a = _mm512_mask_blend_ps(b5, pick32(lv->l0[0], lv->l0[1], j), pick32(lv->l0[2], lv->l0[3], j));
        __m512 b = _mm512_mask_blend_ps(b5, pick32(lv->l0[4], lv->l0[5], j), pick32(lv->l0[6], lv->l0[7], j));
        __m512 probe = _mm512_mask_blend_ps(b6, a, b);
        k = _mm512_cmp_ps_mask(probe, s, _CMP_NGE_UQ);
        pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(1));
    }
    return pos;
}

static inline void q8_block_v(const float* restrict x, int len, const levels8* lv,
                              uint8_t* restrict codes, float* absmax) {
    const __m512 one = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-1.0f);
    float a = block_absmax(x, len);
    __m512 inv = _mm512_set1_ps(inverse(a));
    *absmax = a;
    for (int i = 0; i < len; i += 16) {
        __mmask16 m = len - i >= 16 ? 0xffff : (__mmask16)((1u << (len - i)) - 1);
        __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv);
        s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, neg, _CMP_LT_OQ), s, neg);
        s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, one, _CMP_GT_OQ), s, one);
        _mm512_mask_cvtepi32_storeu_epi8(codes + i, m, search8(lv, s));
    }
}

static inline void q8_dequant_v(const uint8_t* restrict c, int len, const __m512* t, float a,
                                float scale, float* restrict o) {
    __m512 va = _mm512_set1_ps(a), sc = _mm512_set1_ps(scale);
    for (int i = 0; i < len; i += 16) {
        __mmask16 m = len - i >= 16 ? 0xffff : (__mmask16)((1u << (len - i)) - 1);
        __m512i k = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, c + i));
        __mmask16 b5 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(32));
        __mmask16 b6 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(64));
        __mmask16 b7 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(128));
        __m512 q[4];
        for (int r = 0; r < 4; r++)
            q[r] = _mm512_mask_blend_ps(b5, pick32(t[4 * r], t[4 * r + 1], k),
                                        pick32(t[4 * r + 2], t[4 * r + 3], k));
        __m512 value = _mm512_mask_blend_ps(b7, _mm512_mask_blend_ps(b6, q[0], q[1]),
                                            _mm512_mask_blend_ps(b6, q[2], q[3]));
        _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(_mm512_mul_ps(value, va), sc));
    }
}

/* q4: the 4-level search of the 15 midpoints, every level's candidates in one register
   (1M values: quantize ~0.44 ms, dequantize ~0.26 ms here; the portable code ~1.2, ~0.5) */
typedef struct { __m512 l[4]; } levels4;

static void build_levels4(const float* mids, levels4* lv) {
    float buf[16];
    for (int L = 3; L >= 0; L--) {
        int count = 1 << (3 - L);
        for (int j = 0; j < 16; j++) buf[j] = mids[(j % count) * (2 << L) + (1 << L) - 1];
        lv->l[3 - L] = _mm512_loadu_ps(buf);
    }
}

static inline void q4_block_v(const float* restrict x, int len, const levels4* lv,
                              uint8_t* restrict codes, float* absmax) {
    const __m512 one = _mm512_set1_ps(1.0f), neg = _mm512_set1_ps(-1.0f);
    float pad[128];
    if (len < 128) {  /* the reference zero-pads the last block and stores those codes */
        memset(pad, 0, sizeof pad);
        memcpy(pad, x, (size_t)len * 4);
        x = pad;
    }
    float a = block_absmax(x, 128);
    __m512 inv = _mm512_set1_ps(inverse(a));
    *absmax = a;
    for (int i = 0; i < 128; i += 16) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(x + i), inv);
        s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, neg, _CMP_LT_OQ), s, neg);
        s = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, one, _CMP_GT_OQ), s, one);
        __m512i pos = _mm512_setzero_si512();
        for (int L = 3; L >= 0; L--) {
            __m512 probe = _mm512_permutexvar_ps(_mm512_srli_epi32(pos, L + 1), lv->l[3 - L]);
            __mmask16 k = _mm512_cmp_ps_mask(probe, s, _CMP_NGE_UQ);
            pos = _mm512_mask_add_epi32(pos, k, pos, _mm512_set1_epi32(1 << L));
        }
        /* each 64-bit lane holds an even value's code (low half) and the next one's (high):
           byte = even | odd << 4 */
        __m512i packed = _mm512_or_si512(pos, _mm512_srli_epi64(pos, 28));
        _mm_storel_epi64((__m128i*)(codes + i / 2), _mm512_cvtepi64_epi8(packed));
    }
}

static inline void q4_dequant_v(const uint8_t* restrict c, __m512 table, float a, float scale,
                                float* restrict o) {  /* a whole block of 128 */
    __m512 va = _mm512_set1_ps(a), sc = _mm512_set1_ps(scale);
    const __m128i low = _mm_set1_epi8(15);
    for (int j = 0; j < 64; j += 16) {
        __m128i bytes = _mm_loadu_si128((const __m128i*)(c + j));
        __m128i lo = _mm_and_si128(bytes, low), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low);
        __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
        __m512 v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(first), table);
        __m512 v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(second), table);
        _mm512_storeu_ps(o + 2 * j, _mm512_mul_ps(_mm512_mul_ps(v0, va), sc));
        _mm512_storeu_ps(o + 2 * j + 16, _mm512_mul_ps(_mm512_mul_ps(v1, va), sc));
    }
}
#endif

static inline int len_of(int64_t n, int64_t b, int64_t block) {
    int64_t rest = n - b * block;
    return (int)(rest < block ? rest : block);
}

/* 1 when this build runs the AVX-512 code */
int gp_avx512(void) {
#ifdef GP_AVX512
    return 1;
#else
    return 0;
#endif
}

/* Exported functions: (n values in all, blocks [b0, b1), the float arrays, starting at
   block b0's first value, then the rest); codes and absmax are the whole tensor's. */
void gp_q8_quantize(int64_t n, int64_t b0, int64_t b1, const float* x, const codebook* cb,
                    uint8_t* codes, float* absmax) {
#ifdef GP_AVX512
    levels8 lv;
    build_levels(cb->mids, &lv);
    for (int64_t b = b0; b < b1; b++)
        q8_block_v(x + (b - b0) * 256, len_of(n, b, 256), &lv, codes + b * 256, absmax + b);
#else
    for (int64_t b = b0; b < b1; b++)
        q8_block(x + (b - b0) * 256, len_of(n, b, 256), cb, codes + b * 256, absmax + b);
#endif
}

void gp_q4_quantize(int64_t n, int64_t b0, int64_t b1, const float* x, const float* mids,
                    uint8_t* codes, float* absmax) {
#ifdef GP_AVX512
    levels4 lv;
    build_levels4(mids, &lv);
    for (int64_t b = b0; b < b1; b++)
        q4_block_v(x + (b - b0) * 128, len_of(n, b, 128), &lv, codes + b * 64, absmax + b);
#else
    for (int64_t b = b0; b < b1; b++)
        q4_block(x + (b - b0) * 128, len_of(n, b, 128), mids, codes + b * 64, absmax + b);
#endif
}

/* out = (code[c] * absmax) * scale; scale 1 leaves the product unchanged */
void gp_q8_dequantize(int64_t n, int64_t b0, int64_t b1, float* out, const uint8_t* codes,
                      const float* absmax, const float* code, float scale) {
#ifdef GP_AVX512
    __m512 t[16];
    for (int r = 0; r < 16; r++) t[r] = _mm512_loadu_ps(code + 16 * r);
    for (int64_t b = b0; b < b1; b++)
        q8_dequant_v(codes + b * 256, len_of(n, b, 256), t, absmax[b], scale,
                     out + (b - b0) * 256);
    return;
#endif
    for (int64_t b = b0; b < b1; b++) {
        int len = len_of(n, b, 256);
        const uint8_t* c = codes + b * 256;
        float* o = out + (b - b0) * 256;
        float a = absmax[b];
        for (int i = 0; i < len; i++) o[i] = (code[c[i]] * a) * scale;
    }
}

void gp_q4_dequantize(int64_t n, int64_t b0, int64_t b1, float* out, const uint8_t* codes,
                      const float* absmax, const float* code, float scale) {
    for (int64_t b = b0; b < b1; b++) {
        int len = len_of(n, b, 128);
        const uint8_t* c = codes + b * 64;
        float* o = out + (b - b0) * 128;
        float a = absmax[b];
#ifdef GP_AVX512
        if (len == 128) {
            q4_dequant_v(c, _mm512_loadu_ps(code), a, scale, o);
            continue;
        }
#endif
        if (len == 128) {
            for (int j = 0; j < 64; j++) {
                o[2 * j] = (code[c[j] & 15] * a) * scale;
                o[2 * j + 1] = (code[c[j] >> 4] * a) * scale;
            }
        } else {
            for (int i = 0; i < len; i++)
                o[i] = (code[(c[i / 2] >> (4 * (i & 1))) & 15] * a) * scale;
        }
    }
}

/* The fused Adam step's tail, per block: N = (M / (root + eps)) * step_size from the fp32
   moments, root = torch.sqrt(V) (ATen's sqrt is not IEEE's: 0.6 % of values differ by an
   ulp, so it is taken from PyTorch), then both moments requantized (first moment: signed
   map, second: unsigned). */
static inline void direction(const float* m, const float* root, int len, float eps,
                             float step_size, float* d) {
    for (int i = 0; i < len; i++) d[i] = (m[i] / (root[i] + eps)) * step_size;
}

void gp_adam_q8_finish(int64_t n, int64_t b0, int64_t b1, const float* m, const float* v,
                       const float* root, float* d, float eps, float step_size,
                       const codebook* m_cb, const codebook* v_cb, uint8_t* m_codes,
                       float* m_absmax, uint8_t* v_codes, float* v_absmax) {
#ifdef GP_AVX512
    levels8 m_lv, v_lv;
    build_levels(m_cb->mids, &m_lv);
    build_levels(v_cb->mids, &v_lv);
#endif
    for (int64_t b = b0; b < b1; b++) {
        int len = len_of(n, b, 256);
        int64_t o = (b - b0) * 256;
        direction(m + o, root + o, len, eps, step_size, d + o);
#ifdef GP_AVX512
        q8_block_v(m + o, len, &m_lv, m_codes + b * 256, m_absmax + b);
        q8_block_v(v + o, len, &v_lv, v_codes + b * 256, v_absmax + b);
#else
        q8_block(m + o, len, m_cb, m_codes + b * 256, m_absmax + b);
        q8_block(v + o, len, v_cb, v_codes + b * 256, v_absmax + b);
#endif
    }
}

void gp_adam_q4_finish(int64_t n, int64_t b0, int64_t b1, const float* m, const float* v,
                       const float* root, float* d, float eps, float step_size,
                       const float* m_mids, const float* v_mids, uint8_t* m_codes,
                       float* m_absmax, uint8_t* v_codes, float* v_absmax) {
#ifdef GP_AVX512
    levels4 m_lv, v_lv;
    build_levels4(m_mids, &m_lv);
    build_levels4(v_mids, &v_lv);
#endif
    for (int64_t b = b0; b < b1; b++) {
        int len = len_of(n, b, 128);
        int64_t o = (b - b0) * 128;
        direction(m + o, root + o, len, eps, step_size, d + o);
#ifdef GP_AVX512
        q4_block_v(m + o, len, &m_lv, m_codes + b * 64, m_absmax + b);
        q4_block_v(v + o, len, &v_lv, v_codes + b * 64, v_absmax + b);
#else
        q4_block(m + o, len, m_mids, m_codes + b * 64, m_absmax + b);
        q4_block(v + o, len, v_mids, v_codes + b * 64, v_absmax + b);
#endif
    }
}
"""

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_QUANT = (None, [_I, _I, _I, _P, _P, _P, _P])
_DEQUANT = (None, [_I, _I, _I, _P, _P, _P, _P, _F])
_FINISH = (None, [_I, _I, _I, _P, _P, _P, _P, _F, _F, _P, _P, _P, _P, _P, _P])
SIGNATURES = {"gp_q8_quantize": _QUANT, "gp_q4_quantize": _QUANT,
              "gp_q8_dequantize": _DEQUANT, "gp_q4_dequantize": _DEQUANT,
              "gp_adam_q8_finish": _FINISH, "gp_adam_q4_finish": _FINISH,
              "gp_avx512": (ctypes.c_int, [])}
BLOCKS = {8: 256, 4: 128}
# the bucket key keeps sign, exponent and this many mantissa bits: 2^15 one-byte entries
# (32 KiB, fits L1), and at most 2 of the 8-bit maps' midpoints fall in one bucket. Measured
# on 1M values, one thread, min of 40: 7 bits (64 KiB, 1 probe) 2.9 ms, 6 bits 3.0 ms — the
# same within noise; the 8-probe binary search 10.8 ms; gcc's gather-vectorised loop 2x slower.
MANTISSA_BITS = 6
PROBES = 2  # the C search's comparisons after the table lookup


class _Codebook(ctypes.Structure):
    _fields_ = [("first", ctypes.c_void_p), ("mids", ctypes.c_void_p), ("shift", ctypes.c_int32)]


def _floats(bits: torch.Tensor) -> torch.Tensor:
    """int64 holding uint32 float bit patterns -> those float32 values."""
    return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)


@functools.lru_cache(maxsize=None)
def codebook(bits: int, signed: bool, mantissa_bits: int = MANTISSA_BITS):
    """The search table of a code map, built from the reference search itself.

    Floats sharing their top 9 + `mantissa_bits` bits form a bucket, an interval [lo, hi].
    first[bucket] = bucketize(lo, mids) counts the midpoints below it; the midpoints from
    there on are ≥ lo, so the code of s in the bucket is first + #{j < k : mids[first+j] < s}
    with k the most midpoints any bucket holds (padded with +inf): the count bucketize
    returns, exactly. Buckets of exponent 255 hold NaN only (s is clamped to [−1, 1]
    first) and get bucketize(NaN)."""
    _, mids = tables(bits, signed, "cpu")
    shift = 23 - mantissa_bits
    keys = torch.arange(1 << (32 - shift), dtype=torch.int64)
    low, high = _floats(keys << shift), _floats((keys << shift) | ((1 << shift) - 1))
    negative = keys >= 1 << (31 - shift)
    lo, hi = torch.where(negative, high, low), torch.where(negative, low, high)
    first = torch.bucketize(lo, mids)
    inside = torch.bucketize(hi, mids, right=True) - first
    nan_bucket = (keys >> mantissa_bits) & 0xFF == 0xFF
    first[nan_bucket] = torch.bucketize(torch.tensor(float("nan")), mids)
    k = int(inside[~nan_bucket].max())
    if k > PROBES:
        raise ValueError(f"{bits}-bit map: a bucket of {mantissa_bits} mantissa bits holds {k} "
                         f"midpoints, the C search probes {PROBES}")
    first = first.to(torch.uint8)
    padded = torch.cat([mids, torch.full((PROBES,), float("inf"))])
    struct = _Codebook(first.data_ptr(), padded.data_ptr(), shift)
    return struct, (first, padded)  # the tensors must outlive the struct's pointers


CHUNK_ELEMENTS = 1 << 18  # a thread gets at least this many values (~0.5 ms of work)
_POOL: dict = {}  # pid -> ThreadPoolExecutor: a forked child must not reuse its parent's


def library():
    """The compiled kernels, or None (no compiler; see `cpu_native.load_error`)."""
    return load("cpu_blockwise", SOURCE, SIGNATURES)


def portable_library():
    """The same kernels without their AVX-512 code: what a CPU without AVX-512 runs (the
    tests check both against the reference on any machine)."""
    return load("cpu_blockwise_portable", "#define GP_PORTABLE 1\n" + SOURCE, SIGNATURES)


def active(*tensors: torch.Tensor) -> bool:
    """Whether the C path runs: GRADPROJ_KERNELS=auto, every tensor on CPU, library built."""
    return (mode() == "auto" and all(t.device.type == "cpu" for t in tensors)
            and library() is not None)


def fits(codes: torch.Tensor, absmax: torch.Tensor, bits: int, numel: int) -> bool:
    """Whether codes/absmax have the contiguous uint8/fp32 layout of a `numel`-value moment."""
    blocks = -(-numel // BLOCKS[bits])
    return (codes.dtype == torch.uint8 and codes.is_contiguous()
            and codes.numel() == (numel if bits == 8 else blocks * BLOCKS[bits] // 2)
            and absmax.dtype == torch.float32 and absmax.is_contiguous()
            and absmax.numel() == blocks)


def run_blocks(fn, numel: int, block: int, b0: int, b1: int, floats: tuple, rest: tuple) -> None:
    """fn(numel, b0, b1, *floats, *rest) over blocks [b0, b1): `floats` are the addresses
    of fp32 arrays starting at block b0's first value. With several torch threads and
    enough work the range is split over a thread pool (each part's float addresses
    advanced to its first block); blocks are independent, so the result is the same."""
    threads = torch.get_num_threads()
    chunks = min(threads, max(1, (b1 - b0) * block // CHUNK_ELEMENTS))
    if chunks <= 1:
        fn(numel, b0, b1, *floats, *rest)
        return
    pool = _POOL.get(os.getpid())
    if pool is None or pool._max_workers < chunks:
        _POOL.clear()
        pool = _POOL[os.getpid()] = ThreadPoolExecutor(max_workers=chunks,
                                                       thread_name_prefix="gradproj-cpu")
    step = -(-(b1 - b0) // chunks)
    jobs = [pool.submit(fn, numel, b, min(b + step, b1),
                        *(p + (b - b0) * block * 4 for p in floats), *rest)
            for b in range(b0, b1, step)]
    for job in jobs:
        job.result()


def quantize(x: torch.Tensor, bits: int, signed: bool):
    """(codes, absmax) exactly as `q8_quantize_ref` / `q4_quantize_ref`, or None where the
    C path does not run (see `active`)."""
    if not active(x):
        return None
    lib = library()
    block = BLOCKS[bits]
    flat = x.reshape(-1).float().contiguous()  # the reference's own conversion
    n = flat.numel()
    blocks = -(-n // block)
    book = ctypes.byref(codebook(bits, signed)[0]) if bits == 8 else \
        tables(bits, signed, "cpu")[1].data_ptr()
    if bits == 8:
        codes = torch.empty(x.shape, dtype=torch.uint8)
    else:
        codes = torch.empty(blocks * (block // 2), dtype=torch.uint8)
    absmax = torch.empty(blocks, dtype=torch.float32)
    fn = lib.gp_q8_quantize if bits == 8 else lib.gp_q4_quantize
    run_blocks(fn, n, block, 0, blocks, (flat.data_ptr(),),
               (book, codes.data_ptr(), absmax.data_ptr()))
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, bits: int, signed: bool,
               shape: tuple[int, ...], scale: float = 1.0):
    """fp32 `shape` tensor (code[c] · absmax) · scale, or None where the C path does not
    apply (see `active`; or codes/absmax not the contiguous uint8/fp32 layout `shape` needs:
    the reference then runs and reports the problem itself)."""
    n = math.prod(shape)
    if not (active(codes, absmax) and fits(codes, absmax, bits, n)):
        return None
    out = torch.empty(shape, dtype=torch.float32)
    dequantize_into(out, codes, absmax, bits, signed, n, 0, -(-n // BLOCKS[bits]), scale)
    return out


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, bits: int,
                    signed: bool, numel: int, b0: int, b1: int, scale: float) -> None:
    """Blocks [b0, b1) of a `numel`-value moment into the fp32 buffer `out` (from its start);
    the caller has checked the layout (`dequantize` does)."""
    code, _ = tables(bits, signed, "cpu")
    fn = library().gp_q8_dequantize if bits == 8 else library().gp_q4_dequantize
    run_blocks(fn, numel, BLOCKS[bits], b0, b1, (out.data_ptr(),),
               (codes.data_ptr(), absmax.data_ptr(), code.data_ptr(), scale))
