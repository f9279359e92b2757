// One daemon per socket path and per state_dir: an exclusive flock(2) on a lock file, held for
// the daemon's life and released by the kernel when it exits, however it exits.
//
// Why not the sockets alone: a daemon that finds a socket nobody answers removes it as stale and
// binds its own, and until a starting daemon calls listen() its socket refuses connections too,
// so two daemons starting together could each take the other's socket for stale. And two daemons
// with different sockets but one state_dir would write each other's checkpoints (and the second
// would remove the first's unfinished saves as leftovers of a crash).
//
// The lock files stay on disk: removing one at exit would race with a daemon that has just
// opened it and would then lock a file nobody else can find.
// Thread-safety: a lock is owned by one thread at a time; move-only.
#pragma once

#include <string>

#include "tutel/core/shared_memory.hpp"  // UniqueFd
#include "tutel/core/status.hpp"

namespace tutel::daemon {

class InstanceLock {
 public:
  // Creates `path` if needed (mode 0600), takes the lock without waiting, and writes this
  // process's pid into it (for the next one's message). AlreadyExists, naming the holder's pid,
  // when another process holds it.
  static Result<InstanceLock> acquire(const std::string& path, const std::string& what);

  const std::string& path() const { return path_; }

 private:
  UniqueFd fd_;
  std::string path_;
};

}  // namespace tutel::daemon
