// tutelctl: inspect and operate a running tuteld through its admin socket.
//
//   tutelctl [--socket PATH] [--json] [--timeout S]
//            status | sessions | tenants | layers | plans | peers | metrics
//   tutelctl checkpoint TENANT/LAYER PATH
//   tutelctl pin | unpin TENANT/LAYER
//   tutelctl destroy TENANT/LAYER
//   tutelctl drain [--wait S] | undrain
//
// Exit status: 0 on success, 1 when the daemon cannot be reached or refuses the request (or
// drain --wait ran out with sessions still open), 2 on a usage error (docs/tutelctl.md).
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "tutel/admin_client.hpp"
#include "tutel/core/logging.hpp"

namespace {

using nlohmann::json;

constexpr int kExitFailure = 1;
constexpr int kExitUsage = 2;

std::string default_socket() {
  const char* env = std::getenv("TUTELD_ADMIN_SOCKET");
  return env != nullptr && *env != '\0' ? env : "./run/admin.sock";
}

std::string bytes_text(double bytes) {
  static const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024 && u < 5) {
    bytes /= 1024;
    ++u;
  }
  char buf[32];
  if (u == 0)
    std::snprintf(buf, sizeof buf, "%.0f B", bytes);
  else
    std::snprintf(buf, sizeof buf, "%.1f %s", bytes, units[u]);
  return buf;
}

std::string duration_text(double seconds) {
  // A reply's number is not trusted to fit: NaN, negative or past 3000 years reads as "?".
  if (!(seconds >= 0) || seconds > 1e11) return "?";
  auto s = static_cast<int64_t>(seconds);
  char buf[64];
  if (s >= 86400)
    std::snprintf(buf, sizeof buf, "%lldd %02lldh %02lldm", (long long)(s / 86400),
                  (long long)(s / 3600 % 24), (long long)(s / 60 % 60));
  else if (s >= 3600)
    std::snprintf(buf, sizeof buf, "%lldh %02lldm %02llds", (long long)(s / 3600),
                  (long long)(s / 60 % 60), (long long)(s % 60));
  else if (s >= 60)
    std::snprintf(buf, sizeof buf, "%lldm %02llds", (long long)(s / 60), (long long)(s % 60));
  else
    std::snprintf(buf, sizeof buf, "%.1fs", seconds);
  return buf;
}

// A JSON value as table text: "-" for a missing or null one. Strings with control characters
// escaped (tutel::escape_text): what tuteld relays (a client's name, an error) reaches the
// operator's terminal, which must not obey it. Only those: tuteld escapes a client's name itself,
// and escaping its text again doubled every backslash of it.
std::string text(const json& v) {
  if (v.is_null()) return "-";
  if (v.is_string()) {
    const std::string& s = v.get_ref<const std::string&>();
    return tutel::has_control_characters(s) ? tutel::escape_text(s) : s;
  }
  if (v.is_boolean()) return v.get<bool>() ? "yes" : "no";
  // Unsigned first: is_number_integer() holds for unsigned values too, and one past INT64_MAX
  // read as int64_t showed as negative.
  if (v.is_number_unsigned()) return std::to_string(v.get<uint64_t>());
  if (v.is_number_integer()) return std::to_string(v.get<int64_t>());
  if (v.is_number_float()) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.4g", v.get<double>());
    return buf;
  }
  if (v.is_array()) {
    std::string out;
    for (const auto& e : v) out += (out.empty() ? "" : ",") + text(e);
    return out.empty() ? "-" : out;
  }
  return v.dump();
}

std::string field(const json& object, const char* key) {
  auto it = object.find(key);
  return it == object.end() ? "-" : text(*it);
}

std::string bytes_field(const json& object, const char* key) {
  auto it = object.find(key);
  return it != object.end() && it->is_number() ? bytes_text(it->get<double>()) : "-";
}

std::string of(const std::string& used, const std::string& limit) { return used + " / " + limit; }

// Columns aligned; text columns left, the others right.
struct Table {
  std::vector<std::string> header;
  std::vector<bool> left;
  std::vector<std::vector<std::string>> rows;

  void print(std::ostream& os) const {
    std::vector<size_t> width(header.size());
    for (size_t c = 0; c < header.size(); ++c) width[c] = header[c].size();
    for (const auto& row : rows)
      for (size_t c = 0; c < row.size() && c < width.size(); ++c)
        width[c] = std::max(width[c], row[c].size());
    auto line = [&](const std::vector<std::string>& cells) {
      std::string out;
      for (size_t c = 0; c < cells.size(); ++c) {
        const std::string pad(width[c] - cells[c].size(), ' ');
        const bool last = c + 1 == cells.size();
        if (left[c])
          out += cells[c] + (last ? "" : pad);
        else
          out += pad + cells[c];
        if (!last) out += "  ";
      }
      os << out << "\n";
    };
    line(header);
    for (const auto& row : rows) line(row);
  }
};

void print_status(const json& s) {
  std::vector<std::pair<std::string, std::string>> lines;
  std::set<std::string> shown;
  auto add = [&](const std::string& label, const std::string& value,
                 std::initializer_list<const char*> keys) {
    lines.emplace_back(label, value);
    for (const char* k : keys) shown.insert(k);
  };
  add("version", field(s, "version"), {"version"});
  add("pid", field(s, "pid"), {"pid"});
  if (s.contains("uptime_seconds") && s["uptime_seconds"].is_number())
    add("uptime", duration_text(s["uptime_seconds"].get<double>()), {"uptime_seconds"});
  add("backend", field(s, "backend") + " x " + field(s, "ranks") + " rank(s)",
      {"backend", "ranks"});
  if (s.contains("out_of_service") && s["out_of_service"].is_array()) {
    std::string lost;
    for (const json& r : s["out_of_service"]) {
      if (!r.is_object()) continue;
      lost += (lost.empty() ? "" : "; ") + std::string("rank ") + field(r, "rank") + " (" + field(r, "device") +
              ", " + (r.contains("seconds_ago") && r["seconds_ago"].is_number()
                          ? duration_text(r["seconds_ago"].get<double>()) + " ago"
                          : std::string("-")) +
              "): " + field(r, "error");
    }
    add("out of service", lost.empty() ? "none" : lost + " (restart tuteld)", {"out_of_service"});
  }
  add("client sessions", field(s, "sessions"), {"sessions"});
  if (s.contains("draining") && s["draining"].is_boolean())
    add("draining",
        s["draining"].get<bool>() ? "yes: no new sessions or layers (tutelctl undrain)" : "no",
        {"draining"});
  add("layers", field(s, "layers"), {"layers"});
  add("tenants", field(s, "tenants"), {"tenants"});
  add("client socket", field(s, "client_socket"), {"client_socket"});
  const std::string state_dir = field(s, "state_dir");
  add("state dir", state_dir.empty() ? "(none: no checkpoint on exit)" : state_dir, {"state_dir"});
  std::string metrics = "disabled";
  if (s.contains("metrics_listen") && s["metrics_listen"].is_string() &&
      !s["metrics_listen"].get<std::string>().empty()) {
    std::string listen = s["metrics_listen"].get<std::string>();
    const std::string port = field(s, "metrics_port");
    if (port != "-" && port != "0") listen = listen.substr(0, listen.rfind(':') + 1) + port;
    metrics = "http://" + listen + "/metrics";
  }
  add("metrics", metrics, {"metrics_listen", "metrics_port"});
  if (s.contains("control_frames_queued_peak"))
    add("control frames",
        "at most " + field(s, "control_frames_queued_peak") +
            " waited in a session; reads paused " + field(s, "control_reads_paused") +
            " time(s) for a full queue",
        {"control_frames_queued_peak", "control_reads_paused"});
  for (const auto& [key, value] : s.items())  // fields a newer daemon adds
    if (!shown.count(key)) lines.emplace_back(text(json(key)), text(value));  // a key is text from the daemon too
  size_t width = 0;
  for (const auto& [label, value] : lines) width = std::max(width, label.size());
  for (const auto& [label, value] : lines)
    std::cout << label << std::string(width - label.size() + 2, ' ') << value << "\n";
}

void print_tenants(const json& reply) {
  const json tenants = reply.value("tenants", json::array());
  if (tenants.empty()) {
    std::cout << "(no tenants)\n";
    return;
  }
  // MEMORY: parameters against the quota; FORWARDS: what forwards hold (pending backwards in
  // parentheses); REGIONS: device regions clients map. All three count against the same quota.
  // SESSIONS: connected, and in parentheses those closing, which keep their place until their
  // request in progress has finished.
  Table t{{"TENANT", "UIDS", "GIDS", "LAYERS", "MEMORY", "FORWARDS", "REGIONS", "INFLIGHT", "SESSIONS"},
          {true, true, true, false, false, false, false, false, false},
          {}};
  for (const json& e : tenants) {
    std::string sessions = of(field(e, "sessions"), field(e, "max_sessions"));
    if (auto c = e.find("closing_sessions"); c != e.end() && c->is_number_integer() && c->get<int64_t>() > 0)
      sessions += " (" + text(*c) + " closing)";
    t.rows.push_back({field(e, "name"), field(e, "uids"), field(e, "gids"),
                      of(field(e, "layers"), field(e, "max_layers")),
                      of(bytes_field(e, "memory_bytes"), bytes_field(e, "max_memory_bytes")),
                      bytes_field(e, "activation_bytes") + " (" + bytes_field(e, "pending_bytes") + ")",
                      bytes_field(e, "region_bytes"), of(field(e, "inflight"), field(e, "max_inflight")), sessions});
  }
  t.print(std::cout);
}

// The tuner's dictionary of each group layer with all_to_all or pipeline "auto": per capacity
// bucket, the choice and every candidate's agreed time (the group's slowest rank, summed over
// the counted runs), or how many rounds it has measured so far.
void print_tuners(const json& groups) {
  for (const json& g : groups) {
    const json candidates = g.value("tuner_candidates", json::array());
    if (!candidates.is_array() || candidates.empty()) continue;
    // "r=0" (data parallel: nothing else to choose), or "r=1 a=linear d=2" (expert parallel; r
    // above 1 where sharded experts split their H).
    auto name_of = [](const json& c) {
      const std::string r = "r=" + field(c, "r");
      return r == "r=0" ? r
                        : r + " a=" + field(c, "all_to_all") + " d=" + field(c, "pipeline");
    };
    std::vector<std::string> names;
    for (const json& c : candidates) names.push_back(name_of(c));
    std::cout << "\n"
              << field(g, "tenant") << "/" << field(g, "layer") << " rank " << field(g, "rank")
              << ": tuner (capacity bucket -> parallelism, all-to-all and pipeline)\n";
    const json buckets = g.value("tuner", json::array());
    if (!buckets.is_array() || buckets.empty()) {
      std::cout << "(no forward yet)\n";
      continue;
    }
    Table t{{"BUCKET", "STATE", "CHOSEN"}, {false, true, true}, {}};
    for (const std::string& n : names) {
      t.header.push_back(n + " (ms)");
      t.left.push_back(false);
    }
    for (const json& b : buckets) {
      const bool decided = field(b, "state") == "decided";
      const bool restored = b.value("restored", false);  // from the layer's checkpoint
      std::vector<std::string> row{
          field(b, "capacity_bucket"),
          decided ? (restored ? "restored" : "decided") : "measuring (round " + field(b, "rounds_done") + ")",
          decided ? name_of(b) : "-"};
      const json totals = b.value("total_ns", json::array());
      const json excluded = b.value("excluded", json::array());
      for (size_t i = 0; i < names.size(); ++i) {
        const bool known = totals.is_array() && i < totals.size() && totals[i].is_number();
        const bool refused = excluded.is_array() && i < excluded.size() &&
                             excluded[i].is_boolean() && excluded[i].get<bool>();
        char ms[32] = "-";
        if (refused)
          std::snprintf(ms, sizeof ms, "refused");  // the group could not allocate it here
        else if (known)
          std::snprintf(ms, sizeof ms, "%.3f", totals[i].get<double>() / 1e6);
        row.push_back(ms);
      }
      t.rows.push_back(std::move(row));
    }
    t.print(std::cout);
  }
}

// The cluster's nodes, then every group of this daemon's layers with one row per other rank.
void print_peers(const json& reply) {
  const json cluster = reply.value("cluster", json());
  if (cluster.is_object()) {
    Table nodes{{"NODE", "ADDRESS", "RANKS", "STATE", "SILENT", "LAST ERROR"},
                {false, true, false, true, false, true},
                {}};
    for (const json& n : cluster.value("nodes", json::array())) {
      const int64_t first = n.value("first_rank", int64_t{0}), count = n.value("ranks", int64_t{1});
      const bool sane = first >= 0 && count >= 1 && first <= INT64_MAX - count;
      const std::string ranks = !sane        ? "?"
                                : count == 1 ? std::to_string(first)
                                             : std::to_string(first) + "-" +
                                                   std::to_string(first + count - 1);
      const bool self = n.value("self", false);
      nodes.rows.push_back({field(n, "node"), field(n, "address"), ranks, field(n, "state"),
                            self ? "-" : field(n, "silent_ms") + " ms", field(n, "last_error")});
    }
    nodes.print(std::cout);
  } else {
    std::cout << "(not part of a cluster)\n";
  }
  const json groups = reply.value("groups", json::array());
  if (groups.empty()) {
    std::cout << "(no expert-parallel groups)\n";
    return;
  }
  std::cout << "\n";
  Table t{{"LAYER", "RANK", "R", "A2A", "D", "PEER", "ADDRESS", "VIA", "STATE", "SENT", "RECEIVED",
           "LAST ERROR"},
          {true, false, false, true, false, false, true, true, true, false, false, true},
          {}};
  for (const json& g : groups) {
    const std::string layer = field(g, "tenant") + "/" + field(g, "layer");
    const std::string rank = field(g, "rank") + "/" + field(g, "size");
    const json peers = g.value("peers", json::array());
    if (peers.empty())
      t.rows.push_back({layer, rank, field(g, "r"), field(g, "all_to_all"), field(g, "pipeline"),
                        "-", "-", "-", field(g, "state"), "-", "-", field(g, "last_error")});
    for (const json& p : peers)
      t.rows.push_back({layer, rank, field(g, "r"), field(g, "all_to_all"), field(g, "pipeline"),
                        field(p, "rank"), field(p, "address"), field(p, "via"), field(p, "state"),
                        bytes_field(p, "bytes_sent"), bytes_field(p, "bytes_received"),
                        field(p, "last_error")});
  }
  t.print(std::cout);
  print_tuners(groups);
  // A group's last failed collective names its culprit (which may be a peer of a peer).
  for (const json& g : groups)
    if (field(g, "state") == "down")
      std::cout << field(g, "tenant") << "/" << field(g, "layer") << " is down: " << field(g, "last_error") << "\n";
}

void print_layers(const json& reply) {
  const json layers = reply.value("layers", json::array());
  if (layers.empty()) {
    std::cout << "(no layers)\n";
    return;
  }
  Table t{{"LAYER", "HANDLE", "RANK", "E", "M", "H", "K", "CF", "STEP", "MEMORY", "PENDING",
           "CAPACITY", "DROPPED", "L_AUX"},
          {true, false, false, false, false, false, false, false, false, false, false, false, false,
           false},
          {}};
  for (const json& e : layers) {
    t.rows.push_back({field(e, "tenant") + "/" + field(e, "name"), field(e, "handle"),
                      field(e, "rank"), field(e, "experts"), field(e, "model_dim"),
                      field(e, "hidden"), field(e, "k"), field(e, "capacity_factor"),
                      field(e, "step"), bytes_field(e, "memory_bytes"),
                      field(e, "pending_backwards"), field(e, "capacity"), field(e, "dropped"),
                      field(e, "l_aux")});
  }
  t.print(std::cout);
}

void print_sessions(const json& reply) {
  const json sessions = reply.value("sessions", json::array());
  if (sessions.empty()) {
    std::cout << "(no client sessions)\n";
    return;
  }
  Table t{{"SESSION", "TENANT", "PID", "UID", "CLIENT", "CONNECTED", "WAITING"},
          {false, true, false, false, true, false, false},
          {}};
  for (const json& e : sessions) {
    const json& c = e.value("connected_seconds", json());
    t.rows.push_back({field(e, "id"), field(e, "tenant"), field(e, "pid"), field(e, "uid"),
                      field(e, "client"), c.is_number() ? duration_text(c.get<double>()) : "?",
                      field(e, "control_frames_waiting")});
  }
  t.print(std::cout);
}

// Each layer's plan cache, from the same reply as print_layers. A group layer runs without one.
void print_plans(const json& reply) {
  const json layers = reply.value("layers", json::array());
  if (layers.empty()) {
    std::cout << "(no layers)\n";
    return;
  }
  Table t{{"LAYER", "KIND", "PINNED", "PLANS", "HELD", "BYTES", "HITS", "MISSES", "BUILDS",
           "EVICTIONS"},
          {true, true, true, false, false, false, false, false, false, false},
          {}};
  for (const json& e : layers) {
    const std::string layer = field(e, "tenant") + "/" + field(e, "name");
    const json plans = e.value("plans", json());
    if (!plans.is_object()) {
      // null: a group layer; absent: a daemon that predates plan caches.
      t.rows.push_back(
          {layer, e.contains("plans") ? "(group)" : "-", "-", "-", "-", "-", "-", "-", "-", "-"});
      continue;
    }
    const json& p = e.value("pinned", json());
    const std::string pinned = p.is_boolean() ? (p.get<bool>() ? "yes" : "no") : "-";
    t.rows.push_back({layer, field(plans, "kind"), pinned, field(plans, "plans"),
                      field(plans, "held"), bytes_field(plans, "bytes"), field(plans, "hits"),
                      field(plans, "misses"), field(plans, "builds"), field(plans, "evictions")});
  }
  t.print(std::cout);
}

// The end of `drain --wait`: the last status as a drain reply ({"draining", "sessions"}).
struct Drained {
  std::string reply;
  int64_t open = 0;  // client sessions still open: non-zero when the wait ran out
};

// A status reply tutelctl cannot read, said as main says it of other replies: wait_drained runs
// outside main's json::exception guard, so its checks are explicit and nothing in it throws.
tutel::Status unreadable_status(const std::string& what) {
  return tutel::Status::Corruption("tutelctl cannot read tuteld's status reply (" + what +
                                   "); is tutelctl the daemon's version? `tutelctl --json status` "
                                   "prints the reply as it is");
}

// A reply's value in a message; never throws.
std::string shown(const json& v) { return v.dump(-1, ' ', false, json::error_handler_t::replace); }

// After drain: polls the status until no client session is open or `wait_s` has passed.
tutel::Result<Drained> wait_drained(tutel::client::AdminClient& admin, double wait_s) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(wait_s * 1000));
  for (;;) {
    TUTEL_ASSIGN_OR_RETURN(std::string text, admin.status());
    const json s = json::parse(text, nullptr, false);
    if (!s.is_object()) return unreadable_status("it is not a JSON object");
    const auto sessions = s.find("sessions");
    if (sessions == s.end() || !sessions->is_number_integer()) {
      const std::string got = sessions == s.end() ? "missing" : shown(*sessions);
      return unreadable_status("\"sessions\" is " + got + ", not a session count");
    }
    const auto draining = s.find("draining");
    if (draining != s.end() && !draining->is_boolean())
      return unreadable_status("\"draining\" is " + shown(*draining) + ", not true or false");
    const int64_t open = sessions->get<int64_t>();
    if (open == 0 || std::chrono::steady_clock::now() >= deadline) {
      const bool is_draining = draining == s.end() || draining->get<bool>();
      return Drained{json{{"draining", is_draining}, {"sessions", open}}.dump(), open};
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
}

int cannot_reach(const std::string& path, const tutel::Status& st) {
  std::cerr << "tutelctl: cannot reach tuteld at " << path << ": ";
  if (st.code() == tutel::StatusCode::kPermissionDenied)
    std::cerr
        << "permission denied (the admin socket is mode 0600: run tutelctl as the daemon's user)\n";
  else if (st.code() == tutel::StatusCode::kInvalidArgument || st.code() == tutel::StatusCode::kTimeout)
    std::cerr << st.message() << "\n";  // a bad path; a daemon that accepts no connection
  else {
    // connect_unix says "is tuteld running? (<detail>)": keep only the detail.
    std::string detail(st.message());
    const std::string prefix = "is tuteld running? (";
    if (detail.rfind(prefix, 0) == 0 && detail.back() == ')')
      detail = detail.substr(prefix.size(), detail.size() - prefix.size() - 1);
    std::cerr << "is it running? (" << detail << "; set --socket or $TUTELD_ADMIN_SOCKET)\n";
  }
  return kExitFailure;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"tutelctl: inspect and operate a running tuteld through its admin socket"};
  app.name("tutelctl");
  app.set_version_flag("--version", "tutelctl " TUTEL_VERSION);
  std::string socket = default_socket();
  // CLI::Range lets NaN through (every comparison with it is false), and a NaN timeout became a
  // wait without bound.
  const CLI::Validator finite_number(
      [](std::string& text) {
        const double v = std::strtod(text.c_str(), nullptr);
        return std::isfinite(v) ? std::string() : "expected a finite number, got " + text;
      },
      "FINITE");
  bool as_json = false;
  double timeout_s = 60;
  app.add_option("--socket", socket,
                 "tuteld's admin socket ($TUTELD_ADMIN_SOCKET, else ./run/admin.sock)");
  app.add_flag("--json", as_json, "print the daemon's JSON reply instead of a table");
  app.add_option("--timeout", timeout_s,
                 "seconds to wait for a reply (checkpoint waits without bound once the daemon answered)")
      ->check(finite_number)
      ->check(CLI::Range(0.001, 1e6));  // bounded: 1e300 s would overflow its milliseconds
  app.require_subcommand(1, 1);
  auto* status =
      app.add_subcommand("status", "the daemon: version, uptime, backend, sessions, layers");
  auto* sessions = app.add_subcommand(
      "sessions", "the client sessions: tenant, process, client name, how long connected");
  auto* tenants = app.add_subcommand("tenants", "tenants with their usage against their quotas");
  auto* layers =
      app.add_subcommand("layers", "every served layer with its last routing statistics");
  auto* plans = app.add_subcommand("plans",
                                   "each layer's plan cache: kind, plans and how many are in use, "
                                   "bytes, hits, misses, builds, evictions");
  auto* metrics = app.add_subcommand("metrics", "the Prometheus metrics text");
  auto* peers = app.add_subcommand("peers", "the cluster's nodes and the expert-parallel groups of this daemon's layers: state, traffic, last error");
  auto* checkpoint =
      app.add_subcommand("checkpoint", "save a layer's parameters and optimizer state to a file");
  std::string layer, path;
  const auto layer_name = [](const std::string& v) {
    const size_t slash = v.find('/');
    return slash == std::string::npos || slash == 0 || slash + 1 == v.size()
               ? std::string("LAYER must be TENANT/NAME, e.g. alice/moe0")
               : std::string();
  };
  checkpoint->add_option("LAYER", layer, "the layer as TENANT/NAME")->required()->check(layer_name);
  checkpoint->add_option("PATH", path, "the safetensors file to write (relative to this directory)")
      ->required()
      ->check([](const std::string& v) { return v.empty() ? std::string("PATH must not be empty") : std::string(); });
  auto* pin = app.add_subcommand(
      "pin", "keep a layer's cached plans when its tenant's other requests need the memory");
  auto* unpin = app.add_subcommand("unpin", "let a pinned layer's idle plans go again");
  auto* destroy = app.add_subcommand(
      "destroy",
      "destroy a layer as its client would: its memory, plans and checkpoint in state_dir go (checkpoint it first "
      "to keep its state)");
  for (CLI::App* c : {pin, unpin, destroy})
    c->add_option("LAYER", layer, "the layer as TENANT/NAME")->required()->check(layer_name);
  auto* drain = app.add_subcommand(
      "drain", "take no new client sessions and create no layers; the open sessions go on");
  double wait_s = 0;
  CLI::Option* wait_opt = drain->add_option("--wait", wait_s,
                   "then wait up to this many seconds for the open client sessions to close; "
                   "exit 1 if some are still open")
      ->check(finite_number)
      ->check(CLI::Range(0.0, 1e6));
  auto* undrain = app.add_subcommand("undrain", "take new sessions and layers again");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // CLI11 answers a word it does not know ("tutelctl stats", "tutelctl help") with "A
    // subcommand is required": name the word and the commands instead.
    std::vector<std::string> commands;
    for (const CLI::App* c : app.get_subcommands([](const CLI::App*) { return true; }))
      commands.push_back(c->get_name());
    for (int i = 1; i < argc; ++i) {
      const std::string word = argv[i];
      if (word == "--socket" || word == "--timeout") {
        ++i;  // their value
        continue;
      }
      if (word.empty() || word[0] == '-') continue;
      if (std::find(commands.begin(), commands.end(), word) != commands.end()) break;
      std::string list;
      for (const std::string& c : commands) list += (list.empty() ? "" : ", ") + c;
      std::cerr << "tutelctl: unknown command '" << word << "'; the commands are " << list
                << "\nRun 'tutelctl --help' for the usage.\n";
      return kExitUsage;
    }
    const int rc = app.exit(e);
    return rc == 0 ? 0 : kExitUsage;
  }

  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(std::ceil(timeout_s * 1000)));
  auto admin = tutel::client::AdminClient::connect(socket, timeout);
  if (!admin.ok()) return cannot_reach(socket, admin.status());

  tutel::Result<std::string> reply = tutel::Status::Internal("no command");
  if (*status)
    reply = admin->status();
  else if (*sessions)
    reply = admin->sessions();
  else if (*tenants)
    reply = admin->tenants();
  else if (*layers || *plans)
    reply = admin->layers();
  else if (*metrics)
    reply = admin->metrics();
  else if (*peers)
    reply = admin->peers();
  else if (*checkpoint) {
    // The daemon opens the path in its own working directory: send it absolute.
    std::error_code ec;
    const auto absolute = std::filesystem::absolute(path, ec);
    // The checkpoint's own wait is unbounded (a large layer takes long): first one round trip
    // within --timeout, so that a socket whose peer never answers (a stopped daemon, not a
    // tuteld) fails rather than hangs.
    reply = admin->status();
    if (reply.ok()) reply = admin->checkpoint(layer, ec ? path : absolute.string());
  } else if (*pin || *unpin) {
    reply = admin->pin(layer, static_cast<bool>(*pin));
  } else if (*destroy) {
    // As the checkpoint: the destroy waits for the layer's requests before it, without bound.
    reply = admin->status();
    if (reply.ok()) reply = admin->destroy(layer);
  } else if (*drain)
    reply = admin->drain(true);
  else if (*undrain)
    reply = admin->drain(false);
  bool wait_ran_out = false;  // drain --wait with sessions still open: exit 1, table or --json
  // Given at all, even as 0 (one look): `drain --wait 0 && systemctl stop tuteld` must not stop
  // a daemon with sessions open.
  if (reply.ok() && *drain && wait_opt->count() > 0) {
    auto drained = wait_drained(*admin, wait_s);
    if (drained.ok()) {
      wait_ran_out = drained->open != 0;
      reply = std::move(drained->reply);
    } else {
      reply = drained.status();
    }
  }
  if (!reply.ok()) {
    // tuteld's own answers (a rank out of service says Unavailable too) are printed as they are.
    if (admin->connection_failed() && reply.status().code() == tutel::StatusCode::kUnavailable)
      return cannot_reach(socket, reply.status());
    std::cerr << "tutelctl: " << tutel::escape_text(reply.status().to_string()) << "\n";
    return kExitFailure;
  }
  const json body = json::parse(*reply, nullptr, false);
  if (body.is_discarded() || !body.is_object()) {
    std::cerr << "tutelctl: tuteld sent a reply that is not a JSON object\n";
    return kExitFailure;
  }
  if (as_json) {
    std::cout << body.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    return wait_ran_out ? kExitFailure : 0;
  }
  // A field of an unexpected type (a daemon of another version, a damaged reply) is an error
  // that says so, not a crash.
  try {
    if (*status)
      print_status(body);
    else if (*sessions)
      print_sessions(body);
    else if (*tenants)
      print_tenants(body);
    else if (*layers)
      print_layers(body);
    else if (*plans)
      print_plans(body);
    else if (*peers)
      print_peers(body);
    else if (*metrics) {
      // Line by line, the newlines kept. A line with a control character is shown escaped; the
      // others as they are, so that Prometheus's own backslash escapes are not doubled.
      const std::string text = body.value("text", std::string());
      for (size_t at = 0; at < text.size();) {
        const size_t end = std::min(text.find('\n', at), text.size());
        const std::string_view line = std::string_view(text).substr(at, end - at);
        std::cout << (tutel::has_control_characters(line) ? tutel::escape_text(line) : std::string(line)) << "\n";
        at = end + 1;
      }
    } else if (*pin || *unpin) {
      std::cout << layer << (*pin ? " pinned" : " unpinned") << "\n";
    } else if (*destroy) {
      std::cout << layer << " destroyed\n";
    } else if (*drain || *undrain) {
      const int64_t open = body.value("sessions", int64_t{-1});
      if (*undrain)
        std::cout << "tuteld takes new sessions and layers again\n";
      else if (open == 0)
        std::cout << "tuteld is drained: no client sessions open\n";
      else
        std::cout << "tuteld is draining: " << open << " client session(s) still open\n";
      if (wait_ran_out) return kExitFailure;
    } else {
      std::cout << "checkpointed " << layer << " to " << text(json(body.value("path", path))) << "\n";
    }
  } catch (const json::exception& e) {
    std::cout.flush();
    std::cerr << "tutelctl: tuteld's reply has a field tutelctl cannot read (" << e.what()
              << "); is tutelctl the daemon's version? --json prints the reply as it is\n";
    return kExitFailure;
  }
  return 0;
}
