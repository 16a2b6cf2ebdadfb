/* Slot conformance: one level's slot against the reference (ref/), on operands that end exactly at a
 * PROT_NONE guard page (a read or write past the end faults), with C padding that must stay untouched.
 * Driven from pytest (tests/test_slots.py) over every usable level, every slot and edge shapes. */
#define _GNU_SOURCE
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include "../ref/ref.h"
#include "internal.h"

static const char *const slot_names[KT_SLOT_COUNT] = {"gemm_nt", "gemm_nt_f32", "gemm_nn", "decode", "bop_nt",
                                                       "bop_nn", "outer_f32", "outer_bf16", "act_fwd", "act_bwd",
                                                       "q8_quant", "bop_q8", "bop_px", "stream_f32"};

const char *kt_slot_name(int slot) { return slot >= 0 && slot < KT_SLOT_COUNT ? slot_names[slot] : NULL; }

/* ---- guarded memory: p[0, bytes) readable and writable, p + bytes the start of a PROT_NONE page ---- */
typedef struct { void *base; size_t len; } region;
#define MAX_REGIONS 600
typedef struct { region r[MAX_REGIONS]; int n; int failed; } arena;

static void *guarded(arena *A, size_t bytes) {
    if (A->n == MAX_REGIONS) {
        A->failed = 1;
        return NULL;
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE), data = (bytes + page - 1) / page * page, len = data + page;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(base + data, page, PROT_NONE)) {
        A->failed = 1;
        return NULL;
    }
    A->r[A->n].base = base;
    A->r[A->n].len = len;
    A->n++;
    return base + data - bytes;
}

static void arena_free(arena *A) {
    for (int i = 0; i < A->n; i++) munmap(A->r[i].base, A->r[i].len);
    A->n = 0;
}

static double out_of_memory(char *err) {
    snprintf(err, KT_ERRLEN, "out of memory");
    return KT_ENOMEM;
}

/* ---- random data ---- */
static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}
static float rng_val(uint64_t *s) { return (float)((double)(rng_next(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0); }

static bf16_t *bf16_array(arena *A, uint64_t *s, size_t n) {
    bf16_t *p = guarded(A, sizeof(bf16_t) * (n ? n : 1));
    if (p)
        for (size_t i = 0; i < n; i++) p[i] = kt_round_bf16(rng_val(s));
    return p;
}
static float *f32_array(arena *A, uint64_t *s, size_t n, float scale) {
    float *p = guarded(A, sizeof(float) * (n ? n : 1));
    if (p)
        for (size_t i = 0; i < n; i++) p[i] = scale * rng_val(s);
    return p;
}
/* M rows of K bf16, each ending at its own guard page */
static const bf16_t **a_rows(arena *A, uint64_t *s, int M, int K) {
    const bf16_t **rows = guarded(A, sizeof(bf16_t *) * (size_t)M);
    if (rows)
        for (int m = 0; m < M; m++) rows[m] = bf16_array(A, s, (size_t)K);
    return rows;
}

#define PAD 3
#define SENTINEL -777.0f

static float *c_block(arena *A, int M, int N) {
    size_t n = (size_t)M * (N + PAD);
    float *c = guarded(A, sizeof(float) * (n ? n : 1));
    if (c)
        for (size_t i = 0; i < n; i++) c[i] = (i % (size_t)(N + PAD)) < (size_t)N ? NAN : SENTINEL;
    return c;
}

/* worst |got - want| / (rtol * mag + atol) over an M x N result; padding must be untouched. */
static double compare(const float *c, size_t ldc, int M, int N, const double *want, const double *mag, double rtol,
                      double atol, const char *what, char *err) {
    double worst = 0;
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double got = c[(size_t)m * ldc + n], w = want[(size_t)m * N + n];
            double r = fabs(got - w) / (rtol * mag[(size_t)m * N + n] + atol);
            if (!(r <= worst)) { /* NaN counts as the worst */
                if (!(r <= 1) && !(worst > 1))
                    snprintf(err, KT_ERRLEN, "%s wrong at (%d, %d): %.9g, reference %.9g", what, m, n, got, w);
                worst = isnan(r) ? INFINITY : r;
            }
        }
        for (size_t n = (size_t)N; n < ldc; n++)
            if (c[(size_t)m * ldc + n] != SENTINEL) {
                snprintf(err, KT_ERRLEN, "%s wrote past column %d (row %d)", what, N, m);
                return INFINITY;
            }
    }
    return worst;
}

/* ---- weights of format fmt: E = 2 experts of rows x cols, random codes and scales; blocks of block_rows x
 * group codes share a scale (partial at the edges for the 2-D block formats). fp8's NaN codes are replaced by
 * 448 (a NaN weight is refused at load; the decode check plants one on purpose). ---- */
static int make_weights(arena *A, uint64_t *s, int fmt, int rows, int cols, int group, int block_rows, kt_wmat *w) {
    memset(w, 0, sizeof *w);
    w->fmt = fmt;
    w->layout = KT_L_ROWS;
    w->rows = rows;
    w->cols = cols;
    w->group = group;
    w->block_rows = block_rows;
    size_t n = 2 * (size_t)rows * cols;
    size_t ns = 2 * (size_t)((rows + block_rows - 1) / block_rows) * (size_t)((cols + group - 1) / group);
    int bits = kt_format_bits(fmt);
    if (bits == 16) {
        w->data = bf16_array(A, s, n);
    } else {
        size_t bytes = bits == 8 ? n : n / 2;
        uint8_t *q = guarded(A, bytes);
        if (q)
            for (size_t i = 0; i < bytes; i++) {
                q[i] = (uint8_t)rng_next(s);
                if (fmt == KT_W_FP8 && (q[i] & 0x7f) == 0x7f) q[i] ^= 1;
            }
        w->data = q;
        float *sc = f32_array(A, s, ns, 0.05f);
        if (sc)
            for (size_t i = 0; i < ns; i++) sc[i] = fabsf(sc[i]) + 1e-3f;
        w->scale = sc;
        if (kt_format_has_zero(fmt)) w->zero = f32_array(A, s, ns, 0.3f);
    }
    char err[KT_ERRLEN];
    return !A->failed && kt_wmat_check(w, 2, err) == KT_OK;
}

static int round_up(int n, int g) { return (n + g - 1) / g * g; }

static double check_gemm(const kt_slots *S, int slot, int M, int N, int K, uint64_t *s, arena *A, char *err) {
    int trans = slot == KT_SLOT_GEMM_NN ? KT_NN : KT_NT, f32 = slot == KT_SLOT_GEMM_NT_F32;
    size_t ldb = (size_t)(trans == KT_NT ? K : N) + 5;
    size_t nb = trans == KT_NT ? (size_t)(N - 1) * ldb + K : (K > 0 ? (size_t)(K - 1) * ldb + N : 0);
    const bf16_t **a = a_rows(A, s, M, K);
    void *b = f32 ? (void *)f32_array(A, s, nb, 1.0f) : (void *)bf16_array(A, s, nb);
    float *c = c_block(A, M, N);
    double *want = guarded(A, sizeof(double) * 2 * (size_t)M * N);
    if (A->failed) return out_of_memory(err);
    kt_ref_gemm(trans, M, N, K, a, b, ldb, f32, want, want + (size_t)M * N);
    if (trans == KT_NT)
        S->gemm_nt(M, N, K, a, b, ldb, f32, c, (size_t)N + PAD);
    else
        S->gemm_nn(M, N, K, a, b, ldb, c, (size_t)N + PAD);
    double r = compare(c, (size_t)N + PAD, M, N, want, want + (size_t)M * N, 1e-5, 1e-30, slot_names[slot], err);
    return r;
}

/* Columns of a test matrix holding at least `need`: whole groups and bytes, except for the 2-D block formats,
 * which get partial edge blocks whenever `need` is not a multiple of the group. */
static int test_cols(int fmt, int need, int group) {
    if (kt_format_blocks_2d(fmt) == 1) return need;
    return round_up(round_up(need, group ? group : 2), 2);
}

static double check_decode(const kt_slots *S, int fmt, int M, int K, int group, int block_rows, uint64_t *s, arena *A,
                           char *err) {
    int cols = test_cols(fmt, K, group);
    kt_wmat w;
    if (!make_weights(A, s, fmt, M, cols, group ? group : cols, block_rows, &w)) {
        snprintf(err, KT_ERRLEN, "could not build %s weights %d x %d group %d", kt_format_name(fmt), M, cols, group);
        return KT_EINVAL;
    }
    int r0 = M / 3, c0 = cols > 1 ? 1 : 0, nr = M - r0, nc = cols - c0; /* odd column start: a high nibble */
    bf16_t *got = guarded(A, sizeof(bf16_t) * (size_t)nr * nc), *want = guarded(A, sizeof(bf16_t) * (size_t)nr * nc);
    if (A->failed) return out_of_memory(err);
    if (fmt == KT_W_FP8) { /* a NaN code, a negative subnormal, and one block whose products are fp32 denormals */
        uint8_t *q = (uint8_t *)w.data + (size_t)(M + r0) * cols;
        q[c0] = 0xff;
        if (nc > 1) q[c0 + 1] = 0x83;
        ((float *)w.scale)[kt_scale_index(&w, 1, M - 1, cols - 1)] = 1e-37f;
    }
    kt_decode_block(S, &w, 1, r0, nr, c0, nc, got);
    kt_ref_decode_block(&w, 1, r0, nr, c0, nc, want);
    double r = 0;
    for (size_t i = 0; i < (size_t)nr * nc; i++)
        if (got[i] != want[i]) {
            snprintf(err, KT_ERRLEN, "decode %s wrong at (%zu, %zu): 0x%04x, reference 0x%04x", kt_format_name(fmt),
                     i / (size_t)nc, i % (size_t)nc, got[i], want[i]);
            r = INFINITY;
            break;
        }
    return r;
}

/* The weights of a prepared-operand check: an nr x nc block fits from row 1 and column 1 of each expert. */
static int bop_weights(arena *A, uint64_t *s, int fmt, int nr, int nc, int group, int block_rows, kt_wmat *w,
                       char *err) {
    int cols = test_cols(fmt, 1 + nc, group);
    if (make_weights(A, s, fmt, nr + 1, cols, group ? group : cols, block_rows, w)) return 1;
    snprintf(err, KT_ERRLEN, "could not build %s weights", kt_format_name(fmt));
    return 0;
}

/* The prepared-operand path as the algorithm uses it: prep with the expert's row count, then GEMM chunks
 * of at most blk.mc rows. The W block starts one row and one column into expert 1's matrix. */
static double check_bop(const kt_slots *S, int slot, int fmt, int M, int N, int K, int group, int block_rows,
                        uint64_t *s, arena *A, char *err) {
    int trans = slot == KT_SLOT_BOP_NT ? KT_NT : KT_NN;
    int nr = trans == KT_NT ? N : K, nc = trans == KT_NT ? K : N;
    kt_wmat w;
    if (!bop_weights(A, s, fmt, nr, nc, group, block_rows, &w, err)) return KT_EINVAL;
    size_t bytes = S->bop_bytes(S, &w, trans, nr, nc, M);
    void *scratch = guarded(A, bytes ? bytes : 1);
    const bf16_t **a = a_rows(A, s, M, K);
    float *c = c_block(A, M, N);
    bf16_t *dec = guarded(A, sizeof(bf16_t) * ((size_t)nr * nc + 1));
    double *want = guarded(A, sizeof(double) * 2 * (size_t)M * N);
    if (A->failed) return out_of_memory(err);
    /* the block at column 1 (odd starts, unaligned groups), then at column 0 (the aligned starts some levels'
     * fused kernels take) */
    double worst = 0;
    for (int c0 = 1; c0 >= 0; c0--) {
        kt_ref_decode_block(&w, 1, 1, nr, c0, nc, dec);
        kt_ref_gemm(trans, M, N, K, a, dec, (size_t)nc, 0, want, want + (size_t)M * N);
        kt_bop b;
        S->bop_prep(S, &w, 1, 1, nr, c0, nc, trans, M, scratch, &b);
        for (int m0 = 0; m0 < M; m0 += S->blk.mc) {
            int m = imin(S->blk.mc, M - m0);
            S->bop_gemm(S, m, a + m0, &b, c + (size_t)m0 * (N + PAD), (size_t)N + PAD);
        }
        double r = compare(c, (size_t)N + PAD, M, N, want, want + (size_t)M * N, 1e-5, 1e-30, slot_names[slot], err);
        if (r < 0 || r > 1.0) return r;
        worst = r > worst ? r : worst;
    }
    return worst;
}

/* The packed-activation NT path (xpack, bop_gemm_px) as the forward uses it: all M rows packed once, the
 * weight block prepared for M rows, GEMM chunks of at most blk.mc rows at their offset in the pack. Levels
 * without xpack, or fewer rows than it takes, have nothing to check. */
static double check_bop_px(const kt_slots *S, int fmt, int M, int N, int K, int group, int block_rows, uint64_t *s,
                           arena *A, char *err) {
    if (!S->xpack || M < S->blk.xpack_min_m) {
        snprintf(err, KT_ERRLEN, "not used at this level for M=%d", M);
        return 0;
    }
    kt_wmat w;
    if (!bop_weights(A, s, fmt, N, K, group, block_rows, &w, err)) return KT_EINVAL;
    size_t bytes = S->bop_bytes(S, &w, KT_NT, N, K, M);
    void *scratch = guarded(A, bytes ? bytes : 1);
    void *px = guarded(A, S->xpack_bytes(M, K));
    const bf16_t **a = a_rows(A, s, M, K);
    float *c = c_block(A, M, N);
    bf16_t *dec = guarded(A, sizeof(bf16_t) * ((size_t)N * K + 1));
    double *want = guarded(A, sizeof(double) * 2 * (size_t)M * N);
    if (A->failed) return out_of_memory(err);
    kt_ref_decode_block(&w, 1, 1, N, 1, K, dec);
    kt_ref_gemm(KT_NT, M, N, K, a, dec, (size_t)K, 0, want, want + (size_t)M * N);
    S->xpack(M, K, a, px);
    kt_bop b;
    S->bop_prep(S, &w, 1, 1, N, 1, K, KT_NT, M, scratch, &b);
    for (int m0 = 0; m0 < M; m0 += S->blk.mc) {
        int m = imin(S->blk.mc, M - m0);
        S->bop_gemm_px(S, m, px, m0, &b, c + (size_t)m0 * (N + PAD), (size_t)N + PAD);
    }
    return compare(c, (size_t)N + PAD, M, N, want, want + (size_t)M * N, 1e-5, 1e-30, "bop_px", err);
}

/* outer: M pairs, R = N output rows, K columns */
static double check_outer(const kt_slots *S, int slot, int M, int R, int K, uint64_t *s, arena *A, char *err) {
    const float *coef = f32_array(A, s, (size_t)M * R, 1.0f);
    const float *x = slot == KT_SLOT_OUTER_F32 ? f32_array(A, s, (size_t)M * K, 1.0f) : NULL;
    const bf16_t **xb = slot == KT_SLOT_OUTER_BF16 ? a_rows(A, s, M, K) : NULL;
    float *out = c_block(A, R, K);
    double *want = guarded(A, sizeof(double) * 2 * (size_t)R * K + 1);
    if (A->failed) return out_of_memory(err);
    for (int j = 0; j < R; j++)
        for (int n = 0; n < K; n++) out[(size_t)j * (K + PAD) + n] = rng_val(s);
    kt_ref_outer(M, R, K, coef, (size_t)R, x, (size_t)K, xb, out, (size_t)K + PAD, want, want + (size_t)R * K);
    if (x)
        S->outer_f32(M, R, K, coef, (size_t)R, x, (size_t)K, out, (size_t)K + PAD);
    else
        S->outer_bf16(M, R, K, coef, (size_t)R, xb, out, (size_t)K + PAD);
    double r = compare(out, (size_t)K + PAD, R, K, want, want + (size_t)R * K, 1e-6, 1e-30, slot_names[slot], err);
    return r;
}

static double check_act(const kt_slots *S, int slot, int n, uint64_t *s, arena *A, char *err) {
    float *g = f32_array(A, s, (size_t)n, 6.0f), *u = f32_array(A, s, (size_t)n, 2.0f);
    float *dhu = f32_array(A, s, (size_t)n, 1.0f);
    bf16_t *gb = bf16_array(A, s, (size_t)n), *ub = bf16_array(A, s, (size_t)n), *h = bf16_array(A, s, (size_t)n);
    float *hf = f32_array(A, s, (size_t)n, 0), *dg = f32_array(A, s, (size_t)n, 0), *du = f32_array(A, s, (size_t)n, 0);
    double *ref = guarded(A, sizeof(double) * 3 * (size_t)n + 1);
    if (A->failed) return out_of_memory(err);
    double worst = 0;
    if (slot == KT_SLOT_ACT_FWD) {
        S->act_fwd(n, g, u, gb, ub, h);
        kt_ref_act_fwd(n, g, u, ref);
        for (int j = 0; j < n; j++) {
            if (gb[j] != kt_round_bf16(g[j]) || ub[j] != kt_round_bf16(u[j])) {
                snprintf(err, KT_ERRLEN, "act_fwd: the saved bf16 g/u at %d are not the rounded inputs", j);
                return INFINITY;
            }
            /* one bf16 rounding of h (at most 2^-8 relative) and the fp32 sigmoid: 2^-7 leaves a factor 2 */
            double r = fabs(bf16_to_f32(h[j]) - ref[j]) / (fabs(ref[j]) * (1.0 / 128) + 1e-30);
            if (!(r <= worst)) worst = isnan(r) ? INFINITY : r;
        }
    } else {
        float w = 0.5f + 0.5f * fabsf(rng_val(s));
        double dw = S->act_bwd(n, gb, ub, dhu, w, hf, dg, du, h, h);
        double dwref = kt_ref_act_bwd(n, gb, ub, dhu, w, ref, ref + n, ref + 2 * (size_t)n), dwmag = 0;
        for (int j = 0; j < n; j++) {
            dwmag += fabs(dhu[j] * ref[j]);
            double rh = fabs(hf[j] - ref[j]) / (fabs(ref[j]) * (1.0 / 128) + 1e-30); /* h is the bf16 of silu(g) u */
            double rg = fabs(dg[j] - ref[n + j]) / (fabs(ref[n + j]) * 1e-5 + 1e-6);
            double ru = fabs(du[j] - ref[2 * n + j]) / (fabs(ref[2 * n + j]) * 1e-5 + 1e-6);
            double r = fmax(rh, fmax(rg, ru));
            if (!(r <= worst)) worst = isnan(r) ? INFINITY : r;
        }
        double r = fabs(dw - dwref) / (dwmag * (1.0 / 256) + 1e-30);
        if (!(r <= worst)) worst = isnan(r) ? INFINITY : r;
    }
    if (worst > 1 && !err[0]) snprintf(err, KT_ERRLEN, "%s outside tolerance (%.3g)", slot_names[slot], worst);
    return worst;
}

/* stream_f32: n values to dst at float offset `off` from a 64-byte boundary, between 16 sentinels before and
 * up to 15 after it (then a guard page); copy = 0 writes zeros. Exact. */
static double check_stream(const kt_slots *S, int off, int n, int copy, uint64_t *s, arena *A, char *err) {
    const float *src = copy ? f32_array(A, s, (size_t)n, 1.0f) : NULL;
    size_t lead = 16, trail = (16 - ((size_t)n + (size_t)off) % 16) % 16; /* the guard page is 64-byte aligned */
    float *buf = guarded(A, sizeof(float) * (lead + (size_t)n + trail));
    if (A->failed) return out_of_memory(err);
    float *dst = buf + lead;
    for (size_t i = 0; i < lead + (size_t)n + trail; i++) buf[i] = i < lead || i >= lead + (size_t)n ? SENTINEL : NAN;
    S->stream_f32(dst, src, (size_t)n);
    for (size_t i = 0; i < lead + (size_t)n + trail; i++) {
        int in = i >= lead && i < lead + (size_t)n;
        float want = in ? (src ? src[i - lead] : 0.f) : SENTINEL;
        if (memcmp(&buf[i], &want, sizeof want)) {
            snprintf(err, KT_ERRLEN, "stream_f32 (%s, n=%d, offset %d) wrong at %td: %g, want %g",
                     src ? "copy" : "zeros", n, off, (ptrdiff_t)i - (ptrdiff_t)lead, buf[i], want);
            return INFINITY;
        }
    }
    return 0;
}

/* The W8A8 quantizer on rows of n values, each given in three segments (uneven, possibly empty) that end at
 * guard pages: random rows of several magnitudes, an all-zero row, a row of exact ties (max 127: sa = 1, values
 * k + 1/2), a row of bf16 denormals and a row with one non-zero value. Codes and scale bit for bit. */
static double check_q8_quant(const kt_slots *S, int n, uint64_t *s, arena *A, char *err) {
    enum { ROWS = 9 };
    int8_t *want = guarded(A, (size_t)n + 1);
    if (!want) return out_of_memory(err);
    double r = 0;
    for (int row = 0; row < ROWS && r == 0; row++) {
        bf16_t *a = guarded(A, sizeof(bf16_t) * (size_t)n);
        if (!a) break;
        float mag = row < 4 ? (float)(1 << (4 * row)) * 1e-3f : 1.0f;
        for (int j = 0; j < n; j++) {
            float v = mag * rng_val(s);
            if (row == 4) v = 0.f;
            if (row == 5) v = j == 0 ? 127.0f : (float)(j % 127) + (j % 2 ? 0.5f : -0.5f) * (j % 3 ? 1.f : -1.f);
            if (row == 6) v = rng_val(s) * 1e-39f;            /* bf16 denormals */
            if (row == 7) v = j == n / 2 ? -3.0f : 0.f;       /* one value: the others are exact zeros */
            if (row == 8) v = rng_val(s) * (j % 5 ? 1.f : 1e4f); /* outliers */
            a[j] = kt_round_bf16(v);
        }
        int len[3] = {n / 3, (n + 1) / 3, 0};
        len[2] = n - len[0] - len[1];
        const bf16_t *seg[3] = {a, a + len[0], a + len[0] + len[1]};
        int8_t *dst[3];
        for (int i = 0; i < 3; i++) dst[i] = guarded(A, (size_t)len[i] + (len[i] == 0));
        if (A->failed) break;
        for (int i = 0; i < 3; i++) dst[i] += len[i] == 0; /* an empty segment's end is its guard page */
        float got = S->q8_quant(3, seg, len, dst);
        float sa = kt_ref_q8_quant(n, a, want);
        if (memcmp(&got, &sa, sizeof sa)) {
            snprintf(err, KT_ERRLEN, "q8_quant row %d: scale %.9g, reference %.9g", row, got, sa);
            r = INFINITY;
        }
        for (int j = 0, i = 0, o = 0; j < n && r == 0; j++, o++) {
            while (o >= len[i]) {
                i++;
                o = 0;
            }
            if (dst[i][o] != want[j]) {
                snprintf(err, KT_ERRLEN, "q8_quant row %d wrong at %d: code %d, reference %d (value %.9g, scale %.9g)",
                         row, j, dst[i][o], want[j], bf16_to_f32(a[j]), sa);
                r = INFINITY;
            }
        }
    }
    if (A->failed) return out_of_memory(err);
    return r;
}

/* The W8A8 product as the algorithm uses it: prep of an N x K block (one row and one column into expert 1's
 * matrix: an odd first column, a high nibble) for M rows, then chunks of at most blk.mc rows. */
static double check_bop_q8(const kt_slots *S, int fmt, int M, int N, int K, uint64_t *s, arena *A, char *err) {
    int cols = round_up(1 + K, 2);
    kt_wmat w;
    if (!make_weights(A, s, fmt, N + 1, cols, cols, 1, &w) || !kt_q8_supported(&w)) {
        snprintf(err, KT_ERRLEN, "bop_q8: no W8A8 view of %s weights (int8, int4, int4_1 with a scale per row)",
                 kt_format_name(fmt));
        return KT_EINVAL;
    }
    size_t bytes = S->bop_q8_bytes(S, &w, N, K, M);
    void *scratch = guarded(A, bytes ? bytes : 1);
    const int8_t **aq = guarded(A, sizeof(int8_t *) * (size_t)M);
    float *sa = f32_array(A, s, (size_t)M, 1.0f);
    if (aq)
        for (int m = 0; m < M; m++) {
            int8_t *row = guarded(A, (size_t)K);
            if (row)
                for (int k = 0; k < K; k++) row[k] = (int8_t)((int)(rng_next(s) % 255) - 127);
            aq[m] = row;
        }
    float *c = c_block(A, M, N);
    double *want = guarded(A, sizeof(double) * 2 * (size_t)M * N);
    if (A->failed) return out_of_memory(err);
    for (int m = 0; m < M; m++) sa[m] = fabsf(sa[m]) + 1e-3f;
    kt_ref_q8_gemm(M, aq, sa, &w, 1, 1, N, 1, K, want, want + (size_t)M * N);
    kt_bop b;
    S->bop_q8_prep(S, &w, 1, 1, N, 1, K, M, scratch, &b);
    for (int m0 = 0; m0 < M; m0 += S->blk.mc) {
        int m = imin(S->blk.mc, M - m0);
        S->bop_q8_gemm(S, m, aq + m0, sa + m0, &b, c + (size_t)m0 * (N + PAD), (size_t)N + PAD);
    }
    /* fp32 epilogue: the int32 -> fp32 conversions and at most three roundings, ~2.4e-7 of mag */
    double r = compare(c, (size_t)N + PAD, M, N, want, want + (size_t)M * N, 1e-6, 1e-30, "bop_q8", err);
    return r;
}

double kt_slot_check(int level, int slot, int fmt, int M, int N, int K, int group, int block_rows, unsigned seed,
                     char *err) {
    err[0] = 0;
    const kt_slots *S = kt_slots_of(level);
    if (!S) {
        char why[160];
        kt_isa_usable(level, why, sizeof why);
        snprintf(err, KT_ERRLEN, "level %s is not usable here: %s", kt_isa_name(level), why);
        return KT_EINVAL;
    }
    if (slot < 0 || slot >= KT_SLOT_COUNT || M < 1 || N < 1 || K < 0 || group < 0 || block_rows < 0 || fmt < 0 ||
        fmt >= KT_W_COUNT) {
        snprintf(err, KT_ERRLEN, "bad case: slot %d fmt %d M=%d N=%d K=%d group=%d block_rows=%d", slot, fmt, M, N, K,
                 group, block_rows);
        return KT_EINVAL;
    }
    if (block_rows > 1 && kt_format_blocks_2d(fmt) != 1) {
        snprintf(err, KT_ERRLEN, "bad case: block_rows=%d for %s, whose scales are per row", block_rows,
                 kt_format_name(fmt));
        return KT_EINVAL;
    }
    if (block_rows == 0) block_rows = 1;
    if (S->thread_init) S->thread_init(); /* the engine does this for its threads; here the caller runs the slot */
    uint64_t s = 0x9e3779b97f4a7c15ull ^ ((uint64_t)seed * 0x2545f4914f6cdd1dull);
    arena *A = calloc(1, sizeof *A);
    if (!A) return out_of_memory(err);
    double r;
    switch (slot) {
    case KT_SLOT_DECODE: r = check_decode(S, fmt, M, K > 0 ? K : 2, group, block_rows, &s, A, err); break;
    case KT_SLOT_BOP_NT:
    case KT_SLOT_BOP_NN: r = check_bop(S, slot, fmt, M, N, K > 0 ? K : 1, group, block_rows, &s, A, err); break;
    case KT_SLOT_OUTER_F32:
    case KT_SLOT_OUTER_BF16: r = check_outer(S, slot, M, N, K, &s, A, err); break;
    case KT_SLOT_ACT_FWD:
    case KT_SLOT_ACT_BWD: r = check_act(S, slot, N, &s, A, err); break;
    case KT_SLOT_Q8_QUANT: r = check_q8_quant(S, N, &s, A, err); break;
    case KT_SLOT_BOP_PX: r = check_bop_px(S, fmt, M, N, K > 0 ? K : 1, group, block_rows, &s, A, err); break;
    case KT_SLOT_BOP_Q8: r = check_bop_q8(S, fmt, M, N, K > 0 ? K : 1, &s, A, err); break;
    case KT_SLOT_STREAM: r = check_stream(S, M - 1, N, K, &s, A, err); break;
    default: r = check_gemm(S, slot, M, N, K, &s, A, err); break;
    }
    arena_free(A);
    free(A);
    return r;
}
