/* Standalone correctness + speed harness for src/ktmoe/kernels/isa/avx512bf16/gemm.h (single-core GFLOP/s of
 * the micro-kernels; the correctness of every level's slots is tests/test_slots.py).
 *
 *   gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma -I src/ktmoe/kernels \
 *       tests/native/test_gemm_avx512bf16.c -o /tmp/test_gemm_avx512bf16 && taskset -c 1 /tmp/test_gemm_avx512bf16
 *
 * Options: --no-bench (correctness only), --quick (fewer random shapes, short timings),
 *          --bench-only (skip the correctness sweep), --m=M (only shapes with this M), --nt / --nn.
 *
 * Correctness: every shape is checked against a double-precision loop over the same bf16 (or fp32) inputs,
 * |c - ref| <= 1e-5 * sum_k |a_k b_k| + 1e-30. Every A row and the B matrix end exactly at a PROT_NONE
 * guard page, so any read past the end of a row faults. C padding (ldc > N) must stay untouched.
 */
#define _GNU_SOURCE
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "isa/avx512bf16/gemm.h"

/* ---------------------------------------------------------------- guarded allocations */
typedef struct {
    void *base;
    size_t len;
} region_t;

static size_t page_size;

/* Returns a pointer p such that p[0 .. bytes) is readable and p + bytes is the start of a PROT_NONE page. */
static void *guarded_alloc(size_t bytes, region_t *r) {
    size_t data_pages = (bytes + page_size - 1) / page_size;
    size_t len = (data_pages + 1) * page_size;
    char *base = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) {
        perror("mmap");
        exit(2);
    }
    if (mprotect(base + data_pages * page_size, page_size, PROT_NONE)) {
        perror("mprotect");
        exit(2);
    }
    r->base = base;
    r->len = len;
    return base + data_pages * page_size - bytes;
}

static void guarded_free(region_t *r) { munmap(r->base, r->len); }

/* ---------------------------------------------------------------- loud failure on an out-of-bounds access */
static char current_case[160] = "(none)";

static void on_segv(int sig) {
    static const char msg[] = "\nFAIL: SIGSEGV (read/write past the end of a row or of C) in ";
    (void)sig;
    if (write(2, msg, sizeof msg - 1) < 0 || write(2, current_case, strlen(current_case)) < 0) _exit(3);
    if (write(2, "\n", 1) < 0) _exit(3);
    _exit(3);
}

/* ---------------------------------------------------------------- random data */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_u64(void) {
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}
static double rng_unit(void) { return (double)(rng_u64() >> 11) * (1.0 / 9007199254740992.0); }
static float rng_val(void) { return (float)(2.0 * rng_unit() - 1.0); }
static int rng_int(int lo, int hi) { return lo + (int)(rng_u64() % (uint64_t)(hi - lo + 1)); }

/* ---------------------------------------------------------------- correctness */
static int n_checked = 0, n_failed = 0;

static int check_c(const char *what, int M, int N, int K, size_t ldb, int f32, const float *c, size_t ldc,
                   const double *ref, const double *mag) {
    int bad = 0;
    for (int m = 0; m < M; m++) {
        for (int n = 0; n < N; n++) {
            double got = c[(size_t)m * ldc + n], want = ref[(size_t)m * N + n];
            double tol = 1e-5 * mag[(size_t)m * N + n] + 1e-30;
            if (!(fabs(got - want) <= tol)) {
                if (bad < 5)
                    fprintf(stderr, "FAIL %s M=%d N=%d K=%d ldb=%zu ldc=%zu f32=%d: c[%d][%d]=%.9g ref=%.9g tol=%.3g\n",
                            what, M, N, K, ldb, ldc, f32, m, n, got, want, tol);
                bad++;
            }
        }
        for (size_t n = (size_t)N; n < ldc; n++) {
            if (c[(size_t)m * ldc + n] != -777.0f) {
                if (bad < 5)
                    fprintf(stderr, "FAIL %s M=%d N=%d K=%d ldc=%zu: padding c[%d][%zu] overwritten\n", what, M, N,
                            K, ldc, m, n);
                bad++;
            }
        }
    }
    n_checked++;
    if (bad) n_failed++;
    return bad;
}

static void test_nt(int M, int N, int K, size_t ldb, int f32, size_t ldc) {
    region_t ra[16], rb, rc;
    bf16_t *arows[16];
    for (int m = 0; m < M; m++) {
        arows[m] = guarded_alloc(sizeof(bf16_t) * (size_t)K, &ra[m]);
        for (int k = 0; k < K; k++) arows[m][k] = f32_to_bf16(rng_val());
    }
    size_t nb = (size_t)(N - 1) * ldb + (size_t)K; /* the last row ends at the guard page */
    void *b = guarded_alloc((f32 ? sizeof(float) : sizeof(bf16_t)) * nb, &rb);
    for (size_t i = 0; i < nb; i++) {
        if (f32)
            ((float *)b)[i] = rng_val();
        else
            ((bf16_t *)b)[i] = f32_to_bf16(rng_val());
    }
    size_t nc = (size_t)M * ldc;
    float *c = guarded_alloc(sizeof(float) * nc, &rc);
    for (size_t i = 0; i < nc; i++) c[i] = -777.0f;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) c[(size_t)m * ldc + n] = NAN;
    double *ref = malloc(sizeof(double) * (size_t)M * N), *mag = malloc(sizeof(double) * (size_t)M * N);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, t = 0;
            for (int k = 0; k < K; k++) {
                double bv = f32 ? (double)((float *)b)[(size_t)n * ldb + k]
                                : (double)bf16_to_f32(((bf16_t *)b)[(size_t)n * ldb + k]);
                double p = (double)bf16_to_f32(arows[m][k]) * bv;
                s += p;
                t += fabs(p);
            }
            ref[(size_t)m * N + n] = s;
            mag[(size_t)m * N + n] = t;
        }
    snprintf(current_case, sizeof current_case, "gemm_nt M=%d N=%d K=%d ldb=%zu b_is_f32=%d ldc=%zu", M, N, K, ldb,
             f32, ldc);
    gemm_nt(M, N, K, (const bf16_t *const *)arows, b, ldb, f32, c, ldc);
    check_c("gemm_nt", M, N, K, ldb, f32, c, ldc, ref, mag);
    free(ref);
    free(mag);
    for (int m = 0; m < M; m++) guarded_free(&ra[m]);
    guarded_free(&rb);
    guarded_free(&rc);
}

static void test_nn(int M, int N, int K, size_t ldb, size_t ldc) {
    region_t ra[16], rb, rc;
    bf16_t *arows[16];
    for (int m = 0; m < M; m++) {
        arows[m] = guarded_alloc(sizeof(bf16_t) * (size_t)K, &ra[m]);
        for (int k = 0; k < K; k++) arows[m][k] = f32_to_bf16(rng_val());
    }
    size_t nb = K > 0 ? (size_t)(K - 1) * ldb + (size_t)N : 1;
    bf16_t *b = guarded_alloc(sizeof(bf16_t) * nb, &rb);
    for (size_t i = 0; i < nb; i++) b[i] = f32_to_bf16(rng_val());
    size_t nc = (size_t)M * ldc;
    float *c = guarded_alloc(sizeof(float) * nc, &rc);
    for (size_t i = 0; i < nc; i++) c[i] = -777.0f;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) c[(size_t)m * ldc + n] = NAN;
    double *ref = malloc(sizeof(double) * (size_t)M * N), *mag = malloc(sizeof(double) * (size_t)M * N);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, t = 0;
            for (int k = 0; k < K; k++) {
                double p = (double)bf16_to_f32(arows[m][k]) * (double)bf16_to_f32(b[(size_t)k * ldb + n]);
                s += p;
                t += fabs(p);
            }
            ref[(size_t)m * N + n] = s;
            mag[(size_t)m * N + n] = t;
        }
    snprintf(current_case, sizeof current_case, "gemm_nn M=%d N=%d K=%d ldb=%zu ldc=%zu", M, N, K, ldb, ldc);
    gemm_nn(M, N, K, (const bf16_t *const *)arows, b, ldb, c, ldc);
    check_c("gemm_nn", M, N, K, ldb, 0, c, ldc, ref, mag);
    free(ref);
    free(mag);
    for (int m = 0; m < M; m++) guarded_free(&ra[m]);
    guarded_free(&rb);
    guarded_free(&rc);
}

static void run_correctness(int quick) {
    static const int Ms[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 16};
    static const int Ns[] = {1, 2, 3, 4, 5, 7, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 70, 129};
    static const int Ks[] = {0, 1, 2, 3, 15, 16, 17, 31, 32, 33, 63, 64, 65, 767, 768, 1537, 2048, 2080};
    const int nM = sizeof Ms / sizeof *Ms, nN = sizeof Ns / sizeof *Ns, nK = sizeof Ks / sizeof *Ks;

    /* exhaustive edge grid on M x N for small K, plus every K at a few (M, N) */
    for (int im = 0; im < nM; im++)
        for (int in = 0; in < nN; in++)
            for (int ik = 0; ik < nK; ik++) {
                int M = Ms[im], N = Ns[in], K = Ks[ik];
                if (K > 100 && !((in % 3 == 0 || N == 64 || N == 65) && (im % 2 == 0 || M == 9))) continue;
                if (quick && K > 100 && (im + in) % 3) continue;
                size_t ldb_nt = (size_t)K + (size_t)((im + in + ik) % 3 == 0 ? 0 : (ik % 2 ? 1 : 37));
                if (ldb_nt == 0) ldb_nt = 1;
                size_t ldb_nn = (size_t)N + (size_t)((im + ik) % 3 == 0 ? 0 : (in % 2 ? 3 : 704));
                size_t ldc = (size_t)N + (size_t)((im + in + ik) % 2 ? 0 : 5);
                test_nt(M, N, K, ldb_nt, 0, ldc);
                test_nt(M, N, K, ldb_nt, 1, ldc);
                test_nn(M, N, K, ldb_nn, ldc);
            }
    /* random shapes */
    int nrand = quick ? 200 : 1500;
    for (int t = 0; t < nrand; t++) {
        int M = rng_int(1, 16), N = rng_int(1, 140), K = rng_int(0, t % 4 ? 200 : 2500);
        size_t ldb_nt = (size_t)K + (size_t)(rng_int(0, 2) ? 0 : rng_int(1, 100));
        if (ldb_nt == 0) ldb_nt = 1;
        size_t ldb_nn = (size_t)N + (size_t)(rng_int(0, 2) ? 0 : rng_int(1, 2100));
        size_t ldc = (size_t)N + (size_t)(rng_int(0, 1) ? 0 : rng_int(1, 20));
        test_nt(M, N, K, ldb_nt, 0, ldc);
        test_nt(M, N, K, ldb_nt, t & 1, ldc);
        test_nn(M, N, K, ldb_nn, ldc);
    }
    /* project shapes incl. the larger M used in training (A rows are hot, M up to 256) */
    static const int bigM[] = {16, 64, 67, 256};
    for (int i = 0; i < 4; i++) {
        /* these exceed the 16-pointer arrays of the guarded tests: use plain allocations */
        int M = bigM[i];
        for (int kk = 0; kk < 2; kk++) {
            int K = kk ? 768 : 2048, N = 64;
            size_t ldb_nn = kk ? 2048 : 768;
            bf16_t *A = malloc(sizeof(bf16_t) * (size_t)M * K);
            const bf16_t **ap = malloc(sizeof(*ap) * (size_t)M);
            bf16_t *Bt = malloc(sizeof(bf16_t) * (size_t)N * K);
            bf16_t *Bn = malloc(sizeof(bf16_t) * (size_t)K * ldb_nn);
            float *c = malloc(sizeof(float) * (size_t)M * N);
            double *ref = malloc(sizeof(double) * (size_t)M * N), *mag = malloc(sizeof(double) * (size_t)M * N);
            for (size_t j = 0; j < (size_t)M * K; j++) A[j] = f32_to_bf16(rng_val());
            for (int m = 0; m < M; m++) ap[m] = A + (size_t)((m * 13) % M) * K;
            for (size_t j = 0; j < (size_t)N * K; j++) Bt[j] = f32_to_bf16(rng_val());
            for (size_t j = 0; j < (size_t)K * ldb_nn; j++) Bn[j] = f32_to_bf16(rng_val());
            for (int pass = 0; pass < 2; pass++) {
                for (int m = 0; m < M; m++)
                    for (int n = 0; n < N; n++) {
                        double s = 0, t = 0;
                        for (int k = 0; k < K; k++) {
                            double bv = pass ? bf16_to_f32(Bn[(size_t)k * ldb_nn + n]) : bf16_to_f32(Bt[(size_t)n * K + k]);
                            double p = (double)bf16_to_f32(ap[m][k]) * bv;
                            s += p;
                            t += fabs(p);
                        }
                        ref[(size_t)m * N + n] = s;
                        mag[(size_t)m * N + n] = t;
                    }
                if (pass)
                    gemm_nn(M, N, K, ap, Bn, ldb_nn, c, N);
                else
                    gemm_nt(M, N, K, ap, Bt, K, 0, c, N);
                check_c(pass ? "gemm_nn(big)" : "gemm_nt(big)", M, N, K, pass ? ldb_nn : (size_t)K, 0, c, N, ref, mag);
            }
            free(A); free(ap); free(Bt); free(Bn); free(c); free(ref); free(mag);
        }
    }
    printf("correctness: %d cases checked, %d failed\n", n_checked, n_failed);
}

/* ---------------------------------------------------------------- benchmark */
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

#ifndef WEIGHT_MB
#define WEIGHT_MB 64
#endif
#define WEIGHT_BYTES ((size_t)WEIGHT_MB << 20)

/* nt: weights as one big [rows, K] bf16 matrix (ldb = K); each call takes the next 64-row block.
 * nn: weights as experts of [K, ldb] bf16; each call takes the next (expert, 64-column block). */
static double bench(int nn, int M, int N, int K, size_t ldb_nn, int cold, double min_time, int reps) {
    bf16_t *A = aligned_alloc(64, sizeof(bf16_t) * (size_t)M * K + 64);
    const bf16_t **ap = malloc(sizeof(*ap) * (size_t)M);
    for (size_t j = 0; j < (size_t)M * K; j++) A[j] = f32_to_bf16(rng_val());
    for (int m = 0; m < M; m++) ap[m] = A + (size_t)m * K;
    size_t wbytes = cold ? WEIGHT_BYTES : (nn ? sizeof(bf16_t) * (size_t)K * ldb_nn : sizeof(bf16_t) * (size_t)N * K);
    bf16_t *W = aligned_alloc(4096, (wbytes + 4095) & ~(size_t)4095);
    for (size_t j = 0; j < wbytes / 2; j++) W[j] = (bf16_t)(0x3c00u + (j * 2654435761u >> 20) % 0x200u);
    float *c = aligned_alloc(64, sizeof(float) * (size_t)M * N + 64);
    /* enumerate blocks */
    size_t nblocks;
    size_t expert_elems = (size_t)K * ldb_nn, cols_per_expert = ldb_nn / (size_t)N;
    if (!nn)
        nblocks = wbytes / (sizeof(bf16_t) * (size_t)N * K);
    else
        nblocks = (wbytes / (sizeof(bf16_t) * expert_elems)) * cols_per_expert;
    if (nblocks == 0) nblocks = 1;
    double flops = 2.0 * M * N * K, best = 1e30;
    size_t blk = 0;
    for (int r = 0; r < reps; r++) {
        long calls = 0;
        double t0 = now_s(), t;
        do {
            for (int i = 0; i < 16; i++) {
                const bf16_t *bp;
                if (!nn)
                    bp = W + blk * (size_t)N * K;
                else
                    bp = W + (blk / cols_per_expert) * expert_elems + (blk % cols_per_expert) * (size_t)N;
                if (++blk == nblocks) blk = 0;
                if (nn)
                    gemm_nn(M, N, K, ap, bp, ldb_nn, c, N);
                else
                    gemm_nt(M, N, K, ap, bp, K, 0, c, N);
                calls++;
            }
            t = now_s() - t0;
        } while (t < min_time);
        double per = t / calls;
        if (per < best) best = per;
    }
    free(A); free(ap); free(W); free(c);
    return flops / best * 1e-9;
}

int main(int argc, char **argv) {
    int do_bench = 1, quick = 0, do_check = 1, only_m = 0, only_kernel = -1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--no-bench")) do_bench = 0;
        if (!strcmp(argv[i], "--quick")) quick = 1;
        if (!strcmp(argv[i], "--bench-only")) do_check = 0;
        if (!strncmp(argv[i], "--m=", 4)) only_m = atoi(argv[i] + 4);
        if (!strcmp(argv[i], "--nt")) only_kernel = 0;
        if (!strcmp(argv[i], "--nn")) only_kernel = 1;
    }
    page_size = (size_t)sysconf(_SC_PAGESIZE);
    signal(SIGSEGV, on_segv);
    signal(SIGBUS, on_segv);
    if (do_check) run_correctness(quick);
    if (n_failed) {
        printf("CORRECTNESS FAILED (%d of %d)\n", n_failed, n_checked);
        return 1;
    }
    if (!do_bench) return 0;
    /* many short repetitions, best kept: the other core may be busy (shared L3 and memory bandwidth) */
    double mt = quick ? 0.02 : 0.05;
    int reps = quick ? 10 : 25;
    printf("\n%-8s %4s %4s %5s %6s %12s %12s\n", "kernel", "M", "N", "K", "ldb", "hot GF/s", "cold GF/s");
    static const struct { int M, K; size_t ldb_nn; } shapes[] = {
        {64, 2048, 768}, {64, 768, 2048}, {1, 2048, 768}, {1, 768, 2048}, {4, 2048, 768},
        {8, 2048, 768}, {16, 2048, 768}, {256, 2048, 768}};
    for (int nn = 0; nn < 2; nn++)
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            int M = shapes[s].M, K = shapes[s].K;
            if ((only_m && M != only_m) || (only_kernel >= 0 && only_kernel != nn)) continue;
            double hot = bench(nn, M, 64, K, shapes[s].ldb_nn, 0, mt, reps);
            double cold = bench(nn, M, 64, K, shapes[s].ldb_nn, 1, mt, reps);
            printf("%-8s %4d %4d %5d %6zu %12.1f %12.1f\n", nn ? "gemm_nn" : "gemm_nt", M, 64, K,
                   nn ? shapes[s].ldb_nn : (size_t)K, hot, cold);
            fflush(stdout);
        }
    return 0;
}
