/* Scalar helpers every native file may use: the bf16 type, exact conversions, and element-wise math that
 * vectorizes (no libm calls). Everything is static inline, so each level's compile gets its own copy. */
#ifndef KTMOE_BASE_H
#define KTMOE_BASE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

typedef union { uint32_t u; float f; } kt_bits32;

static inline float bf16_to_f32(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Branch-free widening that vectorizes inside loops. */
static inline float kt_bf(bf16_t v) { kt_bits32 b; b.u = (uint32_t)v << 16; return b.f; }

/* Round to nearest even; NaN stays NaN (quiet). */
static inline bf16_t kt_round_bf16(float f) {
    kt_bits32 b;
    b.f = f;
    if ((b.u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((b.u >> 16) | 0x40u);
    return (bf16_t)((b.u + 0x7fffu + ((b.u >> 16) & 1u)) >> 16);
}
#define f32_to_bf16 kt_round_bf16

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

static inline size_t zmin(size_t a, size_t b) { return a < b ? a : b; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

#endif
