/* AVX-512 path (F + BW), compiled with -mavx512f -mavx512bw; called only when the CPU reports both. */
#include <immintrin.h>
#include <string.h>

#include "mq.h"
#include "mq_avx512_util.h"

#define LANES 16
#define NT_MAX 8
typedef __m512 vf;
typedef __m512i vi;
#define VZERO() _mm512_setzero_ps()
#define VSET1(f) _mm512_set1_ps(f)
#define VLOADU(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VI_AND_CVT(v, m) _mm512_cvtepi32_ps(_mm512_and_si512(v, m))
#define VI_SET1(i) _mm512_set1_epi32(i)
#define VHSUM(v) _mm512_reduce_add_ps(v)
/* 16 bytes -> one byte per lane */
#define DECODE_1(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define DECODE_2(p) DECODE_1(p)
#define DECODE_4(p) DECODE_1(p)
#define DECODE_3(p) mq_load_words3(p)
#define VSTOREU(p, v) _mm512_storeu_ps(p, v)
#define VCASTI(v) _mm512_castps_si512(v)
#define VADDI(a, b) _mm512_add_epi32(a, b)
#define VANDI(a, b) _mm512_and_si512(a, b)
#define VSRLI(a, n) _mm512_srli_epi32(a, n)
#define VCVT(v) _mm512_cvtepi32_ps(v)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define STORE_BF16(p, u) _mm256_storeu_si256((__m256i *)(p), _mm512_cvtepi32_epi16(u))
#define ROWS_FN mq_rows_avx512
#define DEQ_FN mq_deq_avx512
#include "mq_simd_rows.h"
