// The in-process side of UcxRank: mailboxes where ranks of one process match sends with
// receives by tag and copy directly (see tutel/comm/local_exchange.hpp).
//
// Matching: each rank has one mailbox holding its unmatched receives and the unmatched sends
// addressed to it. Whoever posts second finds its partner there, claims both ops, copies
// outside the lock, marks both done and wakes the partner's rank. An op leaves the mailbox
// only by being matched or cancelled, under the mailbox lock, so a cancel either removes it
// (nobody will touch its buffer) or finds it claimed and waits for the copy to finish.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "tutel/core/status.hpp"

namespace tutel::comm::ucx {

class UcxRank;

struct LocalOp {
  enum State : int { kPosted, kClaimed, kDone, kCancelled };
  std::atomic<int> state{kPosted};
  bool is_send = false;
  int peer = -1;  // the partner's world rank (for messages)
  uint64_t tag = 0;
  void* buffer = nullptr;
  size_t bytes = 0;
  size_t received = 0;   // a receive: how many bytes the sender offered
  bool counted = false;  // its completion was checked and counted by its poster
  // The rank that posted it, woken on completion; weak: it may be gone by the time the partner
  // that completed the op gets to wake it.
  std::weak_ptr<UcxRank> owner;
  struct Mailbox* box = nullptr;  // where it waits while unmatched

  void reset() {
    state.store(kPosted, std::memory_order_relaxed);
    received = 0;
    counted = false;
  }
};

struct Mailbox {
  std::mutex mu;
  std::vector<LocalOp*> sends, recvs;  // unmatched, in posting order
  // Set when its rank is destroyed: a send to it would never be matched. Checked per send, so
  // an atomic rather than a lookup in the hub.
  std::atomic<bool> closed{false};
};

class LocalHub {
 public:
  // A rank's mailbox; the id is what its peers find it by.
  uint32_t add(std::shared_ptr<Mailbox> box);
  void remove(uint32_t id);
  // Null when that rank has gone.
  std::shared_ptr<Mailbox> find(uint32_t id) const;

 private:
  mutable std::mutex mu_;
  std::unordered_map<uint32_t, std::shared_ptr<Mailbox>> boxes_;
  uint32_t next_id_ = 1;
};

// Posts `op` into `box` (the receiver's mailbox). When it completes a pair at once, returns the
// partner's rank, which the caller must wake (after releasing any rank lock it holds); else an
// empty pointer.
std::weak_ptr<UcxRank> post_local(Mailbox& box, LocalOp& op);
// Withdraws an op that is not done: removes it if still unmatched, else waits for its copy.
void cancel_local(LocalOp& op);

}  // namespace tutel::comm::ucx
