/* The amx level: the tile GEMM kernels on the hardware (Sapphire Rapids and later). Usable only when the
 * CPU has AMX-TILE/BF16/INT8, XCR0 enables the tile state and Linux granted the tile data permission. */
#include "../../core/cpu.h"
#include "tile_hw.h"
#include "tile_gemm.h"

const kt_level kt_level_amx = {
    .name = "amx",
    .id = KT_ISA_AMX,
    .parent = KT_ISA_AVX512BF16,
    .autoselect = 1,
    .usable = kt_cpu_usable_amx,
    .thread_init = kt_tiles_configure,
    .blk = KT_TILE_BLOCKING,
    .slots = KT_TILE_SLOTS,
};
