#include "fair_lock.hpp"

#include <algorithm>
#include <cassert>
#include <chrono>

namespace tutel::daemon {

uint64_t FairLock::steady_now_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

FairLock::Seat::Seat(FairLock& lock, const std::string& tenant)
    : lock_(&lock), account_(lock.account(tenant, std::nullopt)) {}

size_t FairLock::account(const std::string& tenant, std::optional<uint32_t> share) {
  assert(!share || *share >= 1);
  std::lock_guard guard(mutex_);
  for (size_t i = 0; i < accounts_.size(); ++i)
    if (accounts_[i].tenant == tenant) {
      if (share) accounts_[i].weight = *share;
      return i;
    }
  accounts_.push_back(Account{.tenant = tenant, .weight = static_cast<double>(share.value_or(1))});
  return accounts_.size() - 1;
}

void FairLock::grant_locked(size_t account, uint64_t now_ns) {
  // Start-time fair queueing: a tenant starts where it left off, or now if it was idle longer.
  const double start = std::max(accounts_[account].finish, virtual_now_);
  // Rebased on that start: the holder starts at 0, the others' finishes keep their distance
  // (a finish before it would start at the start anyway: 0).
  for (Account& a : accounts_) a.finish = std::max(a.finish - start, 0.0);
  virtual_now_ = 0;
  held_ = true;
  holder_ = account;
  held_since_ns_ = now_ns;
}

void FairLock::acquire(size_t account) {
  const uint64_t now = now_ns_();
  std::unique_lock guard(mutex_);
  if (!held_ && waiting_ == 0) {
    grant_locked(account, now);
    return;
  }
  Waiter me;
  me.arrival = arrivals_++;
  accounts_[account].waiting.push_back(&me);
  ++accounts_[account].waits;
  ++waiting_;
  // release() grants the lock to `me` directly (held_ stays true across the handover).
  me.cv.wait(guard, [&] { return me.granted; });
}

bool FairLock::try_acquire(size_t account) {
  const uint64_t now = now_ns_();
  std::lock_guard guard(mutex_);
  if (held_ || waiting_ != 0) return false;
  grant_locked(account, now);
  return true;
}

void FairLock::release() {
  const uint64_t now = now_ns_();  // first: nothing below throws
  std::lock_guard guard(mutex_);
  assert(held_);
  const uint64_t held = now - held_since_ns_;
  Account& was = accounts_[holder_];
  was.held_ns += held;
  was.finish = static_cast<double>(held) / was.weight;  // it started at 0 (rebased at its grant)
  held_ = false;
  if (waiting_ == 0) {
    // Idle: the busy period is over, and with it what anyone was owed.
    for (const Account& a : accounts_) virtual_now_ = std::max(virtual_now_, a.finish);
    return;
  }

  // The waiting tenant with the least start; between equal starts, the earliest arrival.
  size_t next = accounts_.size();
  double next_start = 0;
  uint64_t next_arrival = 0;
  for (size_t i = 0; i < accounts_.size(); ++i) {
    const Account& a = accounts_[i];
    if (a.waiting.empty()) continue;
    const double start = std::max(a.finish, virtual_now_);
    const uint64_t arrival = a.waiting.front()->arrival;
    if (next == accounts_.size() || start < next_start || (start == next_start && arrival < next_arrival)) {
      next = i;
      next_start = start;
      next_arrival = arrival;
    }
  }
  assert(next < accounts_.size());
  Waiter* w = accounts_[next].waiting.front();
  accounts_[next].waiting.pop_front();
  --waiting_;
  grant_locked(next, now);
  w->granted = true;
  // Notified under the mutex: the waiter's condition variable lives on its stack and is gone
  // once it has seen `granted`, which it can only after this scope ends.
  w->cv.notify_one();
}

std::vector<FairLock::Usage> FairLock::usage() const {
  std::lock_guard guard(mutex_);
  std::vector<Usage> out;
  out.reserve(accounts_.size());
  for (const Account& a : accounts_) out.push_back(Usage{a.tenant, a.held_ns, a.waits});
  return out;
}

}  // namespace tutel::daemon
