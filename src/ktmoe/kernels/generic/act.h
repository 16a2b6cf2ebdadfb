/* The activation slots: h = silu(g) * u forward, and its backward, with the bf16 roundings of the saved
 * values done here so that backward recomputes exactly the forward's h. */
#ifndef KTMOE_GENERIC_ACT_H
#define KTMOE_GENERIC_ACT_H

#include "../base.h"

static void kt_act_fwd(int n, const float *g, const float *u, bf16_t *gb, bf16_t *ub, bf16_t *h) {
#pragma omp simd
    for (int j = 0; j < n; j++) {
        gb[j] = kt_round_bf16(g[j]);
        ub[j] = kt_round_bf16(u[j]);
        float gv = kt_bf(gb[j]);
        h[j] = kt_round_bf16(gv * kt_sigmoid(gv) * kt_bf(ub[j]));
    }
}

/* dh = w dhu; dg = dh u s (1 + g (1 - s)), du = dh g s with s = sigmoid(g). */
static float kt_act_bwd(int n, const bf16_t *gp, const bf16_t *up, const float *dhu, float w, float *h, float *dg,
                        float *du, bf16_t *dgb, bf16_t *dub) {
    float dwacc = 0.f;
#pragma omp simd reduction(+ : dwacc)
    for (int j = 0; j < n; j++) {
        float g = kt_bf(gp[j]), u = kt_bf(up[j]);
        float sg = kt_sigmoid(g);
        float hv = kt_bf(kt_round_bf16(g * sg * u)); /* exactly the forward's h */
        dwacc += dhu[j] * hv;
        float dh = w * dhu[j];
        float dgv = dh * u * sg * (1.0f + g * (1.0f - sg));
        float duv = dh * g * sg;
        h[j] = hv;
        dg[j] = dgv;
        du[j] = duv;
        dgb[j] = kt_round_bf16(dgv);
        dub[j] = kt_round_bf16(duv);
    }
    return dwacc;
}

#endif
