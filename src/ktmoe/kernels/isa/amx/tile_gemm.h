/* AMX tile GEMM: the prepared-operand slots of the tile levels, written against a thin tile-op layer
 *   KT_TILE_LOADCONFIG(cfg)  KT_TILE_ZERO(t)  KT_TILE_LOAD(t, base, stride)  KT_TILE_STORE(t, base, stride)
 *   KT_TILE_DPBF16(c, a, b)  KT_TILE_DPBSSD(c, a, b)
 * whose back-end is the compiler's intrinsics (isa/amx/tile_hw.h, level "amx") or the C model of the tile
 * unit (isa/amx_model/tile_model.h, level "amx-model"): the same tiling, packing and blocking run in both.
 *
 * Tiles: one fixed configuration (palette 1, all 8 tiles 16 rows x 64 bytes), loaded once per engine
 * thread by the level's thread-init hook, so no kernel ever reconfigures. tmm0-3 accumulate a 32 x 32 fp32
 * block of C (2 x 2 tiles), tmm4-5 hold two 16-row A tiles, tmm6-7 two B tiles; per 32 values of k: 4 loads,
 * 4 TDPBF16PS.
 *
 * Weights stay stored once, in their format's row layout (no second, transposed copy). A task's block of an
 * expert's weights is repacked into scratch as a B panel in the tile unit's pair-interleaved form:
 *   panel tile (n / 16, k / 32), row (k % 32) / 2, bf16 column 2 (n % 16) + k % 2   (1 KiB per tile)
 * from a row block used as NT (B = W^T, forward) or NN (B = W, backward), decoding quantized formats
 * through the level's decode slots first (int8 / int4 values are exact in bf16). The panel is reused over
 * all the expert's rows in the task, so the repack costs one pass over the block; with fewer rows than
 * blk.pack_min_m the parent's kernels take the block instead (repacking would cost more than it saves).
 * A rows (gathered by pointer) are copied into a zero-padded [32-row multiple, K rounded to 32] block.
 *
 * W8A8 (kt_layer.act_quant): the same 2 x 2 tile block with TDPBSSD, int8 x int8 summed 4 at a time into
 * int32. The block's int8 codes (kt_q8_block_codes: int8 as stored, int4 n - 8, int4_1 n) are packed as a
 * VNNI quad panel:
 *   panel tile (n / 16, k / 64), row (k % 64) / 4, byte 4 (n % 16) + k % 4      (1 KiB per tile)
 * A tiles are 16 int8 rows of 64 k (rows gathered into a zero-padded [32-row multiple, K rounded to 64]
 * block, their code sums taken on the way for the zero point), and the int32 tiles go through the same
 * epilogue as every other level (kt_q8_value), so the result is bit-identical to the parent's. */
#ifndef KTMOE_AMX_TILE_GEMM_H
#define KTMOE_AMX_TILE_GEMM_H

#include "../../slots.h"

#define KT_TILE_K 32 /* bf16 values of k per tile row (64 bytes) */

static inline int kt_round32(int n) { return (n + 31) & ~31; }
static inline size_t kt_align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* The one tile configuration, once per thread (the level's thread-init hook). */
static void kt_tiles_configure(void) {
    unsigned char cfg[64] __attribute__((aligned(64)));
    memset(cfg, 0, sizeof cfg);
    cfg[0] = 1; /* palette 1 */
    for (int t = 0; t < 8; t++) {
        cfg[16 + 2 * t] = 64; /* bytes per row */
        cfg[48 + t] = 16;     /* rows */
    }
    KT_TILE_LOADCONFIG(cfg);
}

static size_t kt_tile_panel_bytes(int N, int K) { return sizeof(bf16_t) * (size_t)kt_round32(N) * kt_round32(K); }

/* Packs B (N x K values, B[n][k] = src[n * lds + k] for NT, src[k * lds + n] for NN) into a panel. Full
 * tiles take branch-free loops the compiler vectorizes (NT: a 16 x 16 transpose of k pairs, NN: two rows
 * interleaved); edge tiles are zero-padded element by element. */
static void kt_tile_pack(const bf16_t *src, size_t lds, int trans, int N, int K, bf16_t *panel) {
    int Np = kt_round32(N), Kp = kt_round32(K), kblocks = Kp / KT_TILE_K;
    for (int nt = 0; nt < Np / 16; nt++)
        for (int kb = 0; kb < kblocks; kb++) {
            bf16_t *tile = panel + ((size_t)nt * kblocks + kb) * 512;
            int n0 = nt * 16, k0 = kb * KT_TILE_K;
            if (n0 + 16 <= N && k0 + KT_TILE_K <= K) {
                if (trans == KT_NT) {
                    for (int j = 0; j < 16; j++) {
                        const bf16_t *row = src + (size_t)(n0 + j) * lds + k0;
                        for (int kp = 0; kp < 16; kp++) {
                            tile[kp * 32 + 2 * j] = row[2 * kp];
                            tile[kp * 32 + 2 * j + 1] = row[2 * kp + 1];
                        }
                    }
                } else {
                    for (int kp = 0; kp < 16; kp++) {
                        const bf16_t *r0 = src + (size_t)(k0 + 2 * kp) * lds + n0, *r1 = r0 + lds;
                        for (int j = 0; j < 16; j++) {
                            tile[kp * 32 + 2 * j] = r0[j];
                            tile[kp * 32 + 2 * j + 1] = r1[j];
                        }
                    }
                }
                continue;
            }
            for (int kp = 0; kp < 16; kp++)
                for (int j = 0; j < 16; j++)
                    for (int h = 0; h < 2; h++) {
                        int n = n0 + j, k = k0 + 2 * kp + h;
                        bf16_t v = 0;
                        if (n < N && k < K) v = trans == KT_NT ? src[(size_t)n * lds + k] : src[(size_t)k * lds + n];
                        tile[kp * 32 + 2 * j + h] = v;
                    }
        }
}

/* A rows -> zero-padded [round32(M), Kp] block. */
static void kt_tile_pack_a(int M, int K, const bf16_t *const *a, bf16_t *dst) {
    int Mp = kt_round32(M), Kp = kt_round32(K);
    for (int m = 0; m < Mp; m++) {
        bf16_t *d = dst + (size_t)m * Kp;
        if (m < M) {
            memcpy(d, a[m], sizeof(bf16_t) * (size_t)K);
            memset(d + K, 0, sizeof(bf16_t) * (size_t)(Kp - K));
        } else {
            memset(d, 0, sizeof(bf16_t) * (size_t)Kp);
        }
    }
}

/* One 32 x 32 block of C over kblocks steps of k: tmm0-3 (2 x 2 accumulator tiles) += A tiles (tmm4-5, rows
 * m and m + 16, astride bytes apart, ak elements per step) x B tiles (tmm6-7, bt elements per panel tile), then
 * stored into ct[4][16][16]. DOT is the tile dot product (bf16 or int8). */
#define KT_TILE_BLOCK_2X2(DOT, a0, a1, astride, ak, b0, b1, bt, kblocks, ct) \
    do {                                                                      \
        KT_TILE_ZERO(0);                                                      \
        KT_TILE_ZERO(1);                                                      \
        KT_TILE_ZERO(2);                                                      \
        KT_TILE_ZERO(3);                                                      \
        for (int kb_ = 0; kb_ < (kblocks); kb_++) {                           \
            KT_TILE_LOAD(4, (a0) + kb_ * (ak), astride);                      \
            KT_TILE_LOAD(5, (a1) + kb_ * (ak), astride);                      \
            KT_TILE_LOAD(6, (b0) + (size_t)kb_ * (bt), 64);                   \
            KT_TILE_LOAD(7, (b1) + (size_t)kb_ * (bt), 64);                   \
            DOT(0, 4, 6);                                                     \
            DOT(1, 4, 7);                                                     \
            DOT(2, 5, 6);                                                     \
            DOT(3, 5, 7);                                                     \
        }                                                                     \
        KT_TILE_STORE(0, (ct)[0], 64);                                        \
        KT_TILE_STORE(1, (ct)[1], 64);                                        \
        KT_TILE_STORE(2, (ct)[2], 64);                                        \
        KT_TILE_STORE(3, (ct)[3], 64);                                        \
    } while (0)

/* C[m][n] = sum_k A[m][k] B[k][n], A packed by kt_tile_pack_a, B by kt_tile_pack. */
static void kt_tile_gemm_panel(int M, int N, int K, const bf16_t *ap, const bf16_t *panel, float *c, size_t ldc) {
    int Mp = kt_round32(M), Np = kt_round32(N), Kp = kt_round32(K), kblocks = Kp / KT_TILE_K;
    size_t astride = sizeof(bf16_t) * (size_t)Kp;
    float ct[4][16][16] __attribute__((aligned(64)));
    for (int n0 = 0; n0 < Np; n0 += 32) {
        const bf16_t *b0 = panel + (size_t)(n0 / 16) * kblocks * 512, *b1 = b0 + (size_t)kblocks * 512;
        for (int m0 = 0; m0 < Mp; m0 += 32) {
            const bf16_t *a0 = ap + (size_t)m0 * Kp, *a1 = a0 + (size_t)16 * Kp;
            KT_TILE_BLOCK_2X2(KT_TILE_DPBF16, a0, a1, astride, KT_TILE_K, b0, b1, 512, kblocks, ct);
            for (int t = 0; t < 4; t++) {
                int mt = m0 + 16 * (t >> 1), nt = n0 + 16 * (t & 1);
                int rows = imin(16, M - mt), cols = imin(16, N - nt);
                for (int r = 0; r < rows; r++)
                    memcpy(c + (size_t)(mt + r) * ldc + nt, ct[t][r], sizeof(float) * (size_t)(cols > 0 ? cols : 0));
            }
        }
    }
}

/* ---- the prepared-operand slots ---- */

static size_t kt_tile_bop_bytes(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m) {
    if (m < S->blk.pack_min_m) return S->parent->bop_bytes(S->parent, w, trans, nr, nc, m);
    int N = trans == KT_NT ? nr : nc, K = trans == KT_NT ? nc : nr, rows = imin(m, S->blk.mc);
    size_t decoded = w->fmt == KT_W_BF16 ? 0 : kt_align64(sizeof(bf16_t) * (size_t)nr * nc);
    return decoded + kt_align64(kt_tile_panel_bytes(N, K)) + sizeof(bf16_t) * (size_t)kt_round32(rows) * kt_round32(K) + 64;
}

static void kt_tile_bop_prep(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans,
                             int m, void *scratch, kt_bop *b) {
    if (m < S->blk.pack_min_m) {
        S->parent->bop_prep(S->parent, w, e, r0, nr, c0, nc, trans, m, scratch, b);
        return;
    }
    kt_bop_open(b, KT_BOP_PANEL, trans, e, r0, nr, c0, nc);
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    const bf16_t *src;
    size_t lds;
    if (w->fmt == KT_W_BF16) {
        src = (const bf16_t *)w->data + ((size_t)e * w->rows + (size_t)(w->row0 + r0)) * w->cols + w->col0 + c0;
        lds = (size_t)w->cols;
    } else {
        kt_decode_block(S, w, e, r0, nr, c0, nc, (bf16_t *)p);
        src = (const bf16_t *)p;
        lds = (size_t)nc;
        p += kt_align64(sizeof(bf16_t) * (size_t)nr * nc);
    }
    kt_tile_pack(src, lds, trans, b->N, b->K, (bf16_t *)p);
    b->panel = p;
    b->work = p + kt_align64(kt_tile_panel_bytes(b->N, b->K));
}

static void kt_tile_bop_gemm(const kt_slots *S, int M, const bf16_t *const *a, const kt_bop *b, float *c, size_t ldc) {
    if (b->kind != KT_BOP_PANEL) {
        S->parent->bop_gemm(S->parent, M, a, b, c, ldc);
        return;
    }
    kt_tile_pack_a(M, b->K, a, b->work);
    kt_tile_gemm_panel(M, b->N, b->K, b->work, b->panel, c, ldc);
}

/* ---- W8A8: int8 tiles (TDPBSSD) ---- */

#define KT_TILE_K8 64 /* int8 values of k per tile row (64 bytes) */

static inline int kt_round64i(int n) { return (n + 63) & ~63; }

static size_t kt_tile_q8_panel_bytes(int N, int K) { return (size_t)kt_round32(N) * (size_t)kt_round64i(K); }

/* Packs int8 B (N x K, B[n][k] = src[n * lds + k]) into the quad panel. */
static void kt_tile_q8_pack(const int8_t *src, size_t lds, int N, int K, int8_t *panel) {
    int Np = kt_round32(N), kblocks = kt_round64i(K) / KT_TILE_K8;
    for (int nt = 0; nt < Np / 16; nt++)
        for (int kb = 0; kb < kblocks; kb++) {
            int8_t *tile = panel + ((size_t)nt * kblocks + kb) * 1024;
            for (int j = 0; j < 16; j++) {
                int n = nt * 16 + j;
                const int8_t *row = n < N ? src + (size_t)n * lds : NULL;
                for (int kq = 0; kq < 16; kq++)
                    for (int q = 0; q < 4; q++) {
                        int k = kb * KT_TILE_K8 + 4 * kq + q;
                        tile[kq * 64 + 4 * j + q] = row && k < K ? row[k] : 0;
                    }
            }
        }
}

/* int8 A rows -> zero-padded [round32(M), round64(K)] block; asum[m] = the codes' sum (when asum given). */
static void kt_tile_q8_pack_a(int M, int K, const int8_t *const *a, int8_t *dst, int32_t *asum) {
    int Mp = kt_round32(M), Kp = kt_round64i(K);
    for (int m = 0; m < Mp; m++) {
        int8_t *d = dst + (size_t)m * Kp;
        if (m < M) {
            memcpy(d, a[m], (size_t)K);
            memset(d + K, 0, (size_t)(Kp - K));
            if (asum) {
                int32_t s = 0;
                for (int k = 0; k < K; k++) s += a[m][k];
                asum[m] = s;
            }
        } else {
            memset(d, 0, (size_t)Kp);
        }
    }
}

/* C[m][n] = kt_q8_value(sa[m], sw[n], zw[n], dot, asum[m]) with the int32 dot over K from the tiles. */
static void kt_tile_q8_gemm_panel(int M, int N, int K, const int8_t *ap, const int8_t *panel, const float *sa,
                                  const float *sw, const float *zw, const int32_t *asum, float *c, size_t ldc) {
    int Mp = kt_round32(M), Np = kt_round32(N), Kp = kt_round64i(K), kblocks = Kp / KT_TILE_K8;
    size_t astride = (size_t)Kp;
    int32_t ct[4][16][16] __attribute__((aligned(64)));
    for (int n0 = 0; n0 < Np; n0 += 32) {
        const int8_t *b0 = panel + (size_t)(n0 / 16) * kblocks * 1024, *b1 = b0 + (size_t)kblocks * 1024;
        for (int m0 = 0; m0 < Mp; m0 += 32) {
            const int8_t *a0 = ap + (size_t)m0 * Kp, *a1 = a0 + (size_t)16 * Kp;
            KT_TILE_BLOCK_2X2(KT_TILE_DPBSSD, a0, a1, astride, KT_TILE_K8, b0, b1, 1024, kblocks, ct);
            for (int t = 0; t < 4; t++) {
                int mt = m0 + 16 * (t >> 1), nt = n0 + 16 * (t & 1);
                int rows = imin(16, M - mt), cols = imin(16, N - nt);
                for (int r = 0; r < rows; r++) {
                    float *cr = c + (size_t)(mt + r) * ldc + nt;
                    float s = sa[mt + r];
                    int32_t as = zw ? asum[mt + r] : 0;
                    for (int j = 0; j < cols; j++)
                        cr[j] = kt_q8_value(s, sw[nt + j], zw ? zw[nt + j] : 0.f, zw != NULL, ct[t][r][j], as);
                }
            }
        }
    }
}

/* The tile panel goes after what the portable q8 operand uses (scales, decoded codes): the same prep, then
 * a repack of its codes. */
static size_t kt_tile_q8_bytes(const kt_slots *S, const kt_wmat *w, int nr, int nc, int m) {
    if (m < S->blk.pack_min_m) return S->parent->bop_q8_bytes(S->parent, w, nr, nc, m);
    int rows = imin(m, S->blk.mc);
    return kt_bop_q8_bytes_rows(S, w, nr, nc, m) + 64 + kt_align64(kt_tile_q8_panel_bytes(nr, nc)) +
           kt_align64((size_t)kt_round32(rows) * kt_round64i(nc)) + sizeof(int32_t) * (size_t)kt_round32(rows);
}

static void kt_tile_q8_prep(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int m,
                            void *scratch, kt_bop *b) {
    if (m < S->blk.pack_min_m) {
        S->parent->bop_q8_prep(S->parent, w, e, r0, nr, c0, nc, m, scratch, b);
        return;
    }
    kt_bop_q8_prep_rows(S, w, e, r0, nr, c0, nc, m, scratch, b);
    uintptr_t after = (uintptr_t)scratch + kt_bop_q8_bytes_rows(S, w, nr, nc, m);
    int8_t *panel = (int8_t *)((after + 63) & ~(uintptr_t)63);
    kt_tile_q8_pack(b->q, b->ld, nr, nc, panel);
    b->kind = KT_BOP_Q8_PANEL;
    b->panel = panel;
    b->work = panel + kt_align64(kt_tile_q8_panel_bytes(nr, nc));
}

static void kt_tile_q8_gemm(const kt_slots *S, int M, const int8_t *const *aq, const float *sa, const kt_bop *b,
                            float *c, size_t ldc) {
    if (b->kind != KT_BOP_Q8_PANEL) {
        S->parent->bop_q8_gemm(S->parent, M, aq, sa, b, c, ldc);
        return;
    }
    int8_t *ap = b->work;
    int32_t *asum = (int32_t *)((char *)ap + kt_align64((size_t)kt_round32(M) * kt_round64i(b->K)));
    kt_tile_q8_pack_a(M, b->K, aq, ap, b->qzero ? asum : NULL);
    kt_tile_q8_gemm_panel(M, b->N, b->K, ap, b->panel, sa, b->qscale, b->qzero, asum, c, ldc);
}

/* Tile peak: four independent TDPBF16PS chains on resident tiles; 16 x 16 x 32 x 2 FLOPs each. */
static double kt_tile_peak_loop(long iters) {
    bf16_t ones[16 * 32] __attribute__((aligned(64)));
    for (int i = 0; i < 16 * 32; i++) ones[i] = 0x3c00; /* 2^-7: sums stay finite */
    float sink[16][16] __attribute__((aligned(64)));
    KT_TILE_ZERO(0);
    KT_TILE_ZERO(1);
    KT_TILE_ZERO(2);
    KT_TILE_ZERO(3);
    KT_TILE_LOAD(4, ones, 64);
    KT_TILE_LOAD(5, ones, 64);
    KT_TILE_LOAD(6, ones, 64);
    KT_TILE_LOAD(7, ones, 64);
    for (long i = 0; i < iters; i++) {
        KT_TILE_DPBF16(0, 4, 6);
        KT_TILE_DPBF16(1, 4, 7);
        KT_TILE_DPBF16(2, 5, 6);
        KT_TILE_DPBF16(3, 5, 7);
    }
    KT_TILE_STORE(0, sink, 64);
    volatile float v = sink[0][0];
    (void)v;
    return (double)iters * 4 * 16 * 16 * 32 * 2;
}

/* Shared by the amx and amx-model rows: tiles from pack_min_m rows on (per-level data; to be tuned on
 * silicon), everything else inherited. */
#define KT_TILE_BLOCKING {.pack_min_m = 8}
#define KT_TILE_SLOTS                                                                                         \
    {.bop_bytes = kt_tile_bop_bytes, .bop_prep = kt_tile_bop_prep, .bop_gemm = kt_tile_bop_gemm,                \
     .bop_q8_bytes = kt_tile_q8_bytes, .bop_q8_prep = kt_tile_q8_prep, .bop_q8_gemm = kt_tile_q8_gemm,         \
     .peak_loop = kt_tile_peak_loop}

#endif
