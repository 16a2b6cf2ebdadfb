#!/usr/bin/env bash
# The AMX host check, in one run (the device machine: Intel Xeon with AMX, Python 3.12, torch, pytest, no
# network). Builds ktmoe, runs the slot conformance, the numerics and the W8A8 tests at amx, amx-model and
# avx512bf16, then the bench with kt-kernel side by side; everything lands under $OUT. Runs unchanged on a
# machine without AMX: the AMX parts are reported as skipped. Budget: about 7 minutes on 16 cores.
#
#   OUT=/tmp/out bash tools/device_amx_check.sh            # here, to rehearse
#   run: bash tools/device_amx_check.sh  (carry peer/ for kt-kernel: see README "Speed")
#
# kt-kernel, optional: a folder peer/ (git-ignored) holding kt_kernel/ (its _amx .so only), kt_kernel.libs/
# and gguf, unpacked from `pip download --no-deps --only-binary=:all: --python-version 3.12
# --platform manylinux_2_35_x86_64 kt-kernel==0.7.2 gguf`.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
step() { echo "== $(( $(date +%s) - T0 ))s: $*" | tee -a "$OUT/steps.log"; }
# run NAME SECONDS CMD...: output to $OUT/NAME.log, exit code recorded, never stops the script
run() {
    local name=$1 limit=$2
    shift 2
    step "$name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc" | tee -a "$OUT/steps.log"
    tail -3 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/steps.log"
}

{ lscpu; echo; nproc; "$PY" --version; "$PY" -c "import torch; print('torch', torch.__version__)"; } \
    > "$OUT/machine.txt" 2>&1
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
run build 240 "$PY" -m pip install --no-build-isolation --no-deps .
# tests import the installed module: leave the source tree's copy (if any) out of the way
export PYTHONPATH=
run cpu_info 60 "$PY" -c "import json, ktmoe; print(json.dumps(ktmoe.cpu_info(), indent=1, default=str))"
LEVELS=$("$PY" -c "import ktmoe; print(','.join(l for l in ('amx', 'amx-model', 'avx512bf16') if l in ktmoe.available_isa_levels()))")
step "levels to test here: ${LEVELS:-none}"
case ",$LEVELS," in *,amx,*) ;; *) step "amx: not usable on this machine (see cpu_info.log): its checks are skipped";; esac

run slots 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_slots.py
for lv in ${LEVELS//,/ }; do
    KTMOE_TEST_LEVELS=$lv run "numerics_$lv" 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_numerics.py
done
# W8A8 (TDPBSSD tiles at amx): the layer against its reference at each level, then the same bits at amx and
# at its parent avx512bf16 (and amx-model) in one run
for lv in ${LEVELS//,/ }; do
    KTMOE_TEST_LEVELS=$lv run "w8a8_$lv" 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_w8a8.py
done
KTMOE_TEST_LEVELS=$LEVELS run w8a8_levels 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_w8a8.py -k every_level

# DDP with GPU attention and CPU experts (ktmoe.parallel.distributed_data_parallel) on the H200, NCCL
run ddp_gpu 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_ddp_experts_gpu.py

PEER_ARGS=()
if [ -d peer/kt_kernel ]; then
    printf '#!/bin/sh\nPYTHONPATH="%s/peer${PYTHONPATH:+:$PYTHONPATH}" exec %s "$@"\n' "$PWD" "$(command -v "$PY")" \
        > "$OUT/peer-python"
    chmod +x "$OUT/peer-python"
    PEER_ARGS=(--peer-python "$OUT/peer-python")
else
    step "kt-kernel: no peer/ folder, the bench runs without it"
fi
BENCH_ISA=avx512bf16
case ",$LEVELS," in *,amx,*) BENCH_ISA=amx;; esac
case ",$LEVELS," in *,avx512bf16,*|*,amx,*) ;; *) BENCH_ISA=$("$PY" -c "import ktmoe; print(ktmoe.cpu_info()['isa_detected'])");; esac
run bench_bf16 240 "$PY" -m ktmoe.bench --preset qwen3-30b-a3b --tokens 16,1024,4096 --isa "$BENCH_ISA" \
    --repeats 3 --warmup 1 --no-torch "${PEER_ARGS[@]}" --markdown "$OUT/bench_bf16.md" --json "$OUT/bench_bf16.json"
run bench_int4 120 "$PY" -m ktmoe.bench --preset qwen3-30b-a3b --tokens 16,1024 --isa "$BENCH_ISA" \
    --method AMXINT4_SFT --repeats 3 --warmup 1 --no-torch "${PEER_ARGS[@]}" --markdown "$OUT/bench_int4.md"
step "done"
