#pragma once

#include <cstdint>
#include <string>

namespace tutel::bench {

struct LayerBenchOptions {
  std::string shapes = "all";   // small | large | gpu | all (the backend's default set)
  std::string backend = "cpu";  // cpu | cuda
  std::string matmul_dtype;     // f32 | bf16; empty: f32 on cpu, bf16 on cuda
  // bf16 matmuls: "on" reads bf16 copies of the expert weights (made once, refreshed by the
  // step's optimizer), "off" converts the f32 weights on every matmul (the path without copies).
  std::string weights_bf16 = "on";
  // cuda: "fused" adds the expert GEMMs' biases (and ReLU) in cuBLASLt's epilogue, "separate"
  // in passes of their own (BackendOptions::fused_epilogues), to compare the two.
  std::string epilogues = "fused";
  int threads = 0;
  int repeats = 5;
  bool graph = false;  // cuda: also eager launch vs CUDA-graph replay at a decode-sized S
  bool phases = false;  // cuda: only the GPU time of each op of an inference step, full S and S=128
};

// The layer shapes the bench knows. "all" runs small and large on the CPU, large and gpu on
// CUDA (the gpu shape's GEMMs alone take minutes on a CPU).
struct LayerShape {
  const char* name;
  int64_t S, M, H, E;
  int k;
};
inline constexpr LayerShape kLayerShapes[] = {
    {"small", 512, 256, 512, 8, 2},
    {"large", 4096, 1024, 2048, 8, 2},
    {"gpu", 16384, 4096, 14336, 8, 2},
};

// Exit codes of `tutel-bench layer`: 0 measured; 1 a measurement failed; 2 bad options;
// kExitNoCuda where --backend cuda cannot run here: no usable CUDA device (no driver, no GPU),
// or a build without CUDA. Nothing was measured then; scripts may treat it as "skipped".
inline constexpr int kExitNoCuda = 3;

// Times the layer's forward, forward+backward and forward+backward+optimizer step next to the
// expert-GEMM floor; returns an exit code.
int run_layer_bench(const LayerBenchOptions& options);

#if defined(TUTEL_HAVE_CUDA)
// The --backend cuda half (cuda_layer_bench.cpp, compiled only with CUDA).
int run_cuda_layer_bench(const LayerBenchOptions& options);
#endif

}  // namespace tutel::bench
