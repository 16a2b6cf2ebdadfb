/* The decode slots of the AVX-512-BF16 level: 32 codes per step, converted with vcvtne2ps2bf16 (round to
 * nearest even, like kt_round_bf16). Same values as formats/decode.h, bit for bit. */
#ifndef KTMOE_AVX512BF16_DECODE_H
#define KTMOE_AVX512BF16_DECODE_H

#include <immintrin.h>

#include "../../formats/decode.h"

static void kt_decode_int8_avx512bf16(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    const int8_t *q = (const int8_t *)w->data + kt_code_index(w, e, r, c);
    float s = w->scale[kt_scale_index(w, e, r, c)];
    int i = 0;
    __m512 vs = _mm512_set1_ps(s);
    for (; i + 32 <= n; i += 32) {
        __m256i b = _mm256_loadu_si256((const __m256i *)(q + i));
        __m512 lo = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b))));
        __m512 hi = _mm512_mul_ps(vs, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1))));
        _mm512_storeu_si512((void *)(d + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (int j = i; j < n; j++) d[j] = kt_round_bf16(s * (float)q[j]);
}

/* d[i] = bf16(fma(s, nibble(at + i), off)) */
static void kt_decode_nibbles_avx512bf16(const uint8_t *q, size_t at, int n, float s, float off, bf16_t *d) {
    int i = 0;
    if (n > 0 && (at & 1)) { /* odd start: the high nibble of the first byte */
        d[0] = kt_round_bf16(__builtin_fmaf(s, (float)(q[at >> 1] >> 4), off));
        i = 1;
    }
    const uint8_t *b = q + ((at + (size_t)i) >> 1);
    int pairs = (n - i) / 2, p = 0;
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
    /* the rest (fewer than 32 codes) through the portable loop */
    kt_decode_nibbles(q, at + (size_t)i + 2 * (size_t)p, n - i - 2 * p, s, off, d + i + 2 * p);
}

static void kt_decode_int4_avx512bf16(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    float s = w->scale[kt_scale_index(w, e, r, c)];
    kt_decode_nibbles_avx512bf16((const uint8_t *)w->data, kt_code_index(w, e, r, c), n, s, -8.0f * s, d);
}

static void kt_decode_int4_1_avx512bf16(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    size_t si = kt_scale_index(w, e, r, c);
    kt_decode_nibbles_avx512bf16((const uint8_t *)w->data, kt_code_index(w, e, r, c), n, w->scale[si], w->zero[si], d);
}

/* 16 float8 e4m3fn bytes -> their exact fp32 values, the fields moved as in kt_e4m3_value. */
static inline __m512 kt_e4m3_values_avx512(__m128i bytes) {
    __m512i v = _mm512_cvtepu8_epi32(bytes);
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(v, _mm512_set1_epi32(0x80)), 24);
    __m512i mag = _mm512_and_si512(v, _mm512_set1_epi32(0x7f));
    __m512i normal = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), _mm512_set1_epi32(120 << 23));
    __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(7))), _mm512_set1_ps(0x1p-9f));
    __mmask16 is_sub = _mm512_testn_epi32_mask(v, _mm512_set1_epi32(0x78));
    __mmask16 is_nan = _mm512_cmpeq_epi32_mask(mag, _mm512_set1_epi32(0x7f));
    __m512i u = _mm512_mask_mov_epi32(normal, is_sub, _mm512_castps_si512(sub));
    u = _mm512_mask_mov_epi32(u, is_nan, _mm512_set1_epi32(0x7fc00000));
    return _mm512_castsi512_ps(_mm512_or_si512(u, sign));
}

/* d[i] = bf16(s * v[i]), as kt_decode_fp8. vcvtne2ps2bf16 flushes fp32 denormals to zero where kt_round_bf16
 * keeps them, so a step whose products include one (a scale below ~2^-117) goes through the portable loop. */
static void kt_decode_fp8_avx512bf16(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    const uint8_t *q = (const uint8_t *)w->data + kt_code_index(w, e, r, c);
    float s = w->scale[kt_scale_index(w, e, r, c)];
    __m512 vs = _mm512_set1_ps(s), tiny = _mm512_set1_ps(0x1p-126f);
    int i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 lo = _mm512_mul_ps(vs, kt_e4m3_values_avx512(_mm_loadu_si128((const __m128i *)(q + i))));
        __m512 hi = _mm512_mul_ps(vs, kt_e4m3_values_avx512(_mm_loadu_si128((const __m128i *)(q + i + 16))));
        __mmask16 den = (__mmask16)(_mm512_cmp_ps_mask(_mm512_abs_ps(lo), tiny, _CMP_LT_OQ) &
                                    _mm512_cmp_ps_mask(lo, _mm512_setzero_ps(), _CMP_NEQ_OQ)) |
                        (__mmask16)(_mm512_cmp_ps_mask(_mm512_abs_ps(hi), tiny, _CMP_LT_OQ) &
                                    _mm512_cmp_ps_mask(hi, _mm512_setzero_ps(), _CMP_NEQ_OQ));
        if (den) {
            for (int j = i; j < i + 32; j++) d[j] = kt_round_bf16(s * kt_e4m3_value(q[j]));
            continue;
        }
        _mm512_storeu_si512((void *)(d + i), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (int j = i; j < n; j++) d[j] = kt_round_bf16(s * kt_e4m3_value(q[j]));
}

#endif
