// tuteld's configuration file and the layer specs of create-layer requests (docs/config.md).
//
// Both are TOML, parsed with toml++ behind this header (it never leaks into includers). Every
// error is a Status::InvalidArgument whose message starts with "<source>:<line>:<column>: " and
// the key path ("tenant[1].max_layers", "layer[0].optimizer.lr"), so a user can jump to it.
// Parsing never throws and never aborts, whatever the input.
//
// Thread-safety: every function is reentrant; the structs are plain values.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "tutel/comm/communicator.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/core/status.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::daemon {

enum class OptimizerKind { kSgd, kAdamW };

// "sgd" | "adamw".
std::string_view optimizer_kind_name(OptimizerKind kind);

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kAdamW;
  float lr = 1e-3f;
  float momentum = 0.f;   // SGD only
  bool nesterov = false;  // SGD only; needs momentum > 0
  float weight_decay = 0.f;
  // AdamW only. The betas are kept as written (double), as PyTorch keeps them: the moments'
  // weights 1 − beta computed from an f32 beta2 = 0.999 are 1.3e-5 off (AdamWArgs).
  double beta1 = 0.9, beta2 = 0.999;
  float eps = 1e-8f;
};

// An expert-parallel group: this layer is one rank of a layer spread over `size` ranks (on this
// and other daemons), which meet at `coordinator` (the daemon serving rank 0 listens there).
struct GroupConfig {
  // Where the daemon serving rank 0 listens for the group's bootstrap. Port 0 (no `coordinator`
  // key): the group meets by `name` at the cluster's rendezvous service instead.
  std::string coordinator_host = "127.0.0.1";  // a numeric IPv4 address
  uint16_t coordinator_port = 0;
  // [A-Za-z0-9_.-]{1,64}; required without a coordinator. Scoped by tenant: the ranks of one
  // tenant's group "g" never meet another tenant's "g".
  std::string name;
  int size = 1;
  int rank = 0;
  int local_size = 1;  // ranks per node, for the 2DH all-to-all
  // r: 1, expert parallel (tokens travel to the experts); 0, data parallel (every rank gathers
  // every expert's weights, tokens stay); none ("auto"): the tuner chooses.
  std::optional<int> r = 1;
  // How the layer's all-to-alls run (r = 1): kLinear, or k2DH (needs local_size to divide size);
  // none ("auto"): the tuner measures what can differ on this group per capacity bucket.
  std::optional<comm::AllToAllAlgo> all_to_all = comm::AllToAllAlgo::kLinear;
  // d, the expert phase's chunks (1..64); none ("auto"): the tuner chooses.
  std::optional<int> pipeline = 1;
  // With "auto": per capacity bucket, uncounted rounds over the candidates, then counted ones.
  int tune_warmups = 1;
  int tune_trials = 2;

  // Whether the tuner chooses anything: r, all_to_all or pipeline is "auto".
  bool tuned() const { return !r || !all_to_all || !pipeline; }
  std::chrono::milliseconds bootstrap_timeout{10'000};
  std::chrono::milliseconds collective_timeout{5'000};
};

// One served layer: a [[layer]] table of the daemon config, or the spec of a create-layer
// request (the same keys, without `tenant`).
struct LayerDefinition {
  std::string name;  // [A-Za-z0-9_.-]{1,64}
  LayerSpec spec;    // alignment stays 1: the plan that runs the layer sets it
  OptimizerConfig optimizer;
  // A safetensors file with Tutel's parameter names. In the daemon config a relative path is
  // resolved against the config file's directory; in a request it is kept as written.
  std::optional<std::string> weights_path;
  std::optional<uint64_t> init_seed;  // exactly one of weights_path / init_seed is set
  std::string tenant;                 // only from the daemon config's [[layer]] tables
  std::optional<GroupConfig> group;   // [group]: expert parallelism across ranks
  // The token buckets of the layer's plans (a layer without [group]), strictly ascending, at
  // most kMaxTokenBuckets: their plans are built when the layer is created, and past the last
  // one the buckets keep doubling. Empty: 64, 128, 256, ..., each built at its first request.
  std::vector<int64_t> token_buckets;
  // Set by the daemon, never parsed nor formatted: the tuner record (metadata "tuteld.tuning") of
  // the group layer's own checkpoint in state_dir that weights_path names, when it resumes from
  // one that has a record; its decisions are taken back where they hold. "": none.
  std::string resumed_tuning;
};
inline constexpr size_t kMaxTokenBuckets = 16;

// Parses a create-layer request's spec: the keys of a [[layer]] table at the top level, the
// optimizer in an [optimizer] table. `source_name` prefixes error messages ("request").
Result<LayerDefinition> parse_layer_spec(std::string_view toml_text, std::string_view source_name);

// The canonical TOML text of a layer definition (without `tenant`): every key written, floats
// in their shortest exact form, so parse_layer_spec(format_layer_spec(d)) == d.
std::string format_layer_spec(const LayerDefinition& def);

// The daemon's own entry in state_dir (its instance lock): no tenant may be named so, since a
// tenant's checkpoints are state_dir/<tenant>/.
inline constexpr const char* kStateDirLockName = "tuteld.lock";

struct TenantConfig {
  std::string name;  // [A-Za-z0-9_.-]{1,64}, unique
  // A client belongs to the tenant whose uids hold its SO_PEERCRED uid; failing that, whose
  // gids hold its gid. A uid (or gid) appears in at most one tenant.
  std::vector<uint32_t> uids, gids;
  int64_t max_layers = 64;
  uint64_t max_memory_bytes = 8ull << 30;  // weights + gradients + optimizer state + plans
  int64_t max_inflight = 256;              // requests submitted and not yet completed
  int64_t max_sessions = 64;               // client sessions connected at once
  // Its weight in the time of a rank it shares with other tenants' layers (FairLock).
  uint32_t share = 1;
  // What the checkpoints its clients save may hold on disk (state_dir/<tenant>/checkpoints).
  uint64_t max_checkpoint_bytes = 64ull << 30;
  // Absolute path of a file holding the tenant's secret; "" = none. With one, a client mapped to
  // the tenant must also present the secret in its hello. Read when the daemon starts.
  std::string secret_file;
};

struct BackendConfig {
  std::string kind = "cpu";  // "cpu" | "cuda"
  int ranks = 1;             // device slots this daemon serves
  int threads_per_rank = 0;  // CPU compute threads per rank; 0 = hardware threads / ranks
  std::vector<int> devices;  // cuda only: the device of each rank; empty = 0..ranks-1
};

struct ServerConfig {
  // Absolute after parsing (relative ones resolve against the config file's directory).
  std::string client_socket, admin_socket;
  // Who may connect to client_socket, by its mode and group (each client is then mapped to a
  // tenant by its credentials, and refused without one): 0660 and the daemon's group unless
  // client_socket_mode / client_socket_group say otherwise.
  uint32_t client_socket_mode = 0660;
  std::optional<uint32_t> client_socket_gid;  // client_socket_group resolved
  std::string client_socket_group;            // as written ("" = the daemon's group)
  std::string state_dir;  // "" = no checkpoint on exit and no restore on start
  // Every this often, the layers whose parameters changed since their last checkpoint are
  // written to state_dir as at exit, so a crash, SIGKILL or OOM kill loses at most this much
  // training. 0: only at exit. Needs state_dir.
  std::chrono::seconds checkpoint_interval{0};
  // "" disables the metrics endpoint. Only loopback: 127.0.0.0/8 or [::1], with a port.
  std::string metrics_listen = "127.0.0.1:9464";
  std::string metrics_host = "127.0.0.1";  // metrics_listen split; the host without brackets
  uint16_t metrics_port = 9464;            // 0 = any free port
  LogLevel log_level = LogLevel::kInfo;
  std::chrono::microseconds spin{50};              // wait policy: spin this long before blocking
  uint64_t arena_bytes = 64ull << 20;              // shared-memory arena per session
  // A client session that has not sent its hello by then is closed.
  std::chrono::milliseconds hello_timeout{10'000};
  // Absolute path of the secret every daemon of a deployment shares; "" = none. With one, the
  // cluster join, the rendezvous service and every group's bootstrap authenticate both ends
  // with it (HMAC-SHA256), and refuse peers without it. Read at start.
  std::string peer_secret_file;
  // The most a layer's [group] may ask for its bootstrap_timeout_ms and collective_timeout_ms:
  // a group layer holds a pool thread for its bootstrap, and its lock (so every request of that
  // layer) for each collective, so these bound how long one tenant's silent peers hold them.
  std::chrono::milliseconds max_bootstrap_timeout{600'000};
  std::chrono::milliseconds max_collective_timeout{600'000};
  // Where a layer's [group] may put a coordinator of its own (rank 0's daemon listens there,
  // the others connect): a port in [coordinator_ports.first, .second] (by default not a
  // privileged one, which a root daemon could bind for a client) and, when the list is not
  // empty, an address in one of `coordinator_networks`. Groups meeting at a cluster's
  // rendezvous service have no address of their own and are not checked.
  struct Ipv4Network {
    uint32_t address = 0;  // host byte order, the bits past the prefix zero
    int prefix = 0;        // 0..32
    std::string text;      // as written ("127.0.0.0/8"), for messages
    bool contains(uint32_t host_order_address) const;
    static uint32_t mask(int prefix);  // the prefix's bits set
  };
  std::vector<Ipv4Network> coordinator_networks;  // empty: any address
  std::pair<int, int> coordinator_ports{1024, 65535};
  // On SIGTERM, collectives still waiting this long after it give up (their peers are told):
  // a healthy step finishes in time, one waiting on peers that stopped calling does not hold
  // the shutdown (and the checkpoints written at its end) for its collective_timeout_ms.
  std::chrono::milliseconds shutdown_grace{5'000};
};

// [cluster]: this daemon is one node of a cluster of daemons (one per node) that meet at
// `coordinator` (node 0's daemon listens there) before serving, and watch each other's liveness.
struct ClusterConfig {
  std::string coordinator_host = "127.0.0.1";  // a numeric IPv4 address
  uint16_t coordinator_port = 0;
  int node_rank = 0;
  int nodes = 1;
  int ranks_per_node = 1;  // equals [backend] ranks
  // Where node 0's daemon runs the rendezvous service of groups without a coordinator, from the
  // end of the join (default: the coordinator's address, free again by then). The same on
  // every node.
  std::string rendezvous_host = "127.0.0.1";
  uint16_t rendezvous_port = 0;
  std::chrono::milliseconds bootstrap_timeout{30'000};
  std::chrono::milliseconds heartbeat_interval{250};
  std::chrono::milliseconds peer_timeout{3'000};
};

struct Config {
  std::string path;  // absolute path of the file (of source_name for parse_config)
  ServerConfig server;
  BackendConfig backend;
  std::optional<ClusterConfig> cluster;
  std::vector<TenantConfig> tenants;    // at least one
  std::vector<LayerDefinition> layers;  // every layer's tenant names one of `tenants`
};

// Whether `def` keeps within what [server] allows a layer (its group's timeouts and coordinator
// address); the error
// names the key, the limit and what to do.
Status check_layer_limits(const ServerConfig& server, const LayerDefinition& def);

// Reads and parses the file at `path`. Error messages name the path as given.
Result<Config> load_config(const std::string& path);
// Parses `toml_text` as if it were the file `source_name`: relative paths resolve against
// source_name's directory (the working directory when it has none).
Result<Config> parse_config(std::string_view toml_text, std::string_view source_name);

// The index in config.tenants of the tenant a client with this uid and gid belongs to.
std::optional<size_t> find_tenant(const Config& config, uint32_t uid, uint32_t gid);

}  // namespace tutel::daemon
