/* The q8/q4 blockwise codecs and the tail of the fused AdamW step on CPU.
   Compiled once per machine by gradproj/kernels/cpu_native.py with
   cc -O3 -march=native -ffp-contract=off -fno-math-errno and called through ctypes from
   cpu_blockwise.py / cpu_adam.py, whose docstrings say why each step is exact.
   Compiled after cpu_common.h (block_absmax, the includes). */

/* 1e-38 as ATen casts the double scalar of clamp(min=1e-38) to float (a subnormal) */
#define TINY ((float)1e-38)

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

/* Dense fp32 Adam (kernels/adam.py's CPU path, `cpu_adam.adam_dense_step`) over the values
   of blocks [b0, b1) of 256, the pointers at block b0's first value: one pass instead of
   the reference's eight ATen ops. Each operation is one IEEE rounding as written (no FMA,
   IEEE sqrtf), so the values do not depend on the vector width, the split over threads or
   where a slice starts:  M = M·β1 + G·c1;  V = V·β2 + (G·G)·c2;  N = (M / (√V + ε))·s. */
void gp_adam_dense(int64_t n, int64_t b0, int64_t b1, const float* restrict g,
                   float* restrict m, float* restrict v, float* restrict d, float beta1,
                   float c1, float beta2, float c2, float eps, float step_size) {
    int64_t stop = b1 * 256 < n ? b1 * 256 : n;
    int64_t len = stop - b0 * 256;
    for (int64_t i = 0; i < len; i++) {
        float mi = m[i] * beta1 + g[i] * c1;
        float vi = v[i] * beta2 + (g[i] * g[i]) * c2;
        m[i] = mi;
        v[i] = vi;
        d[i] = (mi / (sqrtf(vi) + eps)) * step_size;
    }
}
