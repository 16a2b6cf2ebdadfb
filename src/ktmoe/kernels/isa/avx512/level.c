/* The avx512 level: the generic C vectorized by the compiler for AVX-512 F/BW/VL/DQ (this file's flags). */
#include "../../core/cpu.h"
#include "../../generic/level.h"

const kt_level kt_level_avx512 = {
    .name = "avx512",
    .id = KT_ISA_AVX512,
    .parent = KT_ISA_AVX2,
    .autoselect = 1,
    .usable = kt_cpu_usable_avx512,
    .slots = {KT_GENERIC_SLOT_FIELDS},
};
