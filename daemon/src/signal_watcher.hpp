// The daemon's termination signals (SIGTERM, SIGINT), taken by one thread with sigwaitinfo.
//
// A process-directed signal goes to any thread that does not block it. With a handler installed
// (libuv's uv_signal, as before), it ran on whichever thread it landed on: an OpenMP helper, a
// rank thread, UCX's progress thread, whose interrupted system calls then saw EINTR; and under
// ThreadSanitizer, which defers a signal until the thread it landed on next calls an intercepted
// function, a thread parked in libgomp's raw futex held a second SIGTERM until the process had
// exited. So tuteld's main blocks them before any thread exists (every thread inherits the
// mask), and this one thread waits for them.
//
// Until hand_to_loop(), a signal ends the process as its default action would (the daemon is
// still starting: a cluster join may wait minutes, and there is nothing to checkpoint yet); from
// then on each one is handed to a callback on the event loop's thread.
// Thread-safety: start(), hand_to_loop(), unref() and stop() on the loop's thread.
#pragma once

#include <uv.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::daemon {

// Blocks SIGTERM and SIGINT in the calling thread, and so in every thread it starts later. Call
// first thing in main(), before anything starts a thread.
void block_termination_signals();

class SignalWatcher {
 public:
  // Starts the waiting thread. Internal error, saying what to do, when the calling thread does
  // not block the signals (block_termination_signals was not called first).
  static Result<std::unique_ptr<SignalWatcher>> start();
  ~SignalWatcher();  // stop()s
  SignalWatcher(const SignalWatcher&) = delete;
  SignalWatcher& operator=(const SignalWatcher&) = delete;

  // From now on every signal calls `on_signal(signum)` on `loop`'s thread, in arrival order.
  void hand_to_loop(uv_loop_t* loop, std::function<void(int)> on_signal);
  // The loop may end while signals are still watched (a shutdown under way).
  void unref();
  // Ends the waiting thread. Before the loop closes its handles: the thread wakes the loop
  // through one of them.
  void stop();

 private:
  SignalWatcher() = default;
  void wait_for_signals();
  void deliver_queued();

  std::thread thread_;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  bool handed_ = false;         // guarded by mutex_
  std::vector<int> queued_;     // guarded by mutex_
  uv_async_t wake_loop_{};      // initialised by hand_to_loop
  bool wake_loop_ready_ = false;  // the loop's thread only
  std::function<void(int)> on_signal_;
};

}  // namespace tutel::daemon
