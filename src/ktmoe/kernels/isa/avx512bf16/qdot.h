/* Fused small-M NN products on quantized weights (the qdot_small slot, AVX-512-BF16 level).
 * C[p][c] (+)= sum_k A_p[k] * W[r0 + k][c0 + c] for few activation rows p, decoding each weight in
 * registers (never writing a decoded block). Weights are exactly the bf16 values the decode slots produce:
 * INT8 bf16(s * q); INT4 / INT4_1 bf16(fma(s, n, off)) taken from a per-(row, group) 16-entry fp32 table.
 * Products of the (bf16-valued) activations and weights are exact in fp32; sums accumulate in fp32.
 * 32 weights decode into (even columns, odd columns) fp32 vectors; stores interleave them back.
 * Knows the INT8, INT4 and INT4_1 row layouts with one scale per (row, group): the level's fused_max_m
 * says which formats take it. */
#ifndef KTMOE_AVX512BF16_QDOT_H
#define KTMOE_AVX512BF16_QDOT_H

#include <immintrin.h>

#include "../../slots.h"

#define QMR 4     /* activation rows per register block */
#ifndef QPFD
#define QPFD 32 /* software prefetch distance in weight rows (rows are strided) */
#endif

static inline __attribute__((always_inline)) void q_dec_int8(const int8_t *p, int n, __m512 vs, __m512 *ev,
                                                             __m512 *od) {
    __m128i b0, b1;
    if (n >= 32) {
        b0 = _mm_loadu_si128((const __m128i *)p);
        b1 = _mm_loadu_si128((const __m128i *)(p + 16));
    } else {
        b0 = _mm_maskz_loadu_epi8((__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u), p);
        b1 = _mm_maskz_loadu_epi8((__mmask16)(n >= 32 ? 0xffffu : n > 16 ? (1u << (n - 16)) - 1u : 0u), p + 16);
    }
    __m512 x0 = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b0)));
    __m512 x1 = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b1)));
    __m512i h = (__m512i)_mm512_cvtne2ps_pbh(x1, x0); /* bf16 of columns 0..31 in order */
    *ev = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    *od = _mm512_castsi512_ps(_mm512_and_si512(h, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 32 (n <= 32 valid) nibbles from element index `at` of the packed bytes q. */
static inline __attribute__((always_inline)) void q_dec_int4(const uint8_t *q, size_t at, int n, const float *lut,
                                                             __m512 *ev, __m512 *od) {
    const uint8_t *b = q + (at >> 1);
    __m512i v;
    if (!(at & 1)) {
        int nb = (n + 1) >> 1;
        __m128i x = nb >= 16 ? _mm_loadu_si128((const __m128i *)b) : _mm_maskz_loadu_epi8((__mmask16)((1u << nb) - 1u), b);
        v = _mm512_cvtepu8_epi32(x);
    } else { /* column 0 is the high nibble of b[0]: shift the nibble stream by one */
        int nt = (int)(((at + (size_t)n - 1) >> 1) - (at >> 1)) + 1; /* bytes touched */
        __mmask16 m0 = (__mmask16)(nt >= 16 ? 0xffffu : (1u << nt) - 1u);
        __mmask16 m1 = (__mmask16)(nt - 1 >= 16 ? 0xffffu : (1u << (nt - 1)) - 1u);
        __m512i v0 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m0, b));
        __m512i v1 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m1, b + 1));
        v = _mm512_or_si512(_mm512_srli_epi32(v0, 4), _mm512_slli_epi32(_mm512_and_si512(v1, _mm512_set1_epi32(15)), 4));
    }
    __m512 t = _mm512_loadu_ps(lut);
    *ev = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), t);
    *od = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t);
}

/* (even, odd) accumulators of 32 columns -> c[0 .. n), n <= 32. */
static inline __attribute__((always_inline)) void q_store(__m512 ev, __m512 od, float *c, int n, int accumulate) {
    const __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    __m512 o0 = _mm512_permutex2var_ps(ev, lo_idx, od), o1 = _mm512_permutex2var_ps(ev, hi_idx, od);
    __mmask16 m0 = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u);
    __mmask16 m1 = (__mmask16)(n >= 32 ? 0xffffu : n > 16 ? (1u << (n - 16)) - 1u : 0u);
    if (accumulate) {
        o0 = _mm512_add_ps(o0, _mm512_maskz_loadu_ps(m0, c));
        o1 = _mm512_add_ps(o1, _mm512_maskz_loadu_ps(m1, c + 16));
    }
    _mm512_mask_storeu_ps(c, m0, o0);
    if (m1) _mm512_mask_storeu_ps(c + 16, m1, o1);
}

/* One register block: MR rows of A x (32 * NH) columns (n valid, > 32 * (NH - 1)) of one scale group, K
 * weight rows. Row k of the block: packed element index at0 + k * cols; INT8 scale sc[k * sstride]; INT4
 * table lut[k]. MR * NH <= 8 (16 accumulators). */
static inline __attribute__((always_inline)) void q_kernel(const int MR, const int NH, int fmt, int K,
                                                           const float *af, size_t lda, const void *data,
                                                           size_t at0, size_t cols, const float *sc,
                                                           size_t sstride, const float *lut, int n, float *c,
                                                           size_t ldc, int accumulate) {
    __m512 acc[QMR][16];
    int nh[8];
    _Pragma("GCC unroll 16") for (int h = 0; h < NH; h++) nh[h] = n - 32 * h < 32 ? n - 32 * h : 32;
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)
        _Pragma("GCC unroll 16") for (int j = 0; j < 2 * NH; j++) acc[i][j] = _mm512_setzero_ps();
    for (int k = 0; k < K; k++) {
        size_t at = at0 + (size_t)k * cols;
        __m512 a[QMR];
        _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++) a[i] = _mm512_set1_ps(af[(size_t)i * lda + k]);
        if (fmt == KT_W_INT8) {
            const int8_t *p = (const int8_t *)data + at;
            _Pragma("GCC unroll 16") for (int h = 0; h < NH; h += 2) _mm_prefetch((const char *)(p + QPFD * cols + 32 * h), _MM_HINT_T0);
            __m512 vs = _mm512_set1_ps(sc[(size_t)k * sstride]);
            _Pragma("GCC unroll 8") for (int h = 0; h < NH; h++) {
                __m512 w0, w1;
                q_dec_int8(p + 32 * h, nh[h], vs, &w0, &w1);
                _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {
                    acc[i][2 * h] = _mm512_fmadd_ps(a[i], w0, acc[i][2 * h]);
                    acc[i][2 * h + 1] = _mm512_fmadd_ps(a[i], w1, acc[i][2 * h + 1]);
                }
            }
        } else {
            const uint8_t *q = (const uint8_t *)data;
            _Pragma("GCC unroll 16") for (int h = 0; h < NH; h += 4)
                _mm_prefetch((const char *)(q + ((at + QPFD * cols) >> 1) + 16 * h), _MM_HINT_T0);
            _Pragma("GCC unroll 8") for (int h = 0; h < NH; h++) {
                __m512 w0, w1;
                q_dec_int4(q, at + 32 * h, nh[h], lut + (size_t)k * 16, &w0, &w1);
                _Pragma("GCC unroll 4") for (int i = 0; i < MR; i++) {
                    acc[i][2 * h] = _mm512_fmadd_ps(a[i], w0, acc[i][2 * h]);
                    acc[i][2 * h + 1] = _mm512_fmadd_ps(a[i], w1, acc[i][2 * h + 1]);
                }
            }
        }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; i++)
        _Pragma("GCC unroll 16") for (int h = 0; h < NH; h++)
            q_store(acc[i][2 * h], acc[i][2 * h + 1], c + (size_t)i * ldc + 32 * h, nh[h], accumulate);
}

#define Q_KERNEL_CASE(MR_, NH_)                                                                              \
    q_kernel(MR_, NH_, fmt, K, af + (size_t)p0 * lda, lda, w->data, at0, (size_t)w->cols, sc, sstride, lut, n, \
             cx + (size_t)p0 * ldc, ldc, accumulate)

/* C[p][c] (+)= sum_{k < K} A_p[k] * W[r0 + k][c0 + c] for p < m, c < nc, on expert e's quantized matrix
 * (view coordinates). af: fp32 activations, row p at af + p * lda. lut: scratch of K * 16 floats. */
static void kt_qdot_small(int m, int nc, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0, int c0,
                      float *c, size_t ldc, int accumulate, float *lut) {
    const int fmt = w->fmt;
    int ngroups = w->cols / w->group;
    size_t row0 = (size_t)e * w->rows + (size_t)(w->row0 + r0);
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int cc = 0;
    while (cc < nc) {
        int col = w->col0 + c0 + cc, g = col / w->group;
        int seg = (g + 1) * w->group - col;
        if (seg > nc - cc) seg = nc - cc;
        const float *sc = w->scale + row0 * ngroups + g;
        size_t sstride = (size_t)ngroups;
        if (fmt != KT_W_INT8) {
            const float *zr = w->zero ? w->zero + row0 * ngroups + g : NULL;
            for (int k = 0; k < K; k++) {
                float s = sc[(size_t)k * sstride], off = fmt == KT_W_INT4 ? -8.0f * s : zr[(size_t)k * sstride];
                __m512 v = _mm512_fmadd_ps(_mm512_set1_ps(s), iota, _mm512_set1_ps(off));
                __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v));
                _mm512_storeu_ps(lut + (size_t)k * 16, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
            }
        }
        for (int p0 = 0; p0 < m; p0 += QMR) {
            int mr = m - p0 < QMR ? m - p0 : QMR;
            int width = mr == 1 ? 256 : mr == 2 ? 128 : 64; /* 16 accumulators */
            for (int x = 0; x < seg; x += width) {
                int n = seg - x < width ? seg - x : width, nhv = (n + 31) / 32;
                size_t at0 = row0 * (size_t)w->cols + (size_t)(col + x);
                float *cx = c + cc + x;
                switch (mr * 16 + nhv) {
                case 0x11: Q_KERNEL_CASE(1, 1); break;
                case 0x12: Q_KERNEL_CASE(1, 2); break;
                case 0x13: Q_KERNEL_CASE(1, 3); break;
                case 0x14: Q_KERNEL_CASE(1, 4); break;
                case 0x15: Q_KERNEL_CASE(1, 5); break;
                case 0x16: Q_KERNEL_CASE(1, 6); break;
                case 0x17: Q_KERNEL_CASE(1, 7); break;
                case 0x18: Q_KERNEL_CASE(1, 8); break;
                case 0x21: Q_KERNEL_CASE(2, 1); break;
                case 0x22: Q_KERNEL_CASE(2, 2); break;
                case 0x23: Q_KERNEL_CASE(2, 3); break;
                case 0x24: Q_KERNEL_CASE(2, 4); break;
                case 0x31: Q_KERNEL_CASE(3, 1); break;
                case 0x32: Q_KERNEL_CASE(3, 2); break;
                case 0x41: Q_KERNEL_CASE(4, 1); break;
                default: Q_KERNEL_CASE(4, 2); break;
                }
            }
        }
        cc += seg;
    }
}

#endif
