/* Portable path: natural column order, one code at a time (any width, group size and shape). */
#include <math.h>
#include <string.h>

#include "mq.h"

float mq_h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, f;
    if (e == 0) {
        float v = ldexpf((float)m, -24);
        return s ? -v : v;
    }
    f = (e == 31) ? (s | 0x7f800000u | (m << 13)) : (s | ((e + 112) << 23) | (m << 13));
    float out;
    memcpy(&out, &f, 4);
    return out;
}

void mq_rows_scalar(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0, int r1) {
    const int G = mq_groups(m);
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = m->q + (size_t)r * m->row_bytes;
        for (int t = 0; t < T; t++) {
            const float *xt = xp + (size_t)t * m->C;
            float acc = 0.0f;
            for (int g = 0; g < G; g++) {
                float s, z;
                mq_sz(m, r, g, &s, &z);
                int k0 = g * m->gs, k1 = k0 + m->gs < m->C ? k0 + m->gs : m->C;
                acc += s * (mq_tail_dot(qr, k0, k1, m->bits, m->row_bytes, xt) - z * xs[(size_t)t * G + g]);
            }
            y[(size_t)t * ldy + r] = acc;
        }
    }
}

void mq_deq_scalar(const mq_mat *m, void *out, int bf16, int r0, int r1) {
    const int G = mq_groups(m);
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = m->q + (size_t)r * m->row_bytes;
        for (int g = 0; g < G; g++) {
            size_t gi = (size_t)r * G + g;
            float s = mq_h2f(m->sc[gi]), z = m->zr ? mq_h2f(m->zr[gi]) : 0.0f;
            int k0 = g * m->gs, k1 = k0 + m->gs < m->C ? k0 + m->gs : m->C;
            for (int k = k0; k < k1; k++) {
                float q = (float)mq_code_at(qr, k, m->bits, m->row_bytes);
                float w = m->zr ? s * (q - z) : s * (2.0f * q - 1.0f);
                size_t o = (size_t)r * m->C + k;
                if (bf16) {
                    uint32_t u;
                    memcpy(&u, &w, 4);
                    u += 0x7FFFu + ((u >> 16) & 1u);
                    ((uint16_t *)out)[o] = (uint16_t)(u >> 16);
                } else {
                    ((float *)out)[o] = w;
                }
            }
        }
    }
}
