// The daemon's termination signals (SIGTERM, SIGINT), taken by one thread with sigwaitinfo;
// SIGUSR1 and SIGUSR2, whose default action would end the daemon without its exit checkpoints,
// are taken too, logged and ignored.
//
// A process-directed signal goes to any thread that does not block it. With a handler installed
// (libuv's uv_signal, as before), it ran on whichever thread it landed on: an OpenMP helper, a
// rank thread, UCX's progress thread, whose interrupted system calls then saw EINTR; and under
// ThreadSanitizer, which defers a signal until the thread it landed on next calls an intercepted
// function, a thread parked in libgomp's raw futex held a second SIGTERM until the process had
// exited. So tuteld's main blocks them before any thread exists (block_termination_signals,
// tutel/daemon/daemon.hpp: every thread inherits the mask), and this one thread waits for them.
//
// What a signal does follows the daemon's life:
//   starting (from start())         ends the process by the signal's default action: a cluster
//                                   join may wait minutes, and there is nothing to checkpoint;
//   serving (hand_to_loop())        calls a callback on the event loop's thread, in order;
//   writing its exit checkpoints    is logged and dropped: a second SIGTERM must not cut them
//     (loop_ended())                short (SIGKILL still does);
//   tearing down (release_loop())   ends the process again, so a teardown that hangs can still
//                                   be stopped: with the daemon's exit code where it ran (a
//                                   signal must not turn 75, a lost checkpoint, into a clean
//                                   stop), by the signal's default action where it never served.
// Once the watcher is destroyed (the daemon's last member), the signals stay blocked until the
// process exits: what runs after (static destructors) only SIGKILL stops.
// A signal the process was started with ignored (SIG_IGN: a background job's SIGINT) is dropped
// while the default action would apply, as it was before the daemon blocked it.
// Thread-safety: every member function on the loop's thread (or the thread that starts the
// daemon, before there is a loop).
#pragma once

#include <uv.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

class SignalWatcher {
 public:
  // Starts the waiting thread. Internal error, saying what to do, when the calling thread does
  // not block the signals (block_termination_signals was not called first).
  static Result<std::unique_ptr<SignalWatcher>> start();
  // Ends the waiting thread. The loop's handle, if any, must be closed by then (release_loop,
  // then the loop's own close of its handles).
  ~SignalWatcher();
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

  // From now on every signal calls `on_signal(signum)` on `loop`'s thread, in arrival order,
  // through a uv_async_t of this object's that the loop's owner closes with its other handles.
  void hand_to_loop(uv_loop_t* loop, std::function<void(int)> on_signal);
  // The loop may end while signals are still handed to it (a shutdown under way).
  void unref();
  // The loop has ended: signals are logged and dropped (the exit checkpoints are being written).
  void loop_ended();
  // Before the loop's handles close: the thread no longer touches the loop, and a signal ends
  // the process again, with `exit_code` (the daemon's run() returned it) or, without one, by the
  // signal's default action.
  void release_loop(std::optional<int> exit_code);

 private:
  enum class Mode { kEndProcess, kToLoop, kLogOnly };
  SignalWatcher() = default;
  void wait_for_signals();
  void deliver_queued();

  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  Mode mode_ = Mode::kEndProcess;  // guarded by mutex_
  std::optional<int> exit_code_;   // guarded by mutex_
  std::vector<int> queued_;        // guarded by mutex_
  uv_async_t wake_loop_{};         // initialised by hand_to_loop
  bool wake_loop_ready_ = false;   // the loop's thread only
  std::function<void(int)> on_signal_;
};

}  // namespace tutel::daemon
