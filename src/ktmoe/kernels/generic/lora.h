/* The LoRA product slots: out[j, n] += sum_p coef[p, j] * x_p[n] for j < R, n < N (the pair reductions of
 * the LoRA grads and the rank-r output terms). Register-blocked with GCC vector types, lowered to each
 * level's ISA: 4 output rows x 32 columns stay in registers across all pairs. x rows are fp32
 * (base + p * ldx) or bf16 (row pointers). */
#ifndef KTMOE_GENERIC_LORA_H
#define KTMOE_GENERIC_LORA_H

#include "../base.h"

typedef float kt_v16f __attribute__((vector_size(64)));
typedef uint16_t kt_v16h __attribute__((vector_size(32)));
typedef uint32_t kt_v16u __attribute__((vector_size(64)));

static inline kt_v16f v16_from_f32(const float *p) {
    kt_v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline kt_v16f v16_from_bf16(const bf16_t *p) {
    kt_v16h h;
    memcpy(&h, p, sizeof h);
    kt_v16u u = __builtin_convertvector(h, kt_v16u) << 16;
    kt_v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 32 values of row x_p from column n0 as two vectors; a short tail is padded with zeros. */
static inline void x32_f32(const float *row, int nb, kt_v16f *x0, kt_v16f *x1) {
    if (nb == 32) {
        *x0 = v16_from_f32(row);
        *x1 = v16_from_f32(row + 16);
        return;
    }
    float t[32] = {0};
    memcpy(t, row, sizeof(float) * (size_t)nb);
    *x0 = v16_from_f32(t);
    *x1 = v16_from_f32(t + 16);
}
static inline void x32_bf16(const bf16_t *row, int nb, kt_v16f *x0, kt_v16f *x1) {
    if (nb == 32) {
        *x0 = v16_from_bf16(row);
        *x1 = v16_from_bf16(row + 16);
        return;
    }
    bf16_t t[32] = {0};
    memcpy(t, row, sizeof(bf16_t) * (size_t)nb);
    *x0 = v16_from_bf16(t);
    *x1 = v16_from_bf16(t + 16);
}

#define KT_COMMA ,
#define KT_OUTER_ACCUM(NAME, XARG, XROW, XLOAD)                                                              \
    static void NAME(int M, int R, int N, const float *coef, size_t ldcoef, XARG, float *out, size_t ldo) { \
        for (int n0 = 0; n0 < N; n0 += 32) {                                                                 \
            int nb = N - n0 < 32 ? N - n0 : 32;                                                              \
            for (int j0 = 0; j0 < R; j0 += 4) {                                                              \
                int jb = R - j0 < 4 ? R - j0 : 4;                                                            \
                kt_v16f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0}; \
                for (int p = 0; p < M; p++) {                                                                \
                    const float *cp = coef + (size_t)p * ldcoef + j0;                                        \
                    float c0 = cp[0], c1 = jb > 1 ? cp[1] : 0.f, c2 = jb > 2 ? cp[2] : 0.f;                  \
                    float c3 = jb > 3 ? cp[3] : 0.f;                                                         \
                    kt_v16f x0, x1;                                                                          \
                    XLOAD(XROW(p) + n0, nb, &x0, &x1);                                                       \
                    a00 += c0 * x0; a01 += c0 * x1; a10 += c1 * x0; a11 += c1 * x1;                          \
                    a20 += c2 * x0; a21 += c2 * x1; a30 += c3 * x0; a31 += c3 * x1;                          \
                }                                                                                            \
                kt_v16f acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};                                   \
                for (int j = 0; j < jb; j++) {                                                               \
                    float t[32];                                                                             \
                    memcpy(t, &acc[2 * j], sizeof t);                                                        \
                    float *o = out + (size_t)(j0 + j) * ldo + n0;                                            \
                    for (int n = 0; n < nb; n++) o[n] += t[n];                                               \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

#define KT_ROW_F32(p) (x + (size_t)(p) * ldx)
#define KT_ROW_BF16(p) (x[p])
KT_OUTER_ACCUM(kt_outer_f32, const float *x KT_COMMA size_t ldx, KT_ROW_F32, x32_f32)
KT_OUTER_ACCUM(kt_outer_bf16, const bf16_t *const *x, KT_ROW_BF16, x32_bf16)

#endif
