// FairLock: the order in which a rank's waiting tenants get it, on a clock the test moves (so the
// order is exact, whatever the threads' timing), and its mutual exclusion under real threads.
#include "fair_lock.hpp"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace tutel::daemon {
namespace {

// A lock on a clock that only moves when a holder says how long it held the lock, and threads
// that each take it once, queued one after another while the test holds it, so the order they
// get it in is the lock's choice alone.
class Queue {
 public:
  Queue() : lock_([this] { return now_.load(); }) {}
  FairLock& lock() { return lock_; }
  void advance(uint64_t ns) { now_ += ns; }
  // The test itself holds the lock as tenant "z", for no time, while threads queue.
  void hold_while_queueing() { z_.lock(); }
  void let_go() { z_.unlock(); }

  // Holds the lock for `ns` of the test's clock on `tenant`'s account (no thread).
  void hold(const std::string& tenant, uint64_t ns) {
    FairLock::Seat seat(lock_, tenant);
    std::lock_guard guard(seat);
    now_ += ns;
  }
  // A thread that takes the lock once as `tenant`, holds it `ns` and records its name; returns
  // once it waits in the lock's queue.
  void enqueue(const std::string& tenant, const std::string& name, uint64_t ns) {
    const uint64_t before = waits();
    threads_.emplace_back([this, tenant, name, ns] {
      FairLock::Seat seat(lock_, tenant);
      std::lock_guard guard(seat);
      order_.push_back(name);  // under the lock itself
      now_ += ns;
    });
    while (waits() == before) std::this_thread::yield();
  }
  std::vector<std::string> join() {
    for (auto& t : threads_) t.join();
    threads_.clear();
    return order_;
  }

 private:
  uint64_t waits() const {
    uint64_t n = 0;
    for (const auto& u : lock_.usage()) n += u.waits;
    return n;
  }
  std::atomic<uint64_t> now_{0};
  FairLock lock_;
  FairLock::Seat z_{lock_, "z"};
  std::vector<std::thread> threads_;
  std::vector<std::string> order_;
};

using Order = std::vector<std::string>;

TEST(FairLock, ATenantWithOneWaiterGoesBeforeAnotherTenantsQueue) {
  Queue q;
  FairLock::Seat a(q.lock(), "a");
  a.lock();
  q.enqueue("a", "a1", 10);
  q.enqueue("a", "a2", 10);
  q.enqueue("b", "b1", 10);
  q.advance(10);
  a.unlock();  // a held it; b has not: b first, though it came last
  EXPECT_EQ(q.join(), (Order{"b1", "a1", "a2"}));
}

TEST(FairLock, TurnsFollowTheSharesOfTime) {
  Queue q;
  q.lock().set_share("a", 2);
  q.hold_while_queueing();  // while both tenants queue
  for (const char* n : {"a1", "a2", "a3", "a4"}) q.enqueue("a", n, 10);
  for (const char* n : {"b1", "b2", "b3", "b4"}) q.enqueue("b", n, 10);
  q.let_go();
  // Virtual starts (time / share): a 0, 5, 10, 15; b 0, 10, 20, 30; ties to the earlier arrival.
  // While both wait, a gets two holds of 10 for each of b's.
  EXPECT_EQ(q.join(), (Order{"a1", "b1", "a2", "a3", "b2", "a4", "b3", "b4"}));
}

TEST(FairLock, TimeCountsNotTurns) {
  Queue q;
  q.hold_while_queueing();
  q.enqueue("a", "a1", 40);  // one long hold ...
  q.enqueue("a", "a2", 40);
  for (const char* n : {"b1", "b2", "b3", "b4", "b5"}) q.enqueue("b", n, 10);  // ... is worth four short ones
  q.let_go();
  EXPECT_EQ(q.join(), (Order{"a1", "b1", "b2", "b3", "b4", "a2", "b5"}));
}

TEST(FairLock, IdlenessBanksNoCredit) {
  Queue q;
  q.hold("b", 10);                             // b used it a little, long ago
  for (int i = 0; i < 10; ++i) q.hold("a", 10);  // then a alone, for a long time
  q.hold_while_queueing();
  for (const char* n : {"a1", "a2", "a3"}) q.enqueue("a", n, 10);
  for (const char* n : {"b1", "b2", "b3"}) q.enqueue("b", n, 10);
  q.let_go();
  // b starts from now, not from where it left off: it alternates with a rather than taking
  // the ten turns a had meanwhile (and a, first to arrive, goes first: the rank was idle
  // before, so a owes nothing for its own turns either).
  EXPECT_EQ(q.join(), (Order{"a1", "b1", "a2", "b2", "a3", "b3"}));
}

TEST(FairLock, ALongHoldBeforeTheRankFellIdleIsNotChargedAfterIt) {
  Queue q;
  q.hold("a", 1000000);  // a long hold, then the rank is idle
  q.hold_while_queueing();
  for (const char* n : {"a1", "a2"}) q.enqueue("a", n, 10);
  for (const char* n : {"b1", "b2"}) q.enqueue("b", n, 10);
  q.let_go();
  EXPECT_EQ(q.join(), (Order{"a1", "b1", "a2", "b2"}));
}

// Virtual times stay relative to the last grant: after a virtual time past 2^53 ns (104 days of
// a share-1 tenant's holds), a share-1000 tenant's 1 µs holds still advance its time by 1 ns
// each (absolute doubles that large round such steps away, and then it never yields).
TEST(FairLock, ShortHoldsCountAfterALongRun) {
  Queue q;
  q.lock().set_share("c", 1000);
  q.hold("x", uint64_t{1} << 53);
  q.hold("x", uint64_t{1} << 53);
  q.hold_while_queueing();
  q.enqueue("b", "b1", 100);
  for (int i = 1; i <= 110; ++i) q.enqueue("c", std::string(1, 'c').append(std::to_string(i)), 1000);
  q.enqueue("b", "b2", 100);
  q.let_go();
  const Order order = q.join();
  // b1 first (ties go to the earlier arrival); then c's starts 0, 1, 2, ... (1 ns each) reach
  // b's 100 at c101, which arrived before b2.
  ASSERT_EQ(order.size(), 112u);
  EXPECT_EQ(order[0], "b1");
  EXPECT_EQ(order[101], "c101");
  EXPECT_EQ(order[102], "b2");
}

TEST(FairLock, NoOneBargesPastTheQueue) {
  FairLock lock;
  FairLock::Seat a(lock, "a"), b(lock, "b");
  EXPECT_TRUE(b.try_lock());
  EXPECT_FALSE(a.try_lock());
  std::atomic<bool> let_go{false};
  std::thread waiter([&] {
    std::lock_guard guard(a);
    while (!let_go.load()) std::this_thread::yield();
  });
  auto a_waits = [&] {
    for (const FairLock::Usage& u : lock.usage())
      if (u.tenant == "a") return u.waits;
    return uint64_t{0};
  };
  while (a_waits() == 0) std::this_thread::yield();
  b.unlock();  // handed straight to the waiter ...
  EXPECT_FALSE(b.try_lock());  // ... so it is not free, even before the waiter has woken
  let_go = true;
  waiter.join();
  EXPECT_TRUE(b.try_lock());
  b.unlock();
}

TEST(FairLock, UsageCountsEachTenantsHoldsAndWaits) {
  Queue q;
  q.lock().set_share("idle", 3);  // known, never used: listed with nothing
  q.hold("a", 7);
  q.hold("a", 5);
  q.hold("b", 2);
  q.hold_while_queueing();
  q.enqueue("b", "b1", 4);
  q.let_go();
  q.join();
  uint64_t a_ns = 0, b_ns = 0, b_waits = 0, idle_ns = 1;
  for (const FairLock::Usage& u : q.lock().usage()) {
    if (u.tenant == "a") a_ns = u.held_ns;
    if (u.tenant == "b") b_ns = u.held_ns, b_waits = u.waits;
    if (u.tenant == "idle") idle_ns = u.held_ns;
  }
  EXPECT_EQ(a_ns, 12u);
  EXPECT_EQ(b_ns, 6u);
  EXPECT_EQ(b_waits, 1u);
  EXPECT_EQ(idle_ns, 0u);
}

TEST(FairLock, ExcludesUnderRealThreadsAndClock) {
  FairLock lock;
  std::atomic<int> inside{0}, overlaps{0};
  std::vector<std::thread> threads;
  std::atomic<int> total{0};
  for (int t = 0; t < 6; ++t)
    threads.emplace_back([&, t] {
      FairLock::Seat seat(lock, "tenant" + std::to_string(t % 3));
      for (int i = 0; i < 2000; ++i) {
        if (i % 7 == 0) {  // a seat of its own, now and then (several seats may name one tenant)
          FairLock::Seat other(lock, "tenant" + std::to_string((t + 1) % 3));
          std::lock_guard guard(other);
          if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
          inside.fetch_sub(1);
        }
        std::unique_lock guard(seat, std::defer_lock);
        if (i % 5 == 0) {
          if (!guard.try_lock()) continue;
        } else {
          guard.lock();
        }
        if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
        total.fetch_add(1);
        inside.fetch_sub(1);
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(overlaps.load(), 0);
  EXPECT_GE(total.load(), 6 * 1600);  // every lock() got it; only try_lock may fail
}

}  // namespace
}  // namespace tutel::daemon
