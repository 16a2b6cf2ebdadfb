/* The fp32 LoRA product slot at the avx512bf16 level (contract in slots.h): out[j, n] += sum_p coef[p, j] x_p[n].
 *
 * Why its own: the rank-r terms of the GEMM stages (s (A x) B^T added to a block, dA_d, dB_g, dB_u) are
 * products with r = 16 on one side, and at K = I = 768 the generic 4 x 32 register block (2 loads and 4
 * broadcasts per 8 FMAs) took 15-20% of the down and dx stages. Here 6 output rows x 64 columns = 24
 * accumulators: per p 4 loads of x_p and 6 broadcasts of coef for 24 FMAs. Each output element still sums its
 * p terms in order with one fused multiply-add per term, then adds once to out, as the generic loop does. */
#ifndef KTMOE_AVX512BF16_OUTER_H
#define KTMOE_AVX512BF16_OUTER_H

#include <immintrin.h>

#include "gemm.h"

#define KT_OUTER_AI static inline __attribute__((always_inline))

KT_OUTER_AI void kt_outer_block(const int JR, int M, const float *coef, size_t ldcoef, const float *x, size_t ldx,
                                float *out, size_t ldo, int nb) {
    __m512 acc[6][4];
    for (int i = 0; i < JR; i++)
        for (int q = 0; q < 4; q++) acc[i][q] = _mm512_setzero_ps();
    const __mmask16 m0 = kt_mask16(nb), m1 = kt_mask16(nb > 16 ? nb - 16 : 0);
    const __mmask16 m2 = kt_mask16(nb > 32 ? nb - 32 : 0), m3 = kt_mask16(nb > 48 ? nb - 48 : 0);
    for (int p = 0; p < M; p++) {
        const float *xp = x + (size_t)p * ldx, *cp = coef + (size_t)p * ldcoef;
        __m512 x0, x1, x2, x3;
        if (nb == 64) {
            x0 = _mm512_loadu_ps(xp);
            x1 = _mm512_loadu_ps(xp + 16);
            x2 = _mm512_loadu_ps(xp + 32);
            x3 = _mm512_loadu_ps(xp + 48);
        } else {
            x0 = _mm512_maskz_loadu_ps(m0, xp);
            x1 = _mm512_maskz_loadu_ps(m1, xp + 16);
            x2 = _mm512_maskz_loadu_ps(m2, xp + 32);
            x3 = _mm512_maskz_loadu_ps(m3, xp + 48);
        }
        for (int i = 0; i < JR; i++) {
            const __m512 c = _mm512_set1_ps(cp[i]);
            acc[i][0] = _mm512_fmadd_ps(c, x0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(c, x1, acc[i][1]);
            acc[i][2] = _mm512_fmadd_ps(c, x2, acc[i][2]);
            acc[i][3] = _mm512_fmadd_ps(c, x3, acc[i][3]);
        }
    }
    for (int i = 0; i < JR; i++) {
        float *o = out + (size_t)i * ldo;
        if (nb == 64) {
            for (int q = 0; q < 4; q++) _mm512_storeu_ps(o + 16 * q, _mm512_add_ps(_mm512_loadu_ps(o + 16 * q), acc[i][q]));
        } else {
            const __mmask16 mk[4] = {m0, m1, m2, m3};
            for (int q = 0; q < 4; q++)
                _mm512_mask_storeu_ps(o + 16 * q, mk[q], _mm512_add_ps(_mm512_maskz_loadu_ps(mk[q], o + 16 * q), acc[i][q]));
        }
    }
}

static void kt_outer_f32_avx512bf16(int M, int R, int N, const float *coef, size_t ldcoef, const float *x,
                                    size_t ldx, float *out, size_t ldo) {
    for (int n0 = 0; n0 < N; n0 += 64) {
        const int nb = N - n0 < 64 ? N - n0 : 64;
        for (int j0 = 0; j0 < R; j0 += 6) {
            const float *cj = coef + j0, *xn = x + n0;
            float *oj = out + (size_t)j0 * ldo + n0;
            switch (R - j0 < 6 ? R - j0 : 6) {
            case 1: kt_outer_block(1, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            case 2: kt_outer_block(2, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            case 3: kt_outer_block(3, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            case 4: kt_outer_block(4, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            case 5: kt_outer_block(5, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            default: kt_outer_block(6, M, cj, ldcoef, xn, ldx, oj, ldo, nb); break;
            }
        }
    }
}

#undef KT_OUTER_AI

#endif
