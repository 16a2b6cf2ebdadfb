/* The level registry (KT_LEVEL_LIST in ktmoe.h), resolved once along the parent chain into full slot
 * tables, and the active level. A level the compiler could not build (CMake drops it when its -m flags are
 * missing) is simply absent. */
#include <pthread.h>
#include <stdio.h>
#include <strings.h>

#include "internal.h"

/* A level CMake did not build has no definition: its weak reference is NULL. */
#define KT_LEVEL_EXTERN(id, c, name) extern const kt_level kt_level_##c __attribute__((weak));
KT_LEVEL_LIST(KT_LEVEL_EXTERN)

#define KT_LEVEL_ROW(id, c, name) &kt_level_##c,
static const kt_level *const rows[KT_ISA_COUNT] = {KT_LEVEL_LIST(KT_LEVEL_ROW)};
#define KT_LEVEL_NAME(id, c, name) name,
static const char *const names[KT_ISA_COUNT] = {KT_LEVEL_LIST(KT_LEVEL_NAME)};

static const kt_level *row_of(int id) { return id >= 0 && id < KT_ISA_COUNT ? rows[id] : NULL; }

static kt_slots resolved[KT_ISA_COUNT];
static int usable[KT_ISA_COUNT];
static char why[KT_ISA_COUNT][160];
static int parent_id[KT_ISA_COUNT];

#define INHERIT(field) \
    if (!out->field) out->field = p->field

/* Fills out = the parent's resolved table with the row's own slots and blocking on top. */
static void inherit(kt_slots *out, const kt_level *row, const kt_slots *p) {
    *out = row->slots;
    out->name = row->name;
    out->parent = p;
    out->thread_init = row->thread_init;
    out->blk = row->blk;
    if (!p) return;
    INHERIT(gemm_nt);
    INHERIT(gemm_nn);
    for (int f = 0; f < KT_W_COUNT; f++) {
        INHERIT(decode_run[f]);
        INHERIT(blk.fused_max_m[f]);
    }
    INHERIT(qdot_small);
    INHERIT(bop_bytes);
    INHERIT(bop_prep);
    INHERIT(bop_gemm);
    INHERIT(q8_quant);
    INHERIT(bop_q8_bytes);
    INHERIT(bop_q8_prep);
    INHERIT(bop_q8_gemm);
    INHERIT(outer_f32);
    INHERIT(outer_bf16);
    INHERIT(act_fwd);
    INHERIT(act_bwd);
    INHERIT(stream_f32);
    INHERIT(forward);
    INHERIT(backward);
    INHERIT(peak_loop);
    INHERIT(thread_init);
    INHERIT(blk.mc);
    INHERIT(blk.nb);
    INHERIT(blk.nbb);
    INHERIT(blk.nbh);
    INHERIT(blk.pack_min_m);
    INHERIT(blk.xpack_min_m);
    INHERIT(blk.nn_rows_max_m);
}

/* The best usable level without tiles (the tile levels come last in enum kt_isa). */
static int best_plain(void) {
    int best = KT_ISA_PORTABLE;
    for (int id = 0; id < KT_ISA_AMX_MODEL; id++)
        if (usable[id] && row_of(id)->autoselect) best = id;
    return best;
}

static void resolve_all(void) {
    /* ids are ordered so that a parent always comes first; the tile model's parent is picked last */
    for (int id = 0; id < KT_ISA_COUNT; id++) {
        const kt_level *row = row_of(id);
        parent_id[id] = -1;
        if (!row) {
            snprintf(why[id], sizeof why[id], "not built (the compiler lacks this level's flags)");
            continue;
        }
        int p = row->parent == KT_PARENT_BEST_PLAIN ? best_plain() : row->parent;
        parent_id[id] = p;
        if (row->usable && !row->usable(why[id], sizeof why[id])) continue; /* its own reason first */
        if (p >= 0 && !usable[p]) {
            snprintf(why[id], sizeof why[id], "its parent level %s is not usable here", names[p]);
            continue;
        }
        inherit(&resolved[id], row, p >= 0 ? &resolved[p] : NULL);
        usable[id] = 1;
        why[id][0] = 0;
    }
}

static pthread_once_t once = PTHREAD_ONCE_INIT;
static void init(void) { pthread_once(&once, resolve_all); }

static const kt_slots *_Atomic active;
static _Atomic int active_level = -1;

int kt_isa_detected(void) {
    init();
    int best = KT_ISA_PORTABLE;
    for (int id = 0; id < KT_ISA_COUNT; id++)
        if (usable[id] && row_of(id)->autoselect) best = id;
    return best;
}

int kt_isa_set(int level) {
    init();
    if (level < 0 || level >= KT_ISA_COUNT) level = kt_isa_detected();
    while (level > 0 && !usable[level]) level = parent_id[level] >= 0 ? parent_id[level] : level - 1;
    active = &resolved[level];
    active_level = level;
    return level;
}

int kt_isa_active(void) {
    if (active_level < 0) kt_isa_set(-1);
    return active_level;
}

const kt_slots *kt_slots_active(void) {
    kt_isa_active();
    return active;
}

const kt_slots *kt_slots_of(int level) {
    init();
    return level >= 0 && level < KT_ISA_COUNT && usable[level] ? &resolved[level] : NULL;
}

const char *kt_isa_name(int level) { return level >= 0 && level < KT_ISA_COUNT ? names[level] : "unknown"; }

int kt_isa_from_name(const char *name) {
    for (int i = 0; i < KT_ISA_COUNT; i++)
        if (strcasecmp(name, names[i]) == 0) return i;
    if (strcasecmp(name, "amx_model") == 0) return KT_ISA_AMX_MODEL;
    return -1;
}

int kt_isa_parent(int level) {
    init();
    return level >= 0 && level < KT_ISA_COUNT ? parent_id[level] : -1;
}

int kt_isa_built(int level) { return row_of(level) != NULL; }

int kt_isa_usable(int level, char *text, size_t len) {
    init();
    if (level < 0 || level >= KT_ISA_COUNT) return 0;
    if (text && len) snprintf(text, len, "%s", why[level]);
    return usable[level];
}

int kt_isa_auto(int level) { return row_of(level) ? row_of(level)->autoselect : 0; }
