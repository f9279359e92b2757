// Writes the seed corpora of the fuzz targets, built with the project's own encoders
// (send_frame's header layout, dump_body, put_layout, error_body, format_layer_spec,
// write_safetensors, bootstrap_wire.hpp), so every fuzzer starts from valid inputs.
//
//   gen_seeds OUT_DIR [EXAMPLE_TOML]
// creates OUT_DIR/{ipc,config,safetensors,bootstrap,rendezvous,client}/seed-N.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <vector>

#include "../../comm/src/bootstrap_wire.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/daemon/config.hpp"
#include "tutel/ipc/json_body.hpp"
#include "tutel/ipc/protocol.hpp"

namespace fs = std::filesystem;
using namespace tutel;
using nlohmann::json;

namespace {

fs::path g_out;
std::map<std::string, int> g_count;

void put(const std::string& target, const std::string& bytes) {
  const fs::path dir = g_out / target;
  fs::create_directories(dir);
  std::ofstream(dir / ("seed-" + std::to_string(g_count[target]++)), std::ios::binary) << bytes;
}

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

const char* kSpec = R"(name = "moe0"
experts = 4
model_dim = 8
hidden = 16
k = 2
capacity_factor = -1.5
activation = "gelu"
gate_noise = 0.5
noise_seed = 3
normalize_gate = false
batch_prioritized = true
is_postscore = false
has_fc1_bias = true
has_fc2_bias = false
dtype = "bf16"
init_seed = 7
token_buckets = [64, 512]

[optimizer]
kind = "sgd"
lr = 0.01
momentum = 0.9
nesterov = true
weight_decay = 1e-4
)";

const char* kGroupSpec = R"(name = "g0"
experts = 8
model_dim = 16
hidden = 32
output_dim = 12
weights = "w.safetensors"
optimizer = { kind = "adamw", beta1 = 0.8, beta2 = 0.99, eps = 1e-6 }
[group]
coordinator = "127.0.0.1:7000"
name = "grp-1"
size = 4
rank = 1
local_size = 2
all_to_all = "2dh"
r = "auto"
pipeline = 4
tune_warmups = 0
tune_trials = 3
bootstrap_timeout_ms = 1000
collective_timeout_ms = 500
)";

const char* kConfig = R"([server]
client_socket = "run/client.sock"
admin_socket = "/run/tuteld/admin.sock"
state_dir = "state"
metrics_listen = "[::1]:0"
log_level = "debug"
spin_us = 10
arena_bytes = "1MiB"

[backend]
kind = "cuda"
ranks = 2
threads_per_rank = 1
devices = [0, 1]

[cluster]
coordinator = "127.0.0.1:7100"
nodes = 2
node_rank = 1
ranks_per_node = 2
rendezvous = "127.0.0.1:7101"
bootstrap_timeout_ms = 1000
heartbeat_interval_ms = 100
peer_timeout_ms = 1000

[[tenant]]
name = "a"
uids = [1000, 1001]
gids = [50]
max_layers = 4
max_memory_bytes = "8GiB"
max_inflight = 16
max_sessions = 2

[[tenant]]
name = "b"
gids = [51]

[[layer]]
name = "moe0"
tenant = "a"
experts = 4
model_dim = 8
hidden = 16
init_seed = 7
optimizer = { kind = "sgd", lr = 0.1 }

[[layer]]
name = "moe1"
tenant = "b"
experts = 2
model_dim = 4
hidden = 4
weights = "../w/moe1.safetensors"
[layer.group]
name = "gg"
size = 2
rank = 0
)";

void ipc_seeds() {
  std::vector<std::string> frames;
  frames.push_back(ipc::encode_frame(ipc::FrameType::kHello, 1,
                                     ipc::dump_body({{"client", "trainer"}, {"pid", 42}})));
  frames.push_back(
      ipc::encode_frame(ipc::FrameType::kCreateLayer, 2, ipc::dump_body({{"spec", kSpec}})));
  frames.push_back(
      ipc::encode_frame(ipc::FrameType::kAttachLayer, 3, ipc::dump_body({{"name", "moe0"}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kStep, 4, ipc::dump_body({{"handle", 1}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kSave, 5,
                                     ipc::dump_body({{"handle", 1}, {"path", "a/b.safetensors"}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kMapRegion, 6,
                                     ipc::dump_body({{"rank", 0}, {"bytes", 65536}})));
  frames.push_back(
      ipc::encode_frame(ipc::FrameType::kUnmapRegion, 7, ipc::dump_body({{"region", 1}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kGradNorm, 11, ipc::dump_body({{"handle", 1}})));
  frames.push_back(
      ipc::encode_frame(ipc::FrameType::kScaleGrads, 12, ipc::dump_body({{"handle", 1}, {"factor", 0.25}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kExportState, 13, ipc::dump_body({{"handle", 1}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kImportState, 14, ipc::dump_body({{"handle", 1}})));
  json hello{{"session", 3}, {"tenant", "a"}, {"spin_us", 50}};
  ipc::put_layout(hello, *ipc::arena_layout(64 << 20));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kHelloReply, 1, ipc::dump_body(hello)));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kError, 8,
                                     ipc::error_body(Status::NotFound("no layer 'x'"))));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kLayerInfo, 2,
                                     ipc::dump_body({{"handle", 1},
                                                     {"name", "moe0"},
                                                     {"experts", 4},
                                                     {"model_dim", 8},
                                                     {"hidden", 16},
                                                     {"output_dim", 8},
                                                     {"k", 2},
                                                     {"step", 0},
                                                     {"rank", 0},
                                                     {"device", "cpu:0"},
                                                     {"state_bytes", 4096}})));
  frames.push_back(ipc::encode_frame(ipc::FrameType::kAdminStatus, 9, ""));
  frames.push_back(
      ipc::encode_frame(ipc::FrameType::kAdminCheckpoint, 10,
                        ipc::dump_body({{"layer", "a/moe0"}, {"path", "/tmp/x.safetensors"}})));
  std::string all;
  for (const std::string& f : frames) {
    all += f;
    put("ipc", std::string(1, '\0') + std::string(1, '\x7f') + f);  // decoder, one chunk
    put("ipc", std::string(1, '\1') + f);                            // recv_frame
  }
  put("ipc", std::string(1, '\0') + std::string(1, '\x7f') + all);
  put("ipc", std::string(1, '\1') + all);
  // read_available: 1696-byte messages, the first carrying three descriptors.
  std::string ra(1, '\2');
  for (size_t off = 0, i = 0; off < all.size(); off += 1696, ++i) {
    ra += static_cast<char>(0x3f | (i == 0 ? 0x40 : 0));
    ra += all.substr(off, 1696);
  }
  put("ipc", ra);
  // ranges
  std::string r(1, '\3');
  for (int i = 0; i < 80; ++i) r += static_cast<char>(i * 37);
  put("ipc", r);
}

void config_seeds(const std::string& example) {
  put("config", std::string(1, '\0') + kSpec);
  put("config", std::string(1, '\0') + kGroupSpec);
  // Small specs, one key away from each rule, so mutations reach every check quickly.
  const std::string small = "name=\"a\"\nexperts=2\nmodel_dim=2\nhidden=2\ninit_seed=1\n";
  for (const char* extra : {"token_buckets=[1,2]\n", "token_buckets=[2,1]\n", "k=3\n", "output_dim=0\n",
                            "optimizer={kind=\"sgd\",nesterov=true}\n", "group={name=\"g\",size=2,rank=1}\n",
                            "capacity_factor=-1e6\n", "weights=\"w\"\n"})
    put("config", std::string(1, '\0') + small + extra);
  put("config", std::string(1, '\1') + kConfig);
  if (!example.empty()) put("config", std::string(1, '\1') + example);
  if (auto def = daemon::parse_layer_spec(kGroupSpec, "seed"); def.ok())
    put("config", std::string(1, '\0') + daemon::format_layer_spec(*def));
  else
    std::fprintf(stderr, "kGroupSpec: %s\n", std::string(def.status().message()).c_str());
  if (auto c = daemon::parse_config(kConfig, "/etc/tuteld/fuzz.toml"); !c.ok())
    std::fprintf(stderr, "kConfig: %s\n", std::string(c.status().message()).c_str());
}

void safetensors_seeds() {
  const fs::path tmp = fs::temp_directory_path() / ("gen-seeds-" + std::to_string(::getpid()) + ".safetensors");
  std::vector<float> w(4 * 8, 0.5f), b(4, 1.f);
  std::vector<uint16_t> h(6, 0x3f80);
  std::vector<int64_t> idx(3, 7);
  std::vector<SafetensorsEntry> entries = {
      {"gates.0.wg.weight", DType::kF32, Shape{4, 8}, w.data()},
      {"experts.batched_fc1_bias", DType::kF32, Shape{1, 4}, b.data()},
      {"idx", DType::kI64, Shape{3}, idx.data()},
      {"half", DType::kBF16, Shape{2, 3}, h.data()},
      {"empty", DType::kF32, Shape{0, 5}, nullptr},
  };
  const std::map<std::string, std::string> meta = {{"tuteld.spec", kSpec}, {"tuteld.step", "12"}};
  if (!write_safetensors(tmp.string(), entries, meta).ok()) std::abort();
  const std::string file = read_file(tmp);
  fs::remove(tmp);
  put("safetensors", std::string(1, '\0') + file);
  // Structured mode: u16 header length, then header and data.
  uint64_t header_len;
  std::memcpy(&header_len, file.data(), 8);
  std::string s(1, '\1');
  s += static_cast<char>(header_len & 0xff);
  s += static_cast<char>((header_len >> 8) & 0xff);
  s += file.substr(8);
  put("safetensors", s);
  put("safetensors", std::string(1, '\1') + std::string("\x10\0", 2) + R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})" + std::string(8, '\1'));
}

void bootstrap_seeds() {
  using namespace tutel::comm;
  const std::string table = wire::encode_table({"p0", "payload1"}, {"127.0.0.1, pid 1", "127.0.0.1, pid 2"},
                                               /*authenticated=*/false);
  put("bootstrap", std::string(1, '\0') + std::string(1, '\1') + table.substr(wire::kHeaderBytes));
  wire::Header hello;
  hello.kind = wire::kHello;
  hello.rank = 1;
  hello.size = 2;
  hello.local_size = 1;
  hello.pid = 77;
  const std::string msg = wire::encode(hello, "ucx", "payload-of-rank-1");
  // Coordinator of a group of 2 (size byte 0 -> 0 % 7 + 2), the hello in one chunk.
  put("bootstrap", std::string(1, '\1') + std::string(1, '\0') + std::string(1, '\x7f') + msg);
  wire::Header join = hello;
  join.kind = wire::kJoin;
  std::string body;
  wire::put_u32(body, 1000);
  body += "payload";
  put("bootstrap", std::string(1, '\1') + std::string(1, '\0') + std::string(1, '\x7f') +
                       wire::encode(join, "ucx@grp", body));
  // A rank's client side in a group of 2 (u32 1 -> size 2), answered with a table / an error.
  const std::string two = std::string("\1\0\0\0", 4);
  put("bootstrap", std::string(1, '\2') + two + '\0' + table);
  put("bootstrap", std::string(1, '\2') + two + '\1' + table);
  put("bootstrap", std::string(1, '\2') + two + '\0' + wire::encode_error(Status::Timeout("rank 3 never came")));
}

void rendezvous_seeds() {
  // conn 0 and conn 1 join group 0 as ranks 0 and 1 of 2, then both read; a raw join too.
  std::string s;
  s += static_cast<char>(0x04 | 0);  // join on conn 0
  s += std::string("\0\0\2\1\x14\3", 6) + "abc";
  s += static_cast<char>(0x04 | 1);  // join on conn 1
  s += std::string("\0\1\2\1\x14\3", 6) + "def";
  s += static_cast<char>(0x0c | 0);
  s += static_cast<char>(0x0c | 1);
  put("rendezvous", s);
  tutel::comm::wire::Header join;
  join.kind = tutel::comm::wire::kJoin;
  join.size = 1;
  join.local_size = 1;
  std::string body;
  tutel::comm::wire::put_u32(body, 100);
  const std::string raw = tutel::comm::wire::encode(join, "r@raw", body + "x");
  put("rendezvous", std::string(1, '\x02') + static_cast<char>(raw.size()) + raw + '\x0e');
}

void client_seeds() {
  const json status{{"version", "0.1.0"}, {"pid", 42},        {"uptime_seconds", 3723.5},
                    {"backend", "cpu"},   {"ranks", 2},       {"sessions", 1},
                    {"layers", 3},        {"tenants", 2},     {"client_socket", "/run/c.sock"},
                    {"state_dir", ""},    {"metrics_listen", "127.0.0.1:9464"}, {"metrics_port", 9464},
                    {"extra", json::array({1, 2.5, "x"})}};
  put("client", std::string(1, '\0') + status.dump());
  const json tenants{{"tenants", json::array({json{{"name", "a"}, {"uids", {1000}}, {"gids", json::array()},
                                                  {"layers", 1}, {"max_layers", 64}, {"memory_bytes", 123456},
                                                  {"max_memory_bytes", 8589934592}, {"activation_bytes", 0},
                                                  {"pending_bytes", 0}, {"region_bytes", 4096},
                                                  {"inflight", 0}, {"max_inflight", 256}}})}};
  put("client", std::string(1, '\1') + tenants.dump());
  const json layers{{"layers", json::array({json{{"tenant", "a"}, {"name", "moe0"}, {"handle", 1},
                                                 {"rank", 0}, {"experts", 4}, {"model_dim", 8},
                                                 {"hidden", 16}, {"output_dim", 8}, {"k", 2},
                                                 {"capacity_factor", 1.25}, {"step", 3},
                                                 {"memory_bytes", 4096}, {"pending_backwards", 0},
                                                 {"plans", {{"kind", "host"}, {"plans", 2}, {"held", 1},
                                                            {"bytes", 100}, {"hits", 5}, {"misses", 1},
                                                            {"builds", 2}, {"evictions", 0}}},
                                                 {"capacity", 8}, {"dropped", 0}, {"l_aux", 1.01}}})}};
  put("client", std::string(1, '\2') + layers.dump());
  put("client", std::string(1, '\3') + layers.dump());
  const json peers{
      {"cluster",
       {{"nodes", json::array({json{{"node", 0},
                                    {"address", "127.0.0.1:7100"},
                                    {"first_rank", 0},
                                    {"ranks", 2},
                                    {"state", "up"},
                                    {"self", true},
                                    {"silent_ms", 3},
                                    {"last_error", ""}}})}}},
      {"groups",
       json::array({json{{"tenant", "a"},
                         {"layer", "g"},
                         {"rank", 0},
                         {"size", 2},
                         {"r", "auto"},
                         {"all_to_all", "auto"},
                         {"pipeline", "auto"},
                         {"tuner_candidates",
                          json::array({json{{"r", 0}, {"all_to_all", "linear"}, {"pipeline", 1}},
                                       json{{"r", 1}, {"all_to_all", "2dh"}, {"pipeline", 2}}})},
                         {"tuner", json::array({json{{"capacity_bucket", 64},
                                                     {"state", "decided"},
                                                     {"rounds_done", 3},
                                                     {"r", 0},
                                                     {"all_to_all", "linear"},
                                                     {"pipeline", 1},
                                                     {"total_ns", json::array({1000, 2000})}},
                                                json{{"capacity_bucket", 128},
                                                     {"state", "measuring"},
                                                     {"rounds_done", 1}}})},
                         {"state", "down"},
                         {"last_error", "boom"},
                         {"peers", json::array({json{{"rank", 1},
                                                     {"address", "x"},
                                                     {"via", "ucx"},
                                                     {"state", "up"},
                                                     {"bytes_sent", 10},
                                                     {"bytes_received", 20}}})}}})}};
  put("client", std::string(1, '\4') + peers.dump());
  put("client", std::string(1, '\5') + json{{"text", "# HELP x\nx 1\n"}, {"path", "/tmp/p"}}.dump());
  ipc::CompletionDescriptor c{};
  c.request_id = 9;
  c.status_code = 5;
  std::snprintf(c.message, sizeof c.message, "NotFound: no such layer");
  put("client", std::string(1, '\6') + std::string(reinterpret_cast<const char*>(&c), sizeof c));
  put("client", std::string(1, '\7') + std::string(128, 'a'));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: gen_seeds OUT_DIR [EXAMPLE_TOML]\n");
    return 2;
  }
  g_out = argv[1];
  ipc_seeds();
  config_seeds(argc > 2 ? read_file(argv[2]) : std::string());
  safetensors_seeds();
  bootstrap_seeds();
  rendezvous_seeds();
  client_seeds();
  for (const auto& [target, n] : g_count) std::printf("%s: %d seeds\n", target.c_str(), n);
  return 0;
}
