// tutel-bench state: a layer's state through memory (ExportState, ImportState) and through the
// daemon's disk (Save, Load), beside what the same bytes cost at memory speed in the same run:
// a memcpy into memory already touched, and one into fresh pages (which an export must fault in
// and allocate, as the client allocates the memfd it hands over).
#pragma once

#include <cstdint>
#include <string>

namespace tutel::bench {

struct StateBenchOptions {
  int64_t experts = 8, model_dim = 1024, hidden = 2048;  // AdamW: 3 x 134 MB of state
  int repeats = 5;
};

// `self` is argv[0]: tuteld is started from the same directory. Returns the exit code.
int run_state_bench(const std::string& self, const StateBenchOptions& options);

}  // namespace tutel::bench
