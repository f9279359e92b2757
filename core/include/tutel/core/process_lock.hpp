// An exclusive flock(2) on a file, held for the object's life and dropped by the kernel when the
// process ends, however it ends: which process is alive and owns something (a socket path, a
// state_dir, a benchmark's temporary directory), without trusting a pid that may be reused or
// belong to another PID namespace sharing the file system.
//
// The daemon takes one per socket path and per state_dir (daemon.cpp, lock_instance); a
// benchmark's daemon holds one in its temporary directory, and the next benchmark removes the
// directories whose lock it can take (tools/bench/bench_daemon.hpp).
//
// A lock file stays on disk when its holder lets go: removing it would race with a process that
// has just opened it and would then lock a file nobody else can find.
// Thread-safety: a lock is owned by one thread at a time; move-only.
#pragma once

#include <string>

#include "tutel/core/shared_memory.hpp"  // UniqueFd
#include "tutel/core/status.hpp"

namespace tutel {

class ProcessLock {
 public:
  enum class Create { kIfMissing, kNever };

  // Opens `path` (never through a symlink; with kIfMissing created mode 0600 if absent), takes
  // the lock without waiting, and writes this process's pid into the file, for the message of
  // the next process that finds it held. Errors: AlreadyExists when another open file holds it
  // (flock conflicts between two opens in one process too), its message naming the holder's pid
  // where the file gives one; NotFound for a missing file under kNever; IOError otherwise.
  static Result<ProcessLock> acquire(const std::string& path, Create create = Create::kIfMissing);

  const std::string& path() const { return path_; }

 private:
  UniqueFd fd_;
  std::string path_;
};

}  // namespace tutel
