/* Packed low-bit kernels: shared declarations (see mcmoe_vl/quant/native.py for the build and the Python side).
 *
 * Storage (mcmoe_vl/quant/packing.py): each row of R x C codes packed on its own, bit p of the row's bytes
 * (LSB first) is bit p % bits of code p / bits; 3 bits: 8 codes in 3 bytes. Scale and zero are float16 per
 * (row, group of gs consecutive stored columns); w = s (q - z), at 1 bit w = s (2q - 1) = 2s (q - 1/2).
 *
 * y (T, R) = x (T, C) W^T is computed per row and group as  s * (sum_k q_k x_k) - s z (sum_k x_k)  in float32.
 * SIMD paths decode a block of B columns into float lanes: lane i of plane j holds column k0 + P i + j, masked
 * but not shifted, i.e. the value q * 2^(bits j); the token is pre-arranged into the same order and pre-scaled by
 * 2^-(bits j) (exact: a power of two), so each plane costs one AND, one int-to-float conversion and one FMA per
 * token. */
#ifndef MQ_H
#define MQ_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const uint8_t *q;     /* (R, row_bytes) packed codes */
    const uint16_t *sc;   /* (R, G) float16 scales */
    const uint16_t *zr;   /* (R, G) float16 zeros, NULL at 1 bit */
    const int32_t *perm;  /* (C) stored column k is natural column perm[k]; NULL = identity */
    int32_t R, C, gs, bits, row_bytes;
} mq_mat;

enum { MQ_SCALAR = 0, MQ_AVX2 = 1, MQ_AVX512 = 2 };


float mq_h2f(uint16_t h);

/* a bfloat16 (bits) as float32, exactly */
static inline float mq_bf2f(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline int mq_groups(const mq_mat *m) { return (m->C + m->gs - 1) / m->gs; }

/* w = s (q - z) for (row r, group g); binary folded into s = 2 s1, z = 1/2 */
static inline void mq_sz(const mq_mat *m, int r, int g, float *s, float *z) {
    size_t i = (size_t)r * mq_groups(m) + g;
    float s1 = mq_h2f(m->sc[i]);
    if (m->zr == NULL) {
        *s = 2.0f * s1;
        *z = 0.5f;
    } else {
        *s = s1;
        *z = mq_h2f(m->zr[i]);
    }
}

static inline uint32_t mq_code_at(const uint8_t *q, int k, int bits, int row_bytes) {
    int p = k * bits, byte = p >> 3, sh = p & 7;
    uint32_t v = q[byte];
    if (byte + 1 < row_bytes) v |= (uint32_t)q[byte + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1u);
}

/* sum_{k0 <= k < k1} q_k x_k with x in natural (stored) column order */
static inline float mq_tail_dot(const uint8_t *q, int k0, int k1, int bits, int row_bytes, const float *x) {
    float d = 0.0f;
    for (int k = k0; k < k1; k++) d += (float)mq_code_at(q, k, bits, row_bytes) * x[k];
    return d;
}

/* Prefetch bytes [p, p + n) into the cache (decode streams each weight once from memory). */
static inline void mq_prefetch(const void *p, size_t n) {
    const char *c = (const char *)p;
    for (size_t o = 0; o < n; o += 64) __builtin_prefetch(c + o, 0, 3);
}

/* Columns per SIMD block (0: the path cannot run this width). Lanes L = B / P, P = 8 / bits (8 at 3 bits). */
int mq_block(int isa, int bits);

/* Rows r0..r1-1 of y (T tokens, row stride ldy) from the arranged tokens xp (T, C) and group sums xs (T, G). */
typedef void (*mq_rows_fn)(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0,
                           int r1);
void mq_rows_scalar(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0, int r1);
void mq_rows_avx2(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0, int r1);
void mq_rows_avx512(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0, int r1);

/* The row kernel of an ISA (the MQ_* values). */
static inline mq_rows_fn mq_rows_for(int isa) {
#if defined(__x86_64__) || defined(__i386__)
    if (isa == MQ_AVX512) return mq_rows_avx512;
    if (isa == MQ_AVX2) return mq_rows_avx2;
#endif
    return mq_rows_scalar;
}

/* Threads only where there is work for them: at least about 64k weights x tokens per thread. */
static inline int mq_threads_for(double work, int nthreads) {
    int nt = nthreads < 1 ? 1 : nthreads;
    if (work < 65536.0 * nt) nt = work < 65536.0 ? 1 : (int)(work / 65536.0);
    return nt;
}

/* W rows r0..r1-1 dequantised into out (R, C), float32 (bf16 = 0) or bfloat16 bits (bf16 = 1), in the arranged
 * column order of the path (natural order on the scalar path) */
typedef void (*mq_deq_fn)(const mq_mat *m, void *out, int bf16, int r0, int r1);
void mq_deq_scalar(const mq_mat *m, void *out, int bf16, int r0, int r1);
void mq_deq_avx2(const mq_mat *m, void *out, int bf16, int r0, int r1);
void mq_deq_avx512(const mq_mat *m, void *out, int bf16, int r0, int r1);

#endif
