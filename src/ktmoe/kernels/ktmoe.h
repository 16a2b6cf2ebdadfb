/* ktmoe native layer: the C API the Cython module binds, and the enums and limits Python reads from it
 * (nothing here is mirrored by hand on the Python side).
 *
 * The parts of the native code (each depends only on the ones above it):
 *   base.h, ktmoe.h, slots.h     scalar helpers; this API; the slot contract every ISA level fills
 *   formats/                     bytes -> values: one traits row per weight format, portable decode
 *   ref/                         a scalar reference for every slot (conformance tests)
 *   generic/                     vectorizable C for every slot, compiled per level with that level's flags
 *   isa/<level>/                 what a level overrides (avx512bf16 kernels, AMX tiles, the tile model)
 *   moe/                         the MoE algorithm: routing-plan driven stages, calls slots only
 *   core/                        cpu detection, the level registry, the engine, entry points, probes
 *
 * Every entry point returns 0 on success or a negative KT_E* code with a message in `err`; nothing aborts
 * the process on user input. */
#ifndef KTMOE_H
#define KTMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define KT_OK 0
#define KT_EINVAL -1  /* bad argument (shape, id out of range, non-finite value) -> ValueError */
#define KT_ENOMEM -2  /* allocation failed -> MemoryError */
#define KT_ESTATE -3  /* call out of order (no saved forward, ...) -> RuntimeError */

#define KT_MAX_PARTS 64
#define KT_ERRLEN 512

/* ---- ISA levels: the registry, one row per level (enum suffix, C name, name), lowest first and the tile
 * levels last. Each level has a parent whose slots it inherits (its row in isa/<c name>/level.c says
 * which); amx-model inherits from the best usable level without tiles, so it runs on every x86-64 CPU, and
 * is never chosen automatically. ---- */
#define KT_LEVEL_LIST(X)                    \
    X(PORTABLE, portable, "portable")       \
    X(AVX2, avx2, "avx2")                   \
    X(AVX512, avx512, "avx512")             \
    X(AVX512BF16, avx512bf16, "avx512bf16") \
    X(AMX_MODEL, amx_model, "amx-model")    \
    X(AMX, amx, "amx")
#define KT_ISA_ENUM_ROW(id, c, name) KT_ISA_##id,
enum kt_isa { KT_LEVEL_LIST(KT_ISA_ENUM_ROW) KT_ISA_COUNT };

int kt_isa_detected(void);                 /* best level chosen automatically on this CPU + OS */
int kt_isa_active(void);                   /* level in use */
int kt_isa_set(int level);                 /* a usable level; an unusable one falls back along its parents */
const char *kt_isa_name(int level);
int kt_isa_from_name(const char *name);    /* -1 when unknown */
int kt_isa_parent(int level);              /* -1 for the root */
int kt_isa_built(int level);               /* compiled into this module (the compiler had its flags) */
int kt_isa_usable(int level, char *why, size_t len); /* 1 when this machine runs it; else why not */
int kt_isa_auto(int level);                /* picked automatically when usable */
void kt_cpu_features(char *buf, size_t len); /* "avx2 fma avx512f ..." as found by CPUID */
const char *kt_cpu_brand(void);
/* AMX: the CPU has the tile unit (CPUID + XCR0), Linux granted the tile data permission. */
void kt_amx_status(int *detected, int *permitted);

/* ---- Engine: one pool of threads split into parts; thread 0 of part 0 is the calling thread. ---- */
typedef struct kt_engine kt_engine;

/* cpus: for each part p, part_sizes[p] thread slots; cpu_ids (flattened, same order) the CPU to pin each
 * slot to, or -1 for no pinning. Slot 0 of part 0 is the caller (never pinned). */
kt_engine *kt_engine_create(int nparts, const int *part_sizes, const int *cpu_ids, char *err);
void kt_engine_destroy(kt_engine *eng);
int kt_engine_threads(const kt_engine *eng);
/* Copies n_outer x n_inner rows of row_bytes (source rows at o * src_outer + i * src_inner bytes) into
 * contiguous dst, on subpool `part`'s own threads: first touch puts the pages on that subpool's node. */
int kt_engine_part_copy(kt_engine *eng, int part, void *dst, const void *src, size_t n_outer, ptrdiff_t src_outer,
                        size_t n_inner, ptrdiff_t src_inner, size_t row_bytes);
int kt_engine_parts(const kt_engine *eng);

/* ---- The weight descriptor: frozen weights of one projection for all experts, [E, rows, cols], out x in.
 * Codes are stored along cols (layout KT_L_ROWS). Quantized formats keep one fp32 scale (and for _1
 * formats one fp32 zero) per block of block_rows x group codes:
 *   INT8:   w = scale * q,            q int8, one byte per weight
 *   INT4:   w = scale * (n - 8),      n in [0, 15], two per byte, low nibble first
 *   INT4_1: w = scale * n + zero,     n in [0, 15], two per byte, low nibble first
 *   FP8:    w = bf16(scale * v),      v the float8 e4m3 (fn: no inf, 0x7f / 0xff NaN) value of a byte
 * group == cols is one scale per row; group < cols is the K-group variant. FP8 has 2-D blocks of
 * block_rows x group (DeepSeek: 128 x 128), partial at the bottom and right edges when the sizes are not
 * multiples; the other formats have block_rows == 1 and group dividing cols. Scales are laid out
 * [E, ceil(rows / block_rows), ceil(cols / group)]. ---- */
enum kt_wfmt { KT_W_BF16 = 0, KT_W_INT8 = 1, KT_W_INT4 = 2, KT_W_INT4_1 = 3, KT_W_FP8 = 4, KT_W_COUNT = 5 };
enum kt_wlayout { KT_L_ROWS = 0, KT_L_COUNT = 1 };
typedef struct {
    int fmt, layout;
    const void *data;      /* the whole [E, rows, cols] tensor */
    const float *scale;    /* see above; NULL for bf16 */
    const float *zero;     /* same shape; INT4_1 only */
    int rows, cols;        /* of one expert's matrix */
    int row0, col0;        /* where this TP part's view starts */
    int group;             /* codes per scale block along cols */
    int block_rows;        /* rows per scale block (1: a scale per row or row group) */
} kt_wmat;

/* The format table Python reads: name, bits per weight, whether it has scales / zeros. -1 / NULL when
 * fmt is unknown. */
const char *kt_format_name(int fmt);
int kt_format_bits(int fmt);
int kt_format_has_scale(int fmt);
int kt_format_has_zero(int fmt);
/* 1 when the format's scales cover 2-D blocks of block_rows x group with partial edge blocks (fp8). */
int kt_format_blocks_2d(int fmt);
/* Checks a descriptor (format, layout, sizes, scales present) for a layer with `E` experts. */
int kt_wmat_check(const kt_wmat *w, int E, char *err);

/* ---- A layer: dims, the frozen weights of each TP part, the LoRA tensors (fp32, full, read in place). ----
 * act_quant selects the forward's base-weight GEMMs (gate, up: x W^T; down: h Wd^T):
 *   KT_AQ_NONE  bf16 activations x (decoded) weights, fp32 accumulation
 *   KT_AQ_INT8  W8A8: activations quantized per row (x per token, h per pair over its full intermediate
 *               row), symmetric and dynamic: sa = max|a| / 127 (1 for an all-zero row), aq =
 *               round-half-even(a / sa) clamped to [-127, 127], the division in fp32; then
 *               C[m][n] = sa[m] * (sw[n] * dot(aq_m, q_n) + zw[n] * sum_k aq_m[k]) with the int32 dot exact.
 *               Per-row int8 / int4 / int4_1 weights only (w = sw q + zw: int8 q, int4 n - 8, int4_1 n and
 *               its zero); kt_forward refuses anything else. LoRA terms and the whole backward stay as they
 *               are (the backward is that of the unquantized function at the saved g, u: a straight-through
 *               estimator). */
enum kt_act_quant { KT_AQ_NONE = 0, KT_AQ_INT8 = 1, KT_AQ_COUNT = 2 };
/* The longest K of an int8 product: |aq q| <= 127 * 128, so int32 sums stay exact up to here. */
#define KT_Q8_MAX_K 132000
typedef struct {
    int E, k, H, I, r;
    float lora_scale;                 /* lora_alpha / lora_rank */
    int act_quant;                    /* enum kt_act_quant */
    int nparts;
    int part_i0[KT_MAX_PARTS + 1];    /* part p owns intermediate columns [part_i0[p], part_i0[p+1]) */
    kt_wmat gate[KT_MAX_PARTS], up[KT_MAX_PARTS], down[KT_MAX_PARTS]; /* views start at the part's slice */
    const float *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;     /* NULL: no LoRA */
} kt_layer;

/* Sets projection `which` (0 gate, 1 up, 2 down) of TP part `part`, after kt_wmat_check and a check that
 * the view lies inside the matrix and fits the layer's dims. The layer is unchanged on error. */
int kt_layer_set_weight(kt_layer *L, int part, int which, const kt_wmat *w, char *err);

/* ---- One call's routing plan and the activations saved for backward. Opaque. ---- */
typedef struct kt_ctx kt_ctx;

kt_ctx *kt_ctx_create(void);
void kt_ctx_destroy(kt_ctx *ctx);
size_t kt_ctx_bytes(const kt_ctx *ctx); /* bytes held (for memory reports) */
void kt_ctx_release(kt_ctx *ctx);       /* free the saved activations (the plan stays) */
/* Which results of the last kt_forward / kt_backward on ctx hold a NaN or Inf, found while they were
 * written (no second pass): bit KT_NF_OUT the output (forward) or grad_input (backward), KT_NF_DW the
 * routing-weight grads, KT_NF_GRAD << i LoRA grad i (LORA order). 0: all finite. */
enum { KT_NF_OUT = 1, KT_NF_DW = 2, KT_NF_GRAD = 4 };
int kt_ctx_nonfinite(const kt_ctx *ctx);

/* Build the plan: pairs grouped by expert. ids: [T, k] int64 (ids_is_i32: int32), -1 = skip.
 * wts: [T, k] fp32 (wts_is_bf16: bf16). */
int kt_plan(kt_ctx *ctx, const kt_layer *L, int T, const void *ids, int ids_is_i32, const void *wts,
            int wts_is_bf16, char *err);

/* Forward. x: [T, H] bf16 (x_is_f32: fp32). out: [T, H] bf16 (out_is_f32: fp32). With L->act_quant the
 * weights of every part must suit it (see kt_layer). */
int kt_forward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x, int x_is_f32, void *out,
               int out_is_f32, int save_for_backward, char *err);

/* Backward. dy: [T, H] (dy_is_f32). dx: [T, H] (dx_is_f32). dw: [T, k] fp32.
 * grads: six fp32 buffers shaped like the LoRA tensors (gate_a, gate_b, up_a, up_b, down_a, down_b),
 * overwritten; may be NULL when the layer has no LoRA. */
int kt_backward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy, int dy_is_f32, void *dx,
                int dx_is_f32, float *dw, float *const grads[6], char *err);

/* Stage profile: enable/disable, read (name, wall seconds, task CPU seconds over all threads, calls)
 * entries; returns the number of entries. CPU seconds stay meaningful on a machine shared with others. */
void kt_profile_enable(int on);
int kt_profile_read(int i, const char **name, double *seconds, double *cpu_seconds, long *calls);
void kt_profile_reset(void);

/* Peak of the active level's multiply-accumulate loop on all engine threads, GFLOP/s. */
double kt_measure_peak_gflops(kt_engine *eng, double seconds);
/* Read bandwidth over `bytes` of memory on all engine threads, GB/s. */
double kt_measure_read_gbps(kt_engine *eng, size_t bytes);

/* ---- Slot conformance: level `level`'s slot `slot` against the reference, operands ending at guard
 * pages. Returns the worst error over the case relative to the tolerance (<= 1 passes), or a negative
 * KT_E* code with `err` saying why (e.g. the level is not usable here). `fmt` names the weight format of
 * the decode / prepared-operand slots. */
enum kt_slot_id {
    KT_SLOT_GEMM_NT = 0, KT_SLOT_GEMM_NT_F32 = 1, KT_SLOT_GEMM_NN = 2, KT_SLOT_DECODE = 3,
    KT_SLOT_BOP_NT = 4, KT_SLOT_BOP_NN = 5, KT_SLOT_OUTER_F32 = 6, KT_SLOT_OUTER_BF16 = 7,
    KT_SLOT_ACT_FWD = 8, KT_SLOT_ACT_BWD = 9, KT_SLOT_Q8_QUANT = 10, KT_SLOT_BOP_Q8 = 11, KT_SLOT_BOP_PX = 12,
    KT_SLOT_STREAM = 13, KT_SLOT_COUNT = 14
};
const char *kt_slot_name(int slot);
/* group: codes per scale block along cols (0: one per row); block_rows: rows per scale block (0: 1), for
 * the formats with 2-D blocks, whose matrices then end in partial blocks. */
double kt_slot_check(int level, int slot, int fmt, int M, int N, int K, int group, int block_rows, unsigned seed,
                     char *err);
/* The active level's activation quantizer (the q8_quant slot, what a W8A8 forward runs) on M rows of K
 * bf16 values a: int8 codes q [M, K] and scales sa [M]; for tests against the Python reference. */
int kt_q8_quantize_rows(int M, int K, const void *a, int8_t *q, float *sa, char *err);
/* The tile model's rule violations since the last call (0: none); the first one's text in `msg`. */
long kt_tile_model_violations(char *msg, size_t len);

#ifdef __cplusplus
}
#endif
#endif
