// When a CPU loop is worth starting the OpenMP team for.
//
// A parallel region costs about a microsecond to start and end even when the team's helpers spin
// (more when they sleep), and a decode-sized request (a few tokens) runs a dozen of them over a
// few hundred elements each: stop 31's latency review counted 12 to 16 regions per one-token
// request, each longer than its loop's work. Loops below this much work (elements, weighted by
// what one costs) run on the calling thread alone. The loops' results do not depend on how many
// threads run them (each element, or each block of a reduction, is computed alike).
#pragma once

#include <cstdint>

namespace tutel::cpu {

inline constexpr int64_t kParallelMinWork = int64_t{1} << 14;

inline bool worth_a_team(int64_t work) { return work >= kParallelMinWork; }

}  // namespace tutel::cpu
