/* The default prepared-operand slots, shared by every level without a packed layout of its own:
 * bf16 blocks are read where they lie, other formats are decoded into a row block in scratch (the same
 * packed bytes serve forward and the transposed backward access: nothing is stored twice), and a
 * small-M NN product on quantized weights is left to the level's fused kernel when it has one.
 * (Copying bf16 blocks of the backward NN GEMMs into contiguous scratch was measured slower: the copy
 * costs more than the strided re-reads it saves.) */
#include "internal.h"

void kt_decode_block(const kt_slots *S, const kt_wmat *w, int e, int r0, int nr, int c0, int nc, bf16_t *dst) {
    kt_decode_fn run = S->decode_run[w->fmt];
    for (int r = 0; r < nr; r++) {
        int row = w->row0 + r0 + r;
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
    memset(b, 0, sizeof *b);
    b->trans = trans;
    b->N = trans == KT_NT ? nr : nc;
    b->K = trans == KT_NT ? nc : nr;
    b->e = e;
    b->r0 = r0;
    b->c0 = c0;
    if (takes_fused(S, w, trans, m)) {
        b->kind = KT_BOP_FUSED;
        b->src = w;
        b->work = scratch;
        return;
    }
    b->kind = KT_BOP_ROWS;
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
