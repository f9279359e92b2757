// tutel-bench grads: the gradient norm's and scale's CPU kernels (Backend::add_sum_squares,
// Backend::scale) over one buffer, beside what the same threads do with the same bytes at
// memory speed: a read (the norm's ceiling: it only reads) and a memcpy (scale's: it reads and
// writes).
#pragma once

#include <cstdint>

namespace tutel::bench {

struct GradsBenchOptions {
  int64_t floats = 67'158'016;  // 269 MB: the gradients of an E=8 M=1024 H=4096 layer
  int threads = 0;              // 0 = all cores
  int repeats = 5;
};

// Prints the medians and the ratios; returns the process exit code (0, or 1 when an op failed).
int run_grads_bench(const GradsBenchOptions& options);

}  // namespace tutel::bench
