/* Stand-in for mq_panel_bf16.c when the compiler cannot build AVX512-BF16 code: the panel GEMM is absent
 * (mq_panel_gemm returns -1) and prefill dequantises into a buffer for torch's GEMM instead. */
#include "mq.h"

const int mq_panel_built = 0;
int mq_panel_ok(const mq_mat *m) { (void)m; return 0; }
int mq_panel_gemm(const mq_mat *m, const uint16_t *x, int T, void *y, int ldy, int bf16_out, int nthreads) {
    (void)m; (void)x; (void)T; (void)y; (void)ldy; (void)bf16_out; (void)nthreads;
    return -1;
}
