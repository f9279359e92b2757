#pragma once

#include <string>

namespace tutel::bench {

struct A2aBenchOptions {
  std::string ranks = "2,4,8";  // group sizes, comma-separated
  // memory (threads of one process, one LocalExchange) | shm (UCX_TLS=posix,self) | sm (sm,self)
  // | tcp (tcp,self)
  std::string transports = "memory,peer,shm,tcp";
  // Per-rank send buffer sizes (all size() chunks together), comma-separated: 4KiB, 1MiB, 4096.
  std::string sizes = "4KiB,64KiB,1MiB,16MiB,64MiB";
  int repeats = 10;  // timed all-to-alls per point (at least 3; fewer when one takes long)
  int spin_us = -1;  // the communicator's busy-poll before it sleeps; < 0: its default
};

// All-to-all (linear and 2DH) between forked ranks over UCX on loopback, or between threads of
// one process exchanging through memory, next to the ceiling of the same transport measured in
// the same run (UCX point-to-point bandwidth; memcpy between two threads); returns an exit code.
int run_a2a_bench(const A2aBenchOptions& options);

}  // namespace tutel::bench
