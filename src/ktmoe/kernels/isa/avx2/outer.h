/* The LoRA product slots at the avx2 level (contract in slots.h): out[j, n] += sum_p coef[p, j] x_p[n].
 *
 * Why its own: the generic register block is written with 64-byte vectors (4 rows x 32 columns), which at
 * AVX2 is 16 accumulators + the x vectors in 16 registers: it spills, and measured on Zen 3 it ran at
 * ~4 GFLOP/s, 400 ms of the Qwen3 T=1024 backward in the LoRA sums alone plus the rank-r terms of every GEMM
 * stage. Here 6 output rows x 16 columns = 12 accumulators: per p 2 loads of x_p (bf16 widened by a shift),
 * 6 broadcasts of coef, 12 FMAs. Each output element sums its p terms in order with one fused multiply-add
 * per term, then adds once to out, as the generic loop does. */
#ifndef KTMOE_AVX2_OUTER_H
#define KTMOE_AVX2_OUTER_H

#include "gemm.h"

#define KT2_OJ 6 /* output rows per block */

/* 8 values of a row: fp32, or bf16 widened. */
KT2_AI __m256 kt2_load8(const int f32, const void *p) {
    return f32 ? _mm256_loadu_ps((const float *)p) : kt2_widen8((const bf16_t *)p);
}
#define KT2_AT(f32, p, i) (const void *)((f32) ? (const char *)(p) + 4 * (i) : (const char *)(p) + 2 * (i))

/* 16 values of x_p from column n as two vectors (fp32 row or bf16 row); fewer than 16 are zero-padded. */
KT2_AI void kt2_x16(int is_bf16, const void *row, int nb, __m256 *x0, __m256 *x1) {
    if (nb == 16) {
        if (is_bf16) {
            *x0 = kt2_widen8((const bf16_t *)row);
            *x1 = kt2_widen8((const bf16_t *)row + 8);
        } else {
            *x0 = _mm256_loadu_ps((const float *)row);
            *x1 = _mm256_loadu_ps((const float *)row + 8);
        }
        return;
    }
    float t[16] = {0};
    for (int n = 0; n < nb; n++) t[n] = is_bf16 ? kt_bf(((const bf16_t *)row)[n]) : ((const float *)row)[n];
    *x0 = _mm256_loadu_ps(t);
    *x1 = _mm256_loadu_ps(t + 8);
}

/* JR output rows x 16 columns from n0. nb < 16 (the last strip) reads x through a zero-padded copy: a
 * separate instance, because the stack copy in the loop made GCC keep every accumulator in memory too (12
 * stores per 12 FMAs: 31 GFLOP/s of a 94 peak per thread, Zen 3). */
KT2_AI void kt2_outer_block(const int JR, const int is_bf16, const int full, int M, const float *coef,
                            size_t ldcoef, const float *xf, size_t ldx, const bf16_t *const *xb, int n0, int nb,
                            float *out, size_t ldo) {
    __m256 acc[KT2_OJ][2];
    for (int j = 0; j < JR; j++) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
    for (int p = 0; p < M; p++) {
        const void *row = is_bf16 ? (const void *)(xb[p] + n0) : (const void *)(xf + (size_t)p * ldx + n0);
        __m256 x0, x1;
        if (full) {
            x0 = kt2_load8(!is_bf16, row);
            x1 = kt2_load8(!is_bf16, KT2_AT(!is_bf16, row, 8));
        } else {
            kt2_x16(is_bf16, row, nb, &x0, &x1);
        }
        const float *cp = coef + (size_t)p * ldcoef;
        for (int j = 0; j < JR; j++) {
            __m256 cv = _mm256_broadcast_ss(cp + j);
            acc[j][0] = _mm256_fmadd_ps(cv, x0, acc[j][0]);
            acc[j][1] = _mm256_fmadd_ps(cv, x1, acc[j][1]);
        }
    }
    for (int j = 0; j < JR; j++) {
        float *o = out + (size_t)j * ldo + n0;
        if (full) {
            _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[j][0]));
            _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[j][1]));
        } else {
            float t[16];
            _mm256_storeu_ps(t, acc[j][0]);
            _mm256_storeu_ps(t + 8, acc[j][1]);
            for (int n = 0; n < nb; n++) o[n] += t[n];
        }
    }
}

#define KT2_OUTER_CASE(JR_, BF_, FULL_)                                                                        \
    kt2_outer_block(JR_, BF_, FULL_, M, cj, ldcoef, xf, ldx, xb, n0, nb, oj, ldo)
#define KT2_OUTER_JR(BF_, FULL_)                                                                               \
    switch (jr) {                                                                                              \
    case 1: KT2_OUTER_CASE(1, BF_, FULL_); break;                                                              \
    case 2: KT2_OUTER_CASE(2, BF_, FULL_); break;                                                              \
    case 3: KT2_OUTER_CASE(3, BF_, FULL_); break;                                                              \
    case 4: KT2_OUTER_CASE(4, BF_, FULL_); break;                                                              \
    case 5: KT2_OUTER_CASE(5, BF_, FULL_); break;                                                              \
    default: KT2_OUTER_CASE(6, BF_, FULL_); break;                                                             \
    }

KT2_AI void kt2_outer(const int is_bf16, int M, int R, int N, const float *coef, size_t ldcoef, const float *xf,
                      size_t ldx, const bf16_t *const *xb, float *out, size_t ldo) {
    for (int n0 = 0; n0 < N; n0 += 16) { /* columns outer: the 16 columns of every x_p stay in L1 */
        const int nb = imin(16, N - n0);
        for (int j0 = 0; j0 < R; j0 += KT2_OJ) {
            const int jr = imin(KT2_OJ, R - j0);
            const float *cj = coef + j0;
            float *oj = out + (size_t)j0 * ldo;
            if (nb == 16) {
                KT2_OUTER_JR(is_bf16, 1);
            } else {
                KT2_OUTER_JR(is_bf16, 0);
            }
        }
    }
}

static void kt2_outer_f32(int M, int R, int N, const float *coef, size_t ldcoef, const float *x, size_t ldx,
                          float *out, size_t ldo) {
    kt2_outer(0, M, R, N, coef, ldcoef, x, ldx, NULL, out, ldo);
}

static void kt2_outer_bf16(int M, int R, int N, const float *coef, size_t ldcoef, const bf16_t *const *x, float *out,
                           size_t ldo) {
    kt2_outer(1, M, R, N, coef, ldcoef, NULL, 0, x, out, ldo);
}

#endif
