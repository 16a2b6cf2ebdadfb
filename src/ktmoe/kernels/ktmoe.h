/* ktmoe native layer: the C API the Cython module binds.
 *
 * Layers of the native code (each file depends only on the ones above it):
 *   cpu.c        ISA detection (CPUID + XGETBV), the level cap, the active ops table
 *   engine.c     the process-wide thread pool, split into subpools ("parts") for tensor parallelism
 *   gemm_*.h     GEMM micro-kernels, one header per instruction set
 *   stages.inc.c the MoE expert stages; compiled once per ISA level by isa_<level>.c
 *   moe.c        layer + per-call context objects, the routing plan, the stage entry points
 *
 * Every entry point returns 0 on success or a negative KT_E* code with a message in `err`; nothing aborts
 * the process on user input.
 */
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

/* ---- ISA levels, lowest to highest. ---- */
enum kt_isa { KT_ISA_PORTABLE = 0, KT_ISA_AVX2 = 1, KT_ISA_AVX512 = 2, KT_ISA_AVX512BF16 = 3, KT_ISA_COUNT = 4 };

int kt_isa_detected(void);                 /* best level this CPU + OS supports */
int kt_isa_active(void);                   /* level in use */
int kt_isa_set(int level);                 /* choose a level <= detected; returns the level set */
const char *kt_isa_name(int level);
int kt_isa_from_name(const char *name);    /* -1 when unknown */
void kt_cpu_features(char *buf, size_t len); /* "avx2 fma avx512f ..." as found by CPUID */
const char *kt_cpu_brand(void);

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

/* ---- Frozen weights of one projection for all experts: [E, rows, cols], out x in. ----
 * Quantized formats keep one scale (and for _1 formats one zero) per group of `group` columns of a row:
 *   INT8:   w = scale * q,            q int8, one byte per weight
 *   INT4:   w = scale * (n - 8),      n in [0, 15], two per byte, low nibble first
 *   INT4_1: w = scale * n + zero,     n in [0, 15], two per byte, low nibble first
 * group == cols is one scale per row; group < cols is the K-group variant. */
enum kt_wfmt { KT_W_BF16 = 0, KT_W_INT8 = 1, KT_W_INT4 = 2, KT_W_INT4_1 = 3 };
typedef struct {
    int fmt;
    const void *data;      /* the whole [E, rows, cols] tensor */
    const float *scale;    /* [E, rows, cols / group]; NULL for bf16 */
    const float *zero;     /* same shape; INT4_1 only */
    int rows, cols;        /* of one expert's matrix */
    int row0, col0;        /* where this TP part's view starts */
    int group;             /* columns per scale group */
} kt_wmat;

/* ---- A layer: dims, the frozen weights of each TP part, the LoRA tensors (fp32, full, read in place). ---- */
typedef struct {
    int E, k, H, I, r;
    float lora_scale;                 /* lora_alpha / lora_rank */
    int nparts;
    int part_i0[KT_MAX_PARTS + 1];    /* part p owns intermediate columns [part_i0[p], part_i0[p+1]) */
    kt_wmat gate[KT_MAX_PARTS], up[KT_MAX_PARTS], down[KT_MAX_PARTS]; /* views start at the part's slice */
    const float *gate_a, *gate_b, *up_a, *up_b, *down_a, *down_b;     /* NULL: no LoRA */
} kt_layer;

/* ---- One call's routing plan and the activations saved for backward. Opaque. ---- */
typedef struct kt_ctx kt_ctx;

kt_ctx *kt_ctx_create(void);
void kt_ctx_destroy(kt_ctx *ctx);
size_t kt_ctx_bytes(const kt_ctx *ctx); /* bytes held (for memory reports) */
void kt_ctx_release(kt_ctx *ctx);       /* free the saved activations (the plan stays) */

/* Build the plan: pairs grouped by expert. ids: [T, k] int64 (ids_is_i32: int32), -1 = skip.
 * wts: [T, k] fp32 (wts_is_bf16: bf16). */
int kt_plan(kt_ctx *ctx, const kt_layer *L, int T, const void *ids, int ids_is_i32, const void *wts,
            int wts_is_bf16, char *err);

/* Forward. x: [T, H] bf16 (x_is_f32: fp32). out: [T, H] bf16 (out_is_f32: fp32). */
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

/* Peak of the active ISA's multiply-accumulate loop on all engine threads, GFLOP/s. */
double kt_measure_peak_gflops(kt_engine *eng, double seconds);
/* Read bandwidth over `bytes` of memory on all engine threads, GB/s. */
double kt_measure_read_gbps(kt_engine *eng, size_t bytes);

#ifdef __cplusplus
}
#endif
#endif
