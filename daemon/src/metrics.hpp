// The daemon's counters, gauges and latency histograms, rendered in Prometheus text format.
// Thread-safety: every method may be called from any thread (one mutex; updates are a few
// map lookups per request, far below the cost of the request itself).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "process_stats.hpp"

namespace tutel::daemon {

class Metrics {
 public:
  // One finished request of `op` ("forward", "backward", "step", ...) on a layer.
  void record_request(const std::string& tenant, const std::string& layer, const std::string& op,
                      bool ok, double seconds, int64_t tokens = 0, int64_t dropped = 0);
  void set_capacity(const std::string& tenant, const std::string& layer, int64_t capacity);
  // Drops the series of a destroyed layer (its requests, errors, tokens, drops, capacity and
  // group state), so layers created and destroyed under new names do not grow them for good.
  void forget_layer(const std::string& tenant, const std::string& layer);
  void set_tenant_memory(const std::string& tenant, uint64_t bytes);
  // What the tenant's layers hold for forwards (pending entries, staging, workspaces).
  void set_tenant_activation_memory(const std::string& tenant, uint64_t bytes);
  void set_tenant_region_memory(const std::string& tenant, uint64_t bytes);
  void set_active_sessions(int64_t n);
  // A client session refused or closed before it could serve, by tenant ("" when the uid maps
  // to none) and reason: "no_tenant", "draining", "max_sessions", "secret", "hello_timeout".
  void count_session_refused(const std::string& tenant, const std::string& reason);
  void set_draining(bool draining);
  // A layer a periodic checkpoint round ([server] checkpoint_interval_s) took: "written",
  // "unchanged" (as its last checkpoint) or "failed"; and a round skipped, the last one still
  // writing.
  void count_checkpoint(const std::string& result);
  void count_checkpoint_round_skipped();
  // Whether the group of an expert-parallel layer ("tenant/layer") still answers.
  void set_peer_state(const std::string& group_layer, bool up);
  // State read from the live objects just before rendering (replaces the previous snapshot):
  // each cluster node's liveness, and each group layer's traffic per peer rank.
  struct PeerTraffic {
    uint64_t sent = 0, received = 0;
  };
  void set_live(std::map<int, bool> node_up,
                std::map<std::pair<std::string, int>, PeerTraffic> traffic);  // ("tenant/layer", rank)
  // Each local layer's plan cache by (tenant, layer), read just before rendering too; replaces
  // the previous snapshot so a destroyed layer's series go away with it.
  struct PlanCache {
    uint64_t bytes = 0, plans = 0, hits = 0, misses = 0, evictions = 0;
  };
  void set_plan_caches(std::map<std::pair<std::string, std::string>, PlanCache> caches);
  // Each layer's total wait for the layer or its device by (tenant, layer) (ServedLayer::
  // wait_seconds), read just before rendering too.
  void set_layer_waits(std::map<std::pair<std::string, std::string>, double> waits);
  // Each tuned group layer's decisions by ("tenant/layer", capacity bucket), read just before
  // rendering too: the parallelism, all-to-all and pipeline degree chosen for that bucket.
  struct TunerDecision {
    int r = 1;
    std::string all_to_all;
    int pipeline = 1;
  };
  void set_tuner_decisions(std::map<std::pair<std::string, int64_t>, TunerDecision> decisions);
  // Each rank's device ("cuda:0") and whether it is in service (rank_health.hpp), read just
  // before rendering too.
  void set_ranks(std::map<int, std::pair<std::string, bool>> ranks);
  // The seconds each tenant's work held each rank (FairLock::usage), by (rank, tenant), read
  // just before rendering too.
  void set_rank_busy(std::map<std::pair<int, std::string>, double> seconds);

  // The process's own resources (process_stats.hpp), read just before rendering too; nullopt
  // where /proc could not be read (their series are left out).
  void set_process(std::optional<ProcessStats> stats);

  std::string prometheus_text() const;

 private:
  // Latency buckets in seconds: 10 µs … 10 s.
  static constexpr std::array<double, 13> kBuckets = {1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3,
                                                      5e-3, 1e-2, 5e-2, 1e-1, 1.0, 10.0};
  struct Histogram {
    std::array<uint64_t, kBuckets.size()> counts{};
    uint64_t total = 0;
    double sum = 0;
  };
  using Key = std::tuple<std::string, std::string, std::string>;  // tenant, layer, op

  mutable std::mutex mutex_;
  std::map<Key, uint64_t> requests_, errors_;
  std::map<std::string, Histogram> latency_;  // by op
  std::map<std::pair<std::string, std::string>, uint64_t> tokens_, dropped_;
  std::map<std::pair<std::string, std::string>, int64_t> capacity_;
  std::map<std::string, uint64_t> tenant_memory_;
  std::map<std::string, uint64_t> tenant_activation_memory_;
  std::map<std::string, uint64_t> tenant_region_memory_;
  std::map<std::string, bool> peers_;
  std::map<int, bool> node_up_;
  std::map<std::pair<std::string, int>, PeerTraffic> traffic_;
  std::map<std::pair<std::string, std::string>, PlanCache> plan_caches_;
  std::map<std::pair<std::string, std::string>, double> layer_waits_;
  std::map<std::pair<std::string, int64_t>, TunerDecision> tuner_decisions_;
  std::map<int, std::pair<std::string, bool>> ranks_;
  std::map<std::pair<int, std::string>, double> rank_busy_;
  std::map<std::pair<std::string, std::string>, uint64_t> sessions_refused_;  // (tenant, reason)
  std::optional<ProcessStats> process_;
  std::map<std::string, uint64_t> periodic_checkpoints_;  // by result
  uint64_t checkpoint_rounds_skipped_ = 0;
  int64_t active_sessions_ = 0;
  bool draining_ = false;
};

}  // namespace tutel::daemon
