/* The reference of every slot: plain loops, double accumulation, compiled once without vector flags.
 * The conformance checks (core/conformance.c) hold every level's slots to these. */
#ifndef KTMOE_REF_H
#define KTMOE_REF_H

#include "../slots.h"

/* C = A B^T (B [N, K] bf16, or fp32 when b_is_f32) / C = A B (B [K, N]), as doubles [M, N]; mag gets
 * sum_k |a b| (the scale of the rounding error a correct fp32 kernel may make). */
void kt_ref_gemm(int trans, int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int b_is_f32,
                 double *c, double *mag);
/* The decode slot: the portable decode (formats/decode.h) of a block, bit-exact reference. */
void kt_ref_decode_block(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst);
/* out[j, n] + sum_p coef[p, j] x_p[n] as doubles [R, N] (x fp32 rows at x + p * ldx, or bf16 row pointers). */
void kt_ref_outer(int M, int R, int N, const float *coef, size_t ldcoef, const float *x, size_t ldx,
                  const bf16_t *const *xb, const float *out, size_t ldo, double *res, double *mag);
/* The activation in double: h = silu(g) u with g, u the bf16 roundings of the inputs. */
void kt_ref_act_fwd(int n, const float *g, const float *u, double *h);
/* dg, du, h and <dhu, h> in double from bf16 g, u. */
double kt_ref_act_bwd(int n, const bf16_t *g, const bf16_t *u, const float *dhu, float w, double *h, double *dg,
                      double *du);

#endif
