/* The tile-op layer on the hardware: the compiler's AMX intrinsics (tile numbers are immediates). */
#ifndef KTMOE_AMX_TILE_HW_H
#define KTMOE_AMX_TILE_HW_H

#include <immintrin.h>

#define KT_TILE_LOADCONFIG(cfg) _tile_loadconfig(cfg)
#define KT_TILE_ZERO(t) _tile_zero(t)
#define KT_TILE_LOAD(t, base, stride) _tile_loadd(t, base, (long)(stride))
#define KT_TILE_STORE(t, base, stride) _tile_stored(t, base, (long)(stride))
#define KT_TILE_DPBF16(c, a, b) _tile_dpbf16ps(c, a, b)
#define KT_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)

#endif
