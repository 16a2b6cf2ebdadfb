/* The portable level, root of the registry: the generic C with no -m flags. It fills every slot and
 * holds the default blocking the other levels inherit. */
#include "../../generic/level.h"

const kt_level kt_level_portable = {
    .name = "portable",
    .id = KT_ISA_PORTABLE,
    .parent = -1,
    .autoselect = 1,
    .blk = {.mc = 128, .nb = 64, .nbb = 128, .nbh = 256, .fused_max_m = {-1, -1, -1, -1, -1}, .pack_min_m = 1,
            .nn_rows_max_m = -1},
    .slots = {KT_GENERIC_SLOT_FIELDS},
};
