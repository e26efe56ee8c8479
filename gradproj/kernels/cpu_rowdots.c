/* AdamP's four row reductions in one pass (gradproj/kernels/cpu_rowdots.py). Compiled once
   per machine by cpu_native.py (cc -O3 -march=native -ffp-contract=off -fno-math-errno).

   Rows [b0, b1) of `cols` values each; g, w, u point at row b0's first value, out at the
   whole k·rows×4 result. Per row: <g,w>, <g,g>, <w,w>, <w,u>, each product of two floats
   exact in double and summed in double, then rounded to float once: the result is the
   exact sum rounded (to within cols·2^-53 of the sum of |terms|), whatever the split. */
#include <stdint.h>

void gp_row_dots(int64_t n, int64_t b0, int64_t b1, const float* restrict g,
                 const float* restrict w, const float* restrict u, int64_t cols,
                 float* restrict out) {
    (void)n;
    for (int64_t r = b0; r < b1; r++) {
        const float* gr = g + (r - b0) * cols;
        const float* wr = w + (r - b0) * cols;
        const float* ur = u + (r - b0) * cols;
        double gw = 0.0, gg = 0.0, ww = 0.0, wu = 0.0;
        for (int64_t i = 0; i < cols; i++) {
            double gi = gr[i], wi = wr[i], ui = ur[i];
            gw += gi * wi;
            gg += gi * gi;
            ww += wi * wi;
            wu += wi * ui;
        }
        out[4 * r] = (float)gw;
        out[4 * r + 1] = (float)gg;
        out[4 * r + 2] = (float)ww;
        out[4 * r + 3] = (float)wu;
    }
}
