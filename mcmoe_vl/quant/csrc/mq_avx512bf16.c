/* AVX512-BF16 path for bfloat16 tokens, compiled with -mavx512f -mavx512bw -mavx512bf16 -mf16c; called only when
 * the CPU reports AVX512-BF16 and the token is bfloat16 (then every product q * x is exact in float32, and
 * vdpbf16ps accumulates pairs of them in float32).
 *
 * Codes are decoded into 32 16-bit lanes; one vpermw looks each code up in a table of the integers 0..2^bits-1 as
 * bfloat16 (repeated to 32 entries, so only the code's low bits matter and no mask is needed), and one vdpbf16ps
 * multiplies the 32 weights with 32 arranged token values, adding pairs into 16 float32 lanes.
 *   1 bit:  16 bytes duplicated into both halves, lanes 0-15 take bit p, lanes 16-31 bit p + 4 (p = 0..3)
 *   2 bits: 32 bytes, pass p takes code p of each byte            (lane l = column 4 l + p)
 *   4 bits: 32 bytes, pass p takes nibble p                      (lane l = column 2 l + p)
 *   3 bits: 48 bytes as 16 24-bit words in 32-bit lanes; pass p: the low 16-bit lane takes code 2p of the word,
 *           the high one code 2p + 1                                (lane 2i + h = column 8 i + 2p + h)
 * mq_bf16_column gives the column of (pass, lane) for the token's arrangement. */
#include <immintrin.h>
#include <string.h>

#include "mq.h"
#include "mq_bf16_decode.h"

#define NT_MAX 8

const int mq_bf16_built = 1;

int mq_bf16_passes(int bits) { return passes(bits); }
int mq_bf16_block(int bits) { return block(bits); }

int mq_bf16_column(int bits, int pass, int lane) {
    switch (bits) {
        case 1: return lane < 16 ? 8 * lane + pass : 8 * (lane - 16) + pass + 4;
        case 2: return 4 * lane + pass;
        case 3: return 8 * (lane / 2) + 2 * pass + (lane & 1);
        default: return 2 * lane + pass;
    }
}

static inline __attribute__((always_inline)) void rows_nt(const mq_mat *m, const uint16_t *x0, const float *xs0,
                                                          float *y0, int ldy, int r0, int r1, const int bits,
                                                          const int NT) {
    const int B = block(bits), NP = passes(bits), G = mq_groups(m), C = m->C;
    uint16_t tab16[32];
    for (int i = 0; i < 32; i++) tab16[i] = int_bf16(i & ((1 << bits) - 1));
    const __m512i tab = _mm512_loadu_si512(tab16);
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = m->q + (size_t)r * m->row_bytes;
        __m512 acc[NT_MAX];
        float sacc[NT_MAX];
        for (int t = 0; t < NT; t++) {
            acc[t] = _mm512_setzero_ps();
            sacc[t] = 0.0f;
        }
        for (int g = 0; g < G; g++) {
            const size_t gi = (size_t)r * G + g;
            float s = _cvtsh_ss(m->sc[gi]), z = 0.5f;
            if (m->zr) z = _cvtsh_ss(m->zr[gi]); else s *= 2.0f;
            const int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
            const int kb = k0 + ((k1 - k0) / B) * B;
            __m512 part[NT_MAX][2];
            for (int t = 0; t < NT; t++) part[t][0] = part[t][1] = _mm512_setzero_ps();
            for (int k = k0; k < kb; k += B) {
                const __m512i v = decode(qr + (size_t)k * bits / 8, bits);
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++) {
                    const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(indices(v, bits, p), tab);
#pragma GCC unroll 8
                    for (int t = 0; t < NT; t++) {
                        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x0 + (size_t)t * C + k + 32 * p);
                        part[t][p & 1] = _mm512_dpbf16_ps(part[t][p & 1], w, xv);
                    }
                }
            }
            const __m512 vs = _mm512_set1_ps(s);
            for (int t = 0; t < NT; t++) {
                acc[t] = _mm512_fmadd_ps(vs, _mm512_add_ps(part[t][0], part[t][1]), acc[t]);
                const uint16_t *xt = x0 + (size_t)t * C;
                float tail = 0.0f;
                for (int k = kb; k < k1; k++) {
                    uint32_t u = (uint32_t)xt[k] << 16;
                    float xf;
                    memcpy(&xf, &u, 4);
                    tail += (float)mq_code_at(qr, k, bits, m->row_bytes) * xf;
                }
                sacc[t] += s * (tail - z * xs0[(size_t)t * G + g]);
            }
        }
        for (int t = 0; t < NT; t++) y0[(size_t)t * ldy + r] = _mm512_reduce_add_ps(acc[t]) + sacc[t];
    }
}

/* Scales of groups g0..g0+15 of row r (fewer at the row's end) as float32 (binary: s = 2 s1, z = 1/2) into *s16;
 * zacc[t] += s z xs_t for these groups: the zero-point terms as vectors, subtracted once per row */
static inline __attribute__((always_inline)) void group_scales(const mq_mat *m, const float *xs0, int r, int g0,
                                                               __m512 *s16, __m512 *zacc, const int NT) {
    const int G = mq_groups(m), n = G - g0 < 16 ? G - g0 : 16;
    const __mmask16 mk = (__mmask16)((1u << n) - 1u);
    const size_t gi = (size_t)r * G + g0;
    const __m512 s1 = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mk, m->sc + gi)));
    __m512 sz = s1;
    *s16 = s1;
    if (m->zr)
        sz = _mm512_mul_ps(s1, _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_maskz_loadu_epi16(mk, m->zr + gi))));
    else
        *s16 = _mm512_add_ps(s1, s1);
    for (int t = 0; t < NT; t++)
        zacc[t] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(mk, xs0 + (size_t)t * G + g0), zacc[t]);
}

/* rows_nt when every group is full (C a multiple of gs): no tail columns; the scales and zero-point terms of 16
 * groups at a time as vectors, so a group costs its blocks and one multiply-add per token. RR rows at a time
 * (2: one token at 1 bit, measured faster; slower at 2-4 bits) share the token loads and interleave their chains */
static inline __attribute__((always_inline)) void rows_full_rr(const mq_mat *m, const uint16_t *x0,
                                                               const float *xs0, float *y0, int ldy, int r,
                                                               const __m512i tab, const int bits, const int NT,
                                                               const int RR) {
    const int B = block(bits), NP = passes(bits), G = mq_groups(m), C = m->C, nb = m->gs / B;
    const uint8_t *qb = m->q + (size_t)r * m->row_bytes;
    const uint16_t *xk = x0;
    __m512 acc[2][2], zacc[2][2], s16[2];
    for (int i = 0; i < RR; i++)
        for (int t = 0; t < NT; t++) acc[i][t] = zacc[i][t] = _mm512_setzero_ps();
    for (int g0 = 0; g0 < G; g0 += 16) {
        for (int i = 0; i < RR; i++) group_scales(m, xs0, r + i, g0, &s16[i], zacc[i], NT);
        for (int g = g0; g < G && g < g0 + 16; g++) {
            __m512 part[2][2][2];
            for (int i = 0; i < RR; i++)
                for (int t = 0; t < NT; t++) part[i][t][0] = part[i][t][1] = _mm512_setzero_ps();
            for (int j = 0; j < nb; j++, qb += B * bits / 8, xk += B) {
                __m512i v[2];
#pragma GCC unroll 2
                for (int i = 0; i < RR; i++) v[i] = decode(qb + (size_t)i * m->row_bytes, bits);
#pragma GCC unroll 4
                for (int p = 0; p < NP; p++)
#pragma GCC unroll 2
                    for (int t = 0; t < NT; t++) {
                        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xk + (size_t)t * C + 32 * p);
#pragma GCC unroll 2
                        for (int i = 0; i < RR; i++)
                            part[i][t][p & 1] = _mm512_dpbf16_ps(
                                part[i][t][p & 1], (__m512bh)_mm512_permutexvar_epi16(indices(v[i], bits, p), tab),
                                xv);
                    }
            }
            for (int i = 0; i < RR; i++) {
                const __m512 vs = _mm512_permutexvar_ps(_mm512_set1_epi32(g - g0), s16[i]);
                for (int t = 0; t < NT; t++)
                    acc[i][t] = _mm512_fmadd_ps(vs, _mm512_add_ps(part[i][t][0], part[i][t][1]), acc[i][t]);
            }
        }
    }
    for (int i = 0; i < RR; i++)
        for (int t = 0; t < NT; t++)
            y0[(size_t)t * ldy + r + i] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[i][t], zacc[i][t]));
}

static inline __attribute__((always_inline)) void rows_full(const mq_mat *m, const uint16_t *x0, const float *xs0,
                                                            float *y0, int ldy, int r0, int r1, const int bits,
                                                            const int NT) {
    uint16_t tab16[32];
    for (int i = 0; i < 32; i++) tab16[i] = int_bf16(i & ((1 << bits) - 1));
    const __m512i tab = _mm512_loadu_si512(tab16);
    int r = r0;
    for (; r + 2 <= r1 && NT == 1 && bits == 1; r += 2) rows_full_rr(m, x0, xs0, y0, ldy, r, tab, bits, NT, 2);
    for (; r < r1; r++) rows_full_rr(m, x0, xs0, y0, ldy, r, tab, bits, NT, 1);
}

static inline __attribute__((always_inline)) void rows_bits(const mq_mat *m, const uint16_t *xp, const float *xs,
                                                            int T, float *y, int ldy, int r0, int r1,
                                                            const int bits) {
    const int G = mq_groups(m);
    if (T <= 2 && m->C % m->gs == 0 && m->gs % block(bits) == 0) { /* decode (at 8 tokens it would spill) */
        int t = 0;
        for (; t + 2 <= T; t += 2)
            rows_full(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 2);
        if (t < T) rows_full(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 1);
        return;
    }
    int t = 0;
    for (; t + NT_MAX <= T; t += NT_MAX)
        rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, NT_MAX);
    for (; t + 2 <= T; t += 2)
        rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 2);
    if (t < T) rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 1);
}

void mq_rows_bf16(const mq_mat *m, const uint16_t *xp, const float *xs, int T, float *y, int ldy, int r0, int r1) {
    switch (m->bits) {
        case 1: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 1); break;
        case 2: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 2); break;
        case 3: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 3); break;
        default: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 4); break;
    }
}

/* -- Prefill: many bfloat16 tokens, weights dequantised in registers ---------------------------------------------
 * Per (row, group) a table of the 2^bits dequantised values s (q - z) (1 bit: s (2q - 1)), computed in float32 and
 * rounded to bfloat16 (round to nearest even, as torch rounds PackedTensor.dequantize), repeated to 32 entries; the
 * code indices of a pass look it up with one vpermw, giving 32 dequantised weights. A tile of RB rows x TB tokens
 * keeps its float32 accumulators in registers over the whole row, so every decoded weight vector serves TB tokens
 * and every token vector RB rows, and no weight is written to memory. The result equals x @ bf16(W)^T accumulated
 * in float32 (summation order aside). Columns after a group's last full block run a scalar loop. */

/* tile shape: rows x tokens (16 float32 accumulators in registers) */
#ifndef PF_RB
#define PF_RB 4
#endif
#ifndef PF_TB
#define PF_TB 4
#endif

static inline float bf16_round(float w) {
    uint32_t u;
    memcpy(&u, &w, 4);
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    memcpy(&w, &u, 4);
    return w;
}

static inline __attribute__((always_inline)) void prefill_tile(const mq_mat *m, const uint16_t *x0, float *y0,
                                                               int ldy, int r0, const int bits, const int RB,
                                                               const int TB) {
    const int B = block(bits), NP = passes(bits), G = mq_groups(m), C = m->C;
    __m512 acc[PF_RB][PF_TB];
    float sacc[PF_RB][PF_TB];
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++) {
            acc[r][t] = _mm512_setzero_ps();
            sacc[r][t] = 0.0f;
        }
    for (int g = 0; g < G; g++) {
        const int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
        const int kb = k0 + ((k1 - k0) / B) * B;
        __m512i tab[PF_RB];
        for (int r = 0; r < RB; r++) tab[r] = (__m512i)value_table(m, (size_t)(r0 + r) * G + g, bits);
        for (int k = k0; k < kb; k += B) {
            __m512i v[PF_RB];
            for (int r = 0; r < RB; r++) v[r] = decode(m->q + (size_t)(r0 + r) * m->row_bytes + (size_t)k * bits / 8, bits);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++) {
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) {
                    const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(indices(v[r], bits, p), tab[r]);
#pragma GCC unroll 8
                    for (int t = 0; t < TB; t++)
                        acc[r][t] = _mm512_dpbf16_ps(acc[r][t], w,
                                                     (__m512bh)_mm512_loadu_si512(x0 + (size_t)t * C + k + 32 * p));
                }
            }
        }
        for (int k = kb; k < k1; k++)
            for (int r = 0; r < RB; r++) {
                const size_t gi = (size_t)(r0 + r) * G + g;
                const float q = (float)mq_code_at(m->q + (size_t)(r0 + r) * m->row_bytes, k, bits, m->row_bytes);
                const float s1 = _cvtsh_ss(m->sc[gi]);
                const float w = bf16_round(m->zr ? s1 * (q - _cvtsh_ss(m->zr[gi])) : s1 * (2.0f * q - 1.0f));
                for (int t = 0; t < TB; t++) sacc[r][t] += w * mq_bf2f(x0[(size_t)t * C + k]);
            }
    }
    for (int r = 0; r < RB; r++)
        for (int t = 0; t < TB; t++) y0[(size_t)t * ldy + r0 + r] = _mm512_reduce_add_ps(acc[r][t]) + sacc[r][t];
}


static inline __attribute__((always_inline)) void prefill_rows_tb(const mq_mat *m, const uint16_t *x0, float *y0,
                                                                  int ldy, int r0, int r1, const int bits,
                                                                  const int TB) {
    int r = r0;
    for (; r + PF_RB <= r1; r += PF_RB) prefill_tile(m, x0, y0, ldy, r, bits, PF_RB, TB);
    for (; r < r1; r++) prefill_tile(m, x0, y0, ldy, r, bits, 1, TB);
}

/* token tiles of PF_TB, then one of 2 and one of 1 for the remainder */
static inline __attribute__((always_inline)) void prefill_bits(const mq_mat *m, const uint16_t *xp, int T, float *y,
                                                               int ldy, int r0, int r1, const int bits) {
    int t = 0;
    for (; t + PF_TB <= T; t += PF_TB)
        prefill_rows_tb(m, xp + (size_t)t * m->C, y + (size_t)t * ldy, ldy, r0, r1, bits, PF_TB);
    if (t + 2 <= T) {
        prefill_rows_tb(m, xp + (size_t)t * m->C, y + (size_t)t * ldy, ldy, r0, r1, bits, 2);
        t += 2;
    }
    if (t < T) prefill_rows_tb(m, xp + (size_t)t * m->C, y + (size_t)t * ldy, ldy, r0, r1, bits, 1);
}

void mq_prefill_rows_bf16(const mq_mat *m, const uint16_t *xp, int T, float *y, int ldy, int r0, int r1) {
    switch (m->bits) {
        case 1: prefill_bits(m, xp, T, y, ldy, r0, r1, 1); break;
        case 2: prefill_bits(m, xp, T, y, ldy, r0, r1, 2); break;
        case 3: prefill_bits(m, xp, T, y, ldy, r0, r1, 3); break;
        default: prefill_bits(m, xp, T, y, ldy, r0, r1, 4); break;
    }
}
