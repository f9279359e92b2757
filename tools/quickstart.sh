#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and run one MoE layer
# end to end. Until the daemon lands, "the main job" is the in-process layer: random Tutel-named
# weights and tokens are generated, tutel-layer runs forward and backward on them, and the
# layer benchmark prints its time next to the GEMM floor.
set -euo pipefail
cd "$(dirname "$0")/.."
tools/bootstrap.sh
tools/build.sh
build_dir=${TUTEL_BUILD_DIR:-build}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$build_dir/bin/tutel-layer-example" --out "$work" --experts 8 --model-dim 256 --hidden 512 --tokens 512
"$build_dir/bin/tutel-layer" --weights "$work/weights.safetensors" --input "$work/input.safetensors" \
  --output "$work/output.safetensors" --k 2 --capacity-factor 1.0 --backward
echo "tutel-layer wrote $(stat -c %s "$work/output.safetensors") bytes: y, l_aux, capacity, dropped, dx, grad.*"
"$build_dir/bin/tutel-bench" layer --shape small
