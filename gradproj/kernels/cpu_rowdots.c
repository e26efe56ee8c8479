/* AdamP's four row reductions in one pass (gradproj/kernels/cpu_rowdots.py). Compiled once
   per machine by cpu_native.py (cc -O3 -march=native -ffp-contract=off -fno-math-errno).

   Rows [b0, b1) of `cols` values each; g, w, u point at row b0's first value, out at the
   whole k·rows×4 result. Per row: <g,w>, <g,g>, <w,w>, <w,u>, each product of two floats
   exact in double and summed in double, then rounded to float once: the result is the
   exact sum rounded (to within cols·2^-53 of the sum of |terms|), whatever the split.

   Each sum runs in LANES partial sums (value i into lane i % LANES, the row's tail into
   lanes 0..), added in a fixed order at the end: the order is the code's, not the
   compiler's, so the loop vectorises without -ffast-math (a 96×64×64 stack, one thread:
   one serial double sum a quantity 2.7 ns a value, the lanes 1.2 ns) and a row's result
   is the same on any machine and thread split. */
#include <stdint.h>
#include <string.h>

#define LANES 8
typedef float f8 __attribute__((vector_size(32)));   /* GCC/Clang vector extensions */
typedef double d8 __attribute__((vector_size(64)));

static inline d8 load8(const float* x) {
    f8 v;
    memcpy(&v, x, sizeof v);
    return __builtin_convertvector(v, d8);
}

static inline float lane_sum(d8 s) {
    return (float)(((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])));
}

void gp_row_dots(int64_t n, int64_t b0, int64_t b1, const float* restrict g,
                 const float* restrict w, const float* restrict u, int64_t cols,
                 float* restrict out) {
    (void)n;
    for (int64_t r = b0; r < b1; r++) {
        const float* gr = g + (r - b0) * cols;
        const float* wr = w + (r - b0) * cols;
        const float* ur = u + (r - b0) * cols;
        d8 gw = {0}, gg = {0}, ww = {0}, wu = {0};
        int64_t i = 0;
        for (; i + LANES <= cols; i += LANES) {
            d8 gi = load8(gr + i), wi = load8(wr + i), ui = load8(ur + i);
            gw += gi * wi;
            gg += gi * gi;
            ww += wi * wi;
            wu += wi * ui;
        }
        for (int j = 0; i < cols; i++, j++) {
            double gi = gr[i], wi = wr[i], ui = ur[i];
            gw[j] += gi * wi;
            gg[j] += gi * gi;
            ww[j] += wi * wi;
            wu[j] += wi * ui;
        }
        out[4 * r] = lane_sum(gw);
        out[4 * r + 1] = lane_sum(gg);
        out[4 * r + 2] = lane_sum(ww);
        out[4 * r + 3] = lane_sum(wu);
    }
}
