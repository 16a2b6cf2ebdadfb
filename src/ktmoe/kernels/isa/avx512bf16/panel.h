/* The avx512bf16 forward with packed activations (the xpack slots, contract in slots.h), for experts with
 * at least blk.xpack_min_m rows.
 *
 * Why: the forward's products are NT (C = X W^T, W [N, K] rows with K contiguous). The row-block kernels of
 * gemm.h ("dot" form) re-read the activation rows from L2 once per 4 weight rows, and packing W into the
 * vdpbf16ps B layout costs a 16 x 16 transpose per 512 weights, once per use of every weight. Here the roles
 * are swapped: C^T = W X^T, with W the broadcast operand read where it lies (a k pair of a weight row is one
 * dword) and the expert's activation rows packed once per call (xpack, shared by every column block of gate,
 * up, and by the tasks of both threads):
 *
 *   lane group q (16 activation rows), k pair p: 16 dwords, dword i = (X[16q + i][2p], X[16q + i][2p + 1])
 *
 * zero past M and in the upper half of an odd K's last pair. Micro-kernel: MR weight rows x NH lane groups
 * (6 x 4 or 4 x 6: 24 accumulators); per k pair NH panel loads, MR dword broadcasts of W, MR x NH vdpbf16ps.
 * The lane groups of a call are split into balanced operands of at most 6 groups (96 rows), so that an
 * expert with 72 rows is one operand of 80 lanes, not 64 + 16. K runs in chunks (NH x 64 bytes per pair in
 * L1 while every block of weight rows passes over it), the weight rows' next chunk prefetched as they go;
 * C^T is written to C with 16 x 16 transposes. Quantized weights are decoded into bf16 rows first
 * (kt_bop_prep_rows), which this reads like bf16 weights in place.
 */
#ifndef KTMOE_AVX512BF16_PANEL_H
#define KTMOE_AVX512BF16_PANEL_H

#include "../../core/internal.h"
#include "gemm.h"

#include <immintrin.h>

#define KT_PN_AI static inline __attribute__((always_inline))

#define KT_PN_MR 6 /* most weight rows per micro-kernel */

/* ---- packing ---- */

/* 16 rows of 16 dwords -> out[c] = dword c of every row (rows in lanes). */
KT_PN_AI void kt_pn_transpose16(__m512i r[16], __m512i out[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    /* u[4g + i], lane L: dword 4L + i of rows 4g .. 4g + 3 */
    for (int g = 0; g < 4; g++) {
        u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    for (int i = 0; i < 4; i++) {
        __m512i v0 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0x88), v1 = _mm512_shuffle_i32x4(u[i], u[4 + i], 0xDD);
        __m512i w0 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + i], u[12 + i], 0xDD);
        out[i] = _mm512_shuffle_i32x4(v0, w0, 0x88);
        out[8 + i] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
        out[4 + i] = _mm512_shuffle_i32x4(v1, w1, 0x88);
        out[12 + i] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
    }
}

/* M activation rows (bf16 pointers, K values each) -> the pair panel, in lane groups of 16 rows: group q,
 * pair p: 16 dwords, dword i = (A[16q + i][2p], A[16q + i][2p + 1]); zero past M and in the upper half of an
 * odd K's last pair. Any run of consecutive groups is one GEMM operand (up to 6 x 16 activation rows). */
static void kt_px_pack(int M, int K, const bf16_t *const *a, void *dst) {
    const int pairs = (K + 1) / 2;
    for (int m0 = 0; m0 < M; m0 += 16) {
        uint32_t *panel = (uint32_t *)dst + (size_t)(m0 / 16) * pairs * 16;
        const int rows = M - m0 < 16 ? M - m0 : 16;
        for (int k = 0; k < K; k += 32) {
            const __mmask32 mk = kt_mask32(K - k);
            __m512i r[16], o[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < rows ? _mm512_maskz_loadu_epi16(mk, a[m0 + i] + k) : _mm512_setzero_si512();
            kt_pn_transpose16(r, o);
            const int np = pairs - k / 2 < 16 ? pairs - k / 2 : 16;
            for (int c = 0; c < np; c++) _mm512_storeu_si512(panel + (size_t)(k / 2 + c) * 16, o[c]);
        }
    }
}

static size_t kt_px_bytes(int M, int K) { return (size_t)((M + 15) / 16) * (size_t)((K + 1) / 2) * 64; }

/* ---- the micro-kernel: C^T = W X^T ---- */

#define KT_PX_NH 6    /* lane groups per operand: up to 96 activation rows (4 weight rows x 6 = 24 accumulators) */
#define KT_PX_LD 96   /* floats per row of the C^T scratch */

/* ct[i][16j + l] (+)= sum over kp pairs of W row i (broadcast dword) x lane group j's pair dwords (group
 * stride gs dwords), i < MR weight rows, j < NH; odd: one more pair (W[i][K-1], 0) read as a single bf16. */
KT_PN_AI void kt_px_kernel(const int MR, const int NH, int kp, int odd, const bf16_t *const *wr, const uint32_t *pb,
                           size_t gs, float *ct, int accumulate) {
    __m512 acc[KT_PN_MR][KT_PX_NH];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NH; j++) acc[i][j] = _mm512_setzero_ps();
    for (int p = 0; p < kp; p++, pb += 16) {
        __m512i b[KT_PX_NH];
        for (int j = 0; j < NH; j++) b[j] = _mm512_loadu_si512(pb + j * gs);
        for (int i = 0; i < MR; i++) {
            __m512i wv = _mm512_set1_epi32((int)kt_ld32(wr[i] + 2 * p));
            for (int j = 0; j < NH; j++) acc[i][j] = kt_dp(acc[i][j], wv, b[j]);
        }
    }
    if (odd) {
        __m512i b[KT_PX_NH];
        for (int j = 0; j < NH; j++) b[j] = _mm512_loadu_si512(pb + j * gs);
        for (int i = 0; i < MR; i++) {
            __m512i wv = _mm512_set1_epi32((int)(uint32_t)wr[i][2 * kp]);
            for (int j = 0; j < NH; j++) acc[i][j] = kt_dp(acc[i][j], wv, b[j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NH; j++) {
            float *d = ct + (size_t)i * KT_PX_LD + 16 * j;
            _mm512_storeu_ps(d, accumulate ? _mm512_add_ps(acc[i][j], _mm512_loadu_ps(d)) : acc[i][j]);
        }
}

/* Weight rows per block for NH lane groups (24 accumulators at most), and k pairs per chunk (the operand's
 * chunk, NH x 64 bytes per pair, stays in L1). */
#define KT_PX_MR(NH) ((NH) <= 4 ? 6 : 4)
#define KT_PX_KC(NH) ((NH) <= 4 ? 128 : 80)

#define KT_PX_CASE(MR_, NH)                                                                                   \
    case MR_: kt_px_kernel(MR_, NH, full, odd, wr, pb, gs, cti, p0 > 0); break;
#define KT_PX_ROWS(NH)                                                                                         \
    switch (mr) {                                                                                            \
        KT_PX_CASE(1, NH) KT_PX_CASE(2, NH) KT_PX_CASE(3, NH) KT_PX_CASE(4, NH) KT_PX_CASE(5, NH)            \
        default: kt_px_kernel(KT_PX_MR(NH), NH, full, odd, wr, pb, gs, cti, p0 > 0); break;                 \
    }

/* C[M, N] = X W^T, X given as the pair panel px (M rows), W as N bf16 rows of K values (stride ldw); ct:
 * N x KT_PX_LD floats of scratch. The lane groups are split into balanced operands of at most 6 groups;
 * per operand: K chunks outer, balanced blocks of weight rows inner (each prefetching its rows' next chunk
 * on the first operand: the weights come from memory once), then ct is written to C transposed. */
static void kt_px_gemm(int M, int N, int K, const void *px, const bf16_t *w, size_t ldw, float *ct, float *c,
                       size_t ldc) {
    if (M <= 0 || N <= 0) return;
    const int pairs = (K + 1) / 2, Q = (M + 15) / 16, nops = (Q + KT_PX_NH - 1) / KT_PX_NH;
    const size_t gs = (size_t)pairs * 16;
    const bf16_t *wr[KT_PN_MR];
    for (int n = 0; n < N; n++) { /* the first chunk of every weight row at once: many misses in flight */
        const char *q = (const char *)(w + (size_t)n * ldw);
        const int bytes = 4 * (pairs < KT_PX_KC(KT_PX_NH) ? pairs : KT_PX_KC(KT_PX_NH));
        for (int off = 0; off < bytes; off += 64) _mm_prefetch(q + off, _MM_HINT_T1);
    }
    for (int op = 0, q0 = 0; op < nops; op++) {
        const int nh = (Q - q0 + (nops - op) - 1) / (nops - op), m0 = 16 * q0;
        const int mg = M - m0 < 16 * nh ? M - m0 : 16 * nh;
        const int MRX = KT_PX_MR(nh), KC = KT_PX_KC(nh), nblk = (N + MRX - 1) / MRX;
        const uint32_t *pg = (const uint32_t *)px + (size_t)q0 * gs;
        int p0 = 0;
        do {
            const int kp = pairs - p0 < KC ? pairs - p0 : KC;
            const int last = p0 + kp == pairs, odd = last && (K & 1), full = odd ? kp - 1 : kp;
            const int pfk = last ? 0 : (pairs - p0 - kp < KC ? pairs - p0 - kp : KC); /* the next chunk */
            const uint32_t *pb = pg + (size_t)p0 * 16;
            for (int n = 0, blk = 0; n < N; blk++) {
                const int mr = (N - n + (nblk - blk) - 1) / (nblk - blk);
                for (int i = 0; i < mr; i++) wr[i] = w + (size_t)(n + i) * ldw + 2 * p0;
                if (op == 0 && pfk)
                    for (int i = 0; i < mr; i++) {
                        const char *q = (const char *)(wr[i] + 2 * kp);
                        for (int off = 0; off < 4 * pfk; off += 64) _mm_prefetch(q + off, _MM_HINT_T1);
                    }
                float *cti = ct + (size_t)n * KT_PX_LD;
                switch (nh) {
                case 1: KT_PX_ROWS(1) break;
                case 2: KT_PX_ROWS(2) break;
                case 3: KT_PX_ROWS(3) break;
                case 4: KT_PX_ROWS(4) break;
                case 5: KT_PX_ROWS(5) break;
                default: KT_PX_ROWS(6) break;
                }
                n += mr;
            }
            p0 += kp;
        } while (p0 < pairs);
        for (int n0 = 0; n0 < N; n0 += 16) { /* ct [N][16 nh] -> C rows m0 + i, 16 x 16 blocks */
            const int nn = N - n0 < 16 ? N - n0 : 16;
            const __mmask16 mk = kt_mask16(nn);
            for (int j = 0; j < nh; j++) {
                __m512i r[16], o[16];
                for (int q = 0; q < 16; q++)
                    r[q] = q < nn ? _mm512_loadu_si512(ct + (size_t)(n0 + q) * KT_PX_LD + 16 * j)
                                  : _mm512_setzero_si512();
                kt_pn_transpose16(r, o);
                const int rows = mg - 16 * j < 16 ? mg - 16 * j : 16;
                for (int i = 0; i < rows; i++)
                    _mm512_mask_storeu_ps(c + (size_t)(m0 + 16 * j + i) * ldc + n0, mk, _mm512_castsi512_ps(o[i]));
            }
        }
        q0 += nh;
    }
}
#undef KT_PX_ROWS
#undef KT_PX_CASE

/* ---- the slots ---- */

/* The NT weight operand as rows (kt_bop_*_rows) plus, after it, the C^T scratch of kt_px_gemm. */
static size_t kt_px_rows_bytes(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m) {
    return (kt_bop_bytes_rows(S, w, trans, nr, nc, m) + 63) & ~(size_t)63;
}

static size_t kt_px_bop_bytes(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m) {
    size_t rows = kt_px_rows_bytes(S, w, trans, nr, nc, m);
    return trans == KT_NT && m >= S->blk.xpack_min_m ? rows + sizeof(float) * (size_t)nr * KT_PX_LD + 64 : rows;
}

static void kt_px_bop_prep(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans,
                           int m, void *scratch, kt_bop *b) {
    kt_bop_prep_rows(S, w, e, r0, nr, c0, nc, trans, m, scratch, b);
    if (trans == KT_NT && m >= S->blk.xpack_min_m)
        b->work = (char *)scratch + kt_px_rows_bytes(S, w, trans, nr, nc, m);
}

static void kt_px_bop_gemm(const kt_slots *S, int M, const void *px, int m0, const kt_bop *b, float *c, size_t ldc) {
    (void)S;
    const char *at = (const char *)px + kt_px_bytes(m0, b->K); /* m0 is a multiple of 16 */
    kt_px_gemm(M, b->N, b->K, at, b->w, b->ld, (float *)b->work, c, ldc);
}

#undef KT_PN_AI

#endif
