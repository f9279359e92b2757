// The daemon process's own resources, as Prometheus's process_* series report them: CPU time,
// start time, memory and descriptors, read from /proc at each scrape. What the tenants' gauges
// count is what the daemon asked for; this is what the process holds (the allocator's caches,
// libraries, threads' stacks, oneDNN's kernels), the number to plan a node's memory by.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

struct ProcessStats {
  double cpu_seconds = 0;          // user + system
  double start_time_seconds = 0;   // since the Unix epoch
  uint64_t virtual_bytes = 0;
  uint64_t resident_bytes = 0;
  uint64_t threads = 0;
  uint64_t open_fds = 0;
  uint64_t max_fds = 0;            // the soft RLIMIT_NOFILE
};

// The fields of /proc/<pid>/stat that ProcessStats takes, in the units the file gives them.
struct ProcStat {
  uint64_t utime_ticks = 0, stime_ticks = 0;
  uint64_t threads = 0;
  uint64_t start_ticks = 0;  // since boot
  uint64_t virtual_bytes = 0;
  uint64_t resident_pages = 0;
};

// Parses the text of /proc/<pid>/stat (proc(5)). The command name in parentheses may hold any
// byte, spaces and parentheses included: the fields are counted from its last ')'.
Result<ProcStat> parse_proc_stat(std::string_view text);
// The boot time (seconds since the epoch) from the text of /proc/stat: its "btime" line.
Result<uint64_t> parse_boot_time(std::string_view text);

// This process's stats, from /proc/self and /proc/stat.
Result<ProcessStats> read_process_stats();

}  // namespace tutel::daemon
