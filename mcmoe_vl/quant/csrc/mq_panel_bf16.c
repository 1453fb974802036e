/* Prefill on AVX512-BF16: y (T, R) = x (T, C) bf16(W)^T for many bfloat16 tokens, W dequantised panel by panel.
 *
 * A GEMM blocked the usual way: for each block of KC columns and each panel of NC rows, the panel's weights are
 * dequantised once (s (q - z) in float32, 1 bit s (2q - 1), rounded to bfloat16 to nearest even, exactly as
 * PackedTensor.dequantize then torch's bf16 conversion compute them) into a buffer that stays in L2, laid out for
 * the micro-kernel: per 16 rows and column pair, the 16 rows' two bf16 weights side by side (one 64-byte vector).
 * The micro-kernel keeps 32 rows x 12 tokens of float32 sums in registers: per column pair two vector loads and 24
 * vdpbf16ps, each with the token's two bf16 values broadcast from memory. The packed weight is read once (a 2-bit
 * matrix streams 1/8 of the bytes a dense bf16 GEMM reads); the dequantisation costs about 12 instructions per 32
 * weights, once, against 2 x 12 dot products per 32 weights x 12 tokens. Needs C and the group size multiples of 128
 * (whole 128-column blocks in one group). Columns run in stored order: the tokens are permuted once (act-order). */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "mq.h"

const int mq_panel_built = 1;

/* Panel shape: 128 rows x 2048 columns of bf16 (512 KiB, in L2 with the token block). Long panels mean few passes
 * over y: measured on 14336 x 4096 and 4096 x 14336 at 128 and 256 tokens (one thread, against dense bf16 in the
 * same run), 128 x 2048 and 64 x 4096 ran 3-8 % faster than 512 x 512 and 256 x 1024. */
#ifndef KC
#define KC 2048 /* columns per block (a multiple of 128) */
#endif
#ifndef NC
#define NC 128 /* rows per panel (a multiple of 32) */
#endif
#define MT 12  /* tokens per micro-tile */

/* W of 16 rows (row i at q + i rb, or repeating row n - 1 from i = n on) x the 128-column block from column k:
 * the 4 bits words of each row, transposed: V[w] lane i = row i's word w */
static inline __attribute__((always_inline)) void load_block(const uint8_t *q, size_t rb, int n, size_t k,
                                                             const int bits, __m512i *V) {
    const uint8_t *rows[16];
    for (int i = 0; i < 16; i++) rows[i] = q + (size_t)(i < n ? i : n - 1) * rb + k * bits / 8;
    const __m512i i0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i i1 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int c = 0; c < bits; c++) { /* words 4c .. 4c + 3 */
        __m512i Z[4];
        for (int a = 0; a < 4; a++) {
            __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[4 * a] + 16 * c)));
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rows[4 * a + 1] + 16 * c)), 1);
            z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rows[4 * a + 2] + 16 * c)), 2);
            Z[a] = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(rows[4 * a + 3] + 16 * c)), 3);
        }
        const __m512i A0 = _mm512_permutex2var_epi32(Z[0], i0, Z[1]), A1 = _mm512_permutex2var_epi32(Z[0], i1, Z[1]);
        const __m512i B0 = _mm512_permutex2var_epi32(Z[2], i0, Z[3]), B1 = _mm512_permutex2var_epi32(Z[2], i1, Z[3]);
        V[4 * c] = _mm512_permutex2var_epi32(A0, lo, B0);
        V[4 * c + 1] = _mm512_permutex2var_epi32(A0, hi, B0);
        V[4 * c + 2] = _mm512_permutex2var_epi32(A1, lo, B1);
        V[4 * c + 3] = _mm512_permutex2var_epi32(A1, hi, B1);
    }
}

/* the words holding columns 2j and 2j + 1 of the block (bit offset 2 j bits in each row's bit stream), shifted so
 * that column 2j's code is in the low bits of *c0 and column 2j + 1's in those of *c1 (higher bits: other codes) */
static inline __attribute__((always_inline)) void codes(const __m512i *V, int j, const int bits, __m512i *c0,
                                                        __m512i *c1) {
    const int o = 2 * j * bits, w = o / 32, s = o % 32;
    __m512i v = _mm512_srli_epi32(V[w], s);
    if (s + 2 * bits > 32) v = _mm512_or_si512(v, _mm512_slli_epi32(V[w + 1], 32 - s));
    *c0 = v;
    *c1 = _mm512_srli_epi32(v, bits);
}

/* 16 rows x one 128-column block into the panel (64 column pairs of 16 lanes x 2 bf16) */
static inline __attribute__((always_inline)) void fill_block(const mq_mat *m, int r, int n, int k, uint32_t *dst,
                                                             const int bits, const int zp) {
    __m512i V[16];
    load_block(m->q + (size_t)r * m->row_bytes, (size_t)m->row_bytes, n, (size_t)k, bits, V);
    const int G = mq_groups(m), g = k / m->gs;
    float s[16], z[16];
    for (int i = 0; i < 16; i++) {
        const size_t gi = (size_t)(r + (i < n ? i : n - 1)) * G + g;
        s[i] = _cvtsh_ss(m->sc[gi]);
        z[i] = zp ? _cvtsh_ss(m->zr[gi]) : 0.0f;
    }
    const __m512 vs = _mm512_loadu_ps(s), vz = _mm512_loadu_ps(z);
    /* code -> float by one vpermps (it reads the index's low 4 bits): entry i = q, or 2q - 1 at 1 bit, of the code
     * q = i mod 2^bits */
    float tab[16];
    for (int i = 0; i < 16; i++) tab[i] = zp ? (float)(i & ((1 << bits) - 1)) : (float)(2 * (i & 1) - 1);
    const __m512 vt = _mm512_loadu_ps(tab);
    static const uint16_t order[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i inter = _mm512_loadu_si512(order); /* lane i: row i's columns 2j, 2j + 1 */
#pragma GCC unroll 64
    for (int j = 0; j < 64; j++) { /* unrolled: each pair's word and shifts are constants */
        __m512i c0, c1;
        codes(V, j, bits, &c0, &c1);
        __m512 w0 = _mm512_permutexvar_ps(c0, vt), w1 = _mm512_permutexvar_ps(c1, vt);
        if (zp) { /* s (q - z), as PackedTensor.dequantize computes it */
            w0 = _mm512_mul_ps(vs, _mm512_sub_ps(w0, vz));
            w1 = _mm512_mul_ps(vs, _mm512_sub_ps(w1, vz));
        } else { /* s (2q - 1) */
            w0 = _mm512_mul_ps(vs, w0);
            w1 = _mm512_mul_ps(vs, w1);
        }
        const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(w1, w0); /* [w0 of 16 rows | w1 of 16 rows] */
        _mm512_store_si512(dst + 16 * (size_t)j, _mm512_permutexvar_epi16(inter, h));
    }
}

/* rows r0..r0+nr-1 x columns k0..k0+kc-1 into the panel: [row vector v][column pair j][16 lanes] */
static void fill_panel(const mq_mat *m, int r0, int nr, int k0, int kc, uint32_t *panel) {
    const size_t span = (size_t)kc * m->bits / 8; /* bytes of a row in the block */
    for (int v = 0; v < (nr + 15) / 16; v++) {
        const int n = nr - 16 * v < 16 ? nr - 16 * v : 16;
        /* the next 16 rows' bytes, ahead of their use: 16 rows a row_bytes apart defeat the hardware prefetcher */
        for (int i = 16 * (v + 1); i < 16 * (v + 2) && i < nr; i++)
            for (size_t o = 0; o < span; o += 64)
                _mm_prefetch((const char *)(m->q + (size_t)(r0 + i) * m->row_bytes + (size_t)k0 * m->bits / 8 + o),
                             _MM_HINT_T0);
        for (int b = 0; b < kc / 128; b++) {
            uint32_t *dst = panel + ((size_t)v * (kc / 2) + 64 * b) * 16;
            if (!m->zr) fill_block(m, r0 + 16 * v, n, k0 + 128 * b, dst, 1, 0); /* binary (1 bit) */
            else if (m->bits == 1) fill_block(m, r0 + 16 * v, n, k0 + 128 * b, dst, 1, 1);
            else if (m->bits == 2) fill_block(m, r0 + 16 * v, n, k0 + 128 * b, dst, 2, 1);
            else if (m->bits == 3) fill_block(m, r0 + 16 * v, n, k0 + 128 * b, dst, 3, 1);
            else fill_block(m, r0 + 16 * v, n, k0 + 128 * b, dst, 4, 1);
        }
    }
}

/* y[t][0..31] (+)= sum over kp column pairs of the panel's two row vectors p0, p1 and nt tokens x (bf16 pairs,
 * packed [column pair][token] so that one base register addresses them all) */
static inline __attribute__((always_inline)) void micro(const uint32_t *p0, const uint32_t *p1, const uint32_t *x,
                                                        float *y, size_t ldy, int kp, int first, const int nt,
                                                        int nr) {
    __m512 a0[MT], a1[MT];
    const __mmask16 m0 = (__mmask16)(nr >= 16 ? 0xFFFF : (1u << nr) - 1u);
    const __mmask16 m1 = (__mmask16)(nr >= 32 ? 0xFFFF : nr <= 16 ? 0 : (1u << (nr - 16)) - 1u);
    for (int t = 0; t < nt; t++) {
        a0[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m0, y + t * ldy);
        a1[t] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m1, y + t * ldy + 16);
    }
    for (int j = 0; j < kp; j++) {
        const __m512bh w0 = (__m512bh)_mm512_load_si512(p0 + 16 * (size_t)j);
        const __m512bh w1 = (__m512bh)_mm512_load_si512(p1 + 16 * (size_t)j);
#pragma GCC unroll 12
        for (int t = 0; t < nt; t++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[(size_t)j * nt + t]);
            a0[t] = _mm512_dpbf16_ps(a0[t], w0, xb);
            a1[t] = _mm512_dpbf16_ps(a1[t], w1, xb);
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm512_mask_storeu_ps(y + t * ldy, m0, a0[t]);
        _mm512_mask_storeu_ps(y + t * ldy + 16, m1, a1[t]);
    }
}

/* the token tiles: MT tokens, then narrower ones for the rest */
static inline int tile_width(int left) { return left >= MT ? MT : left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* tokens xs (T, C) bf16 -> xt: per token tile (t0, nt) at xt + t0 C / 2, column pair j of token t0 + i at
 * j nt + i (32-bit words: the token's two bf16 values of columns 2j, 2j + 1) */
static void pack_tokens(const uint16_t *xs, int T, int C, uint32_t *xt) {
    const uint32_t *xd = (const uint32_t *)xs;
    for (int t0 = 0, nt; t0 < T; t0 += nt) {
        nt = tile_width(T - t0);
        uint32_t *dst = xt + (size_t)t0 * C / 2;
        for (int j = 0; j < C / 2; j++)
            for (int i = 0; i < nt; i++) dst[(size_t)j * nt + i] = xd[(size_t)(t0 + i) * C / 2 + j];
    }
}

/* one panel (columns k0 .. k0 + 2 kp - 1) against every token: tiles of 32 rows x the token tiles */
static void panel_tokens(const uint32_t *panel, int nr, int kp, const uint32_t *xt, int k0, int C, int T, float *y,
                         size_t ldy, int first) {
    for (int t0 = 0, nt; t0 < T; t0 += nt) {
        nt = tile_width(T - t0);
        const uint32_t *x = xt + (size_t)t0 * C / 2 + (size_t)k0 / 2 * nt;
        for (int v = 0; 16 * v < nr; v += 2) {
            const uint32_t *p0 = panel + (size_t)v * kp * 16, *p1 = p0 + (size_t)kp * 16;
            const int rows = nr - 16 * v; /* rows left from this vector on (the second vector may be past nr) */
            float *yt = y + t0 * ldy + 16 * v;
            switch (nt) {
                case MT: micro(p0, p1, x, yt, ldy, kp, first, MT, rows); break;
                case 8: micro(p0, p1, x, yt, ldy, kp, first, 8, rows); break;
                case 4: micro(p0, p1, x, yt, ldy, kp, first, 4, rows); break;
                case 2: micro(p0, p1, x, yt, ldy, kp, first, 2, rows); break;
                default: micro(p0, p1, x, yt, ldy, kp, first, 1, rows); break;
            }
        }
    }
}

int mq_panel_ok(const mq_mat *m) { return m->C % 128 == 0 && m->gs % 128 == 0; }

/* y (T, ldy) = x (T, C) bf16(W)^T, x bfloat16 in natural column order. Returns 0, -2 (out of memory) or -4 (C or
 * the group size not a multiple of 128). The caller checks the CPU (mq_cpu_bf16). */
int mq_panel_gemm(const mq_mat *m, const uint16_t *x, int T, float *y, int ldy, int nthreads) {
    if (!mq_panel_ok(m)) return -4;
    const int C = m->C, R = m->R;
    uint16_t *xs = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)T * C);
    uint32_t *xt = (uint32_t *)malloc(sizeof(uint16_t) * (size_t)T * C);
    if (!xs || !xt) {
        free(xs);
        free(xt);
        return -2;
    }
    for (int t = 0; t < T; t++) /* stored column order */
        for (int k = 0; k < C; k++) xs[(size_t)t * C + k] = x[(size_t)t * C + (m->perm ? m->perm[k] : k)];
    pack_tokens(xs, T, C, xt);
    free(xs);
    const int npan = (R + NC - 1) / NC;
    int nt = mq_threads_for((double)R * C * T, nthreads), rc = 0;
    if (nt > npan) nt = npan;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        uint32_t *panel = (uint32_t *)aligned_alloc(64, sizeof(uint32_t) * (size_t)NC * KC / 2);
        if (!panel) {
#pragma omp atomic write
            rc = -2;
        }
        for (int k0 = 0; k0 < C; k0 += KC) {
            const int kc = C - k0 < KC ? C - k0 : KC;
#pragma omp for schedule(dynamic, 1)
            for (int p = 0; p < npan; p++) {
                if (!panel) continue;
                const int r0 = p * NC, nr = R - r0 < NC ? R - r0 : NC;
                fill_panel(m, r0, nr, k0, kc, panel);
                panel_tokens(panel, nr, kc / 2, xt, k0, C, T, y + r0, (size_t)ldy, k0 == 0);
            }
        }
        free(panel);
    }
    free(xt);
    return rc;
}
