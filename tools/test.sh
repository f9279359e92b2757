#!/usr/bin/env bash
# The test command for a fresh machine: installs what is missing, builds, runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
# Tests on, whatever an earlier configuration of the build folder said (-DTUTEL_BUILD_TESTS=OFF
# is cached, and ctest then finds nothing to run).
tools/build.sh -DTUTEL_BUILD_TESTS=ON
build_dir=${TUTEL_BUILD_DIR:-build}
# Two test binaries at a time, each with one OpenMP thread: the machine has two cores. No tests
# found is a failure, not a pass.
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j 2 "$@"
