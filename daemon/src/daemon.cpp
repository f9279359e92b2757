#include "tutel/daemon/daemon.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <limits>
#include <sstream>
#include <system_error>

#include "daemon_impl.hpp"
#include "socket_access.hpp"
#include "guarded.hpp"
#include "rank_thread_backend.hpp"
#include "tuning_record.hpp"
#include "tutel/comm/local_exchange.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/core/secret.hpp"
#include "tutel/ipc/json_body.hpp"

namespace tutel::daemon {

namespace fs = std::filesystem;
using nlohmann::json;

std::error_code create_directories_durably(const fs::path& dir) {
  std::vector<fs::path> missing;  // deepest first
  std::error_code ec;
  for (fs::path p = dir; !p.empty() && !fs::exists(p, ec) && !ec; p = p.parent_path()) {
    missing.push_back(p);
    if (p == p.parent_path()) break;
  }
  fs::create_directories(dir, ec);
  if (ec) return ec;
  for (const fs::path& p : missing) sync_directory(p.has_parent_path() ? p.parent_path() : fs::path("."));
  return {};
}

void sync_directory(const fs::path& dir) {
  if (const Status st = fsync_directory(dir.string()); !st.ok())
    TUTEL_LOG(WARN) << st.message() << " (a power loss may undo its last change)";
}

namespace {

// Where a tenant's clients save and load their files (the tenant's CheckpointQuota counts it).
fs::path client_checkpoints(const Config& c, const std::string& tenant) {
  return fs::path(c.server.state_dir) / tenant / "checkpoints";
}

// Moves the checkpoint `from` of layer `name` into the tenant's checkpoint directory `dir`, where a
// client can load it, as "<name>.<why>-<UTC time>[-<n>].safetensors" (`why`: "superseded" by
// another layer of the name, "left-out" at a restore); the new path. Never over another file.
Result<fs::path> move_aside(const fs::path& from, const fs::path& dir, const std::string& name, const char* why) {
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &utc);
  std::error_code ec;
  fs::path to;
  for (int n = 0; to.empty() || fs::exists(to, ec); ++n) {
    std::string file = name + "." + why + "-" + stamp;
    if (n > 0) file.append("-").append(std::to_string(n));
    to = dir / (file + ".safetensors");
  }
  ec = create_directories_durably(dir);
  if (!ec) fs::rename(from, to, ec);
  if (ec) return Status::IOError("cannot move " + from.string() + " aside to " + to.string() + ": " + ec.message());
  sync_directory(dir);
  sync_directory(from.parent_path());
  return to;
}

// Where a client's relative checkpoint path lands: inside its tenant's directory, never
// outside (nothing is created).
Result<std::string> tenant_file(const Config& c, const std::string& tenant, const std::string& relative) {
  if (c.server.state_dir.empty())
    return Status::Unavailable("the daemon has no server.state_dir configured, so it cannot save or load files for clients");
  // Control characters (a NUL would cut the path short in the C calls below it) are refused
  // rather than relied on to land somewhere harmless.
  for (const char ch : relative)
    if (static_cast<unsigned char>(ch) < 0x20 || ch == 0x7f)
      return Status::InvalidArgument("path '" + escape_text(relative) +
                                     "' contains control characters; name the file with printable characters");
  const fs::path p(relative);
  if (relative.empty())
    return Status::InvalidArgument("the path is empty: name a file in the tenant's checkpoint directory");
  if (p.is_absolute())
    return Status::InvalidArgument("path '" + relative + "' must be relative: it names a file in the tenant's checkpoint directory");
  size_t parts = 0;
  for (const auto& part : p) {
    if (part == "..") return Status::PermissionDenied("path '" + relative + "' may not contain '..'");
    ++parts;
  }
  // A save creates the directories its path names: a few levels are plenty, thousands (a path
  // of "a/a/a/...") would make each save spend the filesystem's inodes, which no byte quota sees.
  constexpr size_t kMaxPathParts = 8;
  if (parts > kMaxPathParts)
    return Status::InvalidArgument("path '" + relative + "' has " + std::to_string(parts) + " parts; at most " +
                                   std::to_string(kMaxPathParts) + " (directories and the file name)");
  // A file's name last: "a/", "a/." name a directory, which a save would first have made (its
  // directories are made before the file is written) and then failed on.
  if (const std::string last = p.filename().string(); last.empty() || last == ".")
    return Status::InvalidArgument("path '" + relative + "' names a directory; end it with the file's name");
  // The form of a save's temporary file is the daemon's: such files are not counted against
  // the quota (their save's reservation is), and are removed at start.
  if (is_safetensors_temp_name(p.filename().string()))
    return Status::InvalidArgument("path '" + relative + "' has the form of a temporary file (\".<name>.tmp-<16 hex "
                                   "digits>\"); choose another name");
  return (client_checkpoints(c, tenant) / p).string();
}

// Replies a session may leave unread: a client that sends requests and never reads the answers
// is closed beyond this, rather than the daemon's memory (or, as before, the event loop, which
// waited on its socket) paying for it.
constexpr size_t kMaxUnreadReplyBytes = size_t{4} << 20;
// Control frames a session may have waiting before its socket stops being read.
constexpr size_t kMaxQueuedFrames = 64;
// And at most this many bytes of their bodies (past it, one frame more): 64 frames of a megabyte
// each, times a tenant's sessions, held gigabytes no quota counts.
constexpr size_t kMaxQueuedBytes = size_t{1} << 20;
// A client request's body is a few fields and at most a layer spec (64 KiB at most, config.cpp's
// kMaxLayerSpecBytes, escaped into JSON: a newline takes two bytes): a larger one is refused
// unparsed. Parsed on the loop, a megabyte of JSON took tens of milliseconds from every session.
constexpr size_t kMaxClientRequestBody = size_t{160} << 10;

// Whether two weights files a layer was created from are one: the same file once links and ".."
// are resolved, or, where the first is gone, a file of the same name (a config's directory moved
// with its weights, the config naming them relative to itself).
bool same_weights_file(const std::string& before, const std::string& now) {
  std::error_code ec_before, ec_now;
  const fs::path a = fs::weakly_canonical(before, ec_before), b = fs::weakly_canonical(now, ec_now);
  if (!ec_before && !ec_now && a == b) return true;
  std::error_code ec;
  return !fs::exists(before, ec) && !ec && fs::path(before).filename() == fs::path(now).filename();
}

// Why a checkpoint of a layer created as `origin` (by a client: `by_client`) does not carry on the
// config's layer `def`, or nothing where it does: a config layer, started from the same weights (or
// seed), with tensors of the same shapes (the file loads into it). Routing, capacity and optimizer
// settings may differ: the layer takes def's.
std::optional<std::string> why_not_continued(const LayerDefinition& origin, bool by_client, const LayerDefinition& def) {
  const LayerSpec &a = origin.spec, &b = def.spec;
  auto changed = [](const char* key, int64_t x, int64_t y) -> std::optional<std::string> {
    if (x == y) return std::nullopt;
    return std::string("holds ") + key + " = " + std::to_string(x) + " where the config has " + std::to_string(y);
  };
  if (by_client) return "is of a layer a client created under that name";
  if (origin.group || def.group) return "is of a layer without [group] where the config has one, or the other way";
  if (origin.weights_path.has_value() != def.weights_path.has_value() || origin.init_seed != def.init_seed ||
      (origin.weights_path && !same_weights_file(*origin.weights_path, *def.weights_path)))
    return "is of a layer created from " +
           (origin.weights_path ? *origin.weights_path : "init_seed " + std::to_string(origin.init_seed.value_or(0))) +
           " where the config names " +
           (def.weights_path ? *def.weights_path : "init_seed " + std::to_string(def.init_seed.value_or(0)));
  for (auto why : {changed("experts", a.experts, b.experts), changed("model_dim", a.model_dim, b.model_dim),
                   changed("hidden", a.hidden, b.hidden), changed("output_dim", a.out_dim(), b.out_dim()),
                   changed("has_fc1_bias", a.has_fc1_bias, b.has_fc1_bias),
                   changed("has_fc2_bias", a.has_fc2_bias, b.has_fc2_bias)})
    if (why) return why;
  return std::nullopt;
}

Result<uint64_t> handle_of(const json& body) {
  TUTEL_ASSIGN_OR_RETURN(int64_t h, ipc::get_int(body, "handle"));
  if (h < 0) return Status::InvalidArgument("\"handle\" must be a layer handle, not " + std::to_string(h));
  return static_cast<uint64_t>(h);
}

json layer_info(const LayerRef& ref) {
  const LayerSpec& s = ref.layer->definition().spec;
  return {{"handle", ref.handle},         {"name", ref.layer->name()},   {"experts", s.experts},
          {"model_dim", s.model_dim},     {"hidden", s.hidden},          {"output_dim", s.out_dim()},
          {"k", s.k},                     {"step", ref.layer->step_count()},
          {"rank", ref.layer->rank_index()}, {"device", ref.layer->device().to_string()},
          {"state_bytes", ref.layer->save_bytes_bound()}, {"gate_noise", s.gate_noise}};
}

// The reply to kMapRegion: what the client needs to map the region (docs/protocol.md §7).
json region_info(const MappedRegion& m) {
  static constexpr char kHex[] = "0123456789abcdef";
  std::string handle;
  for (const unsigned char c : m.exported.handle) {
    handle += kHex[c >> 4];
    handle += kHex[c & 15];
  }
  json body{{"region", m.region->id()},         {"bytes", m.region->bytes()},
            {"rank", m.region->rank_index()},   {"kind", m.exported.kind},
            {"device", m.exported.device_id}};
  if (!handle.empty()) body["handle"] = handle;
  return body;
}

}  // namespace

DaemonImpl::DaemonImpl(Config config) : config_(std::move(config)) { uv_loop_init(&loop_); }

DaemonImpl::~DaemonImpl() {
  // Its thread wakes the loop through a handle closed below; from here a signal ends the process
  // (a teardown that hangs can still be stopped).
  if (signal_watcher_) signal_watcher_->release_loop(exit_code_);
  // A start-up that failed after binding leaves no socket behind (shutdown() removed them
  // otherwise; a socket we never bound is another daemon's and stays).
  if (client_fd_.valid()) ::unlink(config_.server.client_socket.c_str());
  if (admin_fd_.valid()) ::unlink(config_.server.admin_socket.c_str());
  // shutdown() closed every handle; a start-up that failed never ran it, so close here what it
  // opened (the listening polls: their descriptors are members and close themselves). Then run
  // the loop until the close callbacks have fired, or the loop cannot free its own memory.
  if (metrics_http_) metrics_http_->close();
  uv_walk(
      &loop_,
      [](uv_handle_t* h, void*) {
        if (!uv_is_closing(h)) uv_close(h, nullptr);
      },
      nullptr);
  uv_run(&loop_, UV_RUN_DEFAULT);
  if (const int rc = uv_loop_close(&loop_); rc != 0)
    TUTEL_LOG(WARN) << "the event loop did not close: " << uv_strerror(rc);
}

Status DaemonImpl::start() {
  started_at_ = std::chrono::steady_clock::now();
  TUTEL_ASSIGN_OR_RETURN(signal_watcher_, SignalWatcher::start());
  // Before anything on disk is touched: another daemon on these paths fails here.
  TUTEL_RETURN_IF_ERROR(lock_instance());
  TUTEL_RETURN_IF_ERROR(read_secrets());
  if (!config_.server.state_dir.empty())
    for (const TenantConfig& t : config_.tenants) {
      auto quota = std::make_unique<CheckpointQuota>(t.name, client_checkpoints(config_, t.name).string(),
                                                     t.max_checkpoint_bytes);
      // Saves the last run did not finish (killed): their temporary files would hold room.
      TUTEL_ASSIGN_OR_RETURN(const int64_t removed, quota->remove_interrupted_saves());
      if (removed > 0)
        TUTEL_LOG(INFO) << "removed " << removed << " temporary file(s) of unfinished saves of tenant " << t.name;
      checkpoint_quotas_[t.name] = std::move(quota);
      // And the exit checkpoints a killed run did not finish (a second signal used to kill it
      // mid-write): each the size of a layer's state, counted nowhere.
      const fs::path dir = fs::path(config_.server.state_dir) / t.name;
      std::error_code ec;
      std::vector<fs::path> stale;
      for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
        if (it->is_regular_file(ec) && is_safetensors_temp_name(it->path().filename().string()))
          stale.push_back(it->path());
      for (const fs::path& p : stale)
        if (fs::remove(p, ec)) TUTEL_LOG(INFO) << "removed " << p.string() << ", an exit checkpoint never finished";
    }
  // Layer creations at once: half of libuv's thread pool (main.cpp makes it 64 threads unless
  // UV_THREADPOOL_SIZE says otherwise; libuv's own default is 4).
  const char* pool = std::getenv("UV_THREADPOOL_SIZE");
  const int64_t pool_threads = pool != nullptr ? std::clamp<int64_t>(std::atoll(pool), 1, 1024) : 4;
  creation_slots_ = PoolShares(pool_threads / 2);
  uv_timer_init(&loop_, &accept_pause_);
  accept_pause_.data = this;
  // Sessions that never send their hello are closed after hello_timeout: checked a few times per
  // timeout, at most once a second.
  uv_timer_init(&loop_, &hello_sweep_);
  hello_sweep_.data = this;
  const uint64_t sweep_ms =
      static_cast<uint64_t>(std::clamp<int64_t>(config_.server.hello_timeout.count() / 4, 10, 1000));
  uv_timer_start(
      &hello_sweep_, [](uv_timer_t* t) { static_cast<DaemonImpl*>(t->data)->close_silent_sessions(); }, sweep_ms,
      sweep_ms);
  // Nothing is accepted until run() starts the loop, so clients wait for the restore.
  const ServerConfig& server = config_.server;
  TUTEL_RETURN_IF_ERROR(listen(server.client_socket, server.client_socket_mode, server.client_socket_gid, false,
                               &client_poll_, &client_fd_));
  TUTEL_RETURN_IF_ERROR(listen(server.admin_socket, 0600, std::nullopt, true, &admin_poll_, &admin_fd_));
  // Judged on the socket as it is (without client_socket_group, a setgid directory gives it the
  // directory's group, not the daemon's).
  if (const auto access = socket_access_of(server.client_socket))
    for (const std::string& warning : tenants_kept_out(*access, config_.tenants)) TUTEL_LOG(WARN) << warning;
  // Serve only as part of a complete cluster: the join fails naming the nodes that are missing.
  TUTEL_RETURN_IF_ERROR(join_cluster());
  TUTEL_RETURN_IF_ERROR(start_ranks());
  registry_ = std::make_unique<Registry>(config_.tenants, ranks_);
  for (const TenantConfig& t : config_.tenants)
    retired_regions_[t.name] = std::make_shared<RetiredRegions>(registry_->tenant_memory(t.name));
  TUTEL_RETURN_IF_ERROR(restore_state());
  if (const int64_t interval_s = config_.server.checkpoint_interval.count(); interval_s > 0) {
    uv_timer_init(&loop_, &checkpoint_timer_);
    checkpoint_timer_.data = this;
    const uint64_t interval_ms = static_cast<uint64_t>(interval_s) * 1000;
    // From now, not from the loop's start (the time the loop has cached): the restore before
    // may have outlasted an interval.
    uv_update_time(&loop_);
    uv_timer_start(
        &checkpoint_timer_, [](uv_timer_t* t) { static_cast<DaemonImpl*>(t->data)->start_checkpoint_round(); },
        interval_ms, interval_ms);
  }
  if (!config_.server.metrics_listen.empty()) TUTEL_RETURN_IF_ERROR(start_metrics_server());
  uv_async_init(&loop_, &worker_exits_, [](uv_async_t* h) { static_cast<DaemonImpl*>(h->data)->on_workers_exited(); });
  worker_exits_.data = this;
  // From here a signal shuts the daemon down (until now it ended the start-up as its default
  // action). Not SIGHUP: UCX's library takes it before main() runs (its debug signal,
  // UCX_DEBUG_SIGNO), which also hides whether the daemon was started ignoring it (nohup), so
  // SIGHUP neither stops nor kills tuteld.
  signal_watcher_->hand_to_loop(&loop_, [this](int signum) {
    if (shutting_down_) {
      TUTEL_LOG(WARN) << "signal " << signum << ": already shutting down (the layers are checkpointed on the "
                      << "way out; SIGKILL loses what is not written yet)";
      return;
    }
    TUTEL_LOG(INFO) << "signal " << signum << ": shutting down";
    shutdown();
  });
  TUTEL_LOG(INFO) << "tuteld serving on " << config_.server.client_socket << " (admin "
                  << config_.server.admin_socket << "), backend " << config_.backend.kind << " x"
                  << ranks_.size();
  return Status::OK();
}

Status DaemonImpl::read_secrets() {
  for (const TenantConfig& t : config_.tenants) {
    if (t.secret_file.empty()) continue;
    TUTEL_ASSIGN_OR_RETURN(const std::string secret,
                           read_secret_file(t.secret_file, "tenant '" + t.name + "' secret_file"));
    tenant_secrets_[t.name] = to_hex(secret);  // as the hello carries it
  }
  if (!config_.server.peer_secret_file.empty()) {
    TUTEL_ASSIGN_OR_RETURN(std::string secret,
                           read_secret_file(config_.server.peer_secret_file, "[server] peer_secret_file"));
    peer_secret_ = std::make_shared<const std::string>(std::move(secret));
  } else {
    // The default, so said once: a review's probe, another user's own tuteld naming this tenant,
    // joined a tenant's group and read half of its tokens.
    TUTEL_LOG(WARN) << "no [server] peer_secret_file: any process that reaches a group's coordinator or the "
                       "cluster's rendezvous service can join a group as a member and receive its tokens; set one "
                       "wherever the node's users or network are not all trusted (docs/config.md, Secrets)";
  }
  return Status::OK();
}

Status DaemonImpl::join_cluster() {
  if (!config_.cluster) return Status::OK();
  const ClusterConfig& c = *config_.cluster;
  comm::ClusterOptions o;
  o.coordinator_host = c.coordinator_host;
  o.coordinator_port = c.coordinator_port;
  o.node_rank = c.node_rank;
  o.nodes = c.nodes;
  o.bootstrap_timeout = c.bootstrap_timeout;
  o.heartbeat_interval = c.heartbeat_interval;
  o.peer_timeout = c.peer_timeout;
  if (peer_secret_) o.secret = *peer_secret_;
  TUTEL_LOG(INFO) << "joining the cluster as node " << c.node_rank << " of " << c.nodes << " (coordinator "
                  << c.coordinator_host << ":" << c.coordinator_port << ")";
  TUTEL_ASSIGN_OR_RETURN(cluster_, comm::join_cluster(o));
  TUTEL_LOG(INFO) << "cluster complete: " << c.nodes << " nodes";
  if (c.node_rank == 0) {
    comm::RendezvousOptions r;
    r.host = c.rendezvous_host;
    r.port = c.rendezvous_port;
    if (peer_secret_) r.secret = *peer_secret_;
    TUTEL_ASSIGN_OR_RETURN(rendezvous_, comm::RendezvousService::start(r));
    TUTEL_LOG(INFO) << "group rendezvous service on " << c.rendezvous_host << ":" << c.rendezvous_port;
  }
  return Status::OK();
}

std::shared_ptr<const GroupRendezvous> DaemonImpl::group_rendezvous() const {
  if (!config_.cluster) return nullptr;
  auto rv = std::make_shared<GroupRendezvous>();
  rv->host = config_.cluster->rendezvous_host;
  rv->port = config_.cluster->rendezvous_port;
  const comm::Cluster* cluster = cluster_.get();  // outlives the ranks (member order)
  const std::string where = rv->host + ":" + std::to_string(rv->port);
  rv->node0_status = [cluster, where]() -> Status {
    if (cluster == nullptr) return Status::OK();
    const std::vector<comm::NodeStatus> nodes = cluster->status();
    if (nodes.empty() || nodes[0].up) return Status::OK();
    return Status::Unavailable("node 0 of the cluster (" + nodes[0].address + ") is down (" + nodes[0].error +
                               "), and groups without a coordinator meet through its rendezvous service at " +
                               where + "; restart the cluster, or give the group a coordinator");
  };
  return rv;
}

Status DaemonImpl::start_ranks() {
  const BackendConfig& b = config_.backend;
  int threads = b.threads_per_rank;
  if (threads == 0) threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / b.ranks);
  // One for the whole daemon: the group layers of its ranks exchange through memory.
  auto local_exchange = std::make_shared<comm::LocalExchange>();
  const std::shared_ptr<const GroupRendezvous> rendezvous = group_rendezvous();
  for (int r = 0; r < b.ranks; ++r) {
    auto rank = std::make_unique<Rank>();
    rank->index = r;
    rank->local_exchange = local_exchange;
    rank->rendezvous = rendezvous;
    rank->stopping = stopping_;
    rank->abandon_collectives = abandon_collectives_;
    rank->peer_secret = peer_secret_;
    rank->options = BackendOptions{.threads = threads, .device_index = b.devices.empty() ? r : b.devices[r]};
    TUTEL_ASSIGN_OR_RETURN(rank->backend, make_backend(b.kind, rank->options));
    if (rank->backend->device().kind == DeviceKind::kCpu) {
      // One OpenMP master per CPU rank (rank_thread.hpp).
      rank->thread = std::make_unique<RankThread>("tuteld-rank" + std::to_string(r), config_.server.spin);
      rank->backend = std::make_unique<RankThreadBackend>(std::move(rank->backend), *rank->thread);
    }
    ranks_.push_back(std::move(rank));
  }
  return Status::OK();
}

Status DaemonImpl::lock_instance() {
  // Whether state_dir is new, judged before the sockets' directories are made: they may lie
  // inside it, and a state_dir made for them must still end up private.
  std::error_code exists_ec;
  const bool state_dir_existed =
      !config_.server.state_dir.empty() && fs::exists(config_.server.state_dir, exists_ec);
  const auto take = [this](const fs::path& path, const std::string& what) -> Status {
    std::error_code ec;
    fs::create_directories(path.parent_path(), ec);
    if (ec) return Status::IOError("cannot create the directory of " + path.string() + ": " + ec.message());
    auto lock = ProcessLock::acquire(path.string());
    if (!lock.ok()) {
      const std::string why(lock.status().message());
      if (lock.status().code() == StatusCode::kAlreadyExists)
        return Status::AlreadyExists("another tuteld is running with " + what + " (" + why +
                                     "); stop it, or give this one other paths");
      return Status(lock.status().code(), "cannot lock " + what + ": " + why);
    }
    instance_locks_.push_back(std::move(*lock));
    return Status::OK();
  };
  TUTEL_RETURN_IF_ERROR(take(config_.server.client_socket + ".lock", "client_socket " + config_.server.client_socket));
  TUTEL_RETURN_IF_ERROR(take(config_.server.admin_socket + ".lock", "admin_socket " + config_.server.admin_socket));
  if (config_.server.state_dir.empty()) return Status::OK();
  // Only once the sockets are this daemon's: one refused for them creates no state_dir.
  // Created private: it holds every tenant's weights and optimizer state. (One that exists
  // keeps the modes its operator gave it.)
  std::error_code ec;
  fs::create_directories(config_.server.state_dir, ec);
  if (ec) return Status::IOError("cannot create state_dir " + config_.server.state_dir + ": " + ec.message());
  if (!state_dir_existed)
    fs::permissions(config_.server.state_dir, fs::perms::owner_all, fs::perm_options::replace, ec);
  else if (struct stat st {}; ::stat(config_.server.state_dir.c_str(), &st) == 0 && (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    TUTEL_LOG(WARN) << "state_dir " << config_.server.state_dir << " is open to "
                    << ((st.st_mode & 070) != 0 && (st.st_mode & 07) != 0 ? "its group and others"
                        : (st.st_mode & 070) != 0                       ? "its group"
                                                                        : "others")
                    << " (mode " << mode << "), and it holds every tenant's weights and optimizer state: "
                    << "chmod 700 it unless they are meant to read them";
  }
  return take(fs::path(config_.server.state_dir) / kStateDirLockName, "state_dir " + config_.server.state_dir);
}

// state_dir/<tenant>/<layer>.safetensors holds each layer's parameters, optimizer state, step and
// spec; a restart brings every one of them back. (lock_instance() created state_dir.)
Result<std::vector<DaemonImpl::Checkpointed>> DaemonImpl::checkpointed_layers() const {
  std::vector<Checkpointed> found;
  if (config_.server.state_dir.empty()) return found;
  std::error_code ec;
  warn_of_unconfigured_tenants();
  for (const TenantConfig& t : config_.tenants) {
    const fs::path dir = fs::path(config_.server.state_dir) / t.name;
    // What cannot be read is an error naming it, never skipped: a layer left out here would be
    // created afresh and then checkpointed over its state at the next exit.
    auto unreadable = [](const fs::path& p, const std::error_code& e) {
      return Status::IOError("cannot read " + p.string() + " in state_dir: " + e.message() +
                             "; fix its permissions, or move it out of state_dir");
    };
    const bool is_dir = fs::is_directory(dir, ec);
    if (ec && ec != std::errc::no_such_file_or_directory) return unreadable(dir, ec);
    if (!is_dir && fs::exists(fs::symlink_status(dir, ec)))
      return Status::InvalidArgument(dir.string() + " in state_dir is not a directory: tenant '" + t.name +
                                     "' keeps its checkpoints there; move it out of state_dir");
    if (!is_dir) continue;
    // The whole listing first: a read error ends the iteration (it becomes the end) with ec set.
    std::vector<fs::directory_entry> entries;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) entries.push_back(*it);
    if (ec) return unreadable(dir, ec);
    for (const fs::directory_entry& entry : entries) {
      if (entry.path().extension() != ".safetensors") continue;
      const bool regular = entry.is_regular_file(ec);
      if (ec) return unreadable(entry.path(), ec);
      const std::string path = entry.path().string();
      if (!regular)
        return Status::InvalidArgument(path + " in state_dir is not a regular file (a directory, a FIFO, a device or "
                                              "a link to one); move it out of state_dir");
      Result<SafetensorsFile> opened = SafetensorsFile::open(path);
      if (!opened.ok())  // a damaged checkpoint stops the start: say how to start without it
        return opened.status().with_context("a layer's checkpoint in state_dir cannot be read; move " + path +
                                            " out of state_dir to start without that layer");
      SafetensorsFile file = std::move(opened).value();
      auto spec = file.metadata().find("tuteld.spec");
      if (spec == file.metadata().end())
        return Status::Corruption(path + ": no 'tuteld.spec' metadata; it was not written by tuteld, move it out of state_dir");
      Result<LayerDefinition> parsed = parse_layer_spec(spec->second, path);
      if (!parsed.ok())
        return parsed.status().with_context("the layer spec in a checkpoint in state_dir is not valid; move " + path +
                                            " out of state_dir to start without that layer");
      LayerDefinition def = std::move(parsed).value();
      // A layer's checkpoint is <name>.safetensors and nothing else: a renamed or copied one (a
      // backup) restored under the name in its spec, and then clashed with the real one, or was
      // written back under the real name at exit, the renamed file left behind to clash next time.
      if (entry.path().stem().string() != def.name)
        return Status::InvalidArgument(path + " holds layer '" + def.name + "' (its tuteld.spec), whose checkpoint is " +
                                       (dir / (def.name + ".safetensors")).string() +
                                       ": rename it so, or move it out of state_dir (keep copies and backups "
                                       "elsewhere)");
      // A file of another tenant's (its tuteld.tenant) is restored as this directory's tenant's,
      // which an operator does by moving it (a tenant renamed), and said: tutelctl checkpoint no
      // longer writes here, so no other way puts it there.
      if (auto owner = file.metadata().find("tuteld.tenant");
          owner != file.metadata().end() && owner->second != t.name)
        TUTEL_LOG(WARN) << path << " holds a layer of tenant '" << escape_text(owner->second)
                        << "' (its tuteld.tenant); it is restored as tenant '" << t.name
                        << "''s, whose directory it is in";
      const auto origin_key = file.metadata().find("tuteld.origin");
      const bool by_client = origin_key != file.metadata().end() && origin_key->second == "client";
      const bool by_config = origin_key != file.metadata().end() && origin_key->second == "config";
      if (def.group) {
        // Its peers restart on their own schedule; the trainer creates the group layer again,
        // which resumes from this file (prepare_checkpoint).
        TUTEL_LOG(INFO) << "not restoring group layer " << t.name << "/" << def.name << " (rank " << def.group->rank
                        << " of " << def.group->size << "); creating it again with the same spec resumes from "
                        << path;
        continue;
      }
      LayerDefinition origin = def;
      def.weights_path = path;
      def.init_seed.reset();
      found.push_back({t.name, spec->second, std::move(def), std::move(origin), by_client, by_config});
    }
  }
  return found;
}

void DaemonImpl::warn_of_unconfigured_tenants() const {
  // Their files stay where they are (the tenant may come back to the config); nothing serves them.
  std::error_code ec;
  for (fs::directory_iterator it(config_.server.state_dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name == kStateDirLockName || !it->is_directory(ec) ||
        std::any_of(config_.tenants.begin(), config_.tenants.end(), [&](const TenantConfig& t) { return t.name == name; }))
      continue;
    size_t layers = 0;
    std::error_code inner;
    for (fs::directory_iterator f(it->path(), inner), f_end; !inner && f != f_end; f.increment(inner))
      layers += f->path().extension() == ".safetensors";
    if (layers > 0)
      TUTEL_LOG(WARN) << it->path().string() << " holds " << layers << " layer checkpoint(s) of tenant '"
                      << escape_text(name) << "', which the config does not name: they are not served (name the "
                      << "tenant in the config again to serve them)";
  }
}

Status DaemonImpl::check_operator_checkpoint_path(const std::string& path) const {
  if (config_.server.state_dir.empty()) return Status::OK();
  // Compared once symbolic links and "..", where they exist, are resolved on both sides.
  // (Where a path cannot be resolved, its lexical form is compared.)
  auto resolved = [](const std::string& p) {
    std::error_code ec;
    const fs::path absolute = fs::absolute(p, ec);
    if (ec) return fs::path(p).lexically_normal();
    const fs::path canonical = fs::weakly_canonical(absolute, ec);
    return ec ? absolute.lexically_normal() : canonical;
  };
  const fs::path inside = resolved(path).lexically_relative(resolved(config_.server.state_dir));
  if (inside.empty() || *inside.begin() == "..") return Status::OK();
  std::vector<fs::path> parts(inside.begin(), inside.end());
  if (parts.size() >= 3 && parts[1] == "checkpoints") return Status::OK();
  // Anywhere else it would be taken for a layer's own checkpoint at the next start: a backup
  // under another name there stopped every start, a copy in another tenant's directory was
  // served to that tenant.
  return Status::InvalidArgument(path + " is inside state_dir " + config_.server.state_dir +
                                 ", where tuteld keeps its layers' own checkpoints: write the checkpoint outside it, "
                                 "or into state_dir/<tenant>/checkpoints/ for that tenant's clients to load");
}

Status DaemonImpl::restore_state() {
  TUTEL_ASSIGN_OR_RETURN(std::vector<Checkpointed> found, checkpointed_layers());
  // The config's layers first, from their checkpoints or afresh, then the ones clients created.
  // A tenant's quotas must not decide whether the daemon starts: a tenant that destroyed a
  // config layer and filled its max_layers with its own, or whose restored plans outgrow its
  // memory, would otherwise keep every tenant out after the next restart. So the config's
  // layers take their places before any client's, and a client's layer a quota refuses is left
  // out, logged, its file moved to the tenant's checkpoints (where a client can load it): left
  // where it was, a layer created under its name ("attach, else create") would replace it at
  // exit.
  auto restore = [&](const std::string& tenant, const LayerDefinition& def, const std::string& spec) -> Status {
    TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->create(tenant, def, spec));
    ref.layer->note_checkpointed();  // a periodic checkpoint need not write it again as it is
    TUTEL_LOG(INFO) << "restored layer " << tenant << "/" << def.name << " at step " << ref.layer->step_count();
    return Status::OK();
  };
  for (const LayerDefinition& def : config_.layers) {
    const auto it = std::find_if(found.begin(), found.end(), [&](const Checkpointed& f) {
      return f.tenant == def.tenant && f.def.name == def.name;
    });
    // The config says what the layer is. Its checkpoint carries on where it holds the same layer:
    // started from the same weights (or seed), of the same shapes; the config's other keys
    // (routing, capacity, optimizer settings) are taken, as a load into the layer would take
    // the file (another optimizer's state starts afresh). A checkpoint of another layer (new
    // weights named, another shape, a client's layer under this name) moves aside, as any
    // checkpoint a new layer would replace: served as it was, the config's change was ignored
    // without a word, and written back at exit, it never took effect.
    const std::optional<std::string> why_new =
        it == found.end() ? std::nullopt : why_not_continued(it->origin, it->by_client, def);
    if (it != found.end() && !why_new) {
      LayerDefinition resumed = def;
      resumed.weights_path = it->def.weights_path;
      resumed.init_seed.reset();
      if (format_layer_spec(it->origin) != format_layer_spec(def))
        TUTEL_LOG(INFO) << "layer " << def.tenant << "/" << def.name << " resumes from " << *it->def.weights_path
                        << " with the config's spec, which differs from the one it was checkpointed with";
      TUTEL_RETURN_IF_ERROR(restore(def.tenant, resumed, format_layer_spec(def)));
      found.erase(it);  // what is left are the clients' layers
      continue;
    }
    if (it != found.end()) found.erase(it);  // prepare_checkpoint moves it aside
    LayerDefinition fresh = def;  // a group layer's checkpoint under its name moves aside
    TUTEL_RETURN_IF_ERROR(prepare_checkpoint(def.tenant, fresh, why_new.value_or("was written for another spec")));
    TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->create(def.tenant, fresh, format_layer_spec(def)));
  }
  for (const Checkpointed& f : found) {
    // Only a quota's refusal leaves a layer out (counted by the registry): an allocation that
    // fails for want of memory on the node at this moment (another process holding the device)
    // fails the start with the file where it is, rather than demote the layer for good.
    const uint64_t refusals = registry_->quota_refusals(f.tenant);
    Status restored = restore(f.tenant, f.def, f.spec);
    if (restored.ok() && f.by_config)  // a [[layer]] taken out of the config still has its checkpoint
      TUTEL_LOG(WARN) << "layer " << f.tenant << "/" << f.def.name << " came from the config, which no longer names "
                      << "it; it was restored from " << *f.def.weights_path << " and is served as a client's layer "
                      << "(tutelctl destroy or a client destroys it; or stop tuteld and move the file out of state_dir)";
    if (!restored.ok() && registry_->quota_refusals(f.tenant) == refusals)
      return restored.with_context("layer " + f.tenant + "/" + f.def.name + " cannot be restored from " +
                                   *f.def.weights_path + " (it stays there); free what it needs, or move the file "
                                   "out of state_dir to start without it");
    if (restored.code() == StatusCode::kResourceExhausted) {
      Result<fs::path> kept =
          move_aside(*f.def.weights_path, client_checkpoints(config_, f.tenant), f.def.name, "left-out");
      if (!kept.ok())
        return kept.status().with_context("layer " + f.tenant + "/" + f.def.name + " cannot be restored (" +
                                          std::string(restored.message()) + ")");
      TUTEL_LOG(WARN) << "not restoring layer " << f.tenant << "/" << f.def.name << ": " << restored
                      << "; its checkpoint is kept as " << kept->string() << " (a client loads it as \""
                      << kept->filename().string() << "\")";
      note_kept_aside(f.tenant, f.def.name, kept->filename().string());
      continue;
    }
    TUTEL_RETURN_IF_ERROR(restored);
  }
  return Status::OK();
}

// A group layer is not restored at start (its peers restart on their own schedule): created
// again with the spec it was checkpointed with, each rank resumes from its own checkpoint. The
// ranks' creation check then finds them agreeing (all resumed) or refuses on every rank (one
// without its checkpoint holds another gate). Any other layer created under its name would
// replace that checkpoint at exit (or delete it at a destroy): it moves aside first.
Status DaemonImpl::prepare_checkpoint(const std::string& tenant, LayerDefinition& def, const std::string& why) const {
  if (config_.server.state_dir.empty()) return Status::OK();
  const fs::path path = fs::path(config_.server.state_dir) / tenant / (def.name + ".safetensors");
  std::error_code ec;
  if (!fs::exists(path, ec)) return Status::OK();
  // A layer that holds the name writes this file itself (this creation fails as a duplicate).
  if (registry_->attach(tenant, def.name).ok()) return Status::OK();
  if (!def.group) return keep_superseded(tenant, def.name, path, why);
  Result<SafetensorsFile> opened = SafetensorsFile::open(path.string());
  if (!opened.ok())  // never overwritten unread: it may be the only copy of a trained layer
    return opened.status().with_context("group layer " + tenant + "/" + def.name + " has a checkpoint " +
                                        path.string() + " that cannot be read; move it out of state_dir to "
                                        "create the layer afresh");
  const SafetensorsFile& file = *opened;
  const auto written = file.metadata().find("tuteld.spec");
  // The layer's identity: its spec less the group's timeouts, which change nothing it holds (a
  // client that changes only those, as a lower max_collective_timeout_ms may make it, resumes).
  auto identity = [](LayerDefinition d) {
    d.group->bootstrap_timeout = GroupConfig{}.bootstrap_timeout;
    d.group->collective_timeout = GroupConfig{}.collective_timeout;
    return format_layer_spec(d);
  };
  Result<LayerDefinition> before = written == file.metadata().end()
                                       ? Result<LayerDefinition>(Status::NotFound("no spec"))
                                       : parse_layer_spec(written->second, path.string());
  // Another layer under this name, or this one with other keys: a new layer.
  if (!before.ok() || !before->group || identity(*before) != identity(def))
    return keep_superseded(tenant, def.name, path, why);
  def.weights_path = path.string();
  def.init_seed.reset();
  // Read here, from the file already open: the layer's tuner takes its decisions back.
  if (const auto tuning = file.metadata().find(kTuningKey); tuning != file.metadata().end())
    def.resumed_tuning = tuning->second;
  TUTEL_LOG(INFO) << "group layer " << tenant << "/" << def.name << " resumes from " << path.string();
  return Status::OK();
}

Status DaemonImpl::keep_superseded(const std::string& tenant, const std::string& name, const fs::path& path,
                                   const std::string& why) const {
  // The new layer's checkpoint would replace the old one at exit (and a destroy would delete
  // it), which may be the only copy of a trained layer: the old one moves to the tenant's
  // checkpoints, where a client can load it (and its quota counts it).
  Result<fs::path> kept = move_aside(path, client_checkpoints(config_, tenant), name, "superseded");
  if (!kept.ok())
    return kept.status().with_context("layer " + tenant + "/" + name + " has a checkpoint " + path.string() +
                                      " that " + why + "; move it out of state_dir to create the layer afresh");
  TUTEL_LOG(WARN) << "layer " << tenant << "/" << name << " is created afresh: its checkpoint " << path.string()
                  << " " << why << ", and is kept as " << kept->string() << " (a client loads it as \""
                  << kept->filename().string() << "\")";
  note_kept_aside(tenant, name, kept->filename().string());
  return Status::OK();
}

void DaemonImpl::note_kept_aside(const std::string& tenant, const std::string& name, const std::string& file) const {
  std::lock_guard lock(kept_aside_mutex_);
  kept_aside_[tenant + "/" + name] = file;
}

std::optional<std::string> DaemonImpl::kept_aside(const std::string& tenant, const std::string& name,
                                                  bool forget) const {
  std::lock_guard lock(kept_aside_mutex_);
  const auto it = kept_aside_.find(tenant + "/" + name);
  if (it == kept_aside_.end()) return std::nullopt;
  std::string file = it->second;
  if (forget) kept_aside_.erase(it);
  return file;
}

Status DaemonImpl::listen(const std::string& path, mode_t mode, std::optional<uint32_t> group, bool admin,
                          uv_poll_t* poll, ipc::UniqueFd* fd) {
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) return Status::IOError("cannot create the directory of " + path + ": " + ec.message());
  TUTEL_ASSIGN_OR_RETURN(*fd, ipc::listen_unix(path, mode, /*backlog=*/64,
                                               group ? std::optional<gid_t>(static_cast<gid_t>(*group)) : std::nullopt));
  uv_poll_init(&loop_, poll, fd->get());
  poll->data = this;
  start_accepting(admin);
  return Status::OK();
}

void DaemonImpl::start_accepting(bool admin) {
  auto cb = admin ? +[](uv_poll_t* h, int, int) { static_cast<DaemonImpl*>(h->data)->accept_on(true); }
                  : +[](uv_poll_t* h, int, int) { static_cast<DaemonImpl*>(h->data)->accept_on(false); };
  uv_poll_start(admin ? &admin_poll_ : &client_poll_, UV_READABLE, cb);
}

void DaemonImpl::resume_accepting() {
  start_accepting(false);
  start_accepting(true);
}

void DaemonImpl::pause_accepting(int err) {
  if (shutting_down_ || accepting_paused_) return;
  accepting_paused_ = true;
  TUTEL_LOG(WARN) << "cannot accept connections: " << std::strerror(err) << "; trying again in 100 ms (raise the "
                  << "descriptor limit, ulimit -n, for more sessions)";
  uv_poll_stop(&client_poll_);
  uv_poll_stop(&admin_poll_);
  uv_timer_start(
      &accept_pause_,
      [](uv_timer_t* t) {
        auto* self = static_cast<DaemonImpl*>(t->data);
        self->accepting_paused_ = false;
        if (self->shutting_down_) return;
        self->resume_accepting();
      },
      100, 0);
}

void DaemonImpl::accept_on(bool admin) {
  const int listen_fd = admin ? admin_fd_.get() : client_fd_.get();
  for (;;) {
    const int c = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c < 0) {
      // Out of descriptors the listener stays readable with nothing to accept: a pause, rather
      // than a loop spinning on it. Otherwise (EAGAIN) wait for the next readiness.
      if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) pause_accepting(errno);
      return;
    }
    auto s = std::make_shared<Session>();
    s->id = next_session_++;
    s->admin = admin;
    s->fd = ipc::UniqueFd(c);
    auto creds = ipc::peer_credentials(c);
    if (!creds.ok()) {
      TUTEL_LOG(WARN) << "refusing a connection: " << creds.status();
      continue;
    }
    s->peer = *creds;
    sessions_[s->id] = s;
    s->daemon = this;
    uv_poll_init(&loop_, &s->poll, c);
    s->poll.data = s.get();
    poll_session(s);
    if (!admin && draining_) {
      metrics_.count_session_refused("", "draining");
      reply_error(s, 0, draining_status("takes no new client sessions"));
      close_session(s);
      continue;
    }
    if (!admin) {
      auto tenant = registry_->tenant_for(s->peer.uid, s->peer.gid);
      if (!tenant.ok()) {
        TUTEL_LOG(WARN) << "refusing pid " << s->peer.pid << ": " << tenant.status();
        metrics_.count_session_refused("", "no_tenant");
        reply_error(s, 0, tenant.status());
        close_session(s);
        continue;
      }
      // Counted again at the hello: only sessions past it (and past the tenant's secret) hold a
      // place, so connections that never say hello cannot keep the tenant's clients out.
      if (const Status full = sessions_full(*tenant); !full.ok()) {
        TUTEL_LOG(WARN) << "refusing pid " << s->peer.pid << ": " << full;
        metrics_.count_session_refused(*tenant, "max_sessions");
        reply_error(s, 0, full);
        close_session(s);
        continue;
      }
      // Connections without a hello yet are bounded apart, max_sessions per tenant, so they cannot
      // take the daemon's descriptors from every other tenant: past the bound the oldest of them
      // makes room. Refusing the newcomer instead would let a process that opens connections and
      // says nothing (under the tenant's uid, without its secret) keep the tenant's clients out.
      if (client_sessions(*tenant, SessionState::kAwaitingHello) >= registry_->max_sessions(*tenant)) evict_oldest_silent(*tenant);
      s->tenant = *tenant;
      publish_session_count();
    }
  }
}

Status DaemonImpl::sessions_full(const std::string& tenant) const {
  // A closing session keeps its place until it is gone: until then its worker, finishing the
  // request in progress (a group layer's collective may wait up to its timeout), and its arena
  // are still held, and a client that hangs up and reconnects must not stack those up. One tuteld
  // closed is gone once its client let go of the connection as well (close_session).
  const int64_t open = client_sessions(tenant, SessionState::kOpen);
  const int64_t closing = client_sessions(tenant, SessionState::kClosing);
  if (open + closing < registry_->max_sessions(tenant)) return Status::OK();
  return Status::ResourceExhausted(
      "tenant '" + tenant + "' already has " + std::to_string(open + closing) + " client sessions connected" +
      (closing > 0 ? " (" + std::to_string(closing) +
                         " of them closing, each until its request in progress has finished and, where tuteld "
                         "closed it, its client has closed the connection)"
                   : std::string()) +
      ", its max_sessions; close one, or raise max_sessions in tuteld.toml");
}

void DaemonImpl::close_silent_sessions() {
  const auto now = std::chrono::steady_clock::now();
  std::vector<std::shared_ptr<Session>> silent;
  for (const auto& [id, s] : sessions_)
    if (s->awaiting_hello() && now - s->connected_at >= config_.server.hello_timeout) silent.push_back(s);
  for (const auto& s : silent) {
    TUTEL_LOG(WARN) << "session " << s->id << " (pid " << s->peer.pid << "): no hello within "
                    << config_.server.hello_timeout.count() << " ms; closing it";
    metrics_.count_session_refused(s->tenant, "hello_timeout");
    reply_error(s, 0, Status::Timeout("no hello within hello_timeout_ms (" +
                                      std::to_string(config_.server.hello_timeout.count()) +
                                      " ms) of connecting: send it at once"));
    close_session(s);
  }
}

Status DaemonImpl::draining_status(const std::string& what) const {
  return Status::Unavailable("tuteld is draining (tutelctl drain) and " + what +
                             ": use another daemon, or ask its operator to run 'tutelctl undrain'");
}

void DaemonImpl::evict_oldest_silent(const std::string& tenant) {
  std::vector<std::shared_ptr<Session>> silent;
  for (const auto& [id, s] : sessions_)
    if (s->awaiting_hello() && s->tenant == tenant) silent.push_back(s);
  std::sort(silent.begin(), silent.end(), [](const auto& a, const auto& b) { return a->connected_at < b->connected_at; });
  // Oldest first, each after reading what it has sent: a client whose hello arrived in the same
  // pass of the loop as this connection is served, not evicted unread.
  std::shared_ptr<Session> oldest;
  for (const auto& s : silent) {
    on_readable(s);
    if (s->awaiting_hello()) {
      oldest = s;
      break;
    }
  }
  if (!oldest) return;
  TUTEL_LOG(WARN) << "session " << oldest->id << " (pid " << oldest->peer.pid << "): no hello yet, and tenant "
                  << tenant << " has max_sessions connections without one; closing it to make room";
  metrics_.count_session_refused(tenant, "no_hello_evicted");
  reply_error(oldest, 0,
              Status::ResourceExhausted("closed before its hello to make room: tenant '" + tenant + "' has " +
                                        std::to_string(registry_->max_sessions(tenant)) +
                                        " connections without a hello; send the hello at once after connecting"));
  close_session(oldest);
}

int64_t DaemonImpl::client_sessions(const std::string& tenant, SessionState state) const {
  int64_t n = 0;
  for (const auto& [id, s] : sessions_) {
    if (s->tenant != tenant) continue;
    const bool admitted = !s->admin && s->admitted;
    n += state == SessionState::kAwaitingHello ? s->awaiting_hello()
         : state == SessionState::kOpen        ? admitted && !s->closing
                                               : admitted && s->closing;
  }
  return n;
}

void DaemonImpl::poll_session(const std::shared_ptr<Session>& s) {
  if (s->closing) return;
  // Readable unless its queue of control frames is full; writable while replies wait.
  const int events = (s->reading_paused ? 0 : UV_READABLE) | (s->replies.empty() ? 0 : UV_WRITABLE);
  if (events == s->poll_events) return;
  s->poll_events = events;
  if (events == 0) {
    uv_poll_stop(&s->poll);
    return;
  }
  uv_poll_start(&s->poll, events, [](uv_poll_t* h, int status, int ready) {
    const std::shared_ptr<Session> session = static_cast<Session*>(h->data)->shared_from_this();
    if (ready & UV_WRITABLE) session->daemon->flush_replies(session);
    // An error on the descriptor: the read says what it is.
    if ((ready & UV_READABLE) || status < 0) session->daemon->on_readable(session);
  });
}

void DaemonImpl::flush_replies(const std::shared_ptr<Session>& s) {
  if (s->closing) return;
  Status st = s->replies.write_some(s->fd.get());
  if (st.ok() && s->replies.pending_bytes() > kMaxUnreadReplyBytes)
    st = Status::ResourceExhausted("the client left " + std::to_string(s->replies.pending_bytes()) +
                                   " bytes of replies unread");
  if (!st.ok()) {
    TUTEL_LOG(WARN) << "session " << s->id << ": " << st << "; closing it";
    close_session(s);
    return;
  }
  poll_session(s);
}

void DaemonImpl::on_readable(const std::shared_ptr<Session>& s) {
  if (s->closing) return;
  auto n = ipc::read_available(s->fd.get(), s->decoder);
  if (!n.ok()) {
    // A malformed frame: say why, then drop the connection (a byte stream cannot resynchronise).
    reply_error(s, 0, n.status());
    close_session(s);
    return;
  }
  if (s->decoder.eof()) {  // the peer is gone (or half-closed)
    s->client_hung_up = true;
    close_session(s);
    return;
  }
  pump(s);
}

// Control frames run one at a time, in order. A client that sends them faster than they run
// waits in its socket's buffer, not in the daemon's memory (which grew by gigabytes before):
// at most kMaxQueuedFrames decoded frames wait, holding at most kMaxQueuedBytes of bodies (and one
// frame more), and while the queue is that full the socket is not read; the decoder holds at
// most ipc::kReadAvailableBudget bytes more (read_available's budget), which the queue takes from
// before the socket is read again.
void DaemonImpl::pump(const std::shared_ptr<Session>& s) {
  // A frame that finishes at once calls pump() again from inside the handler below; the loop
  // here takes the next frame instead, so the stack does not grow with the queue.
  if (s->pumping) return;
  s->pumping = true;
  for (;;) {
    while (s->queued.size() < kMaxQueuedFrames && s->queued_bytes < kMaxQueuedBytes) {
      auto frame = s->decoder.next();
      if (!frame) break;
      s->queued_bytes += frame->body.size();
      s->queued.push_back(std::move(*frame));
    }
    // Client sessions' (the status says so): tutelctl's own request is no client's backlog.
    if (!s->admin) queued_frames_peak_ = std::max<uint64_t>(queued_frames_peak_, s->queued.size());
    if (s->busy || s->closing || s->queued.empty()) break;
    ipc::Frame frame = std::move(s->queued.front());
    s->queued.pop_front();
    s->queued_bytes -= frame.body.size();
    s->busy = true;
    if (s->admin) handle_admin_frame(s, std::move(frame));
    else handle_client_frame(s, std::move(frame));
  }
  s->pumping = false;
  if (s->closing) return;
  // Not full: the decoder has no complete frame left either.
  const bool full = s->queued.size() >= kMaxQueuedFrames || s->queued_bytes >= kMaxQueuedBytes;
  if (full && !s->reading_paused) {
    s->reading_paused = true;
    poll_session(s);
    ++reads_paused_;
  } else if (!full && s->reading_paused) {
    s->reading_paused = false;
    poll_session(s);
  }
}

void DaemonImpl::finish_frame(const std::shared_ptr<Session>& s) {
  s->busy = false;
  pump(s);
}

void DaemonImpl::reply(const std::shared_ptr<Session>& s, ipc::FrameType type, uint32_t request_id,
                       const json& body, const std::vector<int>& fds) {
  if (s->closing) return;
  const std::string text = ipc::dump_body(body);
  if (text.size() > ipc::kMaxFrameBody) {
    // An answer too long for one frame (the metrics of thousands of layers, say): the request
    // is answered with why, and the session goes on.
    TUTEL_LOG(WARN) << "session " << s->id << ": a " << ipc::frame_type_name(type) << " answer of " << text.size()
                    << " bytes exceeds the " << ipc::kMaxFrameBody << "-byte frame limit; answering with an error";
    return reply_error(s, request_id,
                       Status::ResourceExhausted("the answer is " + std::to_string(text.size()) +
                                                 " bytes, more than a frame's " + std::to_string(ipc::kMaxFrameBody) +
                                                 " (the metrics of many layers are served whole over HTTP: "
                                                 "[server] metrics_listen)"));
  }
  if (const Status st = s->replies.push(type, request_id, text, fds); !st.ok()) {
    TUTEL_LOG(WARN) << "session " << s->id << ": " << st << "; closing it";
    close_session(s);
    return;
  }
  flush_replies(s);
}

void DaemonImpl::reply_error(const std::shared_ptr<Session>& s, uint32_t request_id, const Status& status) {
  if (s->closing) return;
  if (const Status st = s->replies.push(ipc::FrameType::kError, request_id, ipc::error_body(status)); !st.ok()) {
    TUTEL_LOG(WARN) << "session " << s->id << ": " << st << "; closing it";
    close_session(s);
    return;
  }
  flush_replies(s);
}

void DaemonImpl::offload(std::function<void()> work, std::function<void()> done) {
  struct Job {
    uv_work_t req;
    std::function<void()> work, done;
    DaemonImpl* self;
  };
  auto* job = new Job{{}, std::move(work), std::move(done), this};
  job->req.data = job;
  uv_queue_work(&loop_, &job->req, [](uv_work_t* r) { static_cast<Job*>(r->data)->work(); },
                [](uv_work_t* r, int) {
                  std::unique_ptr<Job> j(static_cast<Job*>(r->data));
                  j->done();
                });
}

void DaemonImpl::release_off_loop(std::vector<LayerRef> layers) {
  if (layers.empty()) return;
  // Cleared in the work, on the pool: `done` destroys the job (and this lambda) on the loop.
  offload([layers = std::move(layers)]() mutable { layers.clear(); }, [] {});
}

void DaemonImpl::handle_client_frame(const std::shared_ptr<Session>& s, ipc::Frame frame) {
  const uint32_t rid = frame.header.request_id;
  const auto type = static_cast<ipc::FrameType>(frame.header.type);
  if (frame.body.size() > kMaxClientRequestBody) {
    reply_error(s, rid,
                Status::InvalidArgument("a " + std::string(ipc::frame_type_name(type)) + " request of " +
                                        std::to_string(frame.body.size()) + " bytes; a client request takes at most " +
                                        std::to_string(kMaxClientRequestBody) + " (a layer spec is a few KiB)"));
    return finish_frame(s);
  }
  auto body = ipc::parse_body(frame);
  if (!body.ok()) {
    reply_error(s, rid, body.status());
    return finish_frame(s);
  }
  if (type == ipc::FrameType::kHello) return handle_hello(s, frame);  // finishes the frame
  if (!s->arena) {
    // tutelctl (or any admin request) pointed at this socket: say which socket it wants.
    if (ipc::is_admin_request(type))
      reply_error(s, rid, Status::InvalidArgument(
                              "this is tuteld's client socket (" + config_.server.client_socket +
                              "), where trainers connect; admin requests (tutelctl) go to its admin_socket (" +
                              config_.server.admin_socket + ")"));
    else
      reply_error(s, rid, Status::InvalidArgument("send hello first: the session has no arena yet"));
    return finish_frame(s);
  }
  // Everything below touches layers: it runs on the thread pool so the loop keeps serving.
  auto result = std::make_shared<Result<json>>(Status::Internal("not run"));
  auto reply_type = std::make_shared<ipc::FrameType>(ipc::FrameType::kOk);
  // A descriptor the reply carries (a region's memfd), closed once sent.
  auto reply_fd = std::make_shared<ipc::UniqueFd>();
  const std::string tenant = s->tenant;
  const json b = *body;
  std::function<Result<json>()> op;
  std::string op_name;
  if (type == ipc::FrameType::kCreateLayer && draining_) {
    reply_error(s, rid, draining_status("creates no layers"));
    return finish_frame(s);
  }
  // A group layer's creation holds a pool thread until its peers arrive (up to its
  // bootstrap_timeout_ms): creations may hold half the pool (creation_slots_), each active
  // tenant's share of them reserved (pool_shares.hpp), and are refused beyond it, so one
  // tenant's groups waiting for peers never keep another connected tenant from creating layers,
  // and a tenant alone may form a group of as many local ranks as there are slots.
  const bool creation = type == ipc::FrameType::kCreateLayer;
  const std::vector<std::string> others = creation ? other_active_tenants(tenant) : std::vector<std::string>{};
  if (creation && !creation_slots_.may_take(tenant, others)) {
    const int64_t mine = creation_slots_.in_use(tenant);
    const Status busy =
        creation_slots_.in_use() >= creation_slots_.capacity()
            ? Status::ResourceExhausted(std::to_string(creation_slots_.in_use()) +
                                        " layer creations are in progress on this daemon (group layers wait there "
                                        "for their peers), its limit: create this one once one of them has finished")
            : Status::ResourceExhausted(
                  "tenant '" + tenant + "' has " + std::to_string(mine) +
                  " layer creations in progress (group layers wait there for their peers), beyond its share of " +
                  std::to_string(creation_slots_.share(1 + others.size())) +
                  " of this daemon's " + std::to_string(creation_slots_.capacity()) +
                  ", and the rest is kept for the other connected tenants: create this one once one of them has "
                  "finished (or raise UV_THREADPOOL_SIZE for tuteld)");
    reply_error(s, rid, busy);
    return finish_frame(s);
  }
  switch (type) {
    case ipc::FrameType::kCreateLayer:
      op_name = "create";
      *reply_type = ipc::FrameType::kLayerInfo;
      op = [this, tenant, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(std::string spec, ipc::get_string(b, "spec"));
        TUTEL_ASSIGN_OR_RETURN(LayerDefinition def, parse_layer_spec(spec, "spec"));
        if (def.weights_path) {
          TUTEL_ASSIGN_OR_RETURN(*def.weights_path, tenant_file(config_, tenant, *def.weights_path));
        }
        TUTEL_RETURN_IF_ERROR(check_layer_limits(config_.server, def));
        const std::string canonical = format_layer_spec(def);
        TUTEL_RETURN_IF_ERROR(prepare_checkpoint(tenant, def));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->create(tenant, def, canonical));
        json info = layer_info(ref);
        // An earlier layer of this name whose checkpoint was moved aside (now, or left out at the
        // start): the client is told once, here, where it is.
        if (std::optional<std::string> file = kept_aside(tenant, def.name, /*forget=*/true)) info["kept_aside"] = *file;
        return info;
      };
      break;
    case ipc::FrameType::kAttachLayer:
      op_name = "attach";
      *reply_type = ipc::FrameType::kLayerInfo;
      op = [this, tenant, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(std::string name, ipc::get_string(b, "name"));
        Result<LayerRef> ref = registry_->attach(tenant, name);
        if (!ref.ok() && ref.status().code() == StatusCode::kNotFound)
          if (std::optional<std::string> file = kept_aside(tenant, name, /*forget=*/false))
            return Status::NotFound(std::string(ref.status().message()) + "; its checkpoint was kept aside as \"" +
                                    *file + "\" (the daemon's log says why): create the layer and load that file");
        TUTEL_RETURN_IF_ERROR(ref.status());
        return layer_info(*ref);
      };
      break;
    case ipc::FrameType::kDestroyLayer:
      op_name = "destroy";
      op = [this, tenant, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_RETURN_IF_ERROR(destroy_layer(tenant, h));
        return json::object();
      };
      break;
    case ipc::FrameType::kStep:
    case ipc::FrameType::kZeroGrad:
      op_name = type == ipc::FrameType::kStep ? "step" : "zero_grad";
      op = [this, tenant, b, type]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, h));
        if (type == ipc::FrameType::kZeroGrad) {
          bool set_to_none = true;
          if (b.contains("set_to_none")) {
            TUTEL_ASSIGN_OR_RETURN(set_to_none, ipc::get_bool(b, "set_to_none"));
          }
          TUTEL_RETURN_IF_ERROR(ref.layer->zero_grad(set_to_none));
          return json::object();
        }
        ServedLayer::StepOverrides overrides;
        for (auto [key, value] : {std::pair{"lr", &overrides.lr}, std::pair{"weight_decay", &overrides.weight_decay}})
          if (b.contains(key)) {
            TUTEL_ASSIGN_OR_RETURN(*value, ipc::get_number(b, key));
          }
        TUTEL_ASSIGN_OR_RETURN(const ServedLayer::StepOutcome step, ref.layer->step(overrides));
        // What it applied: a client that asked for an override sees it was heard (an older
        // daemon answers without these).
        return json{{"step", step.step}, {"applied", step.applied}, {"lr", step.lr}, {"weight_decay", step.weight_decay}};
      };
      break;
    case ipc::FrameType::kGradNorm:
      op_name = "grad_norm";
      op = [this, tenant, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, h));
        TUTEL_ASSIGN_OR_RETURN(double norm, ref.layer->grad_norm());
        // JSON has no inf or NaN: a gradient that is not finite is said in words.
        if (std::isfinite(norm)) return json{{"norm", norm}};
        return json{{"norm", nullptr}, {"not_finite", std::isnan(norm) ? "nan" : "inf"}};
      };
      break;
    case ipc::FrameType::kScaleGrads:
      op_name = "scale_grads";
      op = [this, tenant, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_ASSIGN_OR_RETURN(double factor, ipc::get_number(b, "factor"));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, h));
        TUTEL_RETURN_IF_ERROR(ref.layer->scale_grads(factor));
        return json::object();
      };
      break;
    case ipc::FrameType::kSave:
    case ipc::FrameType::kLoad:
      op_name = type == ipc::FrameType::kSave ? "save" : "load";
      op = [this, tenant, b, type]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_ASSIGN_OR_RETURN(std::string rel, ipc::get_string(b, "path"));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, h));
        const bool save = type == ipc::FrameType::kSave;
        TUTEL_ASSIGN_OR_RETURN(std::string path, tenant_file(config_, tenant, rel));
        if (!save) {
          TUTEL_RETURN_IF_ERROR(ref.layer->load(path));
          return json{{"path", path}};
        }
        // Room first (held until the file is written, when the file itself counts), then the
        // directories, so a refused save leaves nothing behind.
        TUTEL_ASSIGN_OR_RETURN(CheckpointQuota::Reservation room,
                               checkpoint_quotas_.at(tenant)->reserve(path, ref.layer->save_bytes_bound()));
        const fs::path parent = fs::path(path).parent_path();
        if (const std::error_code ec = create_directories_durably(parent); ec)
          return Status::IOError("cannot create " + parent.string() + ": " + ec.message());
        TUTEL_RETURN_IF_ERROR(ref.layer->save(path));
        return json{{"path", path}};
      };
      break;
    case ipc::FrameType::kExportState:
    case ipc::FrameType::kImportState: {
      const bool is_export = type == ipc::FrameType::kExportState;
      op_name = is_export ? "export_state" : "import_state";
      // The descriptor that came with the frame: the client's memfd to write into, or the file
      // to read. Held by the op (a std::function is copied), closed when it is done.
      std::shared_ptr<ipc::UniqueFd> fd;
      if (frame.fds.size() == 1) fd = std::make_shared<ipc::UniqueFd>(std::move(frame.fds[0]));
      const size_t fds_given = frame.fds.size();
      op = [this, tenant, b, is_export, fd, fds_given]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(uint64_t h, handle_of(b));
        TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, h));
        if (!fd)
          return Status::InvalidArgument(
              std::string(is_export ? "ExportState" : "ImportState") + " needs one descriptor sent with the frame (" +
              (is_export ? "a memfd of the layer's state_bytes, allocated and sealed against shrinking, to write into"
                         : "the safetensors file to read") +
              "), not " + std::to_string(fds_given));
        if (!is_export) {
          TUTEL_RETURN_IF_ERROR(ref.layer->import_state(fd->get()));
          return json::object();
        }
        TUTEL_ASSIGN_OR_RETURN(uint64_t bytes, ref.layer->export_state(fd->get()));
        return json{{"bytes", bytes}};
      };
      break;
    }
    case ipc::FrameType::kMapRegion:
      op_name = "map_region";
      op = [this, s, tenant, b, reply_fd]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(int64_t rank, ipc::get_int(b, "rank"));
        TUTEL_ASSIGN_OR_RETURN(int64_t bytes, ipc::get_int(b, "bytes"));
        if (rank < 0 || rank >= static_cast<int64_t>(ranks_.size()))
          return Status::InvalidArgument("rank " + std::to_string(rank) + " does not exist; this daemon has ranks 0 to " +
                                         std::to_string(ranks_.size() - 1) + " (a layer's rank is in its LayerInfo)");
        if (bytes < 1) return Status::InvalidArgument("a device region needs bytes >= 1, not " + std::to_string(bytes));
        TUTEL_ASSIGN_OR_RETURN(MappedRegion mapped, s->regions.map(*ranks_[static_cast<size_t>(rank)],
                                                                   static_cast<uint64_t>(bytes),
                                                                   registry_->tenant_memory(tenant),
                                                                   retired_regions_.at(tenant)));
        *reply_fd = std::move(mapped.exported.fd);
        return region_info(mapped);
      };
      break;
    case ipc::FrameType::kUnmapRegion:
      op_name = "unmap_region";
      op = [s, b]() -> Result<json> {
        TUTEL_ASSIGN_OR_RETURN(int64_t region, ipc::get_int(b, "region"));
        if (region < 1 || region > std::numeric_limits<uint32_t>::max())
          return Status::NotFound("this session maps no device region " + std::to_string(region));
        TUTEL_RETURN_IF_ERROR(s->regions.unmap(static_cast<uint32_t>(region)));
        return json::object();
      };
      break;
    default:
      reply_error(s, rid, Status::InvalidArgument("frame type " + std::string(ipc::frame_type_name(type)) +
                                                  " is not a client request (admin frames go to the admin socket)"));
      return finish_frame(s);
  }
  const auto started = std::chrono::steady_clock::now();
  if (creation) creation_slots_.take(tenant);
  // The frames of one layer wait for each other here, not on the pool (layer_work_); a handle
  // that is not the tenant's fails at once and waits for nothing.
  std::optional<uint64_t> layer_handle;
  if (type == ipc::FrameType::kDestroyLayer || type == ipc::FrameType::kStep || type == ipc::FrameType::kZeroGrad ||
      type == ipc::FrameType::kGradNorm || type == ipc::FrameType::kScaleGrads ||
      type == ipc::FrameType::kSave || type == ipc::FrameType::kLoad || type == ipc::FrameType::kExportState ||
      type == ipc::FrameType::kImportState)
    if (const Result<uint64_t> h = handle_of(b); h.ok() && registry_->find(tenant, *h).ok()) layer_handle = *h;
  auto work = [op, result] { *result = guarded(op); };
  auto done = [this, s, rid, result, reply_type, reply_fd, op_name, tenant, b, started, creation] {
    if (creation) creation_slots_.give_back(tenant);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    // Name the layer in the metrics: requests carry a name (create, attach) or a handle.
    std::string layer;
    if (result->ok() && result->value().contains("name")) layer = result->value()["name"].get<std::string>();
    else if (auto h = handle_of(b); h.ok())
      if (auto ref = registry_->find(tenant, *h); ref.ok()) layer = ref->layer->name();
    metrics_.record_request(tenant, layer, op_name, result->ok(), secs);
    if (result->ok() && reply_fd->valid()) reply(s, *reply_type, rid, result->value(), {reply_fd->get()});
    else if (result->ok()) reply(s, *reply_type, rid, result->value());
    else reply_error(s, rid, result->status());
    finish_frame(s);
  };
  if (layer_handle) run_layer_work(*layer_handle, std::move(work), std::move(done));
  else offload(std::move(work), std::move(done));
}

Status DaemonImpl::destroy_layer(const std::string& tenant, uint64_t handle) {
  TUTEL_ASSIGN_OR_RETURN(LayerRef ref, registry_->find(tenant, handle));
  // Its checkpoint in state_dir goes too, or the next start would bring the layer back; first,
  // while the name is still taken, so a creation of the same name that comes right after the
  // destroy cannot resume from it.
  if (!config_.server.state_dir.empty()) {
    std::error_code ec;
    const fs::path dir = fs::path(config_.server.state_dir) / tenant;
    if (fs::remove(dir / (ref.layer->name() + ".safetensors"), ec)) sync_directory(dir);
    if (ec)
      TUTEL_LOG(WARN) << "destroyed layer " << tenant << "/" << ref.layer->name()
                      << " keeps its checkpoint in state_dir: " << ec.message();
  }
  TUTEL_RETURN_IF_ERROR(registry_->destroy(tenant, handle));
  ref.layer->mark_destroyed();  // before its series go: a request in flight records none after
  metrics_.forget_layer(tenant, ref.layer->name());
  return Status::OK();
}

void DaemonImpl::run_layer_work(uint64_t handle, std::function<void()> work, std::function<void()> done) {
  auto [it, idle] = layer_work_.try_emplace(handle);
  if (!idle) {  // a frame of this layer runs: after it, and after those waiting already
    it->second.push_back({std::move(work), std::move(done)});
    return;
  }
  start_layer_work(handle, {std::move(work), std::move(done)});
}

void DaemonImpl::start_layer_work(uint64_t handle, LayerWork w) {
  offload(std::move(w.work), [this, handle, done = std::move(w.done)] {
    done();
    // The entry lives while a frame of the layer runs (what done() sent meanwhile queued in it).
    auto it = layer_work_.find(handle);
    if (it->second.empty()) {
      layer_work_.erase(it);
      return;
    }
    LayerWork next = std::move(it->second.front());
    it->second.pop_front();
    start_layer_work(handle, std::move(next));
  });
}

// The arena is created on the thread pool: populating it (arena_bytes of shared memory, up to
// 64 GiB) takes tens of milliseconds per 64 MiB, which the loop, and so every other session,
// would otherwise wait for at each hello. Finishes the frame when done.
void DaemonImpl::handle_hello(const std::shared_ptr<Session>& s, const ipc::Frame& frame) {
  const uint32_t rid = frame.header.request_id;
  if (s->hello_received) {
    reply_error(s, rid, Status::InvalidArgument("hello was already sent on this session"));
    return finish_frame(s);
  }
  s->hello_received = true;
  const auto hello = ipc::parse_body(frame);
  if (hello.ok() && hello->contains("client") && (*hello)["client"].is_string()) {
    // At most 128 bytes, cut where a UTF-8 character begins (not inside one, which showed as a
    // broken character), and escaped once, here, for the log and the admin replies.
    std::string_view name = (*hello)["client"].get_ref<const std::string&>();
    size_t end = std::min<size_t>(name.size(), 128);
    while (end > 0 && end < name.size() && (static_cast<unsigned char>(name[end]) & 0xC0) == 0x80) --end;
    s->client_name = escape_text(name.substr(0, end));
  }
  if (auto secret = tenant_secrets_.find(s->tenant); secret != tenant_secrets_.end()) {
    // The tenant asks its clients for its secret on top of the uid mapping. Compared in constant
    // time; a session that fails is told why and closed (a new connection may try again).
    const json* given = hello.ok() && hello->contains("secret") ? &(*hello)["secret"] : nullptr;
    const bool present = given != nullptr && given->is_string();
    if (!present || !constant_time_equal(given->get_ref<const std::string&>(), secret->second)) {
      const Status refused = Status::PermissionDenied(
          "tenant '" + s->tenant + "' requires its secret in the hello, and this client " +
          (present ? "gave another one" : "gave none") +
          ": give the client the tenant's secret file (TUTEL_SECRET_FILE, or ClientOptions::secret_file)");
      TUTEL_LOG(WARN) << "session " << s->id << " (pid " << s->peer.pid << ", uid " << s->peer.uid
                      << "): " << (present ? "wrong" : "no") << " secret for tenant " << s->tenant << "; closing it";
      metrics_.count_session_refused(s->tenant, "secret");
      reply_error(s, rid, refused);
      close_session(s);
      return finish_frame(s);
    }
  }
  if (!s->admitted) {  // a second hello after a failed arena is admitted already
    if (const Status full = sessions_full(s->tenant); !full.ok()) {
      TUTEL_LOG(WARN) << "session " << s->id << " (pid " << s->peer.pid << "): " << full;
      metrics_.count_session_refused(s->tenant, "max_sessions");
      reply_error(s, rid, full);
      close_session(s);
      return finish_frame(s);
    }
    s->admitted = true;
  }
  auto arena = std::make_shared<Result<ipc::Arena>>(Status::Internal("not created"));
  offload([this, arena] { *arena = guarded([&] { return ipc::Arena::create(config_.server.arena_bytes); }); },
          [this, s, rid, arena] {
            if (s->closing) return finish_frame(s);  // the arena goes with the callback, rarely
            if (!arena->ok()) {
              s->hello_received = false;  // nothing was set up: another hello may try again
              reply_error(s, rid, arena->status());
              return finish_frame(s);
            }
            s->arena = std::move(arena->value());
            s->requests =
                ipc::RingConsumer<ipc::RequestDescriptor>(s->arena->request_control(), s->arena->request_slots());
            s->completions = ipc::RingProducer<ipc::CompletionDescriptor>(s->arena->completion_control(),
                                                                         s->arena->completion_slots());
            const ipc::ArenaLayout& l = s->arena->layout();
            json body{{"session", s->id}, {"tenant", s->tenant}, {"spin_us", config_.server.spin.count()}};
            ipc::put_layout(body, l);
            reply(s, ipc::FrameType::kHelloReply, rid, body, {s->arena->fd()});
            if (s->closing) return finish_frame(s);
            try {
              s->worker = std::thread([this, s] {
                run_worker(s);
                worker_exits(s);
              });
            } catch (const std::system_error& e) {
              // Out of threads (a task limit): this session cannot run, the daemon goes on.
              TUTEL_LOG(WARN) << "session " << s->id << ": cannot start its worker thread: " << e.what()
                              << "; closing it";
              close_session(s);
              return finish_frame(s);
            }
            TUTEL_LOG(INFO) << "session " << s->id << ": tenant " << s->tenant << ", pid " << s->peer.pid
                            << ", client '" << s->client_name << "'";
            finish_frame(s);
          });
}

// The metric counts client sessions, as `tutelctl status` does: admin connections (tutelctl
// itself, closed asynchronously) are not the trainers it reports on.
void DaemonImpl::publish_session_count() { metrics_.set_active_sessions(connected_clients()); }

int64_t DaemonImpl::connected_clients() const {
  // Not those tuteld closed, waiting for their clients to let go (a tenant's closing_sessions).
  int64_t clients = 0;
  for (const auto& [id, session] : sessions_) clients += session->admin || session->lingering ? 0 : 1;
  return clients;
}

void DaemonImpl::close_session(const std::shared_ptr<Session>& s) {
  if (s->closing) return;
  s->closing = true;
  s->stop = true;
  if (s->arena) s->requests.wake();
  // A client that hung up reads nothing more: what it was lent goes with the session. One tuteld
  // closes itself (a protocol error, unread replies) may still be reading its last results, and
  // its tensors may point into its regions: what it was lent stays until it lets go of the
  // connection, and the session keeps its place under max_sessions until then (else a client
  // could collect the daemon's memory by provoking closes and keeping the descriptors). At
  // shutdown nothing waits for the clients.
  s->lingering = !s->admin && s->admitted && !s->client_hung_up && !shutting_down_;
  if (s->lingering) {
    (void)::shutdown(s->fd.get(), SHUT_WR);  // the client reads the end of the stream at once
    // Only its hang-up is watched now; what it still sends is read and dropped, so that a client
    // still writing is not blocked for good on a full socket.
    uv_poll_start(&s->poll, UV_READABLE | UV_DISCONNECT, [](uv_poll_t* h, int status, int) {
      Session* session = static_cast<Session*>(h->data);
      if (status < 0 || drain_to_end(session->fd.get()))
        session->daemon->on_client_let_go(session->shared_from_this());
    });
    publish_session_count();
  } else {
    stop_polling(s);
  }
  // The worker finishes its current request first (a group layer's may wait on its peers up to
  // the collective timeout): the teardown goes on once it has exited, and nothing waits for it
  // meanwhile (joining it on the pool held a pool thread per closing session, which one tenant
  // could use to stall every tenant's connects and layer calls).
  if (!s->worker.joinable() || s->worker_exited) tear_down(s);
}

void DaemonImpl::worker_exits(const std::shared_ptr<Session>& s) {
  {
    std::lock_guard lock(exited_workers_mutex_);
    exited_workers_.push_back(s);
  }
  uv_async_send(&worker_exits_);
}

void DaemonImpl::on_workers_exited() {
  std::vector<std::shared_ptr<Session>> exited;
  {
    std::lock_guard lock(exited_workers_mutex_);
    exited.swap(exited_workers_);
  }
  for (const auto& s : exited) {
    s->worker_exited = true;
    if (s->closing) {
      tear_down(s);
    } else if (s->ring_corrupt.load()) {
      // The worker stopped on its own. The client may still be reading its last results: it is
      // told why, and keeps what it was lent until it lets go (close_session, lingering).
      TUTEL_LOG(WARN) << "session " << s->id << ": request ring indices are corrupt; the session is closed";
      reply_error(s, 0,
                  Status::Corruption("the request ring's indices are corrupt (head - tail > " +
                                     std::to_string(ipc::kRingSlots) +
                                     "): only the client writes them; the session is closed"));
      close_session(s);
    }
  }
}

void DaemonImpl::tear_down(const std::shared_ptr<Session>& s) {
  // Its thread has returned or is about to: the join takes microseconds.
  if (s->worker.joinable()) s->worker.join();
  // Unpin the arena and forget the session's pending forwards (both take locks a busy layer
  // holds: off the loop).
  offload([this, s] {
            s->pinned.reset();
            if (!s->lingering) give_back_lent(*s);
            // Only its tenant's layers can hold its forwards; another tenant's layer may be held
            // for a whole collective (a group waiting on its peers), which this must not wait for.
            if (!s->admin)
              for (const LayerRef& ref : registry_->all())
                if (ref.layer->tenant() == s->tenant) ref.layer->drop_pending(s->id);
          },
          [this, s] {
            s->torn_down = true;
            if (!s->lingering) return forget_session(s);
            if (s->client_hung_up || shutting_down_) release_lingering(s);
          });
}

void DaemonImpl::stop_polling(const std::shared_ptr<Session>& s) {
  if (uv_is_closing(reinterpret_cast<uv_handle_t*>(&s->poll))) return;
  uv_poll_stop(&s->poll);
  // The session owns the poll handle, which must outlive its close callback.
  s->keep_alive = s;
  uv_close(reinterpret_cast<uv_handle_t*>(&s->poll),
           [](uv_handle_t* h) { static_cast<Session*>(h->data)->keep_alive.reset(); });
}

bool DaemonImpl::drain_to_end(int fd) {
  // A pass reads at most 256 KiB: a client that keeps writing shares the loop like any other.
  char dropped[16384];
  for (int i = 0; i < 16; ++i) {
    const ssize_t n = ::recv(fd, dropped, sizeof(dropped), MSG_DONTWAIT);
    if (n > 0) continue;
    if (n < 0 && errno == EINTR) continue;
    return n == 0 || (errno != EAGAIN && errno != EWOULDBLOCK);  // the end, or the connection failed
  }
  return false;
}

void DaemonImpl::give_back_lent(Session& s) {
  // Pages of a client that let go are freed also where it kept the descriptors.
  s.regions.close(s.client_hung_up);
  if (s.client_hung_up && s.arena) s.arena->discard_pages();
  s.arena.reset();  // unmapped here, not on the loop (tens of ms per 64 MiB)
}

void DaemonImpl::on_client_let_go(const std::shared_ptr<Session>& s) {
  s->client_hung_up = true;
  stop_polling(s);
  if (s->torn_down) release_lingering(s);
}

void DaemonImpl::release_lingering(const std::shared_ptr<Session>& s) {
  if (s->released) return;
  s->released = true;
  stop_polling(s);
  offload([this, s] { give_back_lent(*s); }, [this, s] { forget_session(s); });
}

void DaemonImpl::forget_session(const std::shared_ptr<Session>& s) {
  sessions_.erase(s->id);
  publish_session_count();
  s->fd.reset();
  close_worker_exits_once_idle();
}

void DaemonImpl::close_worker_exits_once_idle() {
  // Open until the last session has gone: a closing session's worker still reports through it.
  if (shutting_down_ && sessions_.empty() && !uv_is_closing(reinterpret_cast<uv_handle_t*>(&worker_exits_)))
    uv_close(reinterpret_cast<uv_handle_t*>(&worker_exits_), nullptr);
}

std::vector<std::string> DaemonImpl::other_active_tenants(const std::string& tenant) const {
  std::vector<std::string> others;
  for (const TenantConfig& t : config_.tenants)
    if (t.name != tenant && (client_sessions(t.name, SessionState::kOpen) > 0 || creation_slots_.in_use(t.name) > 0))
      others.push_back(t.name);
  return others;
}

int DaemonImpl::checkpoint_all() {
  if (config_.server.state_dir.empty()) return 0;
  int failed = 0;
  for (const LayerRef& ref : registry_->all()) {
    const fs::path dir = fs::path(config_.server.state_dir) / ref.layer->tenant();
    std::error_code ec = create_directories_durably(dir);
    const std::string path = (dir / (ref.layer->name() + ".safetensors")).string();
    const bool had_one = fs::exists(path, ec);
    // One layer's failure (out of memory, a full disk) is that layer's: the others are still written.
    const Status st = guarded([&] { return ref.layer->save(path); });
    if (st.ok()) {
      TUTEL_LOG(INFO) << "checkpointed " << ref.layer->tenant() << "/" << ref.layer->name() << " to " << path;
      continue;
    }
    ++failed;
    TUTEL_LOG(ERROR) << "checkpoint of " << ref.layer->tenant() << "/" << ref.layer->name() << " failed: " << st
                     << (had_one ? " (" + path + " keeps its earlier checkpoint)"
                                 : " (the layer had no earlier checkpoint: a restart will not bring it back)");
  }
  return failed;
}

void DaemonImpl::start_checkpoint_round() {
  if (shutting_down_) return;
  if (checkpoint_round_) {
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - checkpoint_round_->started).count();
    TUTEL_LOG(WARN) << "periodic checkpoints: the round started " << secs << " s ago is still writing ("
                    << checkpoint_round_->next << " of " << checkpoint_round_->layers.size()
                    << " layers begun); this one is skipped (a slow disk, or a group layer waiting on its peers; "
                       "a longer server.checkpoint_interval_s writes less often)";
    metrics_.count_checkpoint_round_skipped();
    return;
  }
  checkpoint_round_ = std::make_unique<CheckpointRound>();
  checkpoint_round_->started = std::chrono::steady_clock::now();
  // The references go off the loop: a destroy may have let go of its layer meanwhile, and the
  // last reference's destructor waits for the layer's rank.
  std::vector<LayerRef> refs = layers_on_loop();
  for (const LayerRef& ref : refs)
    // Not a group layer: each daemon's timer would write its ranks at other steps than its
    // peers' (a round between two steps here, after the next one there), and a group whose
    // ranks' files disagree cannot be created from them again. Its checkpoints stay the exit's
    // and its clients' saves, which the group's steps keep in line.
    if (!ref.layer->definition().group) checkpoint_round_->layers.push_back({ref.layer->tenant(), ref.handle});
  release_off_loop(std::move(refs));
  checkpoint_next_layer();
}

void DaemonImpl::checkpoint_next_layer() {
  CheckpointRound& round = *checkpoint_round_;
  if (round.next == round.layers.size() || shutting_down_) {  // the exit writes every layer anyway
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - round.started).count();
    std::ostringstream summary;
    summary << "periodic checkpoints: " << round.written << " layer(s) written, " << round.unchanged << " unchanged, "
            << round.failed << " failed, in " << secs << " s";
    if (round.failed > 0) TUTEL_LOG(WARN) << summary.str();
    else if (round.written > 0) TUTEL_LOG(INFO) << summary.str();
    checkpoint_round_.reset();
    return;
  }
  const auto [tenant, handle] = round.layers[round.next++];
  struct Outcome {
    std::string name;
    Result<bool> written = false;  // false: unchanged, or destroyed meanwhile
  };
  auto outcome = std::make_shared<Outcome>();
  // As layer work: after the frames its clients sent before, and never beside its destroy, which
  // removes the file a save running beside it would put back (the layer restored at the next
  // start, destroyed as it was).
  run_layer_work(
      handle,
      [this, tenant, handle, outcome] {
        // Looked up here, on the pool: a destroyed layer's last reference may be this one, and
        // its destructor waits for its rank.
        const Result<LayerRef> ref = registry_->find(tenant, handle);
        // Once the daemon stops, the exit's checkpoint writes every layer: a round's layers still
        // queued would only make it wait (the exit's deadline is the service manager's).
        if (!ref.ok() || ref->layer->destroyed() || stopping_->load(std::memory_order_acquire)) return;
        outcome->name = ref->layer->name();
        const fs::path dir = fs::path(config_.server.state_dir) / tenant;
        (void)create_directories_durably(dir);  // a failure shows as the save's own
        const std::string path = (dir / (outcome->name + ".safetensors")).string();
        outcome->written = guarded([&] { return ref->layer->checkpoint_if_changed(path); });
      },
      [this, tenant, outcome] {
        CheckpointRound& r = *checkpoint_round_;
        if (!outcome->written.ok()) {
          ++r.failed;
          TUTEL_LOG(ERROR) << "periodic checkpoint of " << tenant << "/" << outcome->name
                           << " failed: " << outcome->written.status()
                           << " (the next round tries again)";
        } else if (*outcome->written) {
          ++r.written;
        } else if (!outcome->name.empty()) {
          ++r.unchanged;
        }
        if (!outcome->name.empty())
          metrics_.count_checkpoint(!outcome->written.ok() ? "failed" : *outcome->written ? "written" : "unchanged");
        checkpoint_next_layer();
      });
}

void DaemonImpl::shutdown() {
  if (shutting_down_) return;
  shutting_down_ = true;
  stopping_->store(true, std::memory_order_release);  // group layers still meeting their peers give up
  uv_poll_stop(&client_poll_);
  uv_poll_stop(&admin_poll_);
  uv_close(reinterpret_cast<uv_handle_t*>(&client_poll_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&admin_poll_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&accept_pause_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&hello_sweep_), nullptr);
  if (uv_is_active(reinterpret_cast<uv_handle_t*>(&checkpoint_timer_)))
    uv_close(reinterpret_cast<uv_handle_t*>(&checkpoint_timer_), nullptr);  // the exit's checkpoints follow
  // Signals are still taken through the drain (here) and the exit checkpoints (logged:
  // run()); a second SIGTERM used to kill the daemon between two layers' checkpoints, losing
  // the rest. They no longer keep the loop alive.
  signal_watcher_->unref();
  if (metrics_http_) metrics_http_->close();  // and its connections, which would keep the loop alive
  ::unlink(config_.server.client_socket.c_str());
  ::unlink(config_.server.admin_socket.c_str());
  client_fd_.reset();
  admin_fd_.reset();
  // Sessions finish their current request and close; the loop ends when the last handle and
  // the last offloaded job are done, and run() then writes the checkpoints. A request waiting
  // in a collective on peers that stopped calling gives up after the grace.
  if (config_.server.shutdown_grace.count() == 0) {
    abandon_collectives();
  } else {
    uv_timer_init(&loop_, &abandon_timer_);
    abandon_timer_.data = this;
    uv_timer_start(
        &abandon_timer_, [](uv_timer_t* t) { static_cast<DaemonImpl*>(t->data)->abandon_collectives(); },
        static_cast<uint64_t>(config_.server.shutdown_grace.count()), 0);
    uv_unref(reinterpret_cast<uv_handle_t*>(&abandon_timer_));
  }
  std::vector<std::shared_ptr<Session>> open;
  for (auto& [id, s] : sessions_) open.push_back(s);
  for (auto& s : open) {
    close_session(s);
    // One tuteld closed before waits no longer for its client (its worker may still be joining:
    // then it is released once joined).
    if (s->lingering && s->torn_down) release_lingering(s);
    else if (s->lingering) stop_polling(s);
  }
  close_worker_exits_once_idle();
}

void DaemonImpl::abandon_collectives() {
  TUTEL_LOG(WARN) << "shutting down, shutdown_grace_ms (" << config_.server.shutdown_grace.count()
                  << " ms) passed: group layers' collectives waiting now or started from now on give up";
  abandon_collectives_->store(true, std::memory_order_release);
}

int DaemonImpl::run() {
  uv_run(&loop_, UV_RUN_DEFAULT);
  signal_watcher_->loop_ended();  // signals during the exit checkpoints are logged, not acted on
  // A failed exit checkpoint is no clean stop: a service manager or script must see it (the
  // layer's training since its last checkpoint is lost, or the layer itself).
  if (const int failed = checkpoint_all(); failed > 0) {
    TUTEL_LOG(ERROR) << "tuteld stopped; " << failed << " exit checkpoint(s) failed (see above)";
    exit_code_ = kExitCheckpointFailed;
  } else {
    TUTEL_LOG(INFO) << "tuteld stopped";
    exit_code_ = 0;
  }
  return *exit_code_;
}

Result<std::unique_ptr<Daemon>> Daemon::create(Config config) {
  auto impl = std::make_unique<DaemonImpl>(std::move(config));
  TUTEL_RETURN_IF_ERROR(impl->start());
  return std::unique_ptr<Daemon>(new Daemon(std::move(impl)));
}

Daemon::Daemon(std::unique_ptr<DaemonImpl> impl) : impl_(std::move(impl)) {}
Daemon::~Daemon() = default;
int Daemon::run() { return impl_->run(); }

}  // namespace tutel::daemon
