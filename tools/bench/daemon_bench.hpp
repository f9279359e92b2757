#pragma once

#include <string>

namespace tutel::bench {

// `self` is argv[0]: tuteld is started from the same directory.
int run_ipc_bench(const std::string& self, int repeats, int spin_us);  // spin_us < 0: the default
int run_layer_via_daemon_bench(const std::string& self, int threads, int repeats);
#if defined(TUTEL_HAVE_CUDA)
// The same through a tuteld on the GPU (cuda_daemon_bench.cpp): arena vs device region.
int run_cuda_layer_via_daemon_bench(const std::string& self, int repeats);
#endif

}  // namespace tutel::bench
