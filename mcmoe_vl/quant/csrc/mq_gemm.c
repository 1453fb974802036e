/* Run-time dispatch, token preparation and the threaded product y = x W^T for one packed matrix. */
#include <stdlib.h>
#include <string.h>

#include "mq.h"

int mq_cpu_isa(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("f16c")) return MQ_SCALAR; /* both SIMD objects convert scales with F16C */
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return MQ_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return MQ_AVX2;
#endif
    return MQ_SCALAR;
}

int mq_block(int isa, int bits) {
    const int lanes = isa == MQ_AVX512 ? 16 : isa == MQ_AVX2 ? 8 : 0;
    if (bits < 1 || bits > 4) return 0;
    return lanes * (bits == 3 ? 8 : 8 / bits);
}

/* The path that runs matrix m: the requested one (-1: the best the CPU has), lowered while its block does not
 * divide the group size. Returns -1 when the requested path is not supported by this CPU or build. */
int mq_resolve_isa(const mq_mat *m, int isa) {
    const int cpu = mq_cpu_isa();
    if (isa > cpu) return -1;
    if (isa < 0) isa = cpu;
    while (isa > MQ_SCALAR && m->gs % mq_block(isa, m->bits) != 0) isa--;
    return isa;
}

/* xp (C): x in stored column order (perm), each full block of B columns arranged as [plane j][lane i] =
 * x[k0 + P i + j] * 2^-(bits j); columns after the group's last full block stay in place. xs (G): group sums. */
void mq_prepare_token(const mq_mat *m, int isa, const float *x, float *xp, float *xs) {
    const int C = m->C, G = mq_groups(m), B = mq_block(isa, m->bits);
    const int P = m->bits == 3 ? 8 : 8 / m->bits, L = B ? B / P : 0;
    float *xs_nat = xp; /* stored order first, then arranged block by block through a small buffer */
    if (m->perm)
        for (int k = 0; k < C; k++) xs_nat[k] = x[m->perm[k]];
    else
        memcpy(xs_nat, x, sizeof(float) * C);
    float buf[128];
    for (int g = 0; g < G; g++) {
        int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
        float sum = 0.0f;
        for (int k = k0; k < k1; k++) sum += xs_nat[k];
        xs[g] = sum;
        if (isa == MQ_SCALAR) continue;
        for (int k = k0; k + B <= k1; k += B) {
            for (int j = 0; j < P; j++) {
                float sc = 1.0f / (float)(1u << (m->bits * j));
                for (int i = 0; i < L; i++) buf[j * L + i] = xs_nat[k + P * i + j] * sc;
            }
            memcpy(xp + k, buf, sizeof(float) * B);
        }
    }
}

/* -- 1-bit decode by table lookup on AVX-512 (mq_lut1.c) ------------------------------------------------------ */
#if defined(__x86_64__) || defined(__i386__)
int mq_lut1_ok(const mq_mat *m);
size_t mq_lut1_floats(const mq_mat *m);
void mq_lut1_prepare(const mq_mat *m, const float *x, float *buf);
void mq_rows_lut1(const mq_mat *m, const float *buf, int T, float *y, int ldy, int r0, int r1);

int mq_use_lut1(const mq_mat *m, int isa, int T) { return isa == MQ_AVX512 && T <= 2 && mq_lut1_ok(m); }

/* y = x W^T for T <= 2 float32 tokens x, or bfloat16 tokens xb. Returns 0 or -2 (out of memory). */
static int gemm_lut1(const mq_mat *m, const float *x, const uint16_t *xb, int T, float *y, int ldy, int nthreads) {
    const size_t n = mq_lut1_floats(m);
    float *buf = (float *)malloc(sizeof(float) * n * T), *tmp = xb ? (float *)malloc(sizeof(float) * m->C) : NULL;
    if (!buf || (xb && !tmp)) {
        free(buf);
        free(tmp);
        return -2;
    }
    for (int t = 0; t < T; t++) {
        if (xb)
            for (int k = 0; k < m->C; k++) tmp[k] = mq_bf2f(xb[(size_t)t * m->C + k]);
        mq_lut1_prepare(m, xb ? tmp : x + (size_t)t * m->C, buf + n * t);
    }
    const int nt = mq_threads_for((double)m->R * m->C * T, nthreads);
    const int RB = 16, nblk = (m->R + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        int r0 = b * RB, r1 = r0 + RB < m->R ? r0 + RB : m->R;
        mq_rows_lut1(m, buf, T, y, ldy, r0, r1);
    }
    free(buf);
    free(tmp);
    return 0;
}
#else /* no table-lookup kernel off x86 (mq_lut1.c is not built): never chosen, so these are never called */
int mq_use_lut1(const mq_mat *m, int isa, int T) {
    (void)m; (void)isa; (void)T;
    return 0;
}
size_t mq_lut1_floats(const mq_mat *m) { (void)m; return 0; }
void mq_lut1_prepare(const mq_mat *m, const float *x, float *buf) { (void)m; (void)x; (void)buf; }
void mq_rows_lut1(const mq_mat *m, const float *buf, int T, float *y, int ldy, int r0, int r1) {
    (void)m; (void)buf; (void)T; (void)y; (void)ldy; (void)r0; (void)r1;
}
static int gemm_lut1(const mq_mat *m, const float *x, const uint16_t *xb, int T, float *y, int ldy, int nthreads) {
    (void)m; (void)x; (void)xb; (void)T; (void)y; (void)ldy; (void)nthreads;
    return -1;
}
#endif

/* y (T, ldy) rows [0, R) = x (T, C) W^T. Returns the path used, or -1 (path unsupported), -2 (out of memory). */
int mq_gemm(const mq_mat *m, const float *x, int T, float *y, int ldy, int isa, int nthreads) {
    isa = mq_resolve_isa(m, isa);
    if (isa < 0) return -1;
    if (mq_use_lut1(m, isa, T)) {
        const int rc = gemm_lut1(m, x, NULL, T, y, ldy, nthreads);
        return rc < 0 ? rc : isa;
    }
    const int G = mq_groups(m);
    float *xp = (float *)malloc(sizeof(float) * (size_t)T * m->C), *xs = (float *)malloc(sizeof(float) * (size_t)T * G);
    if (!xp || !xs) {
        free(xp);
        free(xs);
        return -2;
    }
    for (int t = 0; t < T; t++) mq_prepare_token(m, isa, x + (size_t)t * m->C, xp + (size_t)t * m->C, xs + (size_t)t * G);
    const mq_rows_fn fn = mq_rows_for(isa);
    const int nt = mq_threads_for((double)m->R * m->C * T, nthreads);
    const int RB = 16, nblk = (m->R + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        int r0 = b * RB, r1 = r0 + RB < m->R ? r0 + RB : m->R;
        fn(m, xp, xs, T, y, ldy, r0, r1);
    }
    free(xp);
    free(xs);
    return isa;
}

/* Prefill: rows [row0, row1) of W dequantised into out (row1 - row0, C) (float32, or bfloat16 when bf16) in the
 * arranged column order of the path that runs (returned); pair it with mq_arrange (the token in the same order). */
int mq_dequant_arranged(const mq_mat *m, void *out, int bf16, int isa, int row0, int row1, int nthreads) {
    isa = mq_resolve_isa(m, isa);
    if (isa < 0) return -1;
    mq_deq_fn fn = mq_deq_scalar;
#if defined(__x86_64__) || defined(__i386__)
    if (isa == MQ_AVX512) fn = mq_deq_avx512;
    if (isa == MQ_AVX2) fn = mq_deq_avx2;
#endif
    if (row0 < 0 || row1 > m->R || row0 >= row1) return -3;
    /* fn writes row r at r * C: shift the base so that row0 lands at the start of out */
    char *base = (char *)out - (size_t)row0 * m->C * (bf16 ? 2 : 4);
    const int RB = 16, nblk = (row1 - row0 + RB - 1) / RB;
    int nt = nthreads < 1 ? 1 : nthreads;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        int r0 = row0 + b * RB, r1 = r0 + RB < row1 ? r0 + RB : row1;
        fn(m, base, bf16, r0, r1);
    }
    return isa;
}

/* x (T, C) natural order -> out (T, C) in the column order of mq_dequant_arranged for path isa (perm applied) */
void mq_arrange(const mq_mat *m, int isa, const float *x, int T, float *out) {
    const int C = m->C, G = mq_groups(m), B = mq_block(isa, m->bits);
    const int P = m->bits == 3 ? 8 : 8 / m->bits, L = B ? B / P : 0;
    float buf[128];
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)t * C;
        float *o = out + (size_t)t * C;
        if (m->perm)
            for (int k = 0; k < C; k++) o[k] = xt[m->perm[k]];
        else
            memcpy(o, xt, sizeof(float) * C);
        if (isa == MQ_SCALAR) continue;
        for (int g = 0; g < G; g++) {
            int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
            for (int k = k0; k + B <= k1; k += B) {
                for (int j = 0; j < P; j++)
                    for (int i = 0; i < L; i++) buf[j * L + i] = o[k + P * i + j];
                memcpy(o + k, buf, sizeof(float) * B);
            }
        }
    }
}

/* -- bfloat16 tokens on AVX512-BF16 (mq_avx512bf16.c) ------------------------------------------------------------ */
int mq_bf16_block(int bits);
int mq_bf16_passes(int bits);
int mq_bf16_column(int bits, int pass, int lane);
void mq_rows_bf16(const mq_mat *m, const uint16_t *xp, const float *xs, int T, float *y, int ldy, int r0, int r1);

extern const int mq_bf16_built; /* 0 when the compiler could not build mq_avx512bf16.c (mq_nobf16.c instead) */

int mq_cpu_bf16(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    return mq_bf16_built && mq_cpu_isa() == MQ_AVX512 && __builtin_cpu_supports("avx512bf16");
#else
    return 0;
#endif
}

/* one bfloat16 token x (C) -> xp (C) in the path's order (perm applied), xs (G) group sums; nat: C scratch */
void mq_prepare_token_bf16(const mq_mat *m, const uint16_t *x, uint16_t *xp, uint16_t *nat, float *xs) {
    const int B = mq_bf16_block(m->bits), NP = mq_bf16_passes(m->bits), C = m->C, G = mq_groups(m);
    for (int k = 0; k < C; k++) nat[k] = m->perm ? x[m->perm[k]] : x[k];
    memcpy(xp, nat, sizeof(uint16_t) * C);
    for (int g = 0; g < G; g++) {
        int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
        float sum = 0.0f;
        for (int k = k0; k < k1; k++) sum += mq_bf2f(nat[k]);
        xs[g] = sum;
        for (int k = k0; k + B <= k1; k += B)
            for (int p = 0; p < NP; p++)
                for (int l = 0; l < 32; l++) xp[k + 32 * p + l] = nat[k + mq_bf16_column(m->bits, p, l)];
    }
}

/* y (T, ldy) = x (T, C) W^T for bfloat16 x. Returns 0, or -1 (no AVX512-BF16), -2 (out of memory), -4 (the block
 * does not divide the group size: use mq_gemm). */
int mq_gemm_bf16(const mq_mat *m, const uint16_t *x, int T, float *y, int ldy, int nthreads) {
#if defined(__x86_64__) || defined(__i386__)
    if (!mq_cpu_bf16()) return -1;
    const int C = m->C, G = mq_groups(m);
    if (m->gs % mq_bf16_block(m->bits)) return -4;
    if (mq_use_lut1(m, MQ_AVX512, T)) return gemm_lut1(m, NULL, x, T, y, ldy, nthreads);
    uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)T * C + 1));
    uint16_t *nat = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)C + 1));
    float *xs = (float *)malloc(sizeof(float) * ((size_t)T * G + 1));
    if (!xp || !nat || !xs) {
        free(xp); free(nat); free(xs);
        return -2;
    }
    for (int t = 0; t < T; t++)
        mq_prepare_token_bf16(m, x + (size_t)t * C, xp + (size_t)t * C, nat, xs + (size_t)t * G);
    const int nt = mq_threads_for((double)m->R * C * T, nthreads);
    const int RB = 16, nblk = (m->R + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        int r0 = b * RB, r1 = r0 + RB < m->R ? r0 + RB : m->R;
        mq_rows_bf16(m, xp, xs, T, y, ldy, r0, r1);
    }
    free(xp); free(nat); free(xs);
    return 0;
#else
    return -1;
#endif
}

void mq_prefill_rows_bf16(const mq_mat *m, const uint16_t *xp, int T, float *y, int ldy, int r0, int r1);

/* y (T, ldy) = x (T, C) bf16(W)^T for bfloat16 x and many tokens: the weights dequantised in registers
 * (mq_avx512bf16.c). Returns 0, or -1 (no AVX512-BF16), -2 (out of memory), -4 (block does not divide the group). */
int mq_prefill_bf16(const mq_mat *m, const uint16_t *x, int T, float *y, int ldy, int nthreads) {
#if defined(__x86_64__) || defined(__i386__)
    if (!mq_cpu_bf16()) return -1;
    const int C = m->C, G = mq_groups(m);
    if (m->gs % mq_bf16_block(m->bits)) return -4;
    uint16_t *xp = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)T * C + 32));
    uint16_t *nat = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)C + 1));
    float *xs = (float *)malloc(sizeof(float) * ((size_t)G + 1));
    if (!xp || !nat || !xs) {
        free(xp); free(nat); free(xs);
        return -2;
    }
    for (int t = 0; t < T; t++) mq_prepare_token_bf16(m, x + (size_t)t * C, xp + (size_t)t * C, nat, xs);
    const int nt = mq_threads_for((double)m->R * C * T, nthreads);
    const int RB = 16, nblk = (m->R + RB - 1) / RB;
#pragma omp parallel for schedule(dynamic, 4) num_threads(nt) if (nt > 1)
    for (int b = 0; b < nblk; b++) {
        int r0 = b * RB, r1 = r0 + RB < m->R ? r0 + RB : m->R;
        mq_prefill_rows_bf16(m, xp, T, y, ldy, r0, r1);
    }
    free(xp); free(nat); free(xs);
    return 0;
#else
    (void)m; (void)x; (void)T; (void)y; (void)ldy; (void)nthreads;
    return -1;
#endif
}
