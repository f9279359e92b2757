#pragma once

#include <string>

namespace tutel::bench {

struct A2aBenchOptions {
  std::string ranks = "2,4,8";         // group sizes, comma-separated
  std::string transports = "shm,tcp";  // shm (UCX_TLS=posix,self) | sm (sm,self) | tcp (tcp,self)
  // Per-rank send buffer sizes (all size() chunks together), comma-separated: 4KiB, 1MiB, 4096.
  std::string sizes = "4KiB,64KiB,1MiB,16MiB,64MiB";
  int repeats = 10;  // timed all-to-alls per point (at least 3; fewer when one takes long)
  int spin_us = -1;  // the communicator's busy-poll before it sleeps; < 0: its default
};

// All-to-all (linear and 2DH) between forked ranks over UCX on loopback, next to the UCX
// point-to-point bandwidth of the same transport measured in the same run; returns an exit code.
int run_a2a_bench(const A2aBenchOptions& options);

}  // namespace tutel::bench
