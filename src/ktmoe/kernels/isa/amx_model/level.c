/* The amx-model level: the AMX tile kernels (isa/amx/tile_gemm.h) over the C model of the tile unit. It
 * runs on every CPU (its parent is the best usable level without tiles), is never chosen automatically,
 * and exists so that the tile kernels' tiling, packing and blocking are tested everywhere
 * (KTMOE_ISA=amx-model). */
#include <stdatomic.h>
#include <stdio.h>

#include "tile_model.h"
#include "../amx/tile_gemm.h"

static atomic_long violations;
static atomic_int first_taken;
static char first[200];

void kt_tile_model_violation(const char *what, int a, int b) {
    if (atomic_fetch_add(&violations, 1) == 0 && !atomic_exchange(&first_taken, 1))
        snprintf(first, sizeof first, "%s (%d, %d)", what, a, b);
}

long kt_tile_model_violations(char *msg, size_t len) {
    long n = atomic_exchange(&violations, 0);
    if (msg && len) snprintf(msg, len, "%s", n ? first : "");
    atomic_store(&first_taken, 0);
    return n;
}

const kt_level kt_level_amx_model = {
    .name = "amx-model",
    .id = KT_ISA_AMX_MODEL,
    .parent = KT_PARENT_BEST_PLAIN,
    .autoselect = 0,
    .thread_init = kt_tiles_configure,
    .blk = KT_TILE_BLOCKING,
    .slots = KT_TILE_SLOTS,
};
