// Single-producer/single-consumer rings of fixed-size descriptors in shared memory, with a
// futex doorbell so an idle consumer sleeps instead of spinning.
//
// Protocol: the producer copies a descriptor into slot head % kRingSlots, then publishes with
// head.store(release); if consumer_waiting is set it bumps the doorbell and FUTEX_WAKEs it. The
// consumer spins for `spin` checking head, then sets consumer_waiting, re-checks head (so a
// publish between its check and its sleep is never lost) and FUTEX_WAITs on the doorbell value
// it read before the re-check.
//
// The other process is untrusted: indices read from shared memory are validated (head − tail
// never exceeds the slot count) and every descriptor is copied out before it is examined.
// Thread-safety: one producer thread and one consumer thread per ring.
#pragma once

#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <optional>

#include "tutel/core/status.hpp"
#include "tutel/ipc/protocol.hpp"

namespace tutel::ipc {

struct WaitPolicy {
  std::chrono::microseconds spin{50};          // busy-poll this long before sleeping
  std::chrono::milliseconds timeout{1000};     // a single sleep's bound (callers loop)
};

// Wakes sleepers on `word` in any process that maps it (FUTEX_WAKE, not private).
void futex_wake_all(std::atomic<uint32_t>* word);
// Sleeps while *word == expected, at most `timeout` (negative: no bound). Spurious returns are
// allowed.
void futex_wait(std::atomic<uint32_t>* word, uint32_t expected, std::chrono::milliseconds timeout);

template <typename Descriptor>
class RingProducer {
 public:
  RingProducer() = default;
  RingProducer(RingControl* control, Descriptor* slots) : control_(control), slots_(slots) {}

  // False when the ring is full (or the consumer corrupted the indices).
  bool try_push(const Descriptor& d) {
    const uint64_t head = control_->head.load(std::memory_order_relaxed);
    const uint64_t tail = control_->tail.load(std::memory_order_acquire);
    if (head - tail >= kRingSlots) return false;
    std::memcpy(&slots_[head % kRingSlots], &d, sizeof(Descriptor));
    control_->head.store(head + 1, std::memory_order_release);
    // Orders the head store before the consumer_waiting load (store→load needs a full fence;
    // the consumer has the mirror-image fence), so a consumer about to sleep is never missed.
    std::atomic_thread_fence(std::memory_order_seq_cst);
    if (control_->consumer_waiting.load(std::memory_order_seq_cst)) {
      control_->doorbell.fetch_add(1, std::memory_order_seq_cst);
      futex_wake_all(&control_->doorbell);
    }
    return true;
  }

 private:
  RingControl* control_ = nullptr;
  Descriptor* slots_ = nullptr;
};

// Why a pop returned nothing.
enum class PopResult { kItem, kEmpty, kCorrupt };

template <typename Descriptor>
class RingConsumer {
 public:
  RingConsumer() = default;
  RingConsumer(RingControl* control, Descriptor* slots) : control_(control), slots_(slots) {}

  PopResult try_pop(Descriptor* out) {
    const uint64_t tail = control_->tail.load(std::memory_order_relaxed);
    const uint64_t head = control_->head.load(std::memory_order_acquire);
    if (head == tail) return PopResult::kEmpty;
    if (head - tail > kRingSlots) return PopResult::kCorrupt;
    std::memcpy(out, &slots_[tail % kRingSlots], sizeof(Descriptor));
    control_->tail.store(tail + 1, std::memory_order_release);
    return PopResult::kItem;
  }

  // Spins, then sleeps, until an item arrives, `stop()` returns true, or `deadline` passes.
  // stop() is polled between sleeps (at least every policy.timeout); wake a sleeping consumer
  // with wake() to stop it promptly.
  template <typename StopFn>
  PopResult pop_wait(Descriptor* out, const WaitPolicy& policy, StopFn&& stop,
                     std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt) {
    const auto spin_until = std::chrono::steady_clock::now() + policy.spin;
    for (uint32_t round = 1;; ++round) {
      if (PopResult r = try_pop(out); r != PopResult::kEmpty) return r;
      if (stop()) return PopResult::kEmpty;
      const auto now = std::chrono::steady_clock::now();
      if (deadline && now >= *deadline) return PopResult::kEmpty;
      if (now < spin_until) {
        // Now and then (every ~10 µs) the core goes to whatever else is ready to run on it: with
        // few cores, that is the work this side waits for (the daemon's step, the client's next
        // request). Rarely enough that a round trip of a microsecond or two never meets a yield.
        if (round % 256 == 0) sched_yield();
        continue;
      }
      const uint32_t bell = control_->doorbell.load(std::memory_order_seq_cst);
      control_->consumer_waiting.store(1, std::memory_order_seq_cst);
      std::atomic_thread_fence(std::memory_order_seq_cst);  // pairs with try_push's fence
      if (PopResult r = try_pop(out); r != PopResult::kEmpty) {
        control_->consumer_waiting.store(0, std::memory_order_relaxed);
        return r;
      }
      if (stop()) {
        control_->consumer_waiting.store(0, std::memory_order_relaxed);
        return PopResult::kEmpty;
      }
      // One sleep ends by policy.timeout (so stop() is polled) or by the deadline, whichever
      // comes first: a deadline is kept to the millisecond, not to the next poll.
      std::chrono::milliseconds sleep = policy.timeout;
      if (deadline) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - now);
        if (sleep.count() < 0 || left < sleep) sleep = left;
      }
      futex_wait(&control_->doorbell, bell, sleep);
      control_->consumer_waiting.store(0, std::memory_order_relaxed);
    }
  }

  // Wakes this ring's consumer from another thread or process (e.g. to make it see stop()).
  void wake() {
    control_->doorbell.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&control_->doorbell);
  }

 private:
  RingControl* control_ = nullptr;
  Descriptor* slots_ = nullptr;
};

}  // namespace tutel::ipc
