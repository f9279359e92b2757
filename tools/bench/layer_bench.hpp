#pragma once

#include <string>

namespace tutel::bench {

struct LayerBenchOptions {
  std::string shapes = "all";   // small | large | all
  std::string backend = "cpu";
  std::string matmul_dtype = "f32";
  int threads = 0;
  int repeats = 5;
};

// Times the layer's forward and forward+backward next to the expert-GEMM floor; returns an exit code.
int run_layer_bench(const LayerBenchOptions& options);

}  // namespace tutel::bench
