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
// failed, and every later or pending operation with that peer fails naming it. A rank that
// gives up on a collective (peer failure, timeout, a peer's notice) tells the group (Notice)
// and cleans up so that no request outlives the caller's buffers (see exchange()).
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
#include <string_view>
#include <vector>

#include "local_hub.hpp"
#include "peer_memory.hpp"
#include "tutel/comm/bootstrap.hpp"
#include "tutel/comm/local_exchange.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::ucx {

using Clock = std::chrono::steady_clock;

// One point-to-point message of a step. `peer` is a world rank other than this one.
struct Transfer {
  int peer;
  uint64_t tag;
  void* buffer;
  size_t bytes;
  // A message pulled from the sender's memory (peer_memory.hpp) is acknowledged with this tag:
  // on a receive, the tag to send the acknowledgement with; on a send, the tag it arrives with.
  // The communicator derives it from the message's tag with kAckBit set, so it is unique at
  // the rank that receives it, like the message's own tag.
  uint64_t ack_tag = 0;
};

// The top tag bit marks acknowledgements; group ids therefore stay below 2^19.
inline constexpr uint64_t kAckBit = uint64_t{1} << 63;

// A communicator's side of "I gave up on this group" messages: a standing receive for the
// peers' notices, and where to send our own, so a failure reaches every rank of the group with
// its root cause instead of as a chain of timeouts.
struct Notice {
  void* request = nullptr;  // the posted receive; null when none
  char text[1024] = {};
  std::vector<std::pair<int, uint64_t>> peers;  // (world rank, tag) to notify when giving up
  // Who sent a notice that arrived: the world rank of members[tag & sender_mask] (a tag's claim,
  // unauthenticated like every UCX message: it only labels the peer in failure()).
  std::vector<int> members;
  uint64_t sender_mask = 0;
  std::string self;                             // "rank 2 (127.0.0.1, pid 7)"
  const char* what = "";                        // the collective running now
  bool sent = false;                            // once per communicator is enough
};

class UcxRank : public std::enable_shared_from_this<UcxRank> {
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
  // "rank 3 (127.0.0.1, pid 4242)" ("node 3 (...)" for a cluster: BootstrapOptions::member).
  std::string describe(int peer) const;
  // "127.0.0.1, pid 4242": where the coordinator saw the peer.
  const std::string& address(int peer) const { return addresses_[static_cast<size_t>(peer)]; }
  // The digest of the bootstrap table: unique to this group's incarnation (it covers every
  // worker's address), for messages that must not be replayed into another.
  const Digest& table_digest() const { return table_digest_; }

  // Payload bytes of completed collective messages to and from `peer` (beacons excluded).
  // Lock-free: any thread, any time.
  uint64_t bytes_sent(int peer) const;
  uint64_t bytes_received(int peer) const;
  // Why `peer` is considered failed; "" while it is not. Progresses the worker. A peer that gave
  // up on a group with this rank and said so (its notice) is described by what it said, not by
  // its closed connection: it is alive.
  std::string failure(int peer);

  // Beacons: small fire-and-forget messages (heartbeats). The data (at most kMaxBeaconBytes)
  // is copied. Fails only when the peer has failed (or UCX refuses the send).
  static constexpr size_t kMaxBeaconBytes = 64;
  Status send_beacon(int peer, uint64_t tag, const void* data, size_t bytes);
  // Progresses the worker and calls on_beacon(tag, data) for every beacon matching `tag` under
  // `mask` that has arrived, without waiting, until `until` (a flood waits for the next call,
  // rather than holding the caller). Returns false when it stopped at `until` with beacons
  // possibly left. One caller (one tag/mask) per rank.
  template <typename F>
  bool receive_beacons(uint64_t tag, uint64_t mask, Clock::time_point until, F&& on_beacon) {
    std::lock_guard<std::mutex> lock(mu_);
    progress_locked();
    while (next_beacon_locked(tag, mask)) {
      on_beacon(beacon_info_.sender_tag, std::string_view(beacon_buffer_, beacon_info_.length));
      if (Clock::now() >= until) return false;
    }
    return true;
  }

  // An id no other group of this rank uses (1 .. 2^20 - 1); nullopt once all are spent.
  std::optional<uint32_t> allocate_group_id();

  // Posts every receive, then every send, and waits until all complete or `deadline`.
  // Receives must arrive with exactly `bytes`. A notice that arrives fails the exchange with
  // its text; when the deadline passes, the exchange waits up to `grace` longer for one, as it
  // names the cause better than a timeout does.
  //
  // On failure this rank gives up: it notifies `notice.peers`, receives what the peers still
  // send into scratch (so their sends complete and no peer is blamed for our abort), and waits
  // up to max(grace, 200 ms) for its own sends; a peer that has not taken one by then is
  // declared failed and its endpoint force-closed. Nothing is left reading or writing the
  // caller's buffers.
  Status exchange(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                  Clock::time_point deadline, Notice& notice, Clock::duration grace);

  // The bootstrap's first barrier is over: BootstrapOptions::cancel no longer applies.
  void end_bootstrap() { bootstrapping_.store(false, std::memory_order_relaxed); }

  // True when `peer` lives in this process and shares our LocalExchange: messages to it are
  // copied directly.
  bool is_local(int peer) const { return local_boxes_[static_cast<size_t>(peer)] != nullptr; }
  // True when this rank copies `peer`'s large messages out of its memory (peer_memory.hpp).
  bool pulls_from_peer(int peer) const { return pull_from_[static_cast<size_t>(peer)] != 0; }
  // Wakes this rank's threads that sleep in exchange(): an in-process peer completed one of
  // their messages. Takes our mutex; call it holding no other rank's.
  void wake_waiters();

  // Tells `notice.peers` that this rank gave up (once per notice, as a failed exchange does),
  // outside any exchange: the caller's own work failed between its collectives.
  void give_up(Notice& notice, const Status& error);
  // Posts `notice`'s receive for tags equal to `tag` under `mask`.
  Status post_notice(Notice& notice, uint64_t tag, uint64_t mask);
  // Cancels a posted notice receive; the Notice may then be destroyed.
  void cancel_notice(Notice& notice);

 private:
  struct PeerSlot {
    UcxRank* owner = nullptr;
    int peer = -1;
    std::atomic<int> ucx_error{UCS_OK};  // set by the endpoint error callback
    std::atomic<uint64_t> bytes_sent{0}, bytes_received{0};
  };
  struct Op {
    void* request = nullptr;  // null once complete
    const Transfer* transfer = nullptr;
    bool is_send = false;
    ucp_tag_recv_info_t info{};
    // Pulled (peer memory): the send waits for the acknowledgement as well; the receive gets
    // the descriptor first, then copies.
    bool pulled = false;
    void* ack_request = nullptr;        // a pulled send's acknowledgement receive
    LeaseTable::Slot* lease = nullptr;  // a pulled send's loan
    PullDescriptor descriptor;          // where a pulled receive's descriptor lands
    char ack_sink = 0;
  };

  explicit UcxRank(const BootstrapOptions& options);
  Status init(const BootstrapOptions& options);
  static void on_endpoint_error(void* arg, ucp_ep_h ep, ucs_status_t status);

  // The methods below hold mu_.
  void progress_locked();
  bool peer_failed_locked(int peer);
  Status peer_failure_locked(int peer);
  // failures_[peer], or what the peer said when it gave up (noticed_).
  std::string failure_text_locked(int peer) const;
  void declare_failed_locked(int peer, std::string reason);
  void close_endpoint_locked(int peer, bool force);
  void close_notice_endpoint_locked(int peer);
  Status post_locked(std::vector<Op>& ops, const Transfer& t, bool is_send);
  // True when all ops completed; *error is set when one failed.
  bool poll_ops_locked(std::vector<Op>& ops, Status* error);
  void finish_closing_locked(Clock::time_point deadline);
  void reap_sinks_locked();
  // OK while no notice has arrived; the notice's error otherwise.
  Status check_notice_locked(Notice& notice);
  void send_notices_locked(Notice& notice, const Status& error);
  // True when a beacon arrived (in beacon_buffer_ / beacon_info_); keeps one receive posted.
  bool next_beacon_locked(uint64_t tag, uint64_t mask);

  Status wait(std::unique_lock<std::mutex>& lock, std::vector<Op>& ops, std::span<LocalOp* const> local,
              Clock::time_point deadline, Notice& notice, Clock::duration grace);
  // Gives up on `ops` and `local` after `error` (see exchange); returns `error`.
  Status abort(std::unique_lock<std::mutex>& lock, std::vector<Op>& ops, std::span<LocalOp* const> local,
               Status error, Notice& notice, Clock::duration grace);
  // Posts the transfers with in-process peers (before our mutex is taken: completing one wakes
  // the partner's rank, whose mutex we must not take while holding ours).
  Status post_local_ops(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                        std::vector<LocalOp*>& local);
  // True when every local op is done; *error is set when one failed (sizes disagree).
  bool poll_local(std::span<LocalOp* const> local, Status* error);

  const int rank_;
  const int size_;
  const int local_size_;
  const std::chrono::microseconds spin_;
  // BootstrapOptions::abandon, and ::cancel, which counts only until the bootstrap's first
  // barrier is over (end_bootstrap); null: never raised.
  const std::shared_ptr<const std::atomic<bool>> abandon_, cancel_;
  std::atomic<bool> bootstrapping_{true};
  // Why exchange() must give up now, or OK.
  Status stop_requested() const {
    if (abandon_ && abandon_->load(std::memory_order_acquire))
      return Status::Aborted("abandoned: this process is shutting down");
    if (cancel_ && bootstrapping_.load(std::memory_order_relaxed) && cancel_->load(std::memory_order_acquire))
      return Status::Aborted("cancelled while connecting to the peers");
    return Status::OK();
  }
  const std::string member_;  // "rank" or "node", for messages
  std::vector<std::string> addresses_;

  std::mutex mu_;
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int event_fd_ = -1;  // owned by the worker
  std::vector<ucp_ep_h> endpoints_;
  // A second endpoint per peer for notices alone, wired up at the bootstrap. A rank that gives up
  // force-closes its data endpoint to a peer that has not taken one of its messages, which
  // purged a notice queued behind that message (a rendezvous send ahead of it): the peer, alive
  // and only late, then waited out its whole timeout instead of learning why. Nothing waits on
  // this one but notices, and it stays open until the rank goes (or its peer's connection breaks).
  std::vector<ucp_ep_h> notice_endpoints_;
  Status wire_notice_endpoints(const BootstrapOptions& o);
  std::unique_ptr<PeerSlot[]> slots_;
  std::vector<std::string> failures_;  // non-empty: why the peer is considered failed
  std::vector<void*> closing_;         // endpoint close requests in flight
  std::vector<int> sleepers_;          // eventfds of threads sleeping on this worker
  // Set once abort() force-closed an endpoint to a peer that may be alive (see ~UcxRank).
  bool force_closed_live_peer_ = false;
  std::vector<std::unique_ptr<std::string>> notice_texts_;  // buffers of notices sent
  std::vector<std::string> noticed_;  // what each peer said when it gave up; "" if nothing
  struct Sink {
    void* request;
    std::unique_ptr<char[]> buffer;
  };
  std::vector<Sink> sinks_;  // receives that swallow messages of collectives we gave up on
  // Beacons: the one posted receive, and sends in flight with the buffers they read.
  void* beacon_request_ = nullptr;
  char beacon_buffer_[kMaxBeaconBytes] = {};
  ucp_tag_recv_info_t beacon_info_{};
  std::vector<std::pair<void*, std::unique_ptr<char[]>>> beacon_sends_;
  // Peer memory: who we pull from (same host, answered our challenge), who pulls from us (they
  // told us at bootstrap), our challenge words (one per rank), and our loans.
  std::vector<HostIdentity> hosts_;
  std::vector<char> pull_from_, pulled_by_;
  std::unique_ptr<uint64_t[]> challenge_words_;
  Digest table_digest_{};  // of the bootstrap table, which the challenge answers are bound to
  LeaseTable leases_;
  bool pulls_from(int peer, size_t bytes) const { return bytes >= kPullMinBytes && pull_from_[static_cast<size_t>(peer)]; }
  bool pulled_by(int peer, size_t bytes) const { return bytes >= kPullMinBytes && pulled_by_[static_cast<size_t>(peer)]; }
  // Bootstrap: challenges every same-host peer (peer_memory.hpp), tells it whether we will pull
  // its large messages, learns the reverse.
  Status agree_on_peer_memory(const BootstrapOptions& o);
  // The methods below hold mu_. A pulled receive whose descriptor arrived: copy, acknowledge.
  Status finish_pull_locked(Op& op);
  // After a peer withdrew: waits (up to max(grace, 200 ms)) for a notice, and returns its error,
  // or `error` if none came.
  Status await_notice(std::unique_lock<std::mutex>& lock, Notice& notice, Clock::duration grace, Status error);
  void send_ack_locked(int peer, uint64_t ack_tag);
  // Cancels a receive and waits (bounded) until UCX hands it back.
  void cancel_and_free_locked(void* request);
  // In-process peers (LocalExchange): our mailbox, and each peer's (null: not in-process).
  std::shared_ptr<LocalExchange> local_exchange_;
  std::shared_ptr<Mailbox> mailbox_;
  uint32_t mailbox_id_ = 0;
  std::vector<std::shared_ptr<Mailbox>> local_boxes_;
  std::vector<uint32_t> local_ids_;
  std::atomic<uint64_t> failure_epoch_{0};
  uint64_t seen_failure_epoch_ = 0;
  std::atomic<uint32_t> next_group_id_{1};
};

}  // namespace tutel::comm::ucx
