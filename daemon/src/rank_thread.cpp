#include "rank_thread.hpp"

#include <pthread.h>
#include <sched.h>

namespace tutel::daemon {
namespace {

// How long a caller spins for its result before it sleeps: long enough for a short op (a zero
// of the gradients, a refused step) to come back without a wake-up, short beside a forward.
constexpr std::chrono::microseconds kCallerSpin{5};

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until pred() or `limit` has passed; whether pred() held.
template <typename Pred>
bool spin_until(Pred pred, std::chrono::microseconds limit) {
  if (pred()) return true;
  if (limit.count() <= 0) return false;
  const auto deadline = std::chrono::steady_clock::now() + limit;
  for (int i = 1;; ++i) {
    cpu_relax();
    if (pred()) return true;
    // Every 16 rounds the core is offered to whatever else is ready to run on it (the thread
    // that waits for this one's result, the client it answers): on a machine with few cores a
    // spinner that does not yield keeps them waiting for the scheduler's next tick. The clock is
    // read there too: a read costs about as much as the pauses between.
    if (i % 16 == 0) {
      sched_yield();
      if (std::chrono::steady_clock::now() >= deadline) return pred();
    }
  }
}

}  // namespace

RankThread::RankThread(const std::string& name, std::chrono::microseconds spin) : spin_(spin) {
  thread_ = std::thread([this] { loop(); });
  id_ = thread_.get_id();  // read by callers only, once this constructor has returned
  (void)pthread_setname_np(thread_.native_handle(), name.substr(0, 15).c_str());
}

RankThread::~RankThread() {
  {
    std::lock_guard lock(submit_mutex_);  // after any caller's task
    stopping_.store(true, std::memory_order_relaxed);
    posted_.fetch_add(1, std::memory_order_release);
    posted_.notify_one();
  }
  thread_.join();
}

void RankThread::submit(Task task) {
  std::lock_guard lock(submit_mutex_);
  handed_over_.fetch_add(1, std::memory_order_relaxed);
  task_ = task;
  error_ = nullptr;
  const uint32_t ticket = posted_.load(std::memory_order_relaxed) + 1;
  posted_.store(ticket, std::memory_order_release);
  posted_.notify_one();
  auto finished = [&] { return done_.load(std::memory_order_acquire) == ticket; };
  if (!spin_until(finished, kCallerSpin)) {
    for (uint32_t seen = done_.load(std::memory_order_acquire); seen != ticket;
         seen = done_.load(std::memory_order_acquire))
      done_.wait(seen, std::memory_order_acquire);
  }
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void RankThread::loop() {
  uint32_t seen = 0;
  for (;;) {
    auto posted = [&] { return posted_.load(std::memory_order_acquire) != seen; };
    if (!spin_until(posted, spin_)) {
      for (uint32_t now = posted_.load(std::memory_order_acquire); now == seen;
           now = posted_.load(std::memory_order_acquire))
        posted_.wait(now, std::memory_order_acquire);
    }
    seen = posted_.load(std::memory_order_acquire);
    if (stopping_.load(std::memory_order_relaxed)) return;
    try {
      task_.call(task_.fn);
    } catch (...) {
      error_ = std::current_exception();
    }
    done_.store(seen, std::memory_order_release);
    done_.notify_one();
  }
}

}  // namespace tutel::daemon
