/* The avx512 level: portable GEMM kernels vectorized by the compiler with this file's -m flags. */
#include "gemm_generic.h"
#include "peak_generic.h"
#define KT_OPS_NAME kt_ops_avx512
#define KT_ISA_LABEL "avx512"
#define KT_PEAK_LOOP peak_loop_fma
#include "stages.inc.c"
