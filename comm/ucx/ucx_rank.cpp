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

namespace tutel::comm::ucx {
namespace {

constexpr uint64_t kFullTagMask = ~uint64_t{0};
constexpr uint32_t kMaxGroupId = (1u << 20) - 1;
// A sleeping waiter re-checks at least this often, whatever it is waiting for.
constexpr auto kMaxSleep = std::chrono::milliseconds(200);
// How long teardown and abort wait for UCX to hand back requests they cancelled.
constexpr auto kCleanupBound = std::chrono::milliseconds(1000);

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
    : rank_(o.rank), size_(o.size), local_size_(o.local_size), spin_(o.spin) {}

Result<std::shared_ptr<UcxRank>> UcxRank::create(const BootstrapOptions& options) {
  std::shared_ptr<UcxRank> self(new UcxRank(options));
  TUTEL_RETURN_IF_ERROR(self->init(options));
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
  const std::string payload(reinterpret_cast<const char*>(address), address_len);
  ucp_worker_release_address(worker_, address);

  TUTEL_ASSIGN_OR_RETURN(BootstrapTable table, coordinator_exchange(o, "ucx", payload));
  addresses_ = std::move(table.addresses);

  std::lock_guard<std::mutex> lock(mu_);
  const auto n = static_cast<size_t>(size_);
  endpoints_.assign(n, nullptr);
  failures_.assign(n, {});
  slots_ = std::make_unique<PeerSlot[]>(n);
  for (int p = 0; p < size_; ++p) {
    slots_[p].owner = this;
    slots_[p].peer = p;
    if (p == rank_) continue;
    if (table.payloads[p].empty())
      return Status::Corruption("bootstrap: " + describe(p) + " sent no UCX worker address");
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                    UCP_EP_PARAM_FIELD_ERR_HANDLER;
    ep.address = reinterpret_cast<const ucp_address_t*>(table.payloads[p].data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    ep.err_handler.cb = &UcxRank::on_endpoint_error;
    ep.err_handler.arg = &slots_[p];
    s = ucp_ep_create(worker_, &ep, &endpoints_[p]);
    if (s != UCS_OK) {
      endpoints_[p] = nullptr;
      return Status::Unavailable("cannot create a UCX endpoint to " + describe(p) + ": " +
                                 ucs_status_string(s));
    }
  }
  return Status::OK();
}

UcxRank::~UcxRank() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (int p = 0; p < static_cast<int>(endpoints_.size()); ++p) {
      // Flush healthy endpoints so our last messages reach peers that are still reading.
      if (endpoints_[p] != nullptr) close_endpoint_locked(p, peer_failed_locked(p));
    }
    if (worker_ != nullptr) finish_closing_locked(Clock::now() + kCleanupBound);
  }
  if (worker_ != nullptr) ucp_worker_destroy(worker_);
  if (context_ != nullptr) ucp_cleanup(context_);
}

std::string UcxRank::describe(int peer) const {
  std::string s = "rank " + std::to_string(peer);
  if (peer >= 0 && static_cast<size_t>(peer) < addresses_.size())
    s += " (" + addresses_[static_cast<size_t>(peer)] + ")";
  return s;
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
  unsigned events = 0;
  while (ucp_worker_progress(worker_) != 0) ++events;
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
    failures_[peer] = ucs_status_string(static_cast<ucs_status_t>(err));
  if (!failures_[peer].empty() && endpoints_[peer] != nullptr) close_endpoint_locked(peer, true);
  return !failures_[peer].empty();
}

Status UcxRank::peer_failure_locked(int peer) {
  return Status::Unavailable(describe(peer) + " failed: " + failures_[peer]);
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

// `ops` has capacity reserved for every transfer, so &ops.back() stays valid.
Status UcxRank::post_locked(std::vector<Op>& ops, const Transfer& t, bool is_send) {
  if (peer_failed_locked(t.peer)) return peer_failure_locked(t.peer);
  Op& op = ops.emplace_back();
  op.transfer = &t;
  op.is_send = is_send;
  ucp_request_param_t param{};
  void* request;
  if (is_send) {
    request = ucp_tag_send_nbx(endpoints_[t.peer], t.buffer, t.bytes, t.tag, &param);
  } else {
    param.op_attr_mask = UCP_OP_ATTR_FIELD_RECV_INFO;
    param.recv_info.tag_info = &op.info;  // filled only on immediate completion
    request = ucp_tag_recv_nbx(worker_, t.buffer, t.bytes, t.tag, kFullTagMask, &param);
  }
  if (UCS_PTR_IS_ERR(request)) {
    ops.pop_back();
    const ucs_status_t s = UCS_PTR_STATUS(request);
    if (is_peer_error(s)) {
      declare_failed_locked(t.peer, ucs_status_string(s));
      return peer_failure_locked(t.peer);
    }
    return ucx_error(is_send ? "ucp_tag_send_nbx" : "ucp_tag_recv_nbx", s);
  }
  op.request = request;  // null: completed already
  return Status::OK();
}

bool UcxRank::poll_ops_locked(std::vector<Op>& ops, Status* error) {
  bool all_done = true;
  for (Op& op : ops) {
    if (op.transfer == nullptr) continue;  // completed and checked earlier
    const Transfer& t = *op.transfer;
    if (op.request != nullptr) {
      const ucs_status_t s = op.is_send ? ucp_request_check_status(op.request)
                                        : ucp_tag_recv_request_test(op.request, &op.info);
      if (s == UCS_INPROGRESS) {
        if (peer_failed_locked(t.peer)) {
          *error = peer_failure_locked(t.peer);
          return false;
        }
        all_done = false;
        continue;
      }
      ucp_request_free(op.request);
      op.request = nullptr;
      if (s == UCS_ERR_MESSAGE_TRUNCATED) {
        *error = Status::InvalidArgument(
            "a message from a peer is larger than the " + std::to_string(t.bytes) +
            " bytes expected: the ranks called the collective with different sizes");
        return false;
      }
      if (s != UCS_OK) {
        if (is_peer_error(s) || peer_failed_locked(t.peer)) {
          declare_failed_locked(t.peer, ucs_status_string(s));
          *error = peer_failure_locked(t.peer);
        } else {
          *error = ucx_error(op.is_send ? "send" : "receive", s);
        }
        return false;
      }
    }
    if (!op.is_send && op.info.length != t.bytes) {
      *error = Status::InvalidArgument(
          describe(t.peer) + " sent " + std::to_string(op.info.length) + " bytes where " +
          std::to_string(t.bytes) + " were expected: the ranks called the collective with "
          "different sizes");
      return false;
    }
    op.transfer = nullptr;  // checked; skip next time
    op.info.length = 0;
  }
  return all_done;
}

void UcxRank::abort_locked(std::vector<Op>& ops) {
  for (Op& op : ops) {
    if (op.request == nullptr) continue;
    if (op.is_send) {
      // A send UCX still holds may read the caller's buffer after we return: close the
      // endpoint, which completes it. The peer is gone or too late to trust anyway.
      declare_failed_locked(op.transfer->peer,
                            "declared failed here: it did not take a message within the "
                            "collective timeout");
    } else {
      ucp_request_cancel(worker_, op.request);
    }
  }
  const auto bound = Clock::now() + kCleanupBound;
  for (;;) {
    progress_locked();
    bool pending = false;
    for (Op& op : ops) {
      if (op.request == nullptr) continue;
      if (ucp_request_check_status(op.request) == UCS_INPROGRESS) {
        pending = true;
        continue;
      }
      ucp_request_free(op.request);
      op.request = nullptr;
    }
    if (!pending) break;
    if (Clock::now() >= bound) {
      TUTEL_LOG(ERROR) << "UCX rank " << rank_
                       << ": a cancelled request did not complete; abandoning it";
      for (Op& op : ops)
        if (op.request != nullptr) ucp_request_free(op.request);
      break;
    }
  }
  ops.clear();
  finish_closing_locked(Clock::now() + kCleanupBound);
}

Status UcxRank::exchange(std::span<const Transfer> sends, std::span<const Transfer> recvs,
                         Clock::time_point deadline) {
  thread_local std::vector<Op> ops;
  ops.clear();
  ops.reserve(sends.size() + recvs.size());
  {
    std::lock_guard<std::mutex> lock(mu_);
    Status s;
    for (const Transfer& t : recvs)
      if (s.ok()) s = post_locked(ops, t, false);
    for (const Transfer& t : sends)
      if (s.ok()) s = post_locked(ops, t, true);
    if (!s.ok()) {
      abort_locked(ops);
      return s;
    }
  }
  return wait(ops, deadline);
}

Status UcxRank::wait(std::vector<Op>& ops, Clock::time_point deadline) {
  ThreadWaker& waker = thread_waker();
  auto spin_until = Clock::now() + spin_;
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      progress_locked();
      Status error;
      const bool done = poll_ops_locked(ops, &error);
      if (!error.ok()) {
        abort_locked(ops);
        return error;
      }
      if (done) return Status::OK();
    }
    const auto now = Clock::now();
    if (now >= deadline) {
      std::lock_guard<std::mutex> lock(mu_);
      std::string waiting;
      for (const Op& op : ops) {
        if (op.request == nullptr) continue;
        if (!waiting.empty()) waiting += "; ";
        waiting += describe(op.transfer->peer) + (op.is_send ? " [send of " : " [receive of ") +
                   std::to_string(op.transfer->bytes) + " bytes]";
      }
      abort_locked(ops);
      return Status::Timeout("timed out waiting for " + waiting);
    }
    if (now < spin_until) continue;

    {
      std::lock_guard<std::mutex> lock(mu_);
      Status error;
      const bool done = poll_ops_locked(ops, &error);  // another thread may have progressed
      if (!error.ok()) {
        abort_locked(ops);
        return error;
      }
      if (done) return Status::OK();
      const ucs_status_t armed = ucp_worker_arm(worker_);
      if (armed == UCS_ERR_BUSY) continue;  // events pending: progress again
      if (armed != UCS_OK || waker.fd() < 0) {
        std::this_thread::yield();  // this worker cannot sleep: keep polling
        continue;
      }
      sleepers_.push_back(waker.fd());
    }
    pollfd fds[2] = {{event_fd_, POLLIN, 0}, {waker.fd(), POLLIN, 0}};
    const auto left = std::min<Clock::duration>(deadline - Clock::now(), kMaxSleep);
    const auto ns = std::max<int64_t>(
        0, std::chrono::duration_cast<std::chrono::nanoseconds>(left).count());
    timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    (void)::ppoll(fds, waker.fd() >= 0 ? 2 : 1, &ts, nullptr);
    {
      std::lock_guard<std::mutex> lock(mu_);
      std::erase(sleepers_, waker.fd());
    }
    waker.drain();
    spin_until = Clock::now() + spin_;
  }
}

}  // namespace tutel::comm::ucx
