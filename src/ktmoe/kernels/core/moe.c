/* The entry points: the per-call context, the routing plan, argument checks, weight binding, and the
 * calls into the active level's algorithm. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

kt_ctx *kt_ctx_create(void) { return calloc(1, sizeof(kt_ctx)); }

void kt_ctx_release(kt_ctx *ctx) {
    kt_buffer_free(&ctx->act_buf);
    ctx->saved = 0;
}

void kt_ctx_destroy(kt_ctx *ctx) {
    if (!ctx) return;
    kt_ctx_release(ctx);
    kt_buffer_free(&ctx->plan_buf);
    free(ctx);
}

size_t kt_ctx_bytes(const kt_ctx *ctx) {
    return ctx->plan_buf.size + ctx->act_buf.size;
}

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Carves consecutive 64-byte aligned pieces out of one buffer. */
typedef struct { char *base; size_t used; } carver;
static void *carve(carver *c, size_t bytes) {
    void *p = c->base ? c->base + c->used : NULL;
    c->used += round64(bytes);
    return p;
}

static int check_layer(const kt_layer *L, char *err) {
    if (L->E < 1 || L->k < 1 || L->k > L->E || L->H < 1 || L->I < 1 || L->nparts < 1 || L->nparts > KT_MAX_PARTS) {
        snprintf(err, KT_ERRLEN, "bad layer dims E=%d k=%d H=%d I=%d parts=%d", L->E, L->k, L->H, L->I, L->nparts);
        return KT_EINVAL;
    }
    if (L->part_i0[0] != 0 || L->part_i0[L->nparts] != L->I) {
        snprintf(err, KT_ERRLEN, "TP slices must cover [0, %d)", L->I);
        return KT_EINVAL;
    }
    return KT_OK;
}

int kt_layer_set_weight(kt_layer *L, int part, int which, const kt_wmat *w, char *err) {
    static const char *const names[3] = {"gate", "up", "down"};
    if (which < 0 || which > 2) {
        snprintf(err, KT_ERRLEN, "projection index %d is not 0 (gate), 1 (up) or 2 (down)", which);
        return KT_EINVAL;
    }
    if (part < 0 || part >= L->nparts) {
        snprintf(err, KT_ERRLEN, "TP part %d outside [0, %d)", part, L->nparts);
        return KT_EINVAL;
    }
    int rc = kt_wmat_check(w, L->E, err);
    if (rc) return rc;
    /* the part's view: gate/up rows [i0, i1) of [I, H]; down columns [i0, i1) of [H, I] (or the part's own
     * slice copy, starting at 0) */
    int Ip = L->part_i0[part + 1] - L->part_i0[part];
    int need_r = which < 2 ? Ip : L->H, need_c = which < 2 ? L->H : Ip;
    if (w->row0 + need_r > w->rows || w->col0 + need_c > w->cols || (which < 2 ? w->cols != L->H : w->rows != L->H)) {
        snprintf(err, KT_ERRLEN, "%s weights of part %d: a %d x %d view at (%d, %d) does not fit the %d x %d matrix "
                 "of a layer with H=%d and a %d-column slice", names[which], part, need_r, need_c, w->row0, w->col0,
                 w->rows, w->cols, L->H, Ip);
        return KT_EINVAL;
    }
    kt_wmat *dst = which == 0 ? &L->gate[part] : which == 1 ? &L->up[part] : &L->down[part];
    *dst = *w;
    return KT_OK;
}

/* Every part's three projections were set (a layer used before its weights are bound fails cleanly). */
static int check_weights(const kt_layer *L, char *err) {
    for (int p = 0; p < L->nparts; p++)
        if (!L->gate[p].data || !L->up[p].data || !L->down[p].data) {
            snprintf(err, KT_ERRLEN, "weights of TP part %d are not set", p);
            return KT_ESTATE;
        }
    return KT_OK;
}

int kt_plan(kt_ctx *ctx, const kt_layer *L, int T, const void *ids, int ids_is_i32, const void *wts,
            int wts_is_bf16, char *err) {
    int rc = check_layer(L, err);
    if (rc) return rc;
    if (T < 0) {
        snprintf(err, KT_ERRLEN, "T must be >= 0, got %d", T);
        return KT_EINVAL;
    }
    ctx->saved = 0;
    int E = L->E, k = L->k;
    size_t n = (size_t)T * (size_t)k;
    carver c = {NULL, 0};
    carve(&c, sizeof(int) * (size_t)(E + 1));
    carve(&c, sizeof(int) * n);
    carve(&c, sizeof(int) * n);
    carve(&c, sizeof(int) * n);
    carve(&c, sizeof(float) * n);
    carve(&c, sizeof(int) * (size_t)E); /* counters */
    c.base = kt_buffer_reserve(&ctx->plan_buf, c.used);
    if (!c.base) {
        snprintf(err, KT_ERRLEN, "out of memory for the routing plan (T=%d)", T);
        return KT_ENOMEM;
    }
    c.used = 0;
    ctx->expert_off = carve(&c, sizeof(int) * (size_t)(E + 1));
    ctx->pair_tok = carve(&c, sizeof(int) * n);
    ctx->pair_slot = carve(&c, sizeof(int) * n);
    ctx->slot_pair = carve(&c, sizeof(int) * n);
    ctx->pair_w = carve(&c, sizeof(float) * n);
    int *fill = carve(&c, sizeof(int) * (size_t)E);

    memset(fill, 0, sizeof(int) * (size_t)E);
    for (size_t i = 0; i < n; i++) {
        long long id = ids_is_i32 ? ((const int32_t *)ids)[i] : ((const int64_t *)ids)[i];
        if (id < -1 || id >= E) {
            snprintf(err, KT_ERRLEN, "expert_ids[%zu, %zu] = %lld is outside [-1, %d)", i / (size_t)k,
                     i % (size_t)k, id, E);
            return KT_EINVAL;
        }
        float w = wts_is_bf16 ? bf16_to_f32(((const bf16_t *)wts)[i]) : ((const float *)wts)[i];
        if (!isfinite(w)) {
            snprintf(err, KT_ERRLEN, "weights[%zu, %zu] is not finite (%g)", i / (size_t)k, i % (size_t)k, w);
            return KT_EINVAL;
        }
        if (id >= 0) fill[id]++;
    }
    ctx->expert_off[0] = 0;
    for (int e = 0; e < E; e++) {
        ctx->expert_off[e + 1] = ctx->expert_off[e] + fill[e];
        fill[e] = ctx->expert_off[e];
    }
    for (size_t i = 0; i < n; i++) {
        long long id = ids_is_i32 ? ((const int32_t *)ids)[i] : ((const int64_t *)ids)[i];
        ctx->slot_pair[i] = -1;
        if (id < 0) continue;
        int p = fill[id]++;
        ctx->slot_pair[i] = p;
        ctx->pair_tok[p] = (int)(i / (size_t)k);
        ctx->pair_slot[p] = (int)i;
        ctx->pair_w[p] = wts_is_bf16 ? bf16_to_f32(((const bf16_t *)wts)[i]) : ((const float *)wts)[i];
    }
    ctx->T = T;
    ctx->k = k;
    ctx->E = E;
    ctx->H = L->H;
    ctx->I = L->I;
    ctx->r = L->r;
    ctx->nparts = L->nparts;
    memcpy(ctx->part_i0, L->part_i0, sizeof(int) * (size_t)(L->nparts + 1));
    ctx->npairs = ctx->expert_off[E];
    return KT_OK;
}

static int check_plan(const kt_ctx *ctx, const kt_layer *L, char *err) {
    if (!ctx->expert_off) {
        snprintf(err, KT_ERRLEN, "no routing plan: call plan() first");
        return KT_ESTATE;
    }
    if (ctx->E != L->E || ctx->k != L->k || ctx->H != L->H || ctx->I != L->I || ctx->nparts != L->nparts) {
        snprintf(err, KT_ERRLEN, "the routing plan was made for another layer shape");
        return KT_ESTATE;
    }
    return KT_OK;
}

/* Lays out the activations of one forward in ctx->act_buf (saved ones only when asked). */
static int alloc_activations(kt_ctx *ctx, int save, char *err) {
    int P = ctx->nparts, r = ctx->r;
    size_t np = (size_t)ctx->npairs;
    carver c = {NULL, 0};
    for (int pass = 0; pass < 2; pass++) {
        ctx->x = carve(&c, sizeof(bf16_t) * (size_t)ctx->T * (size_t)ctx->H);
        for (int p = 0; p < P; p++) {
            size_t Ip = (size_t)(ctx->part_i0[p + 1] - ctx->part_i0[p]);
            ctx->g[p] = save ? carve(&c, sizeof(bf16_t) * np * Ip) : NULL;
            ctx->u[p] = save ? carve(&c, sizeof(bf16_t) * np * Ip) : NULL;
            ctx->ad[p] = r > 0 ? carve(&c, sizeof(float) * np * (size_t)r) : NULL;
        }
        ctx->ag = r > 0 ? carve(&c, sizeof(float) * np * (size_t)r) : NULL;
        ctx->au = r > 0 ? carve(&c, sizeof(float) * np * (size_t)r) : NULL;
        if (pass == 0) {
            c.base = kt_buffer_reserve(&ctx->act_buf, c.used);
            if (!c.base) {
                snprintf(err, KT_ERRLEN, "out of memory for activations (%zu bytes)", c.used);
                return KT_ENOMEM;
            }
            c.used = 0;
        }
    }
    return KT_OK;
}

/* W8A8: every part's three projections have an int8 view with one scale per row, and K fits int32 sums. */
static int check_act_quant(const kt_layer *L, char *err) {
    static const char *const names[3] = {"gate", "up", "down"};
    if (L->act_quant < 0 || L->act_quant >= KT_AQ_COUNT) {
        snprintf(err, KT_ERRLEN, "act_quant=%d is not 0 (none) or 1 (int8 per token)", L->act_quant);
        return KT_EINVAL;
    }
    if (L->act_quant == KT_AQ_NONE) return KT_OK;
    for (int p = 0; p < L->nparts; p++)
        for (int which = 0; which < 3; which++) {
            const kt_wmat *w = which == 0 ? &L->gate[p] : which == 1 ? &L->up[p] : &L->down[p];
            if (!kt_q8_supported(w)) {
                const char *name = kt_format_name(w->fmt);
                snprintf(err, KT_ERRLEN, "act_quant=int8 (W8A8) needs int8, int4 or int4_1 weights with one scale "
                         "per row; the %s weights of TP part %d are %s%s (group=%d, cols=%d)", names[which], p,
                         name ? name : "of an unknown format",
                         w->fmt != KT_W_BF16 && w->group != w->cols ? " with K-groups" : "", w->group, w->cols);
                return KT_EINVAL;
            }
        }
    if (L->H > KT_Q8_MAX_K || L->I > KT_Q8_MAX_K) {
        snprintf(err, KT_ERRLEN, "act_quant=int8 (W8A8): H=%d, I=%d; int32 sums are exact up to K=%d", L->H, L->I,
                 KT_Q8_MAX_K);
        return KT_EINVAL;
    }
    return KT_OK;
}

int kt_ctx_nonfinite(const kt_ctx *ctx) { return ctx->nonfinite; }

int kt_forward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x, int x_is_f32, void *out,
               int out_is_f32, int save_for_backward, char *err) {
    int rc = check_layer(L, err);
    if (!rc) rc = check_plan(ctx, L, err);
    if (!rc) rc = check_weights(L, err);
    if (!rc) rc = check_act_quant(L, err);
    if (rc) return rc;
    if (L->nparts != kt_engine_parts(eng)) {
        snprintf(err, KT_ERRLEN, "layer has %d TP parts but the engine has %d subpools", L->nparts,
                 kt_engine_parts(eng));
        return KT_EINVAL;
    }
    ctx->saved = 0;
    ctx->nonfinite = 0;
    rc = alloc_activations(ctx, save_for_backward, err);
    if (rc) return rc;
    const kt_slots *S = kt_slots_active();
    kt_engine_lock(eng);
    kt_engine_set_thread_init(eng, S->thread_init);
    rc = S->forward(S, ctx, L, eng, x, x_is_f32, out, out_is_f32, err);
    kt_engine_unlock(eng);
    ctx->saved = (rc == KT_OK) && save_for_backward;
    return rc;
}

int kt_backward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy, int dy_is_f32, void *dx,
                int dx_is_f32, float *dw, float *const grads[6], char *err) {
    int rc = check_layer(L, err);
    if (!rc) rc = check_plan(ctx, L, err);
    if (!rc) rc = check_weights(L, err);
    if (rc) return rc;
    if (!ctx->saved) {
        snprintf(err, KT_ERRLEN, "backward() needs a forward run with save_for_backward=True");
        return KT_ESTATE;
    }
    if (L->r > 0 && (!grads || !L->gate_a)) {
        snprintf(err, KT_ERRLEN, "LoRA gradients requested without LoRA weights");
        return KT_ESTATE;
    }
    const kt_slots *S = kt_slots_active();
    ctx->nonfinite = 0;
    kt_engine_lock(eng);
    kt_engine_set_thread_init(eng, S->thread_init);
    rc = S->backward(S, ctx, L, eng, dy, dy_is_f32, dx, dx_is_f32, dw, grads, err);
    kt_engine_unlock(eng);
    return rc;
}


int kt_q8_quantize_rows(int M, int K, const void *a, int8_t *q, float *sa, char *err) {
    if (M < 0 || K < 1 || (M > 0 && (!a || !q || !sa))) {
        snprintf(err, KT_ERRLEN, "bad quantizer call: M=%d K=%d", M, K);
        return KT_EINVAL;
    }
    const kt_slots *S = kt_slots_active();
    for (int m = 0; m < M; m++) {
        const bf16_t *row = (const bf16_t *)a + (size_t)m * K;
        int8_t *dst = q + (size_t)m * K;
        sa[m] = S->q8_quant(1, &row, &K, &dst);
    }
    return KT_OK;
}
