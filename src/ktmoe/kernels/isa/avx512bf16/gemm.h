/* AVX-512-BF16 GEMM micro-kernels (the gemm_nt / gemm_nn slots, contract in slots.h), written for and tuned on AMD Zen 4 (no AMX).
 *
 * Built with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma (no -march), gcc >= 12.
 *
 * gemm_nt ("dot" form, forward y = x W^T, W row-major [N, K]):
 *   register block of MR (<= 4) activation rows x NR (<= 4) weight rows = 16 accumulators of 16 fp32
 *   lanes; the k loop steps 32 bf16 with vdpbf16ps (8 loads per 16 vdpbf16ps), the K % 32 tail uses
 *   zero-masked loads. The 16 partial vectors collapse with one transpose-reduce (unpck ps/pd +
 *   shuffle_f32x4: 45 ops for 16 dot products) and are stored as 4 x 4 floats.
 *   Loop order: column blocks of 4 weight rows outer, balanced row blocks of A inner (M = 5 -> 3+2), so the
 *   4 weight rows stay in L1 while the (hot) activation rows stream from L2; while column block n runs, the
 *   weight rows of block n+1 are prefetched into L2 (cold weights).
 *   b_is_f32 (small LoRA matrices): exact fp32 FMA (A widened to fp32, 16 k per step), same 4 x 4 blocking,
 *   so the result has the portable reference's precision instead of rounding B to bf16.
 *
 * gemm_nn (backward dx = dy W, W row-major [K, N]; the reduction index is B's row):
 *   rows k and k+1 of B are interleaved with vpunpck{l,h}wd so every 32-bit lane holds the pair
 *   (B[k][n], B[k+1][n]); the A pair (A_m[k], A_m[k+1]) is broadcast as one 32-bit value; vdpbf16ps.
 *   The unpack permutes columns inside 128-bit lanes; the order is fixed once at store time with vpermt2ps.
 *   Register block: MR (<= 6, balanced: 8 -> 4+4) rows of A x 64 columns of B = 24 accumulators; per k
 *   pair 4 loads + 4 unpacks + MR broadcasts for 4*MR vdpbf16ps (the unpacks overlap with the dot products:
 *   packing B once per call instead measured slower). Odd K: the last pair is (A_m[K-1], 0) x (B[K-1][n], 0).
 *   Column tails (N % 64) use masked loads/stores. With several row blocks, K is processed in chunks of
 *   KT_NN_KC rows, and the row blocks of one chunk prefetch the next one (B rows are strided, the hardware
 *   prefetcher does not follow them).
 *
 * Never reads past the end of a row (masked loads; prefetches stay inside B), no alignment assumptions.
 * Note: gcc fuses "extract 128-bit lane + masked 128-bit store" into vextractf32x4 m128{k}, and on Zen 4
 * that instruction faults on masked-out elements at a page boundary; the masked C stores are kept vmovups.
 */
#ifndef KTMOE_AVX512BF16_GEMM_H
#define KTMOE_AVX512BF16_GEMM_H

#include "../../base.h"

#include <immintrin.h>

#define KT_AI static inline __attribute__((always_inline))

/* Tuning knobs (defaults measured on Zen 4 with tests/native/test_gemm_avx512bf16.c). */
#ifndef KT_NT_PF_HINT
#define KT_NT_PF_HINT _MM_HINT_T1 /* into L2: T0 measured slower (L1 pollution) */
#endif

#ifndef KT_NN_PFD
#define KT_NN_PFD 64 /* software prefetch distance in B rows (rows are strided: no hardware stream) */
#endif
#ifndef KT_NN_PF_HINT
#define KT_NN_PF_HINT _MM_HINT_T1
#endif

#ifndef KT_NN_MR
#define KT_NN_MR 6 /* max rows per gemm_nn block (6 x 4 accumulators) */
#endif
#ifndef KT_NN_KC
#define KT_NN_KC 256 /* k rows per chunk when there are several row blocks (their interleaved pairs: 32 KB) */
#endif
#ifndef KT_NN_PF_BLOCKS
#define KT_NN_PF_BLOCKS 4 /* row blocks that prefetch the next chunk */
#endif

/* ------------------------------------------------------------------------------------------------ */
/* shared helpers                                                                                   */
/* ------------------------------------------------------------------------------------------------ */

KT_AI __m512 kt_dp(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

/* (v0, v1, v2, v3) -> per 128-bit lane L: (sum of v0 lane L, v1 lane L, v2 lane L, v3 lane L). */
KT_AI __m512 kt_hsum4(__m512 v0, __m512 v1, __m512 v2, __m512 v3) {
    __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(v0, v1), _mm512_unpackhi_ps(v0, v1));
    __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(v2, v3), _mm512_unpackhi_ps(v2, v3));
    __m512d lo = _mm512_unpacklo_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
    __m512d hi = _mm512_unpackhi_pd(_mm512_castps_pd(s01), _mm512_castps_pd(s23));
    return _mm512_add_ps(_mm512_castpd_ps(lo), _mm512_castpd_ps(hi));
}

/* (u0, u1, u2, u3) of kt_hsum4 -> lane i holds the 4 complete sums of u_i. */
KT_AI __m512 kt_hsum_lanes(__m512 u0, __m512 u1, __m512 u2, __m512 u3) {
    __m512 x = _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, 0x88), _mm512_shuffle_f32x4(u0, u1, 0xDD));
    __m512 y = _mm512_add_ps(_mm512_shuffle_f32x4(u2, u3, 0x88), _mm512_shuffle_f32x4(u2, u3, 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x88), _mm512_shuffle_f32x4(x, y, 0xDD));
}

KT_AI __mmask32 kt_mask32(int n) { return n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1u); }
KT_AI __mmask16 kt_mask16(int n) { return n >= 16 ? (__mmask16)0xffffu : (__mmask16)((1u << n) - 1u); }

/* ------------------------------------------------------------------------------------------------ */
/* gemm_nt                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

/* Reduce acc[MR][NR] (NR <= 4) and write the MR x ncols results to C (ncols <= NR). */
KT_AI void kt_nt_store(const int MR, const int NR, __m512 acc[4][4], float *c, size_t ldc, int ncols) {
    const __m512 z = _mm512_setzero_ps();
    __m512 u[4];
    for (int i = 0; i < 4; i++) {
        if (i < MR)
            u[i] = kt_hsum4(acc[i][0], NR > 1 ? acc[i][1] : z, NR > 2 ? acc[i][2] : z, NR > 3 ? acc[i][3] : z);
        else
            u[i] = z;
    }
    __m512 r = kt_hsum_lanes(u[0], u[1], u[2], u[3]);
    __m128 l[4];
    l[0] = _mm512_castps512_ps128(r);
    if (MR > 1) l[1] = _mm512_extractf32x4_ps(r, 1);
    if (MR > 2) l[2] = _mm512_extractf32x4_ps(r, 2);
    if (MR > 3) l[3] = _mm512_extractf32x4_ps(r, 3);
    if (ncols == 4) {
        for (int i = 0; i < MR; i++) _mm_storeu_ps(c + (size_t)i * ldc, l[i]);
    } else {
        __mmask8 mk = (__mmask8)((1u << ncols) - 1u);
        for (int i = 0; i < MR; i++) {
            __m128 v = l[i];
            /* Keep the masked store a vmovups: gcc would otherwise fuse extract + masked store into
             * vextractf32x4 m128{k}, whose masked-out elements fault on Zen 4 at a page boundary. */
            __asm__("" : "+v"(v));
            _mm_mask_storeu_ps(c + (size_t)i * ldc, mk, v);
        }
    }
}

/* bf16 B: MR rows of A x NR rows of B over kc values of k; pf: the next 4 weight rows to prefetch, or NULL. */
KT_AI void kt_nt_kernel_bf16(const int MR, const int NR, int kc, const bf16_t *const *ap, const bf16_t *bp,
                             size_t ldb, float *c, size_t ldc, int ncols, const bf16_t *pf) {
    __m512 acc[4][4];
    const bf16_t *ar[4], *br[4];
    for (int i = 0; i < MR; i++) ar[i] = ap[i];
    for (int j = 0; j < NR; j++) br[j] = bp + (size_t)j * ldb;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= kc; k += 32) {
        __m512i av[4];
        if (pf) { /* one line of each of the next 4 weight rows */
            for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(pf + (size_t)j * ldb + k), KT_NT_PF_HINT);
        }
        for (int i = 0; i < MR; i++) av[i] = _mm512_loadu_si512((const void *)(ar[i] + k));
        for (int j = 0; j < NR; j++) {
            __m512i bv = _mm512_loadu_si512((const void *)(br[j] + k));
            for (int i = 0; i < MR; i++) acc[i][j] = kt_dp(acc[i][j], av[i], bv);
        }
    }
    if (k < kc) {
        __mmask32 mk = kt_mask32(kc - k);
        __m512i av[4];
        for (int i = 0; i < MR; i++) av[i] = _mm512_maskz_loadu_epi16(mk, ar[i] + k);
        for (int j = 0; j < NR; j++) {
            __m512i bv = _mm512_maskz_loadu_epi16(mk, br[j] + k);
            for (int i = 0; i < MR; i++) acc[i][j] = kt_dp(acc[i][j], av[i], bv);
        }
    }
    kt_nt_store(MR, NR, acc, c, ldc, ncols);
}

/* 16 bf16 -> 16 fp32 (exact). */
KT_AI __m512 kt_bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

/* fp32 B: exact fp32 FMA, 16 k per step. */
KT_AI void kt_nt_kernel_f32(const int MR, const int NR, int kc, const bf16_t *const *ap, const float *bp,
                            size_t ldb, float *c, size_t ldc, int ncols) {
    __m512 acc[4][4];
    const bf16_t *ar[4];
    const float *br[4];
    for (int i = 0; i < MR; i++) ar[i] = ap[i];
    for (int j = 0; j < NR; j++) br[j] = bp + (size_t)j * ldb;
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= kc; k += 16) {
        __m512 av[4];
        for (int i = 0; i < MR; i++) av[i] = kt_bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)(ar[i] + k)));
        for (int j = 0; j < NR; j++) {
            __m512 bv = _mm512_loadu_ps(br[j] + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
        }
    }
    if (k < kc) {
        __mmask16 mk = kt_mask16(kc - k);
        __m512 av[4];
        for (int i = 0; i < MR; i++) av[i] = kt_bf16x16_to_f32(_mm256_maskz_loadu_epi16(mk, ar[i] + k));
        for (int j = 0; j < NR; j++) {
            __m512 bv = _mm512_maskz_loadu_ps(mk, br[j] + k);
            for (int i = 0; i < MR; i++) acc[i][j] = _mm512_fmadd_ps(av[i], bv, acc[i][j]);
        }
    }
    kt_nt_store(MR, NR, acc, c, ldc, ncols);
}

/* Dispatch a kernel instantiation for an (mr, nr) block, 1 <= mr, nr <= 4. */
#define KT_NT_DISPATCH(KERNEL, mr, nr, ...)                                                                  \
    switch (((mr) - 1) * 4 + (nr) - 1) {                                                                     \
    case 0: KERNEL(1, 1, __VA_ARGS__, 1); break;                                                             \
    case 1: KERNEL(1, 2, __VA_ARGS__, 2); break;                                                             \
    case 2: KERNEL(1, 3, __VA_ARGS__, 3); break;                                                             \
    case 3: KERNEL(1, 4, __VA_ARGS__, 4); break;                                                             \
    case 4: KERNEL(2, 1, __VA_ARGS__, 1); break;                                                             \
    case 5: KERNEL(2, 2, __VA_ARGS__, 2); break;                                                             \
    case 6: KERNEL(2, 3, __VA_ARGS__, 3); break;                                                             \
    case 7: KERNEL(2, 4, __VA_ARGS__, 4); break;                                                             \
    case 8: KERNEL(3, 1, __VA_ARGS__, 1); break;                                                             \
    case 9: KERNEL(3, 2, __VA_ARGS__, 2); break;                                                             \
    case 10: KERNEL(3, 3, __VA_ARGS__, 3); break;                                                            \
    case 11: KERNEL(3, 4, __VA_ARGS__, 4); break;                                                            \
    case 12: KERNEL(4, 1, __VA_ARGS__, 1); break;                                                            \
    case 13: KERNEL(4, 2, __VA_ARGS__, 2); break;                                                            \
    case 14: KERNEL(4, 3, __VA_ARGS__, 3); break;                                                            \
    default: KERNEL(4, 4, __VA_ARGS__, 4); break;                                                            \
    }

#define KT_NT_BF16_CALL(MR, NR, kc, ap, bn, ldb, cm, ldc, pf, NC) \
    kt_nt_kernel_bf16(MR, NR, kc, ap, bn, ldb, cm, ldc, NC, pf)
#define KT_NT_F32_CALL(MR, NR, kc, ap, bn, ldb, cm, ldc, NC) kt_nt_kernel_f32(MR, NR, kc, ap, bn, ldb, cm, ldc, NC)

/* Column blocks of 4 weight rows outer, balanced row blocks of at most 4 activation rows inner
 * (M = 5 -> 3+2, 9 -> 3+3+3). Every row block of column block n prefetches (to L2) the weight rows of
 * column block n+1: one line per row per k step. Re-issuing the prefetch from every row block, rather than
 * from the first one only or a 1/nblk slice each, measured best on Zen 4 (cold weights, M = 8..16). */
static void kt_nt_bf16(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                       size_t ldc) {
    const bf16_t *ap[4];
    const int nblk = (M + 3) / 4;
    for (int n = 0; n < N; n += 4) {
        const int nr = N - n < 4 ? N - n : 4;
        const bf16_t *bn = b + (size_t)n * ldb;
        /* only a full next block is prefetched: never touch lines past the last row */
        const bf16_t *pf = n + 8 <= N ? bn + 4 * ldb : NULL;
        for (int m = 0, blk = 0; m < M; blk++) {
            const int mr = (M - m + (nblk - blk) - 1) / (nblk - blk);
            for (int i = 0; i < mr; i++) ap[i] = a[m + i];
            float *cm = c + (size_t)m * ldc + n;
            KT_NT_DISPATCH(KT_NT_BF16_CALL, mr, nr, K, ap, bn, ldb, cm, ldc, pf)
            m += mr;
        }
    }
}

static void kt_nt_f32(int M, int N, int K, const bf16_t *const *a, const float *b, size_t ldb, float *c,
                      size_t ldc) {
    const bf16_t *ap[4];
    const int nblk = (M + 3) / 4;
    for (int n = 0; n < N; n += 4) {
        const int nr = N - n < 4 ? N - n : 4;
        const float *bn = b + (size_t)n * ldb;
        for (int m = 0, blk = 0; m < M; blk++) {
            const int mr = (M - m + (nblk - blk) - 1) / (nblk - blk);
            for (int i = 0; i < mr; i++) ap[i] = a[m + i];
            float *cm = c + (size_t)m * ldc + n;
            KT_NT_DISPATCH(KT_NT_F32_CALL, mr, nr, K, ap, bn, ldb, cm, ldc)
            m += mr;
        }
    }
}

static void gemm_nt(int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int b_is_f32,
                    float *c, size_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (b_is_f32) {
        kt_nt_f32(M, N, K, a, (const float *)b, ldb, c, ldc);
        return;
    }
    kt_nt_bf16(M, N, K, a, (const bf16_t *)b, ldb, c, ldc);
}

/* ------------------------------------------------------------------------------------------------ */
/* gemm_nn                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

KT_AI uint32_t kt_ld32(const bf16_t *p) {
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Column permutation after vpunpck{l,h}wd: lo holds columns 8L+j, hi holds 8L+4+j (j < 4, lane L). */
KT_AI void kt_nn_store2(__m512 lo, __m512 hi, float *c, int ncols, int accumulate) {
    const __m512i i0 = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i i1 = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    __m512 o0 = _mm512_permutex2var_ps(lo, i0, hi);
    __m512 o1 = _mm512_permutex2var_ps(lo, i1, hi);
    if (ncols >= 32) {
        if (accumulate) {
            o0 = _mm512_add_ps(o0, _mm512_loadu_ps(c));
            o1 = _mm512_add_ps(o1, _mm512_loadu_ps(c + 16));
        }
        _mm512_storeu_ps(c, o0);
        _mm512_storeu_ps(c + 16, o1);
    } else {
        __mmask16 m0 = kt_mask16(ncols), m1 = kt_mask16(ncols > 16 ? ncols - 16 : 0);
        if (accumulate) {
            o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, c));
            o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, c + 16));
        }
        _mm512_mask_storeu_ps(c, m0, o0);
        _mm512_mask_storeu_ps(c + 16, m1, o1);
    }
}

/* The kernel: MR rows x (NH * 32) columns. PK = 0: B pairs interleaved on the fly from two rows; PK = 1: the
 * same, and the interleaved vectors are also written to pk (4 per k pair, the odd tail pair included); PK = 2:
 * the vectors are read from pk instead of B (full 64-column panels only).
 * ap: A row pointers offset by k0; b: B at row k0, column n0; kc values of k; ncols valid columns. */
KT_AI void kt_nn_kernel(const int MR, const int NH, const int FULL, const int PK, int kc, const bf16_t *const *ap,
                        const bf16_t *b, size_t ldb, float *c, size_t ldc, int ncols, int accumulate,
                        const bf16_t *pf, int pfk, __m512i *pk) {
    __m512 acc[6][8];
    const bf16_t *ar[6];
    for (int i = 0; i < MR; i++) ar[i] = ap[i];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < 2 * NH; j++) acc[i][j] = _mm512_setzero_ps();
    const __mmask32 mk0 = kt_mask32(ncols), mk1 = kt_mask32(ncols > 32 ? ncols - 32 : 0);
    int k = 0;
    for (; k + 2 <= kc; k += 2) {
        if (k + 1 < pfk) { /* rows pf[k], pf[k+1] (64 NH bytes each, one more line when unaligned) */
            const char *p0 = (const char *)(pf + (size_t)k * ldb), *p1 = (const char *)(pf + (size_t)(k + 1) * ldb);
            for (int off = 0; off < 64 * NH; off += 64) {
                _mm_prefetch(p0 + off, KT_NN_PF_HINT);
                _mm_prefetch(p1 + off, KT_NN_PF_HINT);
            }
            _mm_prefetch(p0 + 64 * NH - 1, KT_NN_PF_HINT);
            _mm_prefetch(p1 + 64 * NH - 1, KT_NN_PF_HINT);
        }
        __m512i v[8];
        if (PK == 2) {
            for (int j = 0; j < 4; j++) v[j] = _mm512_load_si512(pk + 2 * k + j);
        } else {
            const bf16_t *b0 = b + (size_t)k * ldb, *b1 = b0 + ldb;
            for (int h = 0; h < NH; h++) {
                __m512i r0, r1;
                if (FULL) {
                    r0 = _mm512_loadu_si512((const void *)(b0 + 32 * h));
                    r1 = _mm512_loadu_si512((const void *)(b1 + 32 * h));
                } else {
                    r0 = _mm512_maskz_loadu_epi16(h ? mk1 : mk0, b0 + 32 * h);
                    r1 = _mm512_maskz_loadu_epi16(h ? mk1 : mk0, b1 + 32 * h);
                }
                v[2 * h] = _mm512_unpacklo_epi16(r0, r1);
                v[2 * h + 1] = _mm512_unpackhi_epi16(r0, r1);
            }
            if (PK == 1)
                for (int j = 0; j < 4; j++) _mm512_store_si512(pk + 2 * k + j, v[j]);
        }
        for (int i = 0; i < MR; i++) {
            __m512i av = _mm512_set1_epi32((int)kt_ld32(ar[i] + k));
            for (int j = 0; j < 2 * NH; j++) acc[i][j] = kt_dp(acc[i][j], av, v[j]);
        }
    }
    if (k < kc) { /* odd: pair (B[k][n], 0) */
        __m512i v[8];
        if (PK == 2) {
            for (int j = 0; j < 4; j++) v[j] = _mm512_load_si512(pk + 2 * k + j);
        } else {
            const bf16_t *b0 = b + (size_t)k * ldb;
            const __m512i z = _mm512_setzero_si512();
            for (int h = 0; h < NH; h++) {
                __m512i r0 = FULL ? _mm512_loadu_si512((const void *)(b0 + 32 * h))
                                  : _mm512_maskz_loadu_epi16(h ? mk1 : mk0, b0 + 32 * h);
                v[2 * h] = _mm512_unpacklo_epi16(r0, z);
                v[2 * h + 1] = _mm512_unpackhi_epi16(r0, z);
            }
            if (PK == 1)
                for (int j = 0; j < 4; j++) _mm512_store_si512(pk + 2 * k + j, v[j]);
        }
        for (int i = 0; i < MR; i++) {
            __m512i av = _mm512_set1_epi32((int)(uint32_t)ar[i][k]);
            for (int j = 0; j < 2 * NH; j++) acc[i][j] = kt_dp(acc[i][j], av, v[j]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int h = 0; h < NH; h++)
            kt_nn_store2(acc[i][2 * h], acc[i][2 * h + 1], c + (size_t)i * ldc + 32 * h,
                         FULL ? 32 : ncols - 32 * h, accumulate);
}

/* pk == NULL: interleave on the fly; otherwise (full panels) mode 1 writes it, mode 2 reads it. */
static void kt_nn_rows(int mr, int kc, const bf16_t *const *ap, const bf16_t *b, size_t ldb, float *c, size_t ldc,
                       int ncols, int accumulate, const bf16_t *pf, int pfk, __m512i *pk, int mode) {
#define KT_NN_CASE(M_, NH, FULL, PK, NC)                                                                       \
    case M_: kt_nn_kernel(M_, NH, FULL, PK, kc, ap, b, ldb, c, ldc, NC, accumulate, pf, pfk, pk); break;
#define KT_NN_CASES(NH, FULL, PK, NC)                                                                        \
    switch (mr) {                                                                                            \
        KT_NN_CASE(1, NH, FULL, PK, NC)                                                                      \
        KT_NN_CASE(2, NH, FULL, PK, NC)                                                                      \
        KT_NN_CASE(3, NH, FULL, PK, NC)                                                                      \
        KT_NN_CASE(4, NH, FULL, PK, NC)                                                                      \
        KT_NN_CASE(5, NH, FULL, PK, NC)                                                                      \
    default: kt_nn_kernel(6, NH, FULL, PK, kc, ap, b, ldb, c, ldc, NC, accumulate, pf, pfk, pk); break;      \
    }
    if (ncols >= 128 && mr <= 2 && !pk) { /* one or two rows: 128 columns per pass (see gemm_nn) */
        if (mr == 1)
            kt_nn_kernel(1, 4, 1, 0, kc, ap, b, ldb, c, ldc, 128, accumulate, pf, pfk, pk);
        else
            kt_nn_kernel(2, 4, 1, 0, kc, ap, b, ldb, c, ldc, 128, accumulate, pf, pfk, pk);
    } else if (ncols >= 64) {
        if (!pk) {
            KT_NN_CASES(2, 1, 0, 64)
        } else if (mode == 1) {
            KT_NN_CASES(2, 1, 1, 64)
        } else {
            KT_NN_CASES(2, 1, 2, 64)
        }
    } else if (ncols > 32) {
        KT_NN_CASES(2, 0, 0, ncols)
    } else {
        KT_NN_CASES(1, 0, 0, ncols)
    }
#undef KT_NN_CASES
#undef KT_NN_CASE
}

/* Column panels of 64 outer. With one row block (M <= KT_NN_MR) the panel is streamed once over all of K,
 * prefetching KT_NN_PFD rows ahead. With several, K is split in chunks of KT_NN_KC rows: the first row block
 * interleaves the chunk from B into a contiguous 32 KB buffer as it goes, the others read that buffer (B's
 * rows are a weight matrix's stride apart: re-reading them from B thrashes the cache sets), add their partial
 * sums of later chunks into C, and the first few prefetch the next chunk; the first row block of the first
 * chunk prefetches KT_NN_PFD rows ahead. Column tails interleave on the fly. */
static void gemm_nn(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                    size_t ldc) {
    if (M <= 0 || N <= 0) return;
    const bf16_t *ap[KT_NN_MR];
    const int nblk = (M + KT_NN_MR - 1) / KT_NN_MR;
    const int kchunk = nblk == 1 ? (K > 0 ? K : 1) : KT_NN_KC;
    __m512i pk[KT_NN_KC * 2] __attribute__((aligned(64))); /* KT_NN_KC / 2 pairs x 4 vectors */
    /* one or two rows (bandwidth-bound): 128 columns per pass, so that memory sees 256-byte pieces of B's rows */
    const int wide = M <= 2 ? 128 : 64;
    for (int n = 0; n < N;) {
        const int nc = N - n >= wide ? wide : (N - n < 64 ? N - n : 64);
        const bf16_t *bn = b + n;
        int k0 = 0;
        do {
            const int kc = K - k0 < kchunk ? K - k0 : kchunk;
            const bf16_t *bk = bn + (size_t)k0 * ldb;
            const int knext = K - (k0 + kc) < kchunk ? K - (k0 + kc) : kchunk; /* rows in the next chunk */
            for (int m = 0, blk = 0; m < M; blk++) {
                /* balanced row blocks of at most KT_NN_MR rows (8 -> 4+4, 16 -> 6+5+5, 64 -> 9x6+2x5) */
                const int mr = (M - m + (nblk - blk) - 1) / (nblk - blk);
                for (int i = 0; i < mr; i++) ap[i] = a[m + i] + k0;
                const bf16_t *pf;
                int pfk;
                if (nc < 64) { /* column tail: no prefetch (its lines could reach past the end of B) */
                    pfk = 0;
                    pf = NULL;
                } else if (blk == 0 && k0 == 0) { /* the chunk itself comes from memory: look ahead */
                    pfk = K - KT_NN_PFD;
                    pf = pfk > 0 ? bk + (size_t)KT_NN_PFD * ldb : NULL;
                } else { /* the next chunk, from the first few row blocks */
                    pfk = blk < KT_NN_PF_BLOCKS ? knext : 0;
                    pf = pfk > 0 ? bk + (size_t)kc * ldb : NULL;
                }
                kt_nn_rows(mr, kc, ap, bk, ldb, c + (size_t)m * ldc + n, ldc, nc, k0 > 0, pf, pfk,
                           nblk > 1 && nc == 64 ? pk : NULL, blk == 0 ? 1 : 2);
                m += mr;
            }
            k0 += kc;
        } while (k0 < K);
        n += nc;
    }
}

#undef KT_AI

#endif
