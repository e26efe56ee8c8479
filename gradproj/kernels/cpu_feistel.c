/* SLTrain's sparse support on CPU: the keyed Feistel permutation of
   gradproj/parametrizations/sparse_support.py, one element at a time with its cycle walk.
   The same integer operations as the tensor reference, so the same positions. */
#include <stdint.h>

static inline uint64_t round_hash(uint64_t r, uint64_t key) {
    uint64_t h = (r ^ key) & 0xFFFFFFFFu;   /* products stay < 2^32 * 2^27: no overflow */
    h = (h * 0x45D9F3Bu) & 0xFFFFFFFFu;
    h ^= h >> 16;
    h = (h * 0x45D9F3Bu) & 0xFFFFFFFFu;
    return h ^ (h >> 16);
}

static inline uint64_t feistel(uint64_t x, int half_bits, const int64_t* keys, int rounds) {
    uint64_t mask = (1ull << half_bits) - 1, left = x >> half_bits, right = x & mask;
    for (int i = 0; i < rounds; i++) {
        uint64_t next = left ^ (round_hash(right, (uint64_t)keys[i]) & mask);
        left = right;
        right = next;
    }
    return (left << half_bits) | right;
}

/* out[i] = pi(i) for i < count, pi cycle-walked into [0, numel) */
void gp_feistel_support(int64_t numel, int64_t count, int32_t half_bits, const int64_t* keys,
                        int32_t rounds, int64_t* out) {
    for (int64_t i = 0; i < count; i++) {
        uint64_t x = feistel((uint64_t)i, half_bits, keys, rounds);
        while (x >= (uint64_t)numel) x = feistel(x, half_bits, keys, rounds);
        out[i] = (int64_t)x;
    }
}
