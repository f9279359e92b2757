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

// Blocks SIGTERM and SIGINT (and SIGUSR1 and SIGUSR2, which the daemon ignores) in the calling
// thread, and so in every thread it starts later: the daemon takes them on a thread of its own
// (daemon/src/signal_watcher.hpp says why). Call first
// thing in main(), before anything starts a thread; Daemon::create refuses a thread without it.
void block_termination_signals();

class Daemon {
 public:
  // Builds the ranks, restores state_dir, loads the config's layers and binds every socket;
  // nothing is served until run(). Requires block_termination_signals() first (an Internal
  // error otherwise). The daemon owns SIGTERM and SIGINT from here on: while it starts, either
  // ends the process by its default action; while it serves, either shuts it down (run()).
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
