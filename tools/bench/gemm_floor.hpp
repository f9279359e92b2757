// The ceiling a layer benchmark is measured against: the expert GEMMs of the step alone, timed
// with oneDNN's plain f32 (or bf16) matmul for exactly the shapes and layouts the step uses.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace tutel::bench {

struct GemmShape {
  std::string name;
  int64_t batch, m, k, n;
  bool a_transposed = false, b_transposed = false;
  double flops() const { return 2.0 * batch * m * k * n; }
};

// The expert GEMMs of one forward (fc1, fc2) and of one backward (four more).
std::vector<GemmShape> expert_forward_gemms(int64_t E, int64_t C, int64_t M, int64_t H, int64_t O);
std::vector<GemmShape> expert_backward_gemms(int64_t E, int64_t C, int64_t M, int64_t H, int64_t O);

struct GemmTiming {
  double flops = 0, seconds = 0;
  double gflops() const { return seconds > 0 ? flops / seconds / 1e9 : 0; }
};

// Median time of each GEMM over `repeats` runs, summed.
GemmTiming time_gemms(const std::vector<GemmShape>& gemms, bool bf16, int repeats);

}  // namespace tutel::bench
