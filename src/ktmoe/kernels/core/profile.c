/* The stage profile the bench reads, and the machine probes (peak of the active level's multiply-add
 * loop, read bandwidth). */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "internal.h"

/* ---- stage profile ---- */

#define KT_PROFILE_SLOTS 32
static struct { const char *name; double seconds, cpu; long calls; } profile[KT_PROFILE_SLOTS];
static int profile_on, profile_n;

double kt_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void kt_profile_enable(int on) { profile_on = on; }
int kt_profile_on(void) { return profile_on; }
void kt_profile_reset(void) { profile_n = 0; }

/* Called by the calling thread only (between dispatches), so no locking. */
void kt_profile_add(const char *stage, double seconds, double cpu_seconds) {
    if (!profile_on) return;
    int i = 0;
    while (i < profile_n && strcmp(profile[i].name, stage) != 0) i++;
    if (i == profile_n) {
        if (profile_n == KT_PROFILE_SLOTS) return;
        profile[profile_n].name = stage;
        profile[profile_n].seconds = 0;
        profile[profile_n].cpu = 0;
        profile[profile_n].calls = 0;
        profile_n++;
    }
    profile[i].seconds += seconds;
    profile[i].cpu += cpu_seconds;
    profile[i].calls++;
}

int kt_profile_read(int i, const char **name, double *seconds, double *cpu_seconds, long *calls) {
    if (i < 0 || i >= profile_n) return profile_n;
    *name = profile[i].name;
    *seconds = profile[i].seconds;
    *cpu_seconds = profile[i].cpu;
    *calls = profile[i].calls;
    return profile_n;
}

/* ---- machine measurements for the benchmark ---- */

#define seconds_now kt_now

typedef struct { long iters; double flops[1024]; } peak_arg;

static void peak_task(void *arg, int part, int task, int tid) {
    (void)part;
    (void)task;
    peak_arg *a = arg;
    a->flops[tid & 1023] += kt_slots_active()->peak_loop(a->iters);
}

double kt_measure_peak_gflops(kt_engine *eng, double seconds) {
    const kt_slots *S = kt_slots_active();
    kt_engine_set_thread_init(eng, S->thread_init);
    int nt = kt_engine_threads(eng);
    peak_arg *a = calloc(1, sizeof *a);
    if (!a) return 0;
    a->iters = 1 << 16;
    double best = 0;
    double deadline = seconds_now() + seconds;
    while (seconds_now() < deadline) {
        memset(a->flops, 0, sizeof a->flops);
        double t0 = seconds_now();
        kt_run_all(eng, nt, peak_task, a);
        double dt = seconds_now() - t0;
        if (dt < 0.02) {
            a->iters *= 2;
            continue;
        }
        double total = 0;
        for (int i = 0; i < nt && i < 1024; i++) total += a->flops[i];
        if (total / dt > best) best = total / dt;
    }
    free(a);
    return best * 1e-9;
}

typedef struct { const float *buf; size_t n_per_task; double sink[1024]; } bw_arg;

static void bw_task(void *arg, int part, int task, int tid) {
    (void)part;
    bw_arg *a = arg;
    const float *p = a->buf + (size_t)task * a->n_per_task;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 16 <= a->n_per_task; i += 16) {
        s0 += p[i];
        s1 += p[i + 4];
        s2 += p[i + 8];
        s3 += p[i + 12];
    }
    a->sink[tid & 1023] += s0 + s1 + s2 + s3;
}

/* Touches one float per 16 (one per 64-byte line): the cost is the line fetches, i.e. read bandwidth. */
double kt_measure_read_gbps(kt_engine *eng, size_t bytes) {
    int ntasks = 64 * kt_engine_threads(eng);
    size_t n = bytes / sizeof(float);
    n -= n % ((size_t)ntasks * 16);
    float *buf = NULL;
    if (n == 0 || posix_memalign((void **)&buf, 64, n * sizeof(float))) return 0;
    for (size_t i = 0; i < n; i++) buf[i] = 1.0f;
    bw_arg *a = calloc(1, sizeof *a);
    if (!a) {
        free(buf);
        return 0;
    }
    a->buf = buf;
    a->n_per_task = n / (size_t)ntasks;
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = seconds_now();
        kt_run_all(eng, ntasks, bw_task, a);
        double dt = seconds_now() - t0;
        double gbps = (double)(n * sizeof(float)) / dt * 1e-9;
        if (gbps > best) best = gbps;
    }
    free(a);
    free(buf);
    return best;
}
