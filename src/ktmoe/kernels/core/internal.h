/* Internal interfaces shared by the native sources (not seen by Cython): buffers, the engine's task API,
 * the stage profile, and the per-call context. */
#ifndef KTMOE_CORE_INTERNAL_H
#define KTMOE_CORE_INTERNAL_H

#include "../slots.h"

/* ---- growable buffers ---- */
typedef struct { void *ptr; size_t size; } kt_buffer;
void *kt_buffer_reserve(kt_buffer *b, size_t bytes); /* contents not kept; NULL on failure */
void kt_buffer_free(kt_buffer *b);

/* ---- engine internals ---- */
typedef void (*kt_task_fn)(void *arg, int part, int task, int tid);
void kt_run_parts(kt_engine *eng, const int *ntasks_per_part, kt_task_fn fn, void *arg);
void kt_run_all(kt_engine *eng, int ntasks, kt_task_fn fn, void *arg);
void kt_engine_lock(kt_engine *eng);
void kt_engine_unlock(kt_engine *eng);
/* Per-thread work space, grown on demand; slot 0 for a stage's tiles, slot 1 for helpers they call. */
#define KT_SCRATCH_SLOTS 2
void *kt_scratch_slot(kt_engine *eng, int tid, int slot, size_t bytes);
#define kt_scratch(eng, tid, bytes) kt_scratch_slot(eng, tid, 0, bytes)
/* Engine-wide work buffers, valid during one call (forward-only intermediates are not kept per layer). */
enum { KT_SH_H, KT_SH_PAIRS, KT_SH_DY, KT_SH_DG, KT_SH_DU, KT_SH_BD, KT_SH_DWPART, KT_SH_TASKS,
       KT_SH_XQ, KT_SH_HQ, KT_SH_XP, KT_SH_HP, KT_SH_XOFF, KT_SHARED_SLOTS };
void *kt_shared_buffer(kt_engine *eng, int slot, size_t bytes);

/* ---- stage timing (KTMOE_PROFILE): cumulative seconds per named stage, read by the bench ---- */
void kt_profile_add(const char *stage, double seconds, double cpu_seconds);
void kt_engine_profile(kt_engine *eng, int on);
double kt_engine_task_cpu(kt_engine *eng);
int kt_profile_on(void);
double kt_now(void);

/* ---- the per-call context: routing plan + saved activations ---- */
struct kt_ctx {
    int T, k, E, H, I, r, nparts, npairs;
    int part_i0[KT_MAX_PARTS + 1];
    int saved;             /* forward activations valid for backward */
    int nonfinite;         /* KT_NF_* bits of the last call's results */
    int *expert_off;       /* [E + 1]: pairs of expert e are [expert_off[e], expert_off[e + 1]) */
    int *pair_tok;         /* [npairs] token of each pair */
    int *pair_slot;        /* [npairs] t * k + slot */
    int *slot_pair;        /* [T * k] pair of each slot, -1 for a skipped slot */
    float *pair_w;         /* [npairs] routing weight */
    bf16_t *x;             /* [T, H] bf16 copy of the input */
    bf16_t *g[KT_MAX_PARTS], *u[KT_MAX_PARTS]; /* [npairs, I_p] pre-activation, bf16 */
    float *ag, *au;        /* [npairs, r] A_g x, A_u x */
    float *ad[KT_MAX_PARTS]; /* [npairs, r] A_d h, this part's partial sum */
    kt_buffer plan_buf, act_buf;
};

/* The active level's per-thread init hook for the next jobs of this engine (tile configuration); each
 * thread runs it once before its first task under it. */
void kt_engine_set_thread_init(kt_engine *eng, void (*fn)(void));

#endif
