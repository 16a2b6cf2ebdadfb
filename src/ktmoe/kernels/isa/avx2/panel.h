/* The avx2 packed-panel GEMM (the bop_* slots, contract in slots.h), for blocks used by at least
 * blk.pack_min_m rows; fewer rows take the in-place kernels of gemm.h (kt_bop_*_rows).
 *
 * Why: the in-place kernels convert bf16 inside the inner loop (shift/mask ops compete with the FMAs for the
 * vector pipes), and the NN products read 32 bytes per weight row of a block whose rows lie a matrix row apart
 * (4 KB for H = 2048: every row in the same L1 set). Measured on Zen 3 they reach 20-30% of the FMA peak.
 *
 * Layout (BLIS style): the weight block, decoded if quantized, is packed once per block into fp32 panels of
 * 16 output columns, panel j = [K][16] (column n of C at lane n % 16 of panel n / 16), zero past N. NT blocks
 * (rows = outputs, K contiguous) are transposed 8 x 8 on the way; NN blocks (rows = k) are widened row by
 * row. INT8 / INT4 / INT4_1 codes are decoded 8 at a time straight into those vectors (an fp32 row buffer
 * in between, 128 KB per 16 rows of H = 2048, went through L2 and back: Zen 3, T=1024, one process, the
 * quantized steps 1.10-1.12x BF16's time before, 0.98-1.04x after). bop_gemm converts the rows of A to fp32
 * per chunk of KT2_KC values of k, then runs the micro-kernel, 6 rows x 16 columns = 12 accumulators, per
 * k: 2 panel loads, 6 broadcasts of A, 12 FMAs. Panels outer (a
 * panel's chunk, 16 KB, stays in L1 while every row block passes over it), row blocks inner. The first chunk
 * of k overwrites C, the later ones accumulate. While it runs, it prefetches the rows of the block the stage
 * names as next (kt_bop.next), a few per micro-kernel call: NN blocks are rows a matrix row apart, which
 * from memory cost more than the widening (Zen 3: a 2048 x 128 bf16 block packed in 160 us from memory,
 * 51 us from cache). */
#ifndef KTMOE_AVX2_PANEL_H
#define KTMOE_AVX2_PANEL_H

#include "../../core/internal.h"
#include "qdot.h"

#define KT2_PN 16         /* columns per panel */
#define KT2_MR 6          /* rows per micro-kernel */
#define KT2_KC 256        /* values of k per chunk of A */
#define KT2_DEC_ROWS 16   /* blocks of formats decoded to bf16 rows first: this many rows at a time */
#ifndef KT2_PACK_PF
#define KT2_PACK_PF 8     /* rows ahead the NN packing prefetches */
#endif

static size_t kt2_round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* r[t] = row t (8 values) -> r[t] = column t (value t of every row). */
KT2_AI void kt2_transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* NT: nrows <= 16 bf16 output rows of K values (stride ld) -> one panel [K][16], zero past nrows. */
KT2_AI void kt2_pack_nt(const bf16_t *src, size_t ld, int nrows, int K, float *P) {
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int h = 0; h < 2; h++) {
            __m256 v[8];
            for (int t = 0; t < 8; t++) {
                int row = 8 * h + t;
                v[t] = row < nrows ? kt2_widen8(src + (size_t)row * ld + k) : _mm256_setzero_ps();
            }
            kt2_transpose8(v);
            for (int t = 0; t < 8; t++) _mm256_store_ps(P + (size_t)(k + t) * KT2_PN + 8 * h, v[t]);
        }
    for (; k < K; k++)
        for (int row = 0; row < KT2_PN; row++)
            P[(size_t)k * KT2_PN + row] = row < nrows ? kt_bf(src[(size_t)row * ld + k]) : 0.f;
}

/* NN: nk rows (values k0 .. k0 + nk of k) of N columns (stride ld) -> those rows of every panel. bf16 rows
 * (weights in place, a matrix row apart: memory latency, not the widening, was most of the packing time) are
 * prefetched KT2_PACK_PF rows ahead, up to row K - k0 of src. */
KT2_AI void kt2_pack_nn(const bf16_t *src, size_t ld, int nk, int k0, int N, int K, float *panel) {
    for (int k = 0; k < nk; k++) {
        const size_t row = (size_t)k * ld;
        if (k0 + k + KT2_PACK_PF < K)
            for (int n = 0; n < N; n += 32) _mm_prefetch((const char *)(src + row + (size_t)KT2_PACK_PF * ld + n), _MM_HINT_T0);
        int j = 0;
        for (; (j + 1) * KT2_PN <= N; j++) {
            float *d = panel + ((size_t)j * K + k0 + k) * KT2_PN;
            _mm256_store_ps(d, kt2_widen8(src + row + (size_t)j * KT2_PN));
            _mm256_store_ps(d + 8, kt2_widen8(src + row + (size_t)j * KT2_PN + 8));
        }
        if (j * KT2_PN < N) {
            float *d = panel + ((size_t)j * K + k0 + k) * KT2_PN;
            for (int n = 0; n < KT2_PN; n++)
                d[n] = j * KT2_PN + n < N ? kt_bf(src[row + (size_t)j * KT2_PN + n]) : 0.f;
        }
    }
}

/* ---- quantized blocks decoded on the way into the panels (INT8 / INT4 / INT4_1: no fp32 row buffer) ---- */

/* One row's decoder inside one scale block: INT8 its scale (lo), INT4 / INT4_1 the block's 16 values. */
typedef struct { __m256 lo, hi; size_t si, at; } kt2_qrow;
KT2_AI void kt2_qrow_open(const int q8, const kt_wmat *w, int e, int row, int col, kt2_qrow *d) {
    d->si = kt_scale_index(w, e, row, col);
    d->at = kt_code_index(w, e, row, col);
    if (q8)
        d->lo = _mm256_set1_ps(w->scale[d->si]);
    else
        kt2_q4_table(w, d->si, &d->lo, &d->hi);
}
/* values j .. j + 8 of the run */
KT2_AI __m256 kt2_qrow_dec8(const int q8, const kt_wmat *w, const kt2_qrow *d, int j) {
    return q8 ? kt2_q8_dec8((const int8_t *)w->data + d->at + j, d->lo)
              : kt2_q4_dec8((const uint8_t *)w->data, d->at + j, d->lo, d->hi);
}

/* NT: block rows [r, r + nrows) (nrows <= 16), view columns [c0, c0 + K) of expert e -> one panel [K][16]. */
KT2_AI void kt2_pack_nt_q(const int q8, const kt_wmat *w, int e, int r, int nrows, int c0, int K, float *P) {
    for (int k0 = 0; k0 < K;) {
        const int len = kt2_run_len(w, c0, k0, K);
        kt2_qrow d[KT2_PN];
        for (int t = 0; t < nrows; t++) kt2_qrow_open(q8, w, e, w->row0 + r + t, w->col0 + c0 + k0, &d[t]);
        int k = 0;
        for (; k + 8 <= len; k += 8)
            for (int h = 0; h < 2; h++) {
                __m256 v[8];
                for (int t = 0; t < 8; t++)
                    v[t] = 8 * h + t < nrows ? kt2_qrow_dec8(q8, w, &d[8 * h + t], k) : _mm256_setzero_ps();
                kt2_transpose8(v);
                for (int t = 0; t < 8; t++) _mm256_store_ps(P + (size_t)(k0 + k + t) * KT2_PN + 8 * h, v[t]);
            }
        for (; k < len; k++)
            for (int row = 0; row < KT2_PN; row++)
                P[(size_t)(k0 + k) * KT2_PN + row] = row < nrows ? kt2_q_dec1(w, d[row].si, d[row].at + k) : 0.f;
        k0 += len;
    }
}

/* NN: block rows [r, r + nk) (values k0 .. k0 + nk of k), view columns [c0, c0 + N) -> those rows of every
 * panel, zero past N; rows a matrix row apart, prefetched KT2_PACK_PF ahead (up to row K - k0 of the block). */
KT2_AI void kt2_pack_nn_q(const int q8, const kt_wmat *w, int e, int r, int nk, int k0, int c0, int N, int K,
                          float *panel) {
    const int bits = kt_format_bits(w->fmt);
    for (int k = 0; k < nk; k++) {
        const int row = w->row0 + r + k;
        if (k0 + k + KT2_PACK_PF < K) kt_prefetch_wrow(w, bits, e, row + KT2_PACK_PF, w->col0 + c0, N);
        float *base = panel + (size_t)(k0 + k) * KT2_PN; /* + (n / 16) * K * 16 + n % 16 for column n */
        for (int n0 = 0; n0 < N;) {
            const int len = kt2_run_len(w, c0, n0, N);
            kt2_qrow d;
            kt2_qrow_open(q8, w, e, row, w->col0 + c0 + n0, &d);
            int j = 0;
            for (; j + 8 <= len; j += 8) {
                const int n = n0 + j;
                const __m256 v = kt2_qrow_dec8(q8, w, &d, j);
                if ((n & 7) == 0) {
                    _mm256_store_ps(base + (size_t)(n / KT2_PN) * K * KT2_PN + n % KT2_PN, v);
                } else { /* a run that starts off the 8-column grid (a group that is not a multiple of 8) */
                    float t[8];
                    _mm256_storeu_ps(t, v);
                    for (int i = 0; i < 8; i++) base[(size_t)((n + i) / KT2_PN) * K * KT2_PN + (n + i) % KT2_PN] = t[i];
                }
            }
            for (; j < len; j++) {
                const int n = n0 + j;
                base[(size_t)(n / KT2_PN) * K * KT2_PN + n % KT2_PN] = kt2_q_dec1(w, d.si, d.at + j);
            }
            n0 += len;
        }
        for (int n = N; n % KT2_PN; n++) base[(size_t)(n / KT2_PN) * K * KT2_PN + n % KT2_PN] = 0.f;
    }
}

/* ---- the micro-kernel: C[MR][16] (=, +=) A[MR][kc] P[kc][16] ---- */

KT2_AI void kt2_micro(const int MR, int kc, const float *af, const float *P, float *c, size_t ldc, int first) {
    __m256 acc[KT2_MR][2];
    for (int i = 0; i < MR; i++) {
        acc[i][0] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + (size_t)i * ldc);
        acc[i][1] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(c + (size_t)i * ldc + 8);
    }
    for (int k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(P + (size_t)k * KT2_PN), b1 = _mm256_load_ps(P + (size_t)k * KT2_PN + 8);
        for (int i = 0; i < MR; i++) {
            __m256 av = _mm256_broadcast_ss(af + (size_t)i * KT2_KC + k);
            acc[i][0] = _mm256_fmadd_ps(av, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(av, b1, acc[i][1]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(c + (size_t)i * ldc, acc[i][0]);
        _mm256_storeu_ps(c + (size_t)i * ldc + 8, acc[i][1]);
    }
}

static void kt2_micro_mr(int mr, int kc, const float *af, const float *P, float *c, size_t ldc, int first) {
    switch (mr) {
    case 1: kt2_micro(1, kc, af, P, c, ldc, first); break;
    case 2: kt2_micro(2, kc, af, P, c, ldc, first); break;
    case 3: kt2_micro(3, kc, af, P, c, ldc, first); break;
    case 4: kt2_micro(4, kc, af, P, c, ldc, first); break;
    case 5: kt2_micro(5, kc, af, P, c, ldc, first); break;
    default: kt2_micro(6, kc, af, P, c, ldc, first); break;
    }
}

/* A panel of fewer than 16 columns goes through a 16-wide tile: C is written only inside [0, N). */
static void kt2_micro_edge(int mr, int kc, const float *af, const float *P, float *c, size_t ldc, int first,
                           int ncol) {
    float t[KT2_MR * KT2_PN];
    for (int i = 0; i < mr; i++)
        for (int n = 0; n < KT2_PN; n++) t[i * KT2_PN + n] = first || n >= ncol ? 0.f : c[(size_t)i * ldc + n];
    kt2_micro_mr(mr, kc, af, P, t, KT2_PN, first);
    for (int i = 0; i < mr; i++) memcpy(c + (size_t)i * ldc, t + i * KT2_PN, sizeof(float) * (size_t)ncol);
}

/* ---- the slots ---- */

static size_t kt2_panel_bytes(int N, int K) {
    return kt2_round64(sizeof(float) * (size_t)((N + KT2_PN - 1) / KT2_PN) * KT2_PN * (size_t)K);
}

/* Small forward products on INT8 / INT4 / INT4_1 take the fused kernel (qdot.h), as the NN ones take
 * qdot_small through the default slots. */
static int kt2_fused_nt(const kt_slots *S, const kt_wmat *w, int trans, int m) {
    return trans == KT_NT && kt2_decodes(w->fmt) && m <= S->blk.fused_max_m[w->fmt] && m <= KT2_QNT_MAX_M;
}

static size_t kt2_bop_bytes(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m) {
    if (kt2_fused_nt(S, w, trans, m)) return kt2_qnt_bytes(imin(m, S->blk.mc), nc);
    if (m < S->blk.pack_min_m) return kt_bop_bytes_rows(S, w, trans, nr, nc, m);
    int N = trans == KT_NT ? nr : nc, K = trans == KT_NT ? nc : nr;
    /* formats decoded to bf16 rows first (INT8 / INT4 / INT4_1 decode straight into the panels) */
    size_t dec = w->fmt == KT_W_BF16 || kt2_decodes(w->fmt) ? 0 : kt2_round64(sizeof(bf16_t) * KT2_DEC_ROWS * (size_t)nc);
    size_t apack = sizeof(float) * (size_t)S->blk.mc * KT2_KC;
    return 64 + kt2_panel_bytes(N, K) + apack + dec;
}

static void kt2_bop_prep(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans,
                         int m, void *scratch, kt_bop *b) {
    if (!kt2_fused_nt(S, w, trans, m) && m < S->blk.pack_min_m) {
        kt_bop_prep_rows(S, w, e, r0, nr, c0, nc, trans, m, scratch, b);
        return;
    }
    if (kt2_fused_nt(S, w, trans, m)) {
        kt_bop_open_fused(b, w, trans, e, r0, nr, c0, nc, scratch);
        return;
    }
    kt_bop_open(b, KT_BOP_PANEL, trans, e, r0, nr, c0, nc);
    const int N = b->N, K = b->K;
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *panel = (float *)p;
    b->panel = panel;
    p += kt2_panel_bytes(N, K);
    b->work = p;
    p += sizeof(float) * (size_t)S->blk.mc * KT2_KC;
    /* bf16 is packed where it lies, INT8 / INT4 / INT4_1 are decoded on the way into the panels, other
     * formats are decoded to bf16 rows first */
    const int bf = w->fmt == KT_W_BF16, q8 = w->fmt == KT_W_INT8;
    if (kt2_decodes(w->fmt)) {
        for (int i = 0; i < nr; i += KT2_PN) {
            const int rows = imin(KT2_PN, nr - i);
            float *pj = panel + (size_t)(i / KT2_PN) * K * KT2_PN;
            if (trans == KT_NT && q8)
                kt2_pack_nt_q(1, w, e, r0 + i, rows, c0, K, pj);
            else if (trans == KT_NT)
                kt2_pack_nt_q(0, w, e, r0 + i, rows, c0, K, pj);
            else if (q8)
                kt2_pack_nn_q(1, w, e, r0 + i, rows, i, c0, N, K, panel);
            else
                kt2_pack_nn_q(0, w, e, r0 + i, rows, i, c0, N, K, panel);
        }
        return;
    }
    const bf16_t *inplace =
        bf ? (const bf16_t *)w->data + ((size_t)e * w->rows + (size_t)(w->row0 + r0)) * w->cols + w->col0 + c0 : NULL;
    for (int i = 0; i < nr; i += KT2_DEC_ROWS) { /* the block's rows, KT2_DEC_ROWS at a time */
        int rows = imin(KT2_DEC_ROWS, nr - i);
        const bf16_t *src = inplace ? inplace + (size_t)i * w->cols : (const bf16_t *)p;
        size_t ld = inplace ? (size_t)w->cols : (size_t)nc;
        if (!bf) kt_decode_block(S, w, e, r0 + i, rows, c0, nc, (bf16_t *)p);
        if (trans == KT_NT)
            kt2_pack_nt(src, ld, rows, K, panel + (size_t)(i / KT2_PN) * K * KT2_PN);
        else
            kt2_pack_nn(src, ld, rows, i, N, K, panel);
    }
}

/* rows [0, M) of A (bf16) against a packed block: C = A W^T (NT) or A W (NN), M <= blk.mc */
static void kt2_bop_gemm(const kt_slots *S, int M, const bf16_t *const *a, const kt_bop *b, float *c, size_t ldc) {
    if (b->kind == KT_BOP_FUSED && b->trans == KT_NT) {
        kt2_qdot_nt(M, b->N, b->K, a, b->src, b->e, b->r0, b->c0, b->work, c, ldc);
        return;
    }
    if (b->kind != KT_BOP_PANEL) {
        kt_bop_gemm_rows(S, M, a, b, c, ldc);
        return;
    }
    const int N = b->N, K = b->K, np = (N + KT2_PN - 1) / KT2_PN;
    if (M <= 0 || N <= 0) return;
    if (K == 0) {
        for (int i = 0; i < M; i++) memset(c + (size_t)i * ldc, 0, sizeof(float) * (size_t)N);
        return;
    }
    float *af = b->work;
    const float *panel = b->panel;
    /* the next block's rows, spread over the micro-kernel calls (b->next) */
    const int calls = (K + KT2_KC - 1) / KT2_KC * np * ((M + KT2_MR - 1) / KT2_MR);
    const int pf_rows = b->next.nr > 0 ? (b->next.nr + calls - 1) / calls : 0;
    int pf_at = 0;
    for (int k0 = 0; k0 < K; k0 += KT2_KC) {
        const int kc = imin(KT2_KC, K - k0), first = k0 == 0;
        for (int i = 0; i < M; i++) { /* A rows to fp32 */
            const bf16_t *ai = a[i] + k0;
            float *fi = af + (size_t)i * KT2_KC;
            int k = 0;
            for (; k + 8 <= kc; k += 8) _mm256_store_ps(fi + k, kt2_widen8(ai + k));
            for (; k < kc; k++) fi[k] = kt_bf(ai[k]);
        }
        for (int j = 0; j < np; j++) {
            const float *P = panel + ((size_t)j * K + k0) * KT2_PN;
            const int ncol = imin(KT2_PN, N - j * KT2_PN);
            for (int i0 = 0; i0 < M; i0 += KT2_MR) {
                const int mr = imin(KT2_MR, M - i0);
                float *ci = c + (size_t)i0 * ldc + (size_t)j * KT2_PN;
                const float *ai = af + (size_t)i0 * KT2_KC;
                if (pf_rows) {
                    kt_prefetch_wblock(&b->next, pf_at, pf_at + pf_rows);
                    pf_at += pf_rows;
                }
                if (ncol == KT2_PN)
                    kt2_micro_mr(mr, kc, ai, P, ci, ldc, first);
                else
                    kt2_micro_edge(mr, kc, ai, P, ci, ldc, first, ncol);
            }
        }
    }
}

#endif
