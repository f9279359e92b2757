// tuteld: the daemon's top level. Owns the event loop (libuv), the listening sockets, the
// sessions, the ranks and their layers, the metrics endpoint and the shutdown sequence.
// Thread-safety: run() on one thread; everything else is internal.
#pragma once

#include <memory>

#include "tutel/core/status.hpp"
#include "tutel/daemon/config.hpp"

namespace tutel::daemon {

class DaemonImpl;

// run()'s exit code when the shutdown went through but an exit checkpoint failed (EX_TEMPFAIL):
// a layer's training since its last checkpoint, or a layer never checkpointed, is lost.
inline constexpr int kExitCheckpointFailed = 75;

class Daemon {
 public:
  // Builds the ranks, restores state_dir, loads the config's layers and binds every socket;
  // nothing is served until run().
  static Result<std::unique_ptr<Daemon>> create(Config config);
  ~Daemon();

  // Serves until SIGTERM or SIGINT, then finishes in-flight requests, checkpoints to state_dir,
  // removes its sockets. Returns the process exit code: 0 on a clean shutdown,
  // kExitCheckpointFailed when an exit checkpoint could not be written.
  int run();

 private:
  explicit Daemon(std::unique_ptr<DaemonImpl> impl);
  std::unique_ptr<DaemonImpl> impl_;
};

}  // namespace tutel::daemon
