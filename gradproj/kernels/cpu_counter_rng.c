/* The counter streams of counter_rng.py on CPU, and the INT8 stochastic rounding of
   int8_sr.py that consumes them: one pass each, no int64 or fp32 temporaries.
   Compiled by gradproj/kernels/cpu_native.py and called through ctypes from
   cpu_counter_rng.py. The arithmetic mirrors `hash32_tensor` on int64 values op for op
   (shifts of non-negative values, products wrapping mod 2^64 then masked to 32 bits), so
   every index, even one past 2^32, gets the reference's bits; the float is the 24-bit
   integer (+ offset <= 1) times 2^-24, exact. Compiled after cpu_common.h
   (block_absmax, the includes). */

#define M32 0xFFFFFFFFull

static inline uint64_t hash32(uint64_t x) {
    x ^= x >> 16;
    x = (x * 0x7FEB352Dull) & M32;
    x ^= x >> 15;
    x = (x * 0x846CA68Bull) & M32;
    return x ^ (x >> 16);
}

/* out[i] = ((hash(hash((start + stride*i) ^ k0) ^ k1) >> 8) + offset) * 2^-24 */
void gp_counter_uniform(int64_t n, uint64_t k0, uint64_t k1, int64_t start, int64_t stride,
                        uint64_t offset, float* out) {
    for (int64_t i = 0; i < n; i++) {
        uint64_t index = (uint64_t)(start + stride * i);
        uint64_t bits = (hash32(hash32(index ^ k0) ^ k1) >> 8) + offset;
        out[i] = (float)bits * 0x1p-24f;
    }
}

/* lowbias32 in uint32 arithmetic: the same bits as hash32 above for values below 2^32
   (then the int64 reference never carries bits past 32), and it vectorises */
static inline uint32_t hash32_u32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

/* One group of the rounding gp_int8_sr_rows describes below: `len` values, `first` the
   row index of the first; its scale into scale_out and its codes into dst. */
static void sr_group(const float* in, int64_t len, uint32_t first, uint32_t key0,
                     uint32_t key1, int8_t* dst, float* scale_out) {
    float scale = block_absmax(in, len) / 127.0f;  /* NaN absmax: scale 1, as the reference */
    scale = scale > 0.0f ? scale : 1.0f;
    *scale_out = scale;
    /* in chunks of 256 through an int32 buffer: gcc vectorises the arithmetic
       only where every lane is 32 bits wide, then packs to int8 in a second loop */
    for (int64_t c0 = 0; c0 < len; c0 += 256) {
        int m = len - c0 < 256 ? (int)(len - c0) : 256;
        uint32_t at = first + (uint32_t)c0;
        int32_t q32[256];
        for (int t = 0; t < m; t++) {
            uint32_t bits = hash32_u32(hash32_u32((at + (uint32_t)t) ^ key0) ^ key1) >> 8;
            float u = (float)(int32_t)bits * 0x1p-24f;
            float y = in[c0 + t] / scale;
            /* floor(y) as truncation, one down where that rounded up: exact for |y| < 2^24
               (|y| <= 127 * 1.5 even where the scale is subnormal) and it vectorises, floorf does not */
            float r = (float)(int32_t)y;
            r = r > y ? r - 1.0f : r;
            float q = u < y - r ? r + 1.0f : r;
            q = q < -127.0f ? -127.0f : q;
            q = q > 127.0f ? 127.0f : q;
            q32[t] = (int32_t)q;
        }
        for (int t = 0; t < m; t++)
            dst[c0 + t] = (int8_t)q32[t];
    }
}

/* int8_sr_quantize_rows' reference on k rows of n < 2^32 values (row i at x + i*n, keys
   k0[i], k1[i] < 2^32), in groups of g: scale = absmax/127 (1 for an all-zero group),
   y = x/scale, code = floor(y) + [u < y - floor(y)] clamped to +-127, u the stream value
   of the value's index in its row. Every step is one IEEE operation or exact (abs, max,
   floor, y - floor(y), the compare, the clamp), as in the reference's tensor ops, so
   codes and scales are its bits for every finite input (a NaN or inf value's own code may
   differ; its group's scale does not). One thread: ~3 ns a value, the reference ~50. */
void gp_int8_sr_rows(int64_t k, int64_t n, int64_t g, const float* x, const uint64_t* k0,
                     const uint64_t* k1, int8_t* codes, float* scales) {
    int64_t groups = (n + g - 1) / g;
    for (int64_t i = 0; i < k; i++)
        for (int64_t b = 0; b < groups; b++) {
            int64_t start = b * g, len = n - start < g ? n - start : g;
            sr_group(x + i * n + start, len, (uint32_t)start, (uint32_t)k0[i], (uint32_t)k1[i],
                     codes + i * n + start, scales + i * groups + b);
        }
}

/* apply_quantized_updates' chain for k INT8 weights of n < 2^32 values, one group at a
   time through `buf` (g floats), codes and scales rewritten in place (weight i's at the
   addresses codes[i], scales[i]; its update row at update + i*n): w = code·scale (one
   IEEE product), w = fma(alpha, u, w), with decay w = fma(w, decay_alpha, w) (ATen's
   add_ with alpha is one fused multiply-add in its AVX2/AVX-512 kernels, body and tail:
   cpu_counter_rng.aten_add_fuses checks it once a process), then the rounding above. The fp32
   weights never exist in full: the chain wrote them (4 bytes a value), stacked the
   codes and copied the new ones back. */
void gp_int8_step_rows(int64_t k, int64_t n, int64_t g, const int64_t* codes,
                       const int64_t* scales, const float* update, float alpha,
                       float decay_alpha, int64_t decay, const uint64_t* k0,
                       const uint64_t* k1, float* buf) {
    int64_t groups = (n + g - 1) / g;
    for (int64_t i = 0; i < k; i++) {
        int8_t* code = (int8_t*)(intptr_t)codes[i];
        float* scale = (float*)(intptr_t)scales[i];
        const float* u = update + i * n;
        for (int64_t b = 0; b < groups; b++) {
            int64_t start = b * g, len = n - start < g ? n - start : g;
            const int8_t* c = code + start;
            float s = scale[b];
            for (int64_t t = 0; t < len; t++)
                buf[t] = fmaf(alpha, u[start + t], (float)c[t] * s);
            if (decay)
                for (int64_t t = 0; t < len; t++)
                    buf[t] = fmaf(buf[t], decay_alpha, buf[t]);
            sr_group(buf, len, (uint32_t)start, (uint32_t)k0[i], (uint32_t)k1[i], code + start,
                     scale + b);
        }
    }
}

/* int8_dequantize_rows' reference: out = code * scale of its group (one IEEE product) */
void gp_int8_dequantize_rows(int64_t k, int64_t n, int64_t g, const int8_t* codes,
                             const float* scales, float* out) {
    int64_t groups = (n + g - 1) / g;
    for (int64_t i = 0; i < k; i++)
        for (int64_t b = 0; b < groups; b++) {
            int64_t start = b * g, len = n - start < g ? n - start : g;
            const int8_t* c = codes + i * n + start;
            float* o = out + i * n + start;
            float scale = scales[i * groups + b];
            for (int64_t t = 0; t < len; t++)
                o[t] = (float)c[t] * scale;
        }
}
