/* The GEMM slots in portable C (contract in slots.h), written so the compiler vectorizes them for whatever
 * -m flags the including level was built with (plain C, AVX2+FMA, AVX-512F). */
#ifndef KTMOE_GENERIC_GEMM_H
#define KTMOE_GENERIC_GEMM_H

#include "../base.h"

#define KT_NN_PF_ROWS 8 /* software prefetch distance of gemm_nn's row-by-row path, in B rows */

static inline float kt_b_at(const void *b, int b_is_f32, size_t i) {
    return b_is_f32 ? ((const float *)b)[i] : kt_bf(((const bf16_t *)b)[i]);
}

static void gemm_nt(int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb,
                    int b_is_f32, float *c, size_t ldc) {
    int m = 0;
    for (; m + 4 <= M; m += 4) {
        const bf16_t *a0 = a[m], *a1 = a[m + 1], *a2 = a[m + 2], *a3 = a[m + 3];
        for (int n = 0; n < N; n++) {
            float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
            if (b_is_f32) {
                const float *bn = (const float *)b + (size_t)n * ldb;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int k = 0; k < K; k++) {
                    float w = bn[k];
                    s0 += kt_bf(a0[k]) * w; s1 += kt_bf(a1[k]) * w;
                    s2 += kt_bf(a2[k]) * w; s3 += kt_bf(a3[k]) * w;
                }
            } else {
                const bf16_t *bn = (const bf16_t *)b + (size_t)n * ldb;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int k = 0; k < K; k++) {
                    float w = kt_bf(bn[k]);
                    s0 += kt_bf(a0[k]) * w; s1 += kt_bf(a1[k]) * w;
                    s2 += kt_bf(a2[k]) * w; s3 += kt_bf(a3[k]) * w;
                }
            }
            c[(size_t)m * ldc + n] = s0; c[(size_t)(m + 1) * ldc + n] = s1;
            c[(size_t)(m + 2) * ldc + n] = s2; c[(size_t)(m + 3) * ldc + n] = s3;
        }
    }
    for (; m < M; m++) {
        const bf16_t *a0 = a[m];
        for (int n = 0; n < N; n++) {
            float s0 = 0.f;
            size_t base = (size_t)n * ldb;
            if (b_is_f32) {
                const float *bn = (const float *)b + base;
#pragma omp simd reduction(+ : s0)
                for (int k = 0; k < K; k++) s0 += kt_bf(a0[k]) * bn[k];
            } else {
                const bf16_t *bn = (const bf16_t *)b + base;
#pragma omp simd reduction(+ : s0)
                for (int k = 0; k < K; k++) s0 += kt_bf(a0[k]) * kt_bf(bn[k]);
            }
            c[(size_t)m * ldc + n] = s0;
        }
    }
}

static void gemm_nn(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb,
                    float *c, size_t ldc) {
    for (int m = 0; m < M; m++) memset(c + (size_t)m * ldc, 0, sizeof(float) * (size_t)N);
    int m = 0;
    for (; m + 4 <= M; m += 4) {
        float *c0 = c + (size_t)m * ldc, *c1 = c0 + ldc, *c2 = c1 + ldc, *c3 = c2 + ldc;
        for (int k = 0; k < K; k++) {
            const bf16_t *bk = b + (size_t)k * ldb;
            float x0 = kt_bf(a[m][k]), x1 = kt_bf(a[m + 1][k]);
            float x2 = kt_bf(a[m + 2][k]), x3 = kt_bf(a[m + 3][k]);
#pragma omp simd
            for (int n = 0; n < N; n++) {
                float w = kt_bf(bk[n]);
                c0[n] += x0 * w; c1[n] += x1 * w; c2[n] += x2 * w; c3[n] += x3 * w;
            }
        }
    }
    for (; m < M; m++) {
        float *c0 = c + (size_t)m * ldc;
        for (int k = 0; k < K; k++) {
            const bf16_t *bk = b + (size_t)k * ldb;
            float x0 = kt_bf(a[m][k]);
            if (k + KT_NN_PF_ROWS < K) /* B rows are strided: fetch one a few rows ahead */
                for (int n = 0; n < N; n += 32) __builtin_prefetch(bk + (size_t)KT_NN_PF_ROWS * ldb + n);
#pragma omp simd
            for (int n = 0; n < N; n++) c0[n] += x0 * kt_bf(bk[n]);
        }
    }
}

#endif
