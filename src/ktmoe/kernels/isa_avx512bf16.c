/* The avx512bf16 level: hand-written vdpbf16ps GEMM kernels. */
#include <immintrin.h>

#include "gemm_avx512bf16.h"

/* 12 independent dot-product chains hide the instruction's latency. */
static double peak_loop_dpbf16(long iters) {
    __m512 acc[12];
    for (int a = 0; a < 12; a++) acc[a] = _mm512_setzero_ps();
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3400);
    for (long i = 0; i < iters; i++) {
#pragma GCC unroll 12
        for (int a = 0; a < 12; a++) acc[a] = _mm512_dpbf16_ps(acc[a], x, y);
    }
    __m512 s = acc[0];
    for (int a = 1; a < 12; a++) s = _mm512_add_ps(s, acc[a]);
    volatile float sink = _mm512_reduce_add_ps(s);
    (void)sink;
    return (double)iters * 12 * 64;
}

#define KT_OPS_NAME kt_ops_avx512bf16
#define KT_ISA_LABEL "avx512bf16"
#define KT_PEAK_LOOP peak_loop_dpbf16
#include "stages.inc.c"
