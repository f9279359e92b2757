#!/usr/bin/env bash
# The test command for a fresh machine: installs what is missing, builds, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
tools/build.sh
build_dir=${TUTEL_BUILD_DIR:-build}
# Two test binaries at a time, each with one OpenMP thread: the machine has two cores.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ctest --test-dir "$build_dir" --output-on-failure -j 2 "$@"
