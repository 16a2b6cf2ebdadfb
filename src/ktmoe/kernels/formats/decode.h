/* Bytes -> values for every weight format: portable C, static so that each level compiles its own copy
 * with its own vector flags. A decode run covers n weights of one row that share one scale block; the
 * result is exactly the bf16 value the kernels multiply with (Python's WeightFormat.dequantize agrees). */
#ifndef KTMOE_FORMATS_DECODE_H
#define KTMOE_FORMATS_DECODE_H

#include "../slots.h"

static inline size_t kt_code_index(const kt_wmat *w, int e, int r, int c) {
    return ((size_t)e * (size_t)w->rows + (size_t)r) * (size_t)w->cols + (size_t)c;
}

/* Prefetches the codes of row r, columns [c, c + n) of expert e (absolute coordinates) into the caches. */
static inline void kt_prefetch_wrow(const kt_wmat *w, int bits, int e, int r, int c, int n) {
    const size_t at = kt_code_index(w, e, r, c), bytes = ((size_t)n * bits + 7) / 8 + 1;
    const char *p = (const char *)w->data + at * bits / 8;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
    __builtin_prefetch(p + bytes - 1);
}

/* Rows [i0, i1) of block b (relative to b->r0) prefetched. */
static inline void kt_prefetch_wblock(const kt_wblock *b, int i0, int i1) {
    if (i1 > b->nr) i1 = b->nr;
    if (i0 >= i1) return;
    const kt_wmat *w = b->w;
    const int bits = kt_format_bits(w->fmt);
    for (int i = i0; i < i1; i++) kt_prefetch_wrow(w, bits, b->e, w->row0 + b->r0 + i, w->col0 + b->c0, b->nc);
}

static inline void kt_decode_bf16(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    memcpy(d, (const bf16_t *)w->data + kt_code_index(w, e, r, c), sizeof(bf16_t) * (size_t)n);
}

/* d[i] = bf16(s * q[i]) */
static inline void kt_decode_int8(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    const int8_t *q = (const int8_t *)w->data + kt_code_index(w, e, r, c);
    float s = w->scale[kt_scale_index(w, e, r, c)];
#pragma omp simd
    for (int j = 0; j < n; j++) d[j] = kt_round_bf16(s * (float)q[j]);
}

/* d[i] = bf16(fma(s, nibble(at + i), off)), two codes per byte, low nibble first. The fused multiply-add is
 * the definition (one rounding), so every level and the register-decoding kernels agree bit for bit. */
static inline void kt_decode_nibbles(const uint8_t *q, size_t at, int n, float s, float off, bf16_t *d) {
    int i = 0;
    if (n > 0 && (at & 1)) { /* odd start: the high nibble of the first byte */
        d[0] = kt_round_bf16(__builtin_fmaf(s, (float)(q[at >> 1] >> 4), off));
        i = 1;
    }
    const uint8_t *b = q + ((at + (size_t)i) >> 1);
    int pairs = (n - i) / 2;
#pragma omp simd
    for (int j = 0; j < pairs; j++) {
        d[i + 2 * j] = kt_round_bf16(__builtin_fmaf(s, (float)(b[j] & 15), off));
        d[i + 2 * j + 1] = kt_round_bf16(__builtin_fmaf(s, (float)(b[j] >> 4), off));
    }
    i += 2 * pairs;
    if (i < n) d[i] = kt_round_bf16(__builtin_fmaf(s, (float)(b[pairs] & 15), off)); /* odd end: a low nibble */
}

static inline void kt_decode_int4(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    float s = w->scale[kt_scale_index(w, e, r, c)];
    kt_decode_nibbles((const uint8_t *)w->data, kt_code_index(w, e, r, c), n, s, -8.0f * s, d);
}

static inline void kt_decode_int4_1(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    size_t si = kt_scale_index(w, e, r, c);
    kt_decode_nibbles((const uint8_t *)w->data, kt_code_index(w, e, r, c), n, w->scale[si], w->zero[si], d);
}

/* The exact fp32 value of a float8 e4m3fn byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
 * is subnormal (m * 2^-9), 0x7f / 0xff are NaN, there is no infinity. Normal values move their fields into
 * fp32's (exponent rebased by 127 - 7); subnormals are small integers times a power of two: both exact, and
 * written with selects so that the loops below vectorize. */
static inline float kt_e4m3_value(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80u) << 24, e = (b >> 3) & 15u, m = b & 7u;
    kt_bits32 normal, sub;
    normal.u = sign | ((e + 120u) << 23) | (m << 20);
    sub.f = (float)m * 0x1p-9f;
    sub.u |= sign;
    uint32_t u = e ? normal.u : sub.u;
    u = (b & 0x7fu) == 0x7fu ? (sign | 0x7fc00000u) : u;
    kt_bits32 r;
    r.u = u;
    return r.f;
}

/* d[i] = bf16(s * v[i]): the fp32 product, then one round to nearest even to bf16 (the dequantization
 * DeepSeek's checkpoints define: fp8 -> fp32, times the fp32 scale_inv, cast to bf16). */
static inline void kt_decode_fp8(const kt_wmat *w, int e, int r, int c, int n, bf16_t *d) {
    const uint8_t *q = (const uint8_t *)w->data + kt_code_index(w, e, r, c);
    float s = w->scale[kt_scale_index(w, e, r, c)];
#pragma omp simd
    for (int j = 0; j < n; j++) d[j] = kt_round_bf16(s * kt_e4m3_value(q[j]));
}

/* The table of a level's decode slots, in enum kt_wfmt order. */
#define KT_GENERIC_DECODE {kt_decode_bf16, kt_decode_int8, kt_decode_int4, kt_decode_int4_1, kt_decode_fp8}

#endif
