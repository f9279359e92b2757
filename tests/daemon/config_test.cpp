// tuteld.toml and layer-spec parsing: the example, defaults, paths, every validation rule (the
// message names the file, line and key path), the layer-spec round trip, and a fuzz loop.
#include "tutel/daemon/config.hpp"

#include "toml_nesting.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <ios>
#include <iterator>
#include <random>
#include <string>
#include <system_error>
#include <vector>

namespace tutel::daemon {
namespace {

namespace fs = std::filesystem;

const std::string kSource = "/etc/tuteld/t.toml";

const std::string kMinimal = R"(
[server]
client_socket = "/run/tuteld/client.sock"
admin_socket = "/run/tuteld/admin.sock"

[[tenant]]
name = "a"
uids = [1000]
)";

const std::string kLayer = R"(
[[layer]]
name = "moe0"
tenant = "a"
experts = 4
model_dim = 8
hidden = 16
init_seed = 7
)";

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// The 1-based line of the first line holding `marker`, or 0.
int line_of(const std::string& text, std::string_view marker) {
  const size_t at = text.find(marker);
  if (at == std::string::npos) return 0;
  return 1 + static_cast<int>(std::count(text.begin(), text.begin() + static_cast<long>(at), '\n'));
}

// Parses `text` and expects an InvalidArgument naming `path`, located on the line marked
// "#!" (when there is one), and holding each of `needles`.
void expect_error(const std::string& text, std::string_view path,
                  std::vector<std::string> needles = {}) {
  SCOPED_TRACE(text);
  const Result<Config> r = parse_config(text, kSource);
  ASSERT_FALSE(r.ok()) << "expected an error at " << path;
  EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument);
  const std::string m(r.status().message());
  EXPECT_NE(m.find(std::string(path) + ": "), std::string::npos) << m;
  EXPECT_EQ(m.rfind(kSource + ":", 0), 0u) << m;
  if (const int line = line_of(text, "#!"); line > 0) {
    EXPECT_EQ(m.rfind(kSource + ":" + std::to_string(line) + ":", 0), 0u)
        << "line " << line << ": " << m;
  }
  for (const std::string& n : needles)
    EXPECT_NE(m.find(n), std::string::npos) << "'" << n << "' in " << m;
}

Config parse_ok(const std::string& text, const std::string& source = kSource) {
  Result<Config> r = parse_config(text, source);
  EXPECT_TRUE(r.ok()) << r.status() << "\n" << text;
  return r.ok() ? std::move(r).value() : Config{};
}

// ---- Valid configs -------------------------------------------------------------------------

TEST(ConfigTest, ExampleConfigLoads) {
  Result<Config> r = load_config(TUTEL_EXAMPLE_CONFIG);
  ASSERT_TRUE(r.ok()) << r.status();
  const Config& c = *r;
  const fs::path dir = fs::path(TUTEL_EXAMPLE_CONFIG).lexically_normal().parent_path();
  EXPECT_EQ(c.path, fs::path(TUTEL_EXAMPLE_CONFIG).lexically_normal().string());
  EXPECT_EQ(c.server.client_socket, (dir / "run/client.sock").string());
  EXPECT_EQ(c.server.admin_socket, (dir / "run/admin.sock").string());
  EXPECT_EQ(c.server.state_dir, (dir / "state").string());
  EXPECT_EQ(c.server.metrics_host, "127.0.0.1");
  EXPECT_EQ(c.server.metrics_port, 9464);
  EXPECT_EQ(c.server.arena_bytes, 64ull << 20);
  EXPECT_EQ(c.backend.kind, "cpu");
  EXPECT_EQ(c.backend.ranks, 1);
  ASSERT_EQ(c.tenants.size(), 1u);
  EXPECT_EQ(c.tenants[0].name, "default");
  EXPECT_EQ(c.tenants[0].uids, std::vector<uint32_t>{0});
  EXPECT_EQ(c.tenants[0].max_memory_bytes, 8ull << 30);
  ASSERT_EQ(c.layers.size(), 1u);
  const LayerDefinition& l = c.layers[0];
  EXPECT_EQ(l.name, "moe0");
  EXPECT_EQ(l.tenant, "default");
  EXPECT_EQ(l.spec.experts, 8);
  EXPECT_EQ(l.init_seed, std::optional<uint64_t>(1));
  EXPECT_FALSE(l.weights_path.has_value());
  EXPECT_EQ(l.optimizer.kind, OptimizerKind::kAdamW);
  EXPECT_TRUE(l.spec.validate().ok());
}

// The example documents every default: parsed, it must equal the structs' own defaults.
TEST(ConfigTest, ExampleShowsTheDefaults) {
  const Config c = parse_ok(read_file(TUTEL_EXAMPLE_CONFIG));
  const ServerConfig s;
  EXPECT_EQ(c.server.metrics_listen, s.metrics_listen);
  EXPECT_EQ(c.server.log_level, s.log_level);
  EXPECT_EQ(c.server.spin, s.spin);
  EXPECT_EQ(c.server.arena_bytes, s.arena_bytes);
  EXPECT_EQ(c.server.hello_timeout, s.hello_timeout);
  EXPECT_EQ(c.server.max_bootstrap_timeout, s.max_bootstrap_timeout);
  EXPECT_EQ(c.server.max_collective_timeout, s.max_collective_timeout);
  EXPECT_EQ(c.server.shutdown_grace, s.shutdown_grace);
  EXPECT_EQ(c.server.checkpoint_interval, s.checkpoint_interval);
  EXPECT_EQ(c.server.coordinator_ports, s.coordinator_ports);
  EXPECT_TRUE(c.server.coordinator_networks.empty());
  const BackendConfig b;
  EXPECT_EQ(c.backend.threads_per_rank, b.threads_per_rank);
  const TenantConfig t;
  EXPECT_EQ(c.tenants[0].max_layers, t.max_layers);
  EXPECT_EQ(c.tenants[0].max_memory_bytes, t.max_memory_bytes);
  EXPECT_EQ(c.tenants[0].max_inflight, t.max_inflight);
  EXPECT_EQ(c.tenants[0].max_sessions, t.max_sessions);
  EXPECT_EQ(c.tenants[0].share, 1u);
  EXPECT_EQ(c.tenants[0].max_checkpoint_bytes, t.max_checkpoint_bytes);
  const LayerSpec d;
  const LayerSpec& l = c.layers[0].spec;
  EXPECT_EQ(l.k, d.k);
  EXPECT_EQ(l.capacity_factor, d.capacity_factor);
  EXPECT_EQ(l.normalize_gate, d.normalize_gate);
  EXPECT_EQ(l.is_postscore, d.is_postscore);
  const OptimizerConfig o;
  EXPECT_EQ(c.layers[0].optimizer.lr, o.lr);
  EXPECT_EQ(c.layers[0].optimizer.beta2, o.beta2);
  EXPECT_EQ(c.layers[0].optimizer.eps, o.eps);
}

// Periodic checkpoints are off unless asked for, and write to state_dir (refused without one,
// in the bad-input test below).
TEST(ConfigTest, CheckpointIntervalIsOffByDefaultAndInSeconds) {
  const std::string tenant = "[[tenant]]\nname = \"a\"\nuids = [1000]\n";
  const std::string server = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nstate_dir = \"s\"\n";
  EXPECT_EQ(parse_ok(server + tenant).server.checkpoint_interval, std::chrono::seconds(0));
  EXPECT_EQ(parse_ok(server + "checkpoint_interval_s = 900\n" + tenant).server.checkpoint_interval,
            std::chrono::seconds(900));
  EXPECT_EQ(parse_ok(server + "checkpoint_interval_s = 604800\n" + tenant).server.checkpoint_interval,
            std::chrono::hours(24 * 7));
}

// [server]'s bounds on a group's timeouts hold for the config's own [[layer]] tables too; the
// error points at the layer's group.
TEST(ConfigTest, AGroupLayerWithinTheServersTimeoutBounds) {
  const std::string server = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n"
                             "max_bootstrap_timeout_ms = 2000\nmax_collective_timeout_ms = 1000\n"
                             "shutdown_grace_ms = 0\n[[tenant]]\nname = \"a\"\nuids = [1000]\n";
  const std::string layer = "[[layer]]\nname = \"g\"\ntenant = \"a\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\n"
                            "init_seed = 1\n[layer.group] #!\ncoordinator = \"127.0.0.1:7001\"\nsize = 2\nrank = 0\n";
  const Config c = parse_ok(server + layer + "bootstrap_timeout_ms = 2000\ncollective_timeout_ms = 1000\n");
  EXPECT_EQ(c.server.max_bootstrap_timeout, std::chrono::milliseconds(2000));
  EXPECT_EQ(c.server.max_collective_timeout, std::chrono::milliseconds(1000));
  EXPECT_EQ(c.server.shutdown_grace, std::chrono::milliseconds(0));
  ASSERT_EQ(c.layers.size(), 1u);
  EXPECT_TRUE(check_layer_limits(c.server, c.layers[0]).ok());
  expect_error(server + layer + "bootstrap_timeout_ms = 2001\ncollective_timeout_ms = 1000\n", "layer[0].group",
               {"group.bootstrap_timeout_ms = 2001 is above this tuteld's [server] max_bootstrap_timeout_ms (2000)"});
  expect_error(server + layer + "bootstrap_timeout_ms = 2000\ncollective_timeout_ms = 1001\n", "layer[0].group",
               {"group.collective_timeout_ms = 1001 is above", "max_collective_timeout_ms (1000)"});
}

// Where a group may put a coordinator of its own: a port in coordinator_ports (not a privileged
// one by default) and an address in coordinator_networks (any while the list is empty).
TEST(ConfigTest, GroupCoordinatorsWithinTheServersNetworksAndPorts) {
  const std::string tenant = "[[tenant]]\nname = \"a\"\nuids = [1000]\n";
  const std::string server = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n";
  auto layer = [](const std::string& coordinator) {
    return "[[layer]]\nname = \"g\"\ntenant = \"a\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n"
           "[layer.group] #!\ncoordinator = \"" + coordinator + "\"\nsize = 2\nrank = 0\n";
  };
  const Config any = parse_ok(server + tenant + layer("127.0.0.1:1024"));
  EXPECT_TRUE(any.server.coordinator_networks.empty());
  EXPECT_EQ(any.server.coordinator_ports, (std::pair<int, int>{1024, 65535}));
  expect_error(server + tenant + layer("127.0.0.1:80"), "layer[0].group",
               {"group.coordinator 127.0.0.1:80: this tuteld's [server] coordinator_ports allow 1024 to 65535"});

  const std::string narrow = server + "coordinator_networks = [\"127.0.0.0/8\", \"127.0.0.1/32\"]\n"
                                      "coordinator_ports = [7000, 7099]\n" + tenant;
  const Config c = parse_ok(narrow + layer("127.1.2.3:7001"));
  ASSERT_EQ(c.server.coordinator_networks.size(), 2u);
  EXPECT_EQ(c.server.coordinator_networks[0].prefix, 8);
  EXPECT_TRUE(c.server.coordinator_networks[1].contains(0x7f000001u));
  EXPECT_FALSE(c.server.coordinator_networks[1].contains(0x7f000002u));
  expect_error(narrow + layer("127.0.0.1:7100"), "layer[0].group", {"allow 7000 to 7099"});
  const std::string only_one = server + "coordinator_networks = [\"127.0.0.2/32\"]\n" + tenant;
  expect_error(only_one + layer("127.0.0.1:7001"), "layer[0].group",
               {"group.coordinator 127.0.0.1:7001 is outside this tuteld's [server] coordinator_networks (127.0.0.2/32)"});
  // A network written with host bits is the network they are in; /0 is every address.
  EXPECT_TRUE(parse_ok(server + "coordinator_networks = [\"127.9.9.9/0\"]\n" + tenant + layer("127.0.0.1:7001"))
                  .server.coordinator_networks[0].contains(0x7f000001u));

  // Malformed values.
  expect_error(server + "coordinator_networks = \"127.0.0.0/8\" #!\n", "server.coordinator_networks",
               {"expected an array of IPv4 networks"});
  for (const char* bad : {"[\"127.0.0.1\"]", "[\"127.0.0.0/33\"]", "[\"x/8\"]", "[8]", "[\"127.0.0.0/\"]",
                          "[\"127.0.0.0/8x\"]", "[\"127.0.0.0/-1\"]"})
    expect_error(server + "coordinator_networks = " + bad + " #!\n", "server.coordinator_networks[0]",
                 {"expected an IPv4 network"});
  for (const char* bad : {"[1024]", "[2000, 1000]", "[1, 2, 3]", "\"1024-65535\""})
    expect_error(server + "coordinator_ports = " + bad + " #!\n", "server.coordinator_ports", {});
  expect_error(server + "coordinator_ports = [0, 10] #!\n", "server.coordinator_ports[0]", {"got 0"});
  expect_error(server + "coordinator_ports = [1, 65536] #!\n", "server.coordinator_ports[1]", {"got 65536"});
}

TEST(ConfigTest, DefaultsOfAMinimalConfig) {
  const Config c = parse_ok(kMinimal + kLayer);
  EXPECT_EQ(c.path, kSource);
  EXPECT_EQ(c.server.client_socket, "/run/tuteld/client.sock");
  EXPECT_EQ(c.server.state_dir, "");
  EXPECT_EQ(c.server.metrics_listen, "127.0.0.1:9464");
  EXPECT_EQ(c.server.log_level, LogLevel::kInfo);
  EXPECT_EQ(c.server.spin, std::chrono::microseconds(50));
  EXPECT_EQ(c.server.arena_bytes, 64ull << 20);
  EXPECT_EQ(c.backend.kind, "cpu");
  EXPECT_EQ(c.backend.ranks, 1);
  EXPECT_EQ(c.backend.threads_per_rank, 0);
  EXPECT_TRUE(c.backend.devices.empty());
  ASSERT_EQ(c.tenants.size(), 1u);
  EXPECT_EQ(c.tenants[0].max_layers, 64);
  EXPECT_EQ(c.tenants[0].max_memory_bytes, 8ull << 30);
  EXPECT_EQ(c.tenants[0].max_inflight, 256);
  EXPECT_TRUE(c.tenants[0].gids.empty());
  ASSERT_EQ(c.layers.size(), 1u);
  const LayerDefinition& l = c.layers[0];
  EXPECT_EQ(l.spec.output_dim, 0);
  EXPECT_EQ(l.spec.k, 2);
  EXPECT_EQ(l.spec.capacity_factor, 1.0);
  EXPECT_EQ(l.spec.activation, Activation::kRelu);
  EXPECT_EQ(l.spec.matmul_dtype, DType::kF32);
  EXPECT_EQ(l.spec.alignment, 1);
  EXPECT_TRUE(l.spec.has_fc1_bias && l.spec.has_fc2_bias && l.spec.normalize_gate &&
              l.spec.is_postscore);
  EXPECT_FALSE(l.spec.batch_prioritized);
  EXPECT_EQ(l.optimizer.kind, OptimizerKind::kAdamW);
  EXPECT_EQ(l.optimizer.lr, 1e-3f);
  EXPECT_EQ(l.optimizer.weight_decay, 0.f);
}

TEST(ConfigTest, EveryKeySet) {
  const Config c = parse_ok(R"(
[server]
client_socket = "c.sock"
admin_socket = "a.sock"
state_dir = "/var/lib/tuteld"
metrics_listen = "[::1]:0"
log_level = "WARNING"
spin_us = 0
arena_bytes = 1048576
[backend]
kind = "cuda"
ranks = 2
threads_per_rank = 3
devices = [1, 0]
[[tenant]]
name = "a"
gids = [5, 5, 6]
max_layers = 1
max_memory_bytes = "3 GiB"
max_inflight = 9
max_sessions = 3
share = 7
[[layer]]
name = "x.y-z_1"
tenant = "a"
experts = 3
model_dim = 5
hidden = 7
output_dim = 6
k = 3
capacity_factor = -2
activation = "silu"
gate_noise = 1
noise_seed = 11
normalize_gate = false
batch_prioritized = true
is_postscore = false
has_fc1_bias = false
has_fc2_bias = false
dtype = "bf16"
weights = "w/x.safetensors"
optimizer = { kind = "sgd", lr = 0.5, momentum = 0.9, nesterov = true, weight_decay = 1e-4 }
)");
  EXPECT_EQ(c.server.state_dir, "/var/lib/tuteld");
  EXPECT_EQ(c.server.metrics_host, "::1");
  EXPECT_EQ(c.server.metrics_port, 0);
  EXPECT_EQ(c.server.log_level, LogLevel::kWarn);
  EXPECT_EQ(c.server.spin.count(), 0);
  EXPECT_EQ(c.server.arena_bytes, 1u << 20);
  EXPECT_EQ(c.backend.kind, "cuda");
  EXPECT_EQ(c.backend.devices, (std::vector<int>{1, 0}));
  EXPECT_EQ(c.backend.threads_per_rank, 3);
  EXPECT_EQ(c.tenants[0].gids, (std::vector<uint32_t>{5, 6}));
  EXPECT_EQ(c.tenants[0].max_memory_bytes, 3ull << 30);
  EXPECT_EQ(c.tenants[0].max_inflight, 9);
  EXPECT_EQ(c.tenants[0].max_sessions, 3);
  EXPECT_EQ(c.tenants[0].share, 7u);
  const LayerDefinition& l = c.layers[0];
  EXPECT_EQ(l.name, "x.y-z_1");
  EXPECT_EQ(l.spec.out_dim(), 6);
  EXPECT_EQ(l.spec.k, 3);
  EXPECT_EQ(l.spec.capacity_factor, -2.0);
  EXPECT_EQ(l.spec.activation, Activation::kSilu);
  EXPECT_EQ(l.spec.gate_noise, 1.0);
  EXPECT_EQ(l.spec.noise_seed, 11u);
  EXPECT_FALSE(l.spec.normalize_gate || l.spec.is_postscore || l.spec.has_fc1_bias ||
               l.spec.has_fc2_bias);
  EXPECT_TRUE(l.spec.batch_prioritized);
  EXPECT_EQ(l.spec.matmul_dtype, DType::kBF16);
  EXPECT_EQ(l.weights_path, std::optional<std::string>("/etc/tuteld/w/x.safetensors"));
  EXPECT_FALSE(l.init_seed.has_value());
  EXPECT_EQ(l.optimizer.kind, OptimizerKind::kSgd);
  EXPECT_EQ(l.optimizer.lr, 0.5f);
  EXPECT_EQ(l.optimizer.momentum, 0.9f);
  EXPECT_TRUE(l.optimizer.nesterov);
  EXPECT_EQ(l.optimizer.weight_decay, 1e-4f);
}

TEST(ConfigTest, CudaDevicesDefaultToOnePerRank) {
  const Config c = parse_ok(kMinimal + "[backend]\nkind = \"cuda\"\nranks = 3\n");
  EXPECT_EQ(c.backend.devices, (std::vector<int>{0, 1, 2}));
}

// Who may connect to the client socket: its mode (three offered) and group (a name looked up
// in this machine's group database, or a gid); each refusal names the key and its line.
TEST(ConfigTest, ClientSocketModeAndGroup) {
  const std::string head = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n";
  const std::string tail = "[[tenant]]\nname = \"a\"\nuids = [1]\n";
  const Config defaults = parse_ok(head + tail);
  EXPECT_EQ(defaults.server.client_socket_mode, 0660u);
  EXPECT_FALSE(defaults.server.client_socket_gid.has_value());
  const Config everyone = parse_ok(head + "client_socket_mode = \"0666\"\nclient_socket_group = \"root\"\n" + tail);
  EXPECT_EQ(everyone.server.client_socket_mode, 0666u);
  EXPECT_EQ(everyone.server.client_socket_gid, std::optional<uint32_t>(0));
  EXPECT_EQ(everyone.server.client_socket_group, "root");
  const Config by_gid = parse_ok(head + "client_socket_mode = \"0600\"\nclient_socket_group = 4242\n" + tail);
  EXPECT_EQ(by_gid.server.client_socket_mode, 0600u);
  EXPECT_EQ(by_gid.server.client_socket_gid, std::optional<uint32_t>(4242));
  for (const char* bad : {"\"0777\"", "\"660\"", "660", "\"\"", "\"0644\""})
    expect_error(head + "client_socket_mode = " + bad + " #!\n" + tail, "server.client_socket_mode",
                 {"\"0600\", \"0660\", \"0666\""});
  for (const char* bad : {"-1", "4294967295", "\"\"", "1.5", "[0]"})
    expect_error(head + "client_socket_group = " + bad + " #!\n" + tail, "server.client_socket_group",
                 {"a group's name or a gid"});
  expect_error(head + "client_socket_group = \"no-such-group-tutel\" #!\n" + tail, "server.client_socket_group",
               {"no group named \"no-such-group-tutel\" on this machine", "getent group"});
}

TEST(ConfigTest, MetricsListenForms) {
  for (const char* ok : {"127.0.0.1:9464", "127.1.2.3:0", "[::1]:65535", "[0:0:0:0:0:0:0:1]:80"}) {
    const Config c =
        parse_ok("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nmetrics_listen = \"" +
                 std::string(ok) + "\"\n[[tenant]]\nname = \"a\"\nuids = [1]\n");
    EXPECT_FALSE(c.server.metrics_host.empty()) << ok;
  }
  const Config off = parse_ok(
      "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nmetrics_listen = \"\"\n"
      "[[tenant]]\nname = \"a\"\nuids = [1]\n");
  EXPECT_EQ(off.server.metrics_listen, "");
  EXPECT_EQ(off.server.metrics_host, "");
}

TEST(ConfigTest, SameLayerNameInTwoTenants) {
  const Config c =
      parse_ok(kMinimal + "[[tenant]]\nname = \"b\"\nuids = [1001]\n" + kLayer +
               "[[layer]]\nname = \"moe0\"\ntenant = \"b\"\nexperts = 2\nmodel_dim = 2\n"
               "hidden = 2\ninit_seed = 1\n");
  EXPECT_EQ(c.layers.size(), 2u);
}

TEST(ConfigTest, FindTenant) {
  const Config c = parse_ok(R"(
[server]
client_socket = "c"
admin_socket = "a"
[[tenant]]
name = "by-gid"
gids = [100]
[[tenant]]
name = "by-uid"
uids = [7, 8]
)");
  EXPECT_EQ(find_tenant(c, 7, 100), std::optional<size_t>(1));  // a uid beats a gid
  EXPECT_EQ(find_tenant(c, 9, 100), std::optional<size_t>(0));
  EXPECT_EQ(find_tenant(c, 8, 1), std::optional<size_t>(1));
  EXPECT_EQ(find_tenant(c, 9, 1), std::nullopt);
}

// ---- Paths ---------------------------------------------------------------------------------

TEST(ConfigTest, RelativePathsResolveAgainstTheConfigDirectory) {
  const Config c = parse_ok(R"(
[server]
client_socket = "run/client.sock"
admin_socket = "../admin.sock"
state_dir = "./state/"
[[tenant]]
name = "a"
uids = [1]
[[layer]]
name = "l"
tenant = "a"
experts = 2
model_dim = 2
hidden = 2
weights = "/abs/w.safetensors"
[[layer]]
name = "m"
tenant = "a"
experts = 2
model_dim = 2
hidden = 2
weights = "w/m.safetensors"
)",
                            "/srv/tuteld/conf/tuteld.toml");
  EXPECT_EQ(c.path, "/srv/tuteld/conf/tuteld.toml");
  EXPECT_EQ(c.server.client_socket, "/srv/tuteld/conf/run/client.sock");
  EXPECT_EQ(c.server.admin_socket, "/srv/tuteld/admin.sock");
  EXPECT_EQ(c.server.state_dir, "/srv/tuteld/conf/state/");
  EXPECT_EQ(*c.layers[0].weights_path, "/abs/w.safetensors");
  EXPECT_EQ(*c.layers[1].weights_path, "/srv/tuteld/conf/w/m.safetensors");
}

// Secret files are paths like any other (read when the daemon starts, not when it parses).
TEST(ConfigTest, SecretFilesResolveAgainstTheConfigDirectory) {
  const Config c = parse_ok(R"(
[server]
client_socket = "run/client.sock"
admin_socket = "run/admin.sock"
peer_secret_file = "secrets/peer"
[[tenant]]
name = "a"
uids = [1]
secret_file = "/etc/tuteld/a.secret"
[[tenant]]
name = "b"
uids = [2]
secret_file = "b.secret"
[[tenant]]
name = "c"
uids = [3]
)",
                            "/srv/tuteld/conf/tuteld.toml");
  EXPECT_EQ(c.server.peer_secret_file, "/srv/tuteld/conf/secrets/peer");
  EXPECT_EQ(c.tenants[0].secret_file, "/etc/tuteld/a.secret");
  EXPECT_EQ(c.tenants[1].secret_file, "/srv/tuteld/conf/b.secret");
  EXPECT_EQ(c.tenants[2].secret_file, "");
  EXPECT_EQ(parse_ok(kMinimal).server.peer_secret_file, "");
}

TEST(ConfigTest, SourceWithoutDirectoryResolvesAgainstTheWorkingDirectory) {
  const Config c = parse_ok(kMinimal, "tuteld.toml");
  EXPECT_EQ(c.path, (fs::current_path() / "tuteld.toml").string());
  EXPECT_EQ(c.server.client_socket, "/run/tuteld/client.sock");
  const Config rel = parse_ok(
      "[server]\nclient_socket = \"c.sock\"\nadmin_socket = \"a.sock\"\n"
      "[[tenant]]\nname = \"a\"\nuids = [1]\n",
      "tuteld.toml");
  EXPECT_EQ(rel.server.client_socket, (fs::current_path() / "c.sock").string());
}

class ConfigFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tuteld-config-test-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  fs::path dir_;
};

TEST_F(ConfigFileTest, LoadResolvesAgainstTheFilesDirectory) {
  fs::create_directories(dir_ / "etc");
  const fs::path file = dir_ / "etc" / "tuteld.toml";
  std::ofstream(file) << "[server]\nclient_socket = \"s/c.sock\"\nadmin_socket = \"s/a.sock\"\n"
                         "[[tenant]]\nname = \"a\"\nuids = [1]\n";
  Result<Config> r = load_config(file.string());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->server.client_socket, (dir_ / "etc/s/c.sock").string());
  EXPECT_EQ(r->path, file.string());
}

TEST_F(ConfigFileTest, LoadErrorsNameTheFile) {
  const std::string missing = (dir_ / "nope.toml").string();
  Result<Config> r = load_config(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kIOError);
  EXPECT_NE(r.status().message().find(missing), std::string_view::npos) << r.status();

  r = load_config(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("not a regular file"), std::string_view::npos) << r.status();

  const std::string bad = (dir_ / "bad.toml").string();
  std::ofstream(bad) << kMinimal << "max_layers = -3\n";
  r = load_config(bad);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message().rfind(bad + ":9:14: ", 0), 0u) << r.status();
  EXPECT_NE(r.status().message().find("tenant[0].max_layers: expected a positive integer, got -3"),
            std::string_view::npos)
      << r.status();
}

TEST(ConfigTest, SocketPathLimits) {
  expect_error(
      "[server]\nclient_socket = \"" + std::string(120, 'x') + "\" #!\nadmin_socket = \"a\"\n",
      "server.client_socket", {"at most 107"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"./c\" #!\n",
               "server.admin_socket", {"must differ"});
  expect_error("[server]\nclient_socket = \"\" #!\nadmin_socket = \"a\"\n", "server.client_socket",
               {"expected a path"});
}

// ---- Errors --------------------------------------------------------------------------------

TEST(ConfigErrorTest, TomlSyntax) {
  expect_error("[server]\nclient_socket = \"open #!\n", "", {"TOML syntax error"});
  expect_error("[server]\nclient_socket = \"a\"\nclient_socket = \"b\" #!\n", "",
               {"TOML syntax error"});
  expect_error("[server\n", "", {"TOML syntax error"});
  const Result<Config> r = parse_config("a = [", kSource);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message().rfind(kSource + ":1:", 0), 0u) << r.status();
}

TEST(ConfigErrorTest, UnknownKeys) {
  expect_error("servr = 1 #!\n" + kMinimal, "servr",
               {"unknown key in the top level", "did you mean 'server'"});
  expect_error(kMinimal + "[server.extra] #!\n", "server.extra", {"unknown key in [server]"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nspinus = 5 #!\n",
               "server.spinus", {"unknown key in [server]", "did you mean 'spin_us'"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nbogus = 5 #!\n",
               "server.bogus", {"unknown key in [server]"});
  expect_error(kMinimal + "max_layer = 3 #!\n", "tenant[0].max_layer",
               {"unknown key in a [[tenant]] table", "did you mean 'max_layers'"});
  expect_error(kMinimal + "[backend]\nrank = 2 #!\n", "backend.rank", {"did you mean 'ranks'"});
  expect_error(kMinimal + kLayer + "expert = 3 #!\n", "layer[0].expert",
               {"did you mean 'experts'"});
  expect_error(kMinimal + kLayer + "[layer.optimizer]\nkind = \"adamw\"\nbeta = 0.5 #!\n",
               "layer[0].optimizer.beta",
               {"unknown key in the optimizer table", "did you mean 'beta1'"});
  // The message of a key with no near match suggests nothing.
  const Result<Config> r = parse_config(kMinimal + "zzzzzzzz = 1\n", kSource);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().message().find("did you mean"), std::string_view::npos) << r.status();
}

TEST(ConfigErrorTest, WrongTypes) {
  expect_error(kMinimal + "[backend]\nranks = \"2\" #!\n", "backend.ranks",
               {"expected an integer in [1, 1024], got \"2\""});
  expect_error(kMinimal + "[backend]\nranks = 2.0 #!\n", "backend.ranks", {"got 2.0"});
  expect_error(kMinimal + kLayer + "normalize_gate = 1 #!\n", "layer[0].normalize_gate",
               {"expected true or false, got 1"});
  expect_error(kMinimal + "gids = 5 #!\n", "tenant[0].gids", {"expected an array of integers"});
  expect_error(kMinimal + "gids = [5, \"x\"] #!\n", "tenant[0].gids[1]", {"got \"x\""});
  expect_error("server = 3 #!\n", "server", {"expected a table [server], got 3"});
  expect_error("[server]\nclient_socket = 5 #!\n", "server.client_socket",
               {"expected a path, got 5"});
  expect_error(kMinimal + kLayer + "capacity_factor = \"1\" #!\n", "layer[0].capacity_factor", {});
  expect_error(kMinimal + kLayer + "optimizer = 1 #!\n", "layer[0].optimizer",
               {"expected a table"});
  expect_error(kMinimal + "[tenant2]\n", "tenant2", {"unknown key"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n[tenant] #!\nname = \"a\"\n",
               "tenant", {"expected an array of tables ([[tenant]])"});
  expect_error("layer = [1] #!\n" + kMinimal, "layer[0]", {"expected a table, got 1"});
  expect_error(kMinimal + "secret_file = 42 #!\n", "tenant[0].secret_file", {"expected a path, got 42"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\npeer_secret_file = [\"x\"] #!\n"
               "[[tenant]]\nname = \"a\"\nuids = [1]\n",
               "server.peer_secret_file", {"expected a path"});
}

TEST(ConfigErrorTest, MissingRequiredKeys) {
  expect_error("[[tenant]]\nname = \"a\"\nuids = [1]\n", "server",
               {"missing required table [server]"});
  expect_error("[server] #!\nadmin_socket = \"a\"\n", "server.client_socket",
               {"missing required key (a path) in [server]"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n", "tenant",
               {"at least one tenant"});
  expect_error("tenant = [] #!\n[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n", "tenant",
               {"at least one [[tenant]]"});
  expect_error("[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n[[tenant]] #!\nuids = [1]\n",
               "tenant[0].name", {"missing required key (a tenant name)"});
  expect_error(
      kMinimal +
          "[[layer]] #!\nname = \"l\"\ntenant = \"a\"\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n",
      "layer[0].experts", {"missing required key (a positive integer) in a [[layer]] table"});
  expect_error(
      kMinimal +
          "[[layer]] #!\nname = \"l\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n",
      "layer[0].tenant", {"missing required key"});
  // A bucket times k past the routing indices' i32 is this file's error, not the start's.
  expect_error(kMinimal + "[[layer]]\nname = \"l\"\ntenant = \"a\"\nexperts = 4\nmodel_dim = 2\nhidden = 2\n"
                          "init_seed = 1\nk = 2\ntoken_buckets = [1073741824] #!\n",
               "layer[0].token_buckets", {"the bucket 1073741824 times k = 2 routes 2^31 or more tokens"});
  // A sub-table's header written above the layer's own keys takes them in: said so, at the key,
  // rather than the layer's "missing" experts.
  expect_error(kMinimal +
                   "[[layer]]\nname = \"l\"\ntenant = \"a\"\n[layer.optimizer]\nkind = \"sgd\"\nexperts = 2 #!\n"
                   "model_dim = 2\nhidden = 2\ninit_seed = 1\n",
               "layer[0].optimizer.experts",
               {"experts is a key of a [[layer]] table, but written after the [layer[0].optimizer] header it "
                "belongs to that table"});
  // A key the sub-table takes itself (a group's name) is its own: the layer's missing name is
  // reported as such.
  expect_error(kMinimal +
                   "[[layer]] #!\ntenant = \"a\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n"
                   "[layer.group]\nname = \"g1\"\nsize = 2\nrank = 0\n",
               "layer[0].name", {"missing required key"});
}

TEST(ConfigErrorTest, OutOfRange) {
  const std::string two_tenants = kMinimal + "[[tenant]]\nname = \"b\"\nuids = [2]\n";
  expect_error(two_tenants + "max_layers = -3 #!\n", "tenant[1].max_layers",
               {"expected a positive integer, got -3"});
  expect_error(kMinimal + "max_inflight = 0 #!\n", "tenant[0].max_inflight", {"got 0"});
  expect_error(kMinimal + "max_sessions = 0 #!\n", "tenant[0].max_sessions", {"got 0"});
  expect_error(kMinimal + "max_sessions = 65537 #!\n", "tenant[0].max_sessions", {"65537"});
  expect_error(kMinimal + "max_sessions = \"many\" #!\n", "tenant[0].max_sessions", {"many"});
  expect_error(kMinimal + "share = 0 #!\n", "tenant[0].share", {"got 0"});
  expect_error(kMinimal + "share = 1001 #!\n", "tenant[0].share", {"1001"});
  expect_error(kMinimal + "share = 1.5 #!\n", "tenant[0].share", {"1.5"});
  expect_error(kMinimal + "max_memory_bytes = 0 #!\n", "tenant[0].max_memory_bytes",
               {"byte count"});
  expect_error(kMinimal + "max_memory_bytes = \"8 GB\" #!\n", "tenant[0].max_memory_bytes",
               {"\"8 GB\""});
  expect_error(kMinimal + "max_checkpoint_bytes = 0 #!\n", "tenant[0].max_checkpoint_bytes", {"byte count"});
  expect_error(kMinimal + "max_checkpoint_bytes = \"2 PiB\" #!\n", "tenant[0].max_checkpoint_bytes", {});
  EXPECT_EQ(parse_ok(kMinimal + "max_checkpoint_bytes = \"1GiB\"\n").tenants[0].max_checkpoint_bytes, 1ull << 30);
  expect_error(kMinimal + "[[tenant]]\nname = \"b\"\nuids = [-1] #!\n", "tenant[1].uids[0]",
               {"got -1"});
  expect_error(kMinimal + "[[tenant]]\nname = \"b\"\nuids = [4294967295] #!\n", "tenant[1].uids[0]",
               {"expected an integer in [0, 4294967294], got 4294967295"});
  expect_error(kMinimal + "[backend]\nranks = 0 #!\n", "backend.ranks", {"got 0"});
  expect_error(kMinimal + "[backend]\nthreads_per_rank = -1 #!\n", "backend.threads_per_rank", {});
  const std::string server = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n";
  expect_error(server + "spin_us = 1000001 #!\n", "server.spin_us", {"[0, 1000000]"});
  expect_error(server + "spin_us = -1 #!\n", "server.spin_us", {});
  expect_error(server + "arena_bytes = \"1KiB\" #!\n", "server.arena_bytes",
               {"from 64KiB to 64GiB"});
  expect_error(server + "arena_bytes = \"99999999999999999999999 B\" #!\n", "server.arena_bytes",
               {});
  expect_error(server + "shutdown_grace_ms = -1 #!\n", "server.shutdown_grace_ms", {"got -1"});
  expect_error(server + "shutdown_grace_ms = 600001 #!\n", "server.shutdown_grace_ms", {"got 600001"});
  expect_error(server + "shutdown_grace_ms = \"5s\" #!\n", "server.shutdown_grace_ms", {});
  expect_error(server + "max_collective_timeout_ms = 0 #!\n", "server.max_collective_timeout_ms", {});
  expect_error(server + "state_dir = \"s\"\ncheckpoint_interval_s = -1 #!\n", "server.checkpoint_interval_s",
               {"expected an integer >= 0, got -1"});
  expect_error(server + "state_dir = \"s\"\ncheckpoint_interval_s = 604801 #!\n", "server.checkpoint_interval_s",
               {"got 604801"});
  expect_error(server + "state_dir = \"s\"\ncheckpoint_interval_s = \"1h\" #!\n", "server.checkpoint_interval_s", {});
  expect_error(server + "checkpoint_interval_s = 60 #!\n", "server.checkpoint_interval_s",
               {"writes the layers' checkpoints to state_dir, which is not set", "checkpoint_interval_s = 0"});
  expect_error(server + "max_bootstrap_timeout_ms = 3600001 #!\n", "server.max_bootstrap_timeout_ms", {});
  expect_error(server + "max_bootstrap_timeout_ms = 1.5 #!\n", "server.max_bootstrap_timeout_ms", {});

  const std::string layer = kMinimal + kLayer;
  expect_error(layer + "k = 5 #!\n", "layer[0].k", {"k = 5 exceeds experts = 4"});
  expect_error(layer + "k = 0 #!\n", "layer[0].k", {});
  expect_error(kMinimal +
                   "[[layer]] #!\nname = \"l\"\ntenant = \"a\"\nexperts = 1\nmodel_dim = 2\n"
                   "hidden = 2\ninit_seed = 1\n",
               "layer[0].k", {"(the default) exceeds experts = 1"});
  expect_error(layer + "experts = 0 #!\n", "", {"TOML syntax error"});  // a duplicate key
  expect_error(kMinimal +
                   "[[layer]]\nname = \"l\"\ntenant = \"a\"\nexperts = 0 #!\nmodel_dim = 2\n"
                   "hidden = 2\ninit_seed = 1\n",
               "layer[0].experts", {"expected a positive integer, got 0"});
  expect_error(kMinimal +
                   "[[layer]]\nname = \"l\"\ntenant = \"a\"\nexperts = 2\nmodel_dim = -1 #!\n"
                   "hidden = 2\ninit_seed = 1\n",
               "layer[0].model_dim", {"got -1"});
  expect_error(layer + "output_dim = -1 #!\n", "layer[0].output_dim", {});
  expect_error(layer + "capacity_factor = inf #!\n", "layer[0].capacity_factor",
               {"|f| <= 1e6", "got inf"});
  expect_error(layer + "capacity_factor = nan #!\n", "layer[0].capacity_factor", {"got nan"});
  expect_error(layer + "capacity_factor = -1e7 #!\n", "layer[0].capacity_factor", {});
  expect_error(layer + "gate_noise = -0.5 #!\n", "layer[0].gate_noise", {});
  expect_error(layer + "noise_seed = -1 #!\n", "layer[0].noise_seed", {});
  expect_error(
      kMinimal +
          "[[layer]] #!\nname = \"l\"\ntenant = \"a\"\nexperts = 1048576\nmodel_dim = 16777216\n"
          "hidden = 16777216\ninit_seed = 1\nk = 1\n",
      "layer[0]", {"more than 2^40"});

  const std::string opt = layer + "[layer.optimizer]\n";
  expect_error(opt + "lr = 0 #!\n", "layer[0].optimizer.lr",
               {"expected a finite number > 0, got 0"});
  expect_error(opt + "lr = -1.5 #!\n", "layer[0].optimizer.lr", {"got -1.5"});
  expect_error(opt + "lr = 1e-50 #!\n", "layer[0].optimizer.lr", {});
  expect_error(opt + "lr = inf #!\n", "layer[0].optimizer.lr", {});
  expect_error(opt + "lr = 1e300 #!\n", "layer[0].optimizer.lr", {"got 1e+300"});
  expect_error(opt + "beta1 = 1.0 #!\n", "layer[0].optimizer.beta1", {"[0, 1)"});
  expect_error(opt + "beta2 = -0.1 #!\n", "layer[0].optimizer.beta2", {});
  expect_error(opt + "eps = 0.0 #!\n", "layer[0].optimizer.eps", {});
  expect_error(opt + "weight_decay = -1 #!\n", "layer[0].optimizer.weight_decay", {});
  expect_error(opt + "kind = \"sgd\"\nmomentum = 1.0 #!\n", "layer[0].optimizer.momentum",
               {"[0, 1)"});
  expect_error(opt + "kind = \"sgd\"\nnesterov = true #!\n", "layer[0].optimizer.nesterov",
               {"needs momentum > 0"});
  expect_error(opt + "momentum = 0.9 #!\n", "layer[0].optimizer.momentum",
               {"applies only to kind = \"sgd\"", "(the default)"});
  expect_error(opt + "kind = \"sgd\"\neps = 1e-6 #!\n", "layer[0].optimizer.eps",
               {"applies only to kind = \"adamw\""});
}

TEST(ConfigErrorTest, BadEnums) {
  const std::string layer = kMinimal + kLayer;
  expect_error(layer + "activation = \"tanh\" #!\n", "layer[0].activation",
               {"expected one of \"relu\", \"gelu\", \"silu\", got \"tanh\""});
  expect_error(layer + "dtype = \"f16\" #!\n", "layer[0].dtype", {"\"f32\", \"bf16\""});
  expect_error(layer + "[layer.optimizer]\nkind = \"adam\" #!\n", "layer[0].optimizer.kind",
               {"\"sgd\", \"adamw\""});
  expect_error(kMinimal + "[backend]\nkind = \"rocm\" #!\n", "backend.kind", {"\"cpu\", \"cuda\""});
  expect_error(
      "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\nlog_level = \"verbose\" #!\n",
      "server.log_level", {"\"debug\", \"info\", \"warn\", \"error\""});
  expect_error(kMinimal + "[backend]\nkind = \"cpu\"\ndevices = [0] #!\n", "backend.devices",
               {"only to kind = \"cuda\""});
  expect_error(kMinimal + "[backend]\nkind = \"cuda\"\nranks = 2\ndevices = [0] #!\n",
               "backend.devices", {"one device per rank"});
}

TEST(ConfigErrorTest, Tenants) {
  expect_error(kMinimal + "[[tenant]]\nname = \"a\" #!\nuids = [2]\n", "tenant[1].name",
               {"duplicate tenant name \"a\" (also tenant[0])"});
  expect_error(kMinimal + "[[tenant]]\nname = \"b\"\nuids = [3, 1000] #!\n", "tenant[1].uids",
               {"uid 1000 is already in tenant[0] (line 8)"});
  expect_error(kMinimal + "gids = [9]\n[[tenant]]\nname = \"b\"\ngids = [9] #!\n", "tenant[1].gids",
               {"gid 9 is already in tenant[0]"});
  expect_error(kMinimal + "[[tenant]] #!\nname = \"b\"\n", "tenant[1].uids",
               {"at least one uid or gid"});
  expect_error(kMinimal + "[[tenant]]\nname = \"b c\" #!\nuids = [2]\n", "tenant[1].name",
               {"a tenant name of 1 to 64 characters"});
  // Tenant names are directories under state_dir: "." and ".." would be state_dir itself (where
  // another tenant's "checkpoints" directory could be planted) or the directory above it.
  for (const char* dots : {".", ".."})
    expect_error(kMinimal + "[[tenant]]\nname = \"" + dots + "\" #!\nuids = [2]\n", "tenant[1].name",
                 {"(not \".\" or \"..\")"});
}

TEST(ConfigErrorTest, Layers) {
  const std::string dup = kMinimal + kLayer +
                          "[[layer]]\nname = \"moe0\" #!\ntenant = \"a\"\nexperts = 2\n"
                          "model_dim = 2\nhidden = 2\ninit_seed = 1\n";
  expect_error(dup, "layer[1].name",
               {"duplicate layer name \"moe0\" in tenant \"a\" (also layer[0])"});
  expect_error(kMinimal +
                   "[[layer]]\nname = \"l\"\ntenant = \"zz\" #!\nexperts = 2\nmodel_dim = 2\n"
                   "hidden = 2\ninit_seed = 1\n",
               "layer[0].tenant", {"no [[tenant]] is named \"zz\""});
  expect_error(kMinimal + kLayer + "weights = \"w.safetensors\"\n", "layer[0].init_seed",
               {"either weights or init_seed, not both"});
  expect_error(kMinimal +
                   "[[layer]] #!\nname = \"l\"\ntenant = \"a\"\nexperts = 2\nmodel_dim = 2\n"
                   "hidden = 2\n",
               "layer[0]", {"weights", "init_seed"});
  for (const std::string& bad :
       std::vector<std::string>{"", "moe 0", "a/b", std::string(65, 'x'), "é"})
    expect_error(kMinimal + "[[layer]]\nname = \"" + bad +
                     "\" #!\ntenant = \"a\"\nexperts = 2\n"
                     "model_dim = 2\nhidden = 2\ninit_seed = 1\n",
                 "layer[0].name", {"a layer name of 1 to 64 characters from A-Z a-z 0-9 _ . -"});
  const std::string quota =
      "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n"
      "[[tenant]]\nname = \"a\"\nuids = [1]\nmax_layers = 1\n" +
      kLayer +
      "[[layer]]\nname = \"two\"\ntenant = \"a\" #!\nexperts = 2\nmodel_dim = 2\n"
      "hidden = 2\ninit_seed = 1\n";
  expect_error(quota, "layer[1].tenant", {"allows max_layers = 1"});
}

TEST(ConfigErrorTest, MetricsListenLoopbackOnly) {
  const std::string server = "[server]\nclient_socket = \"c\"\nadmin_socket = \"a\"\n";
  for (const char* bad : {"0.0.0.0:9464", "10.0.0.1:80", "[::]:9464", "localhost:9464", "127.0.0.1",
                          "127.0.0.1:65536", "127.0.0.1:-1", "127.0.0.1:x", "[::1]", ":9464",
                          "[::2]:1", "127.0.0.1:9464:1"})
    expect_error(server + "metrics_listen = \"" + bad + "\" #!\n", "server.metrics_listen",
                 {"expected a loopback address and port"});
  expect_error(server + "metrics_listen = \"0.0.0.0:9464\" #!\n", "server.metrics_listen",
               {"listens only on loopback"});
  expect_error(server + "metrics_listen = \"9464\" #!\n", "server.metrics_listen",
               {"a port alone; put the address before it, \"127.0.0.1:9464\""});
}

// ---- Layer specs ---------------------------------------------------------------------------

TEST(LayerSpecTest, ParsesARequest) {
  Result<LayerDefinition> r = parse_layer_spec(
      "name = \"moe1\"\nexperts = 4\nmodel_dim = 8\nhidden = 16\nweights = \"rel/w.safetensors\"\n"
      "[optimizer]\nkind = \"sgd\"\nlr = 0.1\n",
      "request");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->name, "moe1");
  EXPECT_EQ(r->tenant, "");
  EXPECT_EQ(r->weights_path, std::optional<std::string>("rel/w.safetensors"));  // kept as written
  EXPECT_EQ(r->optimizer.kind, OptimizerKind::kSgd);
  EXPECT_EQ(r->optimizer.lr, 0.1f);
}

TEST(LayerSpecTest, TokenBuckets) {
  const std::string base = "name = \"l\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n";
  Result<LayerDefinition> r = parse_layer_spec(base + "token_buckets = [1, 128, 4096]\n", "request");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->token_buckets, (std::vector<int64_t>{1, 128, 4096}));
  Result<LayerDefinition> none = parse_layer_spec(base, "request");
  ASSERT_TRUE(none.ok()) << none.status();
  EXPECT_TRUE(none->token_buckets.empty());

  const auto error_of = [&](const std::string& line) {
    Result<LayerDefinition> bad = parse_layer_spec(base + line + "\n", "request");
    EXPECT_FALSE(bad.ok()) << line;
    EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument) << line;
    return bad.ok() ? std::string() : std::string(bad.status().message());
  };
  const auto expect_error = [&](const std::string& line, const std::string& part) {
    const std::string message = error_of(line);
    EXPECT_EQ(message.rfind("request:6:", 0), 0u) << message;
    EXPECT_NE(message.find("token_buckets"), std::string::npos) << message;
    EXPECT_NE(message.find(part), std::string::npos) << line << " gave: " << message;
  };
  expect_error("token_buckets = []", "expected 1 to 16 token counts");
  expect_error("token_buckets = [64, 64]", "strictly ascending, but 64 follows 64");
  expect_error("token_buckets = [128, 64]", "strictly ascending, but 64 follows 128");
  expect_error("token_buckets = [0, 64]", "");
  expect_error("token_buckets = [-5]", "");
  expect_error("token_buckets = [2147483648]", "");
  expect_error("token_buckets = 64", "expected an array of integers");
  expect_error("token_buckets = [\"64\"]", "");
  expect_error("token_buckets = [1.5]", "");
  expect_error("token_buckets = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]", "got 17");
  const std::string grouped = error_of(
      "token_buckets = [64]\n[group]\ncoordinator = \"127.0.0.1:7001\"\nsize = 2\nrank = 0");
  EXPECT_NE(grouped.find("a layer with [group] runs without plans"), std::string::npos) << grouped;
}

TEST(LayerSpecTest, ErrorsNameTheRequest) {
  const auto error_of = [](const std::string& text) {
    Result<LayerDefinition> r = parse_layer_spec(text, "request");
    EXPECT_FALSE(r.ok()) << text;
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  const std::string base = "name = \"l\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n";
  EXPECT_EQ(error_of(base + "tenant = \"a\"\n")
                .rfind("request:6:1: tenant: unknown key in the layer spec", 0),
            0u)
      << error_of(base + "tenant = \"a\"\n");
  EXPECT_EQ(error_of(base + "k = 3\n").rfind("request:6:5: k: k = 3 exceeds experts = 2", 0), 0u)
      << error_of(base + "k = 3\n");
  EXPECT_EQ(error_of(base + "[optimizer]\nlr = -1\n").rfind("request:7:6: optimizer.lr: ", 0), 0u)
      << error_of(base + "[optimizer]\nlr = -1\n");
  EXPECT_NE(error_of("name = \"l\"\nexperts = 2").find("missing required key"), std::string::npos);
  EXPECT_EQ(error_of("name = \n").rfind("request:1:", 0), 0u);
  EXPECT_EQ(error_of("").rfind("request:1:1: name: missing required key", 0), 0u) << error_of("");
}

void expect_same(const LayerDefinition& a, const LayerDefinition& b) {
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.spec.experts, b.spec.experts);
  EXPECT_EQ(a.spec.model_dim, b.spec.model_dim);
  EXPECT_EQ(a.spec.hidden, b.spec.hidden);
  EXPECT_EQ(a.spec.output_dim, b.spec.output_dim);
  EXPECT_EQ(a.spec.k, b.spec.k);
  EXPECT_EQ(a.spec.capacity_factor, b.spec.capacity_factor);
  EXPECT_EQ(a.spec.activation, b.spec.activation);
  EXPECT_EQ(a.spec.normalize_gate, b.spec.normalize_gate);
  EXPECT_EQ(a.spec.batch_prioritized, b.spec.batch_prioritized);
  EXPECT_EQ(a.spec.is_postscore, b.spec.is_postscore);
  EXPECT_EQ(a.spec.has_fc1_bias, b.spec.has_fc1_bias);
  EXPECT_EQ(a.spec.has_fc2_bias, b.spec.has_fc2_bias);
  EXPECT_EQ(a.spec.gate_noise, b.spec.gate_noise);
  EXPECT_EQ(a.spec.noise_seed, b.spec.noise_seed);
  EXPECT_EQ(a.spec.matmul_dtype, b.spec.matmul_dtype);
  EXPECT_EQ(a.optimizer.kind, b.optimizer.kind);
  EXPECT_EQ(a.optimizer.lr, b.optimizer.lr);
  EXPECT_EQ(a.optimizer.momentum, b.optimizer.momentum);
  EXPECT_EQ(a.optimizer.nesterov, b.optimizer.nesterov);
  EXPECT_EQ(a.optimizer.weight_decay, b.optimizer.weight_decay);
  EXPECT_EQ(a.optimizer.beta1, b.optimizer.beta1);
  EXPECT_EQ(a.optimizer.beta2, b.optimizer.beta2);
  EXPECT_EQ(a.optimizer.eps, b.optimizer.eps);
  EXPECT_EQ(a.weights_path, b.weights_path);
  EXPECT_EQ(a.token_buckets, b.token_buckets);
  EXPECT_EQ(a.init_seed, b.init_seed);
}

TEST(LayerSpecTest, RoundTrip) {
  std::mt19937_64 rng(42);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  for (int i = 0; i < 200; ++i) {
    LayerDefinition d;
    d.name = "layer-" + std::to_string(i) + ".x_y";
    d.spec.experts = 1 + static_cast<int64_t>(rng() % 64);
    d.spec.model_dim = 1 + static_cast<int64_t>(rng() % 4096);
    d.spec.hidden = 1 + static_cast<int64_t>(rng() % 4096);
    d.spec.output_dim = static_cast<int64_t>(rng() % 3) * 7;
    d.spec.k = 1 + static_cast<int>(rng() % static_cast<uint64_t>(d.spec.experts));
    d.spec.capacity_factor = i % 3 == 0 ? 0.0 : (unit(rng) - 0.5) * 20.0;
    d.spec.activation = static_cast<Activation>(rng() % 3);
    d.spec.gate_noise = i % 2 ? 0.0 : unit(rng) / 3.0;
    d.spec.noise_seed = rng() >> 1;
    d.spec.normalize_gate = rng() & 1;
    d.spec.batch_prioritized = rng() & 1;
    d.spec.is_postscore = rng() & 1;
    d.spec.has_fc1_bias = rng() & 1;
    d.spec.has_fc2_bias = rng() & 1;
    d.spec.matmul_dtype = rng() & 1 ? DType::kBF16 : DType::kF32;
    if (i % 2) {
      d.optimizer.kind = OptimizerKind::kSgd;
      d.optimizer.momentum = static_cast<float>(unit(rng) * 0.99);
      d.optimizer.nesterov = rng() & 1;
    } else {
      d.optimizer.beta1 = unit(rng) * 0.99;
      d.optimizer.beta2 = 0.999;
      d.optimizer.eps = static_cast<float>(std::pow(10.0, -1.0 - unit(rng) * 20));
    }
    d.optimizer.lr = static_cast<float>(std::pow(10.0, -6.0 + unit(rng) * 6));
    d.optimizer.weight_decay = i % 4 ? 0.f : static_cast<float>(unit(rng));
    if (i % 5 == 0)
      d.weights_path = "dir with \"quotes\"\\and\ttabs/w" + std::to_string(i) + ".safetensors";
    else
      d.init_seed = rng() >> 1;
    if (i % 3 == 0) {
      int64_t bucket = 1 + static_cast<int64_t>(rng() % 100);
      for (size_t n = 1 + rng() % kMaxTokenBuckets; n > 0; --n) {
        d.token_buckets.push_back(bucket);
        bucket += 1 + static_cast<int64_t>(rng() % 5000);
      }
    }

    const std::string text = format_layer_spec(d);
    Result<LayerDefinition> back = parse_layer_spec(text, "round-trip");
    ASSERT_TRUE(back.ok()) << back.status() << "\n" << text;
    SCOPED_TRACE(text);
    expect_same(d, *back);
    EXPECT_EQ(format_layer_spec(*back), text);
  }
}

TEST(LayerSpecTest, ConfigLayerFormatsAsARequest) {
  const Config c = parse_ok(read_file(TUTEL_EXAMPLE_CONFIG));
  Result<LayerDefinition> r = parse_layer_spec(format_layer_spec(c.layers[0]), "request");
  ASSERT_TRUE(r.ok()) << r.status();
  LayerDefinition expected = c.layers[0];
  expected.tenant.clear();
  expect_same(expected, *r);
}

// ---- Robustness ----------------------------------------------------------------------------

// Every outcome of arbitrary input is a value: OK, or InvalidArgument naming the source.
void parse_anything(const std::string& text) {
  const Result<Config> c = parse_config(text, "fuzz.toml");
  if (!c.ok()) {
    ASSERT_EQ(c.status().code(), StatusCode::kInvalidArgument) << c.status();
    ASSERT_EQ(c.status().message().rfind("fuzz.toml", 0), 0u) << c.status();
  }
  const Result<LayerDefinition> l = parse_layer_spec(text, "fuzz");
  if (!l.ok()) {
    ASSERT_EQ(l.status().code(), StatusCode::kInvalidArgument) << l.status();
  }
}

TEST(ConfigFuzzTest, TruncationsNeverCrash) {
  const std::string example = read_file(TUTEL_EXAMPLE_CONFIG);
  ASSERT_FALSE(example.empty());
  for (size_t n = 0; n <= example.size(); ++n) parse_anything(example.substr(0, n));
}

TEST(ConfigFuzzTest, MutationsNeverCrash) {
  const std::string example = read_file(TUTEL_EXAMPLE_CONFIG);
  const std::string alphabet = std::string("[]{}=\"'\n#.,:+-_ 0123456789abcdefxyzeEinf\\\t") +
                               std::string("\0\x7f\x80\xc3\xa9\xff", 6);
  std::mt19937_64 rng(20240607);
  int accepted = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::string text = example;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits && !text.empty(); ++e) {
      const size_t at = rng() % text.size();
      switch (rng() % 5) {
        case 0:
          text[at] = alphabet[rng() % alphabet.size()];
          break;
        case 1:
          text.insert(at, 1, alphabet[rng() % alphabet.size()]);
          break;
        case 2:
          text.erase(at, 1 + rng() % 16);
          break;
        case 3: {  // duplicate a line elsewhere
          const size_t begin = text.rfind('\n', at), end = text.find('\n', at);
          const std::string line =
              text.substr(begin == std::string::npos ? 0 : begin,
                          end == std::string::npos ? std::string::npos : end - begin);
          text.insert(rng() % text.size(), line);
          break;
        }
        default: {  // swap two digits or flip a sign: numbers out of range
          const size_t digit = text.find_first_of("0123456789", at);
          if (digit != std::string::npos) text[digit] = rng() & 1 ? '-' : "0123456789"[rng() % 10];
        }
      }
    }
    parse_anything(text);
    accepted += parse_config(text, "fuzz.toml").ok();
  }
  EXPECT_GT(accepted, 0);  // some mutations hit comments: the loop exercises the valid path too
}

TEST(ConfigFuzzTest, GarbageNeverCrashes) {
  std::mt19937_64 rng(7);
  for (int iter = 0; iter < 2000; ++iter) {
    std::string text(rng() % 256, '\0');
    for (char& c : text) c = static_cast<char>(rng() & 0xff);
    parse_anything(text);
  }
  // Malformed table headers break a precondition of toml++ 3.3's parser (toml_impl.cpp).
  for (const char* header : {"[[=", "[=", "[[[1]]]", "[[[a]]", "[[[]]", "[[#", "[[,",
                             "[[ =", "[[\n", "[[\x7ftenant]]\n", "[\x7f]", "[a.=]", "[a.[b]]"})
    parse_anything(header);
  // toml++ 3.3 reached __builtin_unreachable on these (toml_impl.cpp); the first is valid TOML.
  EXPECT_TRUE(
      parse_layer_spec("name = \"l\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n"
                       "[optimizer]\n'\xc2\xa7' = \"\"\"\\\n\xc2\xa7\"\"\"\n",
                       "x")
          .status()
          .message()
          .find("unknown key in the optimizer table") != std::string_view::npos);
  for (const char* text :
       {"a = \"\"\"\\\n\xc2\xa7\"\"\"", "a = \"\"\"\\\n\xe3\x80\x81\"\"\"",
        "a = \"\"\"\\\n\xef\xbb\xbe\"\"\"", "gids = [}", "a = {b = }", "\xc2\xa7 = 1"})
    parse_anything(text);
  parse_anything("a = " + std::string(100000, '['));
  parse_anything(std::string(100000, '['));
  parse_anything("a = " + std::string(50000, '{'));
  parse_anything("[" + std::string(100000, 'a') + "]");
  std::string deep = "x = ";
  for (int i = 0; i < 300; ++i) deep += "{a = ";
  parse_anything(deep);
}

// A client's layer spec of one dotted key with 150 000 parts (300 KB, under the frame limit) made
// toml++ recurse once per implicit table and overflow the stack (SIGSEGV, every tenant lost);
// toml++ bounds only inline arrays and tables. Deep text is now refused before it is parsed.
TEST(ConfigFuzzTest, DeepImplicitTablesAreRefusedBeforeTheParserSeesThem) {
  auto dotted = [](size_t parts) {
    std::string key = "a";
    for (size_t i = 1; i < parts; ++i) key += ".a";
    return key;
  };
  const std::string spec = "name = \"l\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\ninit_seed = 1\n";
  auto expect_too_deep = [](const Status& s, std::string_view where) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << where << ": " << s.to_string();
    EXPECT_NE(s.message().find("nests more than 32 levels deep"), std::string_view::npos) << where << ": " << s.to_string();
  };
  expect_too_deep(parse_config(dotted(150000) + " = 1\n", "c.toml").status(), "config key");
  expect_too_deep(parse_config("[" + dotted(150000) + "]\n", "c.toml").status(), "config header");
  expect_too_deep(parse_config("[[" + dotted(150000) + "]]\n", "c.toml").status(), "config array header");
  expect_too_deep(parse_layer_spec(spec + dotted(30000) + " = 1\n", "spec").status(), "spec key");
  expect_too_deep(parse_layer_spec(spec + "[" + dotted(20) + "]\n" + dotted(20) + " = 1\n", "spec").status(),
                  "a header's parts and a key's together");
  expect_too_deep(parse_layer_spec(spec + "x = {" + dotted(30000) + " = 1}\n", "spec").status(), "inline key");
  std::string inline_tables = "x = ", arrays = "x = ";
  for (int i = 0; i < 40; ++i) inline_tables += "{a = ", arrays += "[";
  expect_too_deep(parse_layer_spec(spec + inline_tables + "\n", "spec").status(), "inline tables");
  expect_too_deep(parse_layer_spec(spec + arrays + "\n", "spec").status(), "arrays");
  // The error names the line.
  const Status at_line = parse_layer_spec(spec + dotted(40) + " = 1\n", "spec").status();
  EXPECT_NE(at_line.message().find("spec:6: "), std::string_view::npos) << at_line.to_string();
  // A layer spec is bounded in length as well.
  const Status long_spec = parse_layer_spec(spec + "# " + std::string(70000, 'x') + "\n", "spec").status();
  EXPECT_NE(long_spec.message().find("at most 65536 are accepted"), std::string_view::npos) << long_spec.to_string();
  // At the bound the parser decides (an unknown key here, not the depth).
  const Status at_bound = parse_layer_spec(spec + dotted(32) + " = 1\n", "spec").status();
  EXPECT_EQ(at_bound.message().find("nests more than"), std::string_view::npos) << at_bound.to_string();
  EXPECT_NE(at_bound.message().find("unknown key"), std::string_view::npos) << at_bound.to_string();
}

// What counts toward the depth: tables, dotted-key parts, arrays (their elements one deeper) and
// inline tables; never what is inside strings or comments.
TEST(TomlNesting, CountsWhatNestsAndSkipsStringsAndComments) {
  const std::pair<const char*, size_t> cases[] = {
      {"", 0},
      {"a = 1", 1},
      {"a.b.c = 1", 3},
      {"[a.b]\nc.d = 1", 4},
      {"[[a.b]]\nc = 1", 4},  // the array, its element, then c
      {"[a.b.c]\n[d]\ne = 1", 3},  // headers are absolute
      {"a = [[1, 2], [3]]", 3},
      {"a = {b.c = {d = 1}}", 4},
      {"a = [{b = 1}, {c = [2]}]", 4},
      {"a = {}\nb = 1", 1},
      {"a = [1.5, 2.25, 3.125, 4e5]", 2},
      {"a = \"[[[{{{.a.b\"", 1},
      {"'a.b.c' = 1", 1},
      {"\"a.b\".c = 1", 2},
      {"a = \"x\\\"[.[{\"\nb.c = 1", 2},
      {"a = \"\"\"\n[x.y.z]\nq.r.s.t = [[[\n\"\"\"\nb.c = 1", 2},
      {"a = '''x'''''\nb.c.d = 1", 3},
      {"a = \"\"\"x\\\"\"\"\"\"\nb.c.d = 1", 3},
      {"# a.b.c.d = [[[[\na = 1 # [[[[.b.c", 1},
      {"a = [\n  1, # ]]]] \n  [2],\n]\nb = 1", 3},
  };
  for (const auto& [text, depth] : cases) {
    const TomlNesting n = toml_nesting(text, 100);
    EXPECT_EQ(n.depth, depth) << text;
    EXPECT_EQ(n.line, 0u) << text;
  }
  // Past the limit: where, counting the lines of multi-line strings and arrays.
  const TomlNesting deep = toml_nesting("a = \"\"\"\n\n\"\"\"\nb = [\n1]\nc.d.e = 1", 2);
  EXPECT_EQ(deep.line, 6u);
  EXPECT_GT(deep.depth, 2u);
  // Malformed text ends the scan where it ends, and never reads past it.
  for (const char* text : {"a = \"", "a = \"\"\"", "a = '''x''", "[a.b", "a.b", "a = [", "a = {b", "a = \"x\\",
                           "[[", "a = {b = [", "\"a.b"})
    (void)toml_nesting(text, 100);
}

}  // namespace
}  // namespace tutel::daemon

namespace tutel::daemon {
namespace {

TEST(LayerSpecGroupTest, ParsesAndRoundTrips) {
  const std::string text =
      "name = \"g\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n"
      "[group]\ncoordinator = \"127.0.0.1:7001\"\nsize = 4\nrank = 3\nlocal_size = 2\n"
      "all_to_all = \"2DH\"\nbootstrap_timeout_ms = 1500\ncollective_timeout_ms = 250\n";
  Result<LayerDefinition> def = parse_layer_spec(text, "request");
  ASSERT_TRUE(def.ok()) << def.status();
  ASSERT_TRUE(def->group.has_value());
  EXPECT_EQ(def->group->coordinator_host, "127.0.0.1");
  EXPECT_EQ(def->group->coordinator_port, 7001);
  EXPECT_EQ(def->group->size, 4);
  EXPECT_EQ(def->group->rank, 3);
  EXPECT_EQ(def->group->local_size, 2);
  EXPECT_EQ(def->group->all_to_all, comm::AllToAllAlgo::k2DH);
  EXPECT_EQ(def->group->bootstrap_timeout.count(), 1500);
  EXPECT_EQ(def->group->collective_timeout.count(), 250);
  Result<LayerDefinition> again = parse_layer_spec(format_layer_spec(*def), "formatted");
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_TRUE(again->group.has_value());
  EXPECT_EQ(again->group->coordinator_port, 7001);
  EXPECT_EQ(again->group->rank, 3);
  EXPECT_EQ(again->group->collective_timeout.count(), 250);
  EXPECT_EQ(again->group->all_to_all, comm::AllToAllAlgo::k2DH);
  EXPECT_EQ(again->group->pipeline, 1);
  EXPECT_FALSE(parse_layer_spec("name = \"g\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n", "r")
                   ->group.has_value());
}

// all_to_all and pipeline: a value, or "auto" (the tuner chooses); both round-trip.
TEST(LayerSpecGroupTest, PipelineAndAutoParseAndRoundTrip) {
  const std::string base =
      "name = \"g\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n"
      "[group]\ncoordinator = \"127.0.0.1:7001\"\nsize = 4\nrank = 1\nlocal_size = 2\n";
  struct Want {
    std::string text;
    std::optional<comm::AllToAllAlgo> algo;
    std::optional<int> pipeline;
    std::optional<int> r = 1;
  };
  for (const Want& w : std::vector<Want>{
           {"", comm::AllToAllAlgo::kLinear, 1},
           {"pipeline = 4\n", comm::AllToAllAlgo::kLinear, 4},
           {"pipeline = 64\nall_to_all = \"2dh\"\n", comm::AllToAllAlgo::k2DH, 64},
           {"all_to_all = \"auto\"\n", std::nullopt, 1},
           {"pipeline = \"auto\"\n", comm::AllToAllAlgo::kLinear, std::nullopt},
           {"all_to_all = \"auto\"\npipeline = \"auto\"\n", std::nullopt, std::nullopt},
           {"r = 0\n", comm::AllToAllAlgo::kLinear, 1, 0},
           {"r = \"auto\"\npipeline = 2\n", comm::AllToAllAlgo::kLinear, 2, std::nullopt},
           {"r = \"AUTO\"\npipeline = \"Auto\"\nall_to_all = \"aUtO\"\n", std::nullopt, std::nullopt,
            std::nullopt}}) {
    SCOPED_TRACE(w.text);
    Result<LayerDefinition> def = parse_layer_spec(base + w.text, "request");
    ASSERT_TRUE(def.ok()) << def.status();
    EXPECT_EQ(def->group->all_to_all, w.algo);
    EXPECT_EQ(def->group->pipeline, w.pipeline);
    EXPECT_EQ(def->group->r, w.r);
    Result<LayerDefinition> again = parse_layer_spec(format_layer_spec(*def), "formatted");
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ(again->group->all_to_all, w.algo);
    EXPECT_EQ(again->group->pipeline, w.pipeline);
    EXPECT_EQ(again->group->r, w.r);
  }
  Result<LayerDefinition> tuned =
      parse_layer_spec(base + "all_to_all = \"auto\"\ntune_warmups = 0\ntune_trials = 5\n", "r");
  ASSERT_TRUE(tuned.ok()) << tuned.status();
  Result<LayerDefinition> again = parse_layer_spec(format_layer_spec(*tuned), "formatted");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->group->tune_warmups, 0);
  EXPECT_EQ(again->group->tune_trials, 5);
}

TEST(LayerSpecGroupTest, BadGroupsNameTheKey) {
  const std::string base = "name = \"g\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n[group]\n";
  const auto error_of = [&](const std::string& group) {
    Result<LayerDefinition> r = parse_layer_spec(base + group, "request");
    EXPECT_FALSE(r.ok()) << group;
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  EXPECT_NE(error_of("size = 2\nrank = 0\n").find("group.coordinator"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"localhost:7\"\nsize = 2\nrank = 0\n").find("IPv4"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:0\"\nsize = 2\nrank = 0\n").find("group.coordinator"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:99999\"\nsize = 2\nrank = 0\n").find("group.coordinator"), std::string::npos);
  // An address that names no one host: 0.0.0.0 made the first rank's daemon listen on every
  // interface of its node, at a client's word.
  for (const char* host : {"0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255"}) {
    const std::string message = error_of("coordinator = \"" + std::string(host) + ":7000\"\nsize = 2\nrank = 0\n");
    EXPECT_NE(message.find("does not name one host"), std::string::npos) << host << ": " << message;
    EXPECT_NE(message.find("group.coordinator"), std::string::npos) << host << ": " << message;
  }
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 2\n").find("not below size"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nrank = 0\n").find("group.size"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\nranks = 2\n").find("ranks"), std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\nall_to_all = \"ring\"\n").find("group.all_to_all"),
            std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 6\nrank = 0\nlocal_size = 4\nall_to_all = \"2dh\"\n")
                .find("needs local_size (4) to divide size (6)"),
            std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\nall_to_all = \"Auto \"\n")
                .find("\"linear\", \"2dh\", \"auto\""),
            std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\ntune_trials = 0\n")
                .find("group.tune_trials"),
            std::string::npos);
  EXPECT_NE(error_of("coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\ntune_warmups = -1\n")
                .find("group.tune_warmups"),
            std::string::npos);
  // Tuning keys with nothing to tune are errors, not silently ignored.
  for (const char* key : {"tune_warmups", "tune_trials"}) {
    const std::string message = error_of(
        "coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\nr = 1\n" + std::string(key) + " = 3\n");
    EXPECT_NE(message.find(std::string("group.") + key), std::string::npos) << message;
    EXPECT_NE(message.find("has no effect: nothing is tuned"), std::string::npos) << message;
  }
  for (const char* bad : {"-1", "1048577", "1.0", "\"data\"", "false"}) {
    const std::string message = error_of(
        "coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\nr = " + std::string(bad) + "\n");
    EXPECT_NE(message.find("group.r"), std::string::npos) << bad << ": " << message;
    EXPECT_NE(message.find("[0, 1048576] or \"auto\""), std::string::npos) << bad << ": " << message;
  }
  // r >= 1 must divide the ranks per expert: 1 with E = 4 >= W = 2; 4 with E = 4, W = 16.
  for (const char* bad : {"size = 2\nr = 2\n", "size = 16\nr = 3\n", "size = 16\nr = 8\n"}) {
    const std::string message =
        error_of("coordinator = \"127.0.0.1:7\"\nrank = 0\n" + std::string(bad));
    EXPECT_NE(message.find("group.r"), std::string::npos) << bad << ": " << message;
    EXPECT_NE(message.find("must be 0 or divide the"), std::string::npos) << bad << ": " << message;
  }
  for (const char* good : {"size = 16\nr = 2\n", "size = 16\nr = 4\n", "size = 2\nr = 1\n"}) {
    Result<LayerDefinition> r =
        parse_layer_spec(base + "coordinator = \"127.0.0.1:7\"\nrank = 0\n" + good, "request");
    EXPECT_TRUE(r.ok()) << good << ": " << r.status();
  }
  for (const char* bad : {"0", "65", "-1", "2.0", "\"auto \"", "\"4\"", "true", "[2]"}) {
    const std::string message = error_of(
        "coordinator = \"127.0.0.1:7\"\nsize = 2\nrank = 0\npipeline = " + std::string(bad) + "\n");
    EXPECT_NE(message.find("group.pipeline"), std::string::npos) << bad << ": " << message;
  }
}

}  // namespace
}  // namespace tutel::daemon

namespace tutel::daemon {
namespace {

TEST(ClusterConfigTest, ParsesWithDefaults) {
  const Config c = parse_ok(kMinimal + "[backend]\nranks = 2\n[cluster]\ncoordinator = \"127.0.0.1:7100\"\nnodes = 3\nnode_rank = 2\n");
  ASSERT_TRUE(c.cluster.has_value());
  EXPECT_EQ(c.cluster->coordinator_host, "127.0.0.1");
  EXPECT_EQ(c.cluster->coordinator_port, 7100);
  EXPECT_EQ(c.cluster->nodes, 3);
  EXPECT_EQ(c.cluster->node_rank, 2);
  EXPECT_EQ(c.cluster->ranks_per_node, 2);  // from [backend] ranks
  EXPECT_EQ(c.cluster->bootstrap_timeout.count(), 30000);
  EXPECT_EQ(c.cluster->heartbeat_interval.count(), 250);
  EXPECT_EQ(c.cluster->peer_timeout.count(), 3000);
  EXPECT_FALSE(parse_ok(kMinimal).cluster.has_value());
  const Config all = parse_ok(kMinimal +
                              "[cluster]\ncoordinator = \"127.0.0.1:7100\"\nnodes = 2\nnode_rank = 0\nranks_per_node = 1\n"
                              "bootstrap_timeout_ms = 500\nheartbeat_interval_ms = 20\npeer_timeout_ms = 100\n");
  ASSERT_TRUE(all.cluster.has_value());
  EXPECT_EQ(all.cluster->bootstrap_timeout.count(), 500);
  EXPECT_EQ(all.cluster->heartbeat_interval.count(), 20);
  EXPECT_EQ(all.cluster->peer_timeout.count(), 100);
}

TEST(ClusterConfigTest, RendezvousDefaultsToTheCoordinatorsAddress) {
  const std::string head = kMinimal + "[cluster]\ncoordinator = \"127.0.0.1:7100\"\nnodes = 2\nnode_rank = 1\n";
  const Config c = parse_ok(head);
  ASSERT_TRUE(c.cluster.has_value());
  EXPECT_EQ(c.cluster->rendezvous_host, "127.0.0.1");
  EXPECT_EQ(c.cluster->rendezvous_port, 7100);
  const Config set = parse_ok(head + "rendezvous = \"127.0.0.2:9000\"\n");
  EXPECT_EQ(set.cluster->rendezvous_host, "127.0.0.2");
  EXPECT_EQ(set.cluster->rendezvous_port, 9000);
  expect_error(head + "rendezvous = \"any:7100\" #!\n", "cluster.rendezvous", {"IPv4"});
  expect_error(head + "rendezvous = \"127.0.0.1:0\" #!\n", "cluster.rendezvous");
  expect_error(head + "rendezvous = 7100 #!\n", "cluster.rendezvous");
}

TEST(LayerSpecGroupTest, AGroupWithANameNeedsNoCoordinator) {
  const std::string base = "name = \"g\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n[group]\n";
  Result<LayerDefinition> def = parse_layer_spec(base + "name = \"moe.group-1\"\nsize = 2\nrank = 1\n", "request");
  ASSERT_TRUE(def.ok()) << def.status();
  ASSERT_TRUE(def->group.has_value());
  EXPECT_EQ(def->group->name, "moe.group-1");
  EXPECT_EQ(def->group->coordinator_port, 0);
  const std::string text = format_layer_spec(*def);
  EXPECT_EQ(text.find("coordinator"), std::string::npos) << text;
  Result<LayerDefinition> again = parse_layer_spec(text, "again");
  ASSERT_TRUE(again.ok()) << again.status() << "\n" << text;
  EXPECT_EQ(again->group->name, "moe.group-1");
  EXPECT_EQ(again->group->coordinator_port, 0);
  EXPECT_EQ(again->group->rank, 1);
  // Both: the coordinator is used, the name kept.
  def = parse_layer_spec(base + "coordinator = \"127.0.0.1:7001\"\nname = \"both\"\nsize = 2\nrank = 0\n", "request");
  ASSERT_TRUE(def.ok()) << def.status();
  EXPECT_EQ(def->group->coordinator_port, 7001);
  EXPECT_EQ(parse_layer_spec(format_layer_spec(*def), "again")->group->name, "both");
  const auto error_of = [&](const std::string& group) {
    Result<LayerDefinition> r = parse_layer_spec(base + group, "request");
    EXPECT_FALSE(r.ok()) << group;
    return r.ok() ? std::string() : std::string(r.status().message());
  };
  const std::string neither = error_of("size = 2\nrank = 0\n");
  EXPECT_NE(neither.find("group.coordinator"), std::string::npos) << neither;
  EXPECT_NE(neither.find("or a name"), std::string::npos) << neither;
  EXPECT_NE(error_of("name = \"a b\"\nsize = 2\nrank = 0\n").find("group.name"), std::string::npos);
  EXPECT_NE(error_of("name = \"\"\nsize = 2\nrank = 0\n").find("group.name"), std::string::npos);
  EXPECT_NE(error_of("name = \"" + std::string(65, 'x') + "\"\nsize = 2\nrank = 0\n").find("group.name"),
            std::string::npos);
  EXPECT_NE(error_of("name = \"t/g\"\nsize = 2\nrank = 0\n").find("group.name"), std::string::npos);
  EXPECT_NE(error_of("name = 3\nsize = 2\nrank = 0\n").find("group.name"), std::string::npos);
}

TEST(ClusterConfigTest, BadClustersNameTheKey) {
  const std::string head = kMinimal + "[cluster]\n";
  const std::string ok_coord = "coordinator = \"127.0.0.1:7100\"\n";
  expect_error(head + "nodes = 2\nnode_rank = 0\n", "cluster.coordinator", {"required"});
  expect_error(head + "coordinator = \"node0:7100\" #!\nnodes = 2\nnode_rank = 0\n", "cluster.coordinator",
               {"IPv4"});
  expect_error(head + ok_coord + "node_rank = 0\n", "cluster.nodes");
  expect_error(head + ok_coord + "nodes = 2\n", "cluster.node_rank");
  expect_error(head + ok_coord + "nodes = 0 #!\nnode_rank = 0\n", "cluster.nodes");
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = 2 #!\n", "cluster.node_rank", {"not below nodes 2"});
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = -1 #!\n", "cluster.node_rank");
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = 0\nranks_per_node = 4 #!\n", "cluster.ranks_per_node",
               {"[backend] ranks = 1"});
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = 0\npeer_timeout_ms = 100 #!\nheartbeat_interval_ms = 200\n",
               "cluster.peer_timeout_ms", {"must exceed heartbeat_interval_ms"});
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = 0\nbootstrap_timeout_ms = 0 #!\n",
               "cluster.bootstrap_timeout_ms");
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = \"1\" #!\n", "cluster.node_rank");
  expect_error(head + ok_coord + "nodes = 2\nnode_rank = 0\nnode = 1 #!\n", "cluster.node",
               {"unknown key in [cluster]"});
  expect_error(kMinimal + "cluster = 3 #!\n", "tenant[0].cluster");
}

}  // namespace
}  // namespace tutel::daemon

namespace tutel::daemon {
namespace {

// The example's commented block that starts with `header`, uncommented (empty when absent).
std::string example_block(const std::string& header) {
  const std::string example = read_file(TUTEL_EXAMPLE_CONFIG);
  std::string block;
  size_t at = example.find("# " + header);
  while (at < example.size() && example.compare(at, 2, "# ") == 0) {
    const size_t eol = example.find('\n', at);
    block += example.substr(at + 2, eol - at - 2) + "\n";
    at = eol + 1;
  }
  return block;
}

// The example's commented [cluster] block, uncommented, parses and shows the defaults.
TEST(ClusterConfigTest, ExampleBlockShowsTheDefaults) {
  const std::string block = example_block("[cluster]");
  ASSERT_FALSE(block.empty());
  const Config c = parse_ok(kMinimal + block);
  ASSERT_TRUE(c.cluster.has_value()) << block;
  const ClusterConfig d;
  EXPECT_EQ(c.cluster->bootstrap_timeout, d.bootstrap_timeout);
  EXPECT_EQ(c.cluster->heartbeat_interval, d.heartbeat_interval);
  EXPECT_EQ(c.cluster->peer_timeout, d.peer_timeout);
  EXPECT_EQ(c.cluster->nodes, 2);
}

// The example's commented [layer.group] block, uncommented under a layer, parses and shows the
// defaults of every key it does not have to set (size and rank are required).
TEST(ClusterConfigTest, ExampleGroupBlockShowsTheDefaults) {
  const std::string block = example_block("[layer.group]");
  ASSERT_FALSE(block.empty());
  const Config c = parse_ok(kMinimal + kLayer + block);
  ASSERT_EQ(c.layers.size(), 1u);
  ASSERT_TRUE(c.layers[0].group.has_value()) << block;
  const GroupConfig& g = *c.layers[0].group;
  const GroupConfig d;
  EXPECT_EQ(g.coordinator_host, "127.0.0.1");
  EXPECT_EQ(g.coordinator_port, 7200);
  EXPECT_EQ(g.size, 2);
  EXPECT_EQ(g.rank, 0);
  EXPECT_EQ(g.local_size, d.local_size);
  EXPECT_EQ(g.r, d.r);
  EXPECT_EQ(g.all_to_all, d.all_to_all);
  EXPECT_EQ(g.pipeline, d.pipeline);
  EXPECT_EQ(g.bootstrap_timeout, d.bootstrap_timeout);
  EXPECT_EQ(g.collective_timeout, d.collective_timeout);
  // The tuning keys are commented twice: they are errors unless something is "auto".
  std::string tuned = block;
  for (const std::string key : {"tune_warmups", "tune_trials"}) {
    const size_t at = tuned.find("# " + key);
    ASSERT_NE(at, std::string::npos) << key;
    tuned.erase(at, 2);
  }
  const size_t r_at = tuned.find("r = 1 ");
  ASSERT_NE(r_at, std::string::npos);
  tuned.replace(r_at, 5, "r = \"auto\"");
  const Config t = parse_ok(kMinimal + kLayer + tuned);
  ASSERT_EQ(t.layers.size(), 1u);
  ASSERT_TRUE(t.layers[0].group.has_value()) << tuned;
  EXPECT_FALSE(t.layers[0].group->r.has_value());
  EXPECT_EQ(t.layers[0].group->tune_warmups, d.tune_warmups);
  EXPECT_EQ(t.layers[0].group->tune_trials, d.tune_trials);
}

}  // namespace
}  // namespace tutel::daemon
