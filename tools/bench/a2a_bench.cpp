// tutel-bench a2a: the communicator's all-to-all (linear and 2DH) between ranks on this machine,
// next to its ceiling measured in the same run.
//
// UCX transports (shm, sm, tcp): every rank is a forked child (as in tests/comm) that picks its
// transport with UCX_TLS before it bootstraps; UCX_NET_DEVICES=lo keeps all traffic on loopback.
// Ceiling: UCX point-to-point bandwidth, rank 0 -> rank 1 alone, over the same transport.
//
// memory: the ranks are threads of one forked child, bootstrapped with one shared
// comm::LocalExchange, so every message is a memcpy from the sender's buffer into the
// receiver's (as between the ranks of one daemon). Ceiling, measured first in the same child:
// memcpy between two threads' buffers (memcpy_ceiling.hpp).
//
// The parent holds no UCX state, reads the children's results from pipes and prints one table.
// Each child runs under a guard alarm, re-armed for every measurement point.
#include "a2a_bench.hpp"

#include <sys/uio.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include "bench_util.hpp"
#include "forked_ranks.hpp"
#include "memcpy_ceiling.hpp"
#include "tutel/comm/bootstrap.hpp"
#include "tutel/comm/communicator.hpp"
#include "tutel/comm/local_exchange.hpp"
#include "tutel/comm/ucx.hpp"

namespace tutel::bench {
namespace {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// A point whose runs would take longer than this gets fewer (never under kMinRuns).
constexpr double kPointBudgetSeconds = 2.0;
constexpr int kMinRuns = 3;
// p2p: each timed run streams messages of the point's size, kP2pWindow of them at most and
// about kP2pBytesPerRun in all, so small messages measure bandwidth, not one round trip.
constexpr size_t kP2pBytesPerRun = size_t{64} << 20;
constexpr size_t kP2pWindow = 64;
// Linear all-to-alls of at least this per-rank size are held to the target.
constexpr size_t kLargeBytes = size_t{16} << 20;
constexpr double kTargetRatio = 0.70;
// Cores busier than this before or after the run (others' processes) make the numbers noise.
constexpr double kBusyWarning = 0.2;
// 2DH is benchmarked with this many ranks per node, where it divides the group.
constexpr int kRanksPerNode = 2;

struct Transport {
  std::string_view name;
  const char* ucx_tls;
  // Ranks are threads of one process sharing a LocalExchange: messages are memcpys, and UCX
  // (ucx_tls) carries only the notices of a rank that gives up.
  bool in_process = false;
  // Forked ranks whose messages of comm::kPeerMemoryMinBytes and more are pulled from the sender's memory
  // (process_vm_readv), UCX carrying descriptors, acknowledgements and the small messages.
  // The other forked transports run with peer memory off: UCX carries everything.
  bool peer_memory = false;
};
constexpr Transport kTransports[] = {
    {"memory", "tcp,self", true},
    {"peer", "tcp,self", false, true},
    {"shm", "posix,self"},  // shared memory, copies through a posix segment
    {"sm", "sm,self"},      // every shared-memory transport UCX has: posix, sysv, cma, knem...
    {"tcp", "tcp,self"},
};

// ---------------------------------------------------------------------------------------------
// Parsing and formatting.

// "4096", "4KiB", "4K", "64MiB", "1GiB" (binary units, any letter case).
std::optional<size_t> parse_bytes(std::string_view text) {
  size_t digits = 0;
  while (digits < text.size() && text[digits] >= '0' && text[digits] <= '9') ++digits;
  if (digits == 0 || digits > 12) return std::nullopt;
  const size_t value = std::stoull(std::string(text.substr(0, digits)));
  std::string unit(text.substr(digits));
  for (char& c : unit) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  int shift = -1;
  if (unit.empty() || unit == "b") shift = 0;
  if (unit == "k" || unit == "kib") shift = 10;
  if (unit == "m" || unit == "mib") shift = 20;
  if (unit == "g" || unit == "gib") shift = 30;
  if (shift < 0 || value == 0 || value > (size_t{1} << 40) >> shift) return std::nullopt;
  return value << shift;
}

std::string format_bytes(size_t bytes) {
  char buf[32];
  if (bytes >= (size_t{1} << 30) && bytes % (size_t{1} << 30) == 0)
    std::snprintf(buf, sizeof buf, "%zu GiB", bytes >> 30);
  else if (bytes >= (size_t{1} << 20) && bytes % (size_t{1} << 20) == 0)
    std::snprintf(buf, sizeof buf, "%zu MiB", bytes >> 20);
  else if (bytes >= 1024 && bytes % 1024 == 0)
    std::snprintf(buf, sizeof buf, "%zu KiB", bytes >> 10);
  else
    std::snprintf(buf, sizeof buf, "%zu B", bytes);
  return buf;
}

std::string format_seconds(double s) {
  char buf[32];
  if (s < 1e-3)
    std::snprintf(buf, sizeof buf, "%.1f us", s * 1e6);
  else if (s < 1.0)
    std::snprintf(buf, sizeof buf, "%.2f ms", s * 1e3);
  else
    std::snprintf(buf, sizeof buf, "%.3f s", s);
  return buf;
}

// GB/s, or MB/s below 0.1 GB/s so that small numbers keep their digits.
std::string format_gbps(double bytes_per_second) {
  char buf[32];
  if (bytes_per_second < 1e8)
    std::snprintf(buf, sizeof buf, "%.3f MB/s", bytes_per_second / 1e6);
  else
    std::snprintf(buf, sizeof buf, "%.3f GB/s", bytes_per_second / 1e9);
  return buf;
}

int64_t elapsed_ns(Clock::time_point t0) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
}

// As many timed runs as asked, fewer when a run is slow enough to blow the point's budget.
int choose_runs(int repeats, int64_t one_run_ns) {
  const double fit = kPointBudgetSeconds / (std::max<int64_t>(one_run_ns, 1) * 1e-9);
  return std::min(repeats, std::max(kMinRuns, static_cast<int>(fit)));
}

// ---------------------------------------------------------------------------------------------
// Ranks.

comm::BootstrapOptions loopback_options(uint16_t port, int rank, int size, int local_size,
                                        int spin_us = -1) {
  comm::BootstrapOptions o;
  if (spin_us >= 0) o.spin = std::chrono::microseconds(spin_us);
  o.coordinator_host = "127.0.0.1";
  o.coordinator_port = port;
  o.rank = rank;
  o.size = size;
  o.local_size = local_size;
  o.timeout = 30s;
  // One 64 MiB all-to-all among 8 ranks sharing 2 cores over TCP takes seconds.
  o.collective_timeout = 60s;
  o.peer_memory = false;  // the transports' own numbers; the `peer` transport turns it on
  return o;
}

// ---------------------------------------------------------------------------------------------
// The point-to-point ceiling: raw UCP tag messages between two ranks, busy-polled.

class UcpPair {
 public:
  static Result<std::unique_ptr<UcpPair>> create(const comm::BootstrapOptions& options) {
    std::unique_ptr<UcpPair> self(new UcpPair());
    TUTEL_RETURN_IF_ERROR(self->init(options));
    return self;
  }
  ~UcpPair() {
    if (ep_ != nullptr) {
      ucp_request_param_t param{};
      param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      param.flags = 0;  // flush: our last messages still arrive
      void* request = ucp_ep_close_nbx(ep_, &param);
      if (UCS_PTR_IS_PTR(request)) {
        const auto bound = Clock::now() + 1s;
        while (ucp_request_check_status(request) == UCS_INPROGRESS && Clock::now() < bound)
          ucp_worker_progress(worker_);
        ucp_request_free(request);
      }
    }
    if (worker_ != nullptr) ucp_worker_destroy(worker_);
    if (context_ != nullptr) ucp_cleanup(context_);
  }
  UcpPair(const UcpPair&) = delete;
  UcpPair& operator=(const UcpPair&) = delete;

  // Each returns the request, or null when the operation completed at once.
  Result<void*> send(const void* data, size_t bytes, uint64_t tag) {
    ucp_request_param_t param{};
    void* request = ucp_tag_send_nbx(ep_, data, bytes, tag, &param);
    if (UCS_PTR_IS_ERR(request)) return error("ucp_tag_send_nbx", UCS_PTR_STATUS(request));
    return request;
  }
  Result<void*> recv(void* data, size_t bytes, uint64_t tag) {
    ucp_request_param_t param{};
    void* request = ucp_tag_recv_nbx(worker_, data, bytes, tag, ~uint64_t{0}, &param);
    if (UCS_PTR_IS_ERR(request)) return error("ucp_tag_recv_nbx", UCS_PTR_STATUS(request));
    return request;
  }
  // Progresses the worker until every request completed (and frees it), or the deadline.
  Status wait(std::vector<void*>& requests, Clock::time_point deadline) {
    Status first_error;
    for (;;) {
      bool pending = false;
      for (void*& request : requests) {
        if (request == nullptr) continue;
        const ucs_status_t s = ucp_request_check_status(request);
        if (s == UCS_INPROGRESS) {
          pending = true;
          continue;
        }
        ucp_request_free(request);
        request = nullptr;
        if (s != UCS_OK && first_error.ok()) first_error = error("point-to-point transfer", s);
      }
      if (!pending) return first_error;
      if (Clock::now() > deadline)
        return Status::Timeout("point-to-point transfer with rank " + std::to_string(peer_) +
                               " did not finish in time");
      ucp_worker_progress(worker_);
    }
  }

 private:
  UcpPair() = default;

  static Status error(std::string_view what, ucs_status_t s) {
    return Status::Internal(std::string(what) + ": " + ucs_status_string(s));
  }

  Status init(const comm::BootstrapOptions& o) {
    peer_ = 1 - o.rank;
    ucp_config_t* config = nullptr;
    ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
    if (s != UCS_OK) return error("ucp_config_read", s);
    ucp_params_t params{};
    params.field_mask = UCP_PARAM_FIELD_FEATURES;
    params.features = UCP_FEATURE_TAG;
    s = ucp_init(&params, config, &context_);
    ucp_config_release(config);
    if (s != UCS_OK) return error("ucp_init", s);

    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    s = ucp_worker_create(context_, &wp, &worker_);
    if (s != UCS_OK) return error("ucp_worker_create", s);
    ucp_address_t* address = nullptr;
    size_t address_len = 0;
    s = ucp_worker_get_address(worker_, &address, &address_len);
    if (s != UCS_OK) return error("ucp_worker_get_address", s);
    const std::string payload(reinterpret_cast<const char*>(address), address_len);
    ucp_worker_release_address(worker_, address);

    TUTEL_ASSIGN_OR_RETURN(comm::BootstrapTable table,
                           comm::coordinator_exchange(o, "p2p", payload));
    ucp_ep_params_t ep{};
    // No peer-failure handling (the communicator asks for it): the raw transport, and the only
    // mode in which UCX 1.13 connects over shared memory alone. The deadlines bound a dead peer.
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS;
    ep.address = reinterpret_cast<const ucp_address_t*>(table.payloads[peer_].data());
    s = ucp_ep_create(worker_, &ep, &ep_);
    if (s != UCS_OK) {
      ep_ = nullptr;
      return error("ucp_ep_create", s);
    }
    return Status::OK();
  }

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  int peer_ = 1;
};

constexpr uint64_t kDataTag = 1, kGoTag = 2, kDoneTag = 3;

// One timed run: both ranks post their receives and say "go"; rank 0 times from there until its
// own transfers completed and rank 1 said "done". One way: rank 0 sends `window` messages of
// `size` bytes to rank 1. Both ways: rank 1 sends as many back at the same time.
Result<int64_t> p2p_run(UcpPair& pair, int rank, bool both_ways, size_t size, size_t window,
                        uint8_t* send_buffer, uint8_t* recv_buffer) {
  const auto deadline = Clock::now() + 60s;
  const bool sends = rank == 0 || both_ways, receives = rank == 1 || both_ways;
  std::vector<void*> data, handshake;
  if (receives) {
    for (size_t m = 0; m < window; ++m) {
      TUTEL_ASSIGN_OR_RETURN(void* r, pair.recv(recv_buffer + m * size, size, kDataTag));
      data.push_back(r);
    }
  }
  char go_in = 0, go_out = 'g', done = 'd';
  TUTEL_ASSIGN_OR_RETURN(void* go_recv, pair.recv(&go_in, 1, kGoTag));
  TUTEL_ASSIGN_OR_RETURN(void* go_send, pair.send(&go_out, 1, kGoTag));
  handshake = {go_recv, go_send};
  TUTEL_RETURN_IF_ERROR(pair.wait(handshake, deadline));
  const auto t0 = Clock::now();
  if (rank == 0) {
    TUTEL_ASSIGN_OR_RETURN(void* r, pair.recv(&done, 1, kDoneTag));
    data.push_back(r);
  }
  if (sends) {
    for (size_t m = 0; m < window; ++m) {
      TUTEL_ASSIGN_OR_RETURN(void* r, pair.send(send_buffer + m * size, size, kDataTag));
      data.push_back(r);
    }
  }
  TUTEL_RETURN_IF_ERROR(pair.wait(data, deadline));
  const int64_t ns = elapsed_ns(t0);
  if (rank == 1) {
    TUTEL_ASSIGN_OR_RETURN(void* r, pair.send(&done, 1, kDoneTag));
    handshake = {r};
    TUTEL_RETURN_IF_ERROR(pair.wait(handshake, deadline));
  }
  return ns;
}

// Rank 0 reports "p2p <size> <runs> <median ns one way> <median ns both ways> <bytes per run>"
// (bytes per run and per direction).
Status p2p_rank(int rank, uint16_t port, const std::vector<size_t>& sizes, int repeats,
                const ReportPipe& report) {
  TUTEL_ASSIGN_OR_RETURN(auto pair, UcpPair::create(loopback_options(port, rank, 2, 1)));
  for (const size_t size : sizes) {
    ::alarm(kPointGuardSeconds);
    const size_t window = std::clamp<size_t>(kP2pBytesPerRun / size, 1, kP2pWindow);
    std::vector<uint8_t> send_buffer(window * size, static_cast<uint8_t>(rank + 1));
    std::vector<uint8_t> recv_buffer(window * size, 0);
    int64_t median_ns[2] = {};
    for (const bool both_ways : {false, true}) {
      std::vector<int64_t> times;
      for (int run = 0; run < 1 + repeats; ++run) {  // the first run warms up
        TUTEL_ASSIGN_OR_RETURN(int64_t ns, p2p_run(*pair, rank, both_ways, size, window,
                                                   send_buffer.data(), recv_buffer.data()));
        if (run > 0) times.push_back(ns);
      }
      median_ns[both_ways] = median(times);
    }
    const uint8_t want = static_cast<uint8_t>(2 - rank);  // the peer's rank + 1
    if (recv_buffer.front() != want || recv_buffer.back() != want)
      return Status::Corruption("p2p: rank " + std::to_string(rank) +
                                " received bytes its peer did not send");
    if (rank == 0)
      report.line("p2p " + std::to_string(size) + " " + std::to_string(repeats) + " " +
                  std::to_string(median_ns[0]) + " " + std::to_string(median_ns[1]) + " " +
                  std::to_string(window * size));
  }
  return Status::OK();
}

// The `peer` transport's ceiling: process_vm_readv between two forked processes, rank 0 reading
// `window` messages of `size` bytes out of rank 1's memory (one way), then both reading each
// other's at once (both ways). Rank 0 reports a "p2p ..." line, as p2p_rank does.
Status peer_read_rank(int rank, uint16_t port, const std::vector<size_t>& sizes, int repeats,
                      const ReportPipe& report) {
  TUTEL_ASSIGN_OR_RETURN(auto comm, comm::ucx_bootstrap(loopback_options(port, rank, 2, 1)));
  for (const size_t size : sizes) {
    ::alarm(kPointGuardSeconds);
    const size_t window = std::clamp<size_t>(kP2pBytesPerRun / size, 1, kP2pWindow);
    std::vector<uint8_t> mine(window * size, static_cast<uint8_t>(rank + 1)), into(window * size, 0);
    struct Where {
      int64_t pid;
      uint64_t address;
    };
    const Where me{::getpid(), reinterpret_cast<uint64_t>(mine.data())};
    Where both[2];
    TUTEL_RETURN_IF_ERROR(comm->all_gather(&me, both, sizeof me));
    const Where peer = both[1 - rank];
    int64_t median_ns[2] = {};
    for (const bool both_ways : {false, true}) {
      std::vector<int64_t> times;
      for (int run = 0; run < 1 + repeats; ++run) {  // the first run warms up
        TUTEL_RETURN_IF_ERROR(comm->barrier());
        const auto t0 = Clock::now();
        if (rank == 0 || both_ways) {
          for (size_t m = 0; m < window; ++m) {
            size_t done = 0;
            while (done < size) {
              iovec local{into.data() + m * size + done, size - done};
              iovec remote{reinterpret_cast<void*>(peer.address + m * size + done), size - done};
              const ssize_t n = ::process_vm_readv(static_cast<pid_t>(peer.pid), &local, 1, &remote, 1, 0);
              if (n <= 0)
                return Status::Unavailable("process_vm_readv of rank " + std::to_string(1 - rank) +
                                                  "'s memory failed: " + std::strerror(errno));
              done += static_cast<size_t>(n);
            }
          }
        }
        int64_t ns = elapsed_ns(t0);
        TUTEL_RETURN_IF_ERROR(comm->all_reduce(&ns, 1, comm::ReduceOp::kMax));
        if (run > 0) times.push_back(ns);
      }
      median_ns[both_ways] = median(times);
    }
    const uint8_t want = static_cast<uint8_t>(2 - rank);
    if (into.front() != want || into.back() != want)
      return Status::Corruption("peer memory: rank " + std::to_string(rank) + " read bytes its peer does not hold");
    if (rank == 0)
      report.line("p2p " + std::to_string(size) + " " + std::to_string(repeats) + " " +
                  std::to_string(median_ns[0]) + " " + std::to_string(median_ns[1]) + " " +
                  std::to_string(window * size));
  }
  return Status::OK();
}

// ---------------------------------------------------------------------------------------------
// The all-to-all.

// The byte rank `src` puts in every position of its chunk for rank `dst`.
uint8_t chunk_byte(int src, int dst) { return static_cast<uint8_t>((src * 131 + dst) * 37 + 11); }

// One rank of a group of `ranks`: a forked process whose peers are all over UCX (exchange null),
// or one of the group's threads in one process, all bootstrapped with the same `exchange`, whose
// peers must then all be same_process. Per size, per algorithm, warm-up runs, then timed runs
// each after a barrier; the time of a run is the slowest rank's; every chunk is checked. Rank 0
// reports "a2a <ranks> <requested size> <size> <algo> <runs> <median ns>".
Status a2a_rank(int rank, int ranks, uint16_t port, const std::vector<size_t>& sizes, int repeats,
                int spin_us, const std::shared_ptr<comm::LocalExchange>& exchange, bool peer_memory,
                const ReportPipe& report) {
  const int local_size = ranks % kRanksPerNode == 0 ? kRanksPerNode : 1;
  comm::BootstrapOptions options = loopback_options(port, rank, ranks, local_size, spin_us);
  options.local_exchange = exchange;
  options.peer_memory = peer_memory;
  TUTEL_ASSIGN_OR_RETURN(auto comm, comm::ucx_bootstrap(options));
  if (peer_memory) {
    for (const comm::PeerStatus& peer : comm->peers())
      if (!peer.peer_memory)
        return Status::Unavailable(
            "rank " + std::to_string(rank) + " cannot read rank " + std::to_string(peer.rank) +
            "'s memory (process_vm_readv refused: Yama ptrace_scope or a container?), so the `peer` "
            "numbers would be tcp's");
  }
  if (exchange != nullptr) {
    for (const comm::PeerStatus& peer : comm->peers())
      if (!peer.same_process)
        return Status::Internal("rank " + std::to_string(rank) + " reaches rank " +
                                std::to_string(peer.rank) + " (" + peer.address +
                                ") over UCX, not through the shared LocalExchange: the "
                                "`memory` numbers would not be memcpy's");
  }
  std::vector<comm::AllToAllAlgo> algos = {comm::AllToAllAlgo::kLinear};
  if (local_size > 1 && local_size < ranks) algos.push_back(comm::AllToAllAlgo::k2DH);

  for (const size_t requested : sizes) {
    ::alarm(kPointGuardSeconds);
    const size_t chunk = requested / static_cast<size_t>(ranks);
    if (chunk == 0) continue;
    const size_t bytes = chunk * static_cast<size_t>(ranks);
    std::vector<uint8_t> send(bytes), recv(bytes, 0);
    for (int d = 0; d < ranks; ++d)
      std::memset(send.data() + d * chunk, chunk_byte(rank, d), chunk);

    for (const comm::AllToAllAlgo algo : algos) {
      // Not what any chunk should hold, so the check below fails unless this algorithm wrote.
      for (int src = 0; src < ranks; ++src)
        std::memset(recv.data() + src * chunk, static_cast<uint8_t>(~chunk_byte(src, rank)), chunk);
      auto one_run = [&]() -> Result<int64_t> {
        TUTEL_RETURN_IF_ERROR(comm->barrier());
        const auto t0 = Clock::now();
        TUTEL_RETURN_IF_ERROR(comm->all_to_all(send.data(), recv.data(), chunk, algo));
        return elapsed_ns(t0);
      };
      int64_t warm_ns = 0;
      for (int i = 0; i < (bytes < (size_t{1} << 20) ? 2 : 1); ++i) {
        TUTEL_ASSIGN_OR_RETURN(int64_t ns, one_run());
        warm_ns = std::max(warm_ns, ns);
      }
      // Every rank must run the same number of collectives: agree on the slowest warm-up.
      TUTEL_RETURN_IF_ERROR(comm->all_reduce(&warm_ns, 1, comm::ReduceOp::kMax));
      const int runs = choose_runs(repeats, warm_ns);
      std::vector<int64_t> times;
      for (int i = 0; i < runs; ++i) {
        TUTEL_ASSIGN_OR_RETURN(int64_t ns, one_run());
        times.push_back(ns);
      }
      TUTEL_RETURN_IF_ERROR(comm->all_reduce(times.data(), times.size(), comm::ReduceOp::kMax));

      for (int s = 0; s < ranks; ++s) {
        const uint8_t want = chunk_byte(s, rank);
        const uint8_t* got = recv.data() + s * chunk;
        if (!std::all_of(got, got + chunk, [want](uint8_t b) { return b == want; }))
          return Status::Corruption("all_to_all " + std::string(comm::to_string(algo)) + ": rank " +
                                    std::to_string(rank) + "'s chunk from rank " +
                                    std::to_string(s) + " is wrong");
      }
      if (rank == 0)
        report.line("a2a " + std::to_string(ranks) + " " + std::to_string(requested) + " " +
                    std::to_string(bytes) + " " + std::string(comm::to_string(algo)) + " " +
                    std::to_string(runs) + " " + std::to_string(median(times)));
    }
  }
  return Status::OK();
}

// The `memory` transport, all of it in one forked process: first the memcpy ceiling per size
// ("p2p" lines, as the UCX ceiling's), then each group size as that many threads sharing one
// LocalExchange. A group that fails is reported as "failed <ranks> a2a <why>" and the next one
// still runs.
Status memory_process(const std::vector<int>& rank_counts, const std::vector<size_t>& sizes,
                      int repeats, int spin_us, size_t llc_bytes, const ReportPipe& report) {
  bool ceiling_failed = false;
  std::string failed_groups;
  for (const size_t size : sizes) {
    ::alarm(kPointGuardSeconds);
    const Result<CopyCeiling> ceiling = measure_copy_ceiling(size, repeats, llc_bytes);
    if (!ceiling.ok()) {
      report.line("failed 2 memcpy " + ceiling.status().to_string());
      ceiling_failed = true;
      continue;
    }
    report.line("p2p " + std::to_string(size) + " " + std::to_string(repeats) + " " +
                std::to_string(ceiling->one_way_ns) + " " + std::to_string(ceiling->both_ways_ns) +
                " " + std::to_string(ceiling->bytes_per_run));
  }
  for (const int ranks : rank_counts) {
    ::alarm(kPointGuardSeconds);
    const uint16_t port = free_loopback_port();
    const auto exchange = std::make_shared<comm::LocalExchange>();
    const Status st = run_threads(ranks, [&](int rank) {
      return a2a_rank(rank, ranks, port, sizes, repeats, spin_us, exchange, false, report);
    });
    if (!st.ok()) {
      report.line("failed " + std::to_string(ranks) + " a2a " + st.to_string());
      failed_groups += " " + std::to_string(ranks);
    }
  }
  if (!ceiling_failed && failed_groups.empty()) return Status::OK();
  return Status::Aborted(
      std::string(ceiling_failed ? "the memcpy ceiling failed; " : "") +
      (failed_groups.empty() ? "" : "groups of" + failed_groups + " ranks failed") +
      " (their rows say why)");
}

// ---------------------------------------------------------------------------------------------
// The table.

struct Plan {
  std::vector<int> rank_counts;
  std::vector<const Transport*> transports;
  std::vector<size_t> sizes;
  int repeats = 0;
  int spin_us = -1;
};

// The parsed options, or a message saying which one is wrong.
Result<Plan> make_plan(const A2aBenchOptions& o) {
  Plan plan;
  plan.repeats = o.repeats;
  plan.spin_us = o.spin_us;
  for (const std::string& item : split_list(o.ranks)) {
    const int n = std::atoi(item.c_str());
    if (n < 2 || n > 64 || std::to_string(n) != item)
      return Status::InvalidArgument("--ranks '" + item +
                                     "': each must be a number of ranks, 2..64");
    plan.rank_counts.push_back(n);
  }
  for (const std::string& item : split_list(o.transports)) {
    const Transport* found = nullptr;
    for (const Transport& t : kTransports)
      if (t.name == item) found = &t;
    if (found == nullptr)
      return Status::InvalidArgument("--transports '" + item + "': use memory, peer, shm, sm or tcp");
    plan.transports.push_back(found);
  }
  for (const std::string& item : split_list(o.sizes)) {
    const auto bytes = parse_bytes(item);
    if (!bytes || *bytes > (size_t{1} << 30))
      return Status::InvalidArgument("--sizes '" + item +
                                     "': use bytes or KiB/MiB/GiB, up to 1 GiB (e.g. 4KiB,64MiB)");
    plan.sizes.push_back(*bytes);
  }
  if (plan.rank_counts.empty() || plan.transports.empty() || plan.sizes.empty() || o.repeats < 1)
    return Status::InvalidArgument(
        "nothing to run: give --ranks, --transports and --sizes, and --repeats >= 1");
  return plan;
}

// How busy the cores are without us (none of our ranks runs when it is called): the share of
// non-idle time in /proc/stat over a short sample; negative when unknown.
double cores_busy_elsewhere() {
  auto sample = [](uint64_t* idle, uint64_t* total) {
    FILE* f = std::fopen("/proc/stat", "r");
    if (f == nullptr) return false;
    uint64_t v[8] = {};
    const int n = std::fscanf(f,
                              "cpu %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64 " %" SCNu64
                              " %" SCNu64 " %" SCNu64 " %" SCNu64,
                              &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    std::fclose(f);
    if (n != 8) return false;
    *idle = v[3] + v[4];  // idle + iowait
    *total = 0;
    for (uint64_t x : v) *total += x;
    return true;
  };
  uint64_t idle0, total0, idle1, total1;
  if (!sample(&idle0, &total0)) return -1;
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  if (!sample(&idle1, &total1) || total1 <= total0) return -1;
  return 1.0 - static_cast<double>(idle1 - idle0) / static_cast<double>(total1 - total0);
}

// "12 % busy" plus a warning when others' load makes the numbers unreliable.
std::string describe_busy(double busy) {
  if (busy < 0) return "unknown (no /proc/stat)";
  char buf[160];
  std::snprintf(buf, sizeof buf, "%.0f %% busy over 0.5 s%s", busy * 100,
                busy > kBusyWarning ? "  WARNING: other processes are using the cores; the "
                                      "numbers are not reliable"
                                    : "");
  return buf;
}

void print_preamble(const Plan& plan, int cores, double busy, size_t llc_bytes) {
  std::printf(
      "tutel-bench a2a: the communicator's all-to-all between ranks on this machine: %d cores, "
      "last-level cache %s, UCX_NET_DEVICES=lo\n",
      cores, format_bytes(llc_bytes).c_str());
  std::printf(
      "  ranks      shm, sm, tcp: forked processes, one a rank, exchanging over UCX (peer memory off);  peer: the same over tcp,\n"
      "             messages of %s and more pulled from the sender's memory (process_vm_readv);  memory: "
      "threads of one forked process, one a rank, all\n"
      "             bootstrapped with one LocalExchange (every peer same_process, checked): each "
      "message is one memcpy into the receiver's buffer\n"
      "  size       per-rank send buffer: `ranks` chunks of size/ranks bytes (chunk i goes to "
      "rank i); the receive buffer is as large\n"
      "  time       all-to-all rows: median over runs of the slowest rank's all-to-all, each run "
      "started by a barrier (after 1-2 warm-up runs);\n"
      "             every chunk received is checked;  p2p/memcpy rows: one message (copy) one "
      "way (a run's time / the messages in it)\n"
      "  algbw      size / time;  busbw = algbw * (ranks-1)/ranks, what a rank sends to the "
      "others per second;  1 GB/s = 1e9 B/s, 1 MB/s = 1e6 B/s\n"
      "  p2p        the ceiling, measured first in the same run: raw UCX tag sends, rank 0 -> "
      "rank 1 of a pair alone, same UCX_TLS,\n"
      "             messages of `size` bytes back to back (up to %zu in flight, ~%s a run), "
      "median of --repeats runs\n"
      "  p2p 2-way  the same with rank 1 sending back at once: per-direction bandwidth of an "
      "exchange (what each rank of an all-to-all does)\n"
      "  memcpy     memory's ceiling, in the p2p columns, measured first in the same process: "
      "thread 0 copies `size` bytes from its buffer into\n"
      "             thread 1's (each thread allocated and first touched its own), up to %zu "
      "copies back to back (~%s a run) of the same\n"
      "             buffers; sizes over the %s last-level cache: one copy a run, after a read "
      "sweep of %s that evicts both buffers;\n"
      "             2-way: thread 1 copies its buffer into thread 0's at the same time "
      "(per-direction bandwidth); median of --repeats runs\n"
      "  readv      peer's ceiling, in the p2p columns: rank 0 reads `size`-byte messages out of rank 1's memory with process_vm_readv,\n"
      "             as many and as large as p2p's; 2-way: both read each other's at once (per-direction bandwidth)\n"
      "  target     linear at size >= %s: busbw / p2p (memory: busbw / memcpy one way; peer: busbw / readv one way) >= "
      "%.2f\n"
      "  2dh        %d ranks per node; run where that divides `ranks` into more than one node\n",
      format_bytes(comm::kPeerMemoryMinBytes).c_str(), kP2pWindow, format_bytes(kP2pBytesPerRun).c_str(), kCopiesPerRun,
      format_bytes(kCopyBytesPerRun).c_str(), format_bytes(llc_bytes).c_str(),
      format_bytes(2 * llc_bytes).c_str(), format_bytes(kLargeBytes).c_str(), kTargetRatio,
      kRanksPerNode);
  std::printf(
      "  spin       the communicator busy-polls %s before it sleeps on its event fd "
      "(--spin-us)\n",
      plan.spin_us >= 0 ? (std::to_string(plan.spin_us) + " us").c_str() : "its default 50 us");
  std::printf("  cores      before the run, without the bench: %s\n", describe_busy(busy).c_str());
  std::printf("  transports");
  for (const Transport* t : plan.transports) {
    if (t->in_process)
      std::printf(" %.*s: LocalExchange (UCX_TLS=%s carries only give-up notices);",
                  static_cast<int>(t->name.size()), t->name.data(), t->ucx_tls);
    else if (t->peer_memory)
      std::printf(" %.*s: UCX_TLS=%s and process_vm_readv;", static_cast<int>(t->name.size()), t->name.data(),
                  t->ucx_tls);
    else
      std::printf(" %.*s: UCX_TLS=%s;", static_cast<int>(t->name.size()), t->name.data(),
                  t->ucx_tls);
  }
  std::printf("\n");
  bool oversubscribed = false;
  for (int n : plan.rank_counts) oversubscribed |= n > cores;
  if (oversubscribed)
    std::printf(
        "  NOTE       ranks marked * outnumber the %d cores (oversubscribed): the ranks "
        "take turns on the cores, so their numbers are lower than with a core each\n",
        cores);
  std::printf("\n");
}

constexpr const char* kRowFormat = "%-6s %-9s %-6s %8s %5s %11s %14s %14s %14s %14s %9s  %s\n";

struct P2pCeiling {
  double one_way_bps = 0;
  double both_ways_bps = 0;  // per direction
};

// Records and prints rank 0's "p2p ..." line: the ceiling row, named `kind` ("p2p", "memcpy").
void parse_p2p_row(const std::string& line, const std::string& transport, const char* kind,
                   std::map<size_t, P2pCeiling>& p2p) {
  size_t size = 0, bytes = 0;
  int runs = 0;
  int64_t one_ns = 0, both_ns = 0;
  if (std::sscanf(line.c_str(), "p2p %zu %d %" SCNd64 " %" SCNd64 " %zu", &size, &runs, &one_ns,
                  &both_ns, &bytes) != 5 ||
      one_ns <= 0 || both_ns <= 0 || bytes < size)
    return;
  const P2pCeiling c{static_cast<double>(bytes) / (static_cast<double>(one_ns) * 1e-9),
                     static_cast<double>(bytes) / (static_cast<double>(both_ns) * 1e-9)};
  p2p[size] = c;
  const double per_message = static_cast<double>(one_ns) * 1e-9 / static_cast<double>(bytes / size);
  std::printf(kRowFormat, "2", transport.c_str(), kind, format_bytes(size).c_str(),
              std::to_string(runs).c_str(), format_seconds(per_message).c_str(), "-", "-",
              format_gbps(c.one_way_bps).c_str(), format_gbps(c.both_ways_bps).c_str(), "-", "");
  std::fflush(stdout);
}

// One table row from rank 0's "a2a ..." line; ranks beyond `cores` are marked *.
void print_a2a_row(const std::string& line, int cores, const std::string& transport,
                   const std::map<size_t, P2pCeiling>& p2p) {
  size_t requested = 0, bytes = 0;
  char algo[16] = {};
  int ranks = 0, runs = 0;
  int64_t ns = 0;
  if (std::sscanf(line.c_str(), "a2a %d %zu %zu %15s %d %" SCNd64, &ranks, &requested, &bytes, algo,
                  &runs, &ns) != 6 ||
      ranks < 2 || ns <= 0)
    return;
  const std::string label = std::to_string(ranks) + (ranks > cores ? "*" : "");
  const double seconds = static_cast<double>(ns) * 1e-9;
  const double algbw = static_cast<double>(bytes) / seconds;
  const double busbw = algbw * (ranks - 1) / ranks;
  std::string one_way = "-", both_ways = "-", ratio_text = "-", verdict;
  if (const auto it = p2p.find(requested); it != p2p.end()) {
    const double ratio = busbw / it->second.one_way_bps;
    one_way = format_gbps(it->second.one_way_bps);
    both_ways = format_gbps(it->second.both_ways_bps);
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.2f", ratio);
    ratio_text = buf;
    if (std::string_view(algo) == "linear" && bytes >= kLargeBytes) {
      std::snprintf(buf, sizeof buf, "(target >= %.2f: %s)", kTargetRatio,
                    ratio >= kTargetRatio ? "met" : "MISSED");
      verdict = buf;
    }
  }
  std::printf(kRowFormat, label.c_str(), transport.c_str(), algo, format_bytes(bytes).c_str(),
              std::to_string(runs).c_str(), format_seconds(seconds).c_str(),
              format_gbps(algbw).c_str(), format_gbps(busbw).c_str(), one_way.c_str(),
              both_ways.c_str(), ratio_text.c_str(), verdict.c_str());
  std::fflush(stdout);
}

void print_failed_row(const std::string& ranks_label, const std::string& transport,
                      std::string_view what, const std::string& why) {
  std::printf("%-6s %-9s %-6.*s failed: %s\n", ranks_label.c_str(), transport.c_str(),
              static_cast<int>(what.size()), what.data(), why.c_str());
  std::fflush(stdout);
}

}  // namespace

int run_a2a_bench(const A2aBenchOptions& options) {
  const Result<Plan> parsed = make_plan(options);
  if (!parsed.ok()) {
    std::fprintf(stderr, "tutel-bench a2a: %s\n", std::string(parsed.status().message()).c_str());
    return 2;
  }
  const Plan& plan = *parsed;
  // Before any fork, so no child can miss it: UCX must not leave loopback here.
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const int cores = static_cast<int>(std::thread::hardware_concurrency());
  const size_t llc_bytes = last_level_cache_bytes();
  const double t_start = now_seconds();
  print_preamble(plan, cores, cores_busy_elsewhere(), llc_bytes);
  std::printf(kRowFormat, "ranks", "transport", "algo", "size", "runs", "time", "algbw", "busbw",
              "p2p", "p2p 2-way", "busbw/p2p", "");

  int exit_code = 0;
  bool shm_failed = false;
  for (const Transport* transport : plan.transports) {
    const std::string tname(transport->name);
    std::map<size_t, P2pCeiling> p2p;  // by requested size
    const char* ceiling_kind = transport->in_process ? "memcpy" : transport->peer_memory ? "readv" : "p2p";
    auto on_line = [&](const std::string& line) {
      if (line.rfind("p2p ", 0) == 0) {
        parse_p2p_row(line, tname, ceiling_kind, p2p);
      } else if (line.rfind("a2a ", 0) == 0) {
        print_a2a_row(line, cores, tname, p2p);
      } else if (line.rfind("failed ", 0) == 0) {  // "failed <ranks> <what> <why>"
        char ranks[16] = {}, what[16] = {};
        int consumed = 0;
        if (std::sscanf(line.c_str(), "failed %15s %15s %n", ranks, what, &consumed) == 2)
          print_failed_row(ranks, tname, what, line.substr(static_cast<size_t>(consumed)));
        exit_code = 1;
      }
    };

    if (transport->in_process) {
      const Status st = run_ranks(
          1, transport->ucx_tls,
          [&](int, const ReportPipe& report) {
            return memory_process(plan.rank_counts, plan.sizes, plan.repeats, plan.spin_us,
                                  llc_bytes, report);
          },
          on_line, "process");
      if (!st.ok()) {
        print_failed_row("-", tname, "all", st.to_string());
        exit_code = 1;
      }
      continue;
    }

    const uint16_t p2p_port = free_loopback_port();
    const Status p2p_status = run_ranks(
        2, transport->ucx_tls,
        [&](int rank, const ReportPipe& report) {
          return transport->peer_memory ? peer_read_rank(rank, p2p_port, plan.sizes, plan.repeats, report)
                                        : p2p_rank(rank, p2p_port, plan.sizes, plan.repeats, report);
        },
        on_line);
    if (!p2p_status.ok()) {
      print_failed_row("2", tname, "p2p", p2p_status.to_string());
      exit_code = 1;
    }

    for (const int ranks : plan.rank_counts) {
      const uint16_t port = free_loopback_port();
      const Status st = run_ranks(
          ranks, transport->ucx_tls,
          [&](int rank, const ReportPipe& report) {
            return a2a_rank(rank, ranks, port, plan.sizes, plan.repeats, plan.spin_us, nullptr,
                            transport->peer_memory, report);
          },
          on_line);
      if (!st.ok()) {
        print_failed_row(std::to_string(ranks) + (ranks > cores ? "*" : ""), tname, "a2a",
                         st.to_string());
        shm_failed |= tname == "shm" || tname == "sm";
        exit_code = 1;
      }
    }
  }

  std::printf("\n");
  if (shm_failed)
    std::printf(
        "shared memory: the communicator's UCX endpoints ask for peer-failure handling "
        "(UCP_ERR_HANDLING_MODE_PEER), which UCX %s's\n  shared-memory transports do not "
        "provide (UCX says \"no peer failure handler\"), so it cannot connect with shared memory "
        "alone;\n  under the default UCX_TLS its messages go over tcp/lo. The p2p ceiling above "
        "does not ask for it, so it runs.\n",
        ucp_get_version_string());
  for (const int ranks : plan.rank_counts) {
    if (ranks % kRanksPerNode != 0)
      std::printf("2dh not run for %d ranks: %d ranks per node does not divide them\n", ranks,
                  kRanksPerNode);
    else if (ranks == kRanksPerNode)
      std::printf(
          "2dh not run for %d ranks: at %d ranks per node they are one node, where 2DH "
          "is the linear exchange\n",
          ranks, kRanksPerNode);
  }
  for (const size_t size : plan.sizes)
    for (const int ranks : plan.rank_counts)
      if (size < static_cast<size_t>(ranks))
        std::printf("size %s not run for %d ranks: less than one byte per chunk\n",
                    format_bytes(size).c_str(), ranks);
  const double elapsed = now_seconds() - t_start;
  std::printf("cores after the run, without the bench: %s\ntotal wall time: %.1f s\n",
              describe_busy(cores_busy_elsewhere()).c_str(), elapsed);
  return exit_code;
}

}  // namespace tutel::bench
