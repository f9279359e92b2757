// The daemon's internals, shared by daemon.cpp (lifecycle, sockets, control frames),
// data_path.cpp (the per-session request worker) and admin.cpp (admin frames, the metrics endpoint).
#pragma once

#include <uv.h>

#include <atomic>
#include <chrono>
#include <deque>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "checkpoint_quota.hpp"
#include "metrics.hpp"
#include "metrics_http.hpp"
#include "pool_shares.hpp"
#include "registry.hpp"
#include "session.hpp"
#include "signal_watcher.hpp"
#include "tutel/comm/cluster.hpp"
#include "tutel/comm/rendezvous.hpp"
#include "tutel/core/process_lock.hpp"
#include "tutel/daemon/config.hpp"

namespace tutel::daemon {

// Directory changes made durable, as a file's write and rename are (write_safetensors syncs the
// file and its directory): after a power loss a save's new directories, a checkpoint moved aside
// and a destroyed layer's removed checkpoint stay as the daemon left them.
// Creates `dir` and its missing parents, syncing the parent of each directory it created.
std::error_code create_directories_durably(const std::filesystem::path& dir);
// Syncs the directory `dir` (after a rename or removal in it); failures are only logged.
void sync_directory(const std::filesystem::path& dir);

class DaemonImpl {
 public:
  explicit DaemonImpl(Config config);
  ~DaemonImpl();

  Status start();  // ranks, state restore, config layers, sockets
  int run();

  // --- used across the daemon's source files ---
  const Config& config() const { return config_; }
  Registry& registry() { return *registry_; }
  Metrics& metrics() { return metrics_; }

  // Queues a reply frame and writes what the socket takes (on the loop thread); the rest goes
  // as the client reads. A failure, or too much left unread, closes the session.
  void reply(const std::shared_ptr<Session>& s, ipc::FrameType type, uint32_t request_id,
             const nlohmann::json& body, const std::vector<int>& fds = {});
  void reply_error(const std::shared_ptr<Session>& s, uint32_t request_id, const Status& status);
  // Runs `work` on libuv's thread pool, then `done` on the loop thread.
  void offload(std::function<void()> work, std::function<void()> done);
  // The registry's layers for a reply or a scrape on the loop thread, and their release, which
  // goes to the pool: a layer destroyed meanwhile is destroyed by whoever drops its last
  // reference, and its destructor waits for its rank's device lock (another layer's forward
  // may hold it for seconds) or, on a group layer, closes its communicators.
  std::vector<LayerRef> layers_on_loop() { return registry_->all(); }
  void release_off_loop(std::vector<LayerRef> layers);
  void close_session(const std::shared_ptr<Session>& s);
  // close_session's parts, on the loop thread: stops watching the socket (once); gives back an
  // arena and regions (on the pool); the client of a session tuteld closed let go of the
  // connection; what such a session was lent goes, and then the session; it leaves the table.
  void stop_polling(const std::shared_ptr<Session>& s);
  static void give_back_lent(Session& s);
  // Reads and drops what the socket holds; true at its end (or once the connection failed).
  static bool drain_to_end(int fd);
  void on_client_let_go(const std::shared_ptr<Session>& s);
  void release_lingering(const std::shared_ptr<Session>& s);
  void forget_session(const std::shared_ptr<Session>& s);
  // Its worker has exited (or never started): unpins, gives back, forgets.
  void tear_down(const std::shared_ptr<Session>& s);
  void worker_exits(const std::shared_ptr<Session>& s);  // on the worker's thread, its last act
  void on_workers_exited();
  void close_worker_exits_once_idle();

  // data_path.cpp
  void run_worker(const std::shared_ptr<Session>& s);
  // admin.cpp
  void handle_admin_frame(const std::shared_ptr<Session>& s, ipc::Frame frame);
  Status start_metrics_server();
  nlohmann::json status_json() const;
  nlohmann::json peers_json();
  // The Prometheus text, with the cluster's and the groups' live state read just now.
  std::string metrics_text();

 private:
  Status read_secrets();  // the tenants' and the peers' (config paths), at start
  Status join_cluster();  // and, on node 0, start the rendezvous service
  std::shared_ptr<const GroupRendezvous> group_rendezvous() const;
  Status start_ranks();
  // A layer checkpointed in state_dir that a start brings back (group layers are not).
  struct Checkpointed {
    std::string tenant, spec;
    LayerDefinition def;     // restored from the file (weights_path names it)
    LayerDefinition origin;  // as the file's spec says it was created
    bool by_client = false;    // its tuteld.origin: a client created it (files before the key: unknown)
    bool by_config = false;    // its tuteld.origin: a [[layer]] of the config
  };
  // Logs each directory of state_dir that holds checkpoints of a tenant the config does not name.
  void warn_of_unconfigured_tenants() const;
  // An operator's checkpoint (tutelctl checkpoint) may go anywhere but among state_dir's own
  // files: inside state_dir, only into a tenant's checkpoints/ (where its clients load files).
  Status check_operator_checkpoint_path(const std::string& path) const;
  // Every such layer, or an error naming the file or directory that cannot be read.
  Result<std::vector<Checkpointed>> checkpointed_layers() const;
  // The layers of state_dir and of the config file, the config's first.
  Status restore_state();
  // Before a layer is created under a name: a group layer created with the spec of its
  // checkpoint in state_dir resumes from it; another layer's checkpoint there moves aside
  // (keep_superseded), never replaced.
  // `why`: what the moved checkpoint is, for the log ("was written for another spec").
  Status prepare_checkpoint(const std::string& tenant, LayerDefinition& def,
                            const std::string& why = "was written for another spec") const;
  Status keep_superseded(const std::string& tenant, const std::string& name, const std::filesystem::path& path,
                         const std::string& why) const;
  // Checkpoints moved aside (superseded, or left out at start), by "<tenant>/<name>": the file's
  // name among the tenant's checkpoints, until a creation of that name has told its client.
  void note_kept_aside(const std::string& tenant, const std::string& name, const std::string& file) const;
  std::optional<std::string> kept_aside(const std::string& tenant, const std::string& name, bool forget) const;
  // Takes the instance locks of both sockets and of state_dir (creating it), or fails naming the
  // daemon that holds one.
  Status lock_instance();
  Status listen(const std::string& path, mode_t mode, std::optional<uint32_t> group, bool admin, uv_poll_t* poll,
                ipc::UniqueFd* fd);
  void accept_on(bool admin);
  void start_accepting(bool admin);  // polls that listener
  // Out of descriptors: stops accepting for 100 ms (accept_pause_), then resume_accepting().
  void pause_accepting(int err);
  void resume_accepting();
  void poll_session(const std::shared_ptr<Session>& s);  // polls its socket for what it waits for
  void flush_replies(const std::shared_ptr<Session>& s);
  void on_readable(const std::shared_ptr<Session>& s);
  void pump(const std::shared_ptr<Session>& s);
  void handle_client_frame(const std::shared_ptr<Session>& s, ipc::Frame frame);
  void handle_hello(const std::shared_ptr<Session>& s, const ipc::Frame& frame);
  void finish_frame(const std::shared_ptr<Session>& s);
  void shutdown();
  void publish_session_count();  // on the loop thread
  // Client sessions connected, as the status and the metric count them (on the loop thread).
  int64_t connected_clients() const;
  // The tenant's client sessions in one state, on the loop thread: still awaiting their hello,
  // admitted (past it) and open, or admitted and closing (max_sessions counts both of these).
  enum class SessionState { kAwaitingHello, kOpen, kClosing };
  int64_t client_sessions(const std::string& tenant, SessionState state) const;
  // Closes the tenant's oldest session that has not sent its hello (room for a new connection).
  void evict_oldest_silent(const std::string& tenant);
  // ResourceExhausted when the tenant has max_sessions of them already.
  Status sessions_full(const std::string& tenant) const;
  // Closes client sessions that have not sent their hello within hello_timeout (hello_sweep_).
  void close_silent_sessions();
  // Writes every layer's exit checkpoint; returns how many failed (each one logged).
  int checkpoint_all();
  // [server] checkpoint_interval_s: checkpoint_timer_ starts a round, which writes the layers
  // whose parameters changed since their last checkpoint (ServedLayer::checkpoint_if_changed),
  // one at a time, each as its layer's work. A round still writing when the next is due makes
  // that one skip. Loop thread.
  struct CheckpointRound {
    std::chrono::steady_clock::time_point started;
    std::vector<std::pair<std::string, uint64_t>> layers;  // (tenant, handle) as the round began
    size_t next = 0;                                       // layers[next] is the next to begin
    int64_t written = 0, unchanged = 0, failed = 0;
  };
  void start_checkpoint_round();
  void checkpoint_next_layer();  // or ends the round
  uv_timer_t checkpoint_timer_{};
  std::unique_ptr<CheckpointRound> checkpoint_round_;  // the round writing now, if any

  // SIGTERM, SIGINT. First, so destroyed last: a signal ends a teardown that hangs in any member
  // below (release_loop()).
  std::unique_ptr<SignalWatcher> signal_watcher_;
  std::optional<int> exit_code_;  // what run() returned; a signal in the teardown keeps it
  Config config_;
  // Per tenant, with state_dir: its clients' saves against its max_checkpoint_bytes. Made at
  // start, never changed after (the quotas are thread-safe).
  std::map<std::string, std::unique_ptr<CheckpointQuota>> checkpoint_quotas_;
  // Tenants with a secret_file: the secret their clients' hellos must carry, in hex.
  std::map<std::string, std::string> tenant_secrets_;
  // [server] peer_secret_file: what the daemons of a deployment prove to each other; null: none.
  std::shared_ptr<const std::string> peer_secret_;
  std::unique_ptr<comm::Cluster> cluster_;  // with [cluster]: the other daemons
  // On node 0 of a cluster: where groups without a coordinator meet, for the daemon's life.
  std::unique_ptr<comm::RendezvousService> rendezvous_;
  uv_loop_t loop_{};
  std::vector<std::unique_ptr<Rank>> ranks_;
  std::unique_ptr<Registry> registry_;
  // Per tenant: region memory its clients may still map (device_regions.hpp). After ranks_, so
  // it is freed while the ranks' backends are alive.
  std::map<std::string, std::shared_ptr<RetiredRegions>> retired_regions_;
  Metrics metrics_;
  // One daemon per socket and per state_dir (lock_instance()); held until the daemon is gone.
  std::vector<ProcessLock> instance_locks_;
  ipc::UniqueFd client_fd_, admin_fd_;
  uv_poll_t client_poll_{}, admin_poll_{};
  // A session's worker reports here as it exits (from its own thread); the loop then tears the
  // session down if it is closing (on_workers_exited).
  uv_async_t worker_exits_{};
  mutable std::mutex kept_aside_mutex_;
  mutable std::map<std::string, std::string> kept_aside_;  // guarded by kept_aside_mutex_
  std::mutex exited_workers_mutex_;
  std::vector<std::shared_ptr<Session>> exited_workers_;  // guarded by exited_workers_mutex_
  uv_timer_t accept_pause_{};
  uv_timer_t hello_sweep_{};
  bool accepting_paused_ = false;
  std::unique_ptr<MetricsHttpServer> metrics_http_;  // with server.metrics_listen
  // The most control frames any session had waiting, and how often a session's reads were
  // paused for a full queue (pump); shown by the admin status.
  uint64_t queued_frames_peak_ = 0;
  uint64_t reads_paused_ = 0;
  // Set by tutelctl drain: no new client sessions, no new layers; the open sessions go on.
  bool draining_ = false;
  Status draining_status(const std::string& what) const;  // the refusal, naming `what`
  std::map<uint64_t, std::shared_ptr<Session>> sessions_;
  uint64_t next_session_ = 1;
  bool shutting_down_ = false;
  // Layer creations at once: half the thread pool (from start()), shared between the active
  // tenants (pool_shares.hpp); beyond its share a creation is refused. Loop thread.
  PoolShares creation_slots_;
  // A layer's control frames (step, zero_grad, save, load, destroy) run one at a time, in the
  // order they came, whichever sessions sent them: they would take the layer's lock one at a
  // time anyway, and a group layer may hold it for a whole collective, so waiting here holds no
  // thread of the pool. Handles of layers with a frame running, and what waits behind it.
  struct LayerWork {
    std::function<void()> work, done;
  };
  std::map<uint64_t, std::deque<LayerWork>> layer_work_;
  // Runs `work` on the pool (then `done` on the loop) once the frames before it on `handle`'s
  // layer have finished.
  void run_layer_work(uint64_t handle, std::function<void()> work, std::function<void()> done);
  // Destroys `tenant`'s layer `handle` (a client's destroy, tutelctl destroy), as layer work on
  // the pool: its checkpoint in state_dir, its place in the registry, its series.
  Status destroy_layer(const std::string& tenant, uint64_t handle);
  void start_layer_work(uint64_t handle, LayerWork w);
  // The tenants other than `tenant` that are active now: a client session connected, or a
  // creation under way.
  std::vector<std::string> other_active_tenants(const std::string& tenant) const;
  // Raised with shutting_down_, for the pool threads: see Rank::stopping.
  std::shared_ptr<std::atomic<bool>> stopping_ = std::make_shared<std::atomic<bool>>(false);
  // Raised by abandon_timer_, server.shutdown_grace after the shutdown began: see
  // Rank::abandon_collectives. The timer is unreferenced: it never holds the loop open.
  std::shared_ptr<std::atomic<bool>> abandon_collectives_ = std::make_shared<std::atomic<bool>>(false);
  uv_timer_t abandon_timer_{};
  void abandon_collectives();
  std::chrono::steady_clock::time_point started_at_;
};

}  // namespace tutel::daemon
