/* AVX2 + FMA GEMM kernels for bf16 panels (the gemm_nt / gemm_nn slots, contract in slots.h).
 *
 * gemm_nt (C = A B^T, a dot product per element): register block of 3 activation rows x 4 weight rows =
 * 12 accumulators of 8 fp32 lanes. 16 bf16 of k are read as 8 dwords and split into even and odd
 * elements (shift / mask: exact fp32), each multiplied with the same split of the other operand: the dot
 * product needs no element order. Even and odd halves are processed one after the other so that 12
 * accumulators + 3 A vectors + 1 B vector fit the 16 registers. Column blocks of 4 weight rows outer (they
 * stay in L1), row blocks inner. fp32 B (the LoRA A matrices) takes the same blocks with A widened in order
 * (the generic loop widened 4 A rows per B vector: ~17% of the FMA peak on Zen 3).
 * gemm_nn (C = A B, an axpy per k): 6 rows x 16 columns = 12 accumulators; per k one B row of 16 bf16
 * widened in order, 6 broadcasts of A values pre-converted to fp32 per chunk of KC k (on the stack), 12 FMAs;
 * 2..6 rows of C (the backward's few-row experts) in one pass over B instead: per 4 rows of B and 8 columns
 * the widened values serve every row of C (kt2_nn_pass).
 * Never reads past a row's end (tails run through scalar code). */
#ifndef KTMOE_AVX2_GEMM_H
#define KTMOE_AVX2_GEMM_H

#include <immintrin.h>

#include "../../base.h"

#define KT2_AI static inline __attribute__((always_inline))
#define KT2_NN_MR 6
#define KT2_NN_KC 256
#define KT2_NT_PFB 2 /* gemm_nt prefetches the weight rows this many 4-row blocks ahead */

/* CASE(MR, NR) for a register block of 1..3 rows x 1..4 (the counts must be constants to stay in registers) */
#define KT2_SWITCH_3X4(mr, nr, CASE)                                                                           \
    switch (((mr) - 1) * 4 + (nr) - 1) {                                                                       \
    case 0: CASE(1, 1); break;                                                                                 \
    case 1: CASE(1, 2); break;                                                                                 \
    case 2: CASE(1, 3); break;                                                                                 \
    case 3: CASE(1, 4); break;                                                                                 \
    case 4: CASE(2, 1); break;                                                                                 \
    case 5: CASE(2, 2); break;                                                                                 \
    case 6: CASE(2, 3); break;                                                                                 \
    case 7: CASE(2, 4); break;                                                                                 \
    case 8: CASE(3, 1); break;                                                                                 \
    case 9: CASE(3, 2); break;                                                                                 \
    case 10: CASE(3, 3); break;                                                                                \
    default: CASE(3, 4); break;                                                                                \
    }

KT2_AI __m256 kt2_even(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
KT2_AI __m256 kt2_odd(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

/* 8 bf16 in order -> fp32 (exact) */
KT2_AI __m256 kt2_widen8(const bf16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

KT2_AI float kt2_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Value i of a bf16 (widened) or fp32 row. */
KT2_AI float kt2_load1(const int f32, const void *p, size_t i) {
    return f32 ? ((const float *)p)[i] : kt_bf(((const bf16_t *)p)[i]);
}

/* The end of an NT register block: C = the accumulators' sums + the k tail [k, K) in scalar code. */
KT2_AI void kt2_nt_finish(const int MR, const int NR, __m256 (*acc)[4], int k, int K, const bf16_t *const *ap,
                          const int f32, const void *bp, size_t ldb, float *c, size_t ldc) {
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) {
            float s = kt2_hsum(acc[i][j]);
            for (int t = k; t < K; t++) s += kt_bf(ap[i][t]) * kt2_load1(f32, bp, (size_t)j * ldb + t);
            c[(size_t)i * ldc + j] = s;
        }
}

KT2_AI void kt2_nt_block(const int MR, const int NR, int K, const bf16_t *const *ap, const bf16_t *bp, size_t ldb,
                         float *c, size_t ldc, int pf) {
    __m256 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 a[3];
        if (pf && (k & 31) == 0) /* the rows KT2_NT_PFB blocks on: short rows end before the prefetchers catch up */
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(bp + (size_t)(j + KT2_NT_PFB * NR) * ldb + k), _MM_HINT_T0);
        for (int i = 0; i < MR; i++) a[i] = kt2_even(_mm256_loadu_si256((const __m256i *)(ap[i] + k)));
        for (int j = 0; j < NR; j++) {
            __m256 b = kt2_even(_mm256_loadu_si256((const __m256i *)(bp + (size_t)j * ldb + k)));
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
        }
        for (int i = 0; i < MR; i++) a[i] = kt2_odd(_mm256_loadu_si256((const __m256i *)(ap[i] + k)));
        for (int j = 0; j < NR; j++) {
            __m256 b = kt2_odd(_mm256_loadu_si256((const __m256i *)(bp + (size_t)j * ldb + k)));
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
        }
    }
    kt2_nt_finish(MR, NR, acc, k, K, ap, 0, bp, ldb, c, ldc);
}

/* fp32 B (the LoRA A matrices): A widened in order, 8 values of k per step; 12 accumulators + 3 A + 1 B. */
KT2_AI void kt2_ntf_block(const int MR, const int NR, int K, const bf16_t *const *ap, const float *bp, size_t ldb,
                          float *c, size_t ldc) {
    __m256 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a[3];
        for (int i = 0; i < MR; i++) a[i] = kt2_widen8(ap[i] + k);
        for (int j = 0; j < NR; j++) {
            __m256 b = _mm256_loadu_ps(bp + (size_t)j * ldb + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
        }
    }
    kt2_nt_finish(MR, NR, acc, k, K, ap, 1, bp, ldb, c, ldc);
}

#define KT2_NT_CASE(MR_, NR_)                                                                                  \
    if (f32)                                                                                                   \
        kt2_ntf_block(MR_, NR_, K, ap, (const float *)b + (size_t)n * ldb, ldb, cm, ldc);                      \
    else                                                                                                       \
        kt2_nt_block(MR_, NR_, K, ap, (const bf16_t *)b + (size_t)n * ldb, ldb, cm, ldc, pf)

/* C = A B^T, B bf16 or (f32) fp32 rows. */
static void kt_avx2_gemm_nt(int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int f32,
                            float *c, size_t ldc) {
    const bf16_t *ap[3];
    const int nblk = (M + 2) / 3;
    for (int n = 0; n < N; n += 4) {
        const int nr = N - n < 4 ? N - n : 4;
        for (int m = 0, blk = 0; m < M; blk++) {
            const int mr = (M - m + (nblk - blk) - 1) / (nblk - blk); /* balanced: 4 -> 2 + 2 */
            for (int i = 0; i < mr; i++) ap[i] = a[m + i];
            float *cm = c + (size_t)m * ldc + n;
            const int pf = blk == 0 && n + 4 * (KT2_NT_PFB + 1) <= N;
            KT2_SWITCH_3X4(mr, nr, KT2_NT_CASE);
            m += mr;
        }
    }
}

/* MR rows x 16 columns over kc values of k: C (16 contiguous floats per row) += af B. */
KT2_AI void kt2_nn_block(const int MR, int kc, const float (*af)[KT2_NN_KC], const bf16_t *bk, size_t ldb, float *c,
                         size_t ldc) {
    __m256 acc[KT2_NN_MR][2];
    for (int i = 0; i < MR; i++) {
        acc[i][0] = _mm256_loadu_ps(c + (size_t)i * ldc);
        acc[i][1] = _mm256_loadu_ps(c + (size_t)i * ldc + 8);
    }
    for (int k = 0; k < kc; k++) {
        const bf16_t *br = bk + (size_t)k * ldb;
        __m256 b0 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)br)), 16));
        __m256 b1 = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(br + 8))), 16));
        for (int i = 0; i < MR; i++) {
            __m256 av = _mm256_broadcast_ss(&af[i][k]);
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(c + (size_t)i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + (size_t)i * ldc + 8, acc[i][1]);
    }
}

/* C[i][0..8) += sum_j x[i][j] b[j] for MR rows of C: KR values of B (one per row of B) used by every row of C
 * (accumulators in memory: one load and store per KR FMAs). */
KT2_AI void kt2_fma_rows(const int MR, const int KR, const __m256 (*x)[4], const __m256 *b, float *c, size_t ldc) {
    for (int i = 0; i < MR; i++) {
        float *ci = c + (size_t)i * ldc;
        __m256 acc = _mm256_loadu_ps(ci);
        for (int j = 0; j < KR; j++) acc = _mm256_fmadd_ps(x[i][j], b[j], acc);
        _mm256_storeu_ps(ci, acc);
    }
}

/* KR rows of B (from row k) applied to MR rows of C: each 8 columns of the KR rows are widened once and used
 * for every row of C. */
KT2_AI void kt2_nn_pass_rows(const int MR, const int KR, int N, int k, const bf16_t *const *a, const bf16_t *bk,
                             size_t ldb, float *c, size_t ldc) {
    __m256 x[KT2_NN_MR][4];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < KR; j++) x[i][j] = _mm256_set1_ps(kt_bf(a[i][k + j]));
    int n = 0;
    for (; n + 8 <= N; n += 8) {
        __m256 w[4];
        for (int j = 0; j < KR; j++) w[j] = kt2_widen8(bk + (size_t)j * ldb + n);
        kt2_fma_rows(MR, KR, (const __m256(*)[4])x, w, c + n, ldc);
    }
    for (; n < N; n++) /* column tail */
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < KR; j++) c[(size_t)i * ldc + n] += kt_bf(a[i][k + j]) * kt_bf(bk[(size_t)j * ldb + n]);
}

#define KT2_NN_PF 8 /* rows of B prefetched ahead when they are strided (a column block of a wider matrix) */

/* MR rows of C in one pass over B. Few-row experts read whole weight rows in the backward (blk.nn_rows_max_m):
 * B is then a contiguous matrix too large for L2, so a pass per row of C would read it from memory again. */
KT2_AI void kt2_nn_pass(const int MR, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                        size_t ldc) {
    for (int i = 0; i < MR; i++) memset(c + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        const bf16_t *bk = b + (size_t)k * ldb;
        if (ldb > (size_t)N && k + 4 + KT2_NN_PF <= K)
            for (int j = 0; j < 4; j++)
                for (int n = 0; n < N; n += 32) _mm_prefetch((const char *)(bk + (size_t)(KT2_NN_PF + j) * ldb + n), _MM_HINT_T0);
        kt2_nn_pass_rows(MR, 4, N, k, a, bk, ldb, c, ldc);
    }
    for (; k < K; k++) kt2_nn_pass_rows(MR, 1, N, k, a, b + (size_t)k * ldb, ldb, c, ldc);
}

static void kt_avx2_gemm_nn_few(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                                size_t ldc) {
    switch (M) {
    case 2: kt2_nn_pass(2, N, K, a, b, ldb, c, ldc); break;
    case 3: kt2_nn_pass(3, N, K, a, b, ldb, c, ldc); break;
    case 4: kt2_nn_pass(4, N, K, a, b, ldb, c, ldc); break;
    case 5: kt2_nn_pass(5, N, K, a, b, ldb, c, ldc); break;
    default: kt2_nn_pass(6, N, K, a, b, ldb, c, ldc); break;
    }
}

static void kt_avx2_gemm_nn(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                            size_t ldc) {
    if (M <= 0 || N <= 0) return;
    for (int m = 0; m < M; m++) memset(c + (size_t)m * ldc, 0, sizeof(float) * (size_t)N);
    float af[KT2_NN_MR][KT2_NN_KC] __attribute__((aligned(32)));
    for (int m0 = 0; m0 < M; m0 += KT2_NN_MR) {
        const int mr = M - m0 < KT2_NN_MR ? M - m0 : KT2_NN_MR;
        for (int k0 = 0; k0 < K; k0 += KT2_NN_KC) {
            const int kc = K - k0 < KT2_NN_KC ? K - k0 : KT2_NN_KC;
            for (int i = 0; i < mr; i++)
                for (int k = 0; k < kc; k++) af[i][k] = kt_bf(a[m0 + i][k0 + k]);
            const bf16_t *bk = b + (size_t)k0 * ldb;
            float *cm = c + (size_t)m0 * ldc;
            int n0 = 0;
            for (; n0 + 16 <= N; n0 += 16) {
                switch (mr) {
                case 1: kt2_nn_block(1, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                case 2: kt2_nn_block(2, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                case 3: kt2_nn_block(3, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                case 4: kt2_nn_block(4, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                case 5: kt2_nn_block(5, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                default: kt2_nn_block(6, kc, (const float(*)[KT2_NN_KC])af, bk + n0, ldb, cm + n0, ldc); break;
                }
            }
            for (int i = 0; i < mr; i++) /* column tail */
                for (int k = 0; k < kc; k++) {
                    const bf16_t *br = bk + (size_t)k * ldb;
                    float *ci = cm + (size_t)i * ldc;
                    for (int n = n0; n < N; n++) ci[n] += af[i][k] * kt_bf(br[n]);
                }
        }
    }
}

#endif
