/* One MoE layer's routed (and shared) experts for the tokens of a step, from packed storage, in one call.
 *
 * out (T, H) += sum over kept (token t, slot j) of w[t, j] * down(silu(gate x_t) * up x_t) of expert idx[t, j].
 * Experts are given in one array (routed experts first; shared experts are passed as further experts that every
 * token selects with weight 1). Pruned pairs (keep[t, j] == 0) and experts no token selected cost nothing.
 * Work: phase 1 computes every active expert's gate/up rows for its tokens, phase 2 every down row; each phase
 * is one OpenMP loop over (expert, block of rows), so the threads stay busy across experts of different widths. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "mq.h"

typedef struct {
    mq_mat gate_up; /* [gate; up] (2I, H), or the gate alone (I, H) when split */
    mq_mat up;      /* (I, H) when split */
    mq_mat down;    /* (H, I) */
    int32_t split;
} mq_expert;

typedef struct {
    const mq_mat *m;
    int isa, T, ldy;
    float *xp, *xs, *y; /* xp holds bfloat16 tokens (uint16) when isa == ISA_BF16, tables when ISA_LUT1 */
} job;

#define ISA_BF16 3
#define ISA_LUT1 4 /* 1-bit decode by table lookup (mq_lut1.c) */
int mq_use_lut1(const mq_mat *m, int isa, int T);
size_t mq_lut1_floats(const mq_mat *m);
void mq_lut1_prepare(const mq_mat *m, const float *x, float *buf);
void mq_rows_lut1(const mq_mat *m, const float *buf, int T, float *y, int ldy, int r0, int r1);
int mq_resolve_isa(const mq_mat *m, int isa);
void mq_prepare_token(const mq_mat *m, int isa, const float *x, float *xp, float *xs);
int mq_cpu_bf16(void);
int mq_bf16_block(int bits);
void mq_prepare_token_bf16(const mq_mat *m, const uint16_t *x, uint16_t *xp, uint16_t *nat, float *xs);
void mq_rows_bf16(const mq_mat *m, const uint16_t *xp, const float *xs, int T, float *y, int ldy, int r0, int r1);

static uint16_t f2bf(float f) { /* round to nearest even, as torch rounds */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

#define RB 16

/* rows of every job, as one loop over (job, block of RB rows) */
static void run_jobs(job *jobs, int nj, int nthreads) {
    int *start = (int *)malloc(sizeof(int) * (nj + 1));
    start[0] = 0;
    for (int j = 0; j < nj; j++) start[j + 1] = start[j] + (jobs[j].m->R + RB - 1) / RB;
    const int nblk = start[nj];
#pragma omp parallel for schedule(dynamic, 4) num_threads(nthreads) if (nthreads > 1)
    for (int b = 0; b < nblk; b++) {
        int j = 0;
        while (start[j + 1] <= b) j++;
        const job *jb = &jobs[j];
        int r0 = (b - start[j]) * RB, r1 = r0 + RB < jb->m->R ? r0 + RB : jb->m->R;
        if (jb->isa == ISA_LUT1)
            mq_rows_lut1(jb->m, jb->xp, jb->T, jb->y, jb->ldy, r0, r1);
        else if (jb->isa == ISA_BF16)
            mq_rows_bf16(jb->m, (const uint16_t *)jb->xp, jb->xs, jb->T, jb->y, jb->ldy, r0, r1);
        else
            mq_rows_for(jb->isa)(jb->m, jb->xp, jb->xs, jb->T, jb->y, jb->ldy, r0, r1);
    }
    free(start);
}

/* 1-bit decode (T <= 2 on AVX-512): the token tables; tokens rounded to bfloat16 first when bf16 */
static int prepare_lut1(job *jb, const mq_mat *m, int bf16, const float *x, int ldx, const int32_t *tok, int T) {
    const size_t n = mq_lut1_floats(m);
    jb->isa = ISA_LUT1;
    jb->xp = (float *)malloc(sizeof(float) * n * T);
    jb->xs = NULL;
    float *row = bf16 ? (float *)malloc(sizeof(float) * m->C) : NULL;
    if (!jb->xp || (bf16 && !row)) {
        free(row);
        return -2;
    }
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)(tok ? tok[t] : t) * ldx;
        if (bf16)
            for (int k = 0; k < m->C; k++) row[k] = mq_bf2f(f2bf(xt[k])); /* rounded to bfloat16 */
        mq_lut1_prepare(m, bf16 ? row : xt, jb->xp + n * t);
    }
    free(row);
    return 0;
}

/* arranged tokens for one job: x (T, C) rows gathered through tok (or contiguous when tok is NULL). isa ISA_BF16:
 * the tokens rounded to bfloat16 (exact when they came from bfloat16) and run on AVX512-BF16 where it can. */
static int prepare(job *jb, const mq_mat *m, int isa, const float *x, int ldx, const int32_t *tok, int T, float *y,
                   int ldy) {
    jb->m = m;
    const int bf16 = isa == ISA_BF16 && mq_cpu_bf16() && m->gs % mq_bf16_block(m->bits) == 0;
    jb->isa = bf16 ? ISA_BF16 : mq_resolve_isa(m, isa == ISA_BF16 ? -1 : isa);
    jb->T = T;
    jb->y = y;
    jb->ldy = ldy;
    if (mq_use_lut1(m, bf16 ? MQ_AVX512 : jb->isa, T)) return prepare_lut1(jb, m, bf16, x, ldx, tok, T);
    const int G = mq_groups(m), C = m->C;
    jb->xp = (float *)malloc(sizeof(float) * ((size_t)T * C + 1)); /* bf16 tokens use half of it */
    jb->xs = (float *)malloc(sizeof(float) * ((size_t)T * G + 1));
    if (jb->isa < 0 || !jb->xp || !jb->xs) return jb->isa < 0 ? -1 : -2;
    uint16_t *row = bf16 ? (uint16_t *)malloc(sizeof(uint16_t) * 2 * ((size_t)C + 1)) : NULL;
    if (bf16 && !row) return -2;
    for (int t = 0; t < T; t++) {
        const float *xt = x + (size_t)(tok ? tok[t] : t) * ldx;
        if (bf16) {
            for (int k = 0; k < C; k++) row[k] = f2bf(xt[k]);
            mq_prepare_token_bf16(m, row, (uint16_t *)jb->xp + (size_t)t * C, row + C + 1, jb->xs + (size_t)t * G);
        } else {
            mq_prepare_token(m, jb->isa, xt, jb->xp + (size_t)t * C, jb->xs + (size_t)t * G);
        }
    }
    free(row);
    return 0;
}

static void free_jobs(job *jobs, int nj) {
    for (int j = 0; j < nj; j++) {
        free(jobs[j].xp);
        free(jobs[j].xs);
    }
}

/* Returns the number of (token, expert) products computed, or -1 (a requested SIMD path is not supported),
 * -2 (out of memory), -3 (an expert index out of range). */
int mq_moe(const mq_expert *ex, int E, const float *x, int T, int k, const int64_t *idx, const float *w,
           const uint8_t *keep, float *out, int isa, int nthreads) {
    const int H = ex[0].down.R;
    int *count = (int *)calloc(E + 1, sizeof(int)), rc = 0;
    int32_t *tok = (int32_t *)malloc(sizeof(int32_t) * (size_t)T * k + 1);
    float *wt = (float *)malloc(sizeof(float) * (size_t)T * k + 1);
    if (!count || !tok || !wt) {
        free(count); free(tok); free(wt);
        return -2;
    }
    /* counting sort of the kept pairs by expert; within an expert by slot, then token (the reference's order) */
    for (int i = 0; i < T * k; i++) {
        if (keep && !keep[i]) continue;
        if (idx[i] < 0 || idx[i] >= E) { free(count); free(tok); free(wt); return -3; }
        count[idx[i] + 1]++;
    }
    for (int e = 0; e < E; e++) count[e + 1] += count[e];
    int *fill = (int *)malloc(sizeof(int) * (E + 1));
    memcpy(fill, count, sizeof(int) * (E + 1));
    for (int j = 0; j < k; j++)
        for (int t = 0; t < T; t++) {
            int i = t * k + j;
            if (keep && !keep[i]) continue;
            int p = fill[idx[i]]++;
            tok[p] = t;
            wt[p] = w[i];
        }
    free(fill);
    const int n_pairs = count[E];
    job *j1 = (job *)calloc(2 * E + 1, sizeof(job)), *j2 = (job *)calloc(E + 1, sizeof(job));
    float **h = (float **)calloc(E + 1, sizeof(float *)), **yd = (float **)calloc(E + 1, sizeof(float *));
    int n1 = 0, n2 = 0;
    /* phase 1: gate / up products of every active expert for its tokens, h_e (n_e, 2I) = [gate x | up x] */
    for (int e = 0; e < E && rc == 0; e++) {
        int n = count[e + 1] - count[e];
        if (!n) continue;
        const mq_expert *xe = &ex[e];
        const int I = xe->down.C;
        h[e] = (float *)malloc(sizeof(float) * (size_t)n * 2 * I);
        if (!h[e]) { rc = -2; break; }
        rc = prepare(&j1[n1++], &xe->gate_up, isa, x, H, tok + count[e], n, h[e], 2 * I);
        if (rc == 0 && xe->split) rc = prepare(&j1[n1++], &xe->up, isa, x, H, tok + count[e], n, h[e] + I, 2 * I);
    }
    if (rc == 0) run_jobs(j1, n1, nthreads);
    /* activation, then phase 2: down products, yd_e (n_e, H) */
    for (int e = 0; e < E && rc == 0; e++) {
        int n = count[e + 1] - count[e];
        if (!n) continue;
        const int I = ex[e].down.C;
        float *he = h[e];
        for (int t = 0; t < n; t++) {
            float *g = he + (size_t)t * 2 * I, *u = g + I;
            for (int i = 0; i < I; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i]; /* silu(gate) * up, in place */
        }
        yd[e] = (float *)malloc(sizeof(float) * (size_t)n * H);
        if (!yd[e]) { rc = -2; break; }
        rc = prepare(&j2[n2++], &ex[e].down, isa, he, 2 * I, NULL, n, yd[e], H);
    }
    if (rc == 0) run_jobs(j2, n2, nthreads);
    /* weighted sum, experts in ascending order (as the reference accumulates them) */
    for (int e = 0; e < E && rc == 0; e++) {
        for (int p = count[e]; p < count[e + 1]; p++) {
            const float *src = yd[e] + (size_t)(p - count[e]) * H;
            float *dst = out + (size_t)tok[p] * H, wp = wt[p];
            for (int i = 0; i < H; i++) dst[i] += wp * src[i];
        }
    }
    free_jobs(j1, n1);
    free_jobs(j2, n2);
    for (int e = 0; e < E; e++) { free(h[e]); free(yd[e]); }
    free(h); free(yd); free(j1); free(j2); free(count); free(tok); free(wt);
    return rc == 0 ? n_pairs : rc;
}
