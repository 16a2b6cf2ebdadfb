#!/bin/sh
# Build and run the AVX-512-BF16 GEMM kernel test (correctness + single-core GFLOP/s). Args go to the binary (--quick, --no-bench).
cd "$(dirname "$0")/../.." && gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mfma -I src/ktmoe/kernels tests/native/test_gemm_avx512bf16.c -o /tmp/test_gemm_avx512bf16 -lm && taskset -c 1 /tmp/test_gemm_avx512bf16 "$@"
