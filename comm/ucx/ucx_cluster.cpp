// The cluster over UCX: one UcxRank per daemon (its own worker: heartbeats never queue behind a
// group's collective), a join barrier, and a heartbeat thread.
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <utility>

#include "beacon.hpp"
#include "tutel/comm/cluster.hpp"
#include "tutel/core/logging.hpp"
#include "ucx_rank.hpp"

namespace tutel::comm {
namespace {

using ucx::Clock;
using ucx::Transfer;
using ucx::UcxRank;

std::string format_ms(Clock::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

class UcxCluster final : public Cluster {
 public:
  UcxCluster(std::shared_ptr<UcxRank> rank, const ClusterOptions& options)
      : rank_(std::move(rank)),
        options_(options),
        keys_{options.secret, rank_->table_digest()},
        check_(keys_, options.nodes),
        peers_(static_cast<size_t>(options.nodes)) {
    const auto now = Clock::now();
    for (Peer& p : peers_) p.last_heard = now;
  }

  ~UcxCluster() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
    }
    wake_.notify_all();
    if (thread_.joinable()) thread_.join();
    // Tell the others we leave on purpose, so they report a shutdown rather than a crash. The
    // rank's destructor flushes the endpoints, so these go out before the connections close.
    const std::string bye = next_beacon(ucx::BeaconKind::kBye);
    for (int p = 0; p < nodes(); ++p)
      if (p != node_rank()) (void)rank_->send_beacon(p, beacon_tag(), bye.data(), bye.size());
  }

  // Every pair of nodes exchanges one message: after this, all endpoints work both ways.
  Status join_barrier(Clock::time_point deadline) {
    const int me = rank_->rank();
    std::vector<Transfer> sends, recvs;
    char token = 0;
    std::vector<char> sink(peers_.size());
    for (int p = 0; p < nodes(); ++p) {
      if (p == me) continue;
      sends.push_back({p, ucx::kClusterJoinTag | static_cast<uint64_t>(me), &token, 1});
      recvs.push_back({p, ucx::kClusterJoinTag | static_cast<uint64_t>(p), &sink[static_cast<size_t>(p)], 1});
    }
    ucx::Notice no_notice;  // nobody to tell: a failed join fails every node on its own
    return rank_->exchange(sends, recvs, deadline, no_notice, Clock::duration::zero())
        .with_context("joining the cluster (node " + std::to_string(me) + ")");
  }

  void start() { thread_ = std::thread([this] { heartbeat_loop(); }); }

  int node_rank() const override { return rank_->rank(); }
  int nodes() const override { return static_cast<int>(peers_.size()); }

  std::vector<NodeStatus> status() const override {
    const auto now = Clock::now();
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<NodeStatus> out;
    for (int n = 0; n < nodes(); ++n) {
      const Peer& p = peers_[static_cast<size_t>(n)];
      NodeStatus& s = out.emplace_back();
      s.node = n;
      s.self = n == node_rank();
      s.address = s.self ? "self" : rank_->address(n);
      s.up = p.error.empty();
      s.error = p.error;
      if (!s.self)
        s.silent_for = std::chrono::duration_cast<std::chrono::milliseconds>(now - p.last_heard);
      s.heartbeats_sent = p.sent;
      s.heartbeats_received = p.received;
    }
    return out;
  }

 private:
  uint64_t beacon_tag() const { return ucx::kBeaconTag | static_cast<uint64_t>(node_rank()); }
  // This node's next beacon (beacon.hpp): the heartbeat thread's, then the destructor's.
  std::string next_beacon(ucx::BeaconKind kind) {
    return ucx::encode_beacon(keys_, node_rank(), kind, ++beacons_sent_);
  }

  struct Peer {
    Clock::time_point last_heard;
    uint64_t sent = 0, received = 0;
    std::string error;  // "" while up
    bool dead = false;  // its connection broke, or it left: it stays down
    bool left = false;  // it said goodbye (shut down on purpose)
  };

  // What one round of the heartbeat learnt, before it is applied under mu_.
  struct Round {
    bool drained = true;  // every beacon that had arrived was read
    std::vector<int> heard, leaving, sent;
    std::vector<std::pair<int, std::string>> broken;  // (node, why)
  };

  void heartbeat_loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stopping_) {
      lock.unlock();
      const Round round = exchange_beacons();
      lock.lock();
      apply(round, Clock::now());
      wake_.wait_for(lock, options_.heartbeat_interval, [this] { return stopping_; });
    }
  }

  // Without mu_ (it talks to the network): reads the beacons that arrived, then greets every
  // peer that is neither gone nor leaving.
  Round exchange_beacons() {
    const int me = node_rank();
    Round round;
    // Drain what arrived first, so a node that was itself stopped does not call everyone silent
    // on waking: their heartbeats are already queued.
    // For a quarter of the interval at most: a flood is left for later rounds rather than
    // holding this thread from its own heartbeats. A round that stopped there may not have
    // reached a peer's heartbeat yet, so it calls nobody silent (apply).
    round.drained = rank_->receive_beacons(
        ucx::kBeaconTag, ~ucx::kBeaconSenderMask, Clock::now() + options_.heartbeat_interval / 4,
        [&](uint64_t tag, std::string_view data) {
      const int sender = static_cast<int>(tag & ucx::kBeaconSenderMask);
      const std::optional<ucx::BeaconKind> kind = sender == me ? std::nullopt : check_.accept(sender, data);
      if (!kind) {
        // Not from a node of this cluster (another secret, a replay, a forgery): ignored, and
        // said once per claimed sender.
        ++rejected_total_;
        // (At most 64 claimed senders remembered: a tag may claim any of 2^20.)
        if (rejected_logged_.size() < 64 && rejected_logged_.insert(sender).second)
          TUTEL_LOG(WARN) << "cluster: ignoring a heartbeat that claims node " << sender
                          << " and does not prove it (another peer secret, a replay, or not a tuteld node)";
        return;
      }
      (*kind == ucx::BeaconKind::kBye ? round.leaving : round.heard).push_back(sender);
        });
    const std::string heartbeat = next_beacon(ucx::BeaconKind::kHeartbeat);
    for (int p = 0; p < nodes(); ++p) {
      if (p == me || std::find(round.leaving.begin(), round.leaving.end(), p) != round.leaving.end()) continue;
      {
        std::lock_guard<std::mutex> peers_lock(mu_);
        if (peers_[static_cast<size_t>(p)].left) continue;
      }
      std::string failure = rank_->failure(p);
      if (failure.empty()) {
        const Status s = rank_->send_beacon(p, beacon_tag(), heartbeat.data(), heartbeat.size());
        if (s.ok()) {
          round.sent.push_back(p);
        } else {
          failure = std::string(s.message());
        }
      }
      if (!failure.empty()) round.broken.emplace_back(p, rank_->describe(p) + " failed: " + failure);
    }
    return round;
  }

  // Under mu_: the peers' states after `round`.
  void apply(const Round& round, Clock::time_point now) {
    const int me = node_rank();
    auto valid = [&](int p) { return p >= 0 && p < nodes() && p != me; };
    for (int p : round.heard) {
      if (!valid(p)) continue;
      peers_[static_cast<size_t>(p)].last_heard = now;
      ++peers_[static_cast<size_t>(p)].received;
    }
    for (int p : round.sent) ++peers_[static_cast<size_t>(p)].sent;
    for (int p : round.leaving) {
      if (!valid(p)) continue;
      Peer& peer = peers_[static_cast<size_t>(p)];
      peer.dead = peer.left = true;
      peer.error = rank_->describe(p) + " left the cluster (its daemon shut down)";
      TUTEL_LOG(INFO) << "cluster: " << peer.error;
    }
    for (const auto& [p, why] : round.broken) {
      Peer& peer = peers_[static_cast<size_t>(p)];
      if (peer.left) continue;  // its connection closed because it left
      if (!peer.dead) TUTEL_LOG(WARN) << "cluster: " << why;
      peer.dead = true;
      peer.error = why;
    }
    if (!round.drained) {
      if (!flood_logged_)
        TUTEL_LOG(WARN) << "cluster: more beacons arrive than a round reads (" << rejected_total_
                        << " ignored so far): something floods this node's worker; nobody is called silent meanwhile";
      flood_logged_ = true;
      return;
    }
    flood_logged_ = false;
    for (int p = 0; p < nodes(); ++p) {
      Peer& peer = peers_[static_cast<size_t>(p)];
      if (p == me || peer.dead) continue;
      const auto silent = now - peer.last_heard;
      const bool was_up = peer.error.empty();
      if (silent > options_.peer_timeout) {
        peer.error = rank_->describe(p) + " sent no heartbeat for " + format_ms(silent) + " (timeout " +
                     format_ms(options_.peer_timeout) + "): stopped, hung or unreachable";
        if (was_up) TUTEL_LOG(WARN) << "cluster: " << peer.error;
      } else if (!was_up) {
        TUTEL_LOG(INFO) << "cluster: " << rank_->describe(p) << " answers again";
        peer.error.clear();
      }
    }
  }

  std::shared_ptr<UcxRank> rank_;
  const ClusterOptions options_;
  // The heartbeat thread's alone (and the destructor's, once it has joined the thread).
  const ucx::BeaconKeys keys_;
  ucx::BeaconCheck check_;
  uint64_t beacons_sent_ = 0;
  std::set<int> rejected_logged_;
  uint64_t rejected_total_ = 0;
  bool flood_logged_ = false;  // apply()'s, under mu_
  std::thread thread_;

  mutable std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;      // guarded by mu_
  std::vector<Peer> peers_;    // guarded by mu_ (its size is fixed)
};

}  // namespace

Status validate(const ClusterOptions& o) {
  if (o.nodes < 1 || o.nodes > static_cast<int>(ucx::kBeaconSenderMask))
    return Status::InvalidArgument("cluster: nodes " + std::to_string(o.nodes) +
                                   " is outside [1, " + std::to_string(ucx::kBeaconSenderMask) + "]");
  if (o.node_rank < 0 || o.node_rank >= o.nodes)
    return Status::InvalidArgument("cluster: node_rank " + std::to_string(o.node_rank) +
                                   " is outside [0, " + std::to_string(o.nodes) + ")");
  if (o.nodes > 1 && o.coordinator_port == 0)
    return Status::InvalidArgument("cluster: a coordinator port is required when nodes > 1");
  if (o.bootstrap_timeout.count() <= 0 || o.heartbeat_interval.count() <= 0)
    return Status::InvalidArgument("cluster: timeouts and intervals must be positive");
  if (o.peer_timeout <= o.heartbeat_interval)
    return Status::InvalidArgument("cluster: peer_timeout (" + std::to_string(o.peer_timeout.count()) +
                                   " ms) must exceed heartbeat_interval (" +
                                   std::to_string(o.heartbeat_interval.count()) + " ms)");
  return Status::OK();
}

Result<std::unique_ptr<Cluster>> join_cluster(const ClusterOptions& options) {
  TUTEL_RETURN_IF_ERROR(validate(options));
  const auto deadline = Clock::now() + options.bootstrap_timeout;
  BootstrapOptions b;
  b.coordinator_host = options.coordinator_host;
  b.coordinator_port = options.coordinator_port;
  b.rank = options.node_rank;
  b.size = options.nodes;
  b.local_size = 1;
  b.timeout = options.bootstrap_timeout;
  b.collective_timeout = options.peer_timeout;
  b.member = "node";
  b.secret = options.secret;
  TUTEL_ASSIGN_OR_RETURN(std::shared_ptr<UcxRank> rank, UcxRank::create(b));
  auto cluster = std::make_unique<UcxCluster>(std::move(rank), options);
  // At least a peer timeout for the barrier: the last node may reach the coordinator just
  // before the deadline.
  TUTEL_RETURN_IF_ERROR(
      cluster->join_barrier(std::max(deadline, Clock::now() + options.peer_timeout)));
  cluster->start();
  return std::unique_ptr<Cluster>(std::move(cluster));
}

}  // namespace tutel::comm
