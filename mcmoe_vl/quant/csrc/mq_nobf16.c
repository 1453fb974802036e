/* Stand-in for mq_avx512bf16.c when the compiler cannot build AVX512-BF16 code (gcc < 10, clang < 9): the path is
 * reported absent (mq_bf16_built = 0) and never called; bfloat16 tokens then run the float32 paths. */
#include "mq.h"

const int mq_bf16_built = 0;
int mq_bf16_passes(int bits) { return bits == 4 ? 2 : 4; }
int mq_bf16_block(int bits) { return bits == 4 ? 64 : 128; }
int mq_bf16_column(int bits, int pass, int lane) { (void)bits; return 32 * pass + lane; }
void mq_rows_bf16(const mq_mat *m, const uint16_t *xp, const float *xs, int T, float *y, int ldy, int r0, int r1) {
    (void)m; (void)xp; (void)xs; (void)T; (void)y; (void)ldy; (void)r0; (void)r1;
}
void mq_prefill_rows_bf16(const mq_mat *m, const uint16_t *xp, int T, float *y, int ldy, int r0, int r1) {
    (void)m; (void)xp; (void)T; (void)y; (void)ldy; (void)r0; (void)r1;
}
