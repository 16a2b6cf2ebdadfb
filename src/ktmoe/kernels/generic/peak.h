/* Multiply-add peak loop for levels without a dot-product instruction: fp32 FMA at the including level's
 * vector width (its -m flags), 12 independent accumulators of one register each. The chains must fit the
 * register file: with more accumulators than registers the compiler spills and the loop measures the
 * stores (an earlier 8 x 16-float version spilled at AVX2 and measured half the AVX2 peak). 12 chains
 * cover the FMA latency x issue width of every core we run on (4 cycles x 2 pipes = 8). */
#ifndef KTMOE_GENERIC_PEAK_H
#define KTMOE_GENERIC_PEAK_H

#if defined(__AVX512F__)
#define KT_PEAK_LANES 16
#elif defined(__AVX__)
#define KT_PEAK_LANES 8
#else
#define KT_PEAK_LANES 4
#endif
#define KT_PEAK_CHAINS 12

typedef float kt_peak_vec __attribute__((vector_size(4 * KT_PEAK_LANES)));

static double kt_peak_fma(long iters) {
    kt_peak_vec acc[KT_PEAK_CHAINS];
    kt_peak_vec mul, add;
    for (int l = 0; l < KT_PEAK_LANES; l++) {
        mul[l] = 0.999999f;
        add[l] = 1e-7f;
    }
    for (int a = 0; a < KT_PEAK_CHAINS; a++)
        for (int l = 0; l < KT_PEAK_LANES; l++) acc[a][l] = (float)(a + l);
    for (long i = 0; i < iters; i++) {
        /* keeps mul and add in registers and the compiler from folding iterations together */
        __asm__ volatile("" : "+x"(mul), "+x"(add));
#pragma GCC unroll 12
        for (int a = 0; a < KT_PEAK_CHAINS; a++) acc[a] = acc[a] * mul + add;
    }
    volatile float sink = 0;
    for (int a = 0; a < KT_PEAK_CHAINS; a++)
        for (int l = 0; l < KT_PEAK_LANES; l++) sink += acc[a][l];
    (void)sink;
    return (double)iters * KT_PEAK_CHAINS * KT_PEAK_LANES * 2;
}

#endif
