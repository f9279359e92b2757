// tutelctl as a child process: exit codes, its message when tuteld is absent, and its output
// against a fake admin socket.
#include <gtest/gtest.h>

#include <fstream>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <thread>
#include <utility>

#include "fake_daemon.hpp"

namespace tutel::client {
namespace {

using nlohmann::json;
using testing::TempDir;

struct ToolRun {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs tutelctl with `args`, after `env` assignments ("NAME=value ") when given.
ToolRun tutelctl(const std::string& args, const std::string& env = "") {
  ToolRun r;
  const std::string command = env + std::string(TUTELCTL_BIN) + " " + args + " 2>&1";
  FILE* p = ::popen(command.c_str(), "r");
  if (p == nullptr) return r;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = ::pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

// Answers admin frames with canned bodies, like tuteld's admin.cpp; or every frame with `reply`.
// A connection is served until tutelctl hangs up (drain --wait sends several requests).
// A metrics page: a label with Prometheus's own backslash escape and a µ (shown as they are),
// and one with an escape sequence a client's name could carry (shown escaped).
constexpr const char* kMetricsText =
    "# TYPE tuteld_up gauge\ntuteld_up 1\n"
    "tuteld_layer_steps{tenant=\"a\",layer=\"x\\\"y \xc2\xb5s\"} 3\n"
    "tuteld_session_info{name=\"\x1b[2Jowned\"} 1\n";

class FakeAdmin {
 public:
  // reply_request_id: answer `reply` under this request id instead of the request's.
  // reply_type: the frame `reply` goes in (kError with an error body: tuteld's error answer).
  // hang_up: read a request and close the connection without answering.
  explicit FakeAdmin(const std::string& path, std::optional<json> reply = std::nullopt,
                     std::optional<uint32_t> reply_request_id = std::nullopt,
                     ipc::FrameType reply_type = ipc::FrameType::kOk, bool hang_up = false)
      : reply_(std::move(reply)), reply_request_id_(reply_request_id), reply_type_(reply_type), hang_up_(hang_up) {
    auto fd = ipc::listen_unix(path, 0600);
    EXPECT_TRUE(fd.ok()) << fd.status();
    if (!fd.ok()) return;
    listen_fd_ = std::move(*fd);
    thread_ = std::thread([this] { serve(); });
  }
  ~FakeAdmin() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
  }
  std::string last_checkpoint_path;

 private:
  void serve() {
    while (!stop_) {
      pollfd p{listen_fd_.get(), POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      ipc::UniqueFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      if (!conn.valid()) continue;
      for (;;) {
        auto frame = ipc::recv_frame(conn.get(), std::chrono::milliseconds(5000));
        if (!frame.ok() || hang_up_) break;
        answer(conn.get(), *frame);
      }
    }
  }

  void answer(int conn, const ipc::Frame& frame) {
    const uint32_t rid = frame.header.request_id;
    auto body = ipc::parse_body(frame).value();
    using FT = ipc::FrameType;
    if (reply_) {
      (void)ipc::send_json(conn, reply_type_, reply_request_id_.value_or(rid), *reply_);
      return;
    }
    switch (static_cast<FT>(frame.header.type)) {
      case FT::kAdminStatus:
        (void)ipc::send_json(conn, FT::kOk, rid,
                             {{"version", "0.1.0"},
                              {"pid", 4242},
                              {"uptime_seconds", 3725.5},
                              {"backend", "cpu"},
                              {"ranks", 2},
                              {"sessions", 1},
                              {"layers", 1},
                              {"tenants", 1},
                              {"client_socket", "/run/tuteld/client.sock"},
                              {"state_dir", ""},
                              {"metrics_listen", "127.0.0.1:0"},
                              {"metrics_port", 39999}});
        break;
      case FT::kAdminTenants:
        (void)ipc::send_json(conn, FT::kOk, rid,
                             {{"tenants", json::array({{{"name", "alice"},
                                                        {"uids", {1000, 1001}},
                                                        {"gids", json::array()},
                                                        {"layers", 1},
                                                        {"max_layers", 64},
                                                        {"memory_bytes", 3 << 20},
                                                        {"max_memory_bytes", 8ull << 30},
                                                        {"inflight", 0},
                                                        {"max_inflight", 256},
                                                        {"sessions", 1},
                                                        {"closing_sessions", 2},
                                                        {"max_sessions", 64}}})}});
        break;
      case FT::kAdminLayers:
        (void)ipc::send_json(conn, FT::kOk, rid,
                             {{"layers", json::array({{{"tenant", "alice"},
                                                       {"name", "moe0"},
                                                       {"handle", 1},
                                                       {"rank", 0},
                                                       {"experts", 8},
                                                       {"model_dim", 256},
                                                       {"hidden", 1024},
                                                       {"k", 2},
                                                       {"capacity_factor", 1.0},
                                                       {"step", 12},
                                                       {"memory_bytes", 25 << 20},
                                                       {"pending_backwards", 0},
                                                       {"pinned", true},
                                                       {"plans",
                                                        {{"kind", "host"},
                                                         {"plans", 3},
                                                         {"held", 1},
                                                         {"bytes", 6 << 20},
                                                         {"max_bytes", 8ull << 30},
                                                         {"hits", 117},
                                                         {"misses", 4},
                                                         {"builds", 5},
                                                         {"build_failures", 0},
                                                         {"evictions", 2},
                                                         {"capacity_moves", 0}}},
                                                       {"capacity", 64},
                                                       {"dropped", 3},
                                                       {"l_aux", 1.0625}},
                                                      {{"tenant", "alice"},
                                                       {"name", "ep0"},
                                                       {"group", {{"rank", 0}, {"size", 2}}},
                                                       {"plans", nullptr}}})}});
        break;
      case FT::kAdminMetrics:
        (void)ipc::send_json(conn, FT::kOk, rid,
                             {{"text", kMetricsText}});
        break;
      case FT::kAdminCheckpoint:
        if (body.value("layer", "") != "alice/moe0") {
          (void)ipc::send_error(conn, rid,
                                Status::NotFound("no layer '" + body.value("layer", "") + "'"));
        } else {
          last_checkpoint_path = body.value("path", "");
          (void)ipc::send_json(conn, FT::kOk, rid, {{"path", last_checkpoint_path}});
        }
        break;
      default:
        (void)ipc::send_error(conn, rid, Status::InvalidArgument("not an admin request"));
    }
  }

  std::optional<json> reply_;
  std::optional<uint32_t> reply_request_id_;
  ipc::FrameType reply_type_;
  bool hang_up_ = false;
  ipc::UniqueFd listen_fd_;
  std::thread thread_;
  std::atomic<bool> stop_{false};
};

TEST(Tutelctl, MissingDaemonExitsOneWithAClearMessage) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  for (const char* command : {"status", "sessions", "tenants", "layers", "plans", "metrics",
                              "checkpoint a/b out.safetensors", "pin a/b", "destroy a/b", "drain", "undrain"}) {
    const ToolRun r = tutelctl("--socket " + sock + " " + command);
    EXPECT_EQ(r.exit_code, 1) << command << ": " << r.output;
    EXPECT_NE(r.output.find("cannot reach tuteld at " + sock + ": is it running?"),
              std::string::npos)
        << r.output;
  }
}

// A path that is a file or a directory, not a socket, is named as such (not as a daemon gone).
TEST(Tutelctl, APathThatIsNotASocketIsNamedAsSuch) {
  TempDir dir;
  const std::string file = dir.file("notes.txt");
  { std::ofstream(file) << "x"; }
  for (const auto& [path, kind] : std::vector<std::pair<std::string, std::string>>{{file, "a file"}, {dir.path(), "a directory"}}) {
    const ToolRun r = tutelctl("--socket " + path + " status");
    EXPECT_EQ(r.exit_code, 1) << r.output;
    EXPECT_NE(r.output.find(path + " is not a socket (" + kind + ")"), std::string::npos) << r.output;
  }
}

TEST(Tutelctl, EnvironmentNamesTheDefaultSocket) {
  TempDir dir;
  const std::string sock = dir.file("env-admin.sock");
  ToolRun r = tutelctl("status", "TUTELD_ADMIN_SOCKET= ");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find("./run/admin.sock"), std::string::npos) << r.output;
  r = tutelctl("status", "TUTELD_ADMIN_SOCKET=" + sock + " ");
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.output.find(sock), std::string::npos) << r.output;
}

TEST(Tutelctl, UsageErrorsExitTwo) {
  EXPECT_EQ(tutelctl("").exit_code, 2);
  for (const char* unknown : {"frobnicate", "--timeout 5 help", "--socket x stats --json"}) {
    const ToolRun run = tutelctl(unknown);
    EXPECT_EQ(run.exit_code, 2) << unknown;
    const std::string word = std::string(unknown).find("help") != std::string::npos    ? "help"
                             : std::string(unknown).find("stats") != std::string::npos ? "stats"
                                                                                       : "frobnicate";
    EXPECT_NE(run.output.find("unknown command '" + word + "'; the commands are status, sessions"),
              std::string::npos)
        << unknown << ": " << run.output;
  }
  EXPECT_EQ(tutelctl("status --bogus").exit_code, 2);
  EXPECT_EQ(tutelctl("plans --bogus").exit_code, 2);
  EXPECT_EQ(tutelctl("plans alice/moe0").exit_code, 2);  // takes no argument
  EXPECT_EQ(tutelctl("checkpoint alice/moe0").exit_code, 2);            // PATH missing
  EXPECT_EQ(tutelctl("checkpoint moe0 out.safetensors").exit_code, 2);  // not TENANT/NAME
  EXPECT_EQ(tutelctl("checkpoint alice/moe0 ''").exit_code, 2);         // an empty PATH
  EXPECT_EQ(tutelctl("destroy").exit_code, 2);                          // LAYER missing
  EXPECT_EQ(tutelctl("destroy moe0").exit_code, 2);                     // not TENANT/NAME
  EXPECT_EQ(tutelctl("destroy alice/moe0 alice/moe1").exit_code, 2);    // one layer at a time
  EXPECT_EQ(tutelctl("--timeout -1 status").exit_code, 2);
  // NaN passes a range check (every comparison with it is false) and was a wait without bound.
  for (const char* bad : {"--timeout nan status", "--timeout inf status", "drain --wait nan"}) {
    const ToolRun run = tutelctl(bad);
    EXPECT_EQ(run.exit_code, 2) << bad;
    EXPECT_NE(run.output.find("finite"), std::string::npos) << bad << ": " << run.output;
  }
  const ToolRun version = tutelctl("--version");
  EXPECT_EQ(version.exit_code, 0) << version.output;
  EXPECT_NE(version.output.find("tutelctl " TUTEL_VERSION), std::string::npos) << version.output;
  const ToolRun help = tutelctl("--help");
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.output.find("checkpoint"), std::string::npos);
  EXPECT_NE(help.output.find("plans"), std::string::npos);
}

// A reply whose fields have unexpected types or values (another daemon version, a damaged
// reply) is an error that says so, or a field shown as "?": never a crash.
TEST(Tutelctl, RepliesOfUnexpectedShapesAreErrorsNotCrashes) {
  TempDir dir;
  auto run = [&](const json& reply, const std::string& command) {
    const std::string sock = dir.file(command + ".sock");
    FakeAdmin admin(sock, reply);
    return tutelctl("--socket " + sock + " " + command);
  };
  for (const auto& [reply, command] :
       {std::pair{json{{"text", 5}}, std::string("metrics")},
        std::pair{json{{"cluster", {{"nodes", {{{"first_rank", "x"}}}}}}}, std::string("peers")},
        std::pair{json{{"cluster", {{"nodes", {7}}}}}, std::string("peers")}}) {
    const ToolRun r = run(reply, command);
    EXPECT_EQ(r.exit_code, 1) << command << ": " << r.output;
    EXPECT_NE(r.output.find("cannot read"), std::string::npos) << command << ": " << r.output;
  }
  ToolRun r = run(json{{"uptime_seconds", 1e300}}, "status");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("uptime           ?"), std::string::npos) << r.output;
  // Ranks out of service: each with its device, how long ago and why; entries of other shapes
  // are skipped, a time that is not one reads as "-".
  r = run(json{{"out_of_service",
                {{{"rank", 1}, {"device", "cuda:1"}, {"seconds_ago", 65}, {"error", "CUDA device 1 is lost"}},
                 7,
                 {{"rank", 2}, {"device", "cuda:2"}, {"seconds_ago", "soon"}, {"error", "lost too"}}}}},
          "status");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("rank 1 (cuda:1, 1m 05s ago): CUDA device 1 is lost; rank 2 (cuda:2, -): lost too "
                          "(restart tuteld)"),
            std::string::npos)
      << r.output;
  r = run(json{{"out_of_service", json::array()}}, "status");
  EXPECT_NE(r.output.find("out of service   none"), std::string::npos) << r.output;
  r = run(json{{"cluster", {{"nodes", {{{"first_rank", INT64_MAX}, {"ranks", 2}}}}}}}, "peers");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  // A field a newer daemon adds: a value past INT64_MAX is shown as it is (it read as -1), and
  // its key's control characters are escaped like any text from the daemon.
  r = run(json{{"newer\x1b[2J", uint64_t{18446744073709551615u}}}, "status");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("18446744073709551615"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find('\x1b'), std::string::npos) << r.output;
}

// drain --wait exits 1 while client sessions stay open, with --json as with a table, and 0 once
// none is open.
// Request id 0 is the daemon's word about the connection, only ever an error: an Ok under it (a
// stale or confused peer) is not the answer to what was asked.
TEST(Tutelctl, AnOkUnderRequestIdZeroIsNotAnAnswer) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  FakeAdmin admin(sock, json{{"version", "0.1.0"}, {"pid", 1}}, 0);
  const ToolRun r = tutelctl("--socket " + sock + " --json status");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("with a reply to 0"), std::string::npos) << r.output;
}

// tuteld's own Unavailable answer (a checkpoint of a layer whose rank lost its device) is printed
// as tuteld said it, not as "cannot reach tuteld ... is it running?" with advice about the socket
// path: the daemon was reached. A connection that fails still says it cannot reach it.
TEST(Tutelctl, TuteldsOwnUnavailableAnswerIsNotCannotReach) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  const std::string why = "rank 0 (cuda:0) is out of service: CUDA device 0 is lost; restart tuteld";
  FakeAdmin admin(sock, json::parse(ipc::error_body(Status::Unavailable(why))), std::nullopt, ipc::FrameType::kError);
  const ToolRun r = tutelctl("--socket " + sock + " checkpoint alice/moe0 /tmp/moe0.safetensors");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find(why), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("cannot reach"), std::string::npos) << r.output;
  const std::string hanging_sock = dir.file("hanging.sock");
  FakeAdmin hanging(hanging_sock, std::nullopt, std::nullopt, ipc::FrameType::kOk, /*hang_up=*/true);
  const ToolRun lost = tutelctl("--socket " + hanging_sock + " checkpoint alice/moe0 /tmp/moe0.safetensors");
  EXPECT_EQ(lost.exit_code, 1) << lost.output;
  EXPECT_NE(lost.output.find("cannot reach tuteld at " + hanging_sock), std::string::npos) << lost.output;
  EXPECT_NE(lost.output.find("closed the connection before answering"), std::string::npos) << lost.output;
}

// What tuteld relays reaches the operator's terminal escaped: an escape sequence, a C1 control or
// a right-to-left override in a string of the reply (a client's name, say) or in an error.
TEST(Tutelctl, ControlCharactersFromTheDaemonAreEscaped) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  {
    FakeAdmin admin(sock, json{{"version", "0.1.0\x1b]0;owned\x07\xc2\x9b" "2J\xe2\x80\xae" "txt"}});
    const ToolRun r = tutelctl("--socket " + sock + " status");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_EQ(r.output.find('\x1b'), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("0.1.0\\x1b]0;owned\\x07\\u009b2J\\u202etxt"), std::string::npos) << r.output;
  }
  const std::string sock2 = dir.file("admin2.sock");
  FakeAdmin failing(sock2, json::parse(ipc::error_body(Status::InvalidArgument("bad\x1b[2Jname"))), std::nullopt,
                    ipc::FrameType::kError);
  const ToolRun r = tutelctl("--socket " + sock2 + " status");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("bad\\x1b[2Jname"), std::string::npos) << r.output;
}

TEST(Tutelctl, DrainWaitExitsOneWhileSessionsStayOpen) {
  TempDir dir;
  const std::string open_sock = dir.file("open.sock"), closed_sock = dir.file("closed.sock");
  FakeAdmin open(open_sock, json{{"sessions", 2}, {"draining", true}});
  FakeAdmin closed(closed_sock, json{{"sessions", 0}, {"draining", true}});

  ToolRun r = tutelctl("--socket " + open_sock + " drain --wait 0.2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("2 client session(s) still open"), std::string::npos) << r.output;
  r = tutelctl("--socket " + open_sock + " --json drain --wait 0.2");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  const json still_open = json::parse(r.output, nullptr, false);
  ASSERT_TRUE(still_open.is_object()) << r.output;  // stdout stays JSON
  EXPECT_EQ(still_open.value("sessions", -1), 2) << r.output;

  r = tutelctl("--socket " + closed_sock + " drain --wait 0.2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("tuteld is drained"), std::string::npos) << r.output;
  r = tutelctl("--socket " + closed_sock + " --json drain --wait 0.2");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(json::parse(r.output, nullptr, false).value("sessions", -1), 0) << r.output;
}

// The status replies drain --wait reads are checked like every other reply: a field of another
// type is an error that says so, not an abort.
TEST(Tutelctl, DrainWaitOnAnUnreadableStatusIsAnError) {
  TempDir dir;
  int n = 0;
  for (const json& reply : {json{{"sessions", 2}, {"draining", "yes"}}, json{{"sessions", "2"}},
                            json{{"draining", true}}}) {
    const std::string sock = dir.file("admin" + std::to_string(n++) + ".sock");
    FakeAdmin admin(sock, reply);
    for (const char* json_flag : {"", "--json "}) {
      const ToolRun r = tutelctl("--socket " + sock + " " + json_flag + "drain --wait 0.2");
      EXPECT_EQ(r.exit_code, 1) << reply.dump() << ": " << r.output;
      EXPECT_NE(r.output.find("cannot read tuteld's status reply"), std::string::npos)
          << reply.dump() << ": " << r.output;
    }
  }
}

TEST(Tutelctl, TablesAndJsonFromTheAdminSocket) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  FakeAdmin admin(sock);
  const std::string s = "--socket " + sock + " ";

  ToolRun r = tutelctl(s + "status");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("uptime           1h 02m 05s"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("cpu x 2 rank(s)"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("http://127.0.0.1:39999/metrics"), std::string::npos) << r.output;

  r = tutelctl(s + "--json status");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json parsed = json::parse(r.output);
  EXPECT_EQ(parsed["pid"], 4242);

  r = tutelctl(s + "tenants");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("TENANT"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("alice   1000,1001"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("3.0 MiB / 8.0 GiB"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1 / 64 (2 closing)"), std::string::npos) << r.output;

  r = tutelctl(s + "layers");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("alice/moe0"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("1.062"), std::string::npos) << r.output;

  // The plan caches come from the same reply as layers; a group layer has none.
  r = tutelctl(s + "plans");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* line :
       {"LAYER       KIND     PINNED  PLANS  HELD    BYTES  HITS  MISSES  BUILDS  EVICTIONS",
        "alice/moe0  host     yes         3     1  6.0 MiB   117       4       5          2",
        "alice/ep0   (group)  -           -     -        -     -       -       -          -"})
    EXPECT_NE(r.output.find(line), std::string::npos) << r.output;
  r = tutelctl(s + "--json plans");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const json plans = json::parse(r.output);
  EXPECT_EQ(plans["layers"][0]["plans"]["hits"], 117);
  EXPECT_TRUE(plans["layers"][1]["plans"].is_null());

  r = tutelctl(s + "metrics");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(r.output,
            "# TYPE tuteld_up gauge\ntuteld_up 1\n"
            "tuteld_layer_steps{tenant=\"a\",layer=\"x\\\"y \xc2\xb5s\"} 3\n"
            "tuteld_session_info{name=\"\\x1b[2Jowned\"} 1\n");

  r = tutelctl(s + "checkpoint alice/moe0 /tmp/x.safetensors");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("checkpointed alice/moe0 to /tmp/x.safetensors"), std::string::npos)
      << r.output;

  r = tutelctl(s + "checkpoint bob/moe9 /tmp/x.safetensors");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  EXPECT_NE(r.output.find("NotFound: no layer 'bob/moe9'"), std::string::npos) << r.output;
}

TEST(Tutelctl, CheckpointSendsAnAbsolutePath) {
  TempDir dir;
  const std::string sock = dir.file("admin.sock");
  FakeAdmin admin(sock);
  const ToolRun r = tutelctl("--socket " + sock + " checkpoint alice/moe0 relative/ck.safetensors");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string cwd = std::filesystem::current_path().string();
  EXPECT_NE(r.output.find(cwd + "/relative/ck.safetensors"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace tutel::client
