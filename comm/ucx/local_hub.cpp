#include "local_hub.hpp"

#include <algorithm>
#include <cstring>
#include <random>
#include <thread>

#include "tutel/comm/local_exchange.hpp"

namespace tutel::comm {

LocalExchange::LocalExchange()
    : token_((uint64_t{std::random_device{}()} << 32) ^ std::random_device{}() ^ 1),
      hub_(std::make_unique<ucx::LocalHub>()) {}

LocalExchange::~LocalExchange() = default;

}  // namespace tutel::comm

namespace tutel::comm::ucx {

uint32_t LocalHub::add(std::shared_ptr<Mailbox> box) {
  std::lock_guard<std::mutex> lock(mu_);
  const uint32_t id = next_id_++;
  boxes_.emplace(id, std::move(box));
  return id;
}

void LocalHub::remove(uint32_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  boxes_.erase(id);
}

std::shared_ptr<Mailbox> LocalHub::find(uint32_t id) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = boxes_.find(id);
  return it == boxes_.end() ? nullptr : it->second;
}

namespace {

// Copies the send into the receive (both claimed) and marks both done.
void complete_pair(LocalOp& send, LocalOp& recv) {
  recv.received = send.bytes;
  // A size mismatch copies nothing: the receiver reports it, as UCX would report a truncation.
  if (send.bytes == recv.bytes && send.bytes > 0) std::memcpy(recv.buffer, send.buffer, send.bytes);
  recv.state.store(LocalOp::kDone, std::memory_order_release);
  send.state.store(LocalOp::kDone, std::memory_order_release);
}

}  // namespace

std::weak_ptr<UcxRank> post_local(Mailbox& box, LocalOp& op) {
  op.box = &box;
  LocalOp* partner = nullptr;
  {
    std::lock_guard<std::mutex> lock(box.mu);
    auto& others = op.is_send ? box.recvs : box.sends;
    auto it = std::find_if(others.begin(), others.end(), [&](LocalOp* o) { return o->tag == op.tag; });
    if (it == others.end()) {
      (op.is_send ? box.sends : box.recvs).push_back(&op);
      return {};
    }
    partner = *it;
    others.erase(it);
    partner->state.store(LocalOp::kClaimed, std::memory_order_relaxed);
    op.state.store(LocalOp::kClaimed, std::memory_order_relaxed);
  }
  // The partner's poster keeps its buffer until the op is done (or it cancels, which waits for
  // a claimed op), so the copy is safe outside the lock.
  std::weak_ptr<UcxRank> partner_owner = partner->owner;  // before the op may be reused
  if (op.is_send) {
    complete_pair(op, *partner);
  } else {
    complete_pair(*partner, op);
  }
  return partner_owner;
}

void cancel_local(LocalOp& op) {
  const int state = op.state.load(std::memory_order_acquire);
  if (state == LocalOp::kDone || state == LocalOp::kCancelled || op.box == nullptr) return;
  {
    std::lock_guard<std::mutex> lock(op.box->mu);
    auto& list = op.is_send ? op.box->sends : op.box->recvs;
    auto it = std::find(list.begin(), list.end(), &op);
    if (it != list.end()) {
      list.erase(it);
      op.state.store(LocalOp::kCancelled, std::memory_order_release);
      return;
    }
  }
  // Claimed by the partner: its copy finishes in a moment.
  while (op.state.load(std::memory_order_acquire) != LocalOp::kDone) std::this_thread::yield();
}

}  // namespace tutel::comm::ucx
