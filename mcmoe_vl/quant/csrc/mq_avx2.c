/* AVX2 path (AVX2 + FMA), compiled with -mavx2 -mfma; called only when the CPU reports both. */
#include <immintrin.h>
#include <string.h>

#include "mq.h"

#define LANES 8
#define NT_MAX 4
typedef __m256 vf;
typedef __m256i vi;
#define VZERO() _mm256_setzero_ps()
#define VSET1(f) _mm256_set1_ps(f)
#define VLOADU(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VI_AND_CVT(v, m) _mm256_cvtepi32_ps(_mm256_and_si256(v, m))
#define VI_SET1(i) _mm256_set1_epi32(i)
static inline float VHSUM(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
/* 8 bytes -> one byte per lane */
#define DECODE_1(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define DECODE_2(p) DECODE_1(p)
#define DECODE_4(p) DECODE_1(p)
/* 24 bytes -> lane i = 24-bit word i; both 16-byte loads stay inside the block */
static inline vi DECODE_3(const uint8_t *p) {
    __m128i lo = _mm_loadu_si128((const __m128i *)p), hi = _mm_loadu_si128((const __m128i *)(p + 8));
    lo = _mm_shuffle_epi8(lo, _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1));
    hi = _mm_shuffle_epi8(hi, _mm_setr_epi8(4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1));
    return _mm256_set_m128i(hi, lo);
}
#define VSTOREU(p, v) _mm256_storeu_ps(p, v)
#define VCASTI(v) _mm256_castps_si256(v)
#define VADDI(a, b) _mm256_add_epi32(a, b)
#define VANDI(a, b) _mm256_and_si256(a, b)
#define VSRLI(a, n) _mm256_srli_epi32(a, n)
#define VCVT(v) _mm256_cvtepi32_ps(v)
#define VSUB(a, b) _mm256_sub_ps(a, b)
/* 8 x 32-bit (values < 2^16) -> 8 x 16-bit: pack within 128-bit lanes, then gather the two low quadwords */
#define STORE_BF16(p, u) _mm_storeu_si128((__m128i *)(p), _mm256_castsi256_si128(_mm256_permute4x64_epi64( \
    _mm256_packus_epi32(u, u), 0x08)))
#define ROWS_FN mq_rows_avx2
#define DEQ_FN mq_deq_avx2
#include "mq_simd_rows.h"
