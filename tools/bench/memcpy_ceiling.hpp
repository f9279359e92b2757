// The ceiling of ranks that exchange through memory (comm::LocalExchange, one memcpy per
// message): memcpy bandwidth between two threads' buffers, one way and both ways at once.
//
// Thread-safety: measure_copy_ceiling() starts and joins its own helper thread; calls may not
// overlap (they would share the cores and the cache they measure).
#pragma once

#include <cstddef>
#include <cstdint>

#include "tutel/core/status.hpp"

namespace tutel::bench {

// A copy streams about this many bytes per timed run (at most kCopiesPerRun copies of `size`),
// as the UCX point-to-point ceiling sends.
inline constexpr size_t kCopyBytesPerRun = size_t{64} << 20;
inline constexpr size_t kCopiesPerRun = 64;

struct CopyCeiling {
  size_t bytes_per_run = 0;  // per direction: copies per run * size
  int64_t one_way_ns = 0;    // median run: thread 0 copies into thread 1's buffer
  int64_t both_ways_ns = 0;  // median run: thread 1 copies into thread 0's at the same time
  bool cold = false;         // size above the last-level cache: one copy a run, caches swept
};

// Bytes of the largest CPU cache (/sys, else sysconf); `fallback` when neither says.
size_t last_level_cache_bytes(size_t fallback = size_t{32} << 20);

// Two threads, each owning (and first touching) a source and a destination buffer of `size`
// bytes. One way: thread 0 copies its source into thread 1's destination, while thread 1 sleeps.
// Both ways: thread 1 copies its source into thread 0's destination at the same time; a run
// starts when both threads leave a spinning barrier and ends when both reach the next. One
// warm-up run, then `repeats` timed runs each way. Sizes up to `llc_bytes` repeat the copy of
// the same buffers back to back within a run (cache-resident as far as they fit); larger ones
// copy once a run, after a read sweep over 2 * llc_bytes that evicts both buffers. Checks every
// copied byte.
Result<CopyCeiling> measure_copy_ceiling(size_t size, int repeats, size_t llc_bytes);

}  // namespace tutel::bench
