/* Multiply-add peak loop for levels without a dot-product instruction: fp32 FMA, vectorized by the
 * compiler at the including level's width. */
#ifndef KTMOE_GENERIC_PEAK_H
#define KTMOE_GENERIC_PEAK_H

static double kt_peak_fma(long iters) {
    float acc[8][16], mul = 0.999999f, add = 1e-7f;
    for (int a = 0; a < 8; a++)
        for (int l = 0; l < 16; l++) acc[a][l] = (float)(a + l);
    for (long i = 0; i < iters; i++)
        for (int a = 0; a < 8; a++)
#pragma omp simd
            for (int l = 0; l < 16; l++) acc[a][l] = acc[a][l] * mul + add;
    volatile float sink = 0;
    for (int a = 0; a < 8; a++)
        for (int l = 0; l < 16; l++) sink += acc[a][l];
    (void)sink;
    return (double)iters * 8 * 16 * 2;
}

#endif
