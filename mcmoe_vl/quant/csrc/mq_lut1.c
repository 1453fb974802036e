/* 1-bit decode by table lookup (AVX-512F/BW, F16C), for one or two tokens of float32 or bfloat16 values.
 *
 * At 1 bit w = s (2q - 1), so a row's group sum is  s (2 sum_{q_k = 1} x_k - X_g)  with X_g the token's group sum.
 * For every 4 consecutive stored columns j the token's 16 possible partial sums  T_j[n] = sum_{bit i of n} x_{4j+i}
 * are computed once per token (4 C floats). A 32-bit word of a row's packed bits holds the 8 nibbles of 32
 * columns; 16 rows' words side by side are 16 table indices per nibble, so one vpermps looks up 16 rows x 4
 * columns. The 16 rows' words of a 128-column block are loaded as 16 x 16 bytes and transposed with 8 vpermt2d.
 * Per 64 weights: one lookup, one shift, one add, against one bf16 dot product per 32 weights in mq_avx512bf16.c.
 * Sums are float32 throughout (table entries are sums of up to 4 token values), so the result equals the
 * dequantised product to float32 round-off. Needs every group whole and a multiple of 128 columns. */
#include <immintrin.h>

#include "mq.h"
#include "mq_avx512_util.h"

int mq_lut1_on = 1; /* 0: the bit-plane / bf16 dot-product kernels instead (for benchmarks) */

int mq_lut1_ok(const mq_mat *m) {
    return mq_lut1_on && m->bits == 1 && m->zr == NULL && m->gs % 128 == 0 && m->C % m->gs == 0;
}

/* floats of one prepared token: the tables (4 C), then the group sums (G); the row loop uses the static inline
 * one, not the exported one (which a shared library calls through the PLT) */
static inline size_t floats(const mq_mat *m) { return (size_t)4 * m->C + mq_groups(m); }
size_t mq_lut1_floats(const mq_mat *m) { return floats(m); }

/* x (C) float32 in natural column order -> buf (mq_lut1_floats): tables and group sums, in stored order */
void mq_lut1_prepare(const mq_mat *m, const float *x, float *buf) {
    const int C = m->C, G = mq_groups(m);
    float *xs = buf + (size_t)4 * C;
    const __m512 b0 = _mm512_setr_ps(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1);
    const __m512 b1 = _mm512_setr_ps(0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1);
    const __m512 b2 = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1);
    const __m512 b3 = _mm512_setr_ps(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int g = 0; g < G; g++) {
        float sum = 0.0f;
        for (int k = g * m->gs; k < (g + 1) * m->gs; k += 4) {
            float v[4];
            for (int i = 0; i < 4; i++) v[i] = m->perm ? x[m->perm[k + i]] : x[k + i];
            __m512 t = _mm512_mul_ps(b0, _mm512_set1_ps(v[0]));
            t = _mm512_fmadd_ps(b1, _mm512_set1_ps(v[1]), t);
            t = _mm512_fmadd_ps(b2, _mm512_set1_ps(v[2]), t);
            t = _mm512_fmadd_ps(b3, _mm512_set1_ps(v[3]), t);
            _mm512_storeu_ps(buf + (size_t)4 * k, t);
            sum += v[0] + v[1] + v[2] + v[3];
        }
        xs[g] = sum;
    }
}

/* The 16 rows of a block: row i at base + i * stride, or at rows[i] when rows is given (the last block, whose
 * missing rows repeat its last one). Kept apart so that whole blocks address rows by stride: loading 16 row
 * pointers per 128 columns makes the loop markedly slower. */
typedef struct {
    const uint8_t *q;
    const uint16_t *sc;
    size_t q_stride, sc_stride;
    const uint8_t *const *qrows;
    const uint16_t *const *srows;
    const uint8_t *next; /* the next block's first row (stride q_stride), prefetched as this one is read; or NULL */
    int next_rows;
} rowset;

static inline __attribute__((always_inline)) const uint8_t *qrow(const rowset *rs, int i) {
    return rs->qrows ? rs->qrows[i] : rs->q + (size_t)i * rs->q_stride;
}

static inline __attribute__((always_inline)) const uint16_t *srow(const rowset *rs, int i) {
    return rs->srows ? rs->srows[i] : rs->sc + (size_t)i * rs->sc_stride;
}

/* the 4 words of 16 rows (16 bytes of each row from byte k): V[d] lane i = row i's word d */
static inline __attribute__((always_inline)) void load_words(const rowset *rs, size_t k, __m512i V[4]) {
    __m512i Z[4];
    for (int a = 0; a < 4; a++) {
        __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(qrow(rs, 4 * a) + k)));
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(qrow(rs, 4 * a + 1) + k)), 1);
        z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(qrow(rs, 4 * a + 2) + k)), 2);
        Z[a] = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)(qrow(rs, 4 * a + 3) + k)), 3);
    }
    /* Z[a] element 4 L + d = row 4 a + L, word d; A: rows 0-7 words 0|1 and 2|3, B: rows 8-15 */
    const __m512i i0 = _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i i1 = _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512i A0 = _mm512_permutex2var_epi32(Z[0], i0, Z[1]), A1 = _mm512_permutex2var_epi32(Z[0], i1, Z[1]);
    const __m512i B0 = _mm512_permutex2var_epi32(Z[2], i0, Z[3]), B1 = _mm512_permutex2var_epi32(Z[2], i1, Z[3]);
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    V[0] = _mm512_permutex2var_epi32(A0, lo, B0);
    V[1] = _mm512_permutex2var_epi32(A0, hi, B0);
    V[2] = _mm512_permutex2var_epi32(A1, lo, B1);
    V[3] = _mm512_permutex2var_epi32(A1, hi, B1);
}

/* st[16 g + i] = the float32 scale of group g0 + g of row i, for the 16 groups from g0 (fewer at the row's end;
 * rows from n on repeat row n - 1): 16 rows of 16 float16 scales converted, then transposed in registers */
static inline __attribute__((always_inline)) void scales16(const rowset *rs, int G, int g0, float *st) {
    const int ng = G - g0 < 16 ? G - g0 : 16;
    const __mmask16 mk = (__mmask16)((1u << ng) - 1u);
    __m512 a[16];
    for (int i = 0; i < 16; i++)
        a[i] = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mk, srow(rs, i) + g0)));
    mq_transpose16(a);
    for (int k = 0; k < 16; k++) _mm512_storeu_ps(st + 16 * k, a[k]);
}

/* 16 rows -> y[t * ldy + i], i < n */
static inline __attribute__((always_inline)) void block16(const mq_mat *m, const rowset *rs, const float *buf,
                                                          int T, float *y, int ldy, int n) {
    const int G = mq_groups(m), C = m->C, nb = m->gs / 128;
    const size_t tok = floats(m);
    float st[256] __attribute__((aligned(64)));
    __m512 acc[2], zacc[2];
    for (int t = 0; t < T; t++) acc[t] = zacc[t] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        if (g % 16 == 0) scales16(rs, G, g, st);
        __m512 p[2][4];
        for (int t = 0; t < T; t++) p[t][0] = p[t][1] = p[t][2] = p[t][3] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const size_t k = (size_t)g * m->gs + 128 * b; /* first column of the block */
            if (rs->next && k % 512 == 0) /* the same cache line of the next block's rows: reading 16 rows side by
                                           * side defeats the hardware prefetcher (cold: 3-4x slower without) */
                for (int i = 0; i < rs->next_rows; i++) __builtin_prefetch(rs->next + i * rs->q_stride + k / 8, 0, 3);
            __m512i V[4];
            load_words(rs, k / 8, V);
#pragma GCC unroll 4
            for (int d = 0; d < 4; d++)
#pragma GCC unroll 8
                for (int j = 0; j < 8; j++) {
                    const __m512i ix = j ? _mm512_srli_epi32(V[d], 4 * j) : V[d];
                    const size_t tj = (k / 4 + 8 * d + j) * 16; /* the table of columns k + 32 d + 4 j .. + 3 */
                    for (int t = 0; t < T; t++)
                        p[t][j & 3] = _mm512_add_ps(p[t][j & 3],
                                                    _mm512_permutexvar_ps(ix, _mm512_loadu_ps(buf + t * tok + tj)));
                }
        }
        const __m512 s = _mm512_load_ps(st + 16 * (g % 16));
        for (int t = 0; t < T; t++) {
            const __m512 pt = _mm512_add_ps(_mm512_add_ps(p[t][0], p[t][1]), _mm512_add_ps(p[t][2], p[t][3]));
            acc[t] = _mm512_fmadd_ps(s, pt, acc[t]);
            zacc[t] = _mm512_fmadd_ps(s, _mm512_set1_ps(buf[t * tok + (size_t)4 * C + g]), zacc[t]);
        }
    }
    const __mmask16 mk = (__mmask16)((1u << n) - 1u);
    for (int t = 0; t < T; t++) /* s1 (2 P - X) */
        _mm512_mask_storeu_ps(y + (size_t)t * ldy, mk, _mm512_fmsub_ps(_mm512_set1_ps(2.0f), acc[t], zacc[t]));
}

/* rows r0..r1-1 (at most 16) of y for T <= 2 tokens prepared by mq_lut1_prepare (mq_lut1_floats apart) */
void mq_rows_lut1(const mq_mat *m, const float *buf, int T, float *y, int ldy, int r0, int r1) {
    const int G = mq_groups(m), n = r1 - r0, nn = m->R - r1 < 16 ? m->R - r1 : 16;
    /* the next block (the threads take runs of consecutive blocks): its rows line by line in block16, its scales
     * here */
    if (nn > 0) mq_prefetch(m->sc + (size_t)r1 * G, sizeof(uint16_t) * (size_t)nn * G);
    rowset rs = {m->q + (size_t)r0 * m->row_bytes, m->sc + (size_t)r0 * G, (size_t)m->row_bytes, (size_t)G, NULL, NULL,
                 nn > 0 ? m->q + (size_t)r1 * m->row_bytes : NULL, nn};
    if (n == 16) {
        if (T == 2) block16(m, &rs, buf, 2, y + r0, ldy, 16);
        else block16(m, &rs, buf, 1, y + r0, ldy, 16);
        return;
    }
    const uint8_t *qrows[16]; /* rows past r1 repeat row r1 - 1; their results are not stored */
    const uint16_t *srows[16];
    for (int i = 0; i < 16; i++) {
        qrows[i] = rs.q + (size_t)(i < n ? i : n - 1) * m->row_bytes;
        srows[i] = rs.sc + (size_t)(i < n ? i : n - 1) * G;
    }
    rs.qrows = qrows;
    rs.srows = srows;
    if (T == 2) block16(m, &rs, buf, 2, y + r0, ldy, n);
    else block16(m, &rs, buf, 1, y + r0, ldy, n);
}
