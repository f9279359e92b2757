// How long a ring's consumer spins before it sleeps, sized by what its last waits took.
//
// Spinning pays when the wait is shorter than the spin: the consumer sees the descriptor within a
// microsecond instead of paying a wake-up (~20–25 µs here). It costs a core for as long as it
// spins, and on a machine with few cores that core is the one the work waited for needs: a client
// spinning through a 100 µs forward took it from the daemon's OpenMP team, and a daemon worker
// spinning while its client computes took it from the client. So a wait that outlasted the spin
// budget makes the next one sleep at once (the work it waits for is long: the spin would only
// have delayed it, and the wake-up is paid either way), and a wait that ended within the budget,
// asleep or not, brings the spin back. Every kProbeEvery-th wait in a row that sleeps at once
// spins anyway, so that a wake-up slowed by a busy machine does not keep short waits asleep.
//
// Not thread-safe: one per consumer.
#pragma once

#include <chrono>
#include <cstdint>

namespace tutel::ipc {

class AdaptiveSpin {
 public:
  // Often enough that work just under the budget, whose waits asleep look long (the work and a
  // wake-up), gets its spin back within a few waits after one slow wait sent it to sleep; a probe
  // of a long wait costs at most the budget of a core, once per kProbeEvery such waits.
  static constexpr uint32_t kProbeEvery = 8;

  explicit AdaptiveSpin(std::chrono::microseconds budget) : budget_(budget) {}

  // The spin for the next wait: the budget, or 0 (sleep at once) after a long wait.
  std::chrono::microseconds next() {
    if (!sleeping_) return budget_;
    if (++sleeps_ % kProbeEvery == 0) return budget_;
    return std::chrono::microseconds(0);
  }

  // What the wait just ended took, from its start to the descriptor (spun and slept).
  void observe(std::chrono::nanoseconds waited) {
    const bool long_wait = waited > budget_;
    if (long_wait && !sleeping_) sleeps_ = 0;
    sleeping_ = long_wait;
  }

  std::chrono::microseconds budget() const { return budget_; }

 private:
  std::chrono::microseconds budget_;
  bool sleeping_ = false;
  uint32_t sleeps_ = 0;  // next() calls since the waits went to sleeping at once
};

}  // namespace tutel::ipc
