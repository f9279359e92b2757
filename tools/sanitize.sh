#!/usr/bin/env bash
# Builds the project with sanitizers and runs every test under them (not part of CI: it takes
# a build of its own and runs slower; see docs/decisions.md "Sanitizers").
#
#   tools/sanitize.sh [address|thread] [ctest arguments...]
#
#   address (default): AddressSanitizer with LeakSanitizer and UndefinedBehaviorSanitizer, in
#                      build-asan/. Any report fails the test that made it.
#   thread:            ThreadSanitizer, in build-tsan/, with tools/tsan.supp (reports from inside
#                      the uninstrumented oneDNN) and kernels/cpu/gomp_tsan.cpp (OpenMP's order).
#
# CUDA is off in these builds: nvcc takes no -fsanitize, and no GPU code runs where they do.
# Environment: TUTEL_JOBS (build jobs, default nproc), TUTEL_SANITIZE_BUILD_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:-address}
[ $# -gt 0 ] && shift
case "$kind" in
  address) flags=address,undefined; default_dir=build-asan ;;
  thread) flags=thread; default_dir=build-tsan ;;
  *) echo "usage: tools/sanitize.sh [address|thread] [ctest arguments...]" >&2; exit 2 ;;
esac
build_dir=${TUTEL_SANITIZE_BUILD_DIR:-$default_dir}
jobs=${TUTEL_JOBS:-$(nproc)}

tools/bootstrap.sh
cmake -S . -B "$build_dir" -G Ninja -DTUTEL_CUDA=OFF -DTUTEL_BUILD_BENCH=OFF \
  -DTUTEL_SANITIZE="$flags" -DCMAKE_BUILD_TYPE=RelWithDebInfo
cmake --build "$build_dir" -j "$jobs"

# Reports go to stderr, which ctest shows for a failed test. halt_on_error / exitcode make a
# report fail its test even where the test itself would pass.
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export ASAN_OPTIONS=detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1
# history_size: enough history to restore the stacks the suppressions match on. The path is
# quoted for the sanitizer's option parser, which ends a value at a space.
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:history_size=7:suppressions='$PWD/tools/tsan.supp'"
if [ "$kind" = thread ]; then
  # UCX patches malloc and mmap to watch memory events (RDMA registration caches); under
  # ThreadSanitizer's own interceptors that crashes the process at exit. tcp, posix shared
  # memory and cma (all this machine has) need no memory events.
  export UCX_MEM_EVENTS=no UCX_MEM_MALLOC_HOOKS=no
fi
# One OpenMP thread per test binary, as tools/test.sh: two binaries at a time on two cores.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j 2 "$@"
