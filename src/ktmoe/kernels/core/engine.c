/* The process-wide thread pool (the CPUInfer role).
 *
 * Threads are grouped into parts (TP subpools). The calling thread is slot 0 of part 0 and works too, so a
 * call costs no hand-off when the pool is small. Idle workers spin briefly on a generation counter (stages
 * of one layer follow each other within microseconds), then sleep on a condition variable.
 *
 * Tasks are claimed from per-list counters that pack (job, task count, next task) in one 64-bit word, and
 * the caller waits for finished tasks, not for workers: a worker the OS has not scheduled yet never holds
 * up a stage (the others take its share), and a late one cannot claim a task of a job that is over. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stddef.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

#define SPIN_NS 300000 /* how long an idle worker polls before sleeping */

typedef struct {
    kt_engine *eng;
    int tid, part, cpu;
    pthread_t th;
} worker;

struct kt_engine {
    int nthreads, nparts;
    worker *workers;
    kt_buffer *scratch; /* KT_SCRATCH_SLOTS per thread */
    kt_buffer shared[KT_SHARED_SLOTS];
    pthread_mutex_t call_lock; /* one layer call at a time */
    int caller_cpu;            /* slot 0's CPU: the calling thread is pinned there only during a call */
    cpu_set_t caller_saved;    /* the caller's own affinity, restored after the call */
    int caller_pinned;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int sleepers;
    atomic_uint gen;
    atomic_int stop;
    /* the job */
    kt_task_fn fn;
    void *arg;
    int shared_list;
    atomic_uint_fast64_t next[KT_MAX_PARTS]; /* job:24 | count:20 | next:20 */
    atomic_int finished;
    int total;
    void (*thread_init)(void); /* the active level's per-thread hook (tile configuration), or NULL */
    int profile;            /* measure each task's thread CPU time */
    double *task_cpu;       /* per thread, 8 doubles apart (no false sharing) */
};

#ifndef KT_TASK_BITS
#define KT_TASK_BITS 20 /* tasks per list and round; more run in several rounds (tests shrink it) */
#endif
#define TASK_BITS KT_TASK_BITS
#define TASK_MASK ((1u << TASK_BITS) - 1)

static uint64_t pack(unsigned job, unsigned count) {
    return ((uint64_t)(job & 0xffffffu) << (2 * TASK_BITS)) | ((uint64_t)count << TASK_BITS);
}

/* Next task of `list` for job `job`, or -1 when the list is empty or the job is no longer current. */
static int claim(kt_engine *eng, int list, unsigned job) {
    uint64_t v = atomic_load_explicit(&eng->next[list], memory_order_acquire);
    for (;;) {
        unsigned t = (unsigned)(v & TASK_MASK), n = (unsigned)((v >> TASK_BITS) & TASK_MASK);
        if ((unsigned)(v >> (2 * TASK_BITS)) != (job & 0xffffffu) || t >= n) return -1;
        if (atomic_compare_exchange_weak_explicit(&eng->next[list], &v, v + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int)t;
    }
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The list index is passed as the task's part: in shared mode tasks ignore it, and a worker that read a
 * stale mode still runs a claimed task with the right part. */
static __thread void (*thread_inited)(void); /* the hook this thread has run */

static void work(kt_engine *eng, int tid, int part, unsigned job) {
    int list = eng->shared_list ? 0 : part;
    int t;
    void (*init)(void) = eng->thread_init;
    if (init && thread_inited != init) {
        init();
        thread_inited = init;
    }
    while ((t = claim(eng, list, job)) >= 0) {
        if (eng->profile) {
            struct timespec a, b;
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a);
            eng->fn(eng->arg, list, t, tid);
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
            eng->task_cpu[8 * tid] += (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) * 1e-9;
        } else {
            eng->fn(eng->arg, list, t, tid);
        }
        atomic_fetch_add_explicit(&eng->finished, 1, memory_order_release);
    }
}

static void *worker_main(void *p) {
    worker *w = (worker *)p;
    kt_engine *eng = w->eng;
    if (w->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(w->cpu, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set); /* best effort */
    }
    unsigned seen = 0; /* gen at creation: a job posted before this thread runs is still seen */
    for (;;) {
        long long start = now_ns();
        unsigned g;
        int spins = 0;
        while ((g = atomic_load(&eng->gen)) == seen) {
            cpu_relax();
            if (++spins % 256 == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&eng->mu);
                atomic_fetch_add(&eng->sleepers, 1);
                while ((g = atomic_load(&eng->gen)) == seen) pthread_cond_wait(&eng->cv, &eng->mu);
                atomic_fetch_sub(&eng->sleepers, 1);
                pthread_mutex_unlock(&eng->mu);
                break;
            }
        }
        seen = g;
        if (atomic_load(&eng->stop)) return NULL;
        work(eng, w->tid, w->part, g);
    }
}

/* Posts the job whose fields are set, works on it from the calling thread, waits for its last task.
 * The calling thread helps every list, so no part's tasks wait on a missing worker (unless `own_part_only`:
 * placement copies must be written by the part's own threads, on its NUMA node). */
static void dispatch_job(kt_engine *eng, const int *counts, int nlists, int own_part_only) {
    unsigned job = atomic_load(&eng->gen) + 1;
    eng->total = 0;
    atomic_store_explicit(&eng->finished, 0, memory_order_relaxed);
    for (int l = 0; l < nlists; l++) {
        eng->total += counts[l];
        atomic_store_explicit(&eng->next[l], pack(job, (unsigned)counts[l]), memory_order_release);
    }
    atomic_store(&eng->gen, job);
    if (atomic_load(&eng->sleepers) > 0) {
        pthread_mutex_lock(&eng->mu);
        pthread_cond_broadcast(&eng->cv);
        pthread_mutex_unlock(&eng->mu);
    }
    work(eng, 0, 0, job);
    if (!own_part_only)
        for (int l = 1; l < nlists; l++) work(eng, 0, l, job);
    while (atomic_load_explicit(&eng->finished, memory_order_acquire) < eng->total) cpu_relax();
}

/* A job whose lists hold more tasks than one claim word counts runs in rounds; each round's task t is
 * the job's task base[list] + t. */
typedef struct {
    kt_task_fn fn;
    void *arg;
    int base[KT_MAX_PARTS];
} round_args;

static void round_task(void *arg, int part, int task, int tid) {
    round_args *r = arg;
    r->fn(r->arg, part, r->base[part] + task, tid);
}

static void run_job(kt_engine *eng, const int *ntasks, int nlists, int shared_list, int own_part_only,
                    kt_task_fn fn, void *arg) {
    int counts[KT_MAX_PARTS], over = 0;
    for (int l = 0; l < nlists; l++) {
        counts[l] = ntasks[l] < 0 ? 0 : ntasks[l];
        over |= counts[l] > (int)TASK_MASK;
    }
    eng->shared_list = shared_list;
    if (!over) {
        eng->fn = fn;
        eng->arg = arg;
        dispatch_job(eng, counts, nlists, own_part_only);
        return;
    }
    round_args r = {fn, arg, {0}};
    for (;;) {
        int round[KT_MAX_PARTS], any = 0;
        for (int l = 0; l < nlists; l++) {
            int left = counts[l] - r.base[l];
            round[l] = left > (int)TASK_MASK ? (int)TASK_MASK : left;
            any |= round[l] > 0;
        }
        if (!any) return;
        eng->fn = round_task;
        eng->arg = &r;
        dispatch_job(eng, round, nlists, own_part_only);
        for (int l = 0; l < nlists; l++) r.base[l] += round[l];
    }
}

void kt_run_parts(kt_engine *eng, const int *ntasks, kt_task_fn fn, void *arg) {
    run_job(eng, ntasks, eng->nparts, 0, 0, fn, arg);
}

/* ---- placement copies: pages written first by a part's own threads land on its NUMA node ---- */
typedef struct {
    char *dst;
    const char *src;
    size_t n_inner, row_bytes;
    ptrdiff_t src_outer, src_inner;
    size_t rows_per_task, rows;
} copy_args;

static void copy_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)tid;
    copy_args *c = arg;
    size_t r0 = (size_t)task * c->rows_per_task, r1 = r0 + c->rows_per_task < c->rows ? r0 + c->rows_per_task : c->rows;
    for (size_t r = r0; r < r1; r++) {
        size_t o = r / c->n_inner, i = r % c->n_inner;
        memcpy(c->dst + r * c->row_bytes, c->src + (ptrdiff_t)o * c->src_outer + (ptrdiff_t)i * c->src_inner,
               c->row_bytes);
    }
}

int kt_engine_part_copy(kt_engine *eng, int part, void *dst, const void *src, size_t n_outer, ptrdiff_t src_outer,
                        size_t n_inner, ptrdiff_t src_inner, size_t row_bytes) {
    if (part < 0 || part >= eng->nparts) return KT_EINVAL;
    copy_args c = {dst, src, n_inner, row_bytes, src_outer, src_inner, 0, n_outer * n_inner};
    size_t per = (c.rows + 255) / 256;
    c.rows_per_task = per ? per : 1;
    int counts[KT_MAX_PARTS] = {0};
    counts[part] = (int)((c.rows + c.rows_per_task - 1) / c.rows_per_task);
    pthread_mutex_lock(&eng->call_lock);
    /* part 0 is the caller's own part; others are written only by their pinned workers */
    run_job(eng, counts, eng->nparts, 0, part != 0, copy_task, &c);
    pthread_mutex_unlock(&eng->call_lock);
    return KT_OK;
}

void kt_run_all(kt_engine *eng, int ntasks, kt_task_fn fn, void *arg) { run_job(eng, &ntasks, 1, 1, 0, fn, arg); }

kt_engine *kt_engine_create(int nparts, const int *part_sizes, const int *cpu_ids, char *err) {
    if (nparts < 1 || nparts > KT_MAX_PARTS) {
        snprintf(err, KT_ERRLEN, "threadpool_count must be in [1, %d], got %d", KT_MAX_PARTS, nparts);
        return NULL;
    }
    int total = 0;
    for (int p = 0; p < nparts; p++) {
        if (part_sizes[p] < 1) {
            snprintf(err, KT_ERRLEN, "subpool %d has %d threads; each needs at least 1", p, part_sizes[p]);
            return NULL;
        }
        total += part_sizes[p];
    }
    kt_engine *eng = calloc(1, sizeof *eng);
    if (!eng) goto oom;
    eng->nthreads = total;
    eng->nparts = nparts;
    eng->workers = calloc((size_t)total, sizeof(worker));
    eng->scratch = calloc((size_t)total * KT_SCRATCH_SLOTS, sizeof(kt_buffer));
    eng->task_cpu = calloc((size_t)total * 8, sizeof(double));
    if (!eng->workers || !eng->scratch || !eng->task_cpu) goto oom;
    pthread_mutex_init(&eng->call_lock, NULL);
    pthread_mutex_init(&eng->mu, NULL);
    pthread_cond_init(&eng->cv, NULL);
    int tid = 0;
    for (int p = 0; p < nparts; p++)
        for (int s = 0; s < part_sizes[p]; s++, tid++) {
            worker *w = &eng->workers[tid];
            w->eng = eng;
            w->tid = tid;
            w->part = p;
            w->cpu = cpu_ids ? cpu_ids[tid] : -1;
            if (tid == 0) { /* the caller */
                eng->caller_cpu = w->cpu;
                continue;
            }
            if (pthread_create(&w->th, NULL, worker_main, w) != 0) {
                snprintf(err, KT_ERRLEN, "could not start worker thread %d of %d", tid, total);
                eng->nthreads = tid; /* destroy joins only those started */
                kt_engine_destroy(eng);
                return NULL;
            }
        }
    return eng;
oom:
    if (eng) {
        free(eng->workers);
        free(eng->scratch);
        free(eng->task_cpu);
        free(eng);
    }
    snprintf(err, KT_ERRLEN, "out of memory creating the engine");
    return NULL;
}

void kt_engine_destroy(kt_engine *eng) {
    if (!eng) return;
    atomic_store(&eng->stop, 1);
    atomic_fetch_add(&eng->gen, 1);
    pthread_mutex_lock(&eng->mu);
    pthread_cond_broadcast(&eng->cv);
    pthread_mutex_unlock(&eng->mu);
    for (int t = 1; t < eng->nthreads; t++) pthread_join(eng->workers[t].th, NULL);
    for (int t = 0; t < eng->nthreads * KT_SCRATCH_SLOTS; t++) free(eng->scratch[t].ptr);
    for (int s = 0; s < KT_SHARED_SLOTS; s++) kt_buffer_free(&eng->shared[s]);
    pthread_mutex_destroy(&eng->call_lock);
    pthread_mutex_destroy(&eng->mu);
    pthread_cond_destroy(&eng->cv);
    free(eng->workers);
    free(eng->scratch);
    free(eng->task_cpu);
    free(eng);
}

int kt_engine_threads(const kt_engine *eng) { return eng->nthreads; }

void kt_engine_profile(kt_engine *eng, int on) { eng->profile = on; }

void kt_engine_set_thread_init(kt_engine *eng, void (*fn)(void)) { eng->thread_init = fn; }

/* CPU seconds spent in tasks, summed over threads, since the last call. */
double kt_engine_task_cpu(kt_engine *eng) {
    double sum = 0;
    for (int t = 0; t < eng->nthreads; t++) {
        sum += eng->task_cpu[8 * t];
        eng->task_cpu[8 * t] = 0;
    }
    return sum;
}
int kt_engine_parts(const kt_engine *eng) { return eng->nparts; }
/* A call holds the engine; the calling thread works as slot 0 on slot 0's CPU for the call's duration
 * (left free, the OS may stack it on a worker's CPU), then gets its own affinity back. */
void kt_engine_lock(kt_engine *eng) {
    pthread_mutex_lock(&eng->call_lock);
    eng->caller_pinned = 0;
    if (eng->caller_cpu >= 0 && pthread_getaffinity_np(pthread_self(), sizeof eng->caller_saved, &eng->caller_saved) == 0) {
        cpu_set_t one;
        CPU_ZERO(&one);
        CPU_SET(eng->caller_cpu, &one);
        eng->caller_pinned = pthread_setaffinity_np(pthread_self(), sizeof one, &one) == 0;
    }
}

void kt_engine_unlock(kt_engine *eng) {
    if (eng->caller_pinned) pthread_setaffinity_np(pthread_self(), sizeof eng->caller_saved, &eng->caller_saved);
    pthread_mutex_unlock(&eng->call_lock);
}

void *kt_scratch_slot(kt_engine *eng, int tid, int slot, size_t bytes) {
    kt_buffer *s = &eng->scratch[tid * KT_SCRATCH_SLOTS + slot];
    if (s->size < bytes) {
        free(s->ptr);
        s->ptr = NULL;
        s->size = 0;
        if (posix_memalign(&s->ptr, 64, bytes) != 0) return NULL;
        s->size = bytes;
    }
    return s->ptr;
}

void *kt_shared_buffer(kt_engine *eng, int slot, size_t bytes) {
    return kt_buffer_reserve(&eng->shared[slot], bytes);
}

void *kt_buffer_reserve(kt_buffer *b, size_t bytes) {
    if (bytes == 0) bytes = 64;
    if (b->size < bytes) {
        kt_buffer_free(b);
        if (posix_memalign(&b->ptr, 64, bytes) != 0) {
            b->ptr = NULL;
            return NULL;
        }
        b->size = bytes;
    }
    return b->ptr;
}

void kt_buffer_free(kt_buffer *b) {
    free(b->ptr);
    b->ptr = NULL;
    b->size = 0;
}
