// A rank's lock, shared by the layers of several tenants, handed out by weighted fair share of
// the rank's time (DESIGN §4: "weighted fair share of each executor").
//
// A plain mutex serves whichever waiter the kernel wakes, so a rank goes by turns among
// *sessions*: a tenant with three sessions took three quarters of a rank shared with a tenant of
// one, and the one's 8-token request waited behind three of the other's 512-token forwards every
// time. This lock hands itself, when it is released with waiters, to the waiting tenant that has
// held the rank least relative to its `share` (start-time fair queueing: each tenant's virtual
// finish time grows by the time it held the lock divided by its share; the next holder is the
// waiting tenant whose start, max(its finish, the virtual time of the last grant), is least),
// first come first served within a tenant and between equals. A tenant that was idle starts at
// the current virtual time, so idleness banks no credit; when the rank falls idle, the virtual
// time moves to the latest finish, so nobody is owed anything for a busy period that ended. A
// holder is never interrupted: a request that runs waits at most for the one in progress and
// for the others' shares of the time. Every hold is some tenant's: the work a client causes
// outside its layers (mapping a device region, pinning its arena) is charged to its tenant,
// since an account of the daemon's own with a larger share would let a client's requests for
// such work crowd the other tenants out.
//
// Virtual times are kept relative to the last grant (rebased at each one), so they stay of the
// size of the tenants' lag, however long the daemon runs.
//
// The handover is direct (no barging): a thread that comes while others wait queues behind them.
// Uncontended, lock and unlock are an internal mutex and one clock read each.
//
// Thread-safety: any thread. A Seat is used by one holder at a time (it is what a
// std::unique_lock holds); several seats may name one tenant.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace tutel::daemon {

class FairLock {
 public:
  // Nanoseconds of a monotonic clock (tests pass their own); read before any state changes.
  using Clock = std::function<uint64_t()>;
  static uint64_t steady_now_ns();

  explicit FairLock(Clock now_ns = &FairLock::steady_now_ns) : now_ns_(std::move(now_ns)) {}
  FairLock(const FairLock&) = delete;
  FairLock& operator=(const FairLock&) = delete;

  // A tenant's weight, ≥ 1 ([[tenant]] share); a tenant never given one has 1.
  void set_share(const std::string& tenant, uint32_t share) { account(tenant, share); }

  // One tenant's way to the lock: Lockable, so std::unique_lock<Seat> holds it.
  class Seat {
   public:
    Seat(FairLock& lock, const std::string& tenant);
    void lock() { lock_->acquire(account_); }
    bool try_lock() { return lock_->try_acquire(account_); }
    void unlock() { lock_->release(); }

   private:
    FairLock* lock_;
    size_t account_;
  };

  struct Usage {
    std::string tenant;
    uint64_t held_ns = 0;
    uint64_t waits = 0;  // acquisitions that found the lock held or queued for
  };
  // What each tenant that has used the lock held it for, in all.
  std::vector<Usage> usage() const;

 private:
  struct Waiter {
    uint64_t arrival = 0;
    bool granted = false;
    std::condition_variable cv;
  };
  struct Account {
    std::string tenant;
    double weight = 1;
    double finish = 0;  // virtual time at which its last hold ended, relative to virtual_now_'s origin
    std::deque<Waiter*> waiting;
    uint64_t held_ns = 0, waits = 0;
  };

  // The tenant's account, made on first use; with `share`, its weight set to it.
  size_t account(const std::string& tenant, std::optional<uint32_t> share);
  void acquire(size_t account);
  bool try_acquire(size_t account);
  void release();
  // Gives the lock to `account` at `now_ns`; under mutex_.
  void grant_locked(size_t account, uint64_t now_ns);

  const Clock now_ns_;
  mutable std::mutex mutex_;
  std::vector<Account> accounts_;  // guarded by mutex_; one per tenant that used it, never removed
  size_t waiting_ = 0;             // queued waiters in all; guarded by mutex_
  uint64_t arrivals_ = 0;          // guarded by mutex_
  bool held_ = false;              // guarded by mutex_
  size_t holder_ = 0;              // the account holding it, while held_
  uint64_t held_since_ns_ = 0;
  // The virtual start of the last grant (0 from that grant on: every finish is rebased on it),
  // or, while the rank is idle, the latest finish.
  double virtual_now_ = 0;
};

}  // namespace tutel::daemon
