// Parses tuteld.toml and layer specs (docs/config.md). toml++ turns text into a tree with a
// source position on every key and value; this file walks that tree against the schema, with
// the typed reads of toml_reader.hpp, so every message can point at the exact line, column and
// key path.
#include "tutel/daemon/config.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <grp.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <initializer_list>
#include <map>
#include <sstream>
#include <system_error>
#include <tuple>

#include "toml_nesting.hpp"
#include "toml_reader.hpp"
#include "tutel/graphs/exchange_tuner.hpp"

namespace tutel::daemon {
namespace {

namespace fs = std::filesystem;

using toml_reader::describe;
using toml_reader::for_each_table;
using toml_reader::format_double;
using toml_reader::get_bool;
using toml_reader::get_bytes;
using toml_reader::get_double;
using toml_reader::get_enum;
using toml_reader::get_float;
using toml_reader::get_int;
using toml_reader::get_int_array;
using toml_reader::get_name;
using toml_reader::get_path;
using toml_reader::get_string;
using toml_reader::get_table;
using toml_reader::KeyList;
using toml_reader::kMaxInt;
using toml_reader::located_error;
using toml_reader::quote;
using toml_reader::Scope;

// Dimension bounds keep every size product the daemon computes far from int64 overflow.
constexpr int64_t kMaxDim = int64_t{1} << 24;
constexpr int64_t kMaxExperts = int64_t{1} << 20;
constexpr int kMaxGroupSize = 1 << 20;
constexpr double kMaxLayerParams = 1099511627776.0;  // 2^40 parameters (4 TiB in f32)
constexpr int64_t kMaxUid = 4294967294;              // (uid_t)-1 means "no uid"
constexpr size_t kMaxSocketPath = sizeof(sockaddr_un::sun_path) - 1;

// ---- Layer specs --------------------------------------------------------------------------

std::optional<DType> parse_matmul_dtype(std::string_view name) {
  if (name == "f32") return DType::kF32;
  if (name == "bf16") return DType::kBF16;
  return std::nullopt;
}

std::optional<OptimizerKind> parse_optimizer_kind(std::string_view name) {
  if (name == "sgd") return OptimizerKind::kSgd;
  if (name == "adamw") return OptimizerKind::kAdamW;
  return std::nullopt;
}

// The keys of a [[layer]] table (a config's also takes "tenant"), of its optimizer and group
// tables.
constexpr std::string_view kLayerKeys[] = {
    "name", "experts", "model_dim", "hidden", "output_dim", "k", "capacity_factor", "activation", "gate_noise",
    "noise_seed", "normalize_gate", "batch_prioritized", "is_postscore", "has_fc1_bias", "has_fc2_bias", "dtype",
    "weights", "init_seed", "token_buckets", "optimizer", "group", "tenant"};
constexpr std::string_view kOptimizerKeys[] = {"kind", "lr", "momentum", "nesterov", "weight_decay",
                                               "beta1", "beta2", "eps"};
constexpr std::string_view kGroupKeys[] = {"coordinator", "name", "size", "rank", "local_size", "all_to_all", "r",
                                           "pipeline", "tune_warmups", "tune_trials", "bootstrap_timeout_ms",
                                           "collective_timeout_ms"};

Status parse_optimizer(const Scope& layer, OptimizerConfig& o) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table* t, get_table(layer, "optimizer", false,
                                                         "(optimizer = { kind = \"adamw\" })"));
  if (t == nullptr) return Status::OK();
  const Scope s = layer.child(*t, layer.key_path("optimizer"), "the optimizer table");
  TUTEL_RETURN_IF_ERROR(s.check_keys(kOptimizerKeys));
  TUTEL_RETURN_IF_ERROR(get_enum(s, "kind", "\"sgd\", \"adamw\"", parse_optimizer_kind, o.kind));
  const bool sgd = o.kind == OptimizerKind::kSgd;
  const std::vector<std::string_view> other_kind_keys =
      sgd ? std::vector<std::string_view>{"beta1", "beta2", "eps"}
          : std::vector<std::string_view>{"momentum", "nesterov"};
  for (std::string_view key : other_kind_keys)
    if (s.find(key) != nullptr)
      return s.error_near(key, std::string("applies only to kind = \"") + (sgd ? "adamw" : "sgd") +
                                   "\"; this optimizer is " + (sgd ? "sgd" : "adamw") +
                                   (s.find("kind") ? "" : " (the default)"));
  const auto positive = [](float v) { return std::isfinite(v) && v > 0.f; };
  const auto unit = [](float v) { return v >= 0.f && v < 1.f; };
  TUTEL_RETURN_IF_ERROR(get_float(s, "lr", positive, "a finite number > 0", o.lr));
  TUTEL_RETURN_IF_ERROR(get_float(s, "momentum", unit, "a number in [0, 1)", o.momentum));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "nesterov", o.nesterov));
  TUTEL_RETURN_IF_ERROR(get_float(
      s, "weight_decay", [](float v) { return std::isfinite(v) && v >= 0.f; },
      "a finite number >= 0", o.weight_decay));
  // A beta is used as an f32 factor too (the moments' decay), which must stay below 1.
  const auto beta = [](double v) { return v >= 0.0 && v < 1.0 && static_cast<float>(v) < 1.f; };
  TUTEL_RETURN_IF_ERROR(get_double(s, "beta1", beta, "a number in [0, 1)", o.beta1));
  TUTEL_RETURN_IF_ERROR(get_double(s, "beta2", beta, "a number in [0, 1)", o.beta2));
  TUTEL_RETURN_IF_ERROR(get_float(s, "eps", positive, "a finite number > 0", o.eps));
  if (o.nesterov && o.momentum <= 0.f)
    return s.error_near("nesterov", "nesterov = true needs momentum > 0");
  return Status::OK();
}

// The key `key` ("coordinator"): "<IPv4 address>:<port>". Absent and not required: unchanged.
Status get_address(const Scope& s, std::string_view key, std::string& host, uint16_t& port_out,
                   bool required = true) {
  if (!required && s.find(key) == nullptr) return Status::OK();
  std::string coordinator;
  TUTEL_RETURN_IF_ERROR(get_string(s, key, coordinator, true, "\"host:port\""));
  const size_t colon = coordinator.rfind(':');
  in_addr addr{};
  int64_t port = -1;
  if (colon != std::string::npos) {
    char* end = nullptr;
    port = std::strtol(coordinator.c_str() + colon + 1, &end, 10);
    if (*end != '\0' || end == coordinator.c_str() + colon + 1) port = -1;
  }
  if (colon == std::string::npos || port < 1 || port > 65535 ||
      ::inet_pton(AF_INET, coordinator.substr(0, colon).c_str(), &addr) != 1)
    return s.error_near(key, "expected \"<IPv4 address>:<port>\", got \"" + coordinator + "\"");
  // The address names one host, which the members connect to and where the first rank listens: not
  // the "this network" block (its first address, the unspecified one, would listen on every
  // interface of the daemon's node, beyond the members), multicast (224/4) or reserved and
  // broadcast (240/4).
  const uint32_t a = ntohl(addr.s_addr);
  if ((a >> 24) == 0 || (a >> 28) == 0xe || (a >> 28) == 0xf)
    return s.error_near(key, "\"" + coordinator +
                                 "\" does not name one host (an unspecified, multicast or broadcast address): give "
                                 "the address of the node where the first member runs");
  host = coordinator.substr(0, colon);
  port_out = static_cast<uint16_t>(port);
  return Status::OK();
}

Status get_coordinator(const Scope& s, std::string& host, uint16_t& port_out) {
  return get_address(s, "coordinator", host, port_out);
}

Status get_milliseconds(const Scope& s, std::string_view key, std::chrono::milliseconds& out) {
  int64_t ms = out.count();
  TUTEL_RETURN_IF_ERROR(get_int(s, key, 1, 3'600'000, ms));
  out = std::chrono::milliseconds(ms);
  return Status::OK();
}

// "auto" in any letter case, as the all-to-all names are read.
bool is_auto(const toml::node& n) {
  const auto* text = n.as_string();
  if (text == nullptr || text->get().size() != 4) return false;
  std::string lower = text->get();
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return lower == "auto";
}

// An integer in [lo, hi], or "auto" (none: the tuner chooses). Absent: `out` stays.
Status get_int_or_auto(const Scope& s, std::string_view key, int lo, int hi,
                       std::optional<int>& out) {
  const toml::node* n = s.find(key);
  if (n == nullptr) return Status::OK();
  if (is_auto(*n)) {
    out.reset();
    return Status::OK();
  }
  const auto* v = n->as_integer();
  if (v == nullptr || v->get() < lo || v->get() > hi)
    return s.error(*n, key,
                   "expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                       "] or \"auto\", got " + describe(*n));
  out = static_cast<int>(v->get());
  return Status::OK();
}

// `experts`: the layer's E, against which r is checked.
Status parse_group(const Scope& layer, int64_t experts, std::optional<GroupConfig>& out) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table* t, get_table(layer, "group", false,
                                                         "(group = { coordinator = \"127.0.0.1:7000\", size = 2, rank = 0 })"));
  if (t == nullptr) return Status::OK();
  const Scope s = layer.child(*t, layer.key_path("group"), "the group table");
  TUTEL_RETURN_IF_ERROR(s.check_keys(kGroupKeys));
  GroupConfig g;
  if (s.find("name") != nullptr) TUTEL_RETURN_IF_ERROR(get_name(s, "name", "a group name", g.name));
  if (s.find("coordinator") == nullptr && g.name.empty())
    return s.error_near("coordinator",
                        "missing required key (\"host:port\") in " + std::string("the group table") +
                            ": give the group a coordinator = \"<IPv4>:<port>\", or a name to meet through "
                            "the cluster's rendezvous service (daemons with [cluster])");
  TUTEL_RETURN_IF_ERROR(get_address(s, "coordinator", g.coordinator_host, g.coordinator_port, false));
  TUTEL_RETURN_IF_ERROR(get_int(s, "size", 1, kMaxGroupSize, g.size, true));
  TUTEL_RETURN_IF_ERROR(get_int(s, "rank", 0, (1 << 20) - 1, g.rank, true));
  if (g.rank >= g.size) return s.error_near("rank", "rank " + std::to_string(g.rank) + " is not below size " + std::to_string(g.size));
  TUTEL_RETURN_IF_ERROR(get_int(s, "local_size", 1, 1 << 20, g.local_size));
  if (const toml::node* n = s.find("all_to_all"); n != nullptr) {
    const auto* text = n->as_string();
    const std::optional<comm::AllToAllAlgo> algo =
        text != nullptr ? comm::parse_all_to_all_algo(text->get()) : std::nullopt;
    if (is_auto(*n))
      g.all_to_all.reset();  // the tuner chooses
    else if (algo)
      g.all_to_all = *algo;
    else
      return s.error(*n, "all_to_all",
                     "expected one of \"linear\", \"2dh\", \"auto\", got " + describe(*n));
  }
  TUTEL_RETURN_IF_ERROR(get_int_or_auto(s, "pipeline", 1, graphs::kMaxPipeline, g.pipeline));
  TUTEL_RETURN_IF_ERROR(get_int_or_auto(s, "r", 0, kMaxGroupSize, g.r));
  // r >= 1 says how many of the s = W / E ranks that share an expert split its H (E >= W: s = 1).
  if (g.r && *g.r > 1) {
    const int64_t shards = experts < g.size && g.size % experts == 0 ? g.size / experts : 1;
    if (shards % *g.r != 0)
      return s.error_near(
          "r", "r = " + std::to_string(*g.r) + " must be 0 or divide the " +
                   std::to_string(shards) + " rank(s) that share each expert (W / E = " +
                   std::to_string(g.size) + " / " + std::to_string(experts) +
                   " when the group has more ranks than experts, else 1); \"auto\" tries them all");
  }
  TUTEL_RETURN_IF_ERROR(get_int(s, "tune_warmups", 0, 100, g.tune_warmups));
  TUTEL_RETURN_IF_ERROR(get_int(s, "tune_trials", 1, 1000, g.tune_trials));
  // A tuning key without anything to tune would be silently ignored: say so instead.
  for (const char* key : {"tune_warmups", "tune_trials"})
    if (s.find(key) != nullptr && !g.tuned())
      return s.error_near(key,
                          std::string(key) +
                              " has no effect: nothing is tuned; set r, all_to_all or pipeline "
                              "to \"auto\", or remove " +
                              key);
  if (g.all_to_all == comm::AllToAllAlgo::k2DH && g.size % g.local_size != 0)
    return s.error_near("all_to_all", "all_to_all = \"2dh\" needs local_size (" + std::to_string(g.local_size) +
                                          ") to divide size (" + std::to_string(g.size) +
                                          "): it exchanges within each node, then across nodes");
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "bootstrap_timeout_ms", g.bootstrap_timeout));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "collective_timeout_ms", g.collective_timeout));
  out = g;
  return Status::OK();
}

// token_buckets = [128, 1024, 4096]: the plans' token buckets (see LayerDefinition).
Status parse_token_buckets(const Scope& s, LayerDefinition& def) {
  constexpr int64_t kMaxBucket = int64_t{1} << 30;  // the most tokens a request may carry
  TUTEL_RETURN_IF_ERROR(get_int_array(s, "token_buckets", 1, kMaxBucket, def.token_buckets));
  const std::vector<int64_t>& b = def.token_buckets;
  if (s.find("token_buckets") == nullptr) return Status::OK();
  if (b.empty() || b.size() > kMaxTokenBuckets)
    return s.error_near("token_buckets", "expected 1 to " + std::to_string(kMaxTokenBuckets) +
                                             " token counts such as [128, 1024, 4096], got " +
                                             std::to_string(b.size()));
  for (size_t i = 1; i < b.size(); ++i)
    if (b[i] <= b[i - 1])
      return s.error_near("token_buckets", "must be strictly ascending, but " + std::to_string(b[i]) +
                                               " follows " + std::to_string(b[i - 1]));
  if (def.group)
    return s.error_near("token_buckets",
                        "a layer with [group] runs without plans and has no token buckets; remove "
                        "token_buckets or the [group] table");
  return Status::OK();
}

// The keys of a [[layer]] table and of a request's spec. `base_dir` empty: paths kept as written.
Status parse_layer(const Scope& s, bool in_config, const fs::path& base_dir, LayerDefinition& def) {
  const std::span<const std::string_view> layer_keys(kLayerKeys, std::size(kLayerKeys) - (in_config ? 0 : 1));
  TUTEL_RETURN_IF_ERROR(s.check_keys(layer_keys));
  TUTEL_RETURN_IF_ERROR(s.check_keys_taken_by("optimizer", kOptimizerKeys, layer_keys));
  TUTEL_RETURN_IF_ERROR(s.check_keys_taken_by("group", kGroupKeys, layer_keys));
  TUTEL_RETURN_IF_ERROR(get_name(s, "name", "a layer name", def.name));
  if (in_config) TUTEL_RETURN_IF_ERROR(get_string(s, "tenant", def.tenant, true, "a tenant name"));

  LayerSpec& spec = def.spec;
  TUTEL_RETURN_IF_ERROR(get_int(s, "experts", 1, kMaxExperts, spec.experts, true));
  TUTEL_RETURN_IF_ERROR(get_int(s, "model_dim", 1, kMaxDim, spec.model_dim, true));
  TUTEL_RETURN_IF_ERROR(get_int(s, "hidden", 1, kMaxDim, spec.hidden, true));
  TUTEL_RETURN_IF_ERROR(get_int(s, "output_dim", 0, kMaxDim, spec.output_dim));
  TUTEL_RETURN_IF_ERROR(get_int(s, "k", 1, kMaxExperts, spec.k));
  if (spec.k > spec.experts)
    return s.error_near("k", "k = " + std::to_string(spec.k) +
                                 (s.find("k") ? "" : " (the default)") +
                                 " exceeds experts = " + std::to_string(spec.experts) +
                                 "; k must be between 1 and experts");
  TUTEL_RETURN_IF_ERROR(get_double(
      s, "capacity_factor", [](double f) { return std::isfinite(f) && std::abs(f) <= 1e6; },
      "a finite number with |f| <= 1e6 (0 = dropless)", spec.capacity_factor));
  TUTEL_RETURN_IF_ERROR(get_enum(
      s, "activation", "\"relu\", \"gelu\", \"silu\"",
      [](std::string_view n) { return parse_activation(n); }, spec.activation));
  TUTEL_RETURN_IF_ERROR(get_double(
      s, "gate_noise", [](double v) { return std::isfinite(v) && v >= 0; }, "a finite number >= 0",
      spec.gate_noise));
  TUTEL_RETURN_IF_ERROR(get_int(s, "noise_seed", 0, kMaxInt, spec.noise_seed));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "normalize_gate", spec.normalize_gate));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "batch_prioritized", spec.batch_prioritized));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "is_postscore", spec.is_postscore));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "has_fc1_bias", spec.has_fc1_bias));
  TUTEL_RETURN_IF_ERROR(get_bool(s, "has_fc2_bias", spec.has_fc2_bias));
  TUTEL_RETURN_IF_ERROR(
      get_enum(s, "dtype", "\"f32\", \"bf16\"", parse_matmul_dtype, spec.matmul_dtype));

  const double params =
      static_cast<double>(spec.experts) *
      (static_cast<double>(spec.hidden) * static_cast<double>(spec.model_dim + spec.out_dim() + 2) +
       static_cast<double>(spec.model_dim));
  if (params > kMaxLayerParams)
    return s.error_near("", "the layer would hold " + format_double(params) +
                                " parameters, more than 2^40; check experts, model_dim and hidden");

  const bool has_weights = s.find("weights") != nullptr, has_seed = s.find("init_seed") != nullptr;
  if (has_weights == has_seed)
    return s.error_near(has_weights ? "init_seed" : "",
                        has_weights ? "give either weights or init_seed, not both"
                                    : "missing key: give weights = \"file.safetensors\" (Tutel "
                                      "parameter names) or init_seed = <integer>");
  if (has_weights) {
    std::string path;
    TUTEL_RETURN_IF_ERROR(get_path(s, "weights", base_dir, true, path));
    def.weights_path = std::move(path);
  } else {
    uint64_t seed = 0;
    TUTEL_RETURN_IF_ERROR(get_int(s, "init_seed", 0, kMaxInt, seed));
    def.init_seed = seed;
  }
  TUTEL_RETURN_IF_ERROR(parse_optimizer(s, def.optimizer));
  TUTEL_RETURN_IF_ERROR(parse_group(s, spec.experts, def.group));
  TUTEL_RETURN_IF_ERROR(parse_token_buckets(s, def));
  // The plans' own bound (graphs/plan_key.cpp), here so that the file's line is named and not
  // the start that fails: a bucket's tokens·k routing indices are i32.
  if (!def.token_buckets.empty() && def.token_buckets.back() * spec.k >= (int64_t{1} << 31))
    return s.error_near("token_buckets", "the bucket " + std::to_string(def.token_buckets.back()) + " times k = " +
                                             std::to_string(spec.k) +
                                             " routes 2^31 or more tokens (routing indices are i32); use smaller "
                                             "buckets");

  if (Status st = spec.validate(); !st.ok()) return s.error_near("", st.message());
  return Status::OK();
}

// ---- The daemon config --------------------------------------------------------------------

Status parse_metrics_listen(const Scope& s, ServerConfig& server) {
  TUTEL_RETURN_IF_ERROR(get_string(s, "metrics_listen", server.metrics_listen));
  const std::string& text = server.metrics_listen;
  if (text.empty()) {
    server.metrics_host.clear();
    server.metrics_port = 0;
    return Status::OK();
  }
  const auto refuse = [&](std::string_view why) {
    return s.error_near("metrics_listen",
                        "expected a loopback address and port such as \"127.0.0.1:9464\" or "
                        "\"[::1]:9464\" (or \"\" to disable), got " +
                            quote(text) + ": " + std::string(why));
  };
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos)
    return refuse(!text.empty() && text.size() <= 5 &&
                          std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; }) &&
                          std::stoi(text) <= 65535
                      ? "a port alone; put the address before it, \"127.0.0.1:" + text + "\""
                      : "no port");
  std::string host = text.substr(0, colon);
  const std::string port_text = text.substr(colon + 1);
  unsigned port = 0;
  const auto [end, ec] =
      std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (port_text.empty() || ec != std::errc() || end != port_text.data() + port_text.size() ||
      port > 65535)
    return refuse("the port must be a number from 0 to 65535");
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
    in6_addr a6{};
    if (inet_pton(AF_INET6, host.c_str(), &a6) != 1) return refuse("not an IPv6 address");
    if (!IN6_IS_ADDR_LOOPBACK(&a6))
      return refuse("the metrics endpoint has no authentication, so it listens only on loopback");
  } else {
    in_addr a4{};
    if (inet_pton(AF_INET, host.c_str(), &a4) != 1)
      return refuse("give a numeric address (host names are not resolved; IPv6 goes in brackets)");
    if ((ntohl(a4.s_addr) >> 24) != 127)
      return refuse("the metrics endpoint has no authentication, so it listens only on loopback");
  }
  server.metrics_host = host;
  server.metrics_port = static_cast<uint16_t>(port);
  return Status::OK();
}

// coordinator_networks = ["127.0.0.0/8", "127.0.0.1/32"], coordinator_ports = [1024, 65535].
Status parse_coordinator_bounds(const Scope& s, ServerConfig& server) {
  if (const toml::node* n = s.find("coordinator_networks"); n != nullptr) {
    const toml::array* a = n->as_array();
    if (a == nullptr)
      return s.error(*n, "coordinator_networks",
                     "expected an array of IPv4 networks such as [\"127.0.0.0/8\"], got " + toml_reader::describe(*n));
    for (size_t i = 0; i < a->size(); ++i) {
      const toml::node& e = *a->get(i);
      const auto* text = e.as_string();
      ServerConfig::Ipv4Network net;
      bool ok = text != nullptr;
      if (ok) {
        const std::string& t = text->get();
        const size_t slash = t.find('/');
        in_addr addr{};
        char* end = nullptr;
        const long prefix = slash == std::string::npos ? -1 : std::strtol(t.c_str() + slash + 1, &end, 10);
        ok = slash != std::string::npos && end != t.c_str() + slash + 1 && *end == '\0' && prefix >= 0 &&
             prefix <= 32 && ::inet_pton(AF_INET, t.substr(0, slash).c_str(), &addr) == 1;
        if (ok) {
          net.prefix = static_cast<int>(prefix);
          net.address = ntohl(addr.s_addr) & ServerConfig::Ipv4Network::mask(net.prefix);
          net.text = t;
        }
      }
      if (!ok)
        return s.error_at(e.source(), s.key_path("coordinator_networks") + "[" + std::to_string(i) + "]",
                          "expected an IPv4 network \"<address>/<prefix 0-32>\", got " + toml_reader::describe(e));
      server.coordinator_networks.push_back(std::move(net));
    }
  }
  std::vector<int> ports;
  TUTEL_RETURN_IF_ERROR(get_int_array(s, "coordinator_ports", 1, 65535, ports));
  if (s.find("coordinator_ports") != nullptr) {
    if (ports.size() != 2 || ports[0] > ports[1])
      return s.error_near("coordinator_ports", "expected [lowest, highest], two ports in ascending order, such as "
                                               "[1024, 65535]");
    server.coordinator_ports = {ports[0], ports[1]};
  }
  return Status::OK();
}

std::optional<uint32_t> parse_socket_mode(std::string_view text) {
  if (text == "0600") return 0600;
  if (text == "0660") return 0660;
  if (text == "0666") return 0666;
  return std::nullopt;
}

// client_socket_group: a group's name, looked up here (an unknown one is this file's error, with
// its line), or a gid.
Status parse_client_socket_group(const Scope& s, ServerConfig& server) {
  const toml::node* n = s.find("client_socket_group");
  if (n == nullptr) return Status::OK();
  if (const auto* id = n->as_integer()) {
    if (id->get() < 0 || id->get() > 4294967294)
      return s.error(*n, "client_socket_group", "expected a group's name or a gid in [0, 4294967294], got " + describe(*n));
    server.client_socket_gid = static_cast<uint32_t>(id->get());
    server.client_socket_group = std::to_string(id->get());
    return Status::OK();
  }
  const auto* name = n->as_string();
  if (name == nullptr || name->get().empty() || name->get().find('\0') != std::string::npos)
    return s.error(*n, "client_socket_group", "expected a group's name or a gid, got " + describe(*n));
  group entry{}, *found = nullptr;
  std::vector<char> buffer(16384);
  int rc = 0;
  while ((rc = ::getgrnam_r(name->get().c_str(), &entry, buffer.data(), buffer.size(), &found)) == ERANGE &&
         buffer.size() < (size_t{1} << 24))
    buffer.resize(buffer.size() * 4);
  if (found == nullptr)
    return s.error(*n, "client_socket_group",
                   "no group named " + quote(name->get()) + " on this machine" +
                       (rc != 0 ? " (" + std::string(std::strerror(rc)) + ")" : "") +
                       "; `getent group` lists them, or give the gid");
  server.client_socket_gid = found->gr_gid;
  server.client_socket_group = name->get();
  return Status::OK();
}

Status parse_server(const Scope& root, const fs::path& base_dir, ServerConfig& server) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table* t, get_table(root, "server", true, "[server]"));
  const Scope s = root.child(*t, "server", "[server]");
  TUTEL_RETURN_IF_ERROR(
      s.check_keys({"client_socket", "client_socket_mode", "client_socket_group", "admin_socket", "state_dir", "metrics_listen", "log_level",
                    "spin_us", "arena_bytes", "peer_secret_file", "hello_timeout_ms",
                    "max_bootstrap_timeout_ms", "max_collective_timeout_ms", "shutdown_grace_ms", "checkpoint_interval_s",
                    "coordinator_networks", "coordinator_ports"}));
  for (auto [key, out] : {std::pair{"client_socket", &server.client_socket},
                          std::pair{"admin_socket", &server.admin_socket}}) {
    TUTEL_RETURN_IF_ERROR(get_path(s, key, base_dir, true, *out));
    if (out->size() > kMaxSocketPath)
      return s.error_near(key, "the socket path " + quote(*out) + " is " +
                                   std::to_string(out->size()) +
                                   " bytes long; a unix socket path holds at most " +
                                   std::to_string(kMaxSocketPath) + ": choose a shorter one");
  }
  TUTEL_RETURN_IF_ERROR(get_enum(s, "client_socket_mode", "\"0600\", \"0660\", \"0666\"", parse_socket_mode,
                                 server.client_socket_mode));
  TUTEL_RETURN_IF_ERROR(parse_client_socket_group(s, server));
  if (server.client_socket == server.admin_socket)
    return s.error_near("admin_socket", "the admin socket must differ from the client socket (" +
                                            quote(server.client_socket) + ")");
  TUTEL_RETURN_IF_ERROR(get_path(s, "state_dir", base_dir, false, server.state_dir));
  int64_t checkpoint_s = server.checkpoint_interval.count();
  TUTEL_RETURN_IF_ERROR(get_int(s, "checkpoint_interval_s", 0, 7 * 24 * 3600, checkpoint_s));
  if (checkpoint_s > 0 && server.state_dir.empty())
    return s.error_near("checkpoint_interval_s",
                        "writes the layers' checkpoints to state_dir, which is not set: set state_dir, or "
                        "checkpoint_interval_s = 0");
  server.checkpoint_interval = std::chrono::seconds(checkpoint_s);
  TUTEL_RETURN_IF_ERROR(get_path(s, "peer_secret_file", base_dir, false, server.peer_secret_file));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "hello_timeout_ms", server.hello_timeout));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "max_bootstrap_timeout_ms", server.max_bootstrap_timeout));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "max_collective_timeout_ms", server.max_collective_timeout));
  int64_t grace_ms = server.shutdown_grace.count();
  TUTEL_RETURN_IF_ERROR(get_int(s, "shutdown_grace_ms", 0, 600'000, grace_ms));
  server.shutdown_grace = std::chrono::milliseconds(grace_ms);
  TUTEL_RETURN_IF_ERROR(parse_coordinator_bounds(s, server));
  TUTEL_RETURN_IF_ERROR(parse_metrics_listen(s, server));
  TUTEL_RETURN_IF_ERROR(get_enum(s, "log_level", "\"debug\", \"info\", \"warn\", \"error\"",
                                 parse_log_level, server.log_level));
  int64_t spin_us = server.spin.count();
  TUTEL_RETURN_IF_ERROR(get_int(s, "spin_us", 0, 1000000, spin_us));
  server.spin = std::chrono::microseconds(spin_us);
  TUTEL_RETURN_IF_ERROR(
      get_bytes(s, "arena_bytes", uint64_t{64} << 10, uint64_t{64} << 30, server.arena_bytes));
  return Status::OK();
}

Status parse_backend(const Scope& root, BackendConfig& backend) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table* t, get_table(root, "backend", false, "[backend]"));
  if (t == nullptr) return Status::OK();
  const Scope s = root.child(*t, "backend", "[backend]");
  TUTEL_RETURN_IF_ERROR(s.check_keys({"kind", "ranks", "threads_per_rank", "devices"}));
  TUTEL_RETURN_IF_ERROR(get_enum(
      s, "kind", "\"cpu\", \"cuda\"",
      [](std::string_view k) {
        return k == "cpu" || k == "cuda" ? std::optional<std::string>(k) : std::nullopt;
      },
      backend.kind));
  TUTEL_RETURN_IF_ERROR(get_int(s, "ranks", 1, 1024, backend.ranks));
  TUTEL_RETURN_IF_ERROR(get_int(s, "threads_per_rank", 0, 4096, backend.threads_per_rank));
  TUTEL_RETURN_IF_ERROR(get_int_array(s, "devices", 0, 1023, backend.devices));
  if (backend.kind == "cpu") {
    if (!backend.devices.empty())
      return s.error_near("devices",
                          "applies only to kind = \"cuda\"; the cpu backend's ranks are "
                          "virtual devices, counted by ranks");
  } else if (backend.devices.empty()) {
    for (int r = 0; r < backend.ranks; ++r) backend.devices.push_back(r);
  } else if (backend.devices.size() != static_cast<size_t>(backend.ranks)) {
    return s.error_near("devices", "lists " + std::to_string(backend.devices.size()) +
                                       " devices for ranks = " + std::to_string(backend.ranks) +
                                       "; give one device per rank (or none for 0..ranks-1)");
  }
  return Status::OK();
}

Status parse_cluster(const Scope& root, const BackendConfig& backend, std::optional<ClusterConfig>& out) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table* t, get_table(root, "cluster", false, "[cluster]"));
  if (t == nullptr) return Status::OK();
  const Scope s = root.child(*t, "cluster", "[cluster]");
  TUTEL_RETURN_IF_ERROR(s.check_keys({"coordinator", "node_rank", "nodes", "ranks_per_node", "bootstrap_timeout_ms",
                                      "heartbeat_interval_ms", "peer_timeout_ms", "rendezvous"}));
  ClusterConfig c;
  TUTEL_RETURN_IF_ERROR(get_coordinator(s, c.coordinator_host, c.coordinator_port));
  // By default node 0 serves the rendezvous on the coordinator's own address once the join is
  // over: one port per cluster, known to every node.
  c.rendezvous_host = c.coordinator_host;
  c.rendezvous_port = c.coordinator_port;
  TUTEL_RETURN_IF_ERROR(get_address(s, "rendezvous", c.rendezvous_host, c.rendezvous_port, false));
  TUTEL_RETURN_IF_ERROR(get_int(s, "nodes", 1, (1 << 20) - 1, c.nodes, true));
  TUTEL_RETURN_IF_ERROR(get_int(s, "node_rank", 0, (1 << 20) - 2, c.node_rank, true));
  if (c.node_rank >= c.nodes)
    return s.error_near("node_rank", "node_rank " + std::to_string(c.node_rank) + " is not below nodes " +
                                         std::to_string(c.nodes));
  c.ranks_per_node = backend.ranks;
  TUTEL_RETURN_IF_ERROR(get_int(s, "ranks_per_node", 1, 1024, c.ranks_per_node));
  if (c.ranks_per_node != backend.ranks)
    return s.error_near("ranks_per_node", "ranks_per_node = " + std::to_string(c.ranks_per_node) +
                                              " but [backend] ranks = " + std::to_string(backend.ranks) +
                                              ": every node serves the ranks its backend has; make them equal");
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "bootstrap_timeout_ms", c.bootstrap_timeout));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "heartbeat_interval_ms", c.heartbeat_interval));
  TUTEL_RETURN_IF_ERROR(get_milliseconds(s, "peer_timeout_ms", c.peer_timeout));
  if (c.peer_timeout <= c.heartbeat_interval)
    return s.error_near("peer_timeout_ms", "peer_timeout_ms (" + std::to_string(c.peer_timeout.count()) +
                                               ") must exceed heartbeat_interval_ms (" +
                                               std::to_string(c.heartbeat_interval.count()) + ")");
  out = c;
  return Status::OK();
}

Status parse_tenants(const Scope& root, const fs::path& base_dir, std::vector<TenantConfig>& tenants) {
  if (root.find("tenant") == nullptr)
    return root.error_near("tenant",
                           "missing [[tenant]]: at least one tenant must be configured, "
                           "or no client can connect");
  // The first tenant, and its line, of each uid and gid, to name both ends of a conflict.
  std::map<std::string, size_t> names;
  std::map<uint32_t, std::pair<size_t, uint32_t>> owner_of[2];
  TUTEL_RETURN_IF_ERROR(
      for_each_table(root, "tenant", "a [[tenant]] table", [&](const Scope& s, size_t i) {
        TUTEL_RETURN_IF_ERROR(s.check_keys(
            {"name", "uids", "gids", "max_layers", "max_memory_bytes", "max_inflight", "max_sessions",
             "max_checkpoint_bytes", "secret_file", "share"}));
        TenantConfig t;
        TUTEL_RETURN_IF_ERROR(get_name(s, "name", "a tenant name", t.name));
        if (t.name == kStateDirLockName)
          return s.error_near("name", "tenant name " + quote(t.name) +
                                          " is reserved: tuteld keeps its state_dir lock under that name, and a "
                                          "tenant's checkpoints in state_dir/<tenant>/; pick another name");
        if (auto [it, fresh] = names.emplace(t.name, i); !fresh)
          return s.error_near("name", "duplicate tenant name " + quote(t.name) + " (also tenant[" +
                                          std::to_string(it->second) + "])");
        TUTEL_RETURN_IF_ERROR(get_int_array(s, "uids", 0, kMaxUid, t.uids));
        TUTEL_RETURN_IF_ERROR(get_int_array(s, "gids", 0, kMaxUid, t.gids));
        if (t.uids.empty() && t.gids.empty())
          return s.error_near("uids",
                              "a tenant needs at least one uid or gid, or no client maps to it");
        for (int which = 0; which < 2; ++which) {
          const char* key = which == 0 ? "uids" : "gids";
          std::vector<uint32_t>& ids = which == 0 ? t.uids : t.gids;
          for (uint32_t id : ids) {
            const uint32_t line = s.find(key)->source().begin.line;
            auto [it, fresh] = owner_of[which].emplace(id, std::pair{i, line});
            if (!fresh && it->second.first != i)
              return s.error_near(key, std::string(which == 0 ? "uid " : "gid ") +
                                           std::to_string(id) + " is already in tenant[" +
                                           std::to_string(it->second.first) + "] (line " +
                                           std::to_string(it->second.second) +
                                           "); a client must map to exactly one tenant");
          }
          std::sort(ids.begin(), ids.end());
          ids.erase(std::unique(ids.begin(), ids.end()), ids.end());
        }
        TUTEL_RETURN_IF_ERROR(get_int(s, "max_layers", 1, 1000000, t.max_layers));
        TUTEL_RETURN_IF_ERROR(
            get_bytes(s, "max_memory_bytes", 1, uint64_t{1} << 50, t.max_memory_bytes));
        TUTEL_RETURN_IF_ERROR(get_int(s, "max_inflight", 1, 1 << 20, t.max_inflight));
        TUTEL_RETURN_IF_ERROR(get_int(s, "max_sessions", 1, 1 << 16, t.max_sessions));
        TUTEL_RETURN_IF_ERROR(get_int(s, "share", 1, 1000, t.share));
        TUTEL_RETURN_IF_ERROR(
            get_bytes(s, "max_checkpoint_bytes", 1, uint64_t{1} << 50, t.max_checkpoint_bytes));
        TUTEL_RETURN_IF_ERROR(get_path(s, "secret_file", base_dir, false, t.secret_file));
        tenants.push_back(std::move(t));
        return Status::OK();
      }));
  if (tenants.empty())
    return root.error_near("tenant",
                           "at least one [[tenant]] must be configured, or no client can connect");
  return Status::OK();
}

Status parse_layers(const Scope& root, const fs::path& base_dir, Config& config) {
  std::map<std::pair<std::string, std::string>, size_t> seen;  // (tenant, layer) → index
  std::vector<int64_t> per_tenant(config.tenants.size());
  return for_each_table(root, "layer", "a [[layer]] table", [&](const Scope& s, size_t i) {
    LayerDefinition def;
    TUTEL_RETURN_IF_ERROR(parse_layer(s, /*in_config=*/true, base_dir, def));
    const auto tenant = std::find_if(config.tenants.begin(), config.tenants.end(),
                                     [&](const TenantConfig& t) { return t.name == def.tenant; });
    if (tenant == config.tenants.end())
      return s.error_near("tenant", "no [[tenant]] is named " + quote(def.tenant));
    if (auto [it, fresh] = seen.emplace(std::pair{def.tenant, def.name}, i); !fresh)
      return s.error_near("name", "duplicate layer name " + quote(def.name) + " in tenant " +
                                      quote(def.tenant) + " (also layer[" +
                                      std::to_string(it->second) + "])");
    if (Status within = check_layer_limits(config.server, def); !within.ok())
      return s.error_near("group", std::string(within.message()));
    const size_t t = static_cast<size_t>(tenant - config.tenants.begin());
    if (++per_tenant[t] > tenant->max_layers)
      return s.error_near("tenant",
                          "tenant " + quote(def.tenant) +
                              " allows max_layers = " + std::to_string(tenant->max_layers) +
                              " and this is its layer number " + std::to_string(per_tenant[t]));
    config.layers.push_back(std::move(def));
    return Status::OK();
  });
}

// ---- Formatting ---------------------------------------------------------------------------

// The shortest text that reads back (as a double, then narrowed) to exactly `f`.
std::string format_float(float f) {
  if (!std::isfinite(f)) return format_double(f);
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, f);
  double back = 0;
  std::from_chars(buf, r.ptr, back);
  if (static_cast<float>(back) != f) return format_double(static_cast<double>(f));
  std::string s(buf, r.ptr);
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

std::string toml_string(std::string_view s) {
  std::string out = "\"";
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out += "\\\"";
        break;
      case '\\':
        out += "\\\\";
        break;
      case '\n':
        out += "\\n";
        break;
      case '\t':
        out += "\\t";
        break;
      case '\r':
        out += "\\r";
        break;
      default:
        if (c < 0x20 || c == 0x7f) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += ch;
        }
    }
  }
  return out + "\"";
}

}  // namespace

std::string_view optimizer_kind_name(OptimizerKind kind) {
  return kind == OptimizerKind::kSgd ? "sgd" : "adamw";
}

uint32_t ServerConfig::Ipv4Network::mask(int prefix) { return prefix == 0 ? 0 : ~uint32_t{0} << (32 - prefix); }

bool ServerConfig::Ipv4Network::contains(uint32_t host_order_address) const {
  return (host_order_address & mask(prefix)) == address;
}

Status check_layer_limits(const ServerConfig& server, const LayerDefinition& def) {
  if (!def.group) return Status::OK();
  if (const GroupConfig& g = *def.group; g.coordinator_port != 0) {
    const std::string where = g.coordinator_host + ":" + std::to_string(g.coordinator_port);
    const auto [lowest, highest] = server.coordinator_ports;
    if (g.coordinator_port < lowest || g.coordinator_port > highest)
      return Status::PermissionDenied("group.coordinator " + where + ": this tuteld's [server] coordinator_ports allow " +
                                      std::to_string(lowest) + " to " + std::to_string(highest) +
                                      "; choose a port in that range");
    in_addr addr{};  // a numeric IPv4 address: the spec's parser checked it
    (void)::inet_pton(AF_INET, g.coordinator_host.c_str(), &addr);
    bool allowed = server.coordinator_networks.empty();
    for (const ServerConfig::Ipv4Network& net : server.coordinator_networks)
      allowed = allowed || net.contains(ntohl(addr.s_addr));
    if (!allowed) {
      std::string list;
      for (const ServerConfig::Ipv4Network& net : server.coordinator_networks) list += (list.empty() ? "" : ", ") + net.text;
      return Status::PermissionDenied("group.coordinator " + where + " is outside this tuteld's [server] "
                                      "coordinator_networks (" + list + "); use an address in one of them");
    }
  }
  for (const auto& [key, asked, most] :
       {std::tuple{"bootstrap_timeout_ms", def.group->bootstrap_timeout, server.max_bootstrap_timeout},
        std::tuple{"collective_timeout_ms", def.group->collective_timeout, server.max_collective_timeout}})
    if (asked > most)
      return Status::InvalidArgument("group." + std::string(key) + " = " + std::to_string(asked.count()) +
                                     " is above this tuteld's [server] max_" + key + " (" +
                                     std::to_string(most.count()) + "): ask for at most that, or have the "
                                     "operator raise it");
  return Status::OK();
}

namespace {

// How deep a config or layer spec may nest (they use four levels) and how long a layer spec may be
// (they take a few hundred bytes): bounds on what a client's text can make the parser build.
constexpr size_t kMaxTomlNesting = 32;
constexpr size_t kMaxLayerSpecBytes = 64 * 1024;

// toml::parse behind the nesting bound (toml_nesting.hpp: deeper text overflowed its stack).
Result<toml::table> parse_toml(std::string_view text, std::string_view source_name) {
  const TomlNesting nesting = toml_nesting(text, kMaxTomlNesting);
  if (nesting.line != 0)
    return Status::InvalidArgument(std::string(source_name) + ":" + std::to_string(nesting.line) +
                                   ": nests more than " + std::to_string(kMaxTomlNesting) +
                                   " levels deep (tables, dotted-key parts, arrays and inline tables together); "
                                   "a tuteld config or layer spec needs at most four");
  toml::parse_result parsed = toml::parse(text, source_name);
  if (!parsed) {
    const toml::parse_error& e = parsed.error();
    return located_error(source_name, e.source(), "", "TOML syntax error: " + std::string(e.description()));
  }
  return std::move(parsed).table();
}

}  // namespace

Result<LayerDefinition> parse_layer_spec(std::string_view toml_text, std::string_view source_name) {
  if (toml_text.size() > kMaxLayerSpecBytes)
    return Status::InvalidArgument(std::string(source_name) + ": a layer spec of " + std::to_string(toml_text.size()) +
                                   " bytes; at most " + std::to_string(kMaxLayerSpecBytes) +
                                   " are accepted (a spec takes a few hundred)");
  TUTEL_ASSIGN_OR_RETURN(const toml::table table, parse_toml(toml_text, source_name));
  LayerDefinition def;
  const Scope root(source_name, table, "", "the layer spec");
  TUTEL_RETURN_IF_ERROR(parse_layer(root, /*in_config=*/false, fs::path(), def));
  return def;
}

std::string format_layer_spec(const LayerDefinition& def) {
  const LayerSpec& s = def.spec;
  const auto b = [](bool v) { return v ? "true" : "false"; };
  std::ostringstream out;
  out << "name = " << toml_string(def.name) << "\n"
      << "experts = " << s.experts << "\n"
      << "model_dim = " << s.model_dim << "\n"
      << "hidden = " << s.hidden << "\n"
      << "output_dim = " << s.output_dim << "\n"
      << "k = " << s.k << "\n"
      << "capacity_factor = " << format_double(s.capacity_factor) << "\n"
      << "activation = " << toml_string(activation_name(s.activation)) << "\n"
      << "gate_noise = " << format_double(s.gate_noise) << "\n"
      << "noise_seed = " << s.noise_seed << "\n"
      << "normalize_gate = " << b(s.normalize_gate) << "\n"
      << "batch_prioritized = " << b(s.batch_prioritized) << "\n"
      << "is_postscore = " << b(s.is_postscore) << "\n"
      << "has_fc1_bias = " << b(s.has_fc1_bias) << "\n"
      << "has_fc2_bias = " << b(s.has_fc2_bias) << "\n"
      << "dtype = " << toml_string(dtype_name(s.matmul_dtype)) << "\n";
  if (def.weights_path) out << "weights = " << toml_string(*def.weights_path) << "\n";
  if (def.init_seed) out << "init_seed = " << *def.init_seed << "\n";
  if (!def.token_buckets.empty()) {
    out << "token_buckets = [";
    for (size_t i = 0; i < def.token_buckets.size(); ++i) out << (i ? ", " : "") << def.token_buckets[i];
    out << "]\n";
  }
  const OptimizerConfig& o = def.optimizer;
  out << "\n[optimizer]\n"
      << "kind = " << toml_string(optimizer_kind_name(o.kind)) << "\n"
      << "lr = " << format_float(o.lr) << "\n"
      << "weight_decay = " << format_float(o.weight_decay) << "\n";
  if (o.kind == OptimizerKind::kSgd) {
    out << "momentum = " << format_float(o.momentum) << "\n"
        << "nesterov = " << b(o.nesterov) << "\n";
  } else {
    out << "beta1 = " << format_double(o.beta1) << "\n"
        << "beta2 = " << format_double(o.beta2) << "\n"
        << "eps = " << format_float(o.eps) << "\n";
  }
  if (def.group) {
    const GroupConfig& g = *def.group;
    out << "\n[group]\n";
    if (g.coordinator_port != 0)
      out << "coordinator = " << toml_string(g.coordinator_host + ":" + std::to_string(g.coordinator_port)) << "\n";
    if (!g.name.empty()) out << "name = " << toml_string(g.name) << "\n";
    out << "size = " << g.size << "\n"
        << "rank = " << g.rank << "\n"
        << "local_size = " << g.local_size << "\n"
        << "all_to_all = "
        << toml_string(g.all_to_all ? std::string(comm::to_string(*g.all_to_all)) : "auto") << "\n"
        << "r = " << (g.r ? std::to_string(*g.r) : toml_string("auto")) << "\n"
        << "pipeline = " << (g.pipeline ? std::to_string(*g.pipeline) : toml_string("auto"))
        << "\n";
    if (g.tuned())
      out << "tune_warmups = " << g.tune_warmups << "\n"
          << "tune_trials = " << g.tune_trials << "\n";
    out << "bootstrap_timeout_ms = " << g.bootstrap_timeout.count() << "\n"
        << "collective_timeout_ms = " << g.collective_timeout.count() << "\n";
  }
  return out.str();
}

Result<Config> parse_config(std::string_view toml_text, std::string_view source_name) {
  TUTEL_ASSIGN_OR_RETURN(const toml::table table, parse_toml(toml_text, source_name));
  Config config;
  std::error_code ec;
  const fs::path file = fs::absolute(fs::path(source_name.empty() ? "." : source_name), ec);
  config.path = ec ? std::string(source_name) : file.lexically_normal().string();
  const fs::path base_dir = ec ? fs::path() : file.lexically_normal().parent_path();

  const Scope root(source_name, table, "", "the top level");
  TUTEL_RETURN_IF_ERROR(root.check_keys({"server", "backend", "cluster", "tenant", "layer"}));
  TUTEL_RETURN_IF_ERROR(parse_server(root, base_dir, config.server));
  TUTEL_RETURN_IF_ERROR(parse_backend(root, config.backend));
  TUTEL_RETURN_IF_ERROR(parse_cluster(root, config.backend, config.cluster));
  TUTEL_RETURN_IF_ERROR(parse_tenants(root, base_dir, config.tenants));
  TUTEL_RETURN_IF_ERROR(parse_layers(root, base_dir, config));
  return config;
}

Result<Config> load_config(const std::string& path) {
  const auto fail = [&](std::string_view what) {
    return Status::IOError("cannot " + std::string(what) + " config file '" + path +
                           "': " + std::strerror(errno));
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail("open");
  struct FdCloser {
    int fd;
    ~FdCloser() { ::close(fd); }
  } closer{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) return fail("stat");
  if (!S_ISREG(st.st_mode))
    return Status::IOError("config file '" + path + "' is not a regular file");
  constexpr off_t kMaxConfigBytes = 16 << 20;
  if (st.st_size > kMaxConfigBytes)
    return Status::InvalidArgument("config file '" + path + "' is larger than 16 MiB");
  std::string text;
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail("read");
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (text.size() > static_cast<size_t>(kMaxConfigBytes))
      return Status::InvalidArgument("config file '" + path + "' is larger than 16 MiB");
  }
  return parse_config(text, path);
}

std::optional<size_t> find_tenant(const Config& config, uint32_t uid, uint32_t gid) {
  for (size_t i = 0; i < config.tenants.size(); ++i) {
    const auto& uids = config.tenants[i].uids;
    if (std::find(uids.begin(), uids.end(), uid) != uids.end()) return i;
  }
  for (size_t i = 0; i < config.tenants.size(); ++i) {
    const auto& gids = config.tenants[i].gids;
    if (std::find(gids.begin(), gids.end(), gid) != gids.end()) return i;
  }
  return std::nullopt;
}

}  // namespace tutel::daemon
