#!/usr/bin/env bash
# Configures and builds tuteld into build/ (executables in build/bin, libraries in build/lib).
# Extra arguments go to CMake's configure step, e.g. tools/build.sh -DTUTEL_CUDA=OFF.
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir=${TUTEL_BUILD_DIR:-build}
jobs=${TUTEL_JOBS:-$(nproc)}
if [ ! -f "$build_dir/build.ninja" ] || [ $# -gt 0 ]; then
  cmake -S . -B "$build_dir" -G Ninja "$@"
fi
cmake --build "$build_dir" -j "$jobs"
