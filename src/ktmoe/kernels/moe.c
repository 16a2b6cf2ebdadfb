/* Layer-independent entry points: the per-call context, the routing plan, argument checks, and the calls
 * into the active ISA's stages. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"

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

int kt_forward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x, int x_is_f32, void *out,
               int out_is_f32, int save_for_backward, char *err) {
    int rc = check_layer(L, err);
    if (!rc) rc = check_plan(ctx, L, err);
    if (rc) return rc;
    if (L->nparts != kt_engine_parts(eng)) {
        snprintf(err, KT_ERRLEN, "layer has %d TP parts but the engine has %d subpools", L->nparts,
                 kt_engine_parts(eng));
        return KT_EINVAL;
    }
    ctx->saved = 0;
    rc = alloc_activations(ctx, save_for_backward, err);
    if (rc) return rc;
    kt_engine_lock(eng);
    rc = kt_ops_active->forward(ctx, L, eng, x, x_is_f32, out, out_is_f32, err);
    kt_engine_unlock(eng);
    ctx->saved = (rc == KT_OK) && save_for_backward;
    return rc;
}

int kt_backward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy, int dy_is_f32, void *dx,
                int dx_is_f32, float *dw, float *const grads[6], char *err) {
    int rc = check_layer(L, err);
    if (!rc) rc = check_plan(ctx, L, err);
    if (rc) return rc;
    if (!ctx->saved) {
        snprintf(err, KT_ERRLEN, "backward() needs a forward run with save_for_backward=True");
        return KT_ESTATE;
    }
    if (L->r > 0 && (!grads || !L->gate_a)) {
        snprintf(err, KT_ERRLEN, "LoRA gradients requested without LoRA weights");
        return KT_ESTATE;
    }
    kt_engine_lock(eng);
    rc = kt_ops_active->backward(ctx, L, eng, dy, dy_is_f32, dx, dx_is_f32, dw, grads, err);
    kt_engine_unlock(eng);
    return rc;
}

/* ---- stage profile ---- */

#define KT_PROFILE_SLOTS 32
static struct { const char *name; double seconds, cpu; long calls; } profile[KT_PROFILE_SLOTS];
static int profile_on, profile_n;

double kt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void kt_profile_enable(int on) { profile_on = on; }
int kt_profile_on(void) { return profile_on; }
void kt_profile_reset(void) { profile_n = 0; }

/* Called by the calling thread only (between dispatches), so no locking. */
void kt_profile_add(const char *stage, double seconds, double cpu_seconds) {
    if (!profile_on) return;
    int i = 0;
    while (i < profile_n && strcmp(profile[i].name, stage) != 0) i++;
    if (i == profile_n) {
        if (profile_n == KT_PROFILE_SLOTS) return;
        profile[profile_n].name = stage;
        profile[profile_n].seconds = 0;
        profile[profile_n].cpu = 0;
        profile[profile_n].calls = 0;
        profile_n++;
    }
    profile[i].seconds += seconds;
    profile[i].cpu += cpu_seconds;
    profile[i].calls++;
}

int kt_profile_read(int i, const char **name, double *seconds, double *cpu_seconds, long *calls) {
    if (i < 0 || i >= profile_n) return profile_n;
    *name = profile[i].name;
    *seconds = profile[i].seconds;
    *cpu_seconds = profile[i].cpu;
    *calls = profile[i].calls;
    return profile_n;
}

/* ---- machine measurements for the benchmark ---- */

#define seconds_now kt_now

typedef struct { long iters; double flops[1024]; } peak_arg;

static void peak_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)task;
    peak_arg *a = arg;
    a->flops[tid & 1023] += kt_ops_active->peak_loop(a->iters);
}

double kt_measure_peak_gflops(kt_engine *eng, double seconds) {
    kt_isa_active();
    int nt = kt_engine_threads(eng);
    peak_arg *a = calloc(1, sizeof *a);
    if (!a) return 0;
    a->iters = 1 << 16;
    double best = 0;
    double deadline = seconds_now() + seconds;
    while (seconds_now() < deadline) {
        memset(a->flops, 0, sizeof a->flops);
        double t0 = seconds_now();
        kt_run_all(eng, nt, peak_task, a);
        double dt = seconds_now() - t0;
        if (dt < 0.02) {
            a->iters *= 2;
            continue;
        }
        double total = 0;
        for (int i = 0; i < nt && i < 1024; i++) total += a->flops[i];
        if (total / dt > best) best = total / dt;
    }
    free(a);
    return best * 1e-9;
}

typedef struct { const float *buf; size_t n_per_task; double sink[1024]; } bw_arg;

static void bw_task(void *arg, int part, int task, int tid) {
    (void)part;
    bw_arg *a = arg;
    const float *p = a->buf + (size_t)task * a->n_per_task;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 16 <= a->n_per_task; i += 16) {
        s0 += p[i];
        s1 += p[i + 4];
        s2 += p[i + 8];
        s3 += p[i + 12];
    }
    a->sink[tid & 1023] += s0 + s1 + s2 + s3;
}

/* Touches one float per 16 (one per 64-byte line): the cost is the line fetches, i.e. read bandwidth. */
double kt_measure_read_gbps(kt_engine *eng, size_t bytes) {
    int ntasks = 64 * kt_engine_threads(eng);
    size_t n = bytes / sizeof(float);
    n -= n % ((size_t)ntasks * 16);
    float *buf = NULL;
    if (n == 0 || posix_memalign((void **)&buf, 64, n * sizeof(float))) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = 1.0f;
    bw_arg *a = calloc(1, sizeof *a);
    if (!a) {
        free(buf);
        return 0;
    }
    a->buf = buf;
    a->n_per_task = n / (size_t)ntasks;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = seconds_now();
        kt_run_all(eng, ntasks, bw_task, a);
        double dt = seconds_now() - t0;
        double gbps = (double)(n * sizeof(float)) / dt * 1e-9;
        if (gbps > best) best = gbps;
    }
    free(a);
    free(buf);
    return best;
}
