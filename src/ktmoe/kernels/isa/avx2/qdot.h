/* Quantized weights at the avx2 level: INT8, INT4 and INT4_1 codes decoded straight to fp32 (8 at a time),
 * and the small-M products that use it without writing a decoded block to memory.
 *
 * Values are exactly the bf16 values the decode slots produce (formats/decode.h): INT8 bf16(s * q), INT4 /
 * INT4_1 bf16(fma(s, n, off)) looked up in a 16-entry table per scale block (two 8-entry vpermps and a
 * blend on bit 3 of the nibble). Scales are finite (checked when weights are loaded), so the vector round
 * to bf16 needs no NaN case.
 *
 * Why: below blk.pack_min_m rows (small batches, bandwidth-bound), the default path decodes a whole block to
 * bf16 in scratch and reads it back; measured on Zen 3 that made INT8 and INT4 ~2x *slower* than BF16 at
 * T = 16 although they read 1/2 and 1/4 of the bytes. Up to KT2_QREG_MAX_M activation rows, the codes are
 * decoded in registers next to their FMAs (again for each block of 3 rows, from L1); from there on (blk.fused_max_m)
 * a few rows of weights are decoded into an L1-resident fp32 tile once and consumed by every row:
 *   NT (forward, C = A W^T): registers: 4 weight rows x 8 (INT8) or 16 (INT4) values of k per step; tile: 4
 *     weight rows x a chunk of k; dot products of up to 3 activation rows (12 accumulators), summed
 *     horizontally at the end of the row;
 *   NN (backward, the qdot_small slot, C = A W): registers: 4 weight rows x 8 columns per step, applied to
 *     every row of C; tile: up to 8 weight rows x a strip of columns, axpy blocks of 3 activation rows x 32
 *     columns.
 * Without a bf16 or int8 dot instruction every weight costs a decode (INT8: a convert, a multiply and a
 * rounding; INT4: two table lookups and a blend per 16 values) before its FMA, so at AVX2 the quantized
 * formats run at about BF16's speed at small T, not at their bytes' (Zen 3, T = 16: INT8 / INT4 ~1.0x). */
#ifndef KTMOE_AVX2_QDOT_H
#define KTMOE_AVX2_QDOT_H

#include "../../core/internal.h"
#include "../../formats/decode.h"
#include "gemm.h"

#define KT2_QPFD 8 /* rows ahead whose codes the NN decode prefetches (rows lie a matrix row apart) */

static int kt2_decodes(int fmt) { return fmt == KT_W_INT8 || fmt == KT_W_INT4 || fmt == KT_W_INT4_1; }

KT2_AI __m256 kt2_round_bf16(__m256 x) {
    __m256i u = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* The 8 nibbles from nibble index `at` of q, nibble i in bits 4i .. 4i + 3 (reads only the bytes they lie in). */
static inline uint32_t kt2_nibbles8(const uint8_t *q, size_t at) {
    const uint8_t *b = q + (at >> 1);
    uint32_t v;
    memcpy(&v, b, 4);
    return (at & 1) ? (v >> 4) | ((uint32_t)b[4] << 28) : v;
}

/* 8 INT8 codes -> bf16(s * q) as fp32 */
KT2_AI __m256 kt2_q8_dec8(const int8_t *q, __m256 vs) {
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
    return kt2_round_bf16(_mm256_mul_ps(vs, _mm256_cvtepi32_ps(v)));
}

static inline float kt2_q8_dec1(float s, int8_t q) { return kt_bf(kt_round_bf16(s * (float)q)); }

/* The nibble offset of scale block si: INT4 codes are centred on 8, INT4_1 has its own zero */
static inline float kt2_q4_off(const kt_wmat *w, size_t si) {
    return w->fmt == KT_W_INT4 ? -8.0f * w->scale[si] : w->zero[si];
}

static inline float kt2_q4_dec1(const uint8_t *q, size_t at, float s, float off) {
    return kt_bf(kt_round_bf16(__builtin_fmaf(s, (float)((q[at >> 1] >> ((at & 1) * 4)) & 15), off)));
}

/* The 16 values of scale block si: nibbles 0..7 in *lo, 8..15 in *hi */
KT2_AI void kt2_q4_table(const kt_wmat *w, size_t si, __m256 *lo, __m256 *hi) {
    const __m256 vs = _mm256_set1_ps(w->scale[si]), voff = _mm256_set1_ps(kt2_q4_off(w, si));
    *lo = kt2_round_bf16(_mm256_fmadd_ps(vs, _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), voff));
    *hi = kt2_round_bf16(_mm256_fmadd_ps(vs, _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15), voff));
}

/* 8 nibbles from nibble index at -> their table values */
KT2_AI __m256 kt2_q4_dec8(const uint8_t *q, size_t at, __m256 lo, __m256 hi) {
    const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
    __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)kt2_nibbles8(q, at)), shifts),
                                   _mm256_set1_epi32(15));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* One value of scale block si at code index at (the tails) */
static inline float kt2_q_dec1(const kt_wmat *w, size_t si, size_t at) {
    if (w->fmt == KT_W_INT8) return kt2_q8_dec1(w->scale[si], ((const int8_t *)w->data)[at]);
    return kt2_q4_dec1((const uint8_t *)w->data, at, w->scale[si], kt2_q4_off(w, si));
}

/* n values of one scale block: row `row`, columns [col, col + n) of expert e (absolute coordinates) -> fp32. */
static void kt2_dec_run(const kt_wmat *w, int e, int row, int col, int n, float *d) {
    const size_t si = kt_scale_index(w, e, row, col), at = kt_code_index(w, e, row, col);
    const float s = w->scale[si];
    int j = 0;
    if (w->fmt == KT_W_INT8) {
        const int8_t *q = (const int8_t *)w->data + at;
        const __m256 vs = _mm256_set1_ps(s);
        for (; j + 8 <= n; j += 8) _mm256_storeu_ps(d + j, kt2_q8_dec8(q + j, vs));
        for (; j < n; j++) d[j] = kt2_q8_dec1(s, q[j]);
        return;
    }
    const float off = kt2_q4_off(w, si);
    const uint8_t *q = (const uint8_t *)w->data;
    __m256 lo, hi;
    kt2_q4_table(w, si, &lo, &hi);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(d + j, kt2_q4_dec8(q, at + j, lo, hi));
    for (; j < n; j++) d[j] = kt2_q4_dec1(q, at + j, s, off);
}

/* The run [k0, k0 + len) of view columns c0 + k0 .. that lies in one scale block (shared by every row). */
static inline int kt2_run_len(const kt_wmat *w, int c0, int k0, int K) {
    int col = w->col0 + c0 + k0, len = (col / w->group + 1) * w->group - col;
    return len < K - k0 ? len : K - k0;
}

/* Row r, columns [c, c + n) of expert e, view coordinates, any number of scale blocks -> fp32. */
static void kt2_dec_row(const kt_wmat *w, int e, int r, int c, int n, float *d) {
    for (int j = 0; j < n;) {
        const int len = kt2_run_len(w, c, j, n);
        kt2_dec_run(w, e, w->row0 + r, w->col0 + c + j, len, d + j);
        j += len;
    }
}

static void kt2_prefetch_row(const kt_wmat *w, int e, int r, int c, int n) {
    kt_prefetch_wrow(w, kt_format_bits(w->fmt), e, w->row0 + r, w->col0 + c, n);
}

/* ---- NT: C[i][n] = sum_k A_i[k] W[r0 + n][c0 + k], M <= KT2_QNT_MAX_M, up to 3 rows per block ---- */

#define KT2_QKC 512 /* values of k per tile */

KT2_AI void kt2_qnt_block(const int MR, const int NR, int kc, const float *af, size_t lda, const float *t,
                          __m256 (*accp)[4]) {
    __m256 acc[3][4]; /* a local copy: __m256 may alias the float loads, which would keep accp in memory */
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = accp[i][j];
    for (int k = 0; k + 8 <= kc; k += 8) {
        __m256 a[3];
        for (int i = 0; i < MR; i++) a[i] = _mm256_loadu_ps(af + (size_t)i * lda + k);
        for (int j = 0; j < NR; j++) {
            __m256 b = _mm256_loadu_ps(t + (size_t)j * KT2_QKC + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) accp[i][j] = acc[i][j];
}

#define KT2_QNT_CASE(MR_, NR_) kt2_qnt_block(MR_, NR_, kc, af, lda, t, acc)

static void kt2_qnt_rows(int mr, int nr, int kc, const float *af, size_t lda, const float *t, __m256 (*acc)[4]) {
    KT2_SWITCH_3X4(mr, nr, KT2_QNT_CASE);
}

#define KT2_QNT_MAX_M 9 /* three blocks of three rows */

/* Scratch of kt2_qdot_nt: the fp32 A rows and the decoded tile. */
static size_t kt2_qnt_bytes(int M, int K) {
    return sizeof(float) * ((size_t)M * (size_t)(K + 16) + 4 * KT2_QKC) + 64;
}

/* The A rows in fp32, each zero-padded to lda floats; split: each full 16 values of k as [8 even k][8 odd k]
 * (the order of the INT4 register path), the rest in order. */
static void kt2_qnt_rows_f32(int M, int K, const bf16_t *const *a, float *af, size_t lda, int split) {
    for (int i = 0; i < M; i++) {
        float *fi = af + (size_t)i * lda;
        int k = 0;
        if (split) {
            for (; k + 16 <= K; k += 16) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(a[i] + k)); /* dword d: k = 2d, 2d + 1 */
                _mm256_storeu_ps(fi + k, kt2_even(v));
                _mm256_storeu_ps(fi + k + 8, kt2_odd(v));
            }
        } else {
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(fi + k, kt2_widen8(a[i] + k));
        }
        for (; k < K; k++) fi[k] = kt_bf(a[i][k]);
        for (; k < (int)lda; k++) fi[k] = 0.f;
    }
}

static void kt2_qdot_nt_tile(int M, int N, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0,
                             int c0, float *t, float *c, size_t ldc) {
    const int nmb = (M + 2) / 3;
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int nr = imin(4, N - n0);
        __m256 acc[3][3][4]; /* [row block][row][weight row] */
        for (int b = 0; b < 3; b++)
            for (int i = 0; i < 3; i++)
                for (int j = 0; j < 4; j++) acc[b][i][j] = _mm256_setzero_ps();
        for (int k0 = 0; k0 < K; k0 += KT2_QKC) {
            const int kc = imin(KT2_QKC, K - k0), kc8 = (kc + 7) & ~7;
            for (int j = 0; j < nr; j++) {
                float *tj = t + (size_t)j * KT2_QKC;
                kt2_dec_row(w, e, r0 + n0 + j, c0 + k0, kc, tj);
                for (int k = kc; k < kc8; k++) tj[k] = 0.f;
            }
            for (int m = 0, blk = 0; m < M; blk++) {
                const int mr = (M - m + (nmb - blk) - 1) / (nmb - blk); /* balanced: 4 -> 2 + 2 */
                kt2_qnt_rows(mr, nr, kc8, af + (size_t)m * lda + k0, lda, t, acc[blk]);
                m += mr;
            }
        }
        for (int m = 0, blk = 0; m < M; blk++) {
            const int mr = (M - m + (nmb - blk) - 1) / (nmb - blk);
            for (int i = 0; i < mr; i++)
                for (int j = 0; j < nr; j++) c[(size_t)(m + i) * ldc + n0 + j] = kt2_hsum(acc[blk][i][j]);
            m += mr;
        }
    }
}

/* ---- NT in registers (blocks of up to 3 activation rows): each 8 (INT8) or 16 (INT4) codes decoded next to
 * their FMAs. Measured on Zen 3 (one thread, Qwen3 gate/up rows, M = 1): 2x the tile path for INT8, 2.7x for
 * INT4; Mixtral at T = 16 (4 rows per expert, 2 threads) still faster than the tile path, which decodes once
 * for all rows. ---- */

#define KT2_QNT_REG_M 3 /* activation rows per register block */
#define KT2_QREG_MAX_M 6 /* up to this many rows the register paths, in blocks of up to 3 (decoding again per block) */
#define KT2_QNT_PFB 4 /* weight rows prefetched this many 4-row blocks ahead (short rows: see gemm.h) */

/* INT8: MR rows of A x NR weight rows (from view row r), k in scale-block runs, 8 at a time. */
KT2_AI void kt2_q8nt_block(const int MR, const int NR, int K, const float *af, size_t lda, const kt_wmat *w, int e,
                           int r, int c0, int pf, float *c, size_t ldc) {
    __m256 acc[KT2_QNT_REG_M][4];
    float tail[KT2_QNT_REG_M][4] = {{0}};
    const int8_t *q[4];
    size_t row_bytes = (size_t)w->cols, ahead = (size_t)KT2_QNT_PFB * 4 * row_bytes;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    for (int j = 0; j < NR; j++) q[j] = (const int8_t *)w->data + kt_code_index(w, e, w->row0 + r + j, w->col0 + c0);
    for (int k0 = 0; k0 < K;) {
        const int len = kt2_run_len(w, c0, k0, K), col = w->col0 + c0 + k0;
        float sc[4];
        __m256 vs[4];
        for (int j = 0; j < NR; j++) {
            sc[j] = w->scale[kt_scale_index(w, e, w->row0 + r + j, col)];
            vs[j] = _mm256_set1_ps(sc[j]);
        }
        int k = k0;
        for (; k + 8 <= k0 + len; k += 8) {
            if (pf && (k & 63) == 0)
                for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(q[j] + ahead + k), _MM_HINT_T0);
            __m256 a[KT2_QNT_REG_M];
            for (int i = 0; i < MR; i++) a[i] = _mm256_loadu_ps(af + (size_t)i * lda + k);
            for (int j = 0; j < NR; j++) {
                __m256 b = kt2_q8_dec8(q[j] + k, vs[j]);
                for (int i = 0; i < MR; i++) acc[i][j] = _mm256_fmadd_ps(a[i], b, acc[i][j]);
            }
        }
        for (; k < k0 + len; k++)
            for (int j = 0; j < NR; j++)
                for (int i = 0; i < MR; i++) tail[i][j] += af[(size_t)i * lda + k] * kt2_q8_dec1(sc[j], q[j][k]);
        k0 += len;
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) c[(size_t)i * ldc + j] = kt2_hsum(acc[i][j]) + tail[i][j];
}

/* INT4 / INT4_1, 16 values of k per step: the 8 code bytes widened to dwords; the low nibbles (even k) index
 * the block's 16-entry table directly (vpermps reads 3 bits, bit 3 picks lo / hi), the high nibbles (odd k)
 * after a shift. A is in the split order of kt2_qnt_rows_f32. Needs every row's codes to start on a byte and
 * scale-block runs of whole 16s (kt2_q4nt_fits). */
KT2_AI void kt2_q4nt_block(const int MR, const int NR, int K, const float *af, size_t lda, const kt_wmat *w, int e,
                           int r, int c0, int pf, float *c, size_t ldc) {
    __m256 acc[KT2_QNT_REG_M][4];
    float tail[KT2_QNT_REG_M][4] = {{0}};
    const uint8_t *q = (const uint8_t *)w->data;
    size_t at[4], ahead = (size_t)KT2_QNT_PFB * 4 * (size_t)w->cols / 2;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm256_setzero_ps();
    for (int j = 0; j < NR; j++) at[j] = kt_code_index(w, e, w->row0 + r + j, w->col0 + c0);
    for (int k0 = 0; k0 < K;) {
        const int len = kt2_run_len(w, c0, k0, K), col = w->col0 + c0 + k0;
        size_t si[4];
        __m256 lo[4], hi[4];
        for (int j = 0; j < NR; j++) {
            si[j] = kt_scale_index(w, e, w->row0 + r + j, col);
            kt2_q4_table(w, si[j], &lo[j], &hi[j]);
        }
        int k = k0;
        for (; k + 16 <= k0 + len; k += 16) {
            if (pf && (k & 127) == 0)
                for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(q + (at[j] + k) / 2 + ahead), _MM_HINT_T0);
            __m256 ae[KT2_QNT_REG_M], ao[KT2_QNT_REG_M];
            for (int i = 0; i < MR; i++) {
                ae[i] = _mm256_loadu_ps(af + (size_t)i * lda + k);
                ao[i] = _mm256_loadu_ps(af + (size_t)i * lda + k + 8);
            }
            for (int j = 0; j < NR; j++) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + (at[j] + k) / 2)));
                __m256i h = _mm256_srli_epi32(v, 4);
                __m256 be = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[j], v), _mm256_permutevar8x32_ps(hi[j], v),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(v, 28)));
                __m256 bo = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo[j], h), _mm256_permutevar8x32_ps(hi[j], h),
                                             _mm256_castsi256_ps(_mm256_slli_epi32(v, 24)));
                for (int i = 0; i < MR; i++) {
                    acc[i][j] = _mm256_fmadd_ps(ae[i], be, acc[i][j]);
                    acc[i][j] = _mm256_fmadd_ps(ao[i], bo, acc[i][j]);
                }
            }
        }
        for (; k < k0 + len; k++) /* only at the end of K (in order in A) */
            for (int j = 0; j < NR; j++) {
                float b = kt2_q_dec1(w, si[j], at[j] + k);
                for (int i = 0; i < MR; i++) tail[i][j] += af[(size_t)i * lda + k] * b;
            }
        k0 += len;
    }
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) c[(size_t)i * ldc + j] = kt2_hsum(acc[i][j]) + tail[i][j];
}

/* INT4 runs of whole 16s from a byte boundary: the view's first code of every row on a byte (even cols and
 * col0 + c0), runs starting at multiples of 16 of k (col0 + c0 and group multiples of 16, or one run). */
static int kt2_q4nt_fits(const kt_wmat *w, int c0, int K) {
    int col = w->col0 + c0;
    if ((w->cols & 1) || (col & 1)) return 0;
    return (col % 16 == 0 && w->group % 16 == 0) || (col / w->group == (col + K - 1) / w->group);
}

#define KT2_Q8NT_CASE(MR_, NR_) kt2_q8nt_block(MR_, NR_, K, am, lda, w, e, r0 + n0, c0, pf, cm, ldc)
#define KT2_Q4NT_CASE(MR_, NR_) kt2_q4nt_block(MR_, NR_, K, am, lda, w, e, r0 + n0, c0, pf, cm, ldc)

static void kt2_qdot_nt_reg(int M, int N, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0,
                            int c0, float *c, size_t ldc) {
    const int nmb = (M + KT2_QNT_REG_M - 1) / KT2_QNT_REG_M;
    for (int n0 = 0; n0 < N; n0 += 4) {
        const int nr = imin(4, N - n0);
        for (int m = 0, blk = 0; m < M; blk++) {
            const int mr = (M - m + (nmb - blk) - 1) / (nmb - blk), pf = blk == 0 && n0 + 4 * (KT2_QNT_PFB + 1) <= N;
            const float *am = af + (size_t)m * lda;
            float *cm = c + (size_t)m * ldc + n0;
            if (w->fmt == KT_W_INT8) {
                KT2_SWITCH_3X4(mr, nr, KT2_Q8NT_CASE);
            } else {
                KT2_SWITCH_3X4(mr, nr, KT2_Q4NT_CASE);
            }
            m += mr;
        }
    }
}

static void kt2_qdot_nt(int M, int N, int K, const bf16_t *const *a, const kt_wmat *w, int e, int r0, int c0,
                        float *work, float *c, size_t ldc) {
    const size_t lda = (size_t)((K + 15) & ~7); /* each row zero-padded to a multiple of 8 */
    float *af = (float *)(((uintptr_t)work + 31) & ~(uintptr_t)31);
    const int reg = M <= KT2_QREG_MAX_M && (w->fmt == KT_W_INT8 || kt2_q4nt_fits(w, c0, K));
    kt2_qnt_rows_f32(M, K, a, af, lda, reg && w->fmt != KT_W_INT8);
    if (reg)
        kt2_qdot_nt_reg(M, N, K, af, lda, w, e, r0, c0, c, ldc);
    else
        kt2_qdot_nt_tile(M, N, K, af, lda, w, e, r0, c0, af + (size_t)M * lda, c, ldc);
}

/* ---- NN (the qdot_small slot): C[p][j] (+)= sum_k af_p[k] W[r0 + k][c0 + j] ---- */

#define KT2_QTR 8   /* weight rows per tile */
#define KT2_QCW 256 /* columns per strip */

/* MR activation rows x NV vectors of 8 columns, over the tr rows of the tile */
KT2_AI void kt2_qnn_block(const int MR, const int NV, int tr, const float *af, size_t lda, const float *t,
                          size_t ldt, float *c, size_t ldc) {
    __m256 acc[3][4];
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_loadu_ps(c + (size_t)i * ldc + 8 * v);
    for (int k = 0; k < tr; k++) {
        __m256 b[4];
        for (int v = 0; v < NV; v++) b[v] = _mm256_loadu_ps(t + (size_t)k * ldt + 8 * v);
        for (int i = 0; i < MR; i++) {
            __m256 av = _mm256_broadcast_ss(af + (size_t)i * lda + k);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(av, b[v], acc[i][v]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(c + (size_t)i * ldc + 8 * v, acc[i][v]);
}

#define KT2_QNN_CASE(MR_, NV_) kt2_qnn_block(MR_, NV_, tr, af, lda, t, ldt, c, ldc)

static void kt2_qnn_rows(int mr, int nv, int tr, const float *af, size_t lda, const float *t, size_t ldt, float *c,
                         size_t ldc) {
    KT2_SWITCH_3X4(mr, nv, KT2_QNN_CASE);
}

/* ---- NN in registers (blocks of up to 3 activation rows): per 4 weight rows and 8 columns, the codes are
 * decoded once per block and applied to its rows of C (accumulators in memory, 4 FMAs per load / store);
 * weight rows are read whole (the backward's few-row experts take whole-row tasks: blk.nn_rows_max_m). ---- */

#define KT2_QNN_KR 4

KT2_AI void kt2_qnn_reg_rows(const int MR, const int KR, int nc, const float *af, size_t lda, int k,
                             const kt_wmat *w, int e, int row, int c0, float *c, size_t ldc) {
    __m256 x[KT2_QNT_REG_M][KT2_QNN_KR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < KR; j++) x[i][j] = _mm256_set1_ps(af[(size_t)i * lda + k + j]);
    const int is8 = w->fmt == KT_W_INT8;
    for (int j0 = 0; j0 < nc;) {
        const int len = kt2_run_len(w, c0, j0, nc), col = w->col0 + c0 + j0;
        size_t si[KT2_QNN_KR], at[KT2_QNN_KR];
        for (int j = 0; j < KR; j++) {
            si[j] = kt_scale_index(w, e, w->row0 + row + j, col);
            at[j] = kt_code_index(w, e, w->row0 + row + j, col);
        }
        const int8_t *q8 = (const int8_t *)w->data;
        const uint8_t *q4 = (const uint8_t *)w->data;
        __m256 vs[KT2_QNN_KR], lo[KT2_QNN_KR], hi[KT2_QNN_KR]; /* INT8 scales / INT4 tables */
        for (int j = 0; j < KR; j++) {
            vs[j] = lo[j] = hi[j] = _mm256_setzero_ps();
            if (is8)
                vs[j] = _mm256_set1_ps(w->scale[si[j]]);
            else
                kt2_q4_table(w, si[j], &lo[j], &hi[j]);
        }
        int n = 0;
        for (; n + 8 <= len; n += 8) {
            __m256 b[KT2_QNN_KR];
            for (int j = 0; j < KR; j++)
                b[j] = is8 ? kt2_q8_dec8(q8 + at[j] + n, vs[j]) : kt2_q4_dec8(q4, at[j] + n, lo[j], hi[j]);
            kt2_fma_rows(MR, KR, (const __m256(*)[4])x, b, c + j0 + n, ldc);
        }
        for (; n < len; n++)
            for (int j = 0; j < KR; j++) {
                float b = kt2_q_dec1(w, si[j], at[j] + n);
                for (int i = 0; i < MR; i++) c[(size_t)i * ldc + j0 + n] += af[(size_t)i * lda + k + j] * b;
            }
        j0 += len;
    }
}

#define KT2_QNN_REG_CASE(MR_, KR_) kt2_qnn_reg_rows(MR_, KR_, nc, af + (size_t)p * lda, lda, k, w, e, r0 + k, c0, \
                                                    c + (size_t)p * ldc, ldc)

static void kt2_qnn_reg(int m, int nc, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0, int c0,
                        float *c, size_t ldc) {
    for (int k = 0; k < K;) {
        const int kr = imin(KT2_QNN_KR, K - k);
        for (int j = 0; j < kr; j++)
            if (k + j + KT2_QPFD < K) kt2_prefetch_row(w, e, r0 + k + j + KT2_QPFD, c0, nc);
        for (int p = 0; p < m; p += KT2_QNT_REG_M) { /* (the kr rows of codes stay in L1 for the next block) */
            const int mr = imin(KT2_QNT_REG_M, m - p);
            KT2_SWITCH_3X4(mr, kr, KT2_QNN_REG_CASE);
        }
        k += kr;
    }
}

static void kt2_qdot_small(int m, int nc, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0,
                           int c0, float *c, size_t ldc, int accumulate, float *lut) {
    if (!accumulate)
        for (int p = 0; p < m; p++) memset(c + (size_t)p * ldc, 0, sizeof(float) * (size_t)nc);
    if (m <= 0 || nc <= 0 || K <= 0) return;
    if (m <= KT2_QREG_MAX_M) {
        kt2_qnn_reg(m, nc, K, af, lda, w, e, r0, c0, c, ldc);
        return;
    }
    /* the tile lives in the 16 K floats of `lut` (the slot's scratch) */
    const int cw = imin(imin(nc, KT2_QCW), 16 * K);
    const int tr = imin(imin(KT2_QTR, K), 16 * K / cw);
    float *t = lut;
    for (int j0 = 0; j0 < nc; j0 += cw) {
        const int nb = imin(cw, nc - j0), nb8 = nb & ~7;
        for (int k0 = 0; k0 < K; k0 += tr) {
            const int kr = imin(tr, K - k0);
            for (int k = 0; k < kr; k++) {
                if (k0 + k + KT2_QPFD < K) kt2_prefetch_row(w, e, r0 + k0 + k + KT2_QPFD, c0 + j0, nb);
                kt2_dec_row(w, e, r0 + k0 + k, c0 + j0, nb, t + (size_t)k * cw);
            }
            const float *ak = af + k0;
            for (int p0 = 0; p0 < m; p0 += 3) {
                const int mr = imin(3, m - p0);
                for (int v0 = 0; v0 < nb8; v0 += 32) {
                    const int vb = imin(32, nb8 - v0);
                    float *cb = c + (size_t)p0 * ldc + j0 + v0;
                    const float *ab = ak + (size_t)p0 * lda, *tb = t + v0;
                    kt2_qnn_rows(mr, vb / 8, kr, ab, lda, tb, (size_t)cw, cb, ldc);
                }
                for (int i = 0; i < mr; i++) /* columns past the last full vector */
                    for (int k = 0; k < kr; k++) {
                        const float x = ak[(size_t)(p0 + i) * lda + k];
                        for (int j = nb8; j < nb; j++) c[(size_t)(p0 + i) * ldc + j0 + j] += x * t[(size_t)k * cw + j];
                    }
            }
        }
    }
}

#endif
