#include "metrics.hpp"

#include <charconv>
#include <cstddef>
#include <sstream>
#include <utility>

namespace tutel::daemon {
namespace {

// Prometheus label values escape backslash, quote and newline.
std::string label(const std::string& v) {
  std::string out;
  for (char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out;
}

// A double in its shortest form that reads back exactly: a seconds counter keeps its
// microseconds past 10^5 s, where the stream's default 6 digits would round them to seconds.
std::string exact(double v) {
  char buf[32];
  const auto [end, ec] = std::to_chars(buf, buf + sizeof buf, v);
  return ec == std::errc() ? std::string(buf, end) : std::to_string(v);
}

}  // namespace

void Metrics::record_request(const std::string& tenant, const std::string& layer, const std::string& op,
                             bool ok, double seconds, int64_t tokens, int64_t dropped) {
  std::lock_guard lock(mutex_);
  const Key key{tenant, layer, op};
  ++requests_[key];
  if (!ok) ++errors_[key];
  Histogram& h = latency_[op];
  for (size_t i = 0; i < kBuckets.size(); ++i)
    if (seconds <= kBuckets[i]) ++h.counts[i];
  ++h.total;
  h.sum += seconds;
  if (tokens > 0) tokens_[{tenant, layer}] += tokens;
  if (dropped > 0) dropped_[{tenant, layer}] += dropped;
}

void Metrics::forget_layer(const std::string& tenant, const std::string& layer) {
  std::lock_guard lock(mutex_);
  for (auto* counts : {&requests_, &errors_})
    std::erase_if(*counts, [&](const auto& kv) { return std::get<0>(kv.first) == tenant && std::get<1>(kv.first) == layer; });
  for (auto* values : {&tokens_, &dropped_}) values->erase({tenant, layer});
  capacity_.erase({tenant, layer});
  peers_.erase(tenant + "/" + layer);
}

void Metrics::set_capacity(const std::string& tenant, const std::string& layer, int64_t capacity) {
  std::lock_guard lock(mutex_);
  capacity_[{tenant, layer}] = capacity;
}

void Metrics::set_tenant_memory(const std::string& tenant, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  tenant_memory_[tenant] = bytes;
}

void Metrics::set_tenant_activation_memory(const std::string& tenant, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  tenant_activation_memory_[tenant] = bytes;
}

void Metrics::set_tenant_region_memory(const std::string& tenant, uint64_t bytes) {
  std::lock_guard lock(mutex_);
  tenant_region_memory_[tenant] = bytes;
}

void Metrics::set_active_sessions(int64_t n) {
  std::lock_guard lock(mutex_);
  active_sessions_ = n;
}

void Metrics::count_session_refused(const std::string& tenant, const std::string& reason) {
  std::lock_guard lock(mutex_);
  ++sessions_refused_[{tenant, reason}];
}

void Metrics::count_checkpoint(const std::string& result) {
  std::lock_guard lock(mutex_);
  ++periodic_checkpoints_[result];
}

void Metrics::count_checkpoint_round_skipped() {
  std::lock_guard lock(mutex_);
  ++checkpoint_rounds_skipped_;
}

void Metrics::set_draining(bool draining) {
  std::lock_guard lock(mutex_);
  draining_ = draining;
}

void Metrics::set_peer_state(const std::string& peer, bool up) {
  std::lock_guard lock(mutex_);
  peers_[peer] = up;
}

std::string Metrics::prometheus_text() const {
  std::lock_guard lock(mutex_);
  std::ostringstream o;
  auto by_op = [&](const char* name, const char* help, const std::map<Key, uint64_t>& m) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " counter\n";
    for (const auto& [k, v] : m)
      o << name << "{tenant=\"" << label(std::get<0>(k)) << "\",layer=\"" << label(std::get<1>(k))
        << "\",op=\"" << label(std::get<2>(k)) << "\"} " << v << "\n";
  };
  by_op("tuteld_requests_total", "Requests finished, by tenant, layer and operation.", requests_);
  by_op("tuteld_errors_total", "Requests that failed, by tenant, layer and operation.", errors_);

  o << "# HELP tuteld_request_seconds Request latency inside the daemon, by operation.\n"
    << "# TYPE tuteld_request_seconds histogram\n";
  for (const auto& [op, h] : latency_) {
    for (size_t i = 0; i < kBuckets.size(); ++i)
      o << "tuteld_request_seconds_bucket{op=\"" << label(op) << "\",le=\"" << kBuckets[i] << "\"} "
        << h.counts[i] << "\n";
    o << "tuteld_request_seconds_bucket{op=\"" << label(op) << "\",le=\"+Inf\"} " << h.total << "\n"
      << "tuteld_request_seconds_sum{op=\"" << label(op) << "\"} " << exact(h.sum) << "\n"
      << "tuteld_request_seconds_count{op=\"" << label(op) << "\"} " << h.total << "\n";
  }
  auto by_layer = [&](const char* name, const char* type, const char* help, const auto& m) {
    o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n";
    for (const auto& [k, v] : m)
      o << name << "{tenant=\"" << label(k.first) << "\",layer=\"" << label(k.second) << "\"} " << v << "\n";
  };
  by_layer("tuteld_tokens_total", "counter", "Tokens processed by forward passes.", tokens_);
  by_layer("tuteld_dropped_assignments_total", "counter",
           "Token-to-expert assignments dropped for lack of capacity.", dropped_);
  by_layer("tuteld_capacity", "gauge", "Expert capacity of the layer's last forward.", capacity_);
  std::map<std::pair<std::string, std::string>, std::string> waits;
  for (const auto& [k, seconds] : layer_waits_) waits[k] = exact(seconds);
  by_layer("tuteld_layer_wait_seconds_total", "counter",
           "Time the layer's requests waited for the layer or its device before running (part of "
           "their tuteld_request_seconds).",
           waits);
  auto plan_cache = [&](const char* name, const char* type, const char* help,
                        uint64_t PlanCache::*field) {
    std::map<std::pair<std::string, std::string>, uint64_t> m;
    for (const auto& [k, c] : plan_caches_) m[k] = c.*field;
    by_layer(name, type, help, m);
  };
  plan_cache("tuteld_plan_cache_bytes", "gauge", "Device memory of the layer's cached plans.",
             &PlanCache::bytes);
  plan_cache("tuteld_plan_cache_plans", "gauge", "Plans the layer's cache holds (in use or idle).",
             &PlanCache::plans);
  plan_cache("tuteld_plan_cache_hits_total", "counter",
             "Plan lookups of forwards served by a cached plan.", &PlanCache::hits);
  plan_cache("tuteld_plan_cache_misses_total", "counter",
             "Plan lookups of forwards that had to build a plan.", &PlanCache::misses);
  plan_cache("tuteld_plan_cache_evictions_total", "counter",
             "Plans dropped for memory (the cache's budget or the tenant's quota).",
             &PlanCache::evictions);
  o << "# HELP tuteld_tenant_memory_bytes Parameters, gradients and optimizer state, by tenant.\n"
    << "# TYPE tuteld_tenant_memory_bytes gauge\n";
  for (const auto& [t, v] : tenant_memory_) o << "tuteld_tenant_memory_bytes{tenant=\"" << label(t) << "\"} " << v << "\n";
  // A gauge of its own rather than folded into tuteld_tenant_memory_bytes: that one moves only
  // when layers are created or destroyed and existing dashboards read it as the parameters;
  // this one moves with every training forward and backward. Their sum is what counts against
  // max_memory_bytes.
  o << "# HELP tuteld_tenant_activation_bytes Memory held for forwards (in-flight and recycled "
       "training forwards, staging, workspaces), by tenant.\n"
    << "# TYPE tuteld_tenant_activation_bytes gauge\n";
  for (const auto& [t, v] : tenant_activation_memory_)
    o << "tuteld_tenant_activation_bytes{tenant=\"" << label(t) << "\"} " << v << "\n";
  o << "# HELP tuteld_tenant_region_bytes Device regions clients map for zero-copy requests, by tenant.\n"
    << "# TYPE tuteld_tenant_region_bytes gauge\n";
  for (const auto& [t, v] : tenant_region_memory_)
    o << "tuteld_tenant_region_bytes{tenant=\"" << label(t) << "\"} " << v << "\n";
  o << "# HELP tuteld_active_sessions Client sessions connected.\n# TYPE tuteld_active_sessions gauge\n"
    << "tuteld_active_sessions " << active_sessions_ << "\n";
  // Refusals of the secret show attempts to use a tenant without it; an operator alerts on them.
  o << "# HELP tuteld_sessions_refused_total Client sessions refused or closed before serving, by "
       "tenant and reason.\n"
    << "# TYPE tuteld_sessions_refused_total counter\n";
  for (const auto& [k, v] : sessions_refused_)
    o << "tuteld_sessions_refused_total{tenant=\"" << label(k.first) << "\",reason=\"" << label(k.second) << "\"} "
      << v << "\n";
  // Every result shown from the start, at 0: an alert on "failed" needs the series there.
  o << "# HELP tuteld_periodic_checkpoints_total Layers a periodic checkpoint (server.checkpoint_interval_s) "
       "wrote, found unchanged since their last one, or failed to write.\n"
    << "# TYPE tuteld_periodic_checkpoints_total counter\n";
  for (const char* result : {"written", "unchanged", "failed"}) {
    const auto it = periodic_checkpoints_.find(result);
    o << "tuteld_periodic_checkpoints_total{result=\"" << result << "\"} "
      << (it == periodic_checkpoints_.end() ? 0 : it->second) << "\n";
  }
  o << "# HELP tuteld_periodic_checkpoint_rounds_skipped_total Periodic checkpoint rounds skipped because the "
       "round before was still writing.\n"
    << "# TYPE tuteld_periodic_checkpoint_rounds_skipped_total counter\n"
    << "tuteld_periodic_checkpoint_rounds_skipped_total " << checkpoint_rounds_skipped_ << "\n";
  if (process_) {
    // Prometheus's standard process series, by their standard names and help texts, so that the
    // dashboards made for any exporter show the daemon's.
    const ProcessStats& p = *process_;
    auto series = [&](const char* name, const char* type, const char* help, const std::string& value) {
      o << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n" << name << " " << value << "\n";
    };
    series("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
           exact(p.cpu_seconds));
    series("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
           exact(p.start_time_seconds));
    series("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", std::to_string(p.virtual_bytes));
    series("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
           std::to_string(p.resident_bytes));
    series("process_open_fds", "gauge", "Number of open file descriptors.", std::to_string(p.open_fds));
    series("process_max_fds", "gauge", "Maximum number of open file descriptors.", std::to_string(p.max_fds));
    series("tuteld_threads", "gauge", "Threads of the daemon's process.", std::to_string(p.threads));
  }
  o << "# HELP tuteld_draining 1 while the daemon drains (tutelctl drain): no new sessions or "
       "layers.\n"
    << "# TYPE tuteld_draining gauge\n"
    << "tuteld_draining " << (draining_ ? 1 : 0) << "\n";
  if (!ranks_.empty()) {
    o << "# HELP tuteld_rank_in_service 1 while a rank's device serves; 0 once it was lost (a sticky "
         "CUDA error), until tuteld restarts.\n"
      << "# TYPE tuteld_rank_in_service gauge\n";
    for (const auto& [rank, state] : ranks_)
      o << "tuteld_rank_in_service{rank=\"" << rank << "\",device=\"" << label(state.first) << "\"} "
        << (state.second ? 1 : 0) << "\n";
  }
  if (!rank_busy_.empty()) {
    o << "# HELP tuteld_rank_busy_seconds_total Time a rank was held for a tenant's work, by which "
         "the rank is shared fairly.\n"
      << "# TYPE tuteld_rank_busy_seconds_total counter\n";
    for (const auto& [k, seconds] : rank_busy_)
      o << "tuteld_rank_busy_seconds_total{rank=\"" << k.first << "\",tenant=\"" << label(k.second) << "\"} "
        << exact(seconds) << "\n";
  }
  if (!peers_.empty()) {
    o << "# HELP tuteld_group_up Whether the peers of an expert-parallel layer's group answer (by tenant/layer).\n"
      << "# TYPE tuteld_group_up gauge\n";
    for (const auto& [p, up] : peers_) o << "tuteld_group_up{layer=\"" << label(p) << "\"} " << (up ? 1 : 0) << "\n";
  }
  if (!node_up_.empty()) {
    o << "# HELP tuteld_node_up Whether a node of the cluster answers (1 for this node itself).\n"
      << "# TYPE tuteld_node_up gauge\n";
    for (const auto& [node, up] : node_up_) o << "tuteld_node_up{node=\"" << node << "\"} " << (up ? 1 : 0) << "\n";
  }
  if (!traffic_.empty()) {
    for (const bool sent : {true, false}) {
      const char* name = sent ? "tuteld_peer_sent_bytes_total" : "tuteld_peer_received_bytes_total";
      o << "# HELP " << name << " Collective payload " << (sent ? "sent to" : "received from")
        << " each peer rank of an expert-parallel layer's group (by tenant/layer and peer rank).\n"
        << "# TYPE " << name << " counter\n";
      for (const auto& [k, t] : traffic_)
        o << name << "{layer=\"" << label(k.first) << "\",peer=\"" << k.second << "\"} " << (sent ? t.sent : t.received)
          << "\n";
    }
  }
  if (!tuner_decisions_.empty()) {
    o << "# HELP tuteld_group_tuner_decision 1 for the way the tuner chose to run an "
         "expert-parallel layer's forwards of a capacity bucket (by tenant/layer).\n"
      << "# TYPE tuteld_group_tuner_decision gauge\n";
    for (const auto& [k, d] : tuner_decisions_)
      o << "tuteld_group_tuner_decision{layer=\"" << label(k.first) << "\",capacity_bucket=\"" << k.second
        << "\",r=\"" << d.r << "\",all_to_all=\"" << label(d.all_to_all) << "\",pipeline=\"" << d.pipeline
        << "\"} 1\n";
  }
  return o.str();
}

void Metrics::set_tuner_decisions(std::map<std::pair<std::string, int64_t>, TunerDecision> decisions) {
  std::lock_guard lock(mutex_);
  tuner_decisions_ = std::move(decisions);
}

void Metrics::set_ranks(std::map<int, std::pair<std::string, bool>> ranks) {
  std::lock_guard lock(mutex_);
  ranks_ = std::move(ranks);
}

void Metrics::set_rank_busy(std::map<std::pair<int, std::string>, double> seconds) {
  std::lock_guard lock(mutex_);
  rank_busy_ = std::move(seconds);
}

void Metrics::set_live(std::map<int, bool> node_up, std::map<std::pair<std::string, int>, PeerTraffic> traffic) {
  std::lock_guard lock(mutex_);
  node_up_ = std::move(node_up);
  traffic_ = std::move(traffic);
}

void Metrics::set_plan_caches(std::map<std::pair<std::string, std::string>, PlanCache> caches) {
  std::lock_guard lock(mutex_);
  plan_caches_ = std::move(caches);
}

void Metrics::set_process(std::optional<ProcessStats> stats) {
  std::lock_guard lock(mutex_);
  process_ = std::move(stats);
}

void Metrics::set_layer_waits(std::map<std::pair<std::string, std::string>, double> waits) {
  std::lock_guard lock(mutex_);
  layer_waits_ = std::move(waits);
}

}  // namespace tutel::daemon
