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
/* The W8A8 activation quantizer by its definition (kt_layer.act_quant), with the C library's rintf for the
 * round half to even: codes q[n] and the returned scale, bit for bit what every level must give. */
float kt_ref_q8_quant(int n, const bf16_t *a, int8_t *q);
/* The W8A8 product of M int8 rows aq (scales sa) with the NT block rows [r0, r0 + nr) x cols [c0, c0 + nc) of
 * expert e of a per-row int8 / int4 / int4_1 matrix, codes read from the stored bytes here: dot products in
 * int64, c[m, n] = sa (sw dot + zw sum aq) in double [M, nr]; mag = sa (|sw| sum |aq q| + |zw| sum |aq|). */
void kt_ref_q8_gemm(int M, const int8_t *const *aq, const float *sa, const kt_wmat *w, int e, int r0, int nr, int c0,
                    int nc, double *c, double *mag);

#endif
