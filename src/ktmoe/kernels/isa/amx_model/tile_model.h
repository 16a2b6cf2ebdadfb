/* A C model of the AMX tile unit: the tile-op layer of isa/amx/tile_gemm.h on any CPU.
 *
 * It keeps one thread's tile state (8 tiles of up to 16 rows x 64 bytes + the configuration) in
 * thread-local storage and enforces the rules the hardware would fault on or silently mis-compute:
 *   - no tile op before LDTILECFG, palette 1 only, reserved bytes 0, rows <= 16, bytes per row <= 64,
 *     a tile used by an op must be configured (rows and bytes both non-zero);
 *   - TDPBF16PS / TDPBSSD shapes: C.rows == A.rows, C.colsb == B.colsb, A.colsb == 4 * B.rows, all
 *     multiples of 4, and three distinct tiles.
 * A broken rule is recorded (kt_tile_model_violations) and the op is skipped, so the tests see both the
 * rule and a wrong answer.
 * Arithmetic as the ISA reference describes it: TDPBF16PS adds, for each k pair, the two bf16 products to
 * the fp32 accumulator one after the other, each accumulation rounded to nearest even, input denormals read
 * as zero and output denormals flushed to zero (MXCSR ignored). The product of two bf16 values and its sum
 * with an fp32 value are exact in double whenever the rounding matters, so one rounding from double to
 * float is the correctly rounded fused multiply-add. TDPBSSD sums four int8 x int8 products into int32,
 * wrapping. Loads zero the bytes past the configured row width and the rows past the configured count.
 * Compiled with -ffp-contract=off (no fused operations the model did not ask for). */
#ifndef KTMOE_AMX_MODEL_TILE_MODEL_H
#define KTMOE_AMX_MODEL_TILE_MODEL_H

#include <stdint.h>
#include <string.h>

void kt_tile_model_violation(const char *what, int a, int b);

typedef struct {
    int valid;
    int rows[8], colsb[8];
    unsigned char t[8][16][64];
} kt_tile_state;

static __thread kt_tile_state ktm;

static inline int ktm_usable(int t, const char *op) {
    if (!ktm.valid) {
        kt_tile_model_violation(op, t, -1);
        return 0;
    }
    if (t < 0 || t > 7 || ktm.rows[t] == 0 || ktm.colsb[t] == 0) {
        kt_tile_model_violation(op, t, -2);
        return 0;
    }
    return 1;
}

static void ktm_loadconfig(const void *cfg) {
    const unsigned char *c = cfg;
    memset(&ktm, 0, sizeof ktm);
    if (c[0] != 1) {
        kt_tile_model_violation("ldtilecfg: palette must be 1", c[0], -1);
        return;
    }
    for (int i = 1; i < 16; i++)
        if (c[i]) {
            kt_tile_model_violation("ldtilecfg: reserved byte set", i, c[i]);
            return;
        }
    for (int t = 0; t < 16; t++) {
        int colsb = c[16 + 2 * t] | (c[17 + 2 * t] << 8), rows = c[48 + t];
        if (t >= 8 && (colsb || rows)) {
            kt_tile_model_violation("ldtilecfg: palette 1 has 8 tiles", t, -1);
            return;
        }
        if (t < 8 && (rows > 16 || colsb > 64 || (rows == 0) != (colsb == 0))) {
            kt_tile_model_violation("ldtilecfg: tile shape (rows <= 16, bytes <= 64)", rows, colsb);
            return;
        }
        if (t < 8) {
            ktm.rows[t] = rows;
            ktm.colsb[t] = colsb;
        }
    }
    ktm.valid = 1;
}

static void ktm_zero(int t) {
    if (ktm_usable(t, "tilezero")) memset(ktm.t[t], 0, sizeof ktm.t[t]);
}

static void ktm_load(int t, const void *base, size_t stride) {
    if (!ktm_usable(t, "tileloadd")) return;
    memset(ktm.t[t], 0, sizeof ktm.t[t]);
    for (int r = 0; r < ktm.rows[t]; r++) memcpy(ktm.t[t][r], (const char *)base + (size_t)r * stride, (size_t)ktm.colsb[t]);
}

static void ktm_store(int t, void *base, size_t stride) {
    if (!ktm_usable(t, "tilestored")) return;
    for (int r = 0; r < ktm.rows[t]; r++) memcpy((char *)base + (size_t)r * stride, ktm.t[t][r], (size_t)ktm.colsb[t]);
}

static int ktm_dot_shapes(int c, int a, int b, const char *op) {
    if (!ktm_usable(c, op) || !ktm_usable(a, op) || !ktm_usable(b, op)) return 0;
    if (c == a || c == b || a == b) {
        kt_tile_model_violation(op, c, -3);
        return 0;
    }
    if (ktm.rows[c] != ktm.rows[a] || ktm.colsb[c] != ktm.colsb[b] || ktm.colsb[a] != 4 * ktm.rows[b] ||
        ktm.colsb[c] % 4 || ktm.colsb[a] % 4) {
        kt_tile_model_violation(op, c, -4);
        return 0;
    }
    return 1;
}

static inline float ktm_bf16_daz(const unsigned char *p) {
    uint32_t u = ((uint32_t)p[0] | ((uint32_t)p[1] << 8)) << 16;
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u; /* denormal (or zero) input reads as zero */
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float ktm_ftz(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void ktm_dpbf16(int c, int a, int b) {
    if (!ktm_dot_shapes(c, a, b, "tdpbf16ps")) return;
    int K = ktm.colsb[a] / 4, N = ktm.colsb[c] / 4;
    for (int m = 0; m < ktm.rows[c]; m++) {
        float acc[16];
        memcpy(acc, ktm.t[c][m], sizeof(float) * (size_t)N);
        for (int k = 0; k < K; k++)
            for (int n = 0; n < N; n++)
                for (int h = 0; h < 2; h++) {
                    double p = (double)ktm_bf16_daz(&ktm.t[a][m][4 * k + 2 * h]) *
                               (double)ktm_bf16_daz(&ktm.t[b][k][4 * n + 2 * h]);
                    acc[n] = ktm_ftz((float)((double)acc[n] + p));
                }
        memcpy(ktm.t[c][m], acc, sizeof(float) * (size_t)N);
    }
}

static inline void ktm_dpbssd(int c, int a, int b) {
    if (!ktm_dot_shapes(c, a, b, "tdpbssd")) return;
    int K = ktm.colsb[a] / 4, N = ktm.colsb[c] / 4;
    for (int m = 0; m < ktm.rows[c]; m++) {
        uint32_t acc[16];
        memcpy(acc, ktm.t[c][m], sizeof(uint32_t) * (size_t)N);
        for (int k = 0; k < K; k++)
            for (int n = 0; n < N; n++)
                for (int q = 0; q < 4; q++)
                    acc[n] += (uint32_t)((int32_t)(int8_t)ktm.t[a][m][4 * k + q] * (int8_t)ktm.t[b][k][4 * n + q]);
        memcpy(ktm.t[c][m], acc, sizeof(uint32_t) * (size_t)N);
    }
}

#define KT_TILE_LOADCONFIG(cfg) ktm_loadconfig(cfg)
#define KT_TILE_ZERO(t) ktm_zero(t)
#define KT_TILE_LOAD(t, base, stride) ktm_load(t, base, stride)
#define KT_TILE_STORE(t, base, stride) ktm_store(t, base, stride)
#define KT_TILE_DPBF16(c, a, b) ktm_dpbf16(c, a, b)
#define KT_TILE_DPBSSD(c, a, b) ktm_dpbssd(c, a, b)

#endif
