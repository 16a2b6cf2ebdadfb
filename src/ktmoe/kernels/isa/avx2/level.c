/* The avx2 level: the generic C vectorized by the compiler for AVX2 + FMA (this file's flags). */
#include "../../core/cpu.h"
#include "../../generic/level.h"

const kt_level kt_level_avx2 = {
    .name = "avx2",
    .id = KT_ISA_AVX2,
    .parent = KT_ISA_PORTABLE,
    .autoselect = 1,
    .usable = kt_cpu_usable_avx2,
    .slots = KT_GENERIC_SLOTS,
};
