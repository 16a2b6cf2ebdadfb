/* The avx2 level: the generic C vectorized by the compiler for AVX2 + FMA (this file's flags), with
 * register-blocked bf16 GEMM kernels in place (gemm.h) for small batches and the packed-panel GEMM
 * (panel.h) for blocks used by at least blk.pack_min_m rows (quantized weights decoded straight into its fp32
 * panels), the few-row quantized products decoding in registers (qdot.h); LoRA products with 12 accumulators
 * (outer.h); the LoRA A products (fp32 B) register-blocked too (gemm.h). */
#include "../../core/cpu.h"
#include "../../generic/level.h"
#include "gemm.h"
#include "outer.h"
#include "panel.h"
#include "qdot.h"

/* bf16 or fp32 B (the LoRA matrices): the register-blocked kernels. */
static void gemm_nt_avx2(int M, int N, int K, const bf16_t *const *a, const void *b, size_t ldb, int b_is_f32,
                         float *c, size_t ldc) {
    if (M > 0 && N > 0) kt_avx2_gemm_nt(M, N, K, a, b, ldb, b_is_f32, c, ldc);
}

/* Up to one row block (small batches: bandwidth-bound), B is streamed row by row in whole cache lines: one
 * row of C by the generic axpy, 2..6 rows in one pass (gemm.h); the register-blocked kernel reads 32 bytes
 * of each strided B row per column block. Measured on Zen 3 (2 threads): the blocked kernel for every M made
 * the T=16 backward 10-25% slower; from 7 rows on it makes T=512..1024 1.4-1.55x faster. */
static void gemm_nn_avx2(int M, int N, int K, const bf16_t *const *a, const bf16_t *b, size_t ldb, float *c,
                         size_t ldc) {
    if (M <= 1)
        gemm_nn(M, N, K, a, b, ldb, c, ldc);
    else if (M <= KT2_NN_MR)
        kt_avx2_gemm_nn_few(M, N, K, a, b, ldb, c, ldc);
    else
        kt_avx2_gemm_nn(M, N, K, a, b, ldb, c, ldc);
}

const kt_level kt_level_avx2 = {
    .name = "avx2",
    .id = KT_ISA_AVX2,
    .parent = KT_ISA_PORTABLE,
    .autoselect = 1,
    .usable = kt_cpu_usable_avx2,
    /* panels from 8 rows, fused quantized products below: measured on Zen 3 (2 threads), see panel.h, qdot.h;
     * experts with up to KT2_NN_MR rows take the backward NN stages over whole weight rows, read once by
     * gemm_nn_avx2 (Zen 3, T=16, 2 threads: backward 89 -> 56 ms) */
    .blk = {.pack_min_m = 8, .nn_rows_max_m = KT2_NN_MR,
            .fused_max_m = {[KT_W_BF16] = -1, [KT_W_INT8] = 7, [KT_W_INT4] = 7, [KT_W_INT4_1] = 7, [KT_W_FP8] = -1}},
    .slots = {KT_GENERIC_SLOT_FIELDS, .gemm_nt = gemm_nt_avx2, .gemm_nn = gemm_nn_avx2, .bop_bytes = kt2_bop_bytes,
              .bop_prep = kt2_bop_prep, .bop_gemm = kt2_bop_gemm, .qdot_small = kt2_qdot_small, .outer_f32 = kt2_outer_f32,
              .outer_bf16 = kt2_outer_bf16},
};
