/* The avx512 level: the generic C vectorized by the compiler for AVX-512 F/BW/VL/DQ (this file's flags). */
#include "../../core/cpu.h"
#include "../../generic/level.h"

const kt_level kt_level_avx512 = {
    .name = "avx512",
    .id = KT_ISA_AVX512,
    .parent = KT_ISA_AVX2,
    .autoselect = 1,
    .usable = kt_cpu_usable_avx512,
    /* not avx2's whole-row backward tasks: they need a few-row gemm_nn that reads B once (avx2's gemm.h); the
     * generic one makes a pass per 4 rows of C, and avx512bf16's one per 128 columns (both inherit this) */
    .blk = {.nn_rows_max_m = -1},
    .slots = {KT_GENERIC_SLOT_FIELDS},
};
