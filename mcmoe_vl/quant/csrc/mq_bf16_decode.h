/* Code decoding shared by the AVX512-BF16 kernels (mq_avx512bf16.c, mq_panel_bf16.c): include only from sources
 * compiled with -mavx512f -mavx512bw -mavx512bf16 -mf16c. See mq_avx512bf16.c for the lane arrangement. */
#ifndef MQ_BF16_DECODE_H
#define MQ_BF16_DECODE_H
#include <immintrin.h>
#include <string.h>

#include "mq.h"
#include "mq_avx512_util.h"

/* static inline so that the row loop sees constants (an exported function is called through the PLT) */
static inline int passes(int bits) { return bits == 4 ? 2 : 4; }
static inline int block(int bits) { return bits == 4 ? 64 : 128; }

/* the 16-bit code indices of pass p (only the low bits matter: the table repeats) */
static inline __attribute__((always_inline)) __m512i indices(__m512i v, const int bits, const int p) {
    if (bits == 1) {
        const __m512i cnt = _mm512_set_epi64(0x0004000400040004LL + 0x0001000100010001LL * p,
                                             0x0004000400040004LL + 0x0001000100010001LL * p,
                                             0x0004000400040004LL + 0x0001000100010001LL * p,
                                             0x0004000400040004LL + 0x0001000100010001LL * p,
                                             0x0001000100010001LL * p, 0x0001000100010001LL * p,
                                             0x0001000100010001LL * p, 0x0001000100010001LL * p);
        return _mm512_srlv_epi16(v, cnt);
    }
    if (bits == 3) {
        const __m512i t = _mm512_srli_epi32(v, 6 * p);
        return _mm512_mask_blend_epi16(0xAAAAAAAA, t, _mm512_slli_epi32(t, 13));
    }
    return _mm512_srli_epi16(v, bits * p);
}

static inline __attribute__((always_inline)) __m512i decode(const uint8_t *p, const int bits) {
    if (bits == 3) return mq_load_words3(p);
    if (bits == 1) {
        return _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p)));
    }
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
}

/* the small integer i as bfloat16 (exact) */
static inline uint16_t int_bf16(int i) {
    float f = (float)i;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(u >> 16);
}

static inline __attribute__((always_inline)) __m512bh value_table(const mq_mat *m, size_t gi, const int bits) {
    const float s1 = _cvtsh_ss(m->sc[gi]);
    const float s = m->zr ? s1 : 2.0f * s1, z = m->zr ? _cvtsh_ss(m->zr[gi]) : 0.5f;
    const int mask = (1 << bits) - 1;
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(iota, _mm512_set1_epi32(mask)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(16)),
                                                          _mm512_set1_epi32(mask)));
    __m512 wl, wh;
    if (m->zr) {
        wl = _mm512_mul_ps(_mm512_set1_ps(s), _mm512_sub_ps(lo, _mm512_set1_ps(z)));
        wh = _mm512_mul_ps(_mm512_set1_ps(s), _mm512_sub_ps(hi, _mm512_set1_ps(z)));
    } else { /* s1 (2q - 1), as PackedTensor.dequantize computes it */
        const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), vs = _mm512_set1_ps(s1);
        wl = _mm512_mul_ps(vs, _mm512_sub_ps(_mm512_mul_ps(two, lo), one));
        wh = _mm512_mul_ps(vs, _mm512_sub_ps(_mm512_mul_ps(two, hi), one));
    }
    (void)s;
    (void)z;
    return _mm512_cvtne2ps_pbh(wh, wl);
}

#endif
