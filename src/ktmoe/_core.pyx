# cython: language_level=3, boundscheck=False, wraparound=False
"""The only Cython in ktmoe: declarations of the C API, GIL-free calls, C status -> Python exception.

Tensors cross this boundary as raw addresses (ints from torch's data_ptr()); the Python layer checks
shapes, dtypes and devices before anything reaches here, and keeps the tensors alive."""

from libc.stddef cimport ptrdiff_t
from libc.stdint cimport uintptr_t, int64_t
from libc.stdlib cimport malloc, free

cdef extern from "ktmoe.h" nogil:
    enum:
        KT_MAX_PARTS
        KT_ERRLEN
        KT_ISA_COUNT
        KT_W_COUNT
        KT_L_ROWS
        KT_SLOT_COUNT
        KT_AQ_NONE
        KT_AQ_INT8
        KT_AQ_COUNT
    int KT_OK, KT_EINVAL, KT_ENOMEM, KT_ESTATE
    int kt_isa_detected()
    int kt_isa_active()
    int kt_isa_set(int level)
    const char *kt_isa_name(int level)
    int kt_isa_from_name(const char *name)
    int kt_isa_parent(int level)
    int kt_isa_built(int level)
    int kt_isa_usable(int level, char *why, size_t len)
    int kt_isa_auto(int level)
    void kt_cpu_features(char *buf, size_t n)
    const char *kt_cpu_brand()
    void kt_amx_status(int *detected, int *permitted)
    const char *kt_format_name(int fmt)
    int kt_format_bits(int fmt)
    int kt_format_has_scale(int fmt)
    int kt_format_has_zero(int fmt)
    int kt_format_blocks_2d(int fmt)
    const char *kt_slot_name(int slot)
    double kt_slot_check(int level, int slot, int fmt, int M, int N, int K, int group, int block_rows, unsigned seed,
                         char *err)
    long kt_tile_model_violations(char *msg, size_t len)
    int kt_q8_quantize_rows(int M, int K, const void *a, signed char *q, float *sa, char *err)

    ctypedef struct kt_engine:
        pass
    kt_engine *kt_engine_create(int nparts, const int *part_sizes, const int *cpu_ids, char *err)
    void kt_engine_destroy(kt_engine *eng)
    int kt_engine_threads(const kt_engine *eng)
    int kt_engine_parts(const kt_engine *eng)
    int kt_engine_part_copy(kt_engine *eng, int part, void *dst, const void *src, size_t n_outer,
                            ptrdiff_t src_outer, size_t n_inner, ptrdiff_t src_inner, size_t row_bytes)

    ctypedef struct kt_wmat:
        int fmt, layout
        const void *data
        const float *scale
        const float *zero
        int rows, cols, row0, col0, group, block_rows
    ctypedef struct kt_layer:
        int E, k, H, I, r
        float lora_scale
        int act_quant
        int nparts
        int part_i0[KT_MAX_PARTS + 1]
        kt_wmat gate[KT_MAX_PARTS]
        kt_wmat up[KT_MAX_PARTS]
        kt_wmat down[KT_MAX_PARTS]
        const float *gate_a
        const float *gate_b
        const float *up_a
        const float *up_b
        const float *down_a
        const float *down_b

    int kt_layer_set_weight(kt_layer *L, int part, int which, const kt_wmat *w, char *err)
    ctypedef struct kt_ctx:
        pass
    kt_ctx *kt_ctx_create()
    void kt_ctx_destroy(kt_ctx *ctx)
    size_t kt_ctx_bytes(const kt_ctx *ctx)
    void kt_ctx_release(kt_ctx *ctx)
    int kt_ctx_nonfinite(const kt_ctx *ctx)
    int kt_plan(kt_ctx *ctx, const kt_layer *L, int T, const void *ids, int ids_is_i32, const void *wts,
                int wts_is_bf16, char *err)
    int kt_forward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *x, int x_is_f32, void *out,
                   int out_is_f32, int save_for_backward, char *err)
    int kt_backward(kt_ctx *ctx, const kt_layer *L, kt_engine *eng, const void *dy, int dy_is_f32, void *dx,
                    int dx_is_f32, float *dw, float *const grads[6], char *err)
    void kt_profile_enable(int on)
    int kt_profile_read(int i, const char **name, double *seconds, double *cpu_seconds, long *calls)
    void kt_profile_reset()
    double kt_measure_peak_gflops(kt_engine *eng, double seconds)
    double kt_measure_read_gbps(kt_engine *eng, size_t nbytes)

MAX_PARTS = KT_MAX_PARTS
ISA_LEVELS = tuple(kt_isa_name(i).decode() for i in range(KT_ISA_COUNT))  # every level the registry knows
WEIGHT_FORMATS = {kt_format_name(i).decode(): i for i in range(KT_W_COUNT)}  # format name -> descriptor code
FORMAT_BITS = {kt_format_name(i).decode(): kt_format_bits(i) for i in range(KT_W_COUNT)}
# formats whose scales cover 2-D blocks (block_rows x group) with partial edge blocks
FORMAT_BLOCKS_2D = frozenset(kt_format_name(i).decode() for i in range(KT_W_COUNT) if kt_format_blocks_2d(i) == 1)
SLOTS = tuple(kt_slot_name(i).decode() for i in range(KT_SLOT_COUNT))
ACT_QUANT = {None: KT_AQ_NONE, "int8": KT_AQ_INT8}  # activation_quant -> kt_layer.act_quant (enum kt_act_quant)


cdef int _raise(int rc, char *err) except -1:
    msg = err.decode("utf-8", "replace")
    if rc == KT_EINVAL:
        raise ValueError(msg)
    if rc == KT_ENOMEM:
        raise MemoryError(msg)
    raise RuntimeError(msg)


def isa_detected():
    return kt_isa_name(kt_isa_detected()).decode()


def isa_active():
    return kt_isa_name(kt_isa_active()).decode()


def _level_id(name):
    cdef int level = kt_isa_from_name(name.encode())
    if level < 0:
        raise ValueError(f"unknown ISA level {name!r}; valid: {', '.join(ISA_LEVELS)}")
    return level


def isa_set(name):
    """Selects an ISA level by name; one this machine cannot run falls back along its parents. Returns the
    level in use."""
    return kt_isa_name(kt_isa_set(_level_id(name))).decode()


def isa_levels():
    """Every level of the registry: name, parent, built (the compiler had its flags), usable here (and why
    not), chosen automatically when usable."""
    cdef char why[160]
    out = []
    for i in range(KT_ISA_COUNT):
        usable = kt_isa_usable(i, why, sizeof(why))
        parent = kt_isa_parent(i)
        out.append(dict(name=kt_isa_name(i).decode(), parent=kt_isa_name(parent).decode() if parent >= 0 else None,
                        built=bool(kt_isa_built(i)), usable=bool(usable), why_not=why.decode() if not usable else "",
                        auto=bool(kt_isa_auto(i))))
    return out


def amx_status():
    """(detected: the CPU and XCR0 have AMX tiles, permitted: Linux granted the tile data permission)."""
    cdef int detected = 0, permitted = 0
    kt_amx_status(&detected, &permitted)
    return bool(detected), bool(permitted)


def slot_check(str level, str slot, str fmt, int M, int N, int K, int group=0, unsigned seed=0, int block_rows=0):
    """Level `level`'s slot against the reference slot, operands on guard pages: the worst error relative
    to the slot's tolerance (<= 1 passes) and the first problem found ("" when none). block_rows: rows per
    scale block of the 2-D block formats (FORMAT_BLOCKS_2D; 0: one block row per row)."""
    cdef char err[512]
    cdef int lv = _level_id(level)
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; valid: {', '.join(SLOTS)}")
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; valid: {', '.join(WEIGHT_FORMATS)}")
    cdef int sl = SLOTS.index(slot), fm = WEIGHT_FORMATS[fmt]
    cdef double r
    err[0] = 0
    with nogil:
        r = kt_slot_check(lv, sl, fm, M, N, K, group, block_rows, seed, err)
    if r < 0 and (r == KT_EINVAL or r == KT_ENOMEM):
        _raise(<int>r, err)
    return r, err.decode("utf-8", "replace")


def q8_quantize_rows(int M, int K, uintptr_t a, uintptr_t q, uintptr_t sa):
    """The active level's W8A8 activation quantizer (what a forward with act_quant runs) on M contiguous rows
    of K bf16 values at `a`: int8 codes to `q` [M, K], fp32 scales to `sa` [M]."""
    cdef char err[512]
    cdef int rc
    err[0] = 0
    with nogil:
        rc = kt_q8_quantize_rows(M, K, <const void *>a, <signed char *>q, <float *>sa, err)
    if rc != KT_OK:
        _raise(rc, err)


def tile_model_violations():
    """(count, first message) of the tile model's rule violations since the last call."""
    cdef char msg[200]
    cdef long n = kt_tile_model_violations(msg, sizeof(msg))
    return n, msg.decode()


def cpu_features():
    cdef char buf[512]
    kt_cpu_features(buf, sizeof(buf))
    return buf.decode().split()


def cpu_brand():
    return kt_cpu_brand().decode()


def profile_enable(bint on):
    """Turns the per-stage timer on or off (off by default; costs two clock reads per stage)."""
    kt_profile_enable(on)


def profile_reset():
    kt_profile_reset()


def profile_read():
    """{stage name: (wall seconds, task CPU seconds summed over threads, calls)} since the last reset."""
    cdef const char *name
    cdef double sec, cpu
    cdef long calls
    out = {}
    cdef int n = kt_profile_read(-1, &name, &sec, &cpu, &calls)
    for i in range(n):
        kt_profile_read(i, &name, &sec, &cpu, &calls)
        out[name.decode()] = (sec, cpu, calls)
    return out


cdef class Engine:
    """The thread pool. part_sizes[p] threads in subpool p; cpu_ids one CPU (or -1) per thread."""
    cdef kt_engine *eng

    def __cinit__(self, part_sizes, cpu_ids):
        cdef char err[512]
        cdef int n = len(part_sizes)
        cdef int total = sum(part_sizes)
        if len(cpu_ids) != total:
            raise ValueError(f"cpu_ids has {len(cpu_ids)} entries for {total} threads")
        cdef int *sizes = <int *>malloc(sizeof(int) * max(n, 1))
        cdef int *cpus = <int *>malloc(sizeof(int) * max(total, 1))
        try:
            for i in range(n):
                sizes[i] = part_sizes[i]
            for i in range(total):
                cpus[i] = cpu_ids[i]
            err[0] = 0
            self.eng = kt_engine_create(n, sizes, cpus, err)
        finally:
            free(sizes)
            free(cpus)
        if self.eng == NULL:
            raise RuntimeError(err.decode())

    def __dealloc__(self):
        if self.eng != NULL:
            kt_engine_destroy(self.eng)
            self.eng = NULL

    @property
    def threads(self):
        return kt_engine_threads(self.eng)

    @property
    def parts(self):
        return kt_engine_parts(self.eng)

    def part_copy(self, int part, uintptr_t dst, uintptr_t src, size_t n_outer, Py_ssize_t src_outer,
                  size_t n_inner, Py_ssize_t src_inner, size_t row_bytes):
        """Gathers rows into contiguous dst on subpool `part`'s threads (NUMA first touch)."""
        cdef int rc
        with nogil:
            rc = kt_engine_part_copy(self.eng, part, <void *>dst, <const void *>src, n_outer, src_outer, n_inner,
                                     src_inner, row_bytes)
        if rc != KT_OK:
            raise ValueError(f"part {part} outside [0, {self.parts})")

    def measure_peak_gflops(self, double seconds=0.5):
        cdef double r
        with nogil:
            r = kt_measure_peak_gflops(self.eng, seconds)
        return r

    def measure_read_gbps(self, size_t nbytes=1 << 30):
        cdef double r
        with nogil:
            r = kt_measure_read_gbps(self.eng, nbytes)
        return r


cdef class Layer:
    """Dims, weight views per TP part, and LoRA addresses of one MoE layer (no memory is owned)."""
    cdef kt_layer L

    def __cinit__(self, int E, int k, int H, int I, int r, float lora_scale, part_i0):
        cdef int P = len(part_i0) - 1
        if P < 1 or P > KT_MAX_PARTS:
            raise ValueError(f"number of TP parts must be in [1, {KT_MAX_PARTS}], got {P}")
        self.L.E = E
        self.L.k = k
        self.L.H = H
        self.L.I = I
        self.L.r = r
        self.L.lora_scale = lora_scale
        self.L.nparts = P
        for p in range(P + 1):
            self.L.part_i0[p] = part_i0[p]

    def set_weight(self, int part, str which, int fmt, uintptr_t data, uintptr_t scale, uintptr_t zero,
                   int rows, int cols, int row0, int col0, int group, int block_rows=1):
        """Binds one projection of one TP part; C checks the descriptor and leaves the layer as it was on error."""
        cdef kt_wmat w
        cdef char err[512]
        cdef int which_id
        if which not in ("gate", "up", "down"):
            raise ValueError(f"which must be 'gate', 'up' or 'down', got {which!r}")
        which_id = ("gate", "up", "down").index(which)
        w.fmt = fmt
        w.layout = KT_L_ROWS
        w.data = <const void *>data
        w.scale = <const float *>scale
        w.zero = <const float *>zero
        w.rows = rows
        w.cols = cols
        w.row0 = row0
        w.col0 = col0
        w.group = group
        w.block_rows = block_rows
        err[0] = 0
        cdef int rc = kt_layer_set_weight(&self.L, part, which_id, &w, err)
        if rc != KT_OK:
            _raise(rc, err)

    def set_act_quant(self, int mode):
        """The forward's activation quantization (ACT_QUANT values: 0 none, 1 int8 per token, W8A8); the
        weights are checked against it at each forward."""
        if mode < 0 or mode >= KT_AQ_COUNT:
            raise ValueError(f"act_quant mode must be in [0, {KT_AQ_COUNT}) (0 none, 1 int8), got {mode}")
        self.L.act_quant = mode

    @property
    def act_quant(self):
        return self.L.act_quant

    def set_lora(self, int r, float scale, uintptr_t ga, uintptr_t gb, uintptr_t ua, uintptr_t ub, uintptr_t da, uintptr_t db):
        self.L.r = r
        self.L.lora_scale = scale
        self.L.gate_a = <const float *>ga
        self.L.gate_b = <const float *>gb
        self.L.up_a = <const float *>ua
        self.L.up_b = <const float *>ub
        self.L.down_a = <const float *>da
        self.L.down_b = <const float *>db


cdef class Context:
    """One call's routing plan and saved activations."""
    cdef kt_ctx *ctx

    def __cinit__(self):
        self.ctx = kt_ctx_create()
        if self.ctx == NULL:
            raise MemoryError("could not allocate a ktmoe context")

    def __dealloc__(self):
        if self.ctx != NULL:
            kt_ctx_destroy(self.ctx)
            self.ctx = NULL

    @property
    def nbytes(self):
        return kt_ctx_bytes(self.ctx)

    def release(self):
        kt_ctx_release(self.ctx)

    @property
    def nonfinite(self):
        """KT_NF_* bits: which results of the last call hold NaN/Inf (1 output or grad_input, 2 routing-weight
        grads, 4 << i LoRA grad i), found while they were written."""
        return kt_ctx_nonfinite(self.ctx)

    def plan(self, Layer layer, int T, uintptr_t ids, bint ids_i32, uintptr_t wts, bint wts_bf16):
        cdef char err[512]
        cdef int rc
        err[0] = 0
        with nogil:
            rc = kt_plan(self.ctx, &layer.L, T, <const void *>ids, ids_i32, <const void *>wts, wts_bf16, err)
        if rc != KT_OK:
            _raise(rc, err)

    def forward(self, Layer layer, Engine engine, uintptr_t x, bint x_f32, uintptr_t out, bint out_f32, bint save):
        cdef char err[512]
        cdef int rc
        err[0] = 0
        with nogil:
            rc = kt_forward(self.ctx, &layer.L, engine.eng, <const void *>x, x_f32, <void *>out, out_f32, save, err)
        if rc != KT_OK:
            _raise(rc, err)

    def backward(self, Layer layer, Engine engine, uintptr_t dy, bint dy_f32, uintptr_t dx, bint dx_f32,
                 uintptr_t dw, grads):
        cdef char err[512]
        cdef int rc
        cdef float *g[6]
        cdef float **gp = NULL
        err[0] = 0
        if grads is not None:
            for i in range(6):
                g[i] = <float *><uintptr_t>grads[i]
            gp = g
        with nogil:
            rc = kt_backward(self.ctx, &layer.L, engine.eng, <const void *>dy, dy_f32, <void *>dx, dx_f32,
                             <float *>dw, gp, err)
        if rc != KT_OK:
            _raise(rc, err)
