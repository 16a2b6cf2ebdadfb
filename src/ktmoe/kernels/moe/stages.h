/* The MoE algorithm: forward and backward of the expert stages for all experts of a layer per call.
 *
 * It calls slots only (slots.h): no ISA #if, no weight-format branch, blocking from S->blk. It is included
 * by the levels that provide an algorithm instance (portable, avx2, avx512: its element-wise loops are
 * vectorized at that width); levels above inherit one. Everything here is static.
 *
 * Notation: pairs (token t, expert e) sorted by expert; part p of the TP split owns intermediate columns
 * [i0, i0 + Ip). s = lora_alpha / r. Per pair with routing weight w:
 *   g = Wg x + s Bg (Ag x),  u = Wu x + s Bu (Au x),  h = silu(g) u,  d = Wd h + s Bd (Ad h),  y += w d
 * Backward with dy: dhu = Wd^T dy + s Ad^T (Bd^T dy) (unweighted), dw = <dhu, h>, dh = w dhu, ...
 *
 * W8A8 (L->act_quant): the forward's base products Wg x, Wu x, Wd h take int8 activations (slots q8_quant and
 * bop_q8_*): x is quantized per token right after the input conversion, h per pair over its full
 * intermediate row (every part's slice, one scale) between the gate/up stages and down. LoRA terms use
 * the unquantized x and h; backward is unchanged (the unquantized function's, at the saved g, u). */
#ifndef KTMOE_MOE_STAGES_H
#define KTMOE_MOE_STAGES_H

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../core/internal.h"

static inline size_t st_round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* dst[c, r] = src[r, c] for an R x C block (small LoRA matrices). */
static void transpose_f32(const float *src, size_t lds, int R, int C, float *dst, size_t ldd) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
}

/* ---- the call's shared state ---- */

typedef struct {
    const kt_slots *S;
    kt_ctx *ctx;
    const kt_layer *L;
    kt_engine *eng;
    int mc, nb, nbb, nbh;     /* the level's blocking */
    int *active;              /* experts with at least one pair, largest first */
    int nactive;
    int ahead;                /* tasks a thread's next task lies ahead of its current one (threads per part) */
    int nnarrow;              /* the first nnarrow active experts take column blocks in the backward NN stages;
                               * the rest (few rows, bf16: blk.nn_rows_max_m) one task over whole rows each */
    int nblk_i[KT_MAX_PARTS]; /* column blocks (nb) of each part's intermediate slice */
    int nblk_b[KT_MAX_PARTS]; /* the same in nbb blocks (backward down stage) */
    int nblk_h;               /* column blocks (nbh) of H */
    float s;
    bf16_t *h[KT_MAX_PARTS];  /* [npairs, Ip] */
    float *pairbuf;           /* [nparts, npairs, H] per-pair output rows, summed per token by combine */
    bf16_t *dyb;              /* [T, H] */
    bf16_t *dg[KT_MAX_PARTS], *du[KT_MAX_PARTS]; /* [npairs, Ip] */
    float *bd;                /* [npairs, r] Bd^T dy */
    float *bg[KT_MAX_PARTS], *bu[KT_MAX_PARTS];  /* [npairs, r] this part's dg Bg, du Bu */
    float *dwp[KT_MAX_PARTS]; /* [nblk_b, npairs] partial <dhu, h> */
    size_t *xoff, *hoff;      /* xpack: byte offset of each expert's packed x in xp, of its packed h in hp[p]
                               * (hoff[p * E + e]); SIZE_MAX: not packed. xoff NULL: no expert packed */
    char *xp, *hp[KT_MAX_PARTS];
    int8_t *xq;               /* W8A8: [T, H] codes of x, scales xs [T] */
    float *xs;
    int8_t *hq[KT_MAX_PARTS]; /* W8A8: [npairs, Ip] codes of each part's slice of h, one scale per pair hs */
    float *hs;
    float *const *grads;
    atomic_int nonfinite;     /* KT_NF_* bits of the results written so far */
    atomic_int failed;        /* first problem found by a task: 1 = non-finite input, 2 = out of memory */
    atomic_int bad_row;
} stage_args;

static void fail(stage_args *a, int code, int row) {
    int zero = 0;
    if (atomic_compare_exchange_strong(&a->failed, &zero, code)) atomic_store(&a->bad_row, row);
}

/* Results are scanned as they are written (still in cache), so that the caller needs no pass of its own. */
static int has_nonfinite(const float *p, size_t n) {
    uint32_t bad = 0;
#pragma omp simd reduction(| : bad)
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + i, sizeof u);
        bad |= (u & 0x7f800000u) == 0x7f800000u;
    }
    return bad != 0;
}
static void mark_nonfinite(stage_args *a, int bits, const float *p, size_t n) {
    if (has_nonfinite(p, n)) atomic_fetch_or(&a->nonfinite, bits);
}

static inline int expert_rows(const kt_ctx *ctx, int e) { return ctx->expert_off[e + 1] - ctx->expert_off[e]; }

/* Runs a stage on every part's threads (or on all threads), timing it for the profile. */
static void run_timed(stage_args *a, const char *name, const int *ntasks, int all, kt_task_fn fn, void *arg) {
    int on = kt_profile_on();
    kt_engine_profile(a->eng, on);
    if (on) kt_engine_task_cpu(a->eng);
    double t0 = kt_now();
    if (all)
        kt_run_all(a->eng, ntasks[0], fn, arg);
    else
        kt_run_parts(a->eng, ntasks, fn, arg);
    if (on) kt_profile_add(name, kt_now() - t0, kt_engine_task_cpu(a->eng));
}
static void run_parts_timed(stage_args *a, const char *name, const int *ntasks, kt_task_fn fn, void *arg) {
    run_timed(a, name, ntasks, 0, fn, arg);
}
static void run_all_timed(stage_args *a, const char *name, int ntasks, kt_task_fn fn, void *arg) {
    run_timed(a, name, &ntasks, 1, fn, arg);
}

/* Row pointers of a chunk of pairs: into a [*, ld] bf16 matrix, either by token or by pair index. */
static void rows_by_token(const bf16_t **rows, const kt_ctx *ctx, const bf16_t *base, size_t ld, int p0, int n) {
    for (int i = 0; i < n; i++) rows[i] = base + (size_t)ctx->pair_tok[p0 + i] * ld;
}
static void rows_by_pair(const bf16_t **rows, const bf16_t *base, size_t ld, int p0, int n) {
    for (int i = 0; i < n; i++) rows[i] = base + (size_t)(p0 + i) * ld;
}

/* ---- input conversion: [T, H] bf16/fp32 -> bf16, rejecting non-finite values ---- */

typedef struct { stage_args *a; const void *src; int src_is_f32; bf16_t *dst; } convert_args;

static void convert_rows_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    convert_args *c = arg;
    const kt_ctx *ctx = c->a->ctx;
    size_t H = (size_t)ctx->H;
    int t0 = task * 16, t1 = t0 + 16 < ctx->T ? t0 + 16 : ctx->T;
    for (int t = t0; t < t1; t++) {
        bf16_t *d = c->dst + (size_t)t * H;
        int bad = 0;
        if (c->src_is_f32) {
            const float *s = (const float *)c->src + (size_t)t * H;
            for (size_t i = 0; i < H; i++) {
                kt_bits32 b;
                b.f = s[i];
                bad |= (b.u & 0x7f800000u) == 0x7f800000u;
                d[i] = kt_round_bf16(s[i]);
            }
        } else {
            const bf16_t *s = (const bf16_t *)c->src + (size_t)t * H;
            for (size_t i = 0; i < H; i++) {
                bad |= (s[i] & 0x7f80u) == 0x7f80u;
                d[i] = s[i];
            }
        }
        if (bad) fail(c->a, 1, t);
    }
}

static void convert_rows(stage_args *a, const void *src, int src_is_f32, bf16_t *dst) {
    convert_args c = {a, src, src_is_f32, dst};
    run_all_timed(a, "convert", (a->ctx->T + 15) / 16, convert_rows_task, &c);
}

/* ---- forward ---- */

/* LoRA down-projections of the input, shared by all parts: ag = x Ag^T, au = x Au^T. */
static void fwd_lora_in_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    stage_args *a = arg;
    const kt_slots *S = a->S;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = a->active[task], r = L->r;
    size_t H = (size_t)L->H;
    const bf16_t *rows[KT_MAX_MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += a->mc) {
        int m = (int)zmin((size_t)a->mc, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, ctx->x, H, p0, m);
        S->gemm_nt(m, r, (int)H, rows, L->gate_a + (size_t)e * r * H, H, 1, ctx->ag + (size_t)p0 * r, (size_t)r);
        S->gemm_nt(m, r, (int)H, rows, L->up_a + (size_t)e * r * H, H, 1, ctx->au + (size_t)p0 * r, (size_t)r);
    }
}

/* c[m, n] += s * <lora_in[m, :], b[n, :]> for m < M, n < N; b is [N, r] fp32. A small GEMM run as an
 * outer product over the rank: c += (s lora_in)^T-rows x b^T-rows. Returns 0 when out of memory. */
static int add_lora_out(stage_args *a, int tid, float *c, size_t ldc, int M, int N, const float *lora_in,
                        const float *b, int r, float s) {
    float *bT = kt_scratch_slot(a->eng, tid, 1, sizeof(float) * (size_t)r * (N + M));
    if (!bT) return 0;
    float *lT = bT + (size_t)r * N;
    transpose_f32(b, (size_t)r, N, r, bT, (size_t)N);
    for (int m = 0; m < M; m++)
        for (int j = 0; j < r; j++) lT[(size_t)j * M + m] = s * lora_in[(size_t)m * r + j];
    a->S->outer_f32(r, M, N, lT, (size_t)M, bT, (size_t)N, c, ldc);
    return 1;
}

/* ---- W8A8: activation quantization and the forward's base-weight operand ---- */

/* x rows -> xq, xs. Task = 16 tokens. */
static void fwd_quant_x_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    int H = ctx->H, t0 = task * 16, t1 = t0 + 16 < ctx->T ? t0 + 16 : ctx->T;
    for (int t = t0; t < t1; t++) {
        const bf16_t *row = ctx->x + (size_t)t * H;
        int8_t *dst = a->xq + (size_t)t * H;
        a->xs[t] = a->S->q8_quant(1, &row, &H, &dst);
    }
}

/* h rows (all parts' slices of a pair) -> hq, hs. Task = 16 pairs. */
static void fwd_quant_h_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    int P = ctx->nparts, p0 = task * 16, p1 = p0 + 16 < ctx->npairs ? p0 + 16 : ctx->npairs;
    const bf16_t *seg[KT_MAX_PARTS];
    int8_t *dst[KT_MAX_PARTS];
    int len[KT_MAX_PARTS];
    for (int q = 0; q < P; q++) len[q] = ctx->part_i0[q + 1] - ctx->part_i0[q];
    for (int p = p0; p < p1; p++) {
        for (int q = 0; q < P; q++) {
            seg[q] = a->h[q] + (size_t)p * len[q];
            dst[q] = a->hq[q] + (size_t)p * len[q];
        }
        a->hs[p] = a->S->q8_quant(P, seg, len, dst);
    }
}

/* The int8 codes [rows, cols] and scales [rows] of a W8A8 stage in one engine buffer: per-part matrices
 * like part_matrices when parts (cols = I), else one [T, H] matrix. */
static int q8_buffers(stage_args *a, int slot, int rows, int cols, int parts, int8_t **codes, float **scales,
                      char *err) {
    const kt_ctx *ctx = a->ctx;
    size_t cbytes = st_round64((size_t)rows * cols), total = cbytes + sizeof(float) * (size_t)rows + 64;
    char *base = kt_shared_buffer(a->eng, slot, total);
    if (!base) {
        snprintf(err, KT_ERRLEN, "out of memory (%zu bytes)", total);
        return KT_ENOMEM;
    }
    if (parts)
        for (int p = 0; p < ctx->nparts; p++) codes[p] = (int8_t *)base + (size_t)rows * ctx->part_i0[p];
    else
        codes[0] = (int8_t *)base;
    *scales = (float *)(base + cbytes);
    return KT_OK;
}

/* The forward's base-weight operand of an NT block: bf16 activations x decoded weights (bop_*), or int8
 * x int8 (bop_q8_*) under W8A8. The rows of a chunk come as bf16 pointers, or as int8 pointers + scales. */
static size_t fwd_w_bytes(const stage_args *a, const kt_wmat *w, int nr, int nc, int m) {
    const kt_slots *S = a->S;
    return a->L->act_quant ? S->bop_q8_bytes(S, w, nr, nc, m) : S->bop_bytes(S, w, KT_NT, nr, nc, m);
}
static void fwd_w_prep(const stage_args *a, const kt_wmat *w, int e, int r0, int nr, int nc, int m, void *scratch,
                       kt_bop *b) {
    const kt_slots *S = a->S;
    if (a->L->act_quant)
        S->bop_q8_prep(S, w, e, r0, nr, 0, nc, m, scratch, b);
    else
        S->bop_prep(S, w, e, r0, nr, 0, nc, KT_NT, m, scratch, b);
}
/* The forward's down blocks: task = (active expert, block of `blk` of the `rows` output rows), all `cols`
 * columns. The block of the task this thread likely runs next (task + threads per part), for kt_bop.next.
 * (Not for gate/up: rows of H values, contiguous blocks the hardware prefetchers follow; measured neutral.
 * Down's rows are I values long: Zen 3, T=1024, fwd_down 234 -> 212 ms.) */
static kt_wblock fwd_next(const stage_args *a, int task, int nblk, int blk, int rows, int cols, const kt_wmat *w) {
    kt_wblock nx = {0};
    int t = task + a->ahead;
    if (t < a->nactive * nblk) {
        int n0 = (t % nblk) * blk;
        nx = (kt_wblock){w, a->active[t / nblk], n0, imin(blk, rows - n0), 0, cols};
    }
    return nx;
}

typedef struct {
    const bf16_t *rows[KT_MAX_MC];
    const int8_t *qrows[KT_MAX_MC];
    float qs[KT_MAX_MC];
} fwd_rows;
static void fwd_w_gemm(const stage_args *a, int m, const fwd_rows *r, const kt_bop *b, float *c, size_t ldc) {
    const kt_slots *S = a->S;
    if (a->L->act_quant)
        S->bop_q8_gemm(S, m, r->qrows, r->qs, b, c, ldc);
    else
        S->bop_gemm(S, m, r->rows, b, c, ldc);
}

/* ---- packed activations (levels with xpack): x and h packed once per expert for the NT products ---- */

static int packed(const stage_args *a, int e) { return a->xoff && a->xoff[e] != SIZE_MAX; }

static int xpack_setup(stage_args *a, char *err) {
    const kt_slots *S = a->S;
    const kt_ctx *ctx = a->ctx;
    a->xoff = NULL;
    if (!S->xpack || a->L->act_quant) return KT_OK;
    const int E = ctx->E, P = ctx->nparts;
    size_t *off = kt_shared_buffer(a->eng, KT_SH_XOFF, sizeof(size_t) * (size_t)(1 + P) * E);
    if (!off) goto oom;
    size_t tx = 0, th[KT_MAX_PARTS] = {0};
    for (int e = 0; e < E; e++) {
        int me = expert_rows(ctx, e), take = me >= S->blk.xpack_min_m;
        off[e] = take ? tx : SIZE_MAX;
        if (take) tx += S->xpack_bytes(me, ctx->H);
        for (int p = 0; p < P; p++) {
            off[(size_t)(1 + p) * E + e] = take ? th[p] : SIZE_MAX;
            if (take) th[p] += S->xpack_bytes(me, ctx->part_i0[p + 1] - ctx->part_i0[p]);
        }
    }
    if (!tx) return KT_OK;
    size_t hall = 0;
    for (int p = 0; p < P; p++) hall += th[p];
    a->xp = kt_shared_buffer(a->eng, KT_SH_XP, tx);
    char *hp = kt_shared_buffer(a->eng, KT_SH_HP, hall);
    if (!a->xp || !hp) goto oom;
    for (int p = 0; p < P; p++) {
        a->hp[p] = hp;
        hp += th[p];
    }
    a->xoff = off;
    a->hoff = off + E;
    return KT_OK;
oom:
    snprintf(err, KT_ERRLEN, "out of memory (packed activations)");
    return KT_ENOMEM;
}

/* Packs the rows of one expert: x by token (part < 0) or the part's h by pair. Task = active expert. */
static void pack_rows(stage_args *a, int part, int task, int tid) {
    const kt_ctx *ctx = a->ctx;
    int e = a->active[task], me = expert_rows(ctx, e);
    if (!packed(a, e)) return;
    const bf16_t **rows = kt_scratch(a->eng, tid, sizeof(bf16_t *) * (size_t)me);
    if (!rows) {
        fail(a, 2, 0);
        return;
    }
    int K;
    char *dst;
    if (part < 0) {
        K = ctx->H;
        rows_by_token(rows, ctx, ctx->x, (size_t)K, ctx->expert_off[e], me);
        dst = a->xp + a->xoff[e];
    } else {
        K = ctx->part_i0[part + 1] - ctx->part_i0[part];
        rows_by_pair(rows, a->h[part], (size_t)K, ctx->expert_off[e], me);
        dst = a->hp[part] + a->hoff[(size_t)part * ctx->E + e];
    }
    a->S->xpack(me, K, rows, dst);
}
static void fwd_xpack_task(void *arg, int part, int task, int tid) {
    (void)part;
    pack_rows(arg, -1, task, tid);
}
static void fwd_hpack_task(void *arg, int part, int task, int tid) { pack_rows(arg, part, task, tid); }

/* gate+up GEMMs with LoRA, then h = silu(g) * u. Task = (active expert, column block of the part). */
static void fwd_gate_up_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_slots *S = a->S;
    kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int nblk = a->nblk_i[part], NB = a->nb;
    int e = a->active[task / nblk], me = expert_rows(ctx, e);
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    int n0 = (task % nblk) * NB, nb = Ip - n0 < NB ? Ip - n0 : NB;
    int H = L->H, r = L->r;
    size_t cbytes = st_round64(sizeof(float) * (size_t)a->mc * NB);
    size_t wg = st_round64(fwd_w_bytes(a, &L->gate[part], nb, H, me));
    size_t wu = st_round64(fwd_w_bytes(a, &L->up[part], nb, H, me));
    char *base = kt_scratch(a->eng, tid, 2 * cbytes + wg + wu);
    if (!base) {
        fail(a, 2, 0);
        return;
    }
    float *cg = (float *)base, *cu = (float *)(base + cbytes);
    kt_bop bg, bu;
    fwd_w_prep(a, &L->gate[part], e, n0, nb, H, me, base + 2 * cbytes, &bg);
    fwd_w_prep(a, &L->up[part], e, n0, nb, H, me, base + 2 * cbytes + wg, &bu);
    fwd_rows rw;
    bf16_t gtmp[KT_MAX_NB], utmp[KT_MAX_NB];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += a->mc) {
        int m = (int)zmin((size_t)a->mc, (size_t)(ctx->expert_off[e + 1] - p0));
        if (packed(a, e)) { /* (never under W8A8) */
            const char *px = a->xp + a->xoff[e];
            S->bop_gemm_px(S, m, px, p0 - ctx->expert_off[e], &bg, cg, (size_t)NB);
            S->bop_gemm_px(S, m, px, p0 - ctx->expert_off[e], &bu, cu, (size_t)NB);
        } else {
            if (L->act_quant) {
                for (int i = 0; i < m; i++) {
                    int t = ctx->pair_tok[p0 + i];
                    rw.qrows[i] = a->xq + (size_t)t * H;
                    rw.qs[i] = a->xs[t];
                }
            } else {
                rows_by_token(rw.rows, ctx, ctx->x, (size_t)H, p0, m);
            }
            fwd_w_gemm(a, m, &rw, &bg, cg, (size_t)NB);
            fwd_w_gemm(a, m, &rw, &bu, cu, (size_t)NB);
        }
        if (r > 0) {
            size_t brow = ((size_t)e * L->I + (size_t)(i0 + n0)) * r;
            if (!add_lora_out(a, tid, cg, (size_t)NB, m, nb, ctx->ag + (size_t)p0 * r, L->gate_b + brow, r, a->s) ||
                !add_lora_out(a, tid, cu, (size_t)NB, m, nb, ctx->au + (size_t)p0 * r, L->up_b + brow, r, a->s)) {
                fail(a, 2, 0);
                return;
            }
        }
        for (int i = 0; i < m; i++) {
            size_t at = (size_t)(p0 + i) * Ip + n0;
            int keep = ctx->g[part] != NULL; /* saved for backward: round straight into the saved rows */
            S->act_fwd(nb, cg + (size_t)i * NB, cu + (size_t)i * NB, keep ? ctx->g[part] + at : gtmp,
                       keep ? ctx->u[part] + at : utmp, a->h[part] + at);
        }
    }
}

/* ad = h Ad^T over this part's columns (a partial sum across parts). Task = active expert. */
static void fwd_lora_mid_task(void *arg, int part, int task, int tid) {
    (void)tid;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = a->active[task], r = L->r;
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    const bf16_t *rows[KT_MAX_MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += a->mc) {
        int m = (int)zmin((size_t)a->mc, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_pair(rows, a->h[part], (size_t)Ip, p0, m);
        a->S->gemm_nt(m, r, Ip, rows, L->down_a + (size_t)e * r * L->I + i0, (size_t)L->I, 1,
                      ctx->ad[part] + (size_t)p0 * r, (size_t)r);
    }
}

/* The work of one task of the stages that write per-pair rows of H: an active expert, a column block of H,
 * and the part's intermediate slice and per-pair buffer. */
typedef struct { int e, n0, nb, Ip; float *pairs; } hblock;

static hblock hblock_of(const stage_args *a, int part, int task) {
    const kt_ctx *ctx = a->ctx;
    hblock b;
    b.e = a->active[task / a->nblk_h];
    b.n0 = (task % a->nblk_h) * a->nbh;
    b.nb = ctx->H - b.n0 < a->nbh ? ctx->H - b.n0 : a->nbh;
    b.Ip = ctx->part_i0[part + 1] - ctx->part_i0[part];
    b.pairs = a->pairbuf + (size_t)part * ctx->npairs * ctx->H;
    return b;
}

/* The backward NN stages' tasks: each of the first nnarrow active experts in nblk column blocks of width w,
 * then one task per remaining expert over all `cols` columns (block index 0). */
typedef struct { int e, blk, n0, nb; } nnblock;

static int nn_tasks(const stage_args *a, int nblk) { return a->nnarrow * nblk + a->nactive - a->nnarrow; }

static nnblock nnblock_of(const stage_args *a, int task, int nblk, int w, int cols) {
    nnblock b;
    int narrow = a->nnarrow * nblk;
    if (task < narrow) {
        b.e = a->active[task / nblk];
        b.blk = task % nblk;
        b.n0 = b.blk * w;
        b.nb = cols - b.n0 < w ? cols - b.n0 : w;
    } else {
        b.e = a->active[a->nnarrow + task - narrow];
        b.blk = 0;
        b.n0 = 0;
        b.nb = cols;
    }
    return b;
}

/* Rows [0, nr) of matrix m under the column block of the task this thread likely runs next (the part's
 * threads take its tasks in order: task + threads per part), for kt_bop.next; none past the column-block
 * tasks (whole-row tasks stream their weights anyway). Zen 3, T=1024, 2 threads: backward INT8 1130 -> 872
 * ms, INT4 1135 -> 958, BF16 bwd_down_act 267 -> 243. */
static kt_wblock nn_next(const stage_args *a, int task, int nblk, int w, int cols, const kt_wmat *m, int nr) {
    kt_wblock nx = {0};
    int t = task + a->ahead;
    if (t < a->nnarrow * nblk) {
        nnblock b = nnblock_of(a, t, nblk, w, cols);
        nx = (kt_wblock){m, b.e, 0, nr, b.n0, b.nb};
    }
    return nx;
}

/* Down GEMM with LoRA, scaled by the routing weight, into the part's per-pair buffer [npairs, H].
 * Task = (active expert, column block of H); the combine stage then sums each token's pairs. */
static void fwd_down_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int H = L->H, r = L->r;
    hblock b = hblock_of(a, part, task);
    int e = b.e, n0 = b.n0, nb = b.nb, Ip = b.Ip, me = expert_rows(ctx, e);
    size_t wb = fwd_w_bytes(a, &L->down[part], nb, Ip, me);
    char *ws = wb ? kt_scratch(a->eng, tid, wb) : NULL;
    if (wb && !ws) {
        fail(a, 2, 0);
        return;
    }
    kt_bop bd;
    fwd_w_prep(a, &L->down[part], e, n0, nb, Ip, me, ws, &bd);
    bd.next = fwd_next(a, task, a->nblk_h, a->nbh, H, Ip, &L->down[part]);
    fwd_rows rw;
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += a->mc) {
        int m = (int)zmin((size_t)a->mc, (size_t)(ctx->expert_off[e + 1] - p0));
        float *c = b.pairs + (size_t)p0 * H + n0;
        if (packed(a, e)) { /* (never under W8A8) */
            a->S->bop_gemm_px(a->S, m, a->hp[part] + a->hoff[(size_t)part * ctx->E + e], p0 - ctx->expert_off[e],
                              &bd, c, (size_t)H);
        } else {
            if (L->act_quant) {
                for (int i = 0; i < m; i++) {
                    rw.qrows[i] = a->hq[part] + (size_t)(p0 + i) * Ip;
                    rw.qs[i] = a->hs[p0 + i];
                }
            } else {
                rows_by_pair(rw.rows, a->h[part], (size_t)Ip, p0, m);
            }
            fwd_w_gemm(a, m, &rw, &bd, c, (size_t)H);
        }
        if (r > 0 && !add_lora_out(a, tid, c, (size_t)H, m, nb, ctx->ad[part] + (size_t)p0 * r,
                                   L->down_b + ((size_t)e * H + (size_t)n0) * r, r, a->s)) {
            fail(a, 2, 0);
            return;
        }
        for (int i = 0; i < m; i++) {
            float w = ctx->pair_w[p0 + i];
            float *ci = c + (size_t)i * H;
#pragma omp simd
            for (int n = 0; n < nb; n++) ci[n] *= w;
        }
    }
}

/* out[t] = sum over t's slots and the TP parts of the per-pair rows. Task = 16 tokens. A fixed order:
 * slots, then parts, so results do not depend on scheduling. */
typedef struct { stage_args *a; void *out; int out_is_f32; } combine_args;

static void combine_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    combine_args *cb = arg;
    const stage_args *a = cb->a;
    const kt_ctx *ctx = a->ctx;
    size_t H = (size_t)ctx->H, per_part = (size_t)ctx->npairs * H;
    int t0 = task * 16, t1 = t0 + 16 < ctx->T ? t0 + 16 : ctx->T;
    float acc[256];
    for (int t = t0; t < t1; t++) {
        for (size_t n0 = 0; n0 < H; n0 += 256) {
            size_t nb = zmin(256, H - n0);
            memset(acc, 0, sizeof(float) * nb);
            for (int j = 0; j < ctx->k; j++) {
                int p = ctx->slot_pair[(size_t)t * ctx->k + j];
                if (p < 0) continue;
                for (int q = 0; q < ctx->nparts; q++) {
                    const float *src = a->pairbuf + q * per_part + (size_t)p * H + n0;
#pragma omp simd
                    for (size_t n = 0; n < nb; n++) acc[n] += src[n];
                }
            }
            mark_nonfinite(cb->a, KT_NF_OUT, acc, nb);
            if (cb->out_is_f32) {
                memcpy((float *)cb->out + (size_t)t * H + n0, acc, sizeof(float) * nb);
            } else {
                bf16_t *d = (bf16_t *)cb->out + (size_t)t * H + n0;
#pragma omp simd
                for (size_t n = 0; n < nb; n++) d[n] = kt_round_bf16(acc[n]);
            }
        }
    }
}

static void combine_pairs(stage_args *a, void *out, int out_is_f32) {
    combine_args cb = {a, out, out_is_f32};
    run_all_timed(a, "combine", (a->ctx->T + 15) / 16, combine_task, &cb);
}

/* The per-pair buffer of every part: [nparts, npairs, H] fp32. */
static int pair_buffer(stage_args *a, char *err) {
    const kt_ctx *ctx = a->ctx;
    size_t bytes = sizeof(float) * (size_t)ctx->nparts * ctx->npairs * ctx->H + 64;
    a->pairbuf = kt_shared_buffer(a->eng, KT_SH_PAIRS, bytes);
    if (!a->pairbuf) {
        snprintf(err, KT_ERRLEN, "out of memory (%zu bytes)", bytes);
        return KT_ENOMEM;
    }
    return KT_OK;
}

/* ---- shared set-up ---- */

static int setup(stage_args *a, const kt_slots *S, kt_ctx *ctx, const kt_layer *L, kt_engine *eng, char *err) {
    memset(a, 0, sizeof *a);
    a->S = S;
    a->ctx = ctx;
    a->L = L;
    a->eng = eng;
    a->mc = S->blk.mc;
    a->nb = S->blk.nb;
    a->nbb = S->blk.nbb;
    a->nbh = S->blk.nbh;
    a->s = L->r > 0 ? L->lora_scale : 0.f;
    a->active = kt_shared_buffer(eng, KT_SH_TASKS, sizeof(int) * (size_t)ctx->E);
    if (!a->active) {
        snprintf(err, KT_ERRLEN, "out of memory");
        return KT_ENOMEM;
    }
    for (int e = 0; e < ctx->E; e++)
        if (expert_rows(ctx, e) > 0) a->active[a->nactive++] = e;
    /* largest experts first: the dynamic task queue then balances the tail */
    for (int i = 1; i < a->nactive; i++) {
        int e = a->active[i], me = expert_rows(ctx, e), j = i;
        while (j > 0 && expert_rows(ctx, a->active[j - 1]) < me) {
            a->active[j] = a->active[j - 1];
            j--;
        }
        a->active[j] = e;
    }
    for (int p = 0; p < ctx->nparts; p++) {
        a->nblk_i[p] = (ctx->part_i0[p + 1] - ctx->part_i0[p] + a->nb - 1) / a->nb;
        a->nblk_b[p] = (ctx->part_i0[p + 1] - ctx->part_i0[p] + a->nbb - 1) / a->nbb;
    }
    a->nblk_h = (ctx->H + a->nbh - 1) / a->nbh;
    /* whole rows only where the backward reads the weights in place: bf16, or the fused small-M product */
    int fmt = L->gate[0].fmt, whole = imin(S->blk.nn_rows_max_m, S->blk.pack_min_m - 1);
    if (fmt != KT_W_BF16) whole = S->qdot_small ? imin(whole, S->blk.fused_max_m[fmt]) : -1;
    a->ahead = imax(1, kt_engine_threads(eng) / ctx->nparts);
    a->nnarrow = a->nactive;
    while (a->nnarrow > 0 && expert_rows(ctx, a->active[a->nnarrow - 1]) <= whole) a->nnarrow--;
    return KT_OK;
}

static int finish(stage_args *a, const char *what, char *err) {
    int f = atomic_load(&a->failed);
    if (f == 1) {
        snprintf(err, KT_ERRLEN, "%s[%d] has a non-finite value (NaN or Inf)", what, atomic_load(&a->bad_row));
        return KT_EINVAL;
    }
    if (f == 2) {
        snprintf(err, KT_ERRLEN, "out of memory for per-thread work space");
        return KT_ENOMEM;
    }
    return KT_OK;
}

/* Carves per-part [npairs, Ip] bf16 matrices out of one shared buffer. */
static int part_matrices(stage_args *a, int slot, bf16_t **mats, char *err) {
    const kt_ctx *ctx = a->ctx;
    size_t total = sizeof(bf16_t) * (size_t)ctx->npairs * (size_t)ctx->I + 64;
    bf16_t *base = kt_shared_buffer(a->eng, slot, total);
    if (!base) {
        snprintf(err, KT_ERRLEN, "out of memory (%zu bytes)", total);
        return KT_ENOMEM;
    }
    for (int p = 0; p < ctx->nparts; p++) mats[p] = base + (size_t)ctx->npairs * ctx->part_i0[p];
    return KT_OK;
}

static int kt_stages_forward(const kt_slots *S, kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x,
                             int x_is_f32, void *out, int out_is_f32, char *err) {
    stage_args a;
    int rc = setup(&a, S, ctx, L, eng, err);
    if (rc) return rc;
    int P = ctx->nparts;
    convert_rows(&a, x, x_is_f32, ctx->x);
    if ((rc = finish(&a, "hidden_states", err))) return rc;
    if ((rc = part_matrices(&a, KT_SH_H, a.h, err))) return rc;
    if ((rc = pair_buffer(&a, err))) return rc;
    if ((rc = xpack_setup(&a, err))) return rc;
    if (a.xoff) run_all_timed(&a, "fwd_xpack", a.nactive, fwd_xpack_task, &a);
    if (L->act_quant) {
        if ((rc = q8_buffers(&a, KT_SH_XQ, ctx->T, ctx->H, 0, &a.xq, &a.xs, err)) ||
            (rc = q8_buffers(&a, KT_SH_HQ, ctx->npairs, ctx->I, 1, a.hq, &a.hs, err)))
            return rc;
        run_all_timed(&a, "fwd_quant_x", (ctx->T + 15) / 16, fwd_quant_x_task, &a);
    }
    int nt[KT_MAX_PARTS];
    if (L->r > 0) run_all_timed(&a, "fwd_lora_in", a.nactive, fwd_lora_in_task, &a);
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_i[p];
    run_parts_timed(&a, "fwd_gate_up", nt, fwd_gate_up_task, &a);
    if (L->r > 0) {
        for (int p = 0; p < P; p++) nt[p] = a.nactive;
        run_parts_timed(&a, "fwd_lora_mid", nt, fwd_lora_mid_task, &a);
    }
    if ((rc = finish(&a, "hidden_states", err))) return rc; /* out of memory in a task: stop here */
    if (L->act_quant) run_all_timed(&a, "fwd_quant_h", (ctx->npairs + 15) / 16, fwd_quant_h_task, &a);
    if (a.xoff) {
        for (int p = 0; p < P; p++) nt[p] = a.nactive;
        run_parts_timed(&a, "fwd_hpack", nt, fwd_hpack_task, &a);
        if ((rc = finish(&a, "hidden_states", err))) return rc;
    }
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_h;
    run_parts_timed(&a, "fwd_down", nt, fwd_down_task, &a);
    combine_pairs(&a, out, out_is_f32);
    ctx->nonfinite = atomic_load(&a.nonfinite);
    return finish(&a, "hidden_states", err);
}

/* ---- backward ---- */

/* out[i][j] = sum_h dy_i[h] Bd[h][j0 + j] for 4 pairs (dy rows) and jb <= 16 columns of the rank. */
static inline void lora_dy_block(const int jb, int H, int r, const bf16_t *const *dy, const float *Bd, float (*acc)[16]) {
    for (int h = 0; h < H; h++) {
        const float *b = Bd + (size_t)h * r;
        const float d0 = kt_bf(dy[0][h]), d1 = kt_bf(dy[1][h]), d2 = kt_bf(dy[2][h]), d3 = kt_bf(dy[3][h]);
#pragma omp simd
        for (int j = 0; j < jb; j++) {
            acc[0][j] += d0 * b[j];
            acc[1][j] += d1 * b[j];
            acc[2][j] += d2 * b[j];
            acc[3][j] += d3 * b[j];
        }
    }
}

/* bd[p] = Bd^T dy[p] for the expert's pairs (shared by parts), Bd [H, r] read in place: each row of Bd (r
 * floats) is one vector operand for 4 pairs at a time (a transpose of Bd for a dot-form GEMM cost more than
 * the product itself). Whole 16-column strips take a constant width, so that the accumulators stay in
 * registers. Task = active expert. */
static void bwd_lora_dy_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    int e = a->active[task], r = ctx->r, H = ctx->H;
    const float *Bd = a->L->down_b + (size_t)e * H * r;
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += 4) {
        int m = (int)zmin(4, (size_t)(ctx->expert_off[e + 1] - p0));
        const bf16_t *dy[4];
        rows_by_token(dy, ctx, a->dyb, (size_t)H, p0, m);
        for (int i = m; i < 4; i++) dy[i] = dy[0]; /* (computed, not stored) */
        float *out = a->bd + (size_t)p0 * r;
        for (int j0 = 0; j0 < r; j0 += 16) {
            const int jb = r - j0 < 16 ? r - j0 : 16;
            float acc[4][16] = {{0}};
            if (jb == 16)
                lora_dy_block(16, H, r, dy, Bd + j0, acc);
            else
                lora_dy_block(jb, H, r, dy, Bd + j0, acc);
            for (int i = 0; i < m; i++) memcpy(out + (size_t)i * r + j0, acc[i], sizeof(float) * (size_t)jb);
        }
    }
}

/* Down backward + activation backward, and the LoRA grads this (expert, column block) owns:
 * dA_d[:, block], dB_g[block, :], dB_u[block, :] (summed in scratch, streamed out: S->stream_f32). Task =
 * (active expert, column block of the part; the whole slice for few-row experts: nnblock_of). */
static void bwd_down_act_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_slots *S = a->S;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int nblk = a->nblk_b[part], MC = a->mc;
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    nnblock b = nnblock_of(a, task, nblk, a->nbb, Ip);
    int e = b.e, blk = b.blk, n0 = b.n0, nb = b.nb, me = expert_rows(ctx, e);
    int NBB = nb > a->nbb ? nb : a->nbb, MR = imin(MC, me); /* row stride and rows of the work arrays */
    int H = L->H, r = L->r, I = L->I;
    float s = a->s;
    size_t wb = S->bop_bytes(S, &L->down[part], KT_NN, H, nb, me);
    size_t lora = (size_t)r * (4 * (size_t)MR + 4 * (size_t)NBB);
    size_t fbytes = st_round64(sizeof(float) * (4 * (size_t)MR * NBB + lora));
    char *base = kt_scratch(a->eng, tid, fbytes + wb);
    if (!base) {
        fail(a, 2, 0);
        return;
    }
    float *c = (float *)base;
    float *hf = c + (size_t)MR * NBB, *dgf = hf + (size_t)MR * NBB, *duf = dgf + (size_t)MR * NBB;
    float *cd = duf + (size_t)MR * NBB, *cg = cd + (size_t)MR * r, *cu = cg + (size_t)MR * r;
    float *bgT = cu + (size_t)MR * r, *buT = bgT + (size_t)r * NBB; /* dB_g^T, dB_u^T of this block */
    float *adT = buT + (size_t)r * NBB, *tr = adT + (size_t)r * NBB; /* dA_d of this block; a transpose */
    float *cT = tr + (size_t)r * NBB;                                 /* [r, m] coefficients */
    kt_bop bw;
    S->bop_prep(S, &L->down[part], e, 0, H, n0, nb, KT_NN, me, base + fbytes, &bw);
    bw.next = nn_next(a, task, nblk, a->nbb, Ip, &L->down[part], H);
    float *gAd = NULL, *gBg = NULL, *gBu = NULL;
    if (r > 0) {
        gAd = a->grads[4] + (size_t)e * r * I + i0 + n0;           /* [r, I] at column i0 + n0 */
        gBg = a->grads[1] + ((size_t)e * I + (size_t)(i0 + n0)) * r; /* [I, r] at row i0 + n0 */
        gBu = a->grads[3] + ((size_t)e * I + (size_t)(i0 + n0)) * r;
        memset(bgT, 0, sizeof(float) * 3 * (size_t)r * NBB); /* bgT, buT, adT */
    }
    const bf16_t *rows[KT_MAX_MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin((size_t)MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, a->dyb, (size_t)H, p0, m);
        S->bop_gemm(S, m, rows, &bw, c, (size_t)NBB);
        if (r > 0) { /* dhu += s (Bd^T dy) Ad[:, block] */
            for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++) cT[(size_t)j * m + i] = s * a->bd[(size_t)(p0 + i) * r + j];
            S->outer_f32(r, m, nb, cT, (size_t)m, L->down_a + (size_t)e * r * I + i0 + n0, (size_t)I, c, NBB);
        }
        for (int i = 0; i < m; i++) {
            int p = p0 + i;
            size_t at = (size_t)p * Ip + n0, row = (size_t)i * NBB;
            a->dwp[part][(size_t)blk * ctx->npairs + p] =
                S->act_bwd(nb, ctx->g[part] + at, ctx->u[part] + at, c + row, ctx->pair_w[p], hf + row, dgf + row,
                           duf + row, a->dg[part] + at, a->du[part] + at);
            if (nb == Ip) /* one task for the whole slice: the partials of the other blocks are zero */
                for (int q = 1; q < nblk; q++) a->dwp[part][(size_t)q * ctx->npairs + p] = 0.f;
        }
        if (r == 0) continue;
        for (int i = 0; i < m; i++) {
            int p = p0 + i;
            float sw = s * ctx->pair_w[p];
            for (int j = 0; j < r; j++) {
                cd[(size_t)i * r + j] = sw * a->bd[(size_t)p * r + j];
                cg[(size_t)i * r + j] = s * ctx->ag[(size_t)p * r + j];
                cu[(size_t)i * r + j] = s * ctx->au[(size_t)p * r + j];
            }
        }
        S->outer_f32(m, r, nb, cd, (size_t)r, hf, NBB, adT, NBB);
        S->outer_f32(m, r, nb, cg, (size_t)r, dgf, NBB, bgT, NBB);
        S->outer_f32(m, r, nb, cu, (size_t)r, duf, NBB, buT, NBB);
    }
    if (r > 0) {
        for (int j = 0; j < r; j++) {
            mark_nonfinite(a, KT_NF_GRAD << 4, adT + (size_t)j * NBB, (size_t)nb);
            mark_nonfinite(a, KT_NF_GRAD << 1, bgT + (size_t)j * NBB, (size_t)nb);
            mark_nonfinite(a, KT_NF_GRAD << 3, buT + (size_t)j * NBB, (size_t)nb);
            S->stream_f32(gAd + (size_t)j * I, adT + (size_t)j * NBB, (size_t)nb);
        }
        transpose_f32(bgT, NBB, r, nb, tr, (size_t)r);
        S->stream_f32(gBg, tr, (size_t)nb * r);
        transpose_f32(buT, NBB, r, nb, tr, (size_t)r);
        S->stream_f32(gBu, tr, (size_t)nb * r);
    }
}

/* bg = dg Bg, bu = du Bu over this part's columns. Task = active expert. */
static void bwd_lora_mid_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = a->active[task], r = L->r;
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    float *bgT = kt_scratch(a->eng, tid, sizeof(float) * 2 * (size_t)r * Ip);
    if (!bgT) {
        fail(a, 2, 0);
        return;
    }
    float *buT = bgT + (size_t)r * Ip;
    transpose_f32(L->gate_b + ((size_t)e * L->I + i0) * r, (size_t)r, Ip, r, bgT, (size_t)Ip);
    transpose_f32(L->up_b + ((size_t)e * L->I + i0) * r, (size_t)r, Ip, r, buT, (size_t)Ip);
    const bf16_t *rows[KT_MAX_MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += a->mc) {
        int m = (int)zmin((size_t)a->mc, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_pair(rows, a->dg[part], (size_t)Ip, p0, m);
        a->S->gemm_nt(m, r, Ip, rows, bgT, (size_t)Ip, 1, a->bg[part] + (size_t)p0 * r, (size_t)r);
        rows_by_pair(rows, a->du[part], (size_t)Ip, p0, m);
        a->S->gemm_nt(m, r, Ip, rows, buT, (size_t)Ip, 1, a->bu[part] + (size_t)p0 * r, (size_t)r);
    }
}

/* The LoRA grads summed over pairs and parts: dA_g, dA_u, dB_d. Task = expert (all of them: experts with
 * no pairs get zero grads here, including the slices other stages own). Each grad is summed in scratch and
 * streamed out once (S->stream_f32: the grads are tens of MB the call does not read back). */
static void bwd_lora_sum_task(void *arg, int part, int task, int tid) {
    (void)part;
    stage_args *a = arg;
    const kt_slots *S = a->S;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = task, r = L->r, H = L->H, I = L->I, P = ctx->nparts, MC = a->mc;
    size_t rH = (size_t)r * H, rI = (size_t)r * I;
    float *out[3] = {a->grads[0] + e * rH, a->grads[2] + e * rH, a->grads[5] + e * rH}; /* dA_g, dA_u, dB_d */
    if (expert_rows(ctx, e) == 0) {
        for (int g = 0; g < 3; g++) S->stream_f32(out[g], NULL, rH);
        S->stream_f32(a->grads[1] + e * rI, NULL, rI);
        S->stream_f32(a->grads[3] + e * rI, NULL, rI);
        S->stream_f32(a->grads[4] + e * rI, NULL, rI);
        return;
    }
    /* per chunk of rows: coefficients s * sum_q bg_q, s * sum_q bu_q, s * w * sum_q ad_q over the parts;
     * the sums over rows accumulate in acc ([r, H]; dB_d transposed through tr to its [H, r]) */
    float *c = kt_scratch(a->eng, tid, sizeof(float) * ((size_t)MC * r + 2 * rH));
    if (!c) {
        fail(a, 2, 0);
        return;
    }
    float *acc = c + (size_t)MC * r, *tr = acc + rH;
    static const int nf_bit[3] = {KT_NF_GRAD << 0, KT_NF_GRAD << 2, KT_NF_GRAD << 5};
    const bf16_t *rows[KT_MAX_MC];
    for (int g = 0; g < 3; g++) {
        float *const *coef = g == 0 ? a->bg : g == 1 ? a->bu : ctx->ad; /* per part */
        const bf16_t *x = g < 2 ? ctx->x : a->dyb;
        memset(acc, 0, sizeof(float) * rH);
        for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
            int m = (int)zmin((size_t)MC, (size_t)(ctx->expert_off[e + 1] - p0));
            for (int i = 0; i < m; i++) {
                size_t at = (size_t)(p0 + i) * r;
                float sc = g == 2 ? a->s * ctx->pair_w[p0 + i] : a->s;
                for (int j = 0; j < r; j++) {
                    float v = 0.f;
                    for (int q = 0; q < P; q++) v += coef[q][at + j];
                    c[(size_t)i * r + j] = sc * v;
                }
            }
            rows_by_token(rows, ctx, x, (size_t)H, p0, m);
            S->outer_bf16(m, r, H, c, (size_t)r, rows, acc, (size_t)H);
        }
        mark_nonfinite(a, nf_bit[g], acc, rH);
        if (g == 2) transpose_f32(acc, (size_t)H, r, H, tr, (size_t)r);
        S->stream_f32(out[g], g == 2 ? tr : acc, rH);
    }
}

/* dx rows per pair = dg Wg + du Wu + s (bg Ag + bu Au), into the part's per-pair buffer; the combine
 * stage sums each token's pairs. Task = (active expert, column block of H; all of H for few-row experts). */
static void bwd_dx_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_slots *S = a->S;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int H = L->H, r = L->r, MC = a->mc;
    int Ip = ctx->part_i0[part + 1] - ctx->part_i0[part];
    nnblock b = nnblock_of(a, task, a->nblk_h, a->nbh, H);
    int e = b.e, n0 = b.n0, nb = b.nb, me = expert_rows(ctx, e);
    int NBH = nb > a->nbh ? nb : a->nbh, MR = imin(MC, me); /* row stride and rows of c2 */
    float *pairs = a->pairbuf + (size_t)part * ctx->npairs * H;
    size_t fbytes = st_round64(sizeof(float) * ((size_t)MR * NBH + 2 * (size_t)r * MR));
    size_t wg = st_round64(S->bop_bytes(S, &L->gate[part], KT_NN, Ip, nb, me));
    size_t wu = st_round64(S->bop_bytes(S, &L->up[part], KT_NN, Ip, nb, me));
    char *base = kt_scratch(a->eng, tid, fbytes + wg + wu);
    if (!base) {
        fail(a, 2, 0);
        return;
    }
    float *c2 = (float *)base;
    kt_bop bg, bu;
    S->bop_prep(S, &L->gate[part], e, 0, Ip, n0, nb, KT_NN, me, base + fbytes, &bg);
    S->bop_prep(S, &L->up[part], e, 0, Ip, n0, nb, KT_NN, me, base + fbytes + wg, &bu);
    bg.next = nn_next(a, task, a->nblk_h, a->nbh, H, &L->gate[part], Ip);
    bu.next = nn_next(a, task, a->nblk_h, a->nbh, H, &L->up[part], Ip);
    const bf16_t *rows[KT_MAX_MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin((size_t)MC, (size_t)(ctx->expert_off[e + 1] - p0));
        float *c1 = pairs + (size_t)p0 * H + n0;
        rows_by_pair(rows, a->dg[part], (size_t)Ip, p0, m);
        S->bop_gemm(S, m, rows, &bg, c1, (size_t)H);
        rows_by_pair(rows, a->du[part], (size_t)Ip, p0, m);
        S->bop_gemm(S, m, rows, &bu, c2, (size_t)NBH);
        for (int i = 0; i < m; i++) {
            float *ci = c1 + (size_t)i * H;
            const float *c2i = c2 + (size_t)i * NBH;
#pragma omp simd
            for (int n = 0; n < nb; n++) ci[n] += c2i[n];
        }
        if (r > 0) { /* + s (dg Bg) Ag + s (du Bu) Au, as products over the rank */
            float *cgT = c2 + (size_t)MR * NBH, *cuT = cgT + (size_t)r * MR;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++) {
                    cgT[(size_t)j * m + i] = a->s * a->bg[part][(size_t)(p0 + i) * r + j];
                    cuT[(size_t)j * m + i] = a->s * a->bu[part][(size_t)(p0 + i) * r + j];
                }
            S->outer_f32(r, m, nb, cgT, (size_t)m, L->gate_a + (size_t)e * r * H + n0, (size_t)H, c1, (size_t)H);
            S->outer_f32(r, m, nb, cuT, (size_t)m, L->up_a + (size_t)e * r * H + n0, (size_t)H, c1, (size_t)H);
        }
    }
}

static int kt_stages_backward(const kt_slots *S, kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy,
                              int dy_is_f32, void *dx, int dx_is_f32, float *dw, float *const grads[6], char *err) {
    stage_args a;
    int rc = setup(&a, S, ctx, L, eng, err);
    if (rc) return rc;
    int P = ctx->nparts, T = ctx->T, H = ctx->H, r = ctx->r;
    size_t np = (size_t)ctx->npairs;
    a.grads = grads;
    a.dyb = kt_shared_buffer(eng, KT_SH_DY, sizeof(bf16_t) * (size_t)T * H + 64);
    int maxblk = 0;
    for (int p = 0; p < P; p++) maxblk = a.nblk_b[p] > maxblk ? a.nblk_b[p] : maxblk;
    float *dwp = kt_shared_buffer(eng, KT_SH_DWPART, sizeof(float) * (size_t)P * maxblk * np + 64);
    float *lora = r > 0 ? kt_shared_buffer(eng, KT_SH_BD, sizeof(float) * np * r * (1 + 2 * (size_t)P) + 64) : NULL;
    if ((rc = pair_buffer(&a, err))) return rc;
    if (!a.dyb || !dwp || (r > 0 && !lora)) {
        snprintf(err, KT_ERRLEN, "out of memory for backward work space");
        return KT_ENOMEM;
    }
    for (int p = 0; p < P; p++) {
        a.dwp[p] = dwp + (size_t)p * maxblk * np;
        if (r > 0) {
            a.bg[p] = lora + np * r * (1 + 2 * (size_t)p);
            a.bu[p] = a.bg[p] + np * r;
        }
    }
    a.bd = lora;
    if ((rc = part_matrices(&a, KT_SH_DG, a.dg, err)) || (rc = part_matrices(&a, KT_SH_DU, a.du, err))) return rc;
    convert_rows(&a, dy, dy_is_f32, a.dyb);
    if ((rc = finish(&a, "grad_output", err))) return rc;

    int nt[KT_MAX_PARTS];
    if (r > 0) run_all_timed(&a, "bwd_lora_dy", a.nactive, bwd_lora_dy_task, &a);
    for (int p = 0; p < P; p++) nt[p] = nn_tasks(&a, a.nblk_b[p]);
    run_parts_timed(&a, "bwd_down_act", nt, bwd_down_act_task, &a);
    if (r > 0) {
        for (int p = 0; p < P; p++) nt[p] = a.nactive;
        run_parts_timed(&a, "bwd_lora_mid", nt, bwd_lora_mid_task, &a);
        run_all_timed(&a, "bwd_lora_sum", ctx->E, bwd_lora_sum_task, &a);
    }
    for (int p = 0; p < P; p++) nt[p] = nn_tasks(&a, a.nblk_h);
    run_parts_timed(&a, "bwd_dx", nt, bwd_dx_task, &a);
    combine_pairs(&a, dx, dx_is_f32);
    if ((rc = finish(&a, "grad_output", err))) return rc;

    /* routing-weight grads: sum the (part, block) partials of each pair */
    memset(dw, 0, sizeof(float) * (size_t)T * ctx->k);
    for (size_t p = 0; p < np; p++) {
        float acc = 0.f;
        for (int q = 0; q < P; q++)
            for (int b = 0; b < a.nblk_b[q]; b++) acc += a.dwp[q][(size_t)b * np + p];
        dw[ctx->pair_slot[p]] += acc;
    }
    mark_nonfinite(&a, KT_NF_DW, dw, (size_t)T * ctx->k);
    ctx->nonfinite = atomic_load(&a.nonfinite);
    return KT_OK;
}

#endif
