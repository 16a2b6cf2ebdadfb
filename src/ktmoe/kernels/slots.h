/* The slot contract: what an ISA level provides, and what the MoE algorithm (moe/) may call.
 *
 * A level is one row of the registry (core/levels.c): a name, a parent, a usability test, an optional
 * per-thread init hook, its blocking data, and a table of slots. A NULL slot (or a 0 blocking field) is
 * inherited from the parent, so a level overrides only what it has; the root (portable) fills everything.
 * The registry resolves the chain once; the algorithm receives the resolved table and never asks which
 * ISA or weight format it runs on.
 *
 * Operands (fp32 accumulation everywhere):
 *   A        activation rows, bf16, given as an array of M row pointers (a gather by token costs nothing)
 *   W        a block of an expert's frozen weights, described by a kt_wmat (format + view)
 *   C        fp32 rows, stride ldc >= N, overwritten (never accumulated), padding past N untouched
 *
 * Slots:
 *   gemm_nt / gemm_nn    GEMM on bf16 panels: C = A B^T (B [N, K], or fp32 with b_is_f32) / C = A B (B [K, N])
 *   decode_run[fmt]      decode n weights of one row inside one scale block to bf16 (format -> row layout)
 *   qdot_small           small-M fused quantized product C = A W, W decoded in registers (optional)
 *   bop_bytes/prep/gemm  the packed-panel GEMM: prep makes a block of W ready (in place, decoded, packed
 *                        into the level's tile layout, or left for the fused kernel) as a kt_bop descriptor,
 *                        then bop_gemm runs any number of row chunks against it (and may prefetch the
 *                        descriptor's `next` block, which the algorithm fills in after prep)
 *   xpack_bytes/xpack/bop_gemm_px  optional (never inherited: they go with the level's own bop slots): the
 *                        forward's NT products with the activations packed once per expert (xpack) instead
 *                        of once per weight block; bop_gemm_px then runs a bop_prep'd weight block against
 *                        rows [m0, m0 + M) of that pack (m0 a multiple of blk.mc)
 *   q8_quant             W8A8 (kt_layer.act_quant): one activation row, given in segments, to int8 codes + scale
 *   bop_q8_bytes/prep/gemm  the W8A8 forward product C = A W^T on int8 codes: prep makes a block of per-row
 *                        int8/int4/int4_1 weights ready as int8 codes (+ per-row scale and zero) in the level's
 *                        layout, then bop_q8_gemm runs row chunks of int8 activations against it
 *   outer_f32/outer_bf16 LoRA products: out[j, n] += sum_p coef[p, j] x_p[n]
 *   act_fwd / act_bwd    the SiLU-gated activation and its backward, with the bf16 rounding of the saved values
 *   stream_f32           dst = src (or zeros) for large outputs the call does not read back, past the caches
 *   forward / backward   the algorithm itself (moe/stages.c, compiled per vector width)
 *   peak_loop            one thread's multiply-accumulate loop (the bench's peak)
 */
#ifndef KTMOE_SLOTS_H
#define KTMOE_SLOTS_H

#include "base.h"
#include "ktmoe.h"

struct kt_ctx;
typedef struct kt_slots kt_slots;

enum { KT_NT = 0, KT_NN = 1 };  /* C = A W^T (block rows are the N outputs) / C = A W (block rows are K) */
enum { KT_BOP_ROWS = 0, KT_BOP_PANEL = 1, KT_BOP_FUSED = 2, KT_BOP_Q8_ROWS = 3, KT_BOP_Q8_PANEL = 4, KT_BOP_PAIRS = 5 };

/* A block of an expert's weights: rows [r0, r0 + nr) x columns [c0, c0 + nc) of expert e of w, view
 * coordinates; nr == 0: none. */
typedef struct { const kt_wmat *w; int e, r0, nr, c0, nc; } kt_wblock;

/* A prepared weight operand (a descriptor first, then the kernel). The block is rows [r0, r0 + nr) x
 * columns [c0, c0 + nc) of expert e's matrix, relative to the part's view; N and K follow from trans. */
typedef struct {
    int kind, trans, N, K;
    const bf16_t *w;     /* KT_BOP_ROWS: bf16 values of the block, row stride ld */
    size_t ld;
    const void *panel;   /* KT_BOP_PANEL: the tile level's packed layout; KT_BOP_PAIRS: the vdpbf16ps pair panel */
    const kt_wmat *src;  /* KT_BOP_FUSED: decoded inside the kernel */
    int e, r0, c0;
    void *work;          /* bop_gemm's own scratch (A packing, fp32 rows, decode tables) */
    /* the W8A8 operands (always NT): w[n][k] = qscale[n] * q[n][k] + qzero[n] */
    const int8_t *q;     /* KT_BOP_Q8_ROWS: int8 codes [N, K], row stride ld (KT_BOP_Q8_PANEL: in `panel`) */
    const float *qscale; /* [N] */
    const float *qzero;  /* [N]; NULL: no zero point (int8, int4) */
    /* the block this thread will likely prepare next (the stage's next task; nr == 0: unknown): a product
     * whose block is packed may prefetch it while it computes, spread over its work, so that the next prep
     * reads from cache (strided block rows from memory are latency-bound: most of a pack's time) */
    kt_wblock next;
} kt_bop;

/* A cleared descriptor of the block rows [r0, r0 + nr) x columns [c0, c0 + nc) of expert e, for `trans`. */
static inline void kt_bop_open(kt_bop *b, int kind, int trans, int e, int r0, int nr, int c0, int nc) {
    memset(b, 0, sizeof *b);
    b->kind = kind;
    b->trans = trans;
    b->N = trans == KT_NT ? nr : nc;
    b->K = trans == KT_NT ? nc : nr;
    b->e = e;
    b->r0 = r0;
    b->c0 = c0;
}

/* The same for a block left to the fused kernel: it decodes from w itself, with `scratch` as its work space. */
static inline void kt_bop_open_fused(kt_bop *b, const kt_wmat *w, int trans, int e, int r0, int nr, int c0, int nc,
                                     void *scratch) {
    kt_bop_open(b, KT_BOP_FUSED, trans, e, r0, nr, c0, nc);
    b->src = w;
    b->work = scratch;
}

/* Blocking and crossovers: data, per level. 0 inherits. */
typedef struct {
    int mc;                        /* rows of A per GEMM call (<= KT_MAX_MC) */
    int nb;                        /* intermediate columns per forward gate/up task (<= KT_MAX_NB) */
    int nbb;                       /* intermediate columns per backward down task (<= KT_MAX_NB) */
    int nbh;                       /* columns of H per task of the stages that write rows of H (<= KT_MAX_NB) */
    int fused_max_m[KT_W_COUNT];   /* experts with at most this many rows take qdot_small (-1: never) */
    int pack_min_m;                /* levels with a packed weight layout (tiles, panels): blocks used by fewer
                                      rows take the in-place kernels (tile levels: the parent's) */
    int xpack_min_m;               /* levels with xpack: experts with at least this many rows take it */
    int nn_rows_max_m;             /* bf16 weights: experts with at most this many rows (and fewer than pack_min_m)
                                      run each backward NN stage (bwd_down_act, bwd_dx) as one task over whole
                                      weight rows, not in column blocks: a block's rows lie a matrix row apart,
                                      which the hardware prefetchers do not follow (-1: never) */
} kt_blocking;

#define KT_MAX_MC 256
#define KT_MAX_NB 256

typedef void (*kt_decode_fn)(const kt_wmat *w, int e, int r, int c, int n, bf16_t *dst);

struct kt_slots {
    void (*gemm_nt)(int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int b_is_f32,
                    float *c, size_t ldc);
    void (*gemm_nn)(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                    size_t ldc);
    /* row r and column c are inside expert e's matrix (view offsets already applied); the n values from c
     * lie in one scale block */
    kt_decode_fn decode_run[KT_W_COUNT];
    /* C[p][j] (+)= sum_{k < K} af_p[k] W[r0 + k][c0 + j], p < m, j < nc; af fp32 rows (stride lda);
     * lut: 16 * K floats of scratch. Supports the formats whose fused_max_m is >= 0. */
    void (*qdot_small)(int m, int nc, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0, int c0,
                       float *c, size_t ldc, int accumulate, float *lut);
    size_t (*bop_bytes)(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m);
    void (*bop_prep)(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans, int m,
                     void *scratch, kt_bop *b);
    void (*bop_gemm)(const kt_slots *S, int M, const bf16_t *const *a, const kt_bop *b, float *c, size_t ldc);
    size_t (*xpack_bytes)(int M, int K);
    void (*xpack)(int M, int K, const bf16_t *const *a, void *dst);
    void (*bop_gemm_px)(const kt_slots *S, int M, const void *px, int m0, const kt_bop *b, float *c, size_t ldc);
    /* One activation row of sum(len) bf16 values, given as nseg segments seg[i] of len[i] values: codes
     * dst[i][j] = round-half-even(seg[i][j] / sa) clamped to [-127, 127]; returns sa = max|a| / 127 (1 when
     * every value is 0), both in fp32 exactly as written (the Python reference does the same operations). */
    float (*q8_quant)(int nseg, const bf16_t *const *seg, const int *len, int8_t *const *dst);
    /* W8A8: the NT block rows [r0, r0 + nr) (the N outputs) x cols [c0, c0 + nc) (K) of expert e, view
     * coordinates, of a per-row int8/int4/int4_1 matrix, for m rows of activations */
    size_t (*bop_q8_bytes)(const kt_slots *S, const kt_wmat *w, int nr, int nc, int m);
    void (*bop_q8_prep)(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int m,
                        void *scratch, kt_bop *b);
    /* C[i][n] = kt_q8_value(sa[i], b->qscale[n], b->qzero[n], ..., dot(aq[i], q_n), sum(aq[i])) for
     * i < M <= blk.mc, n < b->N: aq rows of b->K int8 codes by pointer, sa their scales; C overwritten */
    void (*bop_q8_gemm)(const kt_slots *S, int M, const int8_t *const *aq, const float *sa, const kt_bop *b,
                        float *c, size_t ldc);
    void (*outer_f32)(int M, int R, int N, const float *coef, size_t ldcoef, const float *x, size_t ldx,
                      float *out, size_t ldo);
    void (*outer_bf16)(int M, int R, int N, const float *coef, size_t ldcoef, const bf16_t *const *x, float *out,
                       size_t ldo);
    /* g, u fp32 pre-activations -> their bf16 roundings and h = bf16(silu(g) u) of the rounded values */
    void (*act_fwd)(int n, const float *g, const float *u, bf16_t *gb, bf16_t *ub, bf16_t *h);
    /* from saved bf16 g, u and dhu = dL/dh / w: h (recomputed exactly), dg, du (fp32 and bf16) for dh = w
     * dhu; returns <dhu, h> (the routing-weight gradient's share) */
    float (*act_bwd)(int n, const bf16_t *g, const bf16_t *u, const float *dhu, float w, float *h, float *dg,
                     float *du, bf16_t *dgb, bf16_t *dub);
    /* dst[0, n) = src[0, n), or zeros with src NULL; the values need not stay in cache (the LoRA grads) */
    void (*stream_f32)(float *dst, const float *src, size_t n);
    int (*forward)(const kt_slots *S, struct kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x,
                   int x_is_f32, void *out, int out_is_f32, char *err);
    int (*backward)(const kt_slots *S, struct kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy,
                    int dy_is_f32, void *dx, int dx_is_f32, float *dw, float *const grads[6], char *err);
    double (*peak_loop)(long iters);
    /* filled by the registry */
    kt_blocking blk;
    const char *name;
    const kt_slots *parent;       /* resolved parent (fallbacks call it), NULL for the root */
    void (*thread_init)(void);    /* run once by every engine thread before its first task at this level */
};

/* One registry row. */
typedef struct {
    const char *name;
    int id, parent;               /* parent id; KT_PARENT_BEST_PLAIN: the best usable level without tiles */
    int autoselect;
    int (*usable)(char *why, size_t len); /* NULL: always */
    void (*thread_init)(void);
    kt_blocking blk;
    kt_slots slots;
} kt_level;

#define KT_PARENT_BEST_PLAIN (-2)

/* The resolved table of the active level (never NULL after kt_isa_active()). */
const kt_slots *kt_slots_active(void);
const kt_slots *kt_slots_of(int level); /* NULL when not usable */

/* Default prepared-operand slots (core/bop.c): bf16 in place, other formats decoded into row blocks,
 * small-M quantized NN products left to qdot_small. */
size_t kt_bop_bytes_rows(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m);
void kt_bop_prep_rows(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans, int m,
                      void *scratch, kt_bop *b);
void kt_bop_gemm_rows(const kt_slots *S, int M, const bf16_t *const *a, const kt_bop *b, float *c, size_t ldc);
/* Decodes a block through S->decode_run: rows [r0, r0 + nr) x cols [c0, c0 + nc) of expert e, view
 * coordinates, into dst (row stride nc). */
void kt_decode_block(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst);

/* Default W8A8 slots (core/bop.c): portable C int8 / int32 loops, shared by every level without tiles. */
float kt_q8_quant_rows(int nseg, const bf16_t *const *seg, const int *len, int8_t *const *dst);
size_t kt_bop_q8_bytes_rows(const kt_slots *S, const kt_wmat *w, int nr, int nc, int m);
void kt_bop_q8_prep_rows(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int m,
                         void *scratch, kt_bop *b);
void kt_bop_q8_gemm_rows(const kt_slots *S, int M, const int8_t *const *aq, const float *sa, const kt_bop *b,
                         float *c, size_t ldc);
/* The int8 view of a per-row weight block (view coordinates, as kt_decode_block): the codes, in place for
 * int8 (*ld = the matrix's cols) or unpacked into scratch (nr x nc, *ld = nc) for int4 (n - 8) and int4_1 (n);
 * and the per-row scales (and zeros, when zero is not NULL and the format has them). */
const int8_t *kt_q8_block_codes(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int8_t *scratch, size_t *ld);
void kt_q8_block_scales(const kt_wmat *w, int e, int r0, int nr, int c0, float *scale, float *zero);
/* Whether a descriptor suits the W8A8 path: int8 / int4 / int4_1 with one scale per row (group == cols). */
int kt_q8_supported(const kt_wmat *w);

/* The W8A8 epilogue of one output, the same expression on every level: the int32 dot product (exact) and the
 * row sum of the activation codes are converted to fp32, then sa * (sw * dot) or, with a zero point,
 * sa * fma(sw, dot, zw * asum) with the fused multiply-add written out, so that no compiler contraction
 * (-ffp-contract) can change a bit between levels. */
static inline float kt_q8_value(float sa, float sw, float zw, int has_zero, int32_t dot, int32_t asum) {
    if (!has_zero) return sa * (sw * (float)dot);
    return sa * __builtin_fmaf(sw, (float)dot, zw * (float)asum);
}

/* Scale block index of (row, col) of expert e, absolute coordinates in the expert's matrix. */
static inline size_t kt_scale_index(const kt_wmat *w, int e, int r, int c) {
    size_t rb = (size_t)((w->rows + w->block_rows - 1) / w->block_rows);
    size_t ng = (size_t)((w->cols + w->group - 1) / w->group);
    return ((size_t)e * rb + (size_t)(r / w->block_rows)) * ng + (size_t)(c / w->group);
}

#endif
