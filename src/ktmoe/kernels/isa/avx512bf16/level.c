/* The avx512bf16 level: hand-written vdpbf16ps GEMM kernels, vectorized decoding, and the fused small-M
 * quantized products. The algorithm, LoRA and activation slots come from avx512. */
#include <immintrin.h>

#include "../../core/cpu.h"
#include "decode.h"
#include "gemm.h"
#include "outer.h"
#include "panel.h"
#include "qdot.h"

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

const kt_level kt_level_avx512bf16 = {
    .name = "avx512bf16",
    .id = KT_ISA_AVX512BF16,
    .parent = KT_ISA_AVX512,
    .autoselect = 1,
    .usable = kt_cpu_usable_avx512bf16,
    /* break-even of the fused path vs decode + gemm_nn, measured on Zen 4: int4 decoding costs more in the
     * block form, so it wins up to more rows; fp8 (fused_max_m inherited: -1) always decodes into blocks */
    .blk = {.fused_max_m = {[KT_W_INT8] = 8, [KT_W_INT4] = 16, [KT_W_INT4_1] = 16},
            .mc = 256, .xpack_min_m = 40},
    .slots =
        {
            .gemm_nt = gemm_nt,
            .gemm_nn = gemm_nn,
            .decode_run = {[KT_W_INT8] = kt_decode_int8_avx512bf16, [KT_W_INT4] = kt_decode_int4_avx512bf16,
                           [KT_W_INT4_1] = kt_decode_int4_1_avx512bf16, [KT_W_FP8] = kt_decode_fp8_avx512bf16},
            .qdot_small = kt_qdot_small,
            .outer_f32 = kt_outer_f32_avx512bf16,
            .bop_bytes = kt_px_bop_bytes,
            .bop_prep = kt_px_bop_prep,
            .xpack_bytes = kt_px_bytes,
            .xpack = kt_px_pack,
            .bop_gemm_px = kt_px_bop_gemm,
            .peak_loop = peak_loop_dpbf16,
        },
};
