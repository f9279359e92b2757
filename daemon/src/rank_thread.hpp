// The one thread that runs a CPU rank's work.
//
// The CPU backend computes on the calling thread's OpenMP team (its own loops and oneDNN's), and
// libgomp keeps a team, its helper threads docked, for every thread that ever ran a parallel
// region. A daemon that computed on whatever thread took the rank's lock (each session's worker,
// each of libuv's pool threads that ran a creation or a load) soon held more OpenMP threads than
// CPUs, and libgomp then stops spinning: every parallel region put its helpers to sleep and woke
// them again, 30 to 48 context switches for a one-token forward, which took 750–900 µs through the
// daemon against 350–470 µs in-process (stop 31's latency review). With every op of the rank on
// this thread, the process has one OpenMP team per rank and libgomp keeps spinning.
//
// run() hands a closure to the thread and returns its result once it has run; called on the
// thread itself (a closure that calls run() again) it runs inline. Callers are served one at a
// time, in the order they come: the rank's FairLock, taken before, decides whose turn it is. An
// exception thrown by the closure is rethrown in the caller.
//
// Waiting: the thread spins for `spin` after each closure before it sleeps (a request's ops come
// one after another); a caller spins a few microseconds for the result and then sleeps, so that
// it does not take a core from the computation it waits for.
//
// Thread-safety: run() from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <exception>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

namespace tutel::daemon {

class RankThread {
 public:
  // `name`: the thread's name (at most 15 characters are kept, as the kernel does).
  RankThread(const std::string& name, std::chrono::microseconds spin);
  ~RankThread();
  RankThread(const RankThread&) = delete;
  RankThread& operator=(const RankThread&) = delete;

  template <typename F>
  std::invoke_result_t<F&> run(F&& f) {
    using R = std::invoke_result_t<F&>;
    if (on_thread()) return f();
    if constexpr (std::is_void_v<R>) {
      submit(Task{[](void* fn) { (*static_cast<std::remove_reference_t<F>*>(fn))(); }, &f});
    } else {
      std::optional<R> result;
      auto produce = [&] { result.emplace(f()); };
      submit(Task{[](void* fn) { (*static_cast<decltype(produce)*>(fn))(); }, &produce});
      return std::move(*result);
    }
  }

  bool on_thread() const { return std::this_thread::get_id() == id_; }
  // Closures handed to the thread so far (those run inline not counted).
  uint64_t handed_over() const { return handed_over_.load(std::memory_order_relaxed); }

 private:
  struct Task {
    void (*call)(void*);
    void* fn;
  };
  // Runs `task` on the thread and waits for it; rethrows what it threw.
  void submit(Task task);
  void loop();

  const std::chrono::microseconds spin_;
  std::mutex submit_mutex_;  // one caller's task at a time
  // Written by the caller before it posts, read by the thread after it sees the post.
  Task task_{};
  std::exception_ptr error_;
  std::atomic<uint32_t> posted_{0};  // bumped once per task (and once to stop)
  std::atomic<uint32_t> done_{0};    // the post the thread finished last
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> handed_over_{0};
  std::thread::id id_;
  std::thread thread_;  // last: started once the members above exist
};

}  // namespace tutel::daemon
