/* Everything a level built from the generic C provides: included by isa/{portable,avx2,avx512}/level.c,
 * each compiled with its own -m flags, so the same source becomes three vector widths. */
#ifndef KTMOE_GENERIC_LEVEL_H
#define KTMOE_GENERIC_LEVEL_H

#include "../formats/decode.h"
#include "../moe/stages.h"
#include "act.h"
#include "gemm.h"
#include "lora.h"
#include "peak.h"
#include "store.h"

/* The slots of a generic level (the default prepared operands and the W8A8 slots are shared, core/bop.c):
 * inside a level's `.slots = {KT_GENERIC_SLOT_FIELDS}`; fields named after it override (a later designator
 * wins). */
#define KT_GENERIC_SLOT_FIELDS                                                                               \
    .gemm_nt = gemm_nt, .gemm_nn = gemm_nn, .decode_run = KT_GENERIC_DECODE, .bop_bytes = kt_bop_bytes_rows,  \
    .bop_prep = kt_bop_prep_rows, .bop_gemm = kt_bop_gemm_rows, .q8_quant = kt_q8_quant_rows,                \
    .bop_q8_bytes = kt_bop_q8_bytes_rows, .bop_q8_prep = kt_bop_q8_prep_rows,                                \
    .bop_q8_gemm = kt_bop_q8_gemm_rows, .outer_f32 = kt_outer_f32, .outer_bf16 = kt_outer_bf16,               \
    .act_fwd = kt_act_fwd, .act_bwd = kt_act_bwd, .stream_f32 = kt_stream_f32, .forward = kt_stages_forward, \
    .backward = kt_stages_backward, .peak_loop = kt_peak_fma

#endif
