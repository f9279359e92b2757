#!/usr/bin/env bash
# tools/gpu-check.sh: the GPU check for a fresh machine with an NVIDIA GPU and no network
# (DESIGN §6). Builds for sm_90 into build-gpu (against the Debian packages that tools/gpu-deps.sh
# packs into .gpu-deps, where the machine lacks them: carry that folder), then runs
#   1. nvidia-smi,
#   2. the CUDA op tests (cuda_backend_test without the layer parity suites),
#   3. the CPU-vs-GPU layer parity tests (CudaLayerParity*, CudaLayerDeterminism*), and the
#      CUDA-graph plans against eager steps (graphs_tests *Cuda*), the daemon's data path on the
#      GPU (served_layer_device_test *OnCuda*: a local layer's CUDA-graph plans fed from a host
#      arena; device_region_cuda_test: a client's CUDA IPC region used in place), and the
#      expert-parallel layer on the CUDA backend over NCCL, op by op and as CUDA graphs with the
#      NCCL calls inside (expert_parallel_device_test *OnCuda*), and the NCCL communicator's own
#      tests (comm_tests Nccl.*),
#   4. tutel-bench layer --backend cuda --graph: the large and gpu shapes next to their cuBLAS
#      and copy-bandwidth floors, then eager launch vs CUDA-graph replay at S=128 (at most 180 s;
#      the tests leave TUTEL_GPU_BENCH_RESERVE_S of the budget for it), then tutel-bench layer
#      --via-daemon --backend cuda: a GPU tuteld's layer through the arena vs a device region
#      (zero-copy), next to the staging copies a region saves (at most 90 s), then tutel-bench
#      layer --backend cuda --phases: the GPU time of each op of an inference step, where the
#      step's time goes (at most 60 s), then the same benchmark with the expert GEMMs' bias and
#      ReLU as passes of their own (--epilogues separate; at most 60 s), to compare with the
#      fused epilogues,
#   5. compute-sanitizer memcheck over the op tests, when the tool is there and time allows,
# within a time budget (8 minutes by default), and prints a summary table at the end, with the
# benchmark's target verdicts as rows and its measurement lines below.
#
# Missing pieces (no nvidia-smi, no compute-sanitizer, a benchmark that does not build) are
# reported, not fatal; so are the benchmark's verdicts (it is not a test). The exit status is 0
# only when the tests built, ran on the GPU, and none failed: tests that skip on a machine where
# nvidia-smi sees a GPU count as a failure (the CUDA runtime could not use the device); 1 for a
# failure, 2 where no GPU is visible at all (everything skipped: nothing was checked).
#
# Environment:
#   TUTEL_GPU_BUILD_DIR   build folder (build-gpu)
#   TUTEL_CUDA_ARCH       CMAKE_CUDA_ARCHITECTURES (90)
#   TUTEL_GPU_BUDGET_S    total seconds (480)
#   TUTEL_GPU_BENCH_ARGS  extra arguments for tutel-bench layer (none; e.g. --matmul-dtype f32)
#   TUTEL_GPU_BENCH_RESERVE_S  seconds of the budget the tests leave for the benchmark (60)
#   TUTEL_JOBS            build jobs (all cores)
#   TUTEL_GPU_DEPS        auto: unpack .gpu-deps/tutel-deps.tar.gz (tools/gpu-deps.sh) where a
#                         package is missing; always; never
#   TUTEL_GPU_LOGS_TO     a folder that gets the logs as gpu-check-logs.tar.gz (none)
#   TUTEL_GPU_CMAKE_ARGS  extra configure arguments (e.g. -DCMAKE_IGNORE_PREFIX_PATH=/usr, to check
#                         the carried packages on a machine that has them)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

build_dir=${TUTEL_GPU_BUILD_DIR:-build-gpu}
arch=${TUTEL_CUDA_ARCH:-90}
budget=${TUTEL_GPU_BUDGET_S:-480}
jobs=${TUTEL_JOBS:-$(nproc)}
bench_args=${TUTEL_GPU_BENCH_ARGS:-}
bench_reserve=${TUTEL_GPU_BENCH_RESERVE_S:-60}
start=$(date +%s)
log_dir="$build_dir/gpu-check-logs"
mkdir -p "$log_dir"

rows=()         # "step|result|detail"
test_failure=0  # any reason to exit non-zero
gpu_seen=0
bench_lines=""

elapsed() { echo $(( $(date +%s) - start )); }
remaining() { echo $(( budget - $(elapsed) )); }
row() { rows+=("$1|$2|$3"); }
say() { printf '\n=== gpu-check: %s (t=%ss)\n' "$*" "$(elapsed)"; }

# ---- 1. the device -----------------------------------------------------------------------
say "nvidia-smi"
if command -v nvidia-smi >/dev/null 2>&1; then
  if nvidia-smi | tee "$log_dir/nvidia-smi.txt"; then
    gpus=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>/dev/null |
           head -n 4 | paste -sd ';' -)
    gpu_seen=1
    row "nvidia-smi" "ok" "${gpus:-GPU listed}"
  else
    row "nvidia-smi" "FAILED" "nvidia-smi ran but failed: is the driver loaded?"
  fi
else
  row "nvidia-smi" "missing" "nvidia-smi not found: no driver on this machine?"
fi

# ---- 2. toolchain and packages ------------------------------------------------------------
# A GPU image has CUDA, CMake and a compiler but not the Debian packages tuteld builds against,
# and no network: tools/gpu-deps.sh packs them here into .gpu-deps/tutel-deps.tar.gz (carry
# `.gpu-deps`), and where one is missing on this machine the archive is unpacked into the build
# folder and configured, built and run against.
say "toolchain"
nvcc=""
for c in "${CUDACXX:-}" /usr/local/cuda/bin/nvcc "$(command -v nvcc 2>/dev/null)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then nvcc=$c; break; fi
done
generator="Ninja"
command -v ninja >/dev/null 2>&1 || generator="Unix Makefiles"
deps_archive=.gpu-deps/tutel-deps.tar.gz
deps_root=""
search_dirs=(/usr/lib /usr/share /usr/local/lib /usr/local/share)
have_config() {  # NAME: NAMEConfig.cmake or name-config.cmake somewhere CMake looks
  find "${search_dirs[@]}" -maxdepth 6 \( -iname "$1Config.cmake" -o -iname "$1-config.cmake" \) \
    2>/dev/null | grep -q .
}
have_pc() {  # NAME: NAME.pc where pkg-config looks
  find ${PKG_CONFIG_PATH:+${PKG_CONFIG_PATH//:/ }} "${search_dirs[@]}" -maxdepth 4 -name "$1.pc" 2>/dev/null | grep -q .
}
check_packages() {  # fills missing[]
  missing=()
  [ -n "$nvcc" ] || missing+=("nvcc (CUDA toolkit at /usr/local/cuda)")
  command -v cmake >/dev/null 2>&1 || missing+=("cmake")
  command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || missing+=("a C++ compiler")
  command -v pkg-config >/dev/null 2>&1 || missing+=("pkg-config")
  have_config dnnl || missing+=("libdnnl-dev (oneDNN)")
  have_config tomlplusplus || missing+=("libtomlplusplus-dev")
  have_config GTest || missing+=("libgtest-dev (tests)")
  have_config CLI11 || missing+=("libcli11-dev")
  have_config nlohmann_json || missing+=("nlohmann-json3-dev")
  have_pc ucx || missing+=("libucx-dev")
  have_pc libuv || missing+=("libuv1-dev")
}
use_carried_deps() {
  deps_root="$PWD/$build_dir/deps-root"
  rm -rf "$deps_root" && mkdir -p "$deps_root" || return 1
  tar -xzf "$deps_archive" -C "$deps_root" || return 1
  local lib="$deps_root/usr/lib/x86_64-linux-gnu"
  # The pkg-config files name /usr: point them at the unpacked tree.
  find "$deps_root" -name '*.pc' -exec sed -i -E \
    "s#^([A-Za-z_][A-Za-z0-9_]*[[:space:]]*=[[:space:]]*)/usr#\\1$deps_root/usr#" {} +
  # CMake finds the configs through the prefixes (also where it does not know the multiarch
  # folder) and the libraries they look up (oneDNN's OpenCL) through its library path; the
  # binaries load them, and what they load, through LD_LIBRARY_PATH; UCX its transports.
  export CMAKE_PREFIX_PATH="$deps_root/usr:$lib/cmake:$deps_root/usr/share/cmake${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
  export CMAKE_LIBRARY_PATH="$lib${CMAKE_LIBRARY_PATH:+:$CMAKE_LIBRARY_PATH}"
  export CMAKE_INCLUDE_PATH="$deps_root/usr/include${CMAKE_INCLUDE_PATH:+:$CMAKE_INCLUDE_PATH}"
  export PKG_CONFIG_PATH="$lib/pkgconfig:$deps_root/usr/share/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
  export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export UCX_MODULE_DIR="$lib/ucx"
  command -v pkg-config >/dev/null 2>&1 || export PATH="$PATH:$deps_root/usr/bin"
  search_dirs=("$deps_root/usr/lib" "$deps_root/usr/share" "${search_dirs[@]}")
}
check_packages
deps_mode=${TUTEL_GPU_DEPS:-auto}
deps_note="system packages"
if [ "$deps_mode" = always ] || { [ "$deps_mode" = auto ] && [ ${#missing[@]} -gt 0 ]; }; then
  if [ ! -f "$deps_archive" ]; then
    deps_note="no $deps_archive (run tools/gpu-deps.sh where the packages are, carry .gpu-deps)"
  elif use_carried_deps; then
    deps_note="carried packages unpacked into $deps_root ($(sed -n 's/^# packed by tools\/gpu-deps.sh on //p' .gpu-deps/MANIFEST 2>/dev/null))"
    check_packages
  else
    deps_note="could not unpack $deps_archive"
  fi
fi
# tutel-bench needs nothing beyond the above (and UCX, which comm/ needs anyway).
bench_option=ON
echo "nvcc: ${nvcc:-none}; generator: $generator; jobs: $jobs; CUDA architectures: $arch"
echo "packages: $deps_note"
if [ ${#missing[@]} -gt 0 ]; then
  printf 'missing: %s\n' "${missing[@]}"
  row "packages" "missing" "$(IFS=', '; echo "${missing[*]}"); $deps_note"
else
  row "packages" "ok" "$deps_note"
fi

# ---- 3. configure and build ---------------------------------------------------------------
# A build folder carried from another checkout path cannot be reused by CMake: start it afresh.
if [ -f "$build_dir/CMakeCache.txt" ] &&
   ! grep -qx "CMAKE_HOME_DIRECTORY:INTERNAL=$PWD" "$build_dir/CMakeCache.txt"; then
  echo "note: $build_dir was configured for another source folder; reconfiguring from scratch"
  rm -rf "$build_dir/CMakeCache.txt" "$build_dir/CMakeFiles"
fi

configure() {  # $1 = TUTEL_BUILD_BENCH
  local args=(-S . -B "$build_dir" -G "$generator" -DTUTEL_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch"
              -DTUTEL_BUILD_TESTS=ON -DTUTEL_BUILD_BENCH="$1")
  [ -n "$nvcc" ] && args+=(-DCMAKE_CUDA_COMPILER="$nvcc")
  # shellcheck disable=SC2206
  [ -n "${TUTEL_GPU_CMAKE_ARGS:-}" ] && args+=($TUTEL_GPU_CMAKE_ARGS)
  timeout 120 cmake "${args[@]}" >"$log_dir/configure.log" 2>&1
}

say "configure (bench $bench_option)"
configured=0
if configure "$bench_option"; then
  configured=1
elif [ "$bench_option" = ON ]; then
  echo "configure with the benchmark failed; retrying without it"
  bench_option=OFF
  configure OFF && configured=1
fi
nccl_state=""
if [ $configured = 1 ]; then
  nccl_state=$(grep -oE 'NCCL (ON|OFF)' "$log_dir/configure.log" | tail -n 1)
  row "configure" "ok" "sm_$arch, tests ON, bench $bench_option, ${nccl_state:-NCCL ?}"
else
  tail -n 30 "$log_dir/configure.log"
  row "configure" "FAILED" "see $log_dir/configure.log (missing packages above?)"
  test_failure=1
fi

built=0
absent=()  # test binaries the build could not bring up to date
if [ $configured = 1 ]; then
  say "build"
  targets=(cuda_backend_test graphs_tests served_layer_device_test device_region_cuda_test expert_parallel_device_test
           comm_tests)
  [ "$bench_option" = ON ] && targets+=(tutel_bench)
  build_start=$(date +%s)
  # Leave at least three minutes for the tests and the benchmark.
  build_limit=$(( $(remaining) - 180 ))
  [ $build_limit -lt 60 ] && build_limit=60
  timeout "$build_limit" cmake --build "$build_dir" -j "$jobs" --target "${targets[@]}" \
    >"$log_dir/build.log" 2>&1
  build_rc=$?
  if [ $build_rc = 0 ]; then
    built=1
    row "build" "ok" "${targets[*]} in $(( $(date +%s) - build_start ))s"
  elif [ $build_rc = 124 ]; then
    row "build" "TIMEOUT" "after ${build_limit}s (see $log_dir/build.log)"
    test_failure=1
  else
    # Something did not build: keep going past the failure (ninja -k 0 / make -k) for every test
    # binary, without the benchmark; each test step then says whether its binary is there.
    grep -m 10 -E 'error|FAILED' "$log_dir/build.log"
    test_targets=()
    for t in "${targets[@]}"; do [ "$t" != tutel_bench ] && test_targets+=("$t"); done
    keep_going=(-k 0)
    [ "$generator" = Ninja ] || keep_going=(-k)
    timeout "$(( $(remaining) - 150 > 30 ? $(remaining) - 150 : 30 ))" \
      cmake --build "$build_dir" -j "$jobs" --target "${test_targets[@]}" -- "${keep_going[@]}" \
      >>"$log_dir/build.log" 2>&1
    rebuild_rc=$?
    built=1
    bench_option=OFF
    # A binary left from an earlier build is not this code's: when the test targets did not all
    # build, a target counts only when nothing of it is left to build (a failed compile leaves
    # the old binary in place). Ninja says so per target (-n); make cannot (CMake's targets are
    # phony), so there every test binary counts as not built.
    up_to_date() {
      [ "$generator" = Ninja ] &&
        cmake --build "$build_dir" --target "$1" -- -n 2>/dev/null | grep -q "no work to do"
    }
    absent=()
    for t in "${test_targets[@]}"; do
      if [ ! -x "$build_dir/bin/$t" ] || { [ $rebuild_rc != 0 ] && ! up_to_date "$t"; }; then absent+=("$t"); fi
    done
    if [ ${#absent[@]} = 0 ]; then
      row "build" "partial" "every test binary; tutel_bench FAILED (see $log_dir/build.log)"
    else
      row "build" "FAILED" "not built: ${absent[*]} (see $log_dir/build.log)"
      test_failure=1
    fi
  fi
fi

# ---- 4. tests -----------------------------------------------------------------------------
# run_gtest NAME FILTER TIMEOUT [BINARY]: runs a GPU test binary (cuda_backend_test by
# default), records passed/failed/skipped.
run_gtest() {
  local name=$1 filter=$2 limit=$3 log="$log_dir/$1.log"
  local bin="$build_dir/bin/${4:-cuda_backend_test}"
  say "$name"
  if [ $built != 1 ] || [ ! -x "$bin" ]; then
    row "$name" "not run" "no test binary"
    test_failure=1
    return
  fi
  # A binary the build could not bring up to date is an earlier code's: not run.
  local t
  for t in "${absent[@]:-}"; do
    if [ "$t" = "${4:-cuda_backend_test}" ]; then
      row "$name" "not run" "${4:-cuda_backend_test} did not build (see $log_dir/build.log)"
      test_failure=1
      return
    fi
  done
  # Keep the benchmark's share of the budget when it was built.
  local left=$(remaining)
  [ "$bench_option" = ON ] && [ "$built" = 1 ] && left=$(( left - bench_reserve ))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 10 ]; then
    row "$name" "not run" "out of time budget"
    test_failure=1
    return
  fi
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout "$limit" "$bin" --gtest_filter="$filter" --gtest_brief=1 \
    >"$log" 2>&1
  local rc=$?
  grep -E '^\[  (FAILED|SKIPPED) \]|Failure|error' "$log" | head -n 40
  local passed failed skipped
  passed=$(grep -oP '^\[  PASSED  \] \K[0-9]+' "$log" | tail -n 1)
  # gtest's closing lines with --gtest_brief (1.12): "[  PASSED  ] 3 tests.", "[  SKIPPED ] 9
  # tests.", and for failures only one "[  FAILED  ] Suite.Test (N ms)" line each, no count.
  failed=$(grep -cE '^\[  FAILED  \] [A-Za-z_]' "$log")
  skipped=$(grep -oP '^\[  SKIPPED \] \K[0-9]+(?= tests?[,.])' "$log" | tail -n 1)
  passed=${passed:-0} failed=${failed:-0} skipped=${skipped:-0}
  local detail="passed $passed, failed $failed, skipped $skipped"
  if [ $rc = 124 ]; then
    row "$name" "TIMEOUT" "$detail after ${limit}s (see $log)"
    test_failure=1
  elif [ $rc != 0 ] && [ "$failed" = 0 ]; then
    row "$name" "CRASHED" "exit $rc, $detail (see $log)"
    test_failure=1
  elif [ "$failed" != 0 ]; then
    row "$name" "FAILED" "$detail (see $log)"
    test_failure=1
  elif [ "$passed" = 0 ] && [ "$skipped" = 0 ]; then
    # A filter that matches nothing (a test renamed) checks nothing: not a pass.
    row "$name" "NO TESTS" "the filter '$filter' ran no test (see $log)"
    test_failure=1
  elif [ "$gpu_seen" = 1 ] && [ "$skipped" != 0 ] && [ "$nccl_state" = "NCCL OFF" ] &&
       grep -q "has no NCCL" "$log"; then
    row "$name" "SKIPPED" "$detail: configured without NCCL (no libnccl and nccl.h found, see configure.log)"
    test_failure=1
  elif [ "$gpu_seen" = 1 ] && [ "$skipped" != 0 ]; then
    row "$name" "SKIPPED" "$detail: nvidia-smi sees a GPU but the CUDA runtime does not (driver too old?)"
    test_failure=1
  else
    row "$name" "ok" "$detail"
  fi
}

run_gtest "cuda-op-tests" '-*CudaLayerParity*:*CudaLayerDeterminism*' 150
run_gtest "layer-parity" '*CudaLayerParity*:*CudaLayerDeterminism*' 200
# CUDA-graph plans (capture, replay, exec update) against eager steps, bit for bit.
run_gtest "graph-plans" '*Cuda*' 90 graphs_tests
# The daemon's data path on the GPU: a client's host arena staged through device memory.
run_gtest "daemon-staging" '*OnCuda*' 60 served_layer_device_test
# Zero-copy submission: a client maps a CUDA IPC region of a GPU daemon and submits in place.
run_gtest "device-region" '*OnCuda*' 60 device_region_cuda_test
# The expert-parallel layer on the CUDA backend over NCCL (one rank: one GPU here), op by op and
# as CUDA graphs with the NCCL calls captured inside.
run_gtest "ep-nccl" '*OnCuda*' 90 expert_parallel_device_test
# The NCCL communicator itself: the collectives on every GPU (one rank per GPU), and a failure
# inside a graph capture that must be an error, not a hang.
run_gtest "nccl" 'Nccl.*-Nccl.EntryPointsSayWhenNcclIsMissing' 90 comm_tests

# ---- 5. benchmark (not a test: its verdicts are reported, never fatal) ----------------------
# Exit codes of tutel-bench layer: 0 measured, 3 no usable CUDA device (or a build without
# CUDA), anything else a failed measurement.
bench="$build_dir/bin/tutel-bench"
bench_cmd="layer --backend cuda --graph${bench_args:+ $bench_args}"
target_rows=()
if [ "$bench_option" != ON ] || [ ! -x "$bench" ]; then
  row "bench" "skipped" "tutel-bench not built (see $log_dir/build.log)"
elif [ "$(remaining)" -lt 20 ]; then
  row "bench" "skipped" "out of time budget"
else
  say "tutel-bench $bench_cmd"
  limit=$(( $(remaining) - 5 ))
  [ $limit -gt 180 ] && limit=180
  bench_start=$(date +%s)
  # shellcheck disable=SC2086
  timeout "$limit" "$bench" $bench_cmd >"$log_dir/bench.log" 2>&1
  rc=$?
  cat "$log_dir/bench.log"
  # The summary keeps the measurement rows; the explanations stay in the log above.
  bench_lines=$(grep -E '^(device copy bandwidth|shape |small |large |gpu |decode )|^  (path |layer ops|the same ops|plan cuda-graph|bytes floor)' \
                  "$log_dir/bench.log")
  while IFS= read -r t; do
    [ -n "$t" ] && target_rows+=("$t")
  done < <(sed -n 's/^target: //p' "$log_dir/bench.log")
  case $rc in
    0) row "bench" "ok" "$bench_cmd in $(( $(date +%s) - bench_start ))s, ${#target_rows[@]} target verdicts" ;;
    3) row "bench" "no device" "exit 3: $(sed -n 's/^tutel-bench layer: //p' "$log_dir/bench.log" | head -n 1 | cut -c1-110)" ;;
    124) row "bench" "timeout" "after ${limit}s (see $log_dir/bench.log)" ;;
    *) row "bench" "failed" "exit $rc, see $log_dir/bench.log (not a test failure)" ;;
  esac
  for t in "${target_rows[@]}"; do
    case $t in
      *" met") row "target" "met" "${t% met}" ;;
      *) row "target" "MISSED" "${t% MISSED}" ;;
    esac
  done
fi

# run_bench_step NAME LOG LIMIT PATTERN WHAT ARGS...: a further tutel-bench run (not a test: its
# failure is reported, never fatal), when the benchmark was built and LIMIT seconds are left.
# Sets bench_step_lines to its output lines matching PATTERN.
run_bench_step() {
  local name=$1 log="$log_dir/$2" limit=$3 pattern=$4 what=$5
  shift 5
  bench_step_lines=""
  if [ "$bench_option" != ON ] || [ ! -x "$bench" ] || [ "$(remaining)" -lt "$limit" ]; then
    row "$name" "skipped" "no tutel-bench or under ${limit}s left"
    return
  fi
  say "tutel-bench $*"
  timeout "$limit" "$bench" "$@" >"$log" 2>&1
  local rc=$?
  cat "$log"
  bench_step_lines=$(grep -E "$pattern" "$log")
  case $rc in
    0) row "$name" "ok" "$what, $(echo "$bench_step_lines" | grep -c .) rows" ;;
    3) row "$name" "no device" "exit 3: no usable CUDA device (see $log)" ;;
    124) row "$name" "timeout" "after ${limit}s (see $log)" ;;
    *) row "$name" "failed" "exit $rc, see $log (not a test failure)" ;;
  esac
}

# Zero-copy through the daemon: a GPU tuteld's layer fed through the arena vs a device region.
run_bench_step "bench-zc" bench-daemon.log 90 '^via-daemon ' "arena vs device region through tuteld" \
  layer --via-daemon --backend cuda --repeats 10
daemon_bench_lines=$bench_step_lines
# Where the step's time goes: each op of an inference step on the GPU, back to back.
run_bench_step "bench-phases" bench-phases.log 60 '^phases ' "GPU time per op" \
  layer --backend cuda --phases
phase_lines=$bench_step_lines
# The same rows with the expert GEMMs' bias and ReLU as passes of their own instead of in
# cuBLASLt's epilogue: what the fusion saves (forward and decode step), measured beside it.
run_bench_step "bench-unfused" bench-unfused.log 60 '^(large |gpu |decode )|^  (layer ops|the same ops)' \
  "epilogues separate" layer --backend cuda --graph --epilogues separate
unfused_lines=$bench_step_lines
# A GEMM cuBLASLt would not fuse runs the plain way and says so once (a WARN line): worth seeing,
# from the tests (the inference plans' bf16 ReLU forward) as from the benchmarks.
lt_refusals=$(cat "$log_dir"/*.log 2>/dev/null | grep -E 'cuBLASLt offers no algorithm|cublasLtMatmul refused' |
                sed 's/^.*\] //' | sort -u | head -n 8)

# ---- 6. compute-sanitizer (optional) -------------------------------------------------------
sanitizer=""
for c in /usr/local/cuda/bin/compute-sanitizer "$(command -v compute-sanitizer 2>/dev/null)"; do
  if [ -n "$c" ] && [ -x "$c" ]; then sanitizer=$c; break; fi
done
if [ -z "$sanitizer" ]; then
  row "memcheck" "skipped" "compute-sanitizer not installed"
elif [ $built != 1 ] || [ "$(remaining)" -lt 120 ]; then
  row "memcheck" "skipped" "no binary or under 2 minutes left"
else
  say "compute-sanitizer memcheck (op tests)"
  # Without the test that fills the device: the sanitizer's own device memory changes what fits.
  timeout 90 "$sanitizer" --tool memcheck --error-exitcode 99 "$build_dir/bin/cuda_backend_test" \
    --gtest_filter='CudaOps.*:CudaDispatch.*:CudaBf16Dispatch.*-CudaOps.AnotherBackendsIdleCacheIsFreedWhenTheDeviceRunsOut' --gtest_brief=1 >"$log_dir/memcheck.log" 2>&1
  rc=$?
  grep -E 'ERROR SUMMARY|Invalid|out of bounds' "$log_dir/memcheck.log" | head -n 20
  case $rc in
    0) row "memcheck" "ok" "$(grep -m1 'ERROR SUMMARY' "$log_dir/memcheck.log")" ;;
    124) row "memcheck" "timeout" "incomplete after 90s (not counted as a failure)" ;;
    # --error-exitcode 99: memory errors found. Anything else is the tool's (it refuses devices
    # under some runtimes) or a test's, which the test steps above report.
    99) row "memcheck" "FAILED" "memory errors, see $log_dir/memcheck.log"; test_failure=1 ;;
    *) row "memcheck" "unavailable" "exit $rc, see $log_dir/memcheck.log (not counted)" ;;
  esac
fi

# ---- summary --------------------------------------------------------------------------------
printf '\n==================== gpu-check summary (%ss of %ss) ====================\n' "$(elapsed)" "$budget"
printf '%-14s %-10s %s\n' "step" "result" "detail"
for r in "${rows[@]}"; do
  IFS='|' read -r step result detail <<<"$r"
  printf '%-14s %-10s %s\n' "$step" "$result" "$detail"
done
if [ -n "$bench_lines" ]; then
  printf '\nbenchmark (tutel-bench %s; columns and floors explained in the log):\n%s\n' "$bench_cmd" "$bench_lines"
fi
if [ -n "$daemon_bench_lines" ]; then
  printf '\nzero-copy through tuteld (tutel-bench layer --via-daemon --backend cuda):\n%s\n' "$daemon_bench_lines"
fi
if [ -n "$phase_lines" ]; then
  printf '\nGPU time per op (tutel-bench layer --backend cuda --phases):\n%s\n' "$phase_lines"
fi
if [ -n "$unfused_lines" ]; then
  printf '\nwith separate epilogues (tutel-bench layer --backend cuda --graph --epilogues separate):\n%s\n' "$unfused_lines"
fi
if [ -n "$lt_refusals" ]; then
  printf '\nGEMMs cuBLASLt did not fuse (run unfused):\n%s\n' "$lt_refusals"
fi
printf '\nlogs: %s\n' "$log_dir"
# The logs, packed for a caller that keeps only a folder (the device tool's $OUT).
if [ -n "${TUTEL_GPU_LOGS_TO:-}" ] && mkdir -p "$TUTEL_GPU_LOGS_TO"; then
  tar -czf "$TUTEL_GPU_LOGS_TO/gpu-check-logs.tar.gz" -C "$build_dir" gpu-check-logs &&
    echo "logs packed: $TUTEL_GPU_LOGS_TO/gpu-check-logs.tar.gz"
fi
if [ $test_failure != 0 ]; then
  echo "gpu-check: FAILED"
  exit 1
fi
if [ $gpu_seen != 1 ]; then
  echo "gpu-check: no GPU visible to nvidia-smi; the CUDA tests skipped, nothing was checked on a GPU"
  exit 2
fi
echo "gpu-check: OK"
exit 0
