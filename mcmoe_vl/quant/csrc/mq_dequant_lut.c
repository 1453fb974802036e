/* Native CPU kernels for packed weights (see kernels.py). Row bitstream layout: bit p of a row's bytes
 * (LSB first) is bit p % bits of code p / bits, for every width (this is what packing.py writes). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    } else if (e == 31) {
        f = s | 0x7f800000u | (m << 13);
    } else {
        f = s | ((e + 112) << 23) | (m << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

/* out (R, C) float32 = scale * (q - zero)   or   scale * (2q - 1) when binary.
 * Per (row, group) a table val[c] of the 2^bits dequantised values is built with exactly that float arithmetic,
 * then every code is one lookup. */
static inline uint32_t code_at(const uint8_t *q, int k, int bits, int row_bytes) {
    int p = k * bits, byte = p >> 3, sh = p & 7;
    uint32_t v = q[byte];
    if (byte + 1 < row_bytes) v |= (uint32_t)q[byte + 1] << 8;
    return (v >> sh) & ((1u << bits) - 1u);
}

void mq_dequant(const uint8_t *qd, const uint16_t *sc, const uint16_t *zr, float *out, int R, int C, int G, int gs,
                int bits, int row_bytes, int binary, int nthreads) {
    const int ncode = 1 << bits, per = (bits == 3) ? 8 : 8 / bits, nbytes = (bits == 3) ? 3 : 1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = 0; r < R; r++) {
        const uint8_t *q = qd + (size_t)r * row_bytes;
        float *o = out + (size_t)r * C;
        float val[16];
        for (int g = 0; g < G; g++) {
            float s = h2f(sc[(size_t)r * G + g]);
            float z = binary ? 0.0f : h2f(zr[(size_t)r * G + g]);
            for (int c = 0; c < ncode; c++) val[c] = binary ? s * ((float)c * 2.0f - 1.0f) : s * ((float)c - z);
            int k0 = g * gs, k1 = (g + 1) * gs < C ? (g + 1) * gs : C;
            int full = k0 + ((k1 - k0) / per) * per;
            if (bits == 3) {
                for (int k = k0; k < full; k += 8) {
                    const uint8_t *b = q + (k / 8) * 3;
                    uint32_t w = b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16);
                    for (int t = 0; t < 8; t++) o[k + t] = val[(w >> (3 * t)) & 7];
                }
            } else {
                const uint32_t mask = (1u << bits) - 1u;
                for (int k = k0; k < full; k += per) {
                    uint32_t b = q[(k / per) * nbytes];
                    for (int t = 0; t < per; t++) o[k + t] = val[(b >> (bits * t)) & mask];
                }
            }
            for (int k = full; k < k1; k++) o[k] = val[code_at(q, k, bits, row_bytes)];
        }
    }
}

/* y (T, R) float32 = x (T, C) W^T with W = dequant(qd, sc, zr), via lookup tables of partial sums:
 * tab[t][g][j][b] = sum over the 8 bits of byte value b at byte j of group g of x_t[k] * 2^(bit within code). */
void mq_lut_gemv(const uint8_t *qd, const uint16_t *sc, const uint16_t *zr, const float *x, float *y, int T, int R,
                 int C, int G, int gs, int bits, int row_bytes, int binary, int nthreads) {
    const int gbytes = gs * bits / 8;
    const size_t tsz = (size_t)G * gbytes * 256;
    float *tab = (float *)malloc(sizeof(float) * tsz * T);
    float *xs = (float *)malloc(sizeof(float) * (size_t)G * T);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int t = 0; t < T; t++) {
        for (int g = 0; g < G; g++) {
            const float *xt = x + (size_t)t * C;
            int k0 = g * gs;
            float sum = 0.0f;
            for (int k = k0; k < k0 + gs && k < C; k++) sum += xt[k];
            xs[(size_t)t * G + g] = sum;
            for (int j = 0; j < gbytes; j++) {
                float lo[16], hi[16], w[8];
                for (int b = 0; b < 8; b++) {
                    int p = 8 * j + b, k = k0 + p / bits;
                    w[b] = (k < C) ? (float)(1 << (p % bits)) * xt[k] : 0.0f;
                }
                for (int v = 0; v < 16; v++) {
                    float a = 0.0f, c = 0.0f;
                    for (int b = 0; b < 4; b++) {
                        if (v >> b & 1) { a += w[b]; c += w[b + 4]; }
                    }
                    lo[v] = a;
                    hi[v] = c;
                }
                float *tj = tab + (size_t)t * tsz + ((size_t)g * gbytes + j) * 256;
                for (int v = 0; v < 256; v++) tj[v] = lo[v & 15] + hi[v >> 4];
            }
        }
    }
    /* rows in blocks of RB: the block's codes stay in L2 while each group's table (gbytes x 1 KiB) sits in L1 */
    const int RB = 64;
    const int nblk = (R + RB - 1) / RB;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int blk = 0; blk < nblk; blk++) {
        int r0 = blk * RB, r1 = r0 + RB < R ? r0 + RB : R;
        for (int t = 0; t < T; t++) {
            const float *tt = tab + (size_t)t * tsz;
            float yb[64];
            for (int r = r0; r < r1; r++) yb[r - r0] = 0.0f;
            for (int g = 0; g < G; g++) {
                int nb = (g == G - 1) ? row_bytes - g * gbytes : gbytes;
                const float *tg = tt + (size_t)g * gbytes * 256;
                float xg = xs[(size_t)t * G + g];
                for (int r = r0; r < r1; r++) {
                    const uint8_t *q = qd + (size_t)r * row_bytes + (size_t)g * gbytes;
                    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
                    int j = 0;
                    for (; j + 4 <= nb; j += 4) {
                        a0 += tg[(size_t)j * 256 + q[j]];
                        a1 += tg[(size_t)(j + 1) * 256 + q[j + 1]];
                        a2 += tg[(size_t)(j + 2) * 256 + q[j + 2]];
                        a3 += tg[(size_t)(j + 3) * 256 + q[j + 3]];
                    }
                    for (; j < nb; j++) a0 += tg[(size_t)j * 256 + q[j]];
                    float acc = (a0 + a1) + (a2 + a3);
                    float s = h2f(sc[(size_t)r * G + g]);
                    yb[r - r0] += binary ? s * (2.0f * acc - xg) : s * (acc - h2f(zr[(size_t)r * G + g]) * xg);
                }
            }
            for (int r = r0; r < r1; r++) y[(size_t)t * R + r] = yb[r - r0];
        }
    }
    free(tab);
    free(xs);
}
