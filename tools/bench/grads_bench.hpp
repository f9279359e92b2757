// tutel-bench grads: the gradient norm's and scale's CPU kernels (Backend::add_sum_squares,
// Backend::scale) over one buffer, beside a parallel memcpy of the same bytes on the same
// threads: both are bound by memory, so the copy is their ceiling.
#pragma once

#include <cstdint>

namespace tutel::bench {

struct GradsBenchOptions {
  int64_t floats = 67'000'000;  // ~268 MB: the gradients of E=8 M=1024 H=4096 experts
  int threads = 0;              // 0 = all cores
  int repeats = 5;
};

// Prints the medians and the ratios; returns the process exit code (0, or 1 when an op failed).
int run_grads_bench(const GradsBenchOptions& options);

}  // namespace tutel::bench
