/* The MoE expert stages, forward and backward, for all experts of a layer per call.
 *
 * Included once per ISA level by isa_<level>.c, which first includes a GEMM header providing gemm_nt and
 * gemm_nn (see gemm.h) and defines KT_OPS_NAME and KT_PEAK_LOOP. Everything here is static, so each level
 * gets its own copy compiled with its own -m flags, and the plain loops below are vectorized for it.
 *
 * Notation: pairs (token t, expert e) sorted by expert; part p of the TP split owns intermediate columns
 * [i0, i0 + Ip). s = lora_alpha / r. Per pair with routing weight w:
 *   g = Wg x + s Bg (Ag x),  u = Wu x + s Bu (Au x),  h = silu(g) u,  d = Wd h + s Bd (Ad h),  y += w d
 * Backward with dy: dhu = Wd^T dy + s Ad^T (Bd^T dy) (unweighted), dw = <dhu, h>, dh = w dhu, ... */
#include <math.h>
#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"

#define NB 64  /* output columns per task block */
#define MC 128 /* rows per GEMM chunk inside a task */
#define KT_COMMA ,
#define NBB 128 /* intermediate columns per backward down task: longer runs for quantized decoding */
#define NBH 256 /* columns of H per task in the stages that write per-pair rows of H */

/* ---- element-wise helpers that vectorize (no libm calls) ---- */

/* exp(x) for x in float range: Cody-Waite reduction + degree-6 polynomial; rel. error ~2e-7. */
static inline float kt_expf(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693145752f;
    r = r - n * 1.42860677e-06f;
    float p = 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    kt_bits32 s;
    s.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * s.f;
}

static inline float kt_sigmoid(float g) { return 1.0f / (1.0f + kt_expf(-g)); }

static inline bf16_t kt_round_bf16(float f) {
    kt_bits32 b;
    b.f = f;
    if ((b.u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((b.u >> 16) | 0x40u);
    return (bf16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
}

static inline size_t zmin(size_t a, size_t b) { return a < b ? a : b; }

/* ---- frozen weights: one block of an expert's matrix as bf16 ----
 * bf16 weights are read where they lie; quantized ones are decoded into the caller's scratch (the same
 * packed bytes serve forward and the transposed backward access: nothing is stored twice). */

/* d[i] = bf16(s * q[i]) for int8 codes. */
static void dequant_run_int8(const int8_t *q, int n, float s, bf16_t *d) {
    int i = 0;
#if defined(__AVX512BF16__)
    __m512 vs = _mm512_set1_ps(s);
    for (; i + 32 <= n; i += 32) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(q + i));
        __m512 lo = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))));
        __m512 hi = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))));
        _mm512_storeu_si512((void *)(d + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
#endif
#pragma omp simd
    for (int j = i; j < n; j++) d[j] = kt_round_bf16(s * (float)q[j]);
}

/* d[i] = bf16(s * nibble(at + i) + off) for int4 codes two per byte, low nibble first. */
static void dequant_run_int4(const uint8_t *q, size_t at, int n, float s, float off, bf16_t *d) {
    int i = 0;
    if (n > 0 && (at & 1)) { /* odd start: the high nibble of the first byte */
        d[0] = kt_round_bf16(s * (float)(q[at >> 1] >> 4) + off);
        i = 1;
    }
    const uint8_t *b = q + ((at + (size_t)i) >> 1);
    int pairs = (n - i) / 2;
    int p = 0;
#if defined(__AVX512BF16__)
    __m512 vs = _mm512_set1_ps(s), voff = _mm512_set1_ps(off);
    __m512i lo_idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512i hi_idx = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (; p + 16 <= pairs; p += 16) {
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + p)));
        __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
        __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
        __m512 e0 = _mm512_fmadd_ps(vs, _mm512_permutex2var_ps(lo, lo_idx, hi), voff); /* elements 0..15 */
        __m512 e1 = _mm512_fmadd_ps(vs, _mm512_permutex2var_ps(lo, hi_idx, hi), voff); /* 16..31 */
        _mm512_storeu_si512((void *)(d + i + 2 * p), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
    }
#endif
#pragma omp simd
    for (int j = p; j < pairs; j++) {
        d[i + 2 * j] = kt_round_bf16(s * (float)(b[j] & 15) + off);
        d[i + 2 * j + 1] = kt_round_bf16(s * (float)(b[j] >> 4) + off);
    }
    i += 2 * pairs;
    if (i < n) d[i] = kt_round_bf16(s * (float)(b[pairs] & 15) + off); /* odd end: a low nibble */
}

static void dequant_block(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst) {
    int ngroups = w->cols / w->group;
    for (int r = 0; r < nr; r++) {
        size_t row = (size_t)e * w->rows + (size_t)(w->row0 + r0 + r);
        const float *sc = w->scale + row * ngroups, *zr = w->zero ? w->zero + row * ngroups : NULL;
        bf16_t *d = dst + (size_t)r * nc;
        int c = 0;
        while (c < nc) {
            int col = w->col0 + c0 + c, g = col / w->group;
            int run = (g + 1) * w->group - col;
            if (run > nc - c) run = nc - c;
            float s = sc[g];
            size_t at = row * w->cols + (size_t)col;
            if (w->fmt == KT_W_INT8)
                dequant_run_int8((const int8_t *)w->data + at, run, s, d + c);
            else
                dequant_run_int4((const uint8_t *)w->data, at, run, s, w->fmt == KT_W_INT4 ? -8.0f * s : zr[g], d + c);
            c += run;
        }
    }
}

/* Rows [r0, r0 + nr) x columns [c0, c0 + nc) of expert e's matrix, relative to the part's view, as bf16
 * with row stride *ld. bf16 blocks are read in place; quantized ones are decoded into `scratch`, which
 * holds w_scratch_elems() values. (Copying bf16 blocks of the backward NN GEMMs into contiguous scratch
 * was measured slower: the copy costs more than the strided re-reads it saves.) */
static const bf16_t *w_block(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *scratch, size_t *ld) {
    if (w->fmt == KT_W_BF16) {
        *ld = (size_t)w->cols;
        return (const bf16_t *)w->data + ((size_t)e * w->rows + (size_t)(w->row0 + r0)) * w->cols + w->col0 + c0;
    }
    dequant_block(w, e, r0, nr, c0, nc, scratch);
    *ld = (size_t)nc;
    return scratch;
}

static inline size_t w_scratch_elems(const kt_wmat *w, size_t nr, size_t nc) {
    return w->fmt == KT_W_BF16 ? 0 : nr * nc;
}

/* ---- fused small-M NN products on quantized weights (AVX-512-BF16 level only) ----
 * C[p][c] (+)= sum_k A_p[k] * W[r0 + k][c0 + c] for few activation rows p, decoding each weight in
 * registers (never writing a decoded block). Weights are exactly the bf16 values dequant_block() produces:
 * INT8 bf16(s * q); INT4 / INT4_1 bf16(fma(s, n, off)) taken from a per-(row, group) 16-entry fp32 table.
 * Products of the (bf16-valued) activations and weights are exact in fp32; sums accumulate in fp32.
 * 32 weights decode into (even columns, odd columns) fp32 vectors; stores interleave them back. */
#if defined(__AVX512BF16__)
#define KT_QFUSED 1
#define QMR 4     /* activation rows per register block */
#ifndef QPFD
#define QPFD 32 /* software prefetch distance in weight rows (rows are strided) */
#endif
/* experts with at most this many pairs take the fused path (measured break-even vs decode + gemm_nn: int4
 * decoding costs more in the block form, so it wins up to more pairs) */
#define QSMALL_M(fmt) ((fmt) == KT_W_INT8 ? 8 : 16)

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
static void qnn_small(int m, int nc, int K, const float *af, size_t lda, const kt_wmat *w, int e, int r0, int c0,
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
#else
#define KT_QFUSED 0
#define QSMALL_M(fmt) 0
#endif

/* ---- LoRA gradient outer products ----
 * out[j, n] += sum_p coef[p, j] * x_p[n] for j < R, n < N: the pair-reductions of the LoRA grads.
 * Register-blocked with GCC vector types (lowered to each file's ISA): 4 output rows x 32 columns stay in
 * registers across all pairs. x rows are fp32 (base + p * ldx) or bf16 (row pointers). */
typedef float kt_v16f __attribute__((vector_size(64)));
typedef uint16_t kt_v16h __attribute__((vector_size(32)));
typedef uint32_t kt_v16u __attribute__((vector_size(64)));

static inline kt_v16f v16_from_f32(const float *p) {
    kt_v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline kt_v16f v16_from_bf16(const bf16_t *p) {
    kt_v16h h;
    memcpy(&h, p, sizeof h);
    kt_v16u u = __builtin_convertvector(h, kt_v16u) << 16;
    kt_v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* 32 values of row x_p from column n0 as two vectors; a short tail is padded with zeros. */
static inline void x32_f32(const float *row, int nb, kt_v16f *x0, kt_v16f *x1) {
    if (nb == 32) {
        *x0 = v16_from_f32(row);
        *x1 = v16_from_f32(row + 16);
        return;
    }
    float t[32] = {0};
    memcpy(t, row, sizeof(float) * (size_t)nb);
    *x0 = v16_from_f32(t);
    *x1 = v16_from_f32(t + 16);
}
static inline void x32_bf16(const bf16_t *row, int nb, kt_v16f *x0, kt_v16f *x1) {
    if (nb == 32) {
        *x0 = v16_from_bf16(row);
        *x1 = v16_from_bf16(row + 16);
        return;
    }
    bf16_t t[32] = {0};
    memcpy(t, row, sizeof(bf16_t) * (size_t)nb);
    *x0 = v16_from_bf16(t);
    *x1 = v16_from_bf16(t + 16);
}

#define KT_OUTER_ACCUM(NAME, XARG, XROW, XLOAD)                                                              \
    static void NAME(int M, int R, int N, const float *coef, size_t ldcoef, XARG, float *out, size_t ldo) { \
        for (int n0 = 0; n0 < N; n0 += 32) {                                                                 \
            int nb = N - n0 < 32 ? N - n0 : 32;                                                              \
            for (int j0 = 0; j0 < R; j0 += 4) {                                                              \
                int jb = R - j0 < 4 ? R - j0 : 4;                                                            \
                kt_v16f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0}; \
                for (int p = 0; p < M; p++) {                                                                \
                    const float *cp = coef + (size_t)p * ldcoef + j0;                                        \
                    float c0 = cp[0], c1 = jb > 1 ? cp[1] : 0.f, c2 = jb > 2 ? cp[2] : 0.f;                  \
                    float c3 = jb > 3 ? cp[3] : 0.f;                                                         \
                    kt_v16f x0, x1;                                                                          \
                    XLOAD(XROW(p) + n0, nb, &x0, &x1);                                                       \
                    a00 += c0 * x0; a01 += c0 * x1; a10 += c1 * x0; a11 += c1 * x1;                          \
                    a20 += c2 * x0; a21 += c2 * x1; a30 += c3 * x0; a31 += c3 * x1;                          \
                }                                                                                            \
                kt_v16f acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};                                   \
                for (int j = 0; j < jb; j++) {                                                               \
                    float t[32];                                                                             \
                    memcpy(t, &acc[2 * j], sizeof t);                                                        \
                    float *o = out + (size_t)(j0 + j) * ldo + n0;                                            \
                    for (int n = 0; n < nb; n++) o[n] += t[n];                                               \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }

#define KT_ROW_F32(p) (x + (size_t)(p) * ldx)
#define KT_ROW_BF16(p) (x[p])
KT_OUTER_ACCUM(outer_accum_f32, const float *x KT_COMMA size_t ldx, KT_ROW_F32, x32_f32)
KT_OUTER_ACCUM(outer_accum_bf16, const bf16_t *const *x, KT_ROW_BF16, x32_bf16)

/* dst[c, r] = src[r, c] for an R x C block (small LoRA matrices). */
static void transpose_f32(const float *src, size_t lds, int R, int C, float *dst, size_t ldd) {
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) dst[(size_t)c * ldd + r] = src[(size_t)r * lds + c];
}

/* ---- the call's shared state ---- */

typedef struct {
    kt_ctx *ctx;
    const kt_layer *L;
    kt_engine *eng;
    int *active;       /* experts with at least one pair, largest first */
    int nactive;
    int nblk_i[KT_MAX_PARTS]; /* column blocks (NB) of each part's intermediate slice */
    int nblk_b[KT_MAX_PARTS]; /* the same in NBB blocks (backward down stage) */
    int nblk_h;        /* column blocks of H */
    float s;
    /* forward */
    const void *x;
    int x_is_f32;
    void *out;
    int out_is_f32;
    bf16_t *h[KT_MAX_PARTS];  /* [npairs, Ip] */
    float *pairbuf;           /* [nparts, npairs, H] per-pair output rows, summed per token by combine */
    /* backward */
    const void *dy;
    int dy_is_f32;
    bf16_t *dyb;              /* [T, H] */
    bf16_t *dg[KT_MAX_PARTS], *du[KT_MAX_PARTS]; /* [npairs, Ip] */
    float *bd;                /* [npairs, r] Bd^T dy */
    float *bg[KT_MAX_PARTS], *bu[KT_MAX_PARTS];  /* [npairs, r] this part's dg Bg, du Bu */
    float *dwp[KT_MAX_PARTS]; /* [nblk_b, npairs] partial <dhu, h> */
    float *const *grads;
    atomic_int failed;        /* first problem found by a task: 1 = non-finite input, 2 = out of memory */
    atomic_int bad_row;
} stage_args;

static void fail(stage_args *a, int code, int row) {
    int zero = 0;
    if (atomic_compare_exchange_strong(&a->failed, &zero, code)) atomic_store(&a->bad_row, row);
}

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
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = a->active[task], r = L->r;
    size_t H = (size_t)L->H;
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, ctx->x, H, p0, m);
        gemm_nt(m, r, (int)H, rows, L->gate_a + (size_t)e * r * H, H, 1, ctx->ag + (size_t)p0 * r, (size_t)r);
        gemm_nt(m, r, (int)H, rows, L->up_a + (size_t)e * r * H, H, 1, ctx->au + (size_t)p0 * r, (size_t)r);
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
    outer_accum_f32(r, M, N, lT, (size_t)M, bT, (size_t)N, c, ldc);
    return 1;
}

/* gate+up GEMMs with LoRA, then h = silu(g) * u. Task = (active expert, column block of the part). */
static void fwd_gate_up_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int nblk = a->nblk_i[part];
    int e = a->active[task / nblk];
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    int n0 = (task % nblk) * NB, nb = Ip - n0 < NB ? Ip - n0 : NB;
    int H = L->H, r = L->r;
    size_t deq = w_scratch_elems(&L->gate[part], (size_t)nb, (size_t)H);
    float *cg = kt_scratch(a->eng, tid, sizeof(float) * 2 * MC * NB + sizeof(bf16_t) * 2 * deq);
    if (!cg) {
        fail(a, 2, 0);
        return;
    }
    float *cu = cg + MC * NB;
    bf16_t *dq = (bf16_t *)(cu + MC * NB);
    size_t ldg, ldu;
    const bf16_t *wg = w_block(&L->gate[part], e, n0, nb, 0, H, dq, &ldg);
    const bf16_t *wu = w_block(&L->up[part], e, n0, nb, 0, H, dq + deq, &ldu);
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, ctx->x, (size_t)H, p0, m);
        gemm_nt(m, nb, H, rows, wg, ldg, 0, cg, NB);
        gemm_nt(m, nb, H, rows, wu, ldu, 0, cu, NB);
        if (r > 0) {
            size_t brow = ((size_t)e * L->I + (size_t)(i0 + n0)) * r;
            if (!add_lora_out(a, tid, cg, NB, m, nb, ctx->ag + (size_t)p0 * r, L->gate_b + brow, r, a->s) ||
                !add_lora_out(a, tid, cu, NB, m, nb, ctx->au + (size_t)p0 * r, L->up_b + brow, r, a->s)) {
                fail(a, 2, 0);
                return;
            }
        }
        for (int i = 0; i < m; i++) {
            size_t at = (size_t)(p0 + i) * Ip + n0;
            bf16_t *h = a->h[part] + at;
            const float *gi = cg + (size_t)i * NB, *ui = cu + (size_t)i * NB;
            bf16_t gb[NB], ub[NB];
#pragma omp simd
            for (int n = 0; n < nb; n++) {
                gb[n] = kt_round_bf16(gi[n]);
                ub[n] = kt_round_bf16(ui[n]);
                float g = kt_bf(gb[n]);
                h[n] = kt_round_bf16(g * kt_sigmoid(g) * kt_bf(ub[n]));
            }
            if (ctx->g[part]) {
                memcpy(ctx->g[part] + at, gb, sizeof(bf16_t) * (size_t)nb);
                memcpy(ctx->u[part] + at, ub, sizeof(bf16_t) * (size_t)nb);
            }
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
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_pair(rows, a->h[part], (size_t)Ip, p0, m);
        gemm_nt(m, r, Ip, rows, L->down_a + (size_t)e * r * L->I + i0, (size_t)L->I, 1,
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
    b.n0 = (task % a->nblk_h) * NBH;
    b.nb = ctx->H - b.n0 < NBH ? ctx->H - b.n0 : NBH;
    b.Ip = ctx->part_i0[part + 1] - ctx->part_i0[part];
    b.pairs = a->pairbuf + (size_t)part * ctx->npairs * ctx->H;
    return b;
}

/* Down GEMM with LoRA, scaled by the routing weight, into the part's per-pair buffer [npairs, H].
 * Task = (active expert, column block of H); the combine stage then sums each token's pairs. */
static void fwd_down_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int H = L->H, r = L->r;
    hblock b = hblock_of(a, part, task);
    int e = b.e, n0 = b.n0, nb = b.nb, Ip = b.Ip;
    float *dp = b.pairs;
    size_t deq = w_scratch_elems(&L->down[part], (size_t)nb, (size_t)Ip), ldd;
    bf16_t *dq = deq ? kt_scratch(a->eng, tid, sizeof(bf16_t) * deq) : NULL;
    if (deq && !dq) {
        fail(a, 2, 0);
        return;
    }
    const bf16_t *wd = w_block(&L->down[part], e, n0, nb, 0, Ip, dq, &ldd);
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        float *c = dp + (size_t)p0 * H + n0;
        rows_by_pair(rows, a->h[part], (size_t)Ip, p0, m);
        gemm_nt(m, nb, Ip, rows, wd, ldd, 0, c, (size_t)H);
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

static int setup(stage_args *a, kt_ctx *ctx, const kt_layer *L, kt_engine *eng, char *err) {
    memset(a, 0, sizeof *a);
    a->ctx = ctx;
    a->L = L;
    a->eng = eng;
    a->s = L->r > 0 ? L->lora_scale : 0.f;
    a->active = kt_shared_buffer(eng, KT_SH_TASKS, sizeof(int) * (size_t)ctx->E);
    if (!a->active) {
        snprintf(err, KT_ERRLEN, "out of memory");
        return KT_ENOMEM;
    }
    for (int e = 0; e < ctx->E; e++)
        if (ctx->expert_off[e + 1] > ctx->expert_off[e]) a->active[a->nactive++] = e;
    /* largest experts first: the dynamic task queue then balances the tail */
    for (int i = 1; i < a->nactive; i++) {
        int e = a->active[i], me = ctx->expert_off[e + 1] - ctx->expert_off[e], j = i;
        while (j > 0 && ctx->expert_off[a->active[j - 1] + 1] - ctx->expert_off[a->active[j - 1]] < me) {
            a->active[j] = a->active[j - 1];
            j--;
        }
        a->active[j] = e;
    }
    for (int p = 0; p < ctx->nparts; p++) {
        a->nblk_i[p] = (ctx->part_i0[p + 1] - ctx->part_i0[p] + NB - 1) / NB;
        a->nblk_b[p] = (ctx->part_i0[p + 1] - ctx->part_i0[p] + NBB - 1) / NBB;
    }
    a->nblk_h = (ctx->H + NBH - 1) / NBH;
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



static int forward_impl(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x, int x_is_f32, void *out,
                        int out_is_f32, char *err) {
    stage_args a;
    int rc = setup(&a, ctx, L, eng, err);
    if (rc) return rc;
    int P = ctx->nparts;
    a.out = out;
    a.out_is_f32 = out_is_f32;
    convert_rows(&a, x, x_is_f32, ctx->x);
    if ((rc = finish(&a, "hidden_states", err))) return rc;
    if ((rc = part_matrices(&a, KT_SH_H, a.h, err))) return rc;
    if ((rc = pair_buffer(&a, err))) return rc;
    int nt[KT_MAX_PARTS];
    if (L->r > 0) run_all_timed(&a, "fwd_lora_in", a.nactive, fwd_lora_in_task, &a);
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_i[p];
    run_parts_timed(&a, "fwd_gate_up", nt, fwd_gate_up_task, &a);
    if (L->r > 0) {
        for (int p = 0; p < P; p++) nt[p] = a.nactive;
        run_parts_timed(&a, "fwd_lora_mid", nt, fwd_lora_mid_task, &a);
    }
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_h;
    run_parts_timed(&a, "fwd_down", nt, fwd_down_task, &a);
    combine_pairs(&a, out, out_is_f32);
    return finish(&a, "hidden_states", err);
}

/* ---- backward ---- */

/* bd = Bd^T dy for every pair (shared by parts). Task = active expert. */
static void bwd_lora_dy_task(void *arg, int part, int task, int tid) {
    (void)part;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    int e = a->active[task], r = ctx->r, H = ctx->H;
    float *bdT = kt_scratch(a->eng, tid, sizeof(float) * (size_t)r * H);
    if (!bdT) {
        fail(a, 2, 0);
        return;
    }
    transpose_f32(a->L->down_b + (size_t)e * H * r, (size_t)r, H, r, bdT, (size_t)H);
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, a->dyb, (size_t)H, p0, m);
        gemm_nt(m, r, H, rows, bdT, (size_t)H, 1, a->bd + (size_t)p0 * r, (size_t)r);
    }
}

/* The fused form of bwd_down_act's weight product: c [m, NBB] = dy Wd[:, block]. Kept out of line so the
 * task's general path compiles as before. */
static __attribute__((noinline)) void bwd_down_fused(const kt_layer *L, int part, int e, int m, int n0, int nb,
                                                     const bf16_t *const *rows, float *c, float *f) {
#if KT_QFUSED
    int H = L->H;
    float *af = f, *lut = af + (size_t)m * H;
    for (int i = 0; i < m; i++) {
        float *fi = af + (size_t)i * H;
#pragma omp simd
        for (int k = 0; k < H; k++) fi[k] = kt_bf(rows[i][k]);
    }
    qnn_small(m, nb, H, af, (size_t)H, &L->down[part], e, 0, n0, c, NBB, 0, lut);
#else
    (void)L; (void)part; (void)e; (void)m; (void)n0; (void)nb; (void)rows; (void)c; (void)f;
#endif
}

/* Down backward + activation backward, and the LoRA grads this (expert, column block) owns:
 * dA_d[:, block], dB_g[block, :], dB_u[block, :]. Task = (active expert, column block of the part). */
static void bwd_down_act_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int nblk = a->nblk_b[part], blk = task % nblk;
    int e = a->active[task / nblk];
    int i0 = ctx->part_i0[part], Ip = ctx->part_i0[part + 1] - i0;
    int n0 = blk * NBB, nb = Ip - n0 < NBB ? Ip - n0 : NBB;
    int H = L->H, r = L->r, I = L->I;
    float s = a->s;
    int me = ctx->expert_off[e + 1] - ctx->expert_off[e];
    int fused = KT_QFUSED && L->down[part].fmt != KT_W_BF16 && me <= QSMALL_M(L->down[part].fmt);
    size_t deq = fused ? 0 : w_scratch_elems(&L->down[part], (size_t)H, (size_t)nb), ldd = 0;
    size_t fx = fused ? (size_t)me * H + 16 * (size_t)H : 0; /* fp32 dy rows + decode tables */
    size_t lora = (size_t)r * (4 * MC + 2 * NBB);
    float *c = kt_scratch(a->eng, tid, sizeof(float) * (4 * MC * NBB + lora + fx) + sizeof(bf16_t) * deq);
    if (!c) {
        fail(a, 2, 0);
        return;
    }
    float *hf = c + MC * NBB, *dgf = hf + MC * NBB, *duf = dgf + MC * NBB;
    float *cd = duf + MC * NBB, *cg = cd + (size_t)MC * r, *cu = cg + (size_t)MC * r;
    float *bgT = cu + (size_t)MC * r, *buT = bgT + (size_t)r * NBB; /* dB_g^T, dB_u^T of this block */
    float *cT = buT + (size_t)r * NBB;                                /* [r, m] coefficients */
    float *fxb = cT + (size_t)r * MC;
    const bf16_t *wd = fused ? NULL : w_block(&L->down[part], e, 0, H, n0, nb, (bf16_t *)fxb, &ldd);
    float *gAd = NULL, *gBg = NULL, *gBu = NULL;
    if (r > 0) {
        gAd = a->grads[4] + (size_t)e * r * I + i0 + n0;           /* [r, I] at column i0 + n0 */
        gBg = a->grads[1] + ((size_t)e * I + (size_t)(i0 + n0)) * r; /* [I, r] at row i0 + n0 */
        gBu = a->grads[3] + ((size_t)e * I + (size_t)(i0 + n0)) * r;
        for (int j = 0; j < r; j++) memset(gAd + (size_t)j * I, 0, sizeof(float) * (size_t)nb);
        memset(bgT, 0, sizeof(float) * 2 * (size_t)r * NBB);
    }
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_token(rows, ctx, a->dyb, (size_t)H, p0, m);
        if (__builtin_expect(fused, 0)) {
            bwd_down_fused(L, part, e, m, n0, nb, rows, c, fxb);
        } else {
            gemm_nn(m, nb, H, rows, wd, ldd, c, NBB);
        }
        if (r > 0) { /* dhu += s (Bd^T dy) Ad[:, block] */
            for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++) cT[(size_t)j * m + i] = s * a->bd[(size_t)(p0 + i) * r + j];
            outer_accum_f32(r, m, nb, cT, (size_t)m, L->down_a + (size_t)e * r * I + i0 + n0, (size_t)I, c, NBB);
        }
        for (int i = 0; i < m; i++) {
            int p = p0 + i;
            float *ci = c + (size_t)i * NBB;
            size_t at = (size_t)p * Ip + n0;
            const bf16_t *gp = ctx->g[part] + at, *up = ctx->u[part] + at;
            float w = ctx->pair_w[p], dwacc = 0.f;
            float *hi = hf + (size_t)i * NBB, *dgi = dgf + (size_t)i * NBB, *dui = duf + (size_t)i * NBB;
            bf16_t *dgo = a->dg[part] + at, *duo = a->du[part] + at;
#pragma omp simd reduction(+ : dwacc)
            for (int n = 0; n < nb; n++) {
                float g = kt_bf(gp[n]), u = kt_bf(up[n]);
                float sg = kt_sigmoid(g);
                float h = kt_bf(kt_round_bf16(g * sg * u)); /* exactly the forward's h */
                dwacc += ci[n] * h;
                float dh = w * ci[n];
                float dg = dh * u * sg * (1.0f + g * (1.0f - sg));
                float du = dh * g * sg;
                hi[n] = h;
                dgi[n] = dg;
                dui[n] = du;
                dgo[n] = kt_round_bf16(dg);
                duo[n] = kt_round_bf16(du);
            }
            a->dwp[part][(size_t)blk * ctx->npairs + p] = dwacc;
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
        outer_accum_f32(m, r, nb, cd, (size_t)r, hf, NBB, gAd, (size_t)I);
        outer_accum_f32(m, r, nb, cg, (size_t)r, dgf, NBB, bgT, NBB);
        outer_accum_f32(m, r, nb, cu, (size_t)r, duf, NBB, buT, NBB);
    }
    if (r > 0) {
        transpose_f32(bgT, NBB, r, nb, gBg, (size_t)r);
        transpose_f32(buT, NBB, r, nb, gBu, (size_t)r);
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
    const bf16_t *rows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        rows_by_pair(rows, a->dg[part], (size_t)Ip, p0, m);
        gemm_nt(m, r, Ip, rows, bgT, (size_t)Ip, 1, a->bg[part] + (size_t)p0 * r, (size_t)r);
        rows_by_pair(rows, a->du[part], (size_t)Ip, p0, m);
        gemm_nt(m, r, Ip, rows, buT, (size_t)Ip, 1, a->bu[part] + (size_t)p0 * r, (size_t)r);
    }
}

/* The LoRA grads summed over pairs and parts: dA_g, dA_u, dB_d. Task = expert (all of them: experts with
 * no pairs get zero grads here, including the slices other stages own). */
static void bwd_lora_sum_task(void *arg, int part, int task, int tid) {
    (void)part;
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int e = task, r = L->r, H = L->H, I = L->I, P = ctx->nparts;
    float s = a->s;
    float *gAg = a->grads[0] + (size_t)e * r * H, *gAu = a->grads[2] + (size_t)e * r * H;
    float *gBd = a->grads[5] + (size_t)e * H * r;
    memset(gAg, 0, sizeof(float) * (size_t)r * H);
    memset(gAu, 0, sizeof(float) * (size_t)r * H);
    if (ctx->expert_off[e + 1] == ctx->expert_off[e]) {
        memset(gBd, 0, sizeof(float) * (size_t)r * H);
        memset(a->grads[1] + (size_t)e * I * r, 0, sizeof(float) * (size_t)I * r);
        memset(a->grads[3] + (size_t)e * I * r, 0, sizeof(float) * (size_t)I * r);
        memset(a->grads[4] + (size_t)e * r * I, 0, sizeof(float) * (size_t)r * I);
        return;
    }
    /* per chunk: s * sum_q bg_q, s * sum_q bu_q, s * w * sum_q ad_q; then dB_d^T [r, H] accumulates */
    float *cg = kt_scratch(a->eng, tid, sizeof(float) * ((size_t)3 * MC * r + (size_t)r * H));
    if (!cg) {
        fail(a, 2, 0);
        return;
    }
    float *cu = cg + (size_t)MC * r, *cd = cu + (size_t)MC * r, *bdT = cd + (size_t)MC * r;
    memset(bdT, 0, sizeof(float) * (size_t)r * H);
    const bf16_t *xrows[MC], *dyrows[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        for (int i = 0; i < m; i++) {
            size_t at = (size_t)(p0 + i) * r;
            float sw = s * ctx->pair_w[p0 + i];
            for (int j = 0; j < r; j++) {
                float bg = 0.f, bu = 0.f, ad = 0.f;
                for (int q = 0; q < P; q++) {
                    bg += a->bg[q][at + j];
                    bu += a->bu[q][at + j];
                    ad += ctx->ad[q][at + j];
                }
                cg[(size_t)i * r + j] = s * bg;
                cu[(size_t)i * r + j] = s * bu;
                cd[(size_t)i * r + j] = sw * ad;
            }
        }
        rows_by_token(xrows, ctx, ctx->x, (size_t)H, p0, m);
        rows_by_token(dyrows, ctx, a->dyb, (size_t)H, p0, m);
        outer_accum_bf16(m, r, H, cg, (size_t)r, xrows, gAg, (size_t)H);
        outer_accum_bf16(m, r, H, cu, (size_t)r, xrows, gAu, (size_t)H);
        outer_accum_bf16(m, r, H, cd, (size_t)r, dyrows, bdT, (size_t)H);
    }
    transpose_f32(bdT, (size_t)H, r, H, gBd, (size_t)r);
}

/* The fused form of bwd_dx's weight products: c1 rows (stride H) = dg Wg + du Wu over the block. */
static __attribute__((noinline)) void bwd_dx_fused(stage_args *a, int part, int e, int p0, int m, int n0, int nb, int Ip, float *c1, float *f) {
#if KT_QFUSED
    const kt_layer *L = a->L;
    float *afg = f, *afu = afg + (size_t)m * Ip, *lut = afu + (size_t)m * Ip;
    for (int i = 0; i < m; i++) {
        const bf16_t *g = a->dg[part] + (size_t)(p0 + i) * Ip, *u = a->du[part] + (size_t)(p0 + i) * Ip;
        float *fg = afg + (size_t)i * Ip, *fu = afu + (size_t)i * Ip;
#pragma omp simd
        for (int k = 0; k < Ip; k++) {
            fg[k] = kt_bf(g[k]);
            fu[k] = kt_bf(u[k]);
        }
    }
    qnn_small(m, nb, Ip, afg, (size_t)Ip, &L->gate[part], e, 0, n0, c1, (size_t)L->H, 0, lut);
    qnn_small(m, nb, Ip, afu, (size_t)Ip, &L->up[part], e, 0, n0, c1, (size_t)L->H, 1, lut);
#else
    (void)a; (void)part; (void)e; (void)p0; (void)m; (void)n0; (void)nb; (void)Ip; (void)c1; (void)f;
#endif
}

/* dx rows per pair = dg Wg + du Wu + s (bg Ag + bu Au), into the part's per-pair buffer; the combine
 * stage sums each token's pairs. Task = (active expert, column block of H). */
static void bwd_dx_task(void *arg, int part, int task, int tid) {
    stage_args *a = arg;
    const kt_ctx *ctx = a->ctx;
    const kt_layer *L = a->L;
    int H = L->H, r = L->r;
    hblock b = hblock_of(a, part, task);
    int e = b.e, n0 = b.n0, nb = b.nb, Ip = b.Ip;
    float *dp = b.pairs;
    int me = ctx->expert_off[e + 1] - ctx->expert_off[e];
    /* few pairs on quantized weights: decoded in registers, no decoded copy (see qnn_small) */
    int fused = KT_QFUSED && L->gate[part].fmt != KT_W_BF16 && me <= QSMALL_M(L->gate[part].fmt);
    size_t deq = fused ? 0 : w_scratch_elems(&L->gate[part], (size_t)Ip, (size_t)nb), ldg = 0, ldu = 0;
    size_t fx = fused ? 2 * (size_t)me * Ip + 16 * (size_t)Ip : 0; /* fp32 dg, du rows + decode tables */
    float *c2 = kt_scratch(a->eng, tid, sizeof(float) * (MC * NBH + 2 * (size_t)r * MC + fx) + sizeof(bf16_t) * 2 * deq);
    if (!c2) {
        fail(a, 2, 0);
        return;
    }
    bf16_t *dq = (bf16_t *)(c2 + MC * NBH + 2 * (size_t)r * MC);
    const bf16_t *wg = NULL, *wu = NULL;
    if (!fused) {
        wg = w_block(&L->gate[part], e, 0, Ip, n0, nb, dq, &ldg);
        wu = w_block(&L->up[part], e, 0, Ip, n0, nb, dq + deq, &ldu);
    }
    const bf16_t *rows_g[MC], *rows_u[MC];
    for (int p0 = ctx->expert_off[e]; p0 < ctx->expert_off[e + 1]; p0 += MC) {
        int m = (int)zmin(MC, (size_t)(ctx->expert_off[e + 1] - p0));
        float *c1 = dp + (size_t)p0 * H + n0;
        if (__builtin_expect(fused, 0)) {
            bwd_dx_fused(a, part, e, p0, m, n0, nb, Ip, c1, (float *)dq);
        } else {
            rows_by_pair(rows_g, a->dg[part], (size_t)Ip, p0, m);
            rows_by_pair(rows_u, a->du[part], (size_t)Ip, p0, m);
            gemm_nn(m, nb, Ip, rows_g, wg, ldg, c1, (size_t)H);
            gemm_nn(m, nb, Ip, rows_u, wu, ldu, c2, NBH);
            for (int i = 0; i < m; i++) {
                float *ci = c1 + (size_t)i * H;
                const float *c2i = c2 + (size_t)i * NBH;
#pragma omp simd
                for (int n = 0; n < nb; n++) ci[n] += c2i[n];
            }
        }
        if (r > 0) { /* + s (dg Bg) Ag + s (du Bu) Au, as products over the rank */
            float *cgT = c2 + MC * NBH, *cuT = cgT + (size_t)r * MC;
            for (int i = 0; i < m; i++)
                for (int j = 0; j < r; j++) {
                    cgT[(size_t)j * m + i] = a->s * a->bg[part][(size_t)(p0 + i) * r + j];
                    cuT[(size_t)j * m + i] = a->s * a->bu[part][(size_t)(p0 + i) * r + j];
                }
            outer_accum_f32(r, m, nb, cgT, (size_t)m, L->gate_a + (size_t)e * r * H + n0, (size_t)H, c1, (size_t)H);
            outer_accum_f32(r, m, nb, cuT, (size_t)m, L->up_a + (size_t)e * r * H + n0, (size_t)H, c1, (size_t)H);
        }
    }
}

static int backward_impl(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy, int dy_is_f32, void *dx,
                         int dx_is_f32, float *dw, float *const grads[6], char *err) {
    stage_args a;
    int rc = setup(&a, ctx, L, eng, err);
    if (rc) return rc;
    int P = ctx->nparts, T = ctx->T, H = ctx->H, r = ctx->r;
    size_t np = (size_t)ctx->npairs;
    a.out = dx;
    a.out_is_f32 = dx_is_f32;
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
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_b[p];
    run_parts_timed(&a, "bwd_down_act", nt, bwd_down_act_task, &a);
    if (r > 0) {
        for (int p = 0; p < P; p++) nt[p] = a.nactive;
        run_parts_timed(&a, "bwd_lora_mid", nt, bwd_lora_mid_task, &a);
        run_all_timed(&a, "bwd_lora_sum", ctx->E, bwd_lora_sum_task, &a);
    }
    for (int p = 0; p < P; p++) nt[p] = a.nactive * a.nblk_h;
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
    return KT_OK;
}

const kt_ops KT_OPS_NAME = {KT_ISA_LABEL, forward_impl, backward_impl, KT_PEAK_LOOP};
