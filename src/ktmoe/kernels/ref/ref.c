/* The slot references (see ref.h). */
#include <math.h>
#include <stdlib.h>

#include "../formats/decode.h"
#include "ref.h"

void kt_ref_gemm(int trans, int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int b_is_f32,
                 double *c, double *mag) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, t = 0;
            for (int k = 0; k < K; k++) {
                size_t at = trans == KT_NT ? (size_t)n * ldb + k : (size_t)k * ldb + n;
                double bv = b_is_f32 ? (double)((const float *)b)[at] : (double)bf16_to_f32(((const bf16_t *)b)[at]);
                double p = (double)bf16_to_f32(a[m][k]) * bv;
                s += p;
                t += fabs(p);
            }
            c[(size_t)m * N + n] = s;
            mag[(size_t)m * N + n] = t;
        }
}

static const kt_decode_fn ref_decode[KT_W_COUNT] = KT_GENERIC_DECODE;

void kt_ref_decode_block(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst) {
    for (int r = 0; r < nr; r++)
        for (int c = 0; c < nc;) {
            int col = w->col0 + c0 + c, n = (col / w->group + 1) * w->group - col;
            if (n > nc - c) n = nc - c;
            ref_decode[w->fmt](w, e, w->row0 + r0 + r, col, n, dst + (size_t)r * nc + c);
            c += n;
        }
}

void kt_ref_outer(int M, int R, int N, const float *coef, size_t ldcoef, const float *x, size_t ldx,
                  const bf16_t *const *xb, const float *out, size_t ldo, double *res, double *mag) {
    for (int j = 0; j < R; j++)
        for (int n = 0; n < N; n++) {
            double s = out[(size_t)j * ldo + n], t = fabs(s);
            for (int p = 0; p < M; p++) {
                double xv = x ? (double)x[(size_t)p * ldx + n] : (double)bf16_to_f32(xb[p][n]);
                double q = (double)coef[(size_t)p * ldcoef + j] * xv;
                s += q;
                t += fabs(q);
            }
            res[(size_t)j * N + n] = s;
            mag[(size_t)j * N + n] = t;
        }
}

static double sigmoid(double g) { return 1.0 / (1.0 + exp(-g)); }

void kt_ref_act_fwd(int n, const float *g, const float *u, double *h) {
    for (int j = 0; j < n; j++) {
        double gv = bf16_to_f32(kt_round_bf16(g[j])), uv = bf16_to_f32(kt_round_bf16(u[j]));
        h[j] = gv * sigmoid(gv) * uv;
    }
}

double kt_ref_act_bwd(int n, const bf16_t *g, const bf16_t *u, const float *dhu, float w, double *h, double *dg,
                      double *du) {
    double dw = 0;
    for (int j = 0; j < n; j++) {
        double gv = bf16_to_f32(g[j]), uv = bf16_to_f32(u[j]), s = sigmoid(gv);
        h[j] = gv * s * uv;
        dw += (double)dhu[j] * h[j];
        double dh = (double)w * dhu[j];
        dg[j] = dh * uv * s * (1.0 + gv * (1.0 - s));
        du[j] = dh * gv * s;
    }
    return dw;
}

float kt_ref_q8_quant(int n, const bf16_t *a, int8_t *q) {
    float amax = 0.f;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(bf16_to_f32(a[j])));
    float sa = amax > 0.f ? amax / 127.0f : 1.0f;
    for (int j = 0; j < n; j++) {
        float v = bf16_to_f32(a[j]) / sa;
        q[j] = (int8_t)fmaxf(-127.0f, fminf(127.0f, rintf(v)));
    }
    return sa;
}

/* the int8 code of (row, col) of expert e: int8 as stored, int4 n - 8, int4_1 n */
static int ref_q8_code(const kt_wmat *w, int e, int row, int col) {
    size_t i = ((size_t)e * w->rows + (size_t)row) * w->cols + (size_t)col;
    if (w->fmt == KT_W_INT8) return ((const int8_t *)w->data)[i];
    int nib = (((const uint8_t *)w->data)[i / 2] >> (i % 2 ? 4 : 0)) & 15;
    return w->fmt == KT_W_INT4 ? nib - 8 : nib;
}

void kt_ref_q8_gemm(int M, const int8_t *const *aq, const float *sa, const kt_wmat *w, int e, int r0, int nr, int c0,
                    int nc, double *c, double *mag) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < nr; n++) {
            int row = w->row0 + r0 + n;
            size_t si = (size_t)e * w->rows + (size_t)row; /* one scale per row (block_rows 1, group == cols) */
            double sw = w->scale[si], zw = w->fmt == KT_W_INT4_1 ? w->zero[si] : 0.0;
            long long dot = 0, adot = 0, asum = 0, aabs = 0;
            for (int k = 0; k < nc; k++) {
                long long a = aq[m][k], q = ref_q8_code(w, e, row, w->col0 + c0 + k);
                dot += a * q;
                adot += llabs(a * q);
                asum += a;
                aabs += llabs(a);
            }
            c[(size_t)m * nr + n] = (double)sa[m] * (sw * (double)dot + zw * (double)asum);
            mag[(size_t)m * nr + n] = fabs((double)sa[m]) * (fabs(sw) * (double)adot + fabs(zw) * (double)aabs);
        }
}
