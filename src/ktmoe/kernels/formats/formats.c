/* The format traits table: one row per weight format (enum kt_wfmt). Adding a format is one row here, its
 * decode in decode.h (and in KT_GENERIC_DECODE), and one Python format class. */
#include <stdio.h>

#include "decode.h"

typedef struct {
    const char *name;
    int bits, has_scale, has_zero;
    int codes_per_byte; /* 1, or 2 for nibbles */
    int q8;             /* has an int8 view for the W8A8 path: w = scale * (code + q8_offset) + zero */
    int q8_offset;
    int blocks_2d;      /* scale blocks of block_rows x group, partial at the edges (fp8); else block_rows == 1
                           and group divides cols (the fused kernels and the K-group slicing rely on it) */
} kt_format_traits;

static const kt_format_traits traits[KT_W_COUNT] = {
    [KT_W_BF16] = {"bf16", 16, 0, 0, 1, 0, 0, 0},
    [KT_W_INT8] = {"int8", 8, 1, 0, 1, 1, 0, 0},
    [KT_W_INT4] = {"int4", 4, 1, 0, 2, 1, -8, 0},
    [KT_W_INT4_1] = {"int4_1", 4, 1, 1, 2, 1, 0, 0},
    [KT_W_FP8] = {"fp8", 8, 1, 0, 1, 0, 0, 1},
};

static const kt_format_traits *traits_of(int fmt) { return fmt >= 0 && fmt < KT_W_COUNT ? &traits[fmt] : NULL; }

const char *kt_format_name(int fmt) { return traits_of(fmt) ? traits_of(fmt)->name : NULL; }
int kt_format_bits(int fmt) { return traits_of(fmt) ? traits_of(fmt)->bits : -1; }
int kt_format_has_scale(int fmt) { return traits_of(fmt) ? traits_of(fmt)->has_scale : -1; }
int kt_format_has_zero(int fmt) { return traits_of(fmt) ? traits_of(fmt)->has_zero : -1; }
int kt_format_blocks_2d(int fmt) { return traits_of(fmt) ? traits_of(fmt)->blocks_2d : -1; }

int kt_wmat_check(const kt_wmat *w, int E, char *err) {
    const kt_format_traits *t = traits_of(w->fmt);
    if (!t) {
        snprintf(err, KT_ERRLEN, "unknown weight format code %d (known: 0..%d)", w->fmt, KT_W_COUNT - 1);
        return KT_EINVAL;
    }
    if (w->layout != KT_L_ROWS) {
        snprintf(err, KT_ERRLEN, "%s weights: unknown layout code %d", t->name, w->layout);
        return KT_EINVAL;
    }
    if (!w->data || E < 1 || w->rows < 1 || w->cols < 1) {
        snprintf(err, KT_ERRLEN, "%s weights: no data or empty matrix (E=%d rows=%d cols=%d)", t->name, E, w->rows,
                 w->cols);
        return KT_EINVAL;
    }
    if (w->group < 1 || w->block_rows < 1) {
        snprintf(err, KT_ERRLEN, "%s weights: group=%d and block_rows=%d must be >= 1", t->name, w->group,
                 w->block_rows);
        return KT_EINVAL;
    }
    if (!t->blocks_2d && (w->cols % w->group != 0 || w->block_rows != 1)) {
        snprintf(err, KT_ERRLEN, "%s weights: group=%d must divide cols=%d and block_rows=%d must be 1 (only fp8 "
                 "has 2-D scale blocks with partial edges)", t->name, w->group, w->cols, w->block_rows);
        return KT_EINVAL;
    }
    if (t->codes_per_byte == 2 && w->cols % 2) {
        snprintf(err, KT_ERRLEN, "%s weights: cols=%d must be even (two codes per byte)", t->name, w->cols);
        return KT_EINVAL;
    }
    if ((t->has_scale && !w->scale) || (t->has_zero && !w->zero)) {
        snprintf(err, KT_ERRLEN, "%s weights: missing %s", t->name, !w->scale ? "scales" : "zero points");
        return KT_EINVAL;
    }
    if (w->row0 < 0 || w->col0 < 0 || w->row0 >= w->rows || w->col0 >= w->cols) {
        snprintf(err, KT_ERRLEN, "%s weights: view origin (%d, %d) outside the %d x %d matrix", t->name, w->row0,
                 w->col0, w->rows, w->cols);
        return KT_EINVAL;
    }
    return KT_OK;
}

/* ---- the int8 view of the W8A8 path (slots.h) ---- */

int kt_q8_supported(const kt_wmat *w) {
    const kt_format_traits *t = traits_of(w->fmt);
    return t && t->q8 && w->group == w->cols;
}

const int8_t *kt_q8_block_codes(const kt_wmat *w, int e, int r0, int nr, int c0, int nc, int8_t *scratch, size_t *ld) {
    const kt_format_traits *t = traits_of(w->fmt);
    int row = w->row0 + r0, col = w->col0 + c0;
    if (t->codes_per_byte == 1) { /* int8: the stored codes as they are */
        *ld = (size_t)w->cols;
        return (const int8_t *)w->data + kt_code_index(w, e, row, col);
    }
    const uint8_t *b = (const uint8_t *)w->data;
    int off = t->q8_offset;
    for (int r = 0; r < nr; r++) {
        size_t at = kt_code_index(w, e, row + r, col);
        int8_t *d = scratch + (size_t)r * nc;
        for (int j = 0; j < nc; j++) {
            size_t i = at + (size_t)j;
            d[j] = (int8_t)(((b[i >> 1] >> (4 * (i & 1))) & 15) + off);
        }
    }
    *ld = (size_t)nc;
    return scratch;
}

void kt_q8_block_scales(const kt_wmat *w, int e, int r0, int nr, int c0, float *scale, float *zero) {
    for (int r = 0; r < nr; r++) {
        size_t si = kt_scale_index(w, e, w->row0 + r0 + r, w->col0 + c0);
        scale[r] = w->scale[si];
        if (zero) zero[r] = w->zero ? w->zero[si] : 0.f;
    }
}
