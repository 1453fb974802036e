/* 16 x 16 float32 transpose in registers (AVX-512F): on return a[j] holds what was column j (lane j of each a[i]). */
#ifndef MQ_TRANSPOSE_H
#define MQ_TRANSPOSE_H
#include <immintrin.h>

static inline __attribute__((always_inline)) void mq_transpose16(__m512 a[16]) {
    __m512 b[16];
    for (int i = 0; i < 16; i += 2) { /* pairs of rows */
        b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
        b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) /* 2 x 2 blocks */
        for (int j = 0; j < 2; j++) {
            a[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(b[i + j]), _mm512_castps_pd(b[i + j + 2])));
            a[i + j + 2] =
                _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(b[i + j]), _mm512_castps_pd(b[i + j + 2])));
        }
    for (int i = 0; i < 16; i += 8) /* 128-bit lanes: 4 x 4 blocks */
        for (int j = 0; j < 4; j++) {
            b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
            b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        a[j] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0x88);
        a[j + 8] = _mm512_shuffle_f32x4(b[j], b[j + 8], 0xdd);
    }
    /* a[k] now holds column k with its two low bits swapped: put columns 1, 2 (and 5, 6, ...) in place */
    for (int k = 0; k < 16; k += 4) {
        const __m512 t = a[k + 1];
        a[k + 1] = a[k + 2];
        a[k + 2] = t;
    }
}
#endif
