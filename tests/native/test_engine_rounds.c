/* The engine runs every task exactly once, in rounds when a list holds more tasks than one claim word
 * counts (KT_TASK_BITS is shrunk to 2 for this build). Built and run by tests/test_engine.py. */
#include "core/internal.h"
#include <stdio.h>
#include <stdatomic.h>
static atomic_int hits[1000];
static void f(void *a, int part, int task, int tid) { (void)a; (void)tid; atomic_fetch_add(&hits[part * 500 + task], 1); }
int main(void) {
    char err[512]; int sizes[2] = {2, 1}, cpus[3] = {-1, -1, -1};
    kt_engine *e = kt_engine_create(2, sizes, cpus, err);
    int nt[2] = {37, 11};
    kt_run_parts(e, nt, f, NULL);
    kt_run_all(e, 29, f, NULL);
    int bad = 0;
    for (int t = 0; t < 500; t++) {
        int want0 = (t < 37) + (t < 29), want1 = t < 11;
        bad += hits[t] != want0 || hits[500 + t] != want1;
    }
    printf("mismatches %d\n", bad);
    kt_engine_destroy(e);
    return bad != 0;
}
