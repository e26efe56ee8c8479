/* Shared by the CPU C kernels: cpu_native.package_source() puts this text in front of
   cpu_blockwise.c and cpu_counter_rng.c, which are compiled as separate libraries. */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The largest |x| of a block as the largest of the bit patterns without the sign: the
   order of non-negative floats, and a NaN's pattern exceeds every number's, so a NaN
   propagates as in torch.amax. It vectorises as an integer max. */
static inline float block_absmax(const float* x, int64_t len) {
    uint32_t m = 0;
    for (int64_t i = 0; i < len; i++) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b &= 0x7fffffffu;
        m = b > m ? b : m;
    }
    float r;
    memcpy(&r, &m, 4);
    return r;
}
