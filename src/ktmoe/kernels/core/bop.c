/* The default prepared-operand slots, shared by every level without a packed layout of its own:
 * bf16 blocks are read where they lie, other formats are decoded into a row block in scratch (the same
 * packed bytes serve forward and the transposed backward access: nothing is stored twice), and a
 * small-M NN product on quantized weights is left to the level's fused kernel when it has one.
 * (Copying bf16 blocks of the backward NN GEMMs into contiguous scratch was measured slower: the copy
 * costs more than the strided re-reads it saves.) */
#include "internal.h"

/* Rows ahead whose codes kt_decode_block prefetches: the rows of a block are a matrix row apart (the backward's
 * NN blocks: a few hundred bytes per row, every row in another page), which the hardware prefetcher does not
 * follow; without it the decode waits on memory for every row. */
#define KT_DECODE_PFD 8

void kt_decode_block(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst) {
    kt_decode_fn run = S->decode_run[w->fmt];
    const int bits = kt_format_bits(w->fmt);
    const size_t seg = ((size_t)nc * bits + 7) / 8 + 1; /* bytes of a row's codes (+1: an odd nibble start) */
    for (int r = 0; r < nr; r++) {
        int row = w->row0 + r0 + r;
        if (r + KT_DECODE_PFD < nr) {
            size_t at = ((size_t)e * w->rows + (size_t)(row + KT_DECODE_PFD)) * w->cols + (size_t)(w->col0 + c0);
            const char *p = (const char *)w->data + at * bits / 8;
            for (size_t off = 0; off < seg; off += 64) __builtin_prefetch(p + off);
            __builtin_prefetch(p + seg - 1);
        }
        bf16_t *d = dst + (size_t)r * nc;
        for (int c = 0; c < nc;) {
            int col = w->col0 + c0 + c;
            int n = (col / w->group + 1) * w->group - col; /* to the end of this scale block */
            if (n > nc - c) n = nc - c;
            run(w, e, row, col, n, d + c);
            c += n;
        }
    }
}

static int takes_fused(const kt_slots *S, const kt_wmat *w, int trans, int m) {
    return trans == KT_NN && S->qdot_small && w->fmt != KT_W_BF16 && m <= S->blk.fused_max_m[w->fmt];
}

size_t kt_bop_bytes_rows(const kt_slots *S, const kt_wmat *w, int trans, int nr, int nc, int m) {
    if (takes_fused(S, w, trans, m)) {
        int K = nr, rows = m < S->blk.mc ? m : S->blk.mc;
        return sizeof(float) * ((size_t)rows * K + 16 * (size_t)K); /* fp32 A rows + decode tables */
    }
    return w->fmt == KT_W_BF16 ? 0 : sizeof(bf16_t) * (size_t)nr * nc;
}

void kt_bop_prep_rows(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int trans, int m,
                      void *scratch, kt_bop *b) {
    if (takes_fused(S, w, trans, m)) {
        kt_bop_open_fused(b, w, trans, e, r0, nr, c0, nc, scratch);
        return;
    }
    kt_bop_open(b, KT_BOP_ROWS, trans, e, r0, nr, c0, nc);
    if (w->fmt == KT_W_BF16) {
        b->ld = (size_t)w->cols;
        b->w = (const bf16_t *)w->data + ((size_t)e * w->rows + (size_t)(w->row0 + r0)) * w->cols + w->col0 + c0;
        return;
    }
    kt_decode_block(S, w, e, r0, nr, c0, nc, scratch);
    b->ld = (size_t)nc;
    b->w = scratch;
}

void kt_bop_gemm_rows(const kt_slots *S, int M, const bf16_t *const *a, const kt_bop *b, float *c, size_t ldc) {
    if (b->kind == KT_BOP_FUSED) {
        float *af = b->work, *lut = af + (size_t)M * b->K;
        for (int i = 0; i < M; i++) {
            float *fi = af + (size_t)i * b->K;
            for (int k = 0; k < b->K; k++) fi[k] = kt_bf(a[i][k]);
        }
        S->qdot_small(M, b->N, b->K, af, (size_t)b->K, b->src, b->e, b->r0, b->c0, c, ldc, 0, lut);
    } else if (b->trans == KT_NT) {
        S->gemm_nt(M, b->N, b->K, a, b->w, b->ld, 0, c, ldc);
    } else {
        S->gemm_nn(M, b->N, b->K, a, b->w, b->ld, c, ldc);
    }
}

/* ---- W8A8 (kt_layer.act_quant): the activation quantizer and the int8 product ---- */

/* Round half to even of |v| < 2^22: adding 1.5 * 2^23 leaves no fraction bits (one IEEE rounding, to nearest
 * even), subtracting it again is exact. Only additions: no contraction into an FMA can change it. */
static inline float q8_round(float v) { return (v + 12582912.0f) - 12582912.0f; }

float kt_q8_quant_rows(int nseg, const bf16_t *const *seg, const int *len, int8_t *const *dst) {
    float amax = 0.f;
    for (int i = 0; i < nseg; i++) {
        const bf16_t *a = seg[i];
        float m = 0.f;
#pragma omp simd reduction(max : m)
        for (int j = 0; j < len[i]; j++) {
            float v = kt_bf((bf16_t)(a[j] & 0x7fffu)); /* |a| */
            m = v > m ? v : m;
        }
        amax = m > amax ? m : amax;
    }
    float sa = amax > 0.f ? amax / 127.0f : 1.0f;
    for (int i = 0; i < nseg; i++) {
        const bf16_t *a = seg[i];
        int8_t *d = dst[i];
#pragma omp simd
        for (int j = 0; j < len[i]; j++) {
            float r = q8_round(kt_bf(a[j]) / sa);
            r = r >= -127.0f ? r : -127.0f;
            r = r <= 127.0f ? r : 127.0f;
            d[j] = (int8_t)(int)r;
        }
    }
    return sa;
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

size_t kt_bop_q8_bytes_rows(const kt_slots *S, const kt_wmat *w, int nr, int nc, int m) {
    (void)S;
    (void)m;
    size_t codes = kt_format_bits(w->fmt) == 8 ? 0 : align64((size_t)nr * nc);
    return 64 + align64(2 * sizeof(float) * (size_t)nr) + codes;
}

void kt_bop_q8_prep_rows(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int m,
                         void *scratch, kt_bop *b) {
    (void)S;
    (void)m;
    kt_bop_open(b, KT_BOP_Q8_ROWS, KT_NT, e, r0, nr, c0, nc);
    char *p = (char *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *sc = (float *)p, *z = kt_format_has_zero(w->fmt) == 1 ? sc + nr : NULL;
    kt_q8_block_scales(w, e, r0, nr, c0, sc, z);
    p += align64(2 * sizeof(float) * (size_t)nr);
    b->q = kt_q8_block_codes(w, e, r0, nr, c0, nc, (int8_t *)p, &b->ld);
    b->qscale = sc;
    b->qzero = z;
}

void kt_bop_q8_gemm_rows(const kt_slots *S, int M, const int8_t *const *aq, const float *sa, const kt_bop *b,
                         float *c, size_t ldc) {
    (void)S;
    int N = b->N, K = b->K, hz = b->qzero != NULL;
    int32_t asum[4];
    int m = 0;
    for (; m < M; m += 4) { /* four rows per pass over the codes (fewer at the end) */
        int rows = imin(4, M - m);
        for (int i = 0; i < rows; i++) {
            int32_t s = 0;
            if (hz)
                for (int k = 0; k < K; k++) s += aq[m + i][k];
            asum[i] = s;
        }
        for (int n = 0; n < N; n++) {
            const int8_t *q = b->q + (size_t)n * b->ld;
            float sw = b->qscale[n], zw = hz ? b->qzero[n] : 0.f;
            for (int i = 0; i < rows; i++) {
                const int8_t *a = aq[m + i];
                int32_t dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int k = 0; k < K; k++) dot += (int32_t)a[k] * (int32_t)q[k];
                c[(size_t)(m + i) * ldc + n] = kt_q8_value(sa[m + i], sw, zw, hz, dot, asum[i]);
            }
        }
    }
}
