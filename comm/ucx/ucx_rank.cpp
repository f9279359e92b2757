#include "ucx_rank.hpp"

#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <utility>

#include "tutel/core/logging.hpp"
#include "tutel/core/secret.hpp"

namespace tutel::comm::ucx {
namespace {

constexpr uint64_t kFullTagMask = ~uint64_t{0};
constexpr uint32_t kMaxGroupId = (1u << 19) - 1;  // the top tag bit is kAckBit
// A sleeping waiter re-checks at least this often, whatever it is waiting for.
constexpr auto kMaxSleep = std::chrono::milliseconds(200);
// How long teardown and abort wait for UCX to hand back requests they cancelled.
constexpr auto kCleanupBound = std::chrono::milliseconds(1000);
// The least an aborting rank waits for its peers to take its pending sends.
constexpr auto kMinDrain = std::chrono::milliseconds(200);
// Before the UCX address in a bootstrap payload: the local-exchange token, the mailbox id and
// the process's identity on its host (peer memory).
constexpr size_t kPayloadPrefix = sizeof(uint64_t) + sizeof(uint32_t) + sizeof(HostIdentity);
// Zeros after a peer's UCX address, which UCX parses without a length: a field whose stated
// length runs past the address reads zeros (and fails), not what lies after the payload.
constexpr size_t kAddressPadding = 4096;
// Events one progress_locked() call handles at most before its caller looks at its deadline.
constexpr unsigned kMaxProgressEvents = 4096;
// Peer-memory agreement at bootstrap: [kAckBit][group 0, 1 or 2][notice sequence][sender].
// Unique: no acknowledgement uses the notice sequence, and notices never have kAckBit.
constexpr uint64_t kAgreeTag = kAckBit | (uint64_t{(1u << 24) - 1} << 20);
constexpr uint64_t kChallengeTag = kAgreeTag | (uint64_t{1} << 44);
constexpr uint64_t kChallengeTakenTag = kAgreeTag | (uint64_t{2} << 44);
constexpr uint64_t kNoticeWireTag = kAgreeTag | (uint64_t{3} << 44);
// What an acknowledgement carries; static, so a send nobody waits for can always read it.
const char kAckByte = 'a';
// Set when a pull of this thread's collective failed because its sender withdrew the loan (a
// thread polls only its own ops, so it is per thread, not per rank).
thread_local bool t_peer_withdrew = false;

// Serialises the process environment and UCX configuration parsing across ranks.
std::mutex g_ucx_init_mu;

// Each thread that waits owns one eventfd, so whoever progresses the worker can wake it.
class ThreadWaker {
 public:
  ThreadWaker() : fd_(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) {}
  ~ThreadWaker() {
    if (fd_ >= 0) ::close(fd_);
  }
  int fd() const { return fd_; }
  void drain() const {
    uint64_t v;
    if (fd_ >= 0) (void)!::read(fd_, &v, sizeof v);
  }

 private:
  int fd_;
};

ThreadWaker& thread_waker() {
  thread_local ThreadWaker waker;
  return waker;
}

Status ucx_error(std::string_view what, ucs_status_t s) {
  return Status::Internal(std::string(what) + ": " + ucs_status_string(s));
}

// Statuses that mean the peer (or the path to it) is gone, not that we misused UCX.
bool is_peer_error(ucs_status_t s) {
  switch (s) {
    case UCS_ERR_CONNECTION_RESET:
    case UCS_ERR_ENDPOINT_TIMEOUT:
    case UCS_ERR_UNREACHABLE:
    case UCS_ERR_REJECTED:
    case UCS_ERR_IO_ERROR:
    case UCS_ERR_CANCELED:
    case UCS_ERR_TIMED_OUT:
    case UCS_ERR_NOT_CONNECTED:
      return true;
    default:
      return false;
  }
}

struct ConfigDeleter {
  void operator()(ucp_config_t* c) const { ucp_config_release(c); }
};

}  // namespace

UcxRank::UcxRank(const BootstrapOptions& o)
    : rank_(o.rank), size_(o.size), local_size_(o.local_size), spin_(o.spin), abandon_(o.abandon), cancel_(o.cancel), member_(o.member) {}

Result<std::shared_ptr<UcxRank>> UcxRank::create(const BootstrapOptions& options) {
  std::shared_ptr<UcxRank> self(new UcxRank(options));
  TUTEL_RETURN_IF_ERROR(self->init(options));
  TUTEL_RETURN_IF_ERROR(self->wire_notice_endpoints(options));
  TUTEL_RETURN_IF_ERROR(self->agree_on_peer_memory(options));
  return self;
}

Status UcxRank::init(const BootstrapOptions& o) {
  {
    std::lock_guard<std::mutex> init_lock(g_ucx_init_mu);
    // Loopback unless the operator chose devices: UCX would otherwise pick any interface.
    if (std::getenv("UCX_NET_DEVICES") == nullptr) ::setenv("UCX_NET_DEVICES", "lo", 0);
    ucp_config_t* raw_config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &raw_config);
    if (s != UCS_OK) return ucx_error("ucp_config_read", s);
    std::unique_ptr<ucp_config_t, ConfigDeleter> config(raw_config);

    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED |
                        UCP_PARAM_FIELD_ESTIMATED_NUM_EPS | UCP_PARAM_FIELD_NAME;
    params.features = UCP_FEATURE_TAG | UCP_FEATURE_WAKEUP;
    params.mt_workers_shared = 0;
    params.estimated_num_eps = static_cast<size_t>(o.size);
    const std::string name = "tutel-rank-" + std::to_string(o.rank);
    params.name = name.c_str();
    s = ucp_init(&params, config.get(), &context_);
    if (s != UCS_OK) return ucx_error("ucp_init", s);
  }

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SERIALIZED;
  ucs_status_t s = ucp_worker_create(context_, &wp, &worker_);
  if (s != UCS_OK) return ucx_error("ucp_worker_create", s);
  s = ucp_worker_get_efd(worker_, &event_fd_);
  if (s != UCS_OK) return ucx_error("ucp_worker_get_efd", s);

  ucp_address_t* address = nullptr;
  size_t address_len = 0;
  s = ucp_worker_get_address(worker_, &address, &address_len);
  if (s != UCS_OK) return ucx_error("ucp_worker_get_address", s);
  // The payload: [u64 local-exchange token][u32 mailbox id][UCX worker address]. Token 0: none.
  uint64_t token = 0;
  if (o.local_exchange) {
    local_exchange_ = o.local_exchange;
    mailbox_ = std::make_shared<Mailbox>();
    mailbox_id_ = local_exchange_->hub().add(mailbox_);
    token = local_exchange_->token();
  }
  challenge_words_ = std::make_unique<uint64_t[]>(static_cast<size_t>(o.size));
  HostIdentity me = this_process(challenge_words_.get());
  me.lease_arena = leases_.arena();  // the only place a puller reads a loan of ours from
  me.lease_slots = LeaseTable::kSlots;
  std::string payload(kPayloadPrefix, '\0');
  std::memcpy(payload.data(), &token, sizeof token);
  std::memcpy(payload.data() + sizeof token, &mailbox_id_, sizeof mailbox_id_);
  std::memcpy(payload.data() + sizeof token + sizeof mailbox_id_, &me, sizeof me);
  payload.append(reinterpret_cast<const char*>(address), address_len);
  ucp_worker_release_address(worker_, address);

  TUTEL_ASSIGN_OR_RETURN(BootstrapTable table, coordinator_exchange(o, "ucx", payload));
  table_digest_ = ucx::table_digest(table);
  addresses_ = std::move(table.addresses);

  std::lock_guard<std::mutex> lock(mu_);
  const auto n = static_cast<size_t>(size_);
  endpoints_.assign(n, nullptr);
  notice_endpoints_.assign(n, nullptr);
  failures_.assign(n, {});
  noticed_.assign(n, {});
  local_boxes_.assign(n, nullptr);
  local_ids_.assign(n, 0);
  hosts_.assign(n, HostIdentity{});
  hosts_[rank_] = me;
  pull_from_.assign(n, 0);
  pulled_by_.assign(n, 0);
  slots_ = std::make_unique<PeerSlot[]>(n);
  for (int p = 0; p < size_; ++p) {
    slots_[p].owner = this;
    slots_[p].peer = p;
    if (p == rank_) continue;
    const std::string& peer_payload = table.payloads[p];
    if (peer_payload.size() <= kPayloadPrefix)
      return Status::Corruption("bootstrap: " + describe(p) + " sent no UCX worker address");
    uint64_t peer_token = 0;
    std::memcpy(&peer_token, peer_payload.data(), sizeof peer_token);
    std::memcpy(&local_ids_[p], peer_payload.data() + sizeof peer_token, sizeof(uint32_t));
    if (token != 0 && peer_token == token) local_boxes_[p] = local_exchange_->hub().find(local_ids_[p]);
    std::memcpy(&hosts_[p], peer_payload.data() + sizeof peer_token + sizeof(uint32_t), sizeof(HostIdentity));
    // UCX parses an address without its length and asserts on a version it does not know (an
    // address of garbage, from a broken or hostile member, aborted this daemon, every tenant's
    // layers with it). So the address's format version (its first byte's low four bits) must be
    // this worker's own, and the parse reads a copy followed by zeros, not past the payload.
    const auto version = [](const std::string& payload) { return static_cast<uint8_t>(payload[kPayloadPrefix]) & 0x0f; };
    if (version(peer_payload) != version(payload))
      return Status::Corruption("bootstrap: " + describe(p) + " sent a UCX worker address of format version " +
                                std::to_string(version(peer_payload)) + ", not this worker's " +
                                std::to_string(version(payload)) +
                                " (another UCX build, or not a tuteld): run every daemon of a group with the same "
                                "UCX");
    std::string address(peer_payload, kPayloadPrefix);
    address.append(kAddressPadding, '\0');
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(address.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxRank::on_endpoint_error;
    ep.err_handler.arg = &slots_[p];
    s = ucp_ep_create(worker_, &ep, &endpoints_[p]);
    if (s != UCS_OK) {
      endpoints_[p] = nullptr;
      return Status::Unavailable("cannot create a UCX endpoint to " + describe(p) + ": " +
                                 ucs_status_string(s));
    }
    // Made second on both sides, so the two notice endpoints of a pair meet each other.
    s = ucp_ep_create(worker_, &ep, &notice_endpoints_[p]);
    if (s != UCS_OK) {
      notice_endpoints_[p] = nullptr;
      return Status::Unavailable("cannot create a UCX endpoint to " + describe(p) + ": " +
                                 ucs_status_string(s));
    }
  }
  return Status::OK();
}

Status UcxRank::wire_notice_endpoints(const BootstrapOptions& o) {
  // One byte each way over every pair's notice endpoints: an endpoint in peer error mode sends
  // nothing before its wire-up is done, which needs both sides to progress, and a rank that
  // gives up may never progress again. Done here, a notice later leaves at once.
  static const char kWireByte = 'w';
  std::vector<char> received(static_cast<size_t>(size_), 0);
  std::vector<std::pair<int, void*>> requests;  // (peer, request)
  const auto deadline = Clock::now() + o.collective_timeout;
  std::unique_lock<std::mutex> lock(mu_);
  auto release_all = [&] {
    for (auto& [peer, request] : requests)
      if (request != nullptr) {
        ucp_request_cancel(worker_, request);  // receives; a send stays, reading a static byte
        ucp_request_free(request);
      }
    requests.clear();
  };
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    void* request = ucp_tag_recv_nbx(worker_, &received[p], 1, kNoticeWireTag | static_cast<uint64_t>(p),
                                     kFullTagMask, &param);
    if (UCS_PTR_IS_ERR(request)) {
      release_all();
      return ucx_error("ucp_tag_recv_nbx", UCS_PTR_STATUS(request));
    }
    requests.emplace_back(p, request);
  }
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    ucp_request_param_t param{};
    void* request = ucp_tag_send_nbx(notice_endpoints_[p], &kWireByte, 1,
                                     kNoticeWireTag | static_cast<uint64_t>(rank_), &param);
    if (UCS_PTR_IS_ERR(request)) {
      release_all();
      return Status::Unavailable("bootstrap: cannot reach " + describe(p) + " (its notice endpoint): " +
                                 ucs_status_string(UCS_PTR_STATUS(request)));
    }
    if (request != nullptr) requests.emplace_back(p, request);
  }
  for (;;) {
    progress_locked();
    for (auto& [peer, request] : requests) {
      if (request == nullptr) continue;
      const ucs_status_t st = ucp_request_check_status(request);
      if (st == UCS_INPROGRESS) continue;
      ucp_request_free(request);
      request = nullptr;
      if (st != UCS_OK) {
        const int failed = peer;
        release_all();
        return Status::Unavailable("bootstrap: " + describe(failed) + " failed while connecting: " +
                                   ucs_status_string(st));
      }
    }
    std::erase_if(requests, [](const auto& r) { return r.second == nullptr; });
    if (requests.empty()) return Status::OK();
    if (Status stop = stop_requested(); !stop.ok()) {
      release_all();
      return stop;
    }
    if (Clock::now() >= deadline) {
      std::string waiting;
      for (const auto& [peer, request] : requests) waiting += (waiting.empty() ? "" : ", ") + describe(peer);
      release_all();
      return Status::Timeout("bootstrap: timed out connecting the notice endpoints of " + waiting);
    }
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    lock.lock();
  }
}

UcxRank::~UcxRank() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (force_closed_live_peer_) {
      // A peer this rank force-closed may still be running, and its UCX reconnects over TCP: a
      // wire-up request of its, read by any progress here, queues a reply that cannot leave once
      // the peer exits, and UCX 1.13 asserts on such a reply when ucp_worker_destroy purges it
      // (SIGABRT: the whole daemon). So nothing here progresses the worker: the endpoints close
      // by force, requests still pending are released as they are, and the worker goes.
      if (beacon_request_ != nullptr) {
        ucp_request_cancel(worker_, beacon_request_);
        ucp_request_free(beacon_request_);
        beacon_request_ = nullptr;
      }
      for (const Sink& sink : sinks_) {
        ucp_request_cancel(worker_, sink.request);
        ucp_request_free(sink.request);
      }
      sinks_.clear();
      for (int p = 0; p < static_cast<int>(endpoints_.size()); ++p)
        if (endpoints_[p] != nullptr) close_endpoint_locked(p, true);
      for (void* request : closing_) ucp_request_free(request);
      closing_.clear();
      for (auto& send : beacon_sends_) ucp_request_free(send.first);
      beacon_sends_.clear();
    }
  }
  if (force_closed_live_peer_) {
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
    if (mailbox_) {
      mailbox_->closed.store(true, std::memory_order_release);
      local_exchange_->hub().remove(mailbox_id_);
    }
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (beacon_request_ != nullptr) {
      sinks_.push_back({beacon_request_, nullptr});  // reaped below like the sinks
      beacon_request_ = nullptr;
    }
    for (const Sink& sink : sinks_) ucp_request_cancel(worker_, sink.request);
    const auto bound = Clock::now() + kCleanupBound;
    while (!sinks_.empty() && Clock::now() < bound) {
      progress_locked();
      reap_sinks_locked();
    }
    for (const Sink& sink : sinks_) ucp_request_free(sink.request);
    sinks_.clear();
    // Flush healthy endpoints so our last messages reach peers that are still reading, then
    // close every endpoint with FORCE: a graceful close needs the peer to answer, and a peer
    // that is idle (nothing progresses its worker, as in a daemon between requests) or gone
    // never does — destroying the worker under a pending close crashes UCX 1.13.
    // (peer_failed_locked force-closes a failed peer's endpoint itself.)
    std::vector<void*> flushes;
    for (int p = 0; p < static_cast<int>(endpoints_.size()); ++p) {
      // A notice endpoint is flushed even to a peer declared failed here (its notice must leave).
      if (notice_endpoints_[p] != nullptr && slots_[p].ucx_error.load(std::memory_order_acquire) == UCS_OK) {
        ucp_request_param_t param{};
        void* request = ucp_ep_flush_nbx(notice_endpoints_[p], &param);
        if (UCS_PTR_IS_PTR(request)) flushes.push_back(request);
      }
      if (endpoints_[p] == nullptr || peer_failed_locked(p)) continue;
      ucp_request_param_t param{};
      void* request = ucp_ep_flush_nbx(endpoints_[p], &param);
      if (UCS_PTR_IS_PTR(request)) flushes.push_back(request);
    }
    const auto flush_bound = Clock::now() + kCleanupBound;
    while (!flushes.empty() && Clock::now() < flush_bound) {
      progress_locked();
      std::erase_if(flushes, [](void* request) {
        if (ucp_request_check_status(request) == UCS_INPROGRESS) return false;
        ucp_request_free(request);
        return true;
      });
    }
    for (void* request : flushes) ucp_request_free(request);
    for (int p = 0; p < static_cast<int>(endpoints_.size()); ++p) {
      if (endpoints_[p] != nullptr) close_endpoint_locked(p, true);
      if (notice_endpoints_[p] != nullptr) close_notice_endpoint_locked(p);
    }
    if (worker_ != nullptr) finish_closing_locked(Clock::now() + kCleanupBound);
    // Closing the endpoints completed every beacon send still queued.
    for (auto& send : beacon_sends_) ucp_request_free(send.first);
    beacon_sends_.clear();
  }
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
  if (mailbox_) {
    mailbox_->closed.store(true, std::memory_order_release);
    local_exchange_->hub().remove(mailbox_id_);
  }
}

Status UcxRank::agree_on_peer_memory(const BootstrapOptions& o) {
  // Every same-host pair (not in-process) takes part, whether or not it may pull: same_host is
  // symmetric, so both sides of a pair run the same three rounds or neither does.
  std::vector<int> peers;
  for (int p = 0; p < size_; ++p)
    if (p != rank_ && !local_boxes_[p] && same_host(hosts_[rank_], hosts_[p])) peers.push_back(p);
  if (peers.empty()) return Status::OK();
  const auto deadline = Clock::now() + o.collective_timeout;
  Notice no_notice;  // a failed bootstrap fails every rank on its own
  auto swap = [&](uint64_t tag, auto* ours, auto* theirs, const char* what) {
    std::vector<Transfer> sends, recvs;
    for (int p : peers) {
      sends.push_back({p, tag | static_cast<uint64_t>(rank_), &ours[p], sizeof ours[p]});
      recvs.push_back({p, tag | static_cast<uint64_t>(p), &theirs[p], sizeof theirs[p]});
    }
    return exchange(sends, recvs, deadline, no_notice, Clock::duration::zero()).with_context(what);
  };

  // 1. The challenge (peer_memory.hpp): our fresh nonce to each peer, and theirs, whose answer
  //    goes into our challenge word for them.
  TUTEL_ASSIGN_OR_RETURN(std::string random, random_bytes(sizeof(uint64_t) * static_cast<size_t>(size_)));
  std::vector<uint64_t> nonces(static_cast<size_t>(size_)), theirs(static_cast<size_t>(size_));
  std::memcpy(nonces.data(), random.data(), random.size());
  TUTEL_RETURN_IF_ERROR(swap(kChallengeTag, nonces.data(), theirs.data(),
                             "sending the peer-memory challenge to the ranks of this host"));
  for (int p : peers) challenge_words_[p] = challenge_answer(theirs[p], p, rank_, table_digest_);
  // 2. "Your answer is in place, and you may read my memory": our sends completing does not
  //    mean that the peers' receives have, so each side says so before the other reads; and a
  //    rank with peer_memory = false lends nothing either.
  std::vector<char> allow(static_cast<size_t>(size_), o.peer_memory ? 1 : 0), allowed(static_cast<size_t>(size_), 0);
  TUTEL_RETURN_IF_ERROR(swap(kChallengeTakenTag, allow.data(), allowed.data(),
                             "confirming the peer-memory challenge with the ranks of this host"));
  for (int p : peers) {
    // Another process that names ours is not telling the truth (ranks of this process meet
    // through the local exchange, or over UCX without one).
    if (!o.peer_memory || !allowed[p] || hosts_[p].pid == hosts_[rank_].pid) continue;
    const std::optional<uint64_t> word = read_challenge_word(hosts_[p], rank_);
    if (!word) continue;  // Yama or a container: the pair stays on UCX
    // Computed only now: before the read no memory of ours held it.
    if (*word == challenge_answer(nonces[p], rank_, p, table_digest_)) {
      pull_from_[p] = 1;
      continue;
    }
    TUTEL_LOG(WARN) << "UCX rank " << rank_ << ": " << describe(p) << " names pid " << hosts_[p].pid
                    << " as its process, but that process does not hold the answer to the nonce we "
                       "sent it: its large messages go over UCX, never out of that process's memory "
                       "(a rank that states another's pid; set a peer secret to keep such ranks out)";
  }
  // 3. "I will pull your messages": both sides of each direction agree.
  std::vector<char> pulls(static_cast<size_t>(size_), 0);
  TUTEL_RETURN_IF_ERROR(swap(kAgreeTag, pull_from_.data(), pulls.data(), "agreeing on peer memory with the ranks of this host"));
  // Only where this rank lends at all: a descriptor hands a peer the addresses of this rank's
  // buffers and loans, which a rank with peer_memory = false sent to any member that claimed to
  // pull.
  for (int p = 0; p < size_; ++p) pulled_by_[p] = o.peer_memory && pulls[p];
  // The agreement is not traffic.
  for (int p = 0; p < size_; ++p) {
    slots_[p].bytes_sent.store(0, std::memory_order_relaxed);
    slots_[p].bytes_received.store(0, std::memory_order_relaxed);
  }
  return Status::OK();
}

void UcxRank::cancel_and_free_locked(void* request) {
  ucp_request_cancel(worker_, request);
  const auto bound = Clock::now() + kCleanupBound;
  while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < bound) progress_locked();
  ucp_request_free(request);
}

void UcxRank::wake_waiters() {
  std::lock_guard<std::mutex> lock(mu_);
  const uint64_t one = 1;
  for (int fd : sleepers_) (void)!::write(fd, &one, sizeof one);
}

Status UcxRank::post_local_ops(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                               std::vector<LocalOp*>& local) {
  // One pool per thread, reused: no allocation per message once warm.
  thread_local std::vector<std::unique_ptr<LocalOp>> pool;
  auto post = [&](const Transfer& t, bool is_send) -> Status {
    if (!is_local(t.peer)) return Status::OK();
    Mailbox& box = is_send ? *local_boxes_[t.peer] : *mailbox_;  // ours keep them alive
    if (is_send && box.closed.load(std::memory_order_acquire))
      return Status::Unavailable(describe(t.peer) + " (in this process) has left the group");
    if (local.size() == pool.size()) pool.push_back(std::make_unique<LocalOp>());
    LocalOp& op = *pool[local.size()];
    op.reset();
    op.is_send = is_send;
    op.peer = t.peer;
    op.tag = t.tag;
    op.buffer = t.buffer;
    op.bytes = t.bytes;
    op.owner = weak_from_this();
    local.push_back(&op);
    if (std::shared_ptr<UcxRank> partner = post_local(box, op).lock()) partner->wake_waiters();
    return Status::OK();
  };
  for (const Transfer& t : recvs) TUTEL_RETURN_IF_ERROR(post(t, false));
  for (const Transfer& t : sends) TUTEL_RETURN_IF_ERROR(post(t, true));
  return Status::OK();
}

bool UcxRank::poll_local(std::span<LocalOp* const> local, Status* error) {
  bool all_done = true;
  for (LocalOp* op : local) {
    if (op->counted) continue;
    if (op->state.load(std::memory_order_acquire) != LocalOp::kDone) {
      all_done = false;
      continue;
    }
    if (!op->is_send && op->received != op->bytes) {
      *error = Status::InvalidArgument(describe(op->peer) + " sent " + std::to_string(op->received) +
                                       " bytes where " + std::to_string(op->bytes) +
                                       " were expected: the ranks called the collective with different sizes");
      return false;
    }
    (op->is_send ? slots_[op->peer].bytes_sent : slots_[op->peer].bytes_received)
        .fetch_add(op->bytes, std::memory_order_relaxed);
    op->counted = true;
  }
  return all_done;
}

std::string UcxRank::describe(int peer) const {
  std::string s = member_ + " " + std::to_string(peer);
  if (peer >= 0 && static_cast<size_t>(peer) < addresses_.size())
    s += " (" + addresses_[static_cast<size_t>(peer)] + ")";
  return s;
}

uint64_t UcxRank::bytes_sent(int peer) const {
  return slots_[peer].bytes_sent.load(std::memory_order_relaxed);
}

uint64_t UcxRank::bytes_received(int peer) const {
  return slots_[peer].bytes_received.load(std::memory_order_relaxed);
}

std::string UcxRank::failure(int peer) {
  if (peer == rank_) return {};
  std::lock_guard<std::mutex> lock(mu_);
  progress_locked();  // so that a connection that broke while nobody waited is noticed
  if (!peer_failed_locked(peer)) return {};
  return failure_text_locked(peer);
}

std::string UcxRank::failure_text_locked(int peer) const {
  if (noticed_[peer].empty()) return failures_[peer];
  // Its connection closed because it gave up (or this rank then gave up on it): it is alive.
  return "it gave up on a group with this rank and said: " + noticed_[peer];
}

Status UcxRank::send_beacon(int peer, uint64_t tag, const void* data, size_t bytes) {
  TUTEL_CHECK(bytes <= kMaxBeaconBytes);
  std::lock_guard<std::mutex> lock(mu_);
  std::erase_if(beacon_sends_, [](const auto& send) {
    if (ucp_request_check_status(send.first) == UCS_INPROGRESS) return false;
    ucp_request_free(send.first);
    return true;
  });
  if (peer_failed_locked(peer)) return peer_failure_locked(peer);
  auto buffer = std::make_unique<char[]>(std::max<size_t>(bytes, 1));
  std::memcpy(buffer.get(), data, bytes);
  ucp_request_param_t param{};
  void* request = ucp_tag_send_nbx(endpoints_[peer], buffer.get(), bytes, tag, &param);
  if (UCS_PTR_IS_ERR(request)) {
    const ucs_status_t s = UCS_PTR_STATUS(request);
    if (!is_peer_error(s)) return ucx_error("ucp_tag_send_nbx", s);
    declare_failed_locked(peer, ucs_status_string(s));
    return peer_failure_locked(peer);
  }
  if (request != nullptr) beacon_sends_.emplace_back(request, std::move(buffer));
  return Status::OK();
}

bool UcxRank::next_beacon_locked(uint64_t tag, uint64_t mask) {
  if (beacon_request_ == nullptr) {
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    void* request = ucp_tag_recv_nbx(worker_, beacon_buffer_, sizeof beacon_buffer_, tag, mask, &param);
    if (UCS_PTR_IS_ERR(request)) {
      TUTEL_LOG(WARN) << "UCX rank " << rank_ << ": cannot post the beacon receive: "
                      << ucs_status_string(UCS_PTR_STATUS(request));
      return false;
    }
    beacon_request_ = request;
  }
  beacon_info_ = {};
  const ucs_status_t s = ucp_tag_recv_request_test(beacon_request_, &beacon_info_);
  if (s == UCS_INPROGRESS) return false;
  ucp_request_free(beacon_request_);
  beacon_request_ = nullptr;
  return s == UCS_OK;  // a truncated or failed beacon is dropped; the next one will do
}

std::optional<uint32_t> UcxRank::allocate_group_id() {
  uint32_t id = next_group_id_.load(std::memory_order_relaxed);
  do {
    if (id > kMaxGroupId) return std::nullopt;
  } while (!next_group_id_.compare_exchange_weak(id, id + 1, std::memory_order_relaxed));
  return id;
}

// May run inside ucp_worker_progress (our mutex held) or, should UCX ever call it from its
// async thread, without it: so it touches only atomics and the thread-safe worker signal.
void UcxRank::on_endpoint_error(void* arg, ucp_ep_h /*ep*/, ucs_status_t status) {
  auto* slot = static_cast<PeerSlot*>(arg);
  int expected = UCS_OK;
  slot->ucx_error.compare_exchange_strong(expected, static_cast<int>(status));
  slot->owner->failure_epoch_.fetch_add(1, std::memory_order_release);
  ucp_worker_signal(slot->owner->worker_);
}

void UcxRank::progress_locked() {
  // Bounded: a peer that keeps sending (a flood of messages nobody posted for) kept this loop,
  // and so the caller's deadline check, the abandon flag and every other caller of the rank's
  // lock, waiting for as long as it sent. The callers come back between calls.
  unsigned events = 0;
  while (events < kMaxProgressEvents && ucp_worker_progress(worker_) != 0) ++events;
  const uint64_t epoch = failure_epoch_.load(std::memory_order_acquire);
  if ((events > 0 || epoch != seen_failure_epoch_) && !sleepers_.empty()) {
    const uint64_t one = 1;
    for (int fd : sleepers_) (void)!::write(fd, &one, sizeof one);
  }
  seen_failure_epoch_ = epoch;
}

bool UcxRank::peer_failed_locked(int peer) {
  const int err = slots_[peer].ucx_error.load(std::memory_order_acquire);
  if (err != UCS_OK && failures_[peer].empty())
    failures_[peer] = std::string("its connection broke (") +
                      ucs_status_string(static_cast<ucs_status_t>(err)) +
                      "); its process may have exited";
  if (!failures_[peer].empty() && endpoints_[peer] != nullptr) close_endpoint_locked(peer, true);
  // Its connection broke: the notice endpoint goes too. (Declared failed here, it stays: the
  // peer may be alive, and this rank's notice is for it.)
  if (err != UCS_OK && notice_endpoints_[peer] != nullptr) close_notice_endpoint_locked(peer);
  return !failures_[peer].empty();
}

Status UcxRank::peer_failure_locked(int peer) {
  return Status::Unavailable(describe(peer) + " failed: " + failure_text_locked(peer));
}

void UcxRank::declare_failed_locked(int peer, std::string reason) {
  if (failures_[peer].empty()) failures_[peer] = std::move(reason);
  if (endpoints_[peer] != nullptr) close_endpoint_locked(peer, true);
}

void UcxRank::close_endpoint_locked(int peer, bool force) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = force ? UCP_EP_CLOSE_FLAG_FORCE : 0;
  void* request = ucp_ep_close_nbx(endpoints_[peer], &param);
  endpoints_[peer] = nullptr;
  if (UCS_PTR_IS_PTR(request)) closing_.push_back(request);
}

void UcxRank::close_notice_endpoint_locked(int peer) {
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  param.flags = UCP_EP_CLOSE_FLAG_FORCE;
  void* request = ucp_ep_close_nbx(notice_endpoints_[peer], &param);
  notice_endpoints_[peer] = nullptr;
  if (UCS_PTR_IS_PTR(request)) closing_.push_back(request);
}

void UcxRank::finish_closing_locked(Clock::time_point deadline) {
  while (!closing_.empty()) {
    progress_locked();
    std::erase_if(closing_, [](void* request) {
      if (ucp_request_check_status(request) == UCS_INPROGRESS) return false;
      ucp_request_free(request);
      return true;
    });
    if (Clock::now() >= deadline) {
      TUTEL_LOG(WARN) << "UCX rank " << rank_ << ": " << closing_.size()
                      << " endpoint(s) did not close in time";
      for (void* request : closing_) ucp_request_free(request);
      closing_.clear();
    }
  }
}

Status UcxRank::post_locked(std::vector<Op>& ops, const Transfer& t, bool is_send) {
  if (peer_failed_locked(t.peer)) return peer_failure_locked(t.peer);
  Op& op = ops.emplace_back();
  op.transfer = &t;
  op.is_send = is_send;
  op.pulled = is_send ? pulled_by(t.peer, t.bytes) : pulls_from(t.peer, t.bytes);
  ucp_request_param_t param{};
  void* request;
  if (op.pulled && is_send) {
    // Lend the buffer, wait for the acknowledgement, send the descriptor.
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    void* ack = ucp_tag_recv_nbx(worker_, &op.ack_sink, 1, t.ack_tag, kFullTagMask, &param);
    if (UCS_PTR_IS_ERR(ack)) {
      ops.pop_back();
      return ucx_error("ucp_tag_recv_nbx", UCS_PTR_STATUS(ack));
    }
    op.ack_request = ack;
    op.lease = leases_.lend(t.buffer, t.bytes, t.peer);
    if (op.lease == nullptr) {
      cancel_and_free_locked(op.ack_request);
      ops.pop_back();
      return Status::ResourceExhausted("UCX rank " + std::to_string(rank_) + ": all " +
                                       std::to_string(LeaseTable::kSlots) +
                                       " lease slots are lent (more pulled messages in flight than a collective makes)");
    }
    ucp_request_param_t send_param{};
    request = ucp_tag_send_nbx(endpoints_[t.peer], &op.lease->descriptor, sizeof(PullDescriptor), t.tag,
                               &send_param);
  } else if (op.pulled) {
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    request = ucp_tag_recv_nbx(worker_, &op.descriptor, sizeof(PullDescriptor), t.tag, kFullTagMask, &param);
  } else if (is_send) {
    request = ucp_tag_send_nbx(endpoints_[t.peer], t.buffer, t.bytes, t.tag, &param);
  } else {
    // Always a request: UCX 1.13 does not fill recv_info on immediate completion, and the
    // received length is how we catch ranks that disagree on sizes.
    param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
    request = ucp_tag_recv_nbx(worker_, t.buffer, t.bytes, t.tag, kFullTagMask, &param);
  }
  if (UCS_PTR_IS_ERR(request)) {
    if (op.ack_request != nullptr) cancel_and_free_locked(op.ack_request);
    if (op.lease != nullptr) leases_.release(op.lease);
    ops.pop_back();
    const ucs_status_t s = UCS_PTR_STATUS(request);
    if (is_peer_error(s)) {
      declare_failed_locked(t.peer, ucs_status_string(s));
      return peer_failure_locked(t.peer);
    }
    return ucx_error(is_send ? "ucp_tag_send_nbx" : "ucp_tag_recv_nbx", s);
  }
  op.request = request;  // null: a send that completed already
  return Status::OK();
}

bool UcxRank::poll_ops_locked(std::vector<Op>& ops, Status* error) {
  bool all_done = true;
  // A request that finished with `s`: OK, or the error (the peer's failure where it is one).
  auto finished = [&](const Op& op, ucs_status_t s, size_t expected) -> Status {
    const int peer = op.transfer->peer;
    if (s == UCS_OK) return Status::OK();
    if (s == UCS_ERR_MESSAGE_TRUNCATED)
      return Status::InvalidArgument(describe(peer) + " sent more than the " + std::to_string(expected) +
                                     " bytes expected: the ranks called the collective with different sizes");
    if (is_peer_error(s) || peer_failed_locked(peer)) {
      declare_failed_locked(peer, ucs_status_string(s));
      return peer_failure_locked(peer);
    }
    return ucx_error(op.is_send ? "send" : "receive", s);
  };
  for (Op& op : ops) {
    if (op.transfer == nullptr) continue;  // completed and checked earlier
    const Transfer& t = *op.transfer;
    // What arrives on the wire: a pulled message's descriptor, else the message itself.
    const size_t expected = op.pulled && !op.is_send ? sizeof(PullDescriptor) : t.bytes;
    bool pending = false;
    for (void** request : {&op.request, &op.ack_request}) {
      if (*request == nullptr) continue;
      const bool recv_info = request == &op.request && !op.is_send;
      const ucs_status_t s = recv_info ? ucp_tag_recv_request_test(*request, &op.info)
                                       : ucp_request_check_status(*request);
      if (s == UCS_INPROGRESS) {
        pending = true;
        continue;
      }
      ucp_request_free(*request);
      *request = nullptr;
      if (Status st = finished(op, s, expected); !st.ok()) {
        *error = std::move(st);
        return false;
      }
    }
    if (pending) {
      if (peer_failed_locked(t.peer)) {
        *error = peer_failure_locked(t.peer);
        return false;
      }
      all_done = false;
      continue;
    }
    if (!op.is_send && op.info.length != expected) {
      *error = Status::InvalidArgument(describe(t.peer) + " sent " + std::to_string(op.info.length) +
                                       " bytes where " + std::to_string(expected) +
                                       " were expected: the ranks called the collective with different sizes");
      return false;
    }
    if (!op.is_send && !op.pulled && pull_from_[static_cast<size_t>(t.peer)] &&
        is_pull_descriptor(t.buffer, op.info.length)) {
      *error = Status::InvalidArgument(describe(t.peer) + " offered " + std::to_string(t.bytes) +
                                       " bytes to be pulled from its memory where a message of " +
                                       std::to_string(op.info.length) +
                                       " bytes was expected: the ranks called the collective with different sizes");
      return false;
    }
    if (op.pulled && !op.is_send) {
      if (Status st = finish_pull_locked(op); !st.ok()) {
        *error = std::move(st);
        return false;
      }
    }
    if (op.lease != nullptr) {  // acknowledged: the receiver has its copy
      leases_.release(op.lease);
      op.lease = nullptr;
    }
    (op.is_send ? slots_[t.peer].bytes_sent : slots_[t.peer].bytes_received)
        .fetch_add(t.bytes, std::memory_order_relaxed);
    op.transfer = nullptr;  // checked; skip next time
    op.info.length = 0;
  }
  return all_done;
}

Status UcxRank::finish_pull_locked(Op& op) {
  const Transfer& t = *op.transfer;
  const HostIdentity& lender = hosts_[t.peer];
  TUTEL_RETURN_IF_ERROR(pull(static_cast<pid_t>(lender.pid), op.descriptor, {lender.lease_arena, lender.lease_slots, rank_},
                             t.buffer, t.bytes, describe(t.peer), &t_peer_withdrew));
  send_ack_locked(t.peer, t.ack_tag);
  return Status::OK();
}

void UcxRank::send_ack_locked(int peer, uint64_t ack_tag) {
  if (peer_failed_locked(peer)) return;  // nobody waits for it any more
  ucp_request_param_t param{};
  void* request = ucp_tag_send_nbx(endpoints_[peer], &kAckByte, 1, ack_tag, &param);
  if (UCS_PTR_IS_PTR(request)) ucp_request_free(request);  // released when it completes
}

Status UcxRank::post_notice(Notice& notice, uint64_t tag, uint64_t mask) {
  std::lock_guard<std::mutex> lock(mu_);
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
  void* request = ucp_tag_recv_nbx(worker_, notice.text, sizeof notice.text, tag, mask, &param);
  if (UCS_PTR_IS_ERR(request)) return ucx_error("ucp_tag_recv_nbx", UCS_PTR_STATUS(request));
  notice.request = request;
  return Status::OK();
}

void UcxRank::cancel_notice(Notice& notice) {
  if (notice.request == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  ucp_request_cancel(worker_, notice.request);
  const auto bound = Clock::now() + kCleanupBound;
  while (ucp_request_check_status(notice.request) == UCS_INPROGRESS && Clock::now() < bound)
    progress_locked();
  ucp_request_free(notice.request);
  notice.request = nullptr;
}

void UcxRank::give_up(Notice& notice, const Status& error) {
  std::lock_guard<std::mutex> lock(mu_);
  send_notices_locked(notice, error);
  // The notices are small (eager) sends; a few rounds of progress put them on the wire, where a
  // peer's own progress completes them.
  for (int i = 0; i < 16; ++i) progress_locked();
}

void UcxRank::send_notices_locked(Notice& notice, const Status& error) {
  if (notice.sent || notice.peers.empty()) return;
  notice.sent = true;
  std::string text =
      notice.self + " gave up on " + notice.what + ": " + std::string(error.message());
  if (text.size() >= sizeof(Notice::text)) text.resize(sizeof(Notice::text) - 1);
  // The buffer must outlive the sends, which nobody waits for.
  const std::string& kept = *notice_texts_.emplace_back(std::make_unique<std::string>(text));
  for (const auto& [peer, tag] : notice.peers) {
    (void)peer_failed_locked(peer);  // closes the notice endpoint of a peer whose connection broke
    if (notice_endpoints_[peer] == nullptr) continue;
    ucp_request_param_t param{};
    void* request = ucp_tag_send_nbx(notice_endpoints_[peer], kept.data(), kept.size(), tag, &param);
    if (UCS_PTR_IS_PTR(request)) ucp_request_free(request);  // released when it completes
  }
}

Status UcxRank::check_notice_locked(Notice& notice) {
  if (notice.request == nullptr) return Status::OK();
  ucp_tag_recv_info_t info{};
  const ucs_status_t s = ucp_tag_recv_request_test(notice.request, &info);
  if (s == UCS_INPROGRESS) return Status::OK();
  ucp_request_free(notice.request);
  notice.request = nullptr;
  notice.sent = true;  // the sender told everyone already
  if (s != UCS_OK) return Status::Unavailable("a peer gave up on this group (its notice was lost)");
  std::string text(notice.text, std::min(info.length, sizeof notice.text));
  const uint64_t sender = info.sender_tag & notice.sender_mask;
  if (sender < notice.members.size()) {
    std::string& noticed = noticed_[static_cast<size_t>(notice.members[sender])];
    if (noticed.empty()) noticed = text;
  }
  return Status::Unavailable(std::move(text));
}

void UcxRank::reap_sinks_locked() {
  std::erase_if(sinks_, [](const Sink& sink) {
    if (ucp_request_check_status(sink.request) == UCS_INPROGRESS) return false;
    ucp_request_free(sink.request);
    return true;
  });
}

Status UcxRank::exchange(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                         Clock::time_point deadline, Notice& notice, Clock::duration grace) {
  thread_local std::vector<Op> ops;
  thread_local std::vector<LocalOp*> local;
  ops.clear();
  ops.reserve(sends.size() + recvs.size());
  local.clear();
  Status s = mailbox_ ? post_local_ops(sends, recvs, local) : Status::OK();
  std::unique_lock<std::mutex> lock(mu_);
  if (!sinks_.empty()) reap_sinks_locked();
  if (s.ok()) s = check_notice_locked(notice);
  for (const Transfer& t : recvs)
    if (s.ok() && !is_local(t.peer)) s = post_locked(ops, t, false);
  for (const Transfer& t : sends)
    if (s.ok() && !is_local(t.peer)) s = post_locked(ops, t, true);
  if (!s.ok()) return abort(lock, ops, local, std::move(s), notice, grace);
  return wait(lock, ops, local, deadline, notice, grace);
}

Status UcxRank::wait(std::unique_lock<std::mutex>& lock, std::vector<Op>& ops,
                     std::span<LocalOp* const> local, Clock::time_point deadline, Notice& notice,
                     Clock::duration grace) {
  ThreadWaker& waker = thread_waker();
  auto spin_until = Clock::now() + spin_;
  bool in_grace = false;
  // Under the lock: OK and *done when finished; an error when giving up.
  auto check = [&](bool* done) -> Status {
    Status error;
    const bool local_done = poll_local(local, &error);
    if (!error.ok()) return error;
    *done = poll_ops_locked(ops, &error) && local_done;
    if (*done) return Status::OK();
    // A peer's notice names the root cause; a failure we see may only be its consequence.
    Status noticed = check_notice_locked(notice);
    return noticed.ok() ? error : noticed;
  };
  t_peer_withdrew = false;
  for (;;) {
    progress_locked();
    bool done = false;
    if (Status error = check(&done); !error.ok()) {
      // A peer that withdrew a loan gave up first and sent its notice before withdrawing; the
      // notice names the root cause (a pull can outrun it), so give it the grace to arrive.
      if (t_peer_withdrew) error = await_notice(lock, notice, grace, std::move(error));
      return abort(lock, ops, local, error, notice, grace);
    }
    if (done) return Status::OK();
    if (Status stop = stop_requested(); !stop.ok()) return abort(lock, ops, local, std::move(stop), notice, grace);

    const auto now = Clock::now();
    if (now >= deadline && !in_grace && notice.request != nullptr &&
        grace > Clock::duration::zero()) {
      in_grace = true;
      deadline = now + grace;
    } else if (now >= deadline) {
      std::string waiting;
      for (const Op& op : ops) {
        if (op.transfer == nullptr) continue;
        if (!waiting.empty()) waiting += "; ";
        waiting += describe(op.transfer->peer) + (op.is_send ? " [send of " : " [receive of ") +
                   std::to_string(op.transfer->bytes) + " bytes]";
      }
      for (const LocalOp* op : local) {
        if (op->counted) continue;
        if (!waiting.empty()) waiting += "; ";
        waiting += describe(op->peer) + (op->is_send ? " [in-process send of " : " [in-process receive of ") +
                   std::to_string(op->bytes) + " bytes]";
      }
      return abort(lock, ops, local, Status::Timeout("timed out waiting for " + waiting), notice, grace);
    }
    if (now < spin_until) {
      lock.unlock();  // let other threads of this rank in between our polls
      lock.lock();
      continue;
    }

    const ucs_status_t armed = ucp_worker_arm(worker_);
    if (armed == UCS_ERR_BUSY) continue;  // events pending: progress again
    if (armed != UCS_OK || waker.fd() < 0) {
      lock.unlock();  // this worker cannot sleep: keep polling
      std::this_thread::yield();
      lock.lock();
      continue;
    }
    // Nothing changed since check() under this same lock hold, so a completion by another
    // thread from here on finds us in sleepers_ and writes our eventfd.
    sleepers_.push_back(waker.fd());
    lock.unlock();
    pollfd fds[2] = {{event_fd_, POLLIN, 0}, {waker.fd(), POLLIN, 0}};
    const auto left = std::min<Clock::duration>(deadline - Clock::now(), kMaxSleep);
    const auto ns =
        std::max<int64_t>(0, std::chrono::duration_cast<std::chrono::nanoseconds>(left).count());
    timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    (void)::ppoll(fds, 2, &ts, nullptr);
    lock.lock();
    std::erase(sleepers_, waker.fd());
    waker.drain();
    spin_until = Clock::now() + spin_;
  }
}

Status UcxRank::await_notice(std::unique_lock<std::mutex>& lock, Notice& notice, Clock::duration grace,
                             Status error) {
  const auto until = Clock::now() + std::max<Clock::duration>(grace, kMinDrain);
  while (notice.request != nullptr && Clock::now() < until) {
    progress_locked();
    if (Status noticed = check_notice_locked(notice); !noticed.ok()) return noticed;
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    lock.lock();
  }
  return error;
}

Status UcxRank::abort(std::unique_lock<std::mutex>& lock, std::vector<Op>& ops,
                      std::span<LocalOp* const> local, Status error, Notice& notice,
                      Clock::duration grace) {
  send_notices_locked(notice, error);
  // In-process ops: withdrawn, or finished by the partner that claimed them; afterwards
  // nobody touches the caller's buffers. (Only mailbox locks: no other rank's mutex.)
  for (LocalOp* op : local) cancel_local(*op);
  // Loans: withdrawn first, so a peer that reads from now on fails instead of reading a buffer
  // the caller may reuse. Their acknowledgements are not waited for: the lease makes the buffer
  // safe, and a late acknowledgement lands in a sink.
  for (Op& op : ops) {
    if (op.lease != nullptr) LeaseTable::withdraw(op.lease);
    if (op.ack_request != nullptr) {
      const bool acked = ucp_request_check_status(op.ack_request) != UCS_INPROGRESS;
      if (!acked) ucp_request_cancel(worker_, op.ack_request);
      const auto bound = Clock::now() + kCleanupBound;
      while (ucp_request_check_status(op.ack_request) == UCS_INPROGRESS && Clock::now() < bound) progress_locked();
      const bool cancelled = ucp_request_check_status(op.ack_request) == UCS_ERR_CANCELED;
      ucp_request_free(op.ack_request);
      op.ack_request = nullptr;
      if (cancelled && !peer_failed_locked(op.transfer->peer)) {
        ucp_request_param_t param{};
        param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        auto buffer = std::make_unique<char[]>(1);
        void* sink = ucp_tag_recv_nbx(worker_, buffer.get(), 1, op.transfer->ack_tag, kFullTagMask, &param);
        if (UCS_PTR_IS_PTR(sink)) sinks_.push_back({sink, std::move(buffer)});
      }
    }
  }
  for (Op& op : ops)
    if (op.request != nullptr && !op.is_send) ucp_request_cancel(worker_, op.request);

  const auto bound = Clock::now() + std::max<Clock::duration>(grace, kMinDrain);
  for (;;) {
    progress_locked();
    bool pending = false;
    for (Op& op : ops) {
      if (op.request == nullptr) continue;
      const ucs_status_t s = ucp_request_check_status(op.request);
      if (s == UCS_INPROGRESS) {
        pending = true;
        continue;
      }
      ucp_request_free(op.request);
      op.request = nullptr;
      if (!op.is_send && s == UCS_ERR_CANCELED && !peer_failed_locked(op.transfer->peer)) {
        // Swallow the message the peer may still send, so its send completes (a pulled
        // message's descriptor: its sender then waits for an acknowledgement that never comes,
        // and gives up on its own, withdrawing the loan).
        // One byte: the message is truncated into it, and UCX completes the sender's send all the
        // same (a full-size sink cost the message's size per peer, zero-filled, for as long as
        // the group lived, and could throw bad_alloc inside the abort).
        ucp_request_param_t param{};
        param.op_attr_mask = UCP_OP_ATTR_FLAG_NO_IMM_CMPL;
        auto buffer = std::make_unique<char[]>(1);
        void* sink = ucp_tag_recv_nbx(worker_, buffer.get(), 1, op.transfer->tag, kFullTagMask, &param);
        if (UCS_PTR_IS_PTR(sink)) sinks_.push_back({sink, std::move(buffer)});
      }
    }
    if (!pending || Clock::now() >= bound) break;
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    lock.lock();
  }
  // A send nobody took may still read the caller's buffer, and a receive the cancel could not
  // stop (matched, its data still arriving) may still write it: close the peer's endpoint, which
  // completes both. Such a peer is gone, or too late to trust anyway.
  bool abandoned = false;
  for (Op& op : ops) {
    if (op.request == nullptr) continue;
    force_closed_live_peer_ = true;
    declare_failed_locked(op.transfer->peer,
                          op.is_send ? "declared failed here: it did not take a message of a collective "
                                       "this rank gave up on"
                                     : "declared failed here: it was still sending a message of a collective "
                                       "this rank gave up on");
  }
  const auto close_bound = Clock::now() + kCleanupBound;
  for (;;) {
    progress_locked();
    bool pending = false;
    for (Op& op : ops) {
      if (op.request == nullptr) continue;
      if (ucp_request_check_status(op.request) == UCS_INPROGRESS && Clock::now() < close_bound) {
        pending = true;
        continue;
      }
      const bool still_running = ucp_request_check_status(op.request) == UCS_INPROGRESS;
      abandoned |= still_running;
      if (still_running) op.lease = nullptr;  // it may still read the descriptor: never reuse the slot
      ucp_request_free(op.request);
      op.request = nullptr;
    }
    if (!pending) break;
    lock.unlock();
    std::this_thread::sleep_for(std::chrono::microseconds(50));
    lock.lock();
  }
  if (abandoned)
    TUTEL_LOG(ERROR) << "UCX rank " << rank_
                     << ": a request of an aborted collective did not complete; abandoning it";
  for (Op& op : ops)
    if (op.lease != nullptr) leases_.release(op.lease);
  ops.clear();
  finish_closing_locked(Clock::now() + kCleanupBound);
  return error;
}

}  // namespace tutel::comm::ucx
