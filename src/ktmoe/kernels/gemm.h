/* The two GEMM micro-kernel contracts every ISA level implements.
 *
 * This header is included by isa_*.c translation units after they have chosen an implementation
 * (gemm_generic.h or an intrinsics header). All functions are `static` so each ISA compile gets its own
 * copy, built with that ISA's flags.
 *
 *   gemm_nt:  C[m*ldc + n] = sum_k A_m[k] * B[n*ldb + k]      (forward:  y = x W^T, W is [N, K])
 *   gemm_nn:  C[m*ldc + n] = sum_k A_m[k] * B[k*ldb + n]      (backward: dx = dy W, W is [K, N])
 *
 * A is given as an array of M row pointers (bf16, K contiguous values each) so a gather by token index
 * costs nothing. B is bf16 (or fp32 for gemm_nt when b_is_f32, used by the small LoRA A matrices).
 * C is fp32, overwritten (never accumulated), rows contiguous with stride ldc >= N.
 * Any M >= 1, N >= 1, K >= 0 is valid (K == 0 writes zeros). Accumulation is in fp32.
 */
#ifndef KTMOE_GEMM_H
#define KTMOE_GEMM_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float bf16_to_f32(bf16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

typedef union { uint32_t u; float f; } kt_bits32;

/* Branch-free widening that vectorizes inside loops. */
static inline float kt_bf(bf16_t v) { kt_bits32 b; b.u = (uint32_t)v << 16; return b.f; }

/* Round to nearest even; NaN stays NaN (quiet). */
static inline bf16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

#endif
