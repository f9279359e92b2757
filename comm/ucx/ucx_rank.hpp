// UcxRank: one bootstrapped rank's UCX state — a UCP context, one worker, an endpoint to every
// other rank — and the one operation every collective is built from: post a set of tagged
// receives and sends, wait for all of them, fail cleanly.
//
// Why one context and worker per rank (not per process): ranks of one process run on their
// own threads, and a worker per rank keeps them from contending on one lock. Sub-groups
// split from a rank share its worker and endpoints (tags keep them apart), so the worker is
// serialised by our mutex; a waiting thread spins on ucp_worker_progress for `spin`, then
// sleeps in poll() on the worker's event fd and a per-thread eventfd without holding it.
//
// Failure model: endpoints use UCP_ERR_HANDLING_MODE_PEER; the error callback marks the peer
// failed, and every later or pending operation with that peer fails naming it. When a
// deadline passes, pending receives are cancelled, and peers with a send still pending are
// declared failed and their endpoint force-closed, so no request outlives the caller's buffer.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <ucp/api/ucp.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::ucx {

using Clock = std::chrono::steady_clock;

// One point-to-point message of a step. `peer` is a world rank other than this one.
struct Transfer {
  int peer;
  uint64_t tag;
  void* buffer;
  size_t bytes;
};

class UcxRank {
 public:
  // Creates the worker, runs the coordinator exchange and creates every endpoint. Does not
  // wait for the peers to connect (the caller's first barrier does).
  static Result<std::shared_ptr<UcxRank>> create(const BootstrapOptions& options);
  ~UcxRank();
  UcxRank(const UcxRank&) = delete;
  UcxRank& operator=(const UcxRank&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_size() const { return local_size_; }
  // "rank 3 (127.0.0.1, pid 4242)"
  std::string describe(int peer) const;

  // An id no other group of this rank uses (1 .. 2^20 - 1); nullopt once all are spent.
  std::optional<uint32_t> allocate_group_id();

  // Posts every receive, then every send, and waits until all complete or `deadline`.
  // Receives must arrive with exactly `bytes`. On error nothing is left in flight.
  Status exchange(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                  Clock::time_point deadline);

 private:
  struct PeerSlot {
    UcxRank* owner = nullptr;
    int peer = -1;
    std::atomic<int> ucx_error{UCS_OK};  // set by the endpoint error callback
  };
  struct Op {
    void* request = nullptr;  // null once complete
    const Transfer* transfer = nullptr;
    bool is_send = false;
    ucp_tag_recv_info_t info{};
  };

  explicit UcxRank(const BootstrapOptions& options);
  Status init(const BootstrapOptions& options);
  static void on_endpoint_error(void* arg, ucp_ep_h ep, ucs_status_t status);

  // The methods below hold mu_.
  void progress_locked();
  bool peer_failed_locked(int peer);
  Status peer_failure_locked(int peer);
  void declare_failed_locked(int peer, std::string reason);
  void close_endpoint_locked(int peer, bool force);
  Status post_locked(std::vector<Op>& ops, const Transfer& t, bool is_send);
  // True when all ops completed; *error is set when one failed.
  bool poll_ops_locked(std::vector<Op>& ops, Status* error);
  void abort_locked(std::vector<Op>& ops);
  void finish_closing_locked(Clock::time_point deadline);

  Status wait(std::vector<Op>& ops, Clock::time_point deadline);

  const int rank_;
  const int size_;
  const int local_size_;
  const std::chrono::microseconds spin_;
  std::vector<std::string> addresses_;

  std::mutex mu_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int event_fd_ = -1;  // owned by the worker
  std::vector<ucp_ep_h> endpoints_;
  std::unique_ptr<PeerSlot[]> slots_;
  std::vector<std::string> failures_;  // non-empty: why the peer is considered failed
  std::vector<void*> closing_;         // endpoint close requests in flight
  std::vector<int> sleepers_;          // eventfds of threads sleeping on this worker
  std::atomic<uint64_t> failure_epoch_{0};
  uint64_t seen_failure_epoch_ = 0;
  std::atomic<uint32_t> next_group_id_{1};
};

}  // namespace tutel::comm::ucx
