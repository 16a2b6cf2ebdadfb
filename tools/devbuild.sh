#!/usr/bin/env bash
# Developer build: compiles the native module into build/dev and copies it next to the sources, so that
# `PYTHONPATH=src python -m pytest tests` runs this checkout without reinstalling. Needs cmake, ninja,
# cython and scikit-build-core's CMake helpers (pip install cmake ninja cython).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build
py=${PYTHON:-python}
cmake -S . -B build/dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$(command -v "$py")" \
      -DSKBUILD_PROJECT_NAME=ktmoe ${CMAKE_ARGS:-} > build/dev.log 2>&1 || { cat build/dev.log; exit 1; }
cmake --build build/dev -j"${JOBS:-2}"
for so in build/dev/_core*.so; do  # a new inode: a running process keeps the old file mapped
    cp -f "$so" "src/ktmoe/.$(basename "$so").tmp" && mv -f "src/ktmoe/.$(basename "$so").tmp" "src/ktmoe/$(basename "$so")"
done
