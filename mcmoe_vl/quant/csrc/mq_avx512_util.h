/* AVX-512 helpers shared by the kernels compiled with -mavx512f -mavx512bw (mq_avx512.c, mq_lut1.c and the
 * AVX512-BF16 sources). */
#ifndef MQ_AVX512_UTIL_H
#define MQ_AVX512_UTIL_H
#include <immintrin.h>
#include <stdint.h>

/* 48 bytes of 3-bit codes -> lane i = 24-bit word i: 128-bit lane L loads bytes 12L.. (the last from 32, so no load
 * leaves the block), then one byte shuffle puts bytes 3i..3i+2 of each lane's 12 into dword i */
static inline __m512i mq_load_words3(const uint8_t *p) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 12)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 24)), 2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 32)), 3);
    const __m512i sh = _mm512_setr_epi32(0xff020100, 0xff050403, 0xff080706, 0xff0b0a09,
                                         0xff020100, 0xff050403, 0xff080706, 0xff0b0a09,
                                         0xff020100, 0xff050403, 0xff080706, 0xff0b0a09,
                                         0xff060504, 0xff090807, 0xff0c0b0a, 0xff0f0e0d);
    return _mm512_shuffle_epi8(v, sh);
}

/* 16 x 16 float32 transpose in registers: on return a[j] holds what was column j (lane j of each a[i]). */
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
