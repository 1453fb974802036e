/* The SIMD row loop, shared by mq_avx2.c and mq_avx512.c. The including file defines:
 *   LANES, NT_MAX (tokens kept in registers: 8 with 32 vector registers, 4 with 16), vf (float vector),
 *   vi (int vector), VZERO(), VSET1(f), VLOADU(p), VFMA(a, b, c), VMUL(a, b), VI_AND_CVT(v, mask) (float vector
 *   of (v & mask)), VI_SET1(i), VHSUM(v), DECODE_<bits>(p) -> vi (one int lane per container: a byte for 1/2/4
 *   bits, a 24-bit word for 3 bits), ROWS_FN (the function's name). */

/* B = LANES * P columns per block; one decode and P planes per block, each plane one FMA per token. */
#define MQ_PLANES(bits) ((bits) == 3 ? 8 : 8 / (bits))

/* mq_sz with the hardware half -> float conversion (F16C; the scalar mq_h2f costs more than a group of codes) */
static inline void sz_fast(const mq_mat *m, int G, int r, int g, float *s, float *z) {
    size_t i = (size_t)r * G + g;
    float s1 = _cvtsh_ss(m->sc[i]);
    if (m->zr == NULL) {
        *s = 2.0f * s1;
        *z = 0.5f;
    } else {
        *s = s1;
        *z = _cvtsh_ss(m->zr[i]);
    }
}

/* NT tokens (a compile-time constant after inlining: their accumulators live in registers). With few tokens the
 * scale is applied to the decoded codes (one multiply per plane, shared by the tokens) so that the accumulators run
 * through the whole row: a per-group reduction would cost more than the group's 8 FMAs. With many tokens the scale
 * is applied once per group to each token's partial sum instead. A independent accumulators per token (plane j into
 * j % A) keep a single chain of FMAs from waiting on the FMA latency. */
static inline __attribute__((always_inline)) void rows_nt(const mq_mat *m, const float *x0, const float *xs0,
                                                          float *y0, int ldy, int r0, int r1, const int bits,
                                                          const int NT) {
    const int P = MQ_PLANES(bits), B = LANES * P, G = mq_groups(m), C = m->C;
    const int mask = (1 << bits) - 1;
    const int A = NT >= 4 ? 1 : 4 / NT, SCALE_CODES = NT <= 2;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = m->q + (size_t)r * m->row_bytes;
        vf acc[NT_MAX][4];
        float sacc[NT_MAX];
        for (int t = 0; t < NT; t++) {
            for (int a = 0; a < A; a++) acc[t][a] = VZERO();
            sacc[t] = 0.0f;
        }
        for (int g = 0; g < G; g++) {
            float s, z;
            sz_fast(m, G, r, g, &s, &z);
            const vf vs = VSET1(s);
            const int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
            const int kb = k0 + ((k1 - k0) / B) * B;
            vf part[NT_MAX];
            for (int t = 0; t < NT; t++) part[t] = VZERO();
            for (int k = k0; k < kb; k += B) {
                const uint8_t *p = qr + (size_t)k * bits / 8;
                const vi v = bits == 1 ? DECODE_1(p) : bits == 2 ? DECODE_2(p) : bits == 3 ? DECODE_3(p) : DECODE_4(p);
#pragma GCC unroll 8
                for (int j = 0; j < P; j++) {
                    vf c = VI_AND_CVT(v, VI_SET1(mask << (bits * j)));
                    if (SCALE_CODES) c = VMUL(c, vs);
#pragma GCC unroll 8
                    for (int t = 0; t < NT; t++) {
                        const vf xv = VLOADU(x0 + (size_t)t * C + k + j * LANES);
                        if (SCALE_CODES)
                            acc[t][j % A] = VFMA(c, xv, acc[t][j % A]);
                        else
                            part[t] = VFMA(c, xv, part[t]);
                    }
                }
            }
            for (int t = 0; t < NT; t++) {
                if (!SCALE_CODES) acc[t][0] = VFMA(vs, part[t], acc[t][0]);
                const float *xt = x0 + (size_t)t * C;
                float tail = kb < k1 ? mq_tail_dot(qr, kb, k1, bits, m->row_bytes, xt) : 0.0f;
                sacc[t] += s * (tail - z * xs0[(size_t)t * G + g]);
            }
        }
        for (int t = 0; t < NT; t++) {
            vf sum = acc[t][0];
            for (int a = 1; a < A; a++) sum = sum + acc[t][a];
            y0[(size_t)t * ldy + r] = VHSUM(sum) + sacc[t];
        }
    }
}

static inline __attribute__((always_inline)) void rows_bits(const mq_mat *m, const float *xp, const float *xs,
                                                            int T, float *y, int ldy, int r0, int r1,
                                                            const int bits) {
    const int G = mq_groups(m);
    int t = 0;
    for (; t + NT_MAX <= T; t += NT_MAX)
        rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, NT_MAX);
    for (; t + 2 <= T; t += 2)
        rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 2);
    if (t < T) rows_nt(m, xp + (size_t)t * m->C, xs + (size_t)t * G, y + (size_t)t * ldy, ldy, r0, r1, bits, 1);
}

void ROWS_FN(const mq_mat *m, const float *xp, const float *xs, int T, float *y, int ldy, int r0, int r1) {
    switch (m->bits) {
        case 1: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 1); break;
        case 2: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 2); break;
        case 3: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 3); break;
        default: rows_bits(m, xp, xs, T, y, ldy, r0, r1, 4); break;
    }
}

/* Dequantisation for prefill: rows r0..r1-1 of W (exactly the values s (q - z), or s (2q - 1) at 1 bit, in float32)
 * written as float32 or bfloat16 (round to nearest even, as torch rounds) in the arranged column order (each full
 * block as [plane j][lane i] = column k0 + P i + j; tails in place): out (R, C) times the arranged token equals
 * x W^T. */
static inline __attribute__((always_inline)) void store_w(vf w, void *out, size_t at, int bf16) {
    if (!bf16) {
        VSTOREU((float *)out + at, w);
        return;
    }
    vi u = VCASTI(w);
    u = VADDI(u, VADDI(VI_SET1(0x7FFF), VANDI(VSRLI(u, 16), VI_SET1(1))));
    STORE_BF16((uint16_t *)out + at, VSRLI(u, 16));
}

static inline __attribute__((always_inline)) void deq_bits(const mq_mat *m, void *out, int bf16, int r0, int r1,
                                                           const int bits) {
    const int P = MQ_PLANES(bits), B = LANES * P, G = mq_groups(m), C = m->C;
    const int mask = (1 << bits) - 1;
    for (int r = r0; r < r1; r++) {
        const uint8_t *qr = m->q + (size_t)r * m->row_bytes;
        const size_t o = (size_t)r * C;
        for (int g = 0; g < G; g++) {
            const size_t gi = (size_t)r * G + g;
            const float s = _cvtsh_ss(m->sc[gi]), z = m->zr ? _cvtsh_ss(m->zr[gi]) : 0.0f;
            const vf vs = VSET1(s), vz = VSET1(z), two = VSET1(2.0f), one = VSET1(1.0f);
            const int k0 = g * m->gs, k1 = k0 + m->gs < C ? k0 + m->gs : C;
            const int kb = k0 + ((k1 - k0) / B) * B;
            for (int k = k0; k < kb; k += B) {
                const uint8_t *p = qr + (size_t)k * bits / 8;
                const vi v = bits == 1 ? DECODE_1(p) : bits == 2 ? DECODE_2(p) : bits == 3 ? DECODE_3(p) : DECODE_4(p);
#pragma GCC unroll 8
                for (int j = 0; j < P; j++) {
                    const vf q = VCVT(VANDI(VSRLI(v, bits * j), VI_SET1(mask)));
                    const vf w = m->zr ? VMUL(vs, VSUB(q, vz)) : VMUL(vs, VSUB(VMUL(two, q), one));
                    store_w(w, out, o + k + j * LANES, bf16);
                }
            }
            for (int k = kb; k < k1; k++) {
                float q = (float)mq_code_at(qr, k, bits, m->row_bytes);
                float w = m->zr ? s * (q - z) : s * (2.0f * q - 1.0f);
                if (bf16) {
                    uint32_t u;
                    memcpy(&u, &w, 4);
                    u += 0x7FFFu + ((u >> 16) & 1u);
                    ((uint16_t *)out)[o + k] = (uint16_t)(u >> 16);
                } else {
                    ((float *)out)[o + k] = w;
                }
            }
        }
    }
}

void DEQ_FN(const mq_mat *m, void *out, int bf16, int r0, int r1) {
    switch (m->bits) {
        case 1: deq_bits(m, out, bf16, r0, r1, 1); break;
        case 2: deq_bits(m, out, bf16, r0, r1, 2); break;
        case 3: deq_bits(m, out, bf16, r0, r1, 3); break;
        default: deq_bits(m, out, bf16, r0, r1, 4); break;
    }
}
