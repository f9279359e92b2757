// The admin socket's requests (tutelctl) and the Prometheus endpoint.
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <system_error>
#include <utility>

#include "daemon_impl.hpp"
#include "guarded.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/ipc/json_body.hpp"

namespace tutel::daemon {

using nlohmann::json;

namespace {

// Where a group's ranks met: its coordinator's "<host>:<port>", or null for a group that met by
// name at the cluster's rendezvous service (it has no coordinator of its own).
json coordinator_json(const GroupConfig& g) {
  if (g.coordinator_port == 0) return nullptr;
  return g.coordinator_host + ":" + std::to_string(g.coordinator_port);
}

// A layer's plan cache; null for a group layer, which runs without one.
json plans_json(const ServedLayer::PlanSummary& summary) {
  if (summary.kind.empty()) return nullptr;
  const graphs::PlanCacheStats& c = summary.cache;
  return {{"kind", summary.kind},
          {"plans", c.plans},
          {"held", c.held},
          {"bytes", c.bytes},
          {"max_bytes", c.max_bytes},
          {"hits", c.hits},
          {"misses", c.misses},
          {"builds", c.builds},
          {"build_failures", c.build_failures},
          {"evictions", c.evictions},
          {"capacity_moves", c.capacity_moves}};
}

}  // namespace

json DaemonImpl::status_json() const {
  const double uptime = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_at_).count();
  // The ranks whose device was lost: why and since when (seconds ago, as uptime is given).
  json out_of_service = json::array();
  for (const auto& rank : ranks_)
    if (const std::optional<RankHealth::Loss> loss = rank->health.loss())
      out_of_service.push_back(
          {{"rank", loss->rank},
           {"device", loss->device},
           {"seconds_ago", std::chrono::duration<double>(std::chrono::system_clock::now() - loss->since).count()},
           {"error", loss->error}});
  return {{"version", TUTEL_VERSION},
          {"pid", static_cast<int64_t>(::getpid())},
          {"uptime_seconds", uptime},
          {"backend", config_.backend.kind},
          {"ranks", ranks_.size()},
          {"out_of_service", out_of_service},
          {"sessions", connected_clients()},
          {"layers", registry_->size()},
          {"tenants", config_.tenants.size()},
          {"client_socket", config_.server.client_socket},
          {"state_dir", config_.server.state_dir},
          {"metrics_listen", config_.server.metrics_listen},
          {"metrics_port", metrics_http_ ? metrics_http_->port() : 0},
          {"control_frames_queued_peak", queued_frames_peak_},
          {"control_reads_paused", reads_paused_},
          {"draining", draining_}};
}

// The cluster's nodes (null without [cluster]) and the groups of this daemon's layers, each
// with its other ranks: state, traffic, last error.
json DaemonImpl::peers_json() {
  json cluster = nullptr;
  if (cluster_) {
    const int ranks_per_node = config_.cluster->ranks_per_node;
    json nodes = json::array();
    for (const comm::NodeStatus& n : cluster_->status())
      nodes.push_back({{"node", n.node},
                       {"self", n.self},
                       {"address", n.address},
                       {"first_rank", n.node * ranks_per_node},
                       {"ranks", ranks_per_node},
                       {"state", n.up ? "up" : "down"},
                       {"silent_ms", n.silent_for.count()},
                       {"heartbeats_sent", n.heartbeats_sent},
                       {"heartbeats_received", n.heartbeats_received},
                       {"last_error", n.error}});
    cluster = {{"node_rank", cluster_->node_rank()}, {"nodes", nodes}};
  }
  json groups = json::array();
  std::vector<LayerRef> layers = layers_on_loop();
  for (const LayerRef& ref : layers) {
    const auto& g = ref.layer->definition().group;
    if (!g) continue;
    json peers = json::array();
    for (const comm::PeerStatus& p : ref.layer->group_peers())
      peers.push_back({{"rank", p.rank},
                       {"address", p.address},
                       {"via", p.same_process ? "memory" : p.peer_memory ? "ucx+peer-memory" : "ucx"},
                       {"state", p.failed ? "down" : "up"},
                       {"bytes_sent", p.bytes_sent},
                       {"bytes_received", p.bytes_received},
                       {"last_error", p.error}});
    const std::string error = ref.layer->group_error();
    // The tuner's dictionary: per capacity bucket, what it chose (or how far it measured), and
    // the group's agreed time of each candidate over the counted runs.
    json candidates = json::array(), tuner = json::array();
    for (const graphs::ExchangeConfig& c : ref.layer->group_tuner_candidates())
      candidates.push_back({{"r", c.r},
                            {"all_to_all", std::string(comm::to_string(c.algo))},
                            {"pipeline", c.pipeline}});
    for (const graphs::TunerEntry& e : ref.layer->group_tuner()) {
      json entry = {{"capacity_bucket", e.capacity_bucket},
                    {"state", e.decided ? "decided" : "measuring"},
                    {"rounds_done", e.rounds_done},
                    {"excluded", e.excluded},
                    {"restored", e.restored}};
      if (e.decided) {
        entry["r"] = e.chosen.r;
        entry["all_to_all"] = std::string(comm::to_string(e.chosen.algo));
        entry["pipeline"] = e.chosen.pipeline;
        entry["total_ns"] = e.total_ns;
      }
      tuner.push_back(std::move(entry));
    }
    groups.push_back(
        {{"tenant", ref.layer->tenant()},
         {"layer", ref.layer->name()},
         {"coordinator", coordinator_json(*g)},
         {"name", g->name.empty() ? json(nullptr) : json(g->name)},
         {"rank", g->rank},
         {"size", g->size},
         {"r", g->r ? json(*g->r) : json("auto")},
         {"all_to_all", g->all_to_all ? std::string(comm::to_string(*g->all_to_all)) : "auto"},
         {"pipeline", g->pipeline ? json(*g->pipeline) : json("auto")},
         {"tuner_candidates", candidates},
         {"tuner", tuner},
         {"state", error.empty() ? "up" : "down"},
         {"last_error", error},
         {"peers", peers}});
  }
  release_off_loop(std::move(layers));
  return {{"cluster", cluster}, {"groups", groups}};
}

std::string DaemonImpl::metrics_text() {
  std::map<int, bool> node_up;
  if (cluster_)
    for (const comm::NodeStatus& n : cluster_->status()) node_up[n.node] = n.up;
  // Each layer's live state: a group layer's traffic per peer, a local layer's plan cache.
  std::map<std::pair<std::string, int>, Metrics::PeerTraffic> traffic;
  std::map<std::pair<std::string, std::string>, Metrics::PlanCache> plan_caches;
  std::map<std::pair<std::string, int64_t>, Metrics::TunerDecision> decisions;
  std::map<std::pair<std::string, std::string>, double> waits;
  std::vector<LayerRef> layers = layers_on_loop();
  for (const LayerRef& ref : layers) {
    waits[{ref.layer->tenant(), ref.layer->name()}] = ref.layer->wait_seconds();
    for (const comm::PeerStatus& p : ref.layer->group_peers())
      traffic[{ref.layer->tenant() + "/" + ref.layer->name(), p.rank}] = {p.bytes_sent, p.bytes_received};
    for (const graphs::TunerEntry& e : ref.layer->group_tuner())
      if (e.decided)
        decisions[{ref.layer->tenant() + "/" + ref.layer->name(), e.capacity_bucket}] = {
            e.chosen.r, std::string(comm::to_string(e.chosen.algo)), e.chosen.pipeline};
    const ServedLayer::PlanSummary summary = ref.layer->plan_summary();
    if (summary.kind.empty()) continue;
    const graphs::PlanCacheStats& c = summary.cache;
    plan_caches[{ref.layer->tenant(), ref.layer->name()}] = {c.bytes, c.plans, c.hits, c.misses, c.evictions};
  }
  release_off_loop(std::move(layers));
  metrics_.set_live(std::move(node_up), std::move(traffic));
  metrics_.set_plan_caches(std::move(plan_caches));
  metrics_.set_layer_waits(std::move(waits));
  metrics_.set_tuner_decisions(std::move(decisions));
  std::map<int, std::pair<std::string, bool>> ranks;
  for (const auto& rank : ranks_) ranks[rank->index] = {rank->backend->device().to_string(), rank->health.in_service()};
  metrics_.set_ranks(std::move(ranks));
  std::map<std::pair<int, std::string>, double> busy;
  for (const auto& rank : ranks_)
    for (const FairLock::Usage& u : rank->lock.usage()) busy[{rank->index, u.tenant}] = static_cast<double>(u.held_ns) * 1e-9;
  metrics_.set_rank_busy(std::move(busy));
  Result<ProcessStats> process = read_process_stats();
  if (!process.ok()) TUTEL_LOG(WARN) << "metrics: the process's own series are left out: " << process.status();
  metrics_.set_process(process.ok() ? std::optional<ProcessStats>(*process) : std::nullopt);
  // Memory changes with requests, sessions and layers (whose parameters count until the last
  // request holding a destroyed one lets it go): read when scraped.
  for (const TenantConfig& t : config_.tenants) {
    metrics_.set_tenant_memory(t.name, registry_->memory_bytes(t.name));
    metrics_.set_tenant_activation_memory(t.name, registry_->activation_bytes(t.name));
    metrics_.set_tenant_region_memory(t.name, registry_->tenant_memory(t.name)->region_bytes());
  }
  return metrics_.prometheus_text();
}

void DaemonImpl::handle_admin_frame(const std::shared_ptr<Session>& s, ipc::Frame frame) {
  const uint32_t rid = frame.header.request_id;
  auto body = ipc::parse_body(frame);
  if (!body.ok()) {
    reply_error(s, rid, body.status());
    return finish_frame(s);
  }
  switch (static_cast<ipc::FrameType>(frame.header.type)) {
    case ipc::FrameType::kAdminStatus:
      reply(s, ipc::FrameType::kOk, rid, status_json());
      break;
    case ipc::FrameType::kAdminTenants: {
      json tenants = json::array();
      for (const TenantConfig& t : config_.tenants)
        tenants.push_back({{"name", t.name},
                           {"uids", t.uids},
                           {"gids", t.gids},
                           {"layers", registry_->layer_count(t.name)},
                           {"max_layers", t.max_layers},
                           {"memory_bytes", registry_->memory_bytes(t.name)},
                           {"activation_bytes", registry_->activation_bytes(t.name)},
                           {"pending_bytes", registry_->pending_bytes(t.name)},
                           {"region_bytes", registry_->tenant_memory(t.name)->region_bytes()},
                           {"max_memory_bytes", t.max_memory_bytes},
                           {"inflight", registry_->inflight(t.name)},
                           {"sessions", client_sessions(t.name, SessionState::kOpen)},
                           // They keep their max_sessions place (sessions_full): shown apart,
                           // so a refusal at "sessions" < "max_sessions" reads.
                           {"closing_sessions", client_sessions(t.name, SessionState::kClosing)},
                           {"max_sessions", t.max_sessions},
                           {"max_checkpoint_bytes", t.max_checkpoint_bytes},
                           {"max_inflight", t.max_inflight}});
      reply(s, ipc::FrameType::kOk, rid, {{"tenants", tenants}});
      break;
    }
    case ipc::FrameType::kAdminLayers: {
      json layers = json::array();
      std::vector<LayerRef> refs = layers_on_loop();
      for (const LayerRef& ref : refs) {
        const LayerSpec& spec = ref.layer->definition().spec;
        const RoutingStats st = ref.layer->last_stats();
        const auto& group = ref.layer->definition().group;
        layers.push_back(
            {{"group", group ? json{{"rank", group->rank},
                                    {"size", group->size},
                                    {"coordinator", coordinator_json(*group)},
                                    {"name", group->name.empty() ? json(nullptr) : json(group->name)}}
                             : json(nullptr)},
             {"tenant", ref.layer->tenant()},
             {"name", ref.layer->name()},
             {"handle", ref.handle},
             {"rank", ref.layer->rank_index()},
             {"experts", spec.experts},
             {"model_dim", spec.model_dim},
             {"hidden", spec.hidden},
             {"k", spec.k},
             {"capacity_factor", spec.capacity_factor},
             {"step", ref.layer->step_count()},
             {"memory_bytes", ref.layer->memory_bytes()},
             {"activation_bytes", ref.layer->activation_bytes()},
             {"pending_bytes", ref.layer->pending_bytes()},
             {"pending_backwards", ref.layer->pending_backwards()},
             {"plans", plans_json(ref.layer->plan_summary())},
             {"pinned", ref.layer->pinned()},
             {"capacity", st.capacity},
             {"dropped", st.dropped},
             {"l_aux", st.l_aux}});
      }
      release_off_loop(std::move(refs));
      reply(s, ipc::FrameType::kOk, rid, {{"layers", layers}});
      break;
    }
    case ipc::FrameType::kAdminPeers: {
      reply(s, ipc::FrameType::kOk, rid, peers_json());
      break;
    }
    case ipc::FrameType::kAdminMetrics:
      reply(s, ipc::FrameType::kOk, rid, {{"text", metrics_text()}});
      break;
    case ipc::FrameType::kAdminPin: {
      const json& b = *body;
      if (!b.contains("layer") || !b["layer"].is_string() || !b.contains("pinned") ||
          !b["pinned"].is_boolean()) {
        reply_error(s, rid,
                    Status::InvalidArgument(
                        "pin needs \"layer\" (tenant/name) and \"pinned\" (true or false)"));
        break;
      }
      auto ref = registry_->find_by_name(b["layer"].get<std::string>());
      Status st = ref.ok() ? ref->layer->set_pinned(b["pinned"].get<bool>()) : ref.status();
      if (!st.ok()) {
        reply_error(s, rid, st);
        break;
      }
      TUTEL_LOG(INFO) << "layer " << b["layer"].get<std::string>()
                      << (b["pinned"].get<bool>() ? " pinned" : " unpinned");
      reply(s, ipc::FrameType::kOk, rid, {{"layer", b["layer"]}, {"pinned", b["pinned"]}});
      break;
    }
    case ipc::FrameType::kAdminDestroy: {
      const json& b = *body;
      if (!b.contains("layer") || !b["layer"].is_string()) {
        reply_error(s, rid, Status::InvalidArgument("destroy needs \"layer\" (tenant/name)"));
        break;
      }
      const std::string name = b["layer"].get<std::string>();
      auto ref = registry_->find_by_name(name);
      if (!ref.ok()) {
        reply_error(s, rid,
                    ref.status().code() == StatusCode::kNotFound
                        ? Status::NotFound("no layer " + escape_text(name) + " to destroy (tutelctl layers lists them)")
                        : ref.status());
        break;
      }
      const std::string tenant = name.substr(0, name.find('/'));
      // The config's own layers come back at the next start, created afresh from its weights
      // or seed, while the destroy deletes their checkpoint: their training would be lost.
      if (std::any_of(config_.layers.begin(), config_.layers.end(), [&](const LayerDefinition& d) {
            return d.tenant == tenant && d.name == ref->layer->name();
          })) {
        reply_error(s, rid,
                    Status::InvalidArgument(
                        "layer " + escape_text(name) +
                        " is a [[layer]] of the config, which the next start would create afresh (its checkpoint, "
                        "with its training, goes with a destroy): take it out of the config and restart tuteld "
                        "first (it is then restored as a client's layer, which can be destroyed)"));
        break;
      }
      // In turn with the layer's control frames (a client's step, save, destroy): as a destroy
      // its client sent after them.
      const uint64_t handle = ref->handle;
      ref->layer.reset();  // no reference held while waiting: the destroy frees what it holds
      auto result = std::make_shared<Status>();
      run_layer_work(
          handle, [this, tenant, handle, result] { *result = guarded([&] { return destroy_layer(tenant, handle); }); },
          [this, s, rid, result, name] {
            if (result->ok()) {
              TUTEL_LOG(INFO) << "layer " << escape_text(name) << " destroyed by the operator (tutelctl destroy)";
              reply(s, ipc::FrameType::kOk, rid, {{"layer", name}});
            } else if (result->code() == StatusCode::kNotFound) {
              // Another destroy (a client's, or another operator's) came first.
              reply_error(s, rid, Status::NotFound("layer " + escape_text(name) + " was destroyed meanwhile"));
            } else {
              reply_error(s, rid, *result);
            }
            finish_frame(s);
          });
      return;
    }
    case ipc::FrameType::kAdminSessions: {
      json sessions = json::array();
      const auto now = std::chrono::steady_clock::now();
      for (const auto& [id, c] : sessions_) {
        if (c->admin || c->closing) continue;
        sessions.push_back(
            {{"id", id},
             {"tenant", c->tenant},
             {"pid", static_cast<int64_t>(c->peer.pid)},
             {"uid", static_cast<int64_t>(c->peer.uid)},
             {"client", c->client_name},
             {"connected_seconds", std::chrono::duration<double>(now - c->connected_at).count()},
             {"control_frames_waiting", c->queued.size()}});
      }
      reply(s, ipc::FrameType::kOk, rid, {{"sessions", sessions}});
      break;
    }
    case ipc::FrameType::kAdminDrain: {
      const json& b = *body;
      if (!b.contains("draining") || !b["draining"].is_boolean()) {
        reply_error(s, rid, Status::InvalidArgument("drain needs \"draining\" (true or false)"));
        break;
      }
      if (draining_ != b["draining"].get<bool>())
        TUTEL_LOG(INFO) << (b["draining"].get<bool>() ? "draining: no new sessions or layers"
                                                      : "no longer draining");
      draining_ = b["draining"].get<bool>();
      metrics_.set_draining(draining_);
      reply(s, ipc::FrameType::kOk, rid,
            {{"draining", draining_}, {"sessions", status_json()["sessions"]}});
      break;
    }
    case ipc::FrameType::kAdminCheckpoint: {
      const json& b = *body;
      if (!b.contains("layer") || !b["layer"].is_string() || !b.contains("path") || !b["path"].is_string()) {
        reply_error(s, rid, Status::InvalidArgument("checkpoint needs \"layer\" (tenant/name) and \"path\" strings"));
        break;
      }
      auto ref = registry_->find_by_name(b["layer"].get<std::string>());
      if (!ref.ok()) {
        reply_error(s, rid, ref.status());
        break;
      }
      // The admin socket is the operator's (mode 0600): its paths are taken as given, but for
      // state_dir's own files.
      auto layer = ref->layer;
      auto path = b["path"].get<std::string>();
      auto result = std::make_shared<Status>();
      offload(
          [this, layer, path, result] {
            // Off the loop, as the save: resolving the path reads the file system, which a hung
            // mount would not answer.
            *result = check_operator_checkpoint_path(path);
            if (!result->ok()) return;
            // (A failure to create them shows as the save's own.)
            (void)create_directories_durably(std::filesystem::path(path).parent_path());
            *result = guarded([&] { return layer->save(path); });
          },
              [this, s, rid, result, path] {
                if (result->ok()) reply(s, ipc::FrameType::kOk, rid, {{"path", path}});
                else reply_error(s, rid, *result);
                finish_frame(s);
              });
      return;
    }
    case ipc::FrameType::kHello:  // a client (train_toy, the client library) pointed here
      reply_error(s, rid, Status::InvalidArgument(
                              "this is tuteld's admin socket (" + config_.server.admin_socket +
                              "), for tutelctl; clients connect to its client_socket (" +
                              config_.server.client_socket + ")"));
      break;
    default:
      reply_error(s, rid, Status::InvalidArgument("frame type " +
                                                  std::string(ipc::frame_type_name(static_cast<ipc::FrameType>(frame.header.type))) +
                                                  " is not an admin request"));
  }
  finish_frame(s);
}

Status DaemonImpl::start_metrics_server() {
  metrics_http_ = std::make_unique<MetricsHttpServer>(&loop_, [this] { return metrics_text(); });
  if (Status st = metrics_http_->listen(config_.server.metrics_host, config_.server.metrics_port); !st.ok())
    return Status::Unavailable("cannot serve metrics on " + config_.server.metrics_listen + ": " + std::string(st.message()) +
                               "; pick another server.metrics_listen port, or \"\" to disable");
  TUTEL_LOG(INFO) << "metrics on http://" << config_.server.metrics_host << ":" << metrics_http_->port() << "/metrics";
  return Status::OK();
}

}  // namespace tutel::daemon
