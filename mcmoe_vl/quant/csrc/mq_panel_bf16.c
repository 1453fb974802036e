/* Prefill on AVX512-BF16: y (T, R) = x (T, C) bf16(W)^T for many bfloat16 tokens, W dequantised panel by panel.
 *
 * A GEMM blocked the usual way, with the tokens in the vector lanes. For each block of KC columns and each panel
 * of NC rows, the panel's weights are dequantised once into a row-major bf16 buffer that stays in L2: per (row,
 * group) the 32-entry table of the values s (q - z) (1 bit: s (2q - 1)), computed in float32 and rounded to
 * bfloat16 to nearest even as PackedTensor.dequantize then torch's bf16 conversion compute them, and one vpermw
 * per 32 weights (mq_bf16_decode.h; the columns in that kernel's arranged order, the tokens arranged to match).
 * The tokens are packed once: per column pair, 16 tokens' two bf16 values side by side (one vector). The
 * micro-kernel keeps 12 rows x 32 tokens of float32 sums in registers: per column pair two token vectors and 12
 * row values broadcast from the panel, 24 vdpbf16ps. Sums are kept transposed (row, token) across column blocks
 * and written to y (token, row) at the end, as float32 or rounded to bfloat16. The packed weight is read once; the
 * dequantisation costs about 3 instructions per 32 weights, once, against 32 tokens x 2 products per 32 weights.
 * Needs C and the group size multiples of 128. Tokens are padded to a multiple of 16 (the padding computes zeros). */
#include <immintrin.h>
#include <stdlib.h>
#include <string.h>

#include "mq.h"
#include "mq_bf16_decode.h"

const int mq_panel_built = 1;

/* Panel shape: 128 rows x 2048 columns of bf16 (512 KiB, in L2 with a token block). */
#ifndef KC
#define KC 2048 /* columns per block (a multiple of 128) */
#endif
#ifndef NC
#define NC 128 /* rows per panel */
#endif
#define RT 12 /* rows per micro-tile */
/* panel row stride in bf16 values: the columns plus one cache line, so that the micro-tile's 12 rows do not all map
 * to one L1 set (at a stride of 4096 bytes they would) */
#define LDP(kc) ((kc) + 32)

int mq_bf16_column(int bits, int pass, int lane);

/* rows r0..r0+nr-1, columns k0..k0+kc-1 (arranged order) of the bf16 weight into panel (nr rows, LDP(kc) apart) */
static inline __attribute__((always_inline)) void fill_bits(const mq_mat *m, int r0, int nr, int k0, int kc,
                                                            uint16_t *panel, const int bits) {
    const int B = block(bits), NP = passes(bits), G = mq_groups(m);
    for (int r = 0; r < nr; r++) {
        const uint8_t *qr = m->q + (size_t)(r0 + r) * m->row_bytes;
        if (r + 4 < nr) { /* codes, scales and zeros 4 rows ahead: rows lie far apart, beyond the prefetcher's reach */
            for (int o = 0; o < kc * bits / 8; o += 64)
                _mm_prefetch((const char *)(qr + 4 * (size_t)m->row_bytes + (size_t)k0 * bits / 8 + o), _MM_HINT_T0);
            const size_t g4 = (size_t)(r0 + r + 4) * G + k0 / m->gs, ng = (size_t)(kc + m->gs - 1) / m->gs;
            for (size_t o = 0; o < 2 * ng; o += 64) {
                _mm_prefetch((const char *)(m->sc + g4) + o, _MM_HINT_T0);
                if (m->zr) _mm_prefetch((const char *)(m->zr + g4) + o, _MM_HINT_T0);
            }
        }
        uint16_t *dst = panel + (size_t)r * LDP(kc);
        __m512i tab = _mm512_setzero_si512();
        int g_tab = -1;
        for (int k = k0; k < k0 + kc; k += B) {
            const int g = k / m->gs;
            if (g != g_tab) {
                tab = (__m512i)value_table(m, (size_t)(r0 + r) * G + g, bits);
                g_tab = g;
            }
            const __m512i v = decode(qr + (size_t)k * bits / 8, bits);
#pragma GCC unroll 4
            for (int p = 0; p < NP; p++)
                _mm512_storeu_si512(dst + (k - k0) + 32 * p, _mm512_permutexvar_epi16(indices(v, bits, p), tab));
        }
    }
}

static void fill_panel(const mq_mat *m, int r0, int nr, int k0, int kc, uint16_t *panel) {
    switch (m->bits) {
        case 1: fill_bits(m, r0, nr, k0, kc, panel, 1); break;
        case 2: fill_bits(m, r0, nr, k0, kc, panel, 2); break;
        case 3: fill_bits(m, r0, nr, k0, kc, panel, 3); break;
        default: fill_bits(m, r0, nr, k0, kc, panel, 4); break;
    }
}

/* yt[r][0 .. 16 tv) (+)= sum over kp column pairs of panel rows w (row stride ldw, in 32-bit words) x tokens xv
 * (per column pair tv vectors of 16 tokens); nr rows (nr <= RT) */
static inline __attribute__((always_inline)) void micro(const uint32_t *w, size_t ldw, const uint32_t *xv,
                                                        float *yt, size_t ldt, int kp, int first, const int nr,
                                                        const int tv) {
    __m512 a[RT][2];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < tv; v++) a[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(yt + r * ldt + 16 * v);
    for (int j = 0; j < kp; j++) {
        __m512bh x[2];
        for (int v = 0; v < tv; v++) x[v] = (__m512bh)_mm512_loadu_si512(xv + ((size_t)j * tv + v) * 16);
#pragma GCC unroll 12
        for (int r = 0; r < nr; r++) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)w[r * ldw + j]);
            for (int v = 0; v < tv; v++) a[r][v] = _mm512_dpbf16_ps(a[r][v], x[v], b);
        }
    }
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < tv; v++) _mm512_storeu_ps(yt + r * ldt + 16 * v, a[r][v]);
}

/* one panel (nr rows, kp column pairs from pair j0) against every token: tiles of up to RT rows x 2 token
 * vectors. xt: the packed tokens, groups of 2 vectors (the last may hold 1), group g at g cp 32 words (cp: column
 * pairs of a token), within a group [column pair][vector][16 tokens]; yt: (rows, 16 TV) float32 sums */
static void panel_tokens(const uint16_t *panel, int nr, int kp, const uint32_t *xt, int cp, int j0, int TV,
                         float *yt, size_t ldt, int first) {
    const uint32_t *w0 = (const uint32_t *)panel;
    for (int v0 = 0; v0 < TV; v0 += 2) {
        const int tv = TV - v0 >= 2 ? 2 : 1;
        const uint32_t *xv = xt + (size_t)(v0 / 2) * cp * 32 + (size_t)j0 * tv * 16;
        for (int r = 0, n; r < nr; r += n) {
            n = nr - r >= RT ? RT : nr - r >= 8 ? 8 : nr - r >= 4 ? 4 : nr - r >= 2 ? 2 : 1;
            const uint32_t *w = w0 + (size_t)r * LDP(2 * kp) / 2;
            float *y = yt + (size_t)r * ldt + 16 * v0;
#define MQ_MICRO(N)                                                                      \
    (tv == 2 ? micro(w, LDP(2 * (size_t)kp) / 2, xv, y, ldt, kp, first, N, 2)                  \
             : micro(w, LDP(2 * (size_t)kp) / 2, xv, y, ldt, kp, first, N, 1))
            switch (n) {
                case RT: MQ_MICRO(RT); break;
                case 8: MQ_MICRO(8); break;
                case 4: MQ_MICRO(4); break;
                case 2: MQ_MICRO(2); break;
                default: MQ_MICRO(1); break;
            }
#undef MQ_MICRO
        }
    }
}

/* one token x (C, natural order) -> out (C) in the dequantised columns' order: the act-order permutation (a scalar
 * gather), then the decode's order within each block of B columns, by two vpermt2w per 32 values (in: the 2 or 4
 * vectors of a block, idx / hi: per pass the source position within the block and whether it is >= 64) */
static inline void arrange_row(const mq_mat *m, const uint16_t *x, uint16_t *tmp, uint16_t *out, const __m512i *idx,
                               const __mmask32 *hi) {
    const int C = m->C, B = block(m->bits), NP = passes(m->bits);
    const uint16_t *nat = x;
    if (m->perm) {
        for (int k = 0; k < C; k++) tmp[k] = x[m->perm[k]];
        nat = tmp;
    }
    for (int k = 0; k < C; k += B) {
        __m512i in[4];
        for (int i = 0; i < B / 32; i++) in[i] = _mm512_loadu_si512(nat + k + 32 * i);
        for (int p = 0; p < NP; p++) {
            __m512i v = _mm512_permutex2var_epi16(in[0], idx[p], in[1]); /* sources 0-63 */
            if (B == 128) /* sources 64-127 where hi */
                v = _mm512_mask_blend_epi16(hi[p], v, _mm512_permutex2var_epi16(in[2], idx[p], in[3]));
            _mm512_storeu_si512(out + k + 32 * p, v);
        }
    }
}

/* tokens x (T, C) natural order -> xt (see panel_tokens), arranged as the dequantised columns, padded with zero
 * tokens to 16 TV: each token arranged, then 16 tokens x 16 column pairs transposed in registers */
static int pack_tokens(const mq_mat *m, const uint16_t *x, int T, int TV, uint32_t *xt) {
    const int C = m->C, cp = C / 2, NP = passes(m->bits);
    uint16_t *arr = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * 32 * ((size_t)C + 32));
    uint16_t *tmp = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)C + 1));
    if (!arr || !tmp) {
        free(arr);
        free(tmp);
        return -2;
    }
    __m512i idx[4];
    __mmask32 hi[4];
    for (int p = 0; p < NP; p++) {
        uint16_t id[32];
        uint32_t h = 0;
        for (int l = 0; l < 32; l++) {
            const int c = mq_bf16_column(m->bits, p, l);
            id[l] = (uint16_t)(c & 63);
            if (c >= 64) h |= 1u << l;
        }
        idx[p] = _mm512_loadu_si512(id);
        hi[p] = (__mmask32)h;
    }
    for (int v0 = 0; v0 < TV; v0 += 2) {
        const int tv = TV - v0 >= 2 ? 2 : 1, nt = 16 * tv;
        for (int i = 0; i < nt; i++) { /* the group's tokens arranged, zero past T */
            const int t = 16 * v0 + i;
            if (t < T) arrange_row(m, x + (size_t)t * C, tmp, arr + (size_t)i * C, idx, hi);
            else memset(arr + (size_t)i * C, 0, sizeof(uint16_t) * C);
        }
        uint32_t *dst = xt + (size_t)(v0 / 2) * cp * 32;
        const uint32_t *a32 = (const uint32_t *)arr;
        for (int j0 = 0; j0 < cp; j0 += 16) /* C is a multiple of 128: whole blocks of 16 pairs */
            for (int v = 0; v < tv; v++) {
                __m512 a[16];
                for (int i = 0; i < 16; i++)
                    a[i] = _mm512_loadu_ps((const float *)(a32 + (size_t)(16 * v + i) * cp + j0));
                mq_transpose16(a); /* a[j]: pair j0 + j of the 16 tokens */
                for (int j = 0; j < 16; j++) _mm512_storeu_ps((float *)(dst + ((size_t)(j0 + j) * tv + v) * 16), a[j]);
            }
    }
    free(arr);
    free(tmp);
    return 0;
}

/* y (T, ldy) <- yt (R, ldt) transposed, 16 x 16 at a time in registers; float32, or rounded to bfloat16 */
static void write_out(const float *yt, size_t ldt, int R, int T, void *y, int ldy, int bf16) {
    for (int r0 = 0; r0 < R; r0 += 16) {
        const int nr = R - r0 < 16 ? R - r0 : 16;
        const __mmask16 mr = (__mmask16)((1u << nr) - 1u);
        for (int t0 = 0; t0 < T; t0 += 16) {
            __m512 a[16];
            for (int i = 0; i < 16; i++) a[i] = _mm512_loadu_ps(yt + (size_t)(r0 + (i < nr ? i : nr - 1)) * ldt + t0);
            mq_transpose16(a);
            for (int t = 0; t < 16 && t0 + t < T; t++) {
                if (bf16)
                    _mm512_mask_storeu_epi16((uint16_t *)y + (size_t)(t0 + t) * ldy + r0, (__mmask32)mr,
                                             _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(a[t])));
                else
                    _mm512_mask_storeu_ps((float *)y + (size_t)(t0 + t) * ldy + r0, mr, a[t]);
            }
        }
    }
}

int mq_panel_ok(const mq_mat *m) { return m->C % 128 == 0 && m->gs % 128 == 0; }

/* y (T, ldy) = x (T, C) bf16(W)^T, x bfloat16 in natural column order, y float32 or (bf16_out) bfloat16. Returns
 * 0, -2 (out of memory) or -4 (C or the group size not a multiple of 128). The caller checks the CPU. */
int mq_panel_gemm(const mq_mat *m, const uint16_t *x, int T, void *y, int ldy, int bf16_out, int nthreads) {
    if (!mq_panel_ok(m)) return -4;
    const int C = m->C, R = m->R, TV = (T + 15) / 16, cp = C / 2;
    const size_t ldt = (size_t)16 * TV;
    uint32_t *xt = (uint32_t *)malloc(sizeof(uint32_t) * ((size_t)TV * 16 * cp + 1));
    float *yt = (float *)malloc(sizeof(float) * ((size_t)R * ldt + 1));
    if (!xt || !yt || pack_tokens(m, x, T, TV, xt)) {
        free(xt);
        free(yt);
        return -2;
    }
    const int npan = (R + NC - 1) / NC;
    int nt = mq_threads_for((double)R * C * T, nthreads), rc = 0;
    if (nt > npan) nt = npan;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        uint16_t *panel = (uint16_t *)aligned_alloc(64, sizeof(uint16_t) * (size_t)NC * LDP(KC));
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
                panel_tokens(panel, nr, kc / 2, xt, cp, k0 / 2, TV, yt + (size_t)r0 * ldt, ldt, k0 == 0);
            }
        }
        free(panel);
    }
    if (rc == 0) write_out(yt, ldt, R, T, y, ldy, bf16_out);
    free(xt);
    free(yt);
    return rc;
}
