// Bad input on the real daemon: malformed frames, wrong versions, oversize messages, requests
// before hello, descriptors pointing outside the arena, wrong sizes, unknown and foreign layer
// handles, bad specs, a corrupted ring and a client killed mid-request. Each gets an error (or
// the offending session is closed) and the daemon keeps serving everyone else.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <cstdint>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <functional>
#include <future>
#include <map>
#include <optional>
#include <thread>
#include <tuple>
#include <vector>

#include <fcntl.h>
#include <sys/mman.h>

#include "../common/loopback.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/core/shared_memory.hpp"
#include "daemon_fixture.hpp"
#include "raw_session.hpp"

namespace tutel::testing {
namespace {

constexpr const char* kSpec = R"(
name = "moe"
experts = 4
model_dim = 16
hidden = 32
k = 2
init_seed = 3
)";

class ProtocolAbuse : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<DaemonProcess>(DaemonOptions{});
    ASSERT_TRUE(daemon_->start());
  }
  void TearDown() override {
    if (daemon_) {
      EXPECT_TRUE(daemon_->alive()) << "the daemon died:\n" << daemon_->log();
      EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
    }
  }
  // Restarts the daemon with other options.
  void restart(const DaemonOptions& options) {
    // The first daemon's exit status counts too (a sanitizer's report fails it).
    EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
    daemon_ = std::make_unique<DaemonProcess>(options);
    ASSERT_TRUE(daemon_->start());
  }
  // Restarts the daemon with a thread pool of `threads` (UV_THREADPOOL_SIZE, for this start only).
  void restart_with_pool_threads(int threads) {
    EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
    ::setenv("UV_THREADPOOL_SIZE", std::to_string(threads).c_str(), 1);
    daemon_ = std::make_unique<DaemonProcess>(DaemonOptions{});
    const bool started = daemon_->start();
    ::unsetenv("UV_THREADPOOL_SIZE");
    ASSERT_TRUE(started);
  }
  // Restarts the daemon with a second tenant, "other", for uid 65534 (nobody), whose clients run
  // in children that drop to that uid; its socket and directories are opened to them.
  void restart_with_other_tenant() {
    ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.extra_tenants = "[[tenant]]\nname = \"other\"\nuids = [65534]\n"}));
    ::chmod(daemon_->client_socket().c_str(), 0666);
    ::chmod(daemon_->dir().c_str(), 0755);
    ::chmod((daemon_->dir() + "/run").c_str(), 0755);
  }
  // A child process as uid 65534 (tenant "other" of restart_with_other_tenant) with a session
  // past its hello, running `body` and exiting with what it returns (0: all held); it exits 3
  // when it cannot become that user, 4 when its hello fails. Only _exit in the child: a gtest
  // assertion there would report into a copy of the parent's test.
  pid_t fork_other_tenant(const std::function<int(RawSession&)>& body) {
    const pid_t child = ::fork();
    if (child == 0) {
      if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(3);
      RawSession other(daemon_->client_socket());
      if (!other.hello().ok()) ::_exit(4);
      ::_exit(body(other));
    }
    return child;
  }
  // Waits for such a child; fails the test unless it exited 0, naming its exit status (the
  // number of the check that failed).
  void expect_child_succeeded(pid_t child) {
    ASSERT_GT(child, 0) << "fork failed";
    int status = 0;
    ASSERT_EQ(::waitpid(child, &status, 0), child);
    ASSERT_TRUE(WIFEXITED(status)) << "the child was killed by signal " << WTERMSIG(status);
    EXPECT_EQ(WEXITSTATUS(status), 0) << "the other tenant's check number " << WEXITSTATUS(status) << " failed\n"
                                      << daemon_->log();
  }
  // Tenant default's group of two ranks in this daemon, one layer per session (the tenant's
  // names are unique in the daemon: "moe_r0", "moe_r1"), with a collective timeout far longer
  // than any test; their handles go to `handles`.
  void create_two_rank_group(RawSession& rank0, RawSession& rank1, std::vector<uint64_t>& handles) {
    const std::string coordinator = "127.0.0.1:" + std::to_string(free_port());
    for (RawSession* s : {&rank0, &rank1}) {
      ASSERT_TRUE(s->hello().ok());
      std::string spec = std::string(kSpec) + "[group]\ncoordinator = \"" + coordinator +
                         "\"\nsize = 2\nrank = " + std::to_string(s == &rank0 ? 0 : 1) +
                         "\ncollective_timeout_ms = 120000\n";
      spec.replace(spec.find("\"moe\""), 5, s == &rank0 ? "\"moe_r0\"" : "\"moe_r1\"");
      ASSERT_TRUE(s->send(ipc::FrameType::kCreateLayer, {{"spec", spec}}).ok());
    }
    for (RawSession* s : {&rank0, &rank1}) {
      auto reply = s->receive(std::chrono::seconds(30));
      ASSERT_TRUE(reply.ok()) << reply.status();
      auto info = ipc::reply_body(*reply, ipc::FrameType::kLayerInfo);
      ASSERT_TRUE(info.ok()) << info.status();
      handles.push_back((*info)["handle"].get<uint64_t>());
    }
  }
  // Polls the admin status until it counts `expected` client sessions, up to 20 s
  // (a bound that only keeps a broken daemon from hanging the test); the last count.
  int64_t await_sessions(int64_t expected) {
    RawSession admin(daemon_->admin_socket());
    int64_t open = -1;
    for (int i = 0; i < 400 && open != expected; ++i) {
      auto st = admin.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
      EXPECT_TRUE(st.ok()) << st.status();
      if (!st.ok()) break;
      open = (*st)["sessions"].get<int64_t>();
      if (open != expected) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return open;
  }
  // Rank 1's forward comes, and the group's forward completes on both ranks: rank 0's was `held`.
  static void complete_group_forward(std::future<std::optional<ipc::CompletionDescriptor>>& held,
                                     RawSession& rank1, uint64_t rank1_handle, uint64_t training_sequence = 0) {
    const auto second = forward8(rank1, rank1_handle, training_sequence);
    const auto first = held.get();
    ASSERT_TRUE(first.has_value() && second.has_value());
    EXPECT_EQ(first->status_code, 0) << first->message;
    EXPECT_EQ(second->status_code, 0) << second->message;
  }
  // Rank 0's forward of a two-rank group, in its collective waiting for rank 1's once this
  // returns (300 ms given to get there).
  static std::future<std::optional<ipc::CompletionDescriptor>> hold_group_forward(
      RawSession& rank0, uint64_t handle, uint64_t training_sequence = 0) {
    auto held = std::async(std::launch::async,
                           [&rank0, handle, training_sequence] { return forward8(rank0, handle, training_sequence); });
    std::this_thread::sleep_for(std::chrono::milliseconds(300));
    return held;
  }
  // A forward of 8 tokens on `handle`, from and to `s`'s arena; its completion.
  // With a `training_sequence` (not 0), a training forward, kept for its backward under it.
  static std::optional<ipc::CompletionDescriptor> forward8(RawSession& s, uint64_t handle,
                                                           uint64_t training_sequence = 0) {
    const ipc::ArenaLayout& l = s.arena().layout();
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kForward);
    if (training_sequence != 0) {
      d.flags = ipc::kFlagTraining;
      d.sequence = training_sequence;
    }
    d.layer_handle = handle;
    d.tokens = 8;
    d.input_offset = l.data_offset;
    d.input_bytes = d.output_bytes = 8 * 16 * 4;
    d.output_offset = l.data_offset + d.input_bytes;
    return s.submit(d);
  }
  // A fresh, well-behaved session still works: the daemon survived whatever came before.
  void expect_daemon_serves() {
    RawSession s(daemon_->client_socket());
    ASSERT_TRUE(s.hello().ok());
    auto layer = s.call(ipc::FrameType::kAttachLayer, {{"name", "nonexistent"}}, ipc::FrameType::kLayerInfo);
    EXPECT_EQ(layer.status().code(), StatusCode::kNotFound);
    ipc::RequestDescriptor nop{};
    nop.op = static_cast<uint32_t>(ipc::Op::kNop);
    auto c = s.submit(nop);
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->status_code, 0);
  }
  // The next frame is an error whose message contains `needle`, then the daemon hangs up.
  void expect_error_then_close(RawSession& s, const std::string& needle) {
    auto reply = s.receive();
    ASSERT_TRUE(reply.ok()) << reply.status();
    ASSERT_EQ(reply->header.type, static_cast<uint16_t>(ipc::FrameType::kError));
    const Status st = ipc::status_from_error_body(nlohmann::json::parse(reply->body));
    EXPECT_NE(st.message().find(needle), std::string_view::npos) << st;
    EXPECT_EQ(s.receive().status().code(), StatusCode::kUnavailable) << "the daemon should close the stream";
  }

  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(ProtocolAbuse, GarbageInsteadOfAHeader) {
  RawSession s(daemon_->client_socket());
  const char garbage[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  s.send_bytes(garbage, sizeof(garbage) - 1);
  expect_error_then_close(s, "not a tuteld");
  expect_daemon_serves();
}

TEST_F(ProtocolAbuse, WrongProtocolVersion) {
  RawSession s(daemon_->client_socket());
  ipc::FrameHeader h;
  h.version = 99;
  h.type = static_cast<uint16_t>(ipc::FrameType::kHello);
  s.send_bytes(&h, sizeof(h));
  expect_error_then_close(s, "version");
  expect_daemon_serves();
}

TEST_F(ProtocolAbuse, OversizeFrame) {
  RawSession s(daemon_->client_socket());
  ipc::FrameHeader h;
  h.type = static_cast<uint16_t>(ipc::FrameType::kCreateLayer);
  h.body_length = ipc::kMaxFrameBody + 1;
  s.send_bytes(&h, sizeof(h));
  expect_error_then_close(s, "1048577");
  expect_daemon_serves();
}

TEST_F(ProtocolAbuse, UnknownFrameType) {
  RawSession s(daemon_->client_socket());
  ipc::FrameHeader h;
  h.type = 999;
  s.send_bytes(&h, sizeof(h));
  expect_error_then_close(s, "999");
  expect_daemon_serves();
}

TEST_F(ProtocolAbuse, BodyThatIsNotJsonKeepsTheSession) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(ipc::send_frame(s.fd(), ipc::FrameType::kHello, 1, "{not json").ok());
  auto reply = s.receive();
  ASSERT_TRUE(reply.ok());
  EXPECT_EQ(reply->header.type, static_cast<uint16_t>(ipc::FrameType::kError));
  // The frame boundary was intact, so the session goes on.
  EXPECT_TRUE(s.hello().ok());
}

// A burst of control frames, ids 1 to `frames`: a create that runs on the thread pool (a layer
// big enough to take a while) first, then `rest` (a frame body) as AttachLayer frames, all written
// at once from a thread while the replies are read here. Each reply must come in order, the
// create's a LayerInfo and every other an Error; `midway` runs after half of them. Returns how
// many were answered.
uint32_t burst_after_a_create(RawSession& s, uint32_t frames, const std::string& rest,
                              const std::function<void()>& midway = {}) {
  const std::string create = nlohmann::json{{"spec",
                                             "name = \"slow\"\nexperts = 8\nmodel_dim = 256\n"
                                             "hidden = 1024\nk = 2\ninit_seed = 3\n"}}
                                 .dump();
  std::string burst = ipc::encode_frame(ipc::FrameType::kCreateLayer, 1, create);
  for (uint32_t id = 2; id <= frames; ++id) burst += ipc::encode_frame(ipc::FrameType::kAttachLayer, id, rest);
  std::thread writer([&] {
    for (size_t sent = 0; sent < burst.size();) {
      const ssize_t n = ::write(s.fd(), burst.data() + sent, burst.size() - sent);
      if (n <= 0) return;
      sent += static_cast<size_t>(n);
    }
  });
  uint32_t answered = 0;
  for (uint32_t id = 1; id <= frames; ++id) {
    auto reply = s.receive();
    if (!reply.ok()) {
      ADD_FAILURE() << "reply " << id << ": " << reply.status();
      break;
    }
    EXPECT_EQ(reply->header.request_id, id);
    EXPECT_EQ(reply->header.type,
              static_cast<uint16_t>(id == 1 ? ipc::FrameType::kLayerInfo : ipc::FrameType::kError));
    ++answered;
    if (id == frames / 2 && midway) midway();
  }
  writer.join();
  return answered;
}

// A client that sends control frames faster than they run waits in its socket, not in the
// daemon's memory: one frame that runs on the thread pool (a create) followed at once by
// thousands of cheap ones in a single burst. Every frame is answered, in order, another session
// is served meanwhile, and the daemon's own account (admin status) shows that no more than 64
// frames ever waited and that the session's reads were paused to hold them there.
TEST_F(ProtocolAbuse, ControlFramesSentFasterThanTheyRunWaitInTheSocket) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  constexpr uint32_t kFrames = 3000;
  // Another session is served while this one is paused.
  EXPECT_EQ(burst_after_a_create(s, kFrames, R"({"name":"nonexistent"})", [&] { expect_daemon_serves(); }), kFrames);
  expect_daemon_serves();
  RawSession admin(daemon_->admin_socket());
  auto status =
      admin.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_LE((*status)["control_frames_queued_peak"].get<uint64_t>(), 64u) << status->dump();
  EXPECT_GT((*status)["control_reads_paused"].get<uint64_t>(), 0u) << status->dump();
}

// A layer whose parameters, gradients and optimizer state do not fit its tenant's quota is
// refused before any of it is allocated (the charge used to come after building the layer, so a
// spec could make the daemon allocate gigabytes, or terabytes, first).
TEST(ProtocolAbuseQuota, ALayerOverTheQuotaIsRefusedBeforeItIsAllocated) {
  DaemonOptions options;
  options.default_max_memory_bytes = 1 << 20;
  DaemonProcess daemon(options);
  ASSERT_TRUE(daemon.start());
  RawSession s(daemon.client_socket());
  ASSERT_TRUE(s.hello().ok());
  const std::string big = "name = \"big\"\nexperts = 64\nmodel_dim = 65536\nhidden = 65536\nk = 2\ninit_seed = 1\n";
  auto r = s.call(ipc::FrameType::kCreateLayer, {{"spec", big}}, ipc::FrameType::kLayerInfo);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kResourceExhausted) << r.status();
  EXPECT_NE(r.status().message().find("parameters, gradients and optimizer state"),
            std::string_view::npos)
      << r.status();
  EXPECT_NE(r.status().message().find("max_memory_bytes"), std::string_view::npos) << r.status();
  // A layer that fits is still created.
  auto small = s.call(ipc::FrameType::kCreateLayer, {{"spec", kSpec}}, ipc::FrameType::kLayerInfo);
  EXPECT_TRUE(small.ok()) << small.status();
  EXPECT_TRUE(daemon.alive()) << daemon.log();
  EXPECT_EQ(daemon.stop(), 0) << daemon.log();
}

// A client request's body past 160 KiB (a 64 KiB layer spec, escaped) is refused unparsed (a megabyte of JSON parsed on the loop
// took tens of milliseconds from every session), the session serving on; and frames that wait
// behind a slow one hold at most about a megabyte of bodies (64 frames of a megabyte each held
// 64 MiB per session), the rest waiting in the socket.
TEST_F(ProtocolAbuse, LargeRequestBodiesAreRefusedAndQueuedBytesBounded) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  const std::string padding(200 << 10, ' ');
  auto big = s.call(ipc::FrameType::kStep, nlohmann::json{{"handle", 1}, {"pad", padding}}, ipc::FrameType::kOk);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.status().code(), StatusCode::kInvalidArgument) << big.status();
  EXPECT_NE(big.status().message().find("a client request takes at most 163840"), std::string_view::npos)
      << big.status();
  // A layer spec near its own bound, whose newlines escaping doubles, still fits.
  const std::string roomy = "name = \"roomy\"\nexperts = 2\nmodel_dim = 4\nhidden = 4\nk = 1\ninit_seed = 1\n" +
                            std::string(60000, '\n');
  auto created = s.call(ipc::FrameType::kCreateLayer, {{"spec", roomy}}, ipc::FrameType::kLayerInfo);
  EXPECT_TRUE(created.ok()) << created.status();

  constexpr uint32_t kFrames = 200;
  const std::string wide = nlohmann::json{{"name", "nonexistent"}, {"pad", std::string(60 << 10, 'x')}}.dump();
  EXPECT_EQ(burst_after_a_create(s, kFrames, wide), kFrames);
  RawSession admin(daemon_->admin_socket());
  auto status = admin.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(status.ok()) << status.status();
  // A megabyte of 60 KiB bodies is 17 frames, one more passes it, and the create's small one may
  // wait beside them (the bound is 64 frames without the bytes').
  EXPECT_LE((*status)["control_frames_queued_peak"].get<uint64_t>(), 19u) << status->dump();
  expect_daemon_serves();
}

// Admin requests with bodies of the wrong shape are refused with what they need; nothing changes.
TEST_F(ProtocolAbuse, MalformedPinDrainAndDestroyRequests) {
  RawSession admin(daemon_->admin_socket());
  const std::pair<ipc::FrameType, nlohmann::json> bad[] = {
      {ipc::FrameType::kAdminPin, nlohmann::json::object()},
      {ipc::FrameType::kAdminPin, {{"layer", 5}, {"pinned", true}}},
      {ipc::FrameType::kAdminPin, {{"layer", "default/x"}, {"pinned", "yes"}}},
      {ipc::FrameType::kAdminDrain, nlohmann::json::object()},
      {ipc::FrameType::kAdminDrain, {{"draining", 1}}},
      {ipc::FrameType::kAdminDestroy, nlohmann::json::object()},
      {ipc::FrameType::kAdminDestroy, {{"layer", 5}}},
      {ipc::FrameType::kAdminDestroy, {{"layer", nullptr}}},
  };
  for (const auto& [type, body] : bad) {
    auto r = admin.call(type, body, ipc::FrameType::kOk);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("needs"), std::string_view::npos) << r.status();
  }
  auto status =
      admin.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(status.ok()) << status.status();
  EXPECT_EQ((*status)["draining"], false);
  expect_daemon_serves();
}

// The gradient frames with what a library would never send: no factor, a factor that is not a
// number or beyond f32, a handle that is not an integer or names no layer. Each is refused with
// a message naming the field; the layer's gradients stay as they were (its norm), and it serves.
TEST_F(ProtocolAbuse, MalformedGradNormScaleGradsStepAndZeroGradRequests) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  const nlohmann::json h = *handle;
  const std::tuple<ipc::FrameType, nlohmann::json, StatusCode, const char*> bad[] = {
      {ipc::FrameType::kScaleGrads, {{"handle", h}}, StatusCode::kInvalidArgument, "'factor' is missing"},
      {ipc::FrameType::kScaleGrads, {{"handle", h}, {"factor", "2"}}, StatusCode::kInvalidArgument, "must be a number"},
      {ipc::FrameType::kScaleGrads, {{"handle", h}, {"factor", nullptr}}, StatusCode::kInvalidArgument, "must be a number"},
      {ipc::FrameType::kScaleGrads, {{"handle", h}, {"factor", 1e39}}, StatusCode::kInvalidArgument, "finite f32"},
      {ipc::FrameType::kScaleGrads, {{"handle", h}, {"factor", 1e300}}, StatusCode::kInvalidArgument, "f32 number, not 1e+300"},
      {ipc::FrameType::kScaleGrads, {{"handle", "1"}, {"factor", 2}}, StatusCode::kInvalidArgument, "'handle'"},
      {ipc::FrameType::kScaleGrads, {{"handle", 987654}, {"factor", 2}}, StatusCode::kNotFound, "987654"},
      {ipc::FrameType::kGradNorm, nlohmann::json::object(), StatusCode::kInvalidArgument, "'handle' is missing"},
      {ipc::FrameType::kGradNorm, {{"handle", -3}}, StatusCode::kInvalidArgument, "-3"},
      {ipc::FrameType::kStep, {{"handle", h}, {"lr", "fast"}}, StatusCode::kInvalidArgument, "'lr' must be a number"},
      {ipc::FrameType::kStep, {{"handle", h}, {"lr", -0.5}}, StatusCode::kInvalidArgument, "finite number >= 0"},
      {ipc::FrameType::kStep, {{"handle", h}, {"weight_decay", 1e300}}, StatusCode::kInvalidArgument, "within f32"},
      {ipc::FrameType::kStep, {{"handle", h}, {"lr", nullptr}}, StatusCode::kInvalidArgument, "must be a number"},
      {ipc::FrameType::kZeroGrad, {{"handle", h}, {"set_to_none", 1}}, StatusCode::kInvalidArgument, "must be a boolean"},
  };
  for (const auto& [type, body, code, needle] : bad) {
    auto r = s.call(type, body, ipc::FrameType::kOk);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.status().code(), code) << body.dump() << ": " << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status();
  }
  auto norm = s.call(ipc::FrameType::kGradNorm, {{"handle", h}}, ipc::FrameType::kOk);
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_EQ((*norm)["norm"], 0.0) << norm->dump();
  // None of the refused steps stepped; a well-formed one without gradients says it applied none.
  auto step = s.call(ipc::FrameType::kStep, {{"handle", h}, {"lr", 0.25}}, ipc::FrameType::kOk);
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ((*step)["step"], 0) << step->dump();
  EXPECT_EQ((*step)["applied"], false) << step->dump();
  EXPECT_EQ((*step)["lr"], 0.25) << step->dump();
  expect_daemon_serves();
}

// A memfd as the client library gives one to ExportState: every page allocated, sealed against
// shrinking.
SharedMemory export_receiver(uint64_t bytes) {
  Result<SharedMemory> m = SharedMemory::create(bytes, "test state receiver");
  EXPECT_TRUE(m.ok()) << m.status();
  return std::move(m).value();
}

UniqueFd memfd_with(const std::string& bytes) {
  UniqueFd fd(::memfd_create("test state", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_TRUE(fd.valid());
  EXPECT_EQ(::pwrite(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
  return fd;
}

// The state frames with what a library would never send: no descriptor or two, descriptors that
// are not what the frame needs (a pipe, a directory, a file on disk, an unsealed or sparse or
// small memfd), files that are not a layer's state (garbage, cut short, a terabyte, a tensor
// mis-shaped or missing). Each is refused with a message saying what was wrong; the layer's state stays
// exactly as it was (its export, byte for byte), and the daemon serves.
TEST_F(ProtocolAbuse, MalformedExportAndImportStateRequests) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto info = s.call(ipc::FrameType::kCreateLayer, {{"spec", kSpec}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(info.ok()) << info.status();
  const nlohmann::json h = (*info)["handle"];
  const uint64_t state_bytes = (*info)["state_bytes"].get<uint64_t>();
  auto export_state = [&]() -> std::string {
    SharedMemory receiver = export_receiver(state_bytes);
    auto reply = s.call(ipc::FrameType::kExportState, {{"handle", h}}, ipc::FrameType::kOk, 10s, {receiver.fd()});
    EXPECT_TRUE(reply.ok()) << reply.status();
    if (!reply.ok()) return {};
    return std::string(reinterpret_cast<const char*>(receiver.data()), (*reply)["bytes"].get<size_t>());
  };
  const std::string before = export_state();
  ASSERT_GT(before.size(), 8u);

  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  const UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  const UniqueFd dir(::open(daemon_->dir().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  SharedMemory good = export_receiver(state_bytes), small = export_receiver(64);
  const UniqueFd unsealed = memfd_with(std::string(state_bytes, '\0'));
  UniqueFd sparse = memfd_with("");
  ASSERT_EQ(::ftruncate(sparse.get(), static_cast<off_t>(state_bytes)), 0);
  ASSERT_EQ(::fcntl(sparse.get(), F_ADD_SEALS, F_SEAL_SHRINK), 0);
  const UniqueFd garbage = memfd_with(std::string(4096, '\x7f'));
  const UniqueFd cut = memfd_with(before.substr(0, before.size() / 2));
  UniqueFd terabyte = memfd_with(before);
  ASSERT_EQ(::ftruncate(terabyte.get(), off_t{1} << 40), 0);
  // A state with the gate one column short, and one without fc2's weight.
  auto written = [&](bool drop_fc2, int64_t gate_columns) {
    const std::vector<float> gate(static_cast<size_t>(4 * gate_columns), 0.5f), fc(4 * 32 * 16, 0.25f),
        b1(4 * 32, 0.f), b2(4 * 16, 0.f);
    std::vector<SafetensorsEntry> entries = {{"gates.0.wg.weight", DType::kF32, {4, gate_columns}, gate.data()},
                                             {"experts.batched_fc1_w", DType::kF32, {4, 32, 16}, fc.data()},
                                             {"experts.batched_fc1_bias", DType::kF32, {4, 32}, b1.data()},
                                             {"experts.batched_fc2_bias", DType::kF32, {4, 16}, b2.data()}};
    if (!drop_fc2) entries.push_back({"experts.batched_fc2_w", DType::kF32, {4, 32, 16}, fc.data()});
    SharedMemory m = export_receiver(1 << 20);
    const Result<uint64_t> n = write_safetensors_into(m.fd(), "test file", entries, {{"tuteld.step", "7"}});
    EXPECT_TRUE(n.ok()) << n.status();
    return memfd_with(std::string(reinterpret_cast<const char*>(m.data()), n.ok() ? *n : 0));
  };
  const UniqueFd misshaped = written(false, 15), missing = written(true, 16), whole = written(false, 16);
  // The well-formed file on disk: a network or FUSE file could block the daemon for good.
  const std::string disk_path = daemon_->dir() + "/state.safetensors";
  {
    std::ofstream disk(disk_path, std::ios::binary);
    std::string bytes(static_cast<size_t>(::lseek(whole.get(), 0, SEEK_END)), '\0');
    ASSERT_EQ(::pread(whole.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    disk << bytes;
  }
  const UniqueFd on_disk(::open(disk_path.c_str(), O_RDONLY | O_CLOEXEC));

  const std::tuple<ipc::FrameType, nlohmann::json, std::vector<int>, StatusCode, const char*> bad[] = {
      {ipc::FrameType::kExportState, {{"handle", h}}, {}, StatusCode::kInvalidArgument, "needs one descriptor"},
      {ipc::FrameType::kExportState, {{"handle", h}}, {good.fd(), good.fd()}, StatusCode::kInvalidArgument, "not 2"},
      {ipc::FrameType::kExportState, {{"handle", h}}, {pipe_write.get()}, StatusCode::kInvalidArgument, "not a memfd"},
      {ipc::FrameType::kExportState, {{"handle", h}}, {unsealed.get()}, StatusCode::kInvalidArgument, "sealed against shrinking"},
      {ipc::FrameType::kExportState, {{"handle", h}}, {sparse.get()}, StatusCode::kInvalidArgument, "has a hole at byte 0"},
      {ipc::FrameType::kExportState, {{"handle", h}}, {small.fd()}, StatusCode::kInvalidArgument, "more than the"},
      {ipc::FrameType::kExportState, {{"handle", 987654}}, {good.fd()}, StatusCode::kNotFound, "987654"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {}, StatusCode::kInvalidArgument, "needs one descriptor"},
      {ipc::FrameType::kImportState, {{"handle", "1"}}, {whole.get()}, StatusCode::kInvalidArgument, "'handle'"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {pipe_read.get()}, StatusCode::kInvalidArgument, "not a memfd"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {dir.get()}, StatusCode::kInvalidArgument, "not a memfd"},
      // (Where /tmp is tmpfs the "disk" file is a memory file: a pipe stands in for it.)
      {ipc::FrameType::kImportState, {{"handle", h}},
       {check_memory_file(on_disk.get(), "").ok() ? pipe_read.get() : on_disk.get()},
       StatusCode::kInvalidArgument, "not a memfd"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {garbage.get()}, StatusCode::kCorruption, "header length"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {cut.get()}, StatusCode::kCorruption, "truncated"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {terabyte.get()}, StatusCode::kInvalidArgument, "where load takes it"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {misshaped.get()}, StatusCode::kInvalidArgument, "gates.0.wg.weight"},
      {ipc::FrameType::kImportState, {{"handle", h}}, {missing.get()}, StatusCode::kNotFound, "experts.batched_fc2_w"},
  };
  for (const auto& [type, body, fds, code, needle] : bad) {
    SCOPED_TRACE(std::string(ipc::frame_type_name(type)) + " " + body.dump() + " with " + std::to_string(fds.size()) +
                 " descriptors, expecting '" + needle + "'");
    auto r = s.call(type, body, ipc::FrameType::kOk, 10s, fds);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), code) << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status();
    EXPECT_EQ(export_state(), before) << "a refused request changed the layer";
  }
  // A header longer than any this layer's file can have (its names and metadata, with room for
  // another layer's) is refused before it is parsed: a JSON tree takes many times its text (a
  // 100 MiB header of empty objects once took 4 GiB). This one is within the bound on the whole
  // file, which is the layer's tensors and that header bound.
  {
    const size_t header_bytes = (size_t{1} << 20) + 2 * 65536 + 4096 + 256 * 3 * 5 + 6 * 4096 + 10240;
    std::string header = "{\"__metadata__\":{\"pad\":\"";
    header += std::string(header_bytes - header.size() - 4, 'x') + "\"}}";
    std::string file(8, '\0');
    const uint64_t n = header.size();
    std::memcpy(file.data(), &n, 8);
    const UniqueFd long_header = memfd_with(file + header);
    auto r = s.call(ipc::FrameType::kImportState, {{"handle", h}}, ipc::FrameType::kOk, 10s, {long_header.get()});
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_NE(r.status().message().find("its reader takes"), std::string_view::npos) << r.status();
    EXPECT_EQ(export_state(), before);
  }
  // Sealed against writing, the daemon maps a file rather than copying it: the same checks.
  auto sealed_copy = [&](int from) {
    std::string bytes(static_cast<size_t>(::lseek(from, 0, SEEK_END)), '\0');
    EXPECT_EQ(::pread(from, bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    UniqueFd fd = memfd_with(bytes);
    EXPECT_EQ(::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE), 0);
    return fd;
  };
  for (const auto& [fd, code, needle] :
       {std::tuple{sealed_copy(garbage.get()), StatusCode::kCorruption, "header length"},
        std::tuple{sealed_copy(misshaped.get()), StatusCode::kInvalidArgument, "gates.0.wg.weight"},
        std::tuple{sealed_copy(missing.get()), StatusCode::kNotFound, "experts.batched_fc2_w"}}) {
    auto r = s.call(ipc::FrameType::kImportState, {{"handle", h}}, ipc::FrameType::kOk, 10s, {fd.get()});
    EXPECT_EQ(r.status().code(), code) << r.status();
    EXPECT_NE(r.status().message().find(needle), std::string_view::npos) << r.status();
    EXPECT_EQ(export_state(), before) << "a refused sealed file changed the layer";
  }
  // Sealed but sparse (the header written, the tensors' bytes holes): read, not mapped, since
  // a read through the mapping would allocate every page at the daemon's charge. pread reads
  // the holes as zeros and allocates nothing.
  {
    std::string bytes(static_cast<size_t>(::lseek(whole.get(), 0, SEEK_END)), '\0');
    ASSERT_EQ(::pread(whole.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    uint64_t header = 0;
    std::memcpy(&header, bytes.data(), 8);
    UniqueFd sparse_state = memfd_with(bytes.substr(0, 8 + header));
    ASSERT_EQ(::ftruncate(sparse_state.get(), static_cast<off_t>(bytes.size() + (1 << 20))), 0);
    ASSERT_EQ(::fcntl(sparse_state.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE), 0);
    struct stat st {};
    ASSERT_EQ(::fstat(sparse_state.get(), &st), 0);
    const blkcnt_t blocks = st.st_blocks;
    auto r = s.call(ipc::FrameType::kImportState, {{"handle", h}}, ipc::FrameType::kOk, 10s, {sparse_state.get()});
    EXPECT_TRUE(r.ok()) << r.status();  // zeros are a layer's state too
    ASSERT_EQ(::fstat(sparse_state.get(), &st), 0);
    EXPECT_EQ(st.st_blocks, blocks) << "the daemon allocated pages of the client's memfd";
  }
  // The well-formed file is taken, and the export says so.
  auto taken = s.call(ipc::FrameType::kImportState, {{"handle", h}}, ipc::FrameType::kOk, 10s, {whole.get()});
  ASSERT_TRUE(taken.ok()) << taken.status();
  auto after = SafetensorsFile::read(memfd_with(export_state()).get(), "after", 1 << 20);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_EQ(static_cast<const float*>(after->find("gates.0.wg.weight")->data)[63], 0.5f);
  // It carries no optimizer state: the optimizer starts afresh, its step (7 in the file) too.
  EXPECT_EQ(after->metadata().at("tuteld.step"), "0");
  expect_daemon_serves();
}

// Memory the daemon lends a client goes back when the client lets go, whoever keeps the
// descriptors: a client that hung up holding its arena's and a region's memfds, or unmapped a
// region keeping its memfd, held the daemon's pages for good (and could collect them by
// reconnecting: 12 arenas of 32 MiB were 384 MiB, counted against no tenant). A session the
// daemon closes itself (a malformed frame here) keeps its pages as they were while its client
// holds the connection: it may still be reading its last results (punched then, a result read
// back as zeros). It keeps its place under max_sessions meanwhile, and its pages go once its
// client closes the connection (else provoking closes collected the memory instead).
TEST_F(ProtocolAbuse, LentMemoryGoesBackOnceTheClientLetsGoAndNotBefore) {
  auto blocks = [](int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? static_cast<int64_t>(st.st_blocks) : int64_t{-1};
  };
  auto map_region = [](RawSession& s) {
    EXPECT_TRUE(s.send(ipc::FrameType::kMapRegion, {{"rank", 0}, {"bytes", 1 << 20}}).ok());
    auto reply = s.receive();
    EXPECT_TRUE(reply.ok()) << reply.status();
    if (!reply.ok() || reply->fds.size() != 1) return std::make_pair(UniqueFd(), uint32_t{0});
    auto body = ipc::reply_body(*reply, ipc::FrameType::kOk);
    EXPECT_TRUE(body.ok()) << body.status();
    return std::make_pair(std::move(reply->fds[0]), body.ok() ? (*body)["region"].get<uint32_t>() : 0u);
  };
  {  // The client hangs up, keeping both descriptors.
    RawSession s(daemon_->client_socket());
    ASSERT_TRUE(s.hello().ok());
    const UniqueFd arena(::dup(s.arena().fd()));
    auto [region, id] = map_region(s);
    ASSERT_TRUE(region.valid());
    ASSERT_GT(blocks(arena.get()), 0);
    ASSERT_GT(blocks(region.get()), 0);
    ::shutdown(s.fd(), SHUT_RDWR);
    ASSERT_EQ(await_sessions(0), 0);
    EXPECT_EQ(blocks(arena.get()), 0) << "the arena's pages outlived the session";
    EXPECT_EQ(blocks(region.get()), 0) << "the region's pages outlived the session";
  }
  {  // The client unmaps a region, keeping its descriptor; the session goes on.
    RawSession s(daemon_->client_socket());
    ASSERT_TRUE(s.hello().ok());
    auto [region, id] = map_region(s);
    ASSERT_TRUE(region.valid());
    ASSERT_GT(blocks(region.get()), 0);
    ASSERT_TRUE(s.call(ipc::FrameType::kUnmapRegion, {{"region", id}}, ipc::FrameType::kOk).ok());
    for (int i = 0; i < 400 && blocks(region.get()) != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_EQ(blocks(region.get()), 0) << "an unmapped region's pages outlived it";
    expect_daemon_serves();
  }
  {  // The daemon closes the session: what the client holds stays as it was.
    RawSession s(daemon_->client_socket());
    ASSERT_TRUE(s.hello().ok());
    auto [region, id] = map_region(s);
    ASSERT_TRUE(region.valid());
    std::memset(s.arena().data(), 0x3c, 4096);
    const char garbage[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.send_bytes(garbage, sizeof(garbage) - 1);
    ASSERT_EQ(await_sessions(0), 0);
    EXPECT_GT(blocks(s.arena().fd()), 0) << "a session the daemon closed had its client's arena punched";
    EXPECT_GT(blocks(region.get()), 0) << "a session the daemon closed had its client's region punched";
    EXPECT_EQ(s.arena().data()[4095], 0x3c);
    // The client reads the end of the stream: the daemon has shut down its side.
    char byte = 0;
    ssize_t n = 0;
    while ((n = ::recv(s.fd(), &byte, 1, 0)) > 0) {
    }
    EXPECT_EQ(n, 0) << "the daemon's side of a session it closed is still open";
    RawSession admin(daemon_->admin_socket());
    auto closing_sessions = [&] {
      auto tenants = admin.call(ipc::FrameType::kAdminTenants, nlohmann::json::object(), ipc::FrameType::kOk);
      EXPECT_TRUE(tenants.ok()) << tenants.status();
      return tenants.ok() ? (*tenants)["tenants"][0]["closing_sessions"].get<int64_t>() : int64_t{-1};
    };
    EXPECT_EQ(closing_sessions(), 1) << "a session the daemon closed left max_sessions before its client let go";
    EXPECT_GT(blocks(s.arena().fd()), 0);
    // The client closes the connection, keeping the descriptors: the pages go, and the session.
    const UniqueFd arena(::dup(s.arena().fd()));
    ::shutdown(s.fd(), SHUT_RDWR);
    int64_t closing = 1;
    for (int i = 0; i < 400 && closing != 0; ++i) {
      closing = closing_sessions();
      if (closing != 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    EXPECT_EQ(closing, 0) << "a session the daemon closed outlived its client's connection";
    EXPECT_EQ(blocks(arena.get()), 0) << "the arena's pages outlived the client's connection";
    EXPECT_EQ(blocks(region.get()), 0) << "the region's pages outlived the client's connection";
  }
  expect_daemon_serves();
}

// A daemon that stops waits for no client of a session it closed: the client holding the
// connection (and what it was lent) does not keep tuteld from exiting and checkpointing.
TEST_F(ProtocolAbuse, AStoppingDaemonWaitsForNoClientOfASessionItClosed) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto layer = s.call(ipc::FrameType::kCreateLayer, {{"spec", kSpec}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::memset(s.arena().data(), 0x3c, 4096);
  const char garbage[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  s.send_bytes(garbage, sizeof(garbage) - 1);
  ASSERT_EQ(await_sessions(0), 0);
  // stop() sends SIGTERM and kills the daemon (137) if it has not exited within 30 s.
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  EXPECT_TRUE(std::filesystem::exists(daemon_->dir() + "/state/default/moe.safetensors")) << daemon_->log();
  EXPECT_EQ(s.arena().data()[4095], 0x3c) << "the client's last results went with the daemon";
  daemon_.reset();
}

// Signals that come while the daemon shuts down change nothing: it drains and checkpoints every
// layer once, and exits 0 (a second SIGTERM or a SIGINT killed it between two layers'
// checkpoints, leaving the rest unwritten and a temporary file behind). A start removes exit
// checkpoints a killed run never finished.
TEST_F(ProtocolAbuse, SignalsDuringShutdownLoseNoCheckpoint) {
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.extra_server = "shutdown_grace_ms = 1500\n"}));
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);  // the shutdown waits up to its grace
  ASSERT_EQ(::kill(daemon_->pid(), SIGTERM), 0);
  for (int i = 0; i < 400 && daemon_->log().find("shutting down") == std::string::npos; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_EQ(::kill(daemon_->pid(), SIGTERM), 0);
  ASSERT_EQ(::kill(daemon_->pid(), SIGINT), 0);
  EXPECT_EQ(daemon_->wait_exit(std::chrono::seconds(30)), 0) << daemon_->log();
  EXPECT_NE(daemon_->log().find("already shutting down"), std::string::npos) << daemon_->log();
  (void)held.get();
  const std::string state = daemon_->dir() + "/state/default/";
  for (const char* layer : {"moe_r0", "moe_r1"})
    EXPECT_TRUE(std::filesystem::exists(state + layer + ".safetensors")) << layer << "\n" << daemon_->log();
  const std::string unfinished = state + ".moe_r0.safetensors.tmp-0123456789abcdef";
  { std::ofstream(unfinished) << "half a checkpoint"; }
  ASSERT_TRUE(daemon_->start());
  EXPECT_FALSE(std::filesystem::exists(unfinished)) << daemon_->log();
  EXPECT_TRUE(std::filesystem::exists(state + "moe_r0.safetensors"));
}

// A client that dies with many training forwards pending leaves one plan of the layer cached,
// not one per forward: each forward held an instance of its own, which stayed cached (and
// charged to the tenant) after the forwards were dropped, until the quota ran short.
TEST_F(ProtocolAbuse, AClientGoneWithForwardsPendingLeavesOnePlanPerKey) {
  RawSession owner(daemon_->client_socket());
  ASSERT_TRUE(owner.hello().ok());
  auto handle = owner.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  RawSession admin(daemon_->admin_socket());
  auto moe = [&] {
    auto layers = admin.call(ipc::FrameType::kAdminLayers, nlohmann::json::object(), ipc::FrameType::kOk);
    EXPECT_TRUE(layers.ok()) << layers.status();
    return layers.ok() ? (*layers)["layers"][0] : nlohmann::json();
  };
  {
    RawSession dying(daemon_->client_socket());
    ASSERT_TRUE(dying.hello().ok());
    for (uint64_t sequence = 1; sequence <= 5; ++sequence) {
      const auto c = forward8(dying, *handle, sequence);
      ASSERT_TRUE(c.has_value());
      ASSERT_EQ(c->status_code, 0) << c->message;
    }
    const nlohmann::json layer = moe();
    ASSERT_EQ(layer["pending_backwards"].get<int64_t>(), 5) << layer.dump();
    ASSERT_EQ(layer["plans"]["plans"].get<int64_t>(), 5) << layer.dump();
    ::shutdown(dying.fd(), SHUT_RDWR);
  }
  nlohmann::json layer;
  for (int i = 0; i < 400; ++i) {
    layer = moe();
    if (layer["pending_backwards"] == 0 && layer["plans"]["plans"] == 1) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(layer["pending_backwards"].get<int64_t>(), 0) << layer.dump();
  EXPECT_EQ(layer["plans"]["plans"].get<int64_t>(), 1) << layer.dump();
  EXPECT_EQ(layer["plans"]["held"].get<int64_t>(), 0) << layer.dump();
  // The layer serves on, from the plan kept.
  const auto c = forward8(owner, *handle);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, 0) << c->message;
}

// SIGHUP neither stops nor kills tuteld (UCX takes it as its debug signal): a terminal that
// closes, or nohup's own, leaves the daemon serving.
TEST_F(ProtocolAbuse, SighupLeavesTheDaemonServing) {
  ASSERT_EQ(::kill(daemon_->pid(), SIGHUP), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  EXPECT_TRUE(daemon_->alive()) << daemon_->log();
  expect_daemon_serves();
  EXPECT_EQ(daemon_->log().find("shutting down"), std::string::npos) << daemon_->log();
}

TEST_F(ProtocolAbuse, RequestsBeforeHelloAndHelloTwice) {
  RawSession s(daemon_->client_socket());
  auto r = s.call(ipc::FrameType::kCreateLayer, {{"spec", kSpec}}, ipc::FrameType::kLayerInfo);
  EXPECT_NE(r.status().message().find("hello first"), std::string_view::npos) << r.status();
  ASSERT_TRUE(s.hello().ok());
  auto again = s.call(ipc::FrameType::kHello, {{"client", "raw"}}, ipc::FrameType::kHelloReply);
  EXPECT_NE(again.status().message().find("already"), std::string_view::npos) << again.status();
  auto admin = s.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
  EXPECT_NE(admin.status().message().find("admin"), std::string_view::npos) << admin.status();
}

TEST_F(ProtocolAbuse, BadSpecsAreRefusedWithTheKey) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto r = s.create_layer("name = \"x\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 9\ninit_seed = 1\n");
  EXPECT_NE(r.status().message().find("k"), std::string_view::npos) << r.status();
  r = s.create_layer("name = \"x\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nbogus = 1\ninit_seed = 1\n");
  EXPECT_NE(r.status().message().find("bogus"), std::string_view::npos) << r.status();
  r = s.create_layer("this is not toml = = =");
  EXPECT_FALSE(r.ok());
  auto missing = s.call(ipc::FrameType::kCreateLayer, {{"nospec", 1}}, ipc::FrameType::kLayerInfo);
  EXPECT_NE(missing.status().message().find("spec"), std::string_view::npos) << missing.status();
  // One dotted key of 150 000 parts (300 KB, under the frame limit) overflowed the parser's stack
  // and killed the daemon (SIGSEGV); one of 30 000 (under the spec's length bound) as well.
  for (const size_t parts : {30000, 150000}) {
    std::string key = "a";
    for (size_t i = 1; i < parts; ++i) key += ".a";
    r = s.create_layer(std::string(kSpec) + key + " = 1\n");
    EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
    EXPECT_TRUE(daemon_->alive()) << daemon_->log();
  }
  // Escaping the tenant's checkpoint directory is refused.
  ASSERT_TRUE(s.create_layer(kSpec).ok());
  auto h = s.call(ipc::FrameType::kAttachLayer, {{"name", "moe"}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(h.ok());
  auto save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", "../../escape.safetensors"}},
                     ipc::FrameType::kOk);
  EXPECT_EQ(save.status().code(), StatusCode::kPermissionDenied) << save.status();
  save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", "/tmp/abs.safetensors"}}, ipc::FrameType::kOk);
  EXPECT_EQ(save.status().code(), StatusCode::kInvalidArgument) << save.status();
  EXPECT_NE(save.status().message().find("must be relative"), std::string_view::npos) << save.status();
  save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", ""}}, ipc::FrameType::kOk);
  EXPECT_EQ(save.status().code(), StatusCode::kInvalidArgument) << save.status();
  EXPECT_NE(save.status().message().find("the path is empty"), std::string_view::npos) << save.status();
  // A path that names a directory is refused before the save makes it (it made "dir/" and then
  // failed on it, the directory left behind).
  for (const char* directory : {"dir/", "x/y/.", "z/."}) {
    save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", directory}}, ipc::FrameType::kOk);
    EXPECT_EQ(save.status().code(), StatusCode::kInvalidArgument) << directory << ": " << save.status();
    EXPECT_NE(save.status().message().find("names a directory"), std::string_view::npos) << save.status();
  }
  for (const char* made : {"dir", "x", "z"})
    EXPECT_FALSE(std::filesystem::exists(daemon_->dir() + "/state/default/checkpoints/" + made)) << made;
  // A save creates the directories its path names: a few levels, not thousands of inodes.
  std::string deep;
  for (int i = 0; i < 2000; ++i) deep += "a/";
  save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", deep + "deep.safetensors"}},
                ipc::FrameType::kOk);
  EXPECT_EQ(save.status().code(), StatusCode::kInvalidArgument) << save.status();
  EXPECT_NE(save.status().message().find("2001 parts; at most 8"), std::string_view::npos) << save.status();
  EXPECT_FALSE(std::filesystem::exists(daemon_->dir() + "/state/default/checkpoints/a"));
  save = s.call(ipc::FrameType::kSave, {{"handle", (*h)["handle"]}, {"path", "a/b/c/d/e/f/g/ok.safetensors"}},
                ipc::FrameType::kOk);
  EXPECT_TRUE(save.ok()) << save.status();
  // Control characters: a NUL would cut the path short in the file system's calls, a newline
  // would forge a line of the daemon's log. Refused, and echoed escaped; nothing is written.
  for (const std::string& path : {std::string("a\0/../../../escape.safetensors", 31), std::string("x\nforged.safetensors")}) {
    for (const ipc::FrameType type : {ipc::FrameType::kSave, ipc::FrameType::kLoad}) {
      auto r = s.call(type, {{"handle", (*h)["handle"]}, {"path", path}}, ipc::FrameType::kOk);
      EXPECT_EQ(r.status().code(), StatusCode::kInvalidArgument) << r.status();
      EXPECT_NE(r.status().message().find("control characters"), std::string_view::npos) << r.status();
      EXPECT_EQ(r.status().message().find('\n'), std::string_view::npos) << r.status();
    }
  }
  std::error_code ec;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(daemon_->dir(), ec))
    EXPECT_EQ(entry.path().filename().string().find("escape"), std::string::npos) << entry.path();
}

TEST_F(ProtocolAbuse, DescriptorsAreValidatedBeforeAnyByteIsRead) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  const ipc::ArenaLayout& l = s.arena().layout();
  const int64_t S = 8;
  auto forward = [&](uint64_t in_off, uint64_t in_bytes, uint64_t out_off, uint64_t out_bytes) {
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kForward);
    d.layer_handle = *handle;
    d.tokens = S;
    d.input_offset = in_off;
    d.input_bytes = in_bytes;
    d.output_offset = out_off;
    d.output_bytes = out_bytes;
    return s.submit(d);
  };
  const uint64_t bytes = S * 16 * 4, x = l.data_offset, y = l.data_offset + bytes;
  struct Bad {
    const char* what;
    uint64_t in_off, in_bytes, out_off, out_bytes;
    const char* needle;
  } cases[] = {
      {"input before the data region", 0, bytes, y, bytes, "x"},
      {"output past the arena", x, bytes, l.arena_bytes - 4, bytes, "y"},
      {"offset overflow", UINT64_MAX - 8, bytes, y, bytes, "x"},
      {"misaligned", x + 2, bytes, y, bytes, "x"},
      {"wrong input size", x, bytes - 4, y, bytes, "bytes"},
      {"overlap", x, bytes, x + 4, bytes, "overlap"},
  };
  for (const Bad& b : cases) {
    auto c = forward(b.in_off, b.in_bytes, b.out_off, b.out_bytes);
    ASSERT_TRUE(c.has_value()) << b.what;
    EXPECT_NE(c->status_code, 0) << b.what;
    EXPECT_NE(std::string(c->message).find(b.needle), std::string::npos) << b.what << ": " << c->message;
  }
  ipc::RequestDescriptor d{};
  d.op = 77;
  auto c = s.submit(d);
  ASSERT_TRUE(c.has_value());
  EXPECT_NE(std::string(c->message).find("unknown op"), std::string::npos) << c->message;
  d.op = static_cast<uint32_t>(ipc::Op::kForward);
  d.layer_handle = *handle + 12345;
  c = s.submit(d);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kNotFound)) << c->message;
  // Backward without its forward.
  d.op = static_cast<uint32_t>(ipc::Op::kBackward);
  d.layer_handle = *handle;
  d.tokens = S;
  d.sequence = 42;
  d.input_offset = x;
  d.input_bytes = bytes;
  d.output_offset = y;
  d.output_bytes = bytes;
  c = s.submit(d);
  ASSERT_TRUE(c.has_value());
  EXPECT_NE(std::string(c->message).find("sequence 42"), std::string::npos) << c->message;
  // And a good request on the same session still works.
  c = forward(x, bytes, y, bytes);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, 0) << c->message;
  EXPECT_GT(c->capacity, 0);
}

// A TCP connection to 127.0.0.1:`port`, or -1.
int connect_loopback(int port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Everything the peer sends until it closes, or until nothing came for `timeout`.
std::string read_until_closed(int fd, std::chrono::seconds timeout, bool* closed) {
  timeval tv{static_cast<time_t>(timeout.count()), 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string got;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fd, buf, sizeof(buf))) > 0) got.append(buf, static_cast<size_t>(n));
  *closed = n == 0 || (n < 0 && errno == ECONNRESET);
  return got;
}

// Any local process may connect to the metrics port. Connections that never send a request (or
// never finish one) are closed: the oldest when too many are open, every one after a deadline,
// and all at shutdown, which would otherwise never end (the loop waits for its last handle).
TEST_F(ProtocolAbuse, IdleMetricsConnectionsHoldNeitherTheEndpointNorTheShutdown) {
  RawSession admin(daemon_->admin_socket());
  auto status = admin.call(ipc::FrameType::kAdminStatus, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(status.ok()) << status.status();
  const int port = (*status)["metrics_port"];
  ASSERT_GT(port, 0);
  constexpr int kIdle = 40;  // more than the endpoint keeps open
  std::vector<int> idle;
  for (int i = 0; i < kIdle; ++i) {
    const int fd = connect_loopback(port);
    ASSERT_GE(fd, 0);
    if (i % 2 == 1) {
      ASSERT_EQ(::write(fd, "GET /metr", 9), 9);  // half a request head
    }
    idle.push_back(fd);
  }
  // Still served, and the oldest idle connection was closed to make room.
  const int fd = connect_loopback(port);
  ASSERT_GE(fd, 0);
  const std::string req = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
  ASSERT_EQ(::write(fd, req.data(), req.size()), static_cast<ssize_t>(req.size()));
  bool closed = false;
  EXPECT_NE(read_until_closed(fd, std::chrono::seconds(30), &closed).find("200 OK"), std::string::npos);
  EXPECT_TRUE(closed);
  ::close(fd);
  EXPECT_EQ(read_until_closed(idle.front(), std::chrono::seconds(30), &closed), "");
  EXPECT_TRUE(closed) << "the oldest idle connection should have been closed";
  // The newest one is closed at its deadline (a few seconds), having received nothing.
  EXPECT_EQ(read_until_closed(idle.back(), std::chrono::seconds(30), &closed), "");
  EXPECT_TRUE(closed) << "an idle connection should be closed at its deadline";
  for (int f : idle) ::close(f);

  // A connection open at shutdown does not keep the daemon running.
  const int last = connect_loopback(port);
  ASSERT_GE(last, 0);
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  daemon_.reset();
  ::close(last);
}

// A client may create a group layer whose peers never come, with a bootstrap timeout of minutes.
// Its creation runs on the daemon's thread pool, which a shutdown waits for: the shutdown cancels
// the bootstrap instead of waiting it out.
TEST_F(ProtocolAbuse, AShutdownCancelsAGroupLayerWaitingForPeersThatNeverCome) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  const std::string spec = std::string(kSpec) + "[group]\ncoordinator = \"127.0.0.1:" + std::to_string(free_port()) +
                           "\"\nsize = 2\nrank = 0\nbootstrap_timeout_ms = 600000\n";
  ASSERT_TRUE(s.send(ipc::FrameType::kCreateLayer, {{"spec", spec}}).ok());
  // Until the bootstrap listens and waits for rank 1 (an admin request answers meanwhile).
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  daemon_.reset();
}

// A group layer's collective waiting for a peer rank that stopped calling (here: never sends
// its forward) holds its request up to collective_timeout_ms (two minutes here). A shutdown
// waits shutdown_grace_ms for it, then the collective gives up: the daemon exits and writes its
// checkpoints instead of being killed at the end of its stop timeout with them unwritten.
TEST_F(ProtocolAbuse, AShutdownGivesUpACollectiveWhosePeerStoppedCalling) {
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.extra_server = "shutdown_grace_ms = 200\n"}));
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);
  ASSERT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready);

  // stop() sends SIGTERM and kills the daemon (137) if it has not exited within 30 s.
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  const auto failed = held.get();
  ASSERT_TRUE(failed.has_value());
  EXPECT_NE(failed->status_code, 0);
  EXPECT_NE(std::string(failed->message).find("shutting down"), std::string::npos) << failed->message;
  EXPECT_NE(daemon_->log().find("started from now on give up"), std::string::npos) << daemon_->log();
  for (const char* layer : {"moe_r0", "moe_r1"})
    EXPECT_TRUE(std::filesystem::exists(daemon_->dir() + "/state/default/" + layer + ".safetensors")) << layer;
  daemon_.reset();
}

// A session of the same tenant that closes while one of the tenant's group layers is held for a
// whole collective does not wait for it: its forward pending there is dropped by the layer once
// its collective is over. (The tear-down took the layer's lock and waited, a
// pool thread and a max_sessions place held per closing session.)
TEST_F(ProtocolAbuse, AClosingSessionDoesNotWaitForItsOwnTenantsBusyGroupLayer) {
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  {
    RawSession closing(daemon_->client_socket());
    ASSERT_TRUE(closing.hello().ok());
    // A training forward of this session on rank 0's layer (with rank 1's), left pending.
    auto pending = hold_group_forward(closing, handles[0], /*training_sequence=*/1);
    ASSERT_NO_FATAL_FAILURE(complete_group_forward(pending, rank1, handles[1], 1));
    auto held = hold_group_forward(rank0, handles[0], 2);
    ::shutdown(closing.fd(), SHUT_RDWR);  // hangs up while rank 0's layer is held
    EXPECT_EQ(await_sessions(2), 2) << "the closed session is still there";
    EXPECT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready)
        << "rank 0's forward ended before the closed session went";
    ASSERT_NO_FATAL_FAILURE(complete_group_forward(held, rank1, handles[1], 2));
  }
  // The closed session's pending forward went once the layer was free: rank 0's layer keeps only
  // rank 0's own, rank 1's both of rank 1's.
  RawSession admin(daemon_->admin_socket());
  auto layers = admin.call(ipc::FrameType::kAdminLayers, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(layers.ok()) << layers.status();
  std::map<std::string, int64_t> pending;
  for (const auto& l : (*layers)["layers"]) pending[l["name"].get<std::string>()] = l["pending_backwards"].get<int64_t>();
  EXPECT_EQ(pending["moe_r0"], 1) << layers->dump();
  EXPECT_EQ(pending["moe_r1"], 2) << layers->dump();
}

// A session that hangs up while its request waits (here a group layer's forward whose peer
// rank has not come) is closing until that request has finished, holding its worker and arena
// meanwhile: it keeps its place under max_sessions until then, so a client cannot stack such
// sessions up by reconnecting.
TEST_F(ProtocolAbuse, AClosingSessionKeepsItsPlaceUntilItsRequestHasFinished) {
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.default_max_sessions = 2}));
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);
  ASSERT_EQ(::shutdown(rank0.fd(), SHUT_RDWR), 0);
  // Until the daemon has seen the hang-up: the session is closing, and left the listing.
  RawSession admin(daemon_->admin_socket());
  size_t listed = 2;
  for (int i = 0; i < 400 && listed != 1; ++i) {
    auto sessions = admin.call(ipc::FrameType::kAdminSessions, nlohmann::json::object(), ipc::FrameType::kOk);
    ASSERT_TRUE(sessions.ok()) << sessions.status();
    listed = (*sessions)["sessions"].size();
    if (listed != 1) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_EQ(listed, 1u);
  ASSERT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready);
  auto tenants = admin.call(ipc::FrameType::kAdminTenants, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(tenants.ok()) << tenants.status();
  EXPECT_EQ((*tenants)["tenants"][0]["sessions"].get<int64_t>(), 1) << tenants->dump();
  EXPECT_EQ((*tenants)["tenants"][0]["closing_sessions"].get<int64_t>(), 1) << tenants->dump();
  {
    RawSession third(daemon_->client_socket());
    const Status refused = third.hello();
    EXPECT_EQ(refused.code(), StatusCode::kResourceExhausted) << refused;
    EXPECT_NE(refused.message().find("1 of them closing"), std::string_view::npos) << refused;
  }
  // Rank 1 comes: the held forward finishes, the closing session goes, and its place is free.
  const auto second = forward8(rank1, handles[1]);
  ASSERT_TRUE(second.has_value());
  EXPECT_EQ(second->status_code, 0) << second->message;
  held.wait();
  Status admitted = Status::Unavailable("not tried");
  for (int i = 0; i < 400 && !admitted.ok(); ++i) {
    RawSession again(daemon_->client_socket());
    admitted = again.hello();
    if (!admitted.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(admitted.ok()) << admitted;
}

// Control frames for one layer wait for each other in the daemon, not on its thread pool: many
// sessions' frames on a group layer held by a collective (its peer rank has not come yet) take
// one pool thread between them, and every other request still runs meanwhile. (They took a
// thread each: six of them held the whole pool of four, and a hello, which needs the pool for
// its arena, waited for the collective.)
TEST_F(ProtocolAbuse, FramesQueuedOnABusyLayerHoldOnePoolThreadBetweenThem) {
  ASSERT_NO_FATAL_FAILURE(restart_with_pool_threads(4));
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);
  std::vector<std::unique_ptr<RawSession>> queued;
  for (int i = 0; i < 6; ++i) {
    queued.push_back(std::make_unique<RawSession>(daemon_->client_socket()));
    ASSERT_TRUE(queued.back()->hello().ok());
    ASSERT_TRUE(queued.back()->send(ipc::FrameType::kZeroGrad, {{"handle", handles[0]}}).ok());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // all of them in the daemon
  RawSession other(daemon_->client_socket());
  ASSERT_TRUE(other.hello().ok());
  auto attach = other.call(ipc::FrameType::kAttachLayer, {{"name", "moe_r1"}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(attach.ok()) << attach.status();
  EXPECT_EQ((*attach)["handle"].get<uint64_t>(), handles[1]);
  ASSERT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready);

  // Rank 1 comes: the forward completes, then each queued frame in turn.
  ASSERT_NO_FATAL_FAILURE(complete_group_forward(held, rank1, handles[1]));
  for (auto& q : queued) {
    auto reply = q->receive(std::chrono::seconds(30));
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_TRUE(ipc::reply_body(*reply, ipc::FrameType::kOk).ok()) << reply->body;
  }
}

// Sessions that close while their worker waits (here forwards queued on a group layer held by
// a collective whose peer rank has not come) hold no pool thread meanwhile: the teardown goes on
// once each worker has exited. (Each close joined its worker on the pool: six of them held the
// whole pool of four until the collective ended, and every hello, which needs the pool for its
// arena, waited with them.)
TEST_F(ProtocolAbuse, ClosingSessionsWhoseWorkersWaitHoldNoPoolThread) {
  ASSERT_NO_FATAL_FAILURE(restart_with_pool_threads(4));
  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);
  std::vector<std::unique_ptr<RawSession>> waiting;
  for (int i = 0; i < 6; ++i) {
    waiting.push_back(std::make_unique<RawSession>(daemon_->client_socket()));
    ASSERT_TRUE(waiting.back()->hello().ok());
    // A forward on rank 0's layer: its worker waits for the layer's lock, behind the collective.
    const ipc::ArenaLayout& l = waiting.back()->arena().layout();
    ASSERT_TRUE(waiting.back()->push(data_request(l, ipc::Op::kForward, handles[0], 0, 8, 16)));
  }
  // Every worker has taken its forward (the held one and the six): only then do they hang up (a
  // worker that had not would exit without running its forward, which rank 1 then waits for).
  RawSession admin(daemon_->admin_socket());
  auto tenant = [&](const char* field) {
    auto tenants = admin.call(ipc::FrameType::kAdminTenants, nlohmann::json::object(), ipc::FrameType::kOk);
    EXPECT_TRUE(tenants.ok()) << tenants.status();
    return tenants.ok() ? (*tenants)["tenants"][0][field].get<int64_t>() : int64_t{-1};
  };
  int64_t inflight = 0;
  for (int i = 0; i < 400 && inflight != 7; ++i) {
    inflight = tenant("inflight");
    if (inflight != 7) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(inflight, 7);
  for (auto& w : waiting) ASSERT_EQ(::shutdown(w->fd(), SHUT_RDWR), 0);
  int64_t closing = 0;
  for (int i = 0; i < 400 && closing != 6; ++i) {
    closing = tenant("closing_sessions");
    if (closing != 6) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  ASSERT_EQ(closing, 6);
  // A hello needs the pool for its arena: it is answered while the collective still waits.
  RawSession other(daemon_->client_socket());
  ASSERT_TRUE(other.hello().ok());
  ASSERT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready);
  // Rank 1 comes: the held forward completes, then each closed session's in turn (a worker
  // finishes the request it has started), and their workers exit.
  ASSERT_NO_FATAL_FAILURE(complete_group_forward(held, rank1, handles[1]));
  for (size_t i = 0; i < waiting.size(); ++i) {
    const auto c = forward8(rank1, handles[1]);
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->status_code, 0) << c->message;
  }
  EXPECT_EQ(await_sessions(3), 3);
  for (int i = 0; i < 400 && closing != 0; ++i) {
    closing = tenant("closing_sessions");
    if (closing != 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(closing, 0);
  expect_daemon_serves();
}

// A client's saves are bounded by its tenant's max_checkpoint_bytes (state_dir holds every
// tenant's exit checkpoints too, so one tenant filling the disk costs the others): a save that
// does not fit is refused before anything is written, a save over an old file still fits, and a
// load creates no directory.
TEST_F(ProtocolAbuse, ClientSavesAreBoundedByTheTenantsDiskQuota) {
  // One checkpoint of kSpec (AdamW: values and two moments, 4352 floats each) is about 53 KB.
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.default_tenant_extra = "max_checkpoint_bytes = 100000\n"}));
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto handle = s.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto save = [&](const std::string& path) {
    return s.call(ipc::FrameType::kSave, {{"handle", *handle}, {"path", path}}, ipc::FrameType::kOk);
  };
  const std::string checkpoints = daemon_->dir() + "/state/default/checkpoints/";
  ASSERT_TRUE(save("first.safetensors").ok());
  auto refused = save("more/second.safetensors");
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("over its max_checkpoint_bytes 100000"), std::string_view::npos)
      << refused.status();
  EXPECT_FALSE(std::filesystem::exists(checkpoints + "more")) << "a refused save created its directory";
  // A name of the form of a save's temporary file (not counted against the quota) is refused.
  auto temp_like = save(".x.safetensors.tmp-0123456789abcdef");
  EXPECT_EQ(temp_like.status().code(), StatusCode::kInvalidArgument) << temp_like.status();
  // Over the old file: fits.
  EXPECT_TRUE(save("first.safetensors").ok());
  // A load of a file that is not there fails, and leaves no directory behind.
  auto load = s.call(ipc::FrameType::kLoad, {{"handle", *handle}, {"path", "no/such/dir/x.safetensors"}},
                     ipc::FrameType::kOk);
  EXPECT_FALSE(load.ok());
  EXPECT_FALSE(std::filesystem::exists(checkpoints + "no")) << "a load created directories";
  expect_daemon_serves();
}

// A group is bounded by the daemon's [server] limits, and a spec outside them is refused before
// anything listens, connects or waits: its timeouts by max_bootstrap_timeout_ms and
// max_collective_timeout_ms, its own coordinator's address by coordinator_ports (a privileged
// port, which a root daemon could bind for the client, by default) and coordinator_networks.
TEST_F(ProtocolAbuse, GroupSpecsOutsideTheDaemonsLimitsAreRefused) {
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{
      .extra_server = "max_bootstrap_timeout_ms = 20000\nmax_collective_timeout_ms = 10000\n"
                      "coordinator_networks = [\"127.0.0.2/32\"]\n"}));
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  const std::string in_network = "127.0.0.2:" + std::to_string(free_port());
  auto group = [](const std::string& coordinator) {
    return std::string(kSpec) + "[group]\ncoordinator = \"" + coordinator + "\"\nsize = 2\nrank = 0\n";
  };
  for (const std::string& coordinator : {std::string("127.0.0.2:80"), "127.0.0.1:" + std::to_string(free_port())}) {
    auto refused = s.create_layer(group(coordinator));
    EXPECT_EQ(refused.status().code(), StatusCode::kPermissionDenied) << refused.status();
    EXPECT_NE(refused.status().message().find("group.coordinator " + coordinator), std::string_view::npos)
        << refused.status();
  }
  for (const auto& [line, key, limit] :
       {std::tuple{"bootstrap_timeout_ms = 20001\n", "max_bootstrap_timeout_ms", "20000"},
        std::tuple{"collective_timeout_ms = 3600000\n", "max_collective_timeout_ms", "10000"}}) {
    auto refused = s.create_layer(group(in_network) + line);
    EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status();
    EXPECT_NE(refused.status().message().find(std::string(key) + " (" + limit + ")"), std::string_view::npos)
        << refused.status();
  }
  expect_daemon_serves();
}

// Each connected tenant has a share of the daemon's layer-creation slots reserved: one tenant's
// group layers waiting for peers that never come may go beyond its share only into slots no
// other connected tenant's reservation needs, so that tenant still creates its layers meanwhile
// (it was refused at once while the first held them all).
TEST_F(ProtocolAbuse, ATenantsGroupsWaitingForPeersLeaveOtherTenantsTheirShareOfCreations) {
  // 6 pool threads: 3 creations at once; 2 connected tenants, so 1 reserved for each and 1 for
  // either.
  ::setenv("UV_THREADPOOL_SIZE", "6", 1);
  restart_with_other_tenant();
  ::unsetenv("UV_THREADPOOL_SIZE");
  ASSERT_FALSE(HasFatalFailure());

  // The other tenant connects first (a child as uid 65534), then waits for its turn to create.
  int ready[2], go[2];
  ASSERT_EQ(::pipe(ready), 0);
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = fork_other_tenant([&](RawSession& other) {
    char c = 'r';
    if (::write(ready[1], &c, 1) != 1 || ::read(go[0], &c, 1) != 1) return 6;
    return other.create_layer(kSpec, std::chrono::seconds(3)).ok() ? 0 : 5;
  });
  ASSERT_GE(child, 0);
  char c = 0;
  ASSERT_EQ(::read(ready[0], &c, 1), 1);

  auto group = [](int i) {
    std::string spec(kSpec);
    spec.replace(spec.find("\"moe\""), 5, "\"moe_g" + std::to_string(i) + "\"");
    return spec + "[group]\ncoordinator = \"127.0.0.1:" + std::to_string(free_port()) +
           "\"\nsize = 2\nrank = 0\nbootstrap_timeout_ms = 4000\n";
  };
  RawSession waiting(daemon_->client_socket()), also_waiting(daemon_->client_socket()),
      again(daemon_->client_socket());
  ASSERT_TRUE(waiting.hello().ok());
  ASSERT_TRUE(also_waiting.hello().ok());
  ASSERT_TRUE(again.hello().ok());
  // Its share, then the slot that is nobody's reservation: both wait for their rank 1.
  ASSERT_TRUE(waiting.send(ipc::FrameType::kCreateLayer, {{"spec", group(1)}}).ok());
  ASSERT_TRUE(also_waiting.send(ipc::FrameType::kCreateLayer, {{"spec", group(2)}}).ok());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // on the pool, waiting
  // A third would take the other tenant's reservation: refused at once.
  auto refused = again.create_layer(kSpec, std::chrono::seconds(2));
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("tenant 'default' has 2 layer creations in progress"),
            std::string_view::npos)
      << refused.status();
  EXPECT_NE(refused.status().message().find("kept for the other connected tenants"), std::string_view::npos)
      << refused.status();

  // The other tenant creates its layer meanwhile.
  ASSERT_EQ(::write(go[1], &c, 1), 1);
  expect_child_succeeded(child);
  for (int fd : {ready[0], ready[1], go[0], go[1]}) ::close(fd);
  // The waiting groups fail on their own timeout, naming the rank that never came.
  for (RawSession* s : {&waiting, &also_waiting}) {
    auto reply = s->receive(std::chrono::seconds(10));
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->header.type, static_cast<uint16_t>(ipc::FrameType::kError));
    EXPECT_NE(reply->body.find("rank 1 never reached the coordinator"), std::string::npos) << reply->body;
  }
  // Their slots are back, and the other tenant has gone: this one may now take every slot, as
  // many local ranks of one group as there are slots.
  std::vector<std::unique_ptr<RawSession>> ranks;
  for (int i = 0; i < 3; ++i) {
    ranks.push_back(std::make_unique<RawSession>(daemon_->client_socket()));
    ASSERT_TRUE(ranks.back()->hello().ok());
    ASSERT_TRUE(ranks.back()->send(ipc::FrameType::kCreateLayer, {{"spec", group(10 + i)}}).ok());
  }
  for (auto& r : ranks) {
    auto reply = r->receive(std::chrono::seconds(10));
    ASSERT_TRUE(reply.ok()) << reply.status();
    // Each waited for its peer (not refused for a slot).
    EXPECT_NE(reply->body.find("never reached the coordinator"), std::string::npos) << reply->body;
  }
}

// A session that closes drops its pending forwards from its own tenant's layers only. Another
// tenant's group layer may be held for a whole collective (here a forward whose peer rank has
// not come yet); a close that waited for it held a pool thread, and the session, that long.
TEST_F(ProtocolAbuse, AClosingSessionDoesNotWaitForAnotherTenantsBusyLayer) {
  ASSERT_NO_FATAL_FAILURE(restart_with_other_tenant());

  RawSession rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  // Rank 0's forward waits in its collective for rank 1, holding its layer.
  auto held = hold_group_forward(rank0, handles[0]);

  // The other tenant's session opens and closes meanwhile.
  ASSERT_NO_FATAL_FAILURE(expect_child_succeeded(fork_other_tenant([](RawSession&) { return 0; })));
  ASSERT_FALSE(HasFailure());
  // Its session goes while rank 0's forward still waits.
  EXPECT_EQ(await_sessions(2), 2) << "the other tenant's closed session is still open";
  EXPECT_NE(held.wait_for(std::chrono::milliseconds(0)), std::future_status::ready)
      << "rank 0's forward ended before the other tenant's session went";
  complete_group_forward(held, rank1, handles[1]);
}

// A client that sends requests and never reads the replies: its replies wait in the daemon, the
// event loop goes on serving everyone else meanwhile (it used to block on that client's full
// socket, up to 5 s per reply), and once too much is left unread the session is closed.
TEST_F(ProtocolAbuse, AClientThatNeverReadsItsRepliesHoldsUpNoOneElse) {
  RawSession stuck(daemon_->client_socket()), other(daemon_->client_socket());
  ASSERT_TRUE(stuck.hello().ok());
  ASSERT_TRUE(other.hello().ok());
  // Errors that echo a 60 KB name: far more than a socket buffer, and past the daemon's bound
  // on unread replies.
  const std::string name(60000, 'n');
  std::thread flood([&] {
    for (int i = 0; i < 1024; ++i) {
      if (!stuck.send(ipc::FrameType::kAttachLayer, {{"name", name}}).ok()) break;  // closed already
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // its socket is full by now
  // Meanwhile another client is answered at once.
  auto r = other.call(ipc::FrameType::kAttachLayer, {{"name", "nope"}}, ipc::FrameType::kLayerInfo,
                      std::chrono::seconds(3));
  EXPECT_EQ(r.status().code(), StatusCode::kNotFound) << r.status();
  flood.join();
  // The stuck client's session was closed: draining its socket ends in the daemon's hang-up.
  Status end;
  int frames = 0;
  size_t bytes = 0;
  for (; frames < 2000; ++frames) {
    auto f = stuck.receive(std::chrono::seconds(30));
    if (!f.ok()) {
      end = f.status();
      break;
    }
    bytes += f->body.size();
  }
  EXPECT_EQ(end.code(), StatusCode::kUnavailable) << end << " after " << frames << " frames, " << bytes << " bytes";
  expect_daemon_serves();
}

// A daemon out of descriptors cannot accept: it pauses accepting (instead of spinning on a
// listener that stays readable), says why in its log, and serves again once descriptors free up.
TEST_F(ProtocolAbuse, ADaemonOutOfDescriptorsPausesAcceptingAndRecovers) {
  const size_t open_fds = daemon_->open_descriptors();
  rlimit old{};
  ASSERT_EQ(::prlimit(daemon_->pid(), RLIMIT_NOFILE, nullptr, &old), 0) << std::strerror(errno);
  const rlimit low{open_fds + 4, old.rlim_max};  // the soft limit only: it can be raised back
  ASSERT_EQ(::prlimit(daemon_->pid(), RLIMIT_NOFILE, &low, nullptr), 0) << std::strerror(errno);
  std::vector<ipc::UniqueFd> clients;
  for (int i = 0; i < 24; ++i) {
    auto c = ipc::connect_unix(daemon_->client_socket());
    ASSERT_TRUE(c.ok()) << c.status();  // queued in the listener's backlog when not accepted
    clients.push_back(std::move(*c));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  clients.clear();
  ASSERT_EQ(::prlimit(daemon_->pid(), RLIMIT_NOFILE, &old, nullptr), 0) << std::strerror(errno);
  expect_daemon_serves();
  EXPECT_NE(daemon_->log().find("cannot accept connections"), std::string::npos) << daemon_->log();
}

// A discard reaches only its own session's forwards: another session of the same tenant naming
// the same sequence drops nothing; a discard with unknown flags, or of a layer the session does
// not hold, is refused; the forward is still there for its own session's backward.
TEST_F(ProtocolAbuse, ADiscardReachesOnlyItsOwnSessionsForwards) {
  RawSession owner(daemon_->client_socket()), other(daemon_->client_socket());
  ASSERT_TRUE(owner.hello().ok());
  ASSERT_TRUE(other.hello().ok());
  auto handle = owner.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto attached = other.call(ipc::FrameType::kAttachLayer, {{"name", "moe"}}, ipc::FrameType::kLayerInfo);
  ASSERT_TRUE(attached.ok()) << attached.status();
  const uint64_t other_handle = (*attached)["handle"].get<uint64_t>();
  auto request = [](RawSession& s, ipc::Op op, uint64_t layer, uint64_t sequence, uint32_t flags = 0) {
    return s.submit(data_request(s.arena().layout(), op, layer, sequence, 8, 16, flags));
  };
  auto c = request(owner, ipc::Op::kForward, *handle, 5);
  ASSERT_TRUE(c && c->status_code == 0) << (c ? c->message : "lost");
  c = request(other, ipc::Op::kDiscard, other_handle, 5);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, 0) << c->message;  // nothing of its own to drop: no error, no effect
  c = request(other, ipc::Op::kDiscard, other_handle + 999, 5);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kNotFound)) << c->message;
  c = request(owner, ipc::Op::kDiscard, *handle, 5, 1u << 9);
  ASSERT_TRUE(c.has_value());
  EXPECT_NE(std::string(c->message).find("unknown request flags 512"), std::string::npos) << c->message;
  // Still pending for its own session: the backward runs.
  c = request(owner, ipc::Op::kBackward, *handle, 5);
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, 0) << c->message;
  expect_daemon_serves();
}

// A discard only gives memory back: it is not held to the tenant's max_inflight, which a request
// in flight (here a group forward waiting for its peer) has used up; refused, it would leave the
// forward held until the session ends.
TEST_F(ProtocolAbuse, ADiscardIsNotHeldToMaxInflight) {
  ASSERT_NO_FATAL_FAILURE(restart(DaemonOptions{.default_max_inflight = 1}));
  RawSession local(daemon_->client_socket()), rank0(daemon_->client_socket()), rank1(daemon_->client_socket());
  ASSERT_TRUE(local.hello().ok());
  auto handle = local.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto made = forward8(local, *handle, 9);
  ASSERT_TRUE(made && made->status_code == 0) << (made ? made->message : "lost");
  std::vector<uint64_t> handles;
  ASSERT_NO_FATAL_FAILURE(create_two_rank_group(rank0, rank1, handles));
  auto held = hold_group_forward(rank0, handles[0]);  // the tenant's one request in flight
  auto refused = forward8(local, *handle);
  ASSERT_TRUE(refused.has_value());
  EXPECT_EQ(refused->status_code, static_cast<int32_t>(StatusCode::kResourceExhausted)) << refused->message;
  auto discarded = local.submit(data_request(local.arena().layout(), ipc::Op::kDiscard, *handle, 9, 0, 16));
  ASSERT_TRUE(discarded.has_value());
  EXPECT_EQ(discarded->status_code, 0) << discarded->message;
  // Rank 1's forward is refused for the same quota, and the group refuses rank 0's with it.
  const auto second = forward8(rank1, handles[1]);
  const auto first = held.get();
  ASSERT_TRUE(first.has_value() && second.has_value());
  EXPECT_EQ(second->status_code, static_cast<int32_t>(StatusCode::kResourceExhausted)) << second->message;
  EXPECT_NE(first->status_code, 0) << first->message;
  RawSession admin(daemon_->admin_socket());
  auto layers = admin.call(ipc::FrameType::kAdminLayers, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(layers.ok()) << layers.status();
  for (const auto& l : (*layers)["layers"]) {
    if (l["name"] == "moe") {
      EXPECT_EQ(l["pending_backwards"], 0) << l;
    }
  }
}

// Unknown request flags are refused on every op, as docs/protocol.md says, not only on forward
// and backward; the session goes on.
TEST_F(ProtocolAbuse, UnknownFlagsAreRefusedOnNopAndChecksumToo) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  for (const ipc::Op op : {ipc::Op::kNop, ipc::Op::kChecksum}) {
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(op);
    d.flags = 1u << 9;
    d.input_offset = s.arena().layout().data_offset;
    auto c = s.submit(d);
    ASSERT_TRUE(c.has_value());
    EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument));
    EXPECT_NE(std::string(c->message).find("unknown request flags 512"), std::string::npos) << c->message;
  }
  // The dx-only flag means something on a backward only.
  auto handle = s.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  auto c = s.submit(data_request(s.arena().layout(), ipc::Op::kForward, *handle, 0, 8, 16, ipc::kFlagKeepParamGrads));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument)) << c->message;
  EXPECT_NE(std::string(c->message).find("unknown request flags 4"), std::string::npos) << c->message;
  // The no-noise flag: taken on a training forward of a layer without gate noise, refused on
  // one with it, and on a backward as unknown.
  auto forward = s.submit(data_request(s.arena().layout(), ipc::Op::kForward, *handle, 5, 8, 16, ipc::kFlagWithoutNoise));
  ASSERT_TRUE(forward.has_value());
  EXPECT_EQ(forward->status_code, 0) << forward->message;
  std::string noisy_spec = std::string(kSpec) + "gate_noise = 0.5\n";
  noisy_spec.replace(noisy_spec.find("\"moe\""), 5, "\"noisy\"");
  auto noisy = s.create_layer(noisy_spec);
  ASSERT_TRUE(noisy.ok()) << noisy.status();
  c = s.submit(data_request(s.arena().layout(), ipc::Op::kForward, *noisy, 6, 8, 16, ipc::kFlagWithoutNoise));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument)) << c->message;
  EXPECT_NE(std::string(c->message).find("draws gate noise"), std::string::npos) << c->message;
  c = s.submit(data_request(s.arena().layout(), ipc::Op::kBackward, *handle, 5, 8, 16, ipc::kFlagWithoutNoise));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument)) << c->message;
  EXPECT_NE(std::string(c->message).find("unknown request flags 8"), std::string::npos) << c->message;
  // The noise-key flag: a forward's only, and not with the no-noise flag.
  c = s.submit(data_request(s.arena().layout(), ipc::Op::kBackward, *handle, 5, 8, 16, ipc::kFlagNoiseKey));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument)) << c->message;
  EXPECT_NE(std::string(c->message).find("unknown request flags 16"), std::string::npos) << c->message;
  c = s.submit(data_request(s.arena().layout(), ipc::Op::kForward, *handle, 7, 8, 16,
                            ipc::kFlagWithoutNoise | ipc::kFlagNoiseKey));
  ASSERT_TRUE(c.has_value());
  EXPECT_EQ(c->status_code, static_cast<int32_t>(StatusCode::kInvalidArgument)) << c->message;
  EXPECT_NE(std::string(c->message).find("takes no noise key"), std::string::npos) << c->message;
  expect_daemon_serves();
}

// Group layers whose peers never come each hold a thread of the daemon's pool while they wait.
// Creations may hold half of it: beyond that a creation is refused at once, and everything else
// (another session's requests, the shutdown) still runs.
TEST_F(ProtocolAbuse, CreationsWaitingForPeersHoldOnlyHalfTheThreadPool) {
  constexpr int kWaiting = 32;  // half of tuteld's 64 pool threads
  std::vector<std::unique_ptr<RawSession>> waiting;
  for (int i = 0; i < kWaiting; ++i) {
    waiting.push_back(std::make_unique<RawSession>(daemon_->client_socket()));
    ASSERT_TRUE(waiting.back()->hello().ok());
    const std::string spec = "name = \"g" + std::to_string(i) + "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\n" +
                             "k = 2\ninit_seed = 3\n[group]\ncoordinator = \"127.0.0.1:" + std::to_string(free_port()) +
                             "\"\nsize = 2\nrank = 0\nbootstrap_timeout_ms = 600000\n";
    ASSERT_TRUE(waiting.back()->send(ipc::FrameType::kCreateLayer, {{"spec", spec}}).ok());
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(300));  // all of them on the pool
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  auto refused = s.create_layer(kSpec);
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("layer creations are in progress"), std::string_view::npos)
      << refused.status();
  // Requests that need the pool still run.
  auto attach = s.call(ipc::FrameType::kAttachLayer, {{"name", "g0"}}, ipc::FrameType::kLayerInfo);
  EXPECT_EQ(attach.status().code(), StatusCode::kNotFound) << attach.status();
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  daemon_.reset();
}

// Corrupt ring indices end the session as any session tuteld closes itself: the client is told
// why, and keeps its arena (its last results) and its place under max_sessions until it lets go.
TEST_F(ProtocolAbuse, CorruptRingIndicesStopOnlyThatSession) {
  RawSession admin(daemon_->admin_socket());
  auto closing_sessions = [&] {
    auto tenants = admin.call(ipc::FrameType::kAdminTenants, nlohmann::json::object(), ipc::FrameType::kOk);
    EXPECT_TRUE(tenants.ok()) << tenants.status();
    return tenants.ok() ? (*tenants)["tenants"][0]["closing_sessions"].get<int64_t>() : int64_t{-1};
  };
  {
    RawSession s(daemon_->client_socket());
    ASSERT_TRUE(s.hello().ok());
    std::memset(s.arena().data(), 0x3c, 4096);
    s.arena().request_control()->head.store(1000000);
    s.arena().request_control()->doorbell.fetch_add(1);
    ipc::futex_wake_all(&s.arena().request_control()->doorbell);
    auto error = s.receive(std::chrono::seconds(30));
    ASSERT_TRUE(error.ok()) << error.status() << daemon_->log();
    const Status said = ipc::reply_body(*error, ipc::FrameType::kOk).status();
    EXPECT_EQ(said.code(), StatusCode::kCorruption) << said;
    EXPECT_NE(said.message().find("ring"), std::string::npos) << said;
    // Then the end of the stream: the daemon has closed its side.
    EXPECT_EQ(s.receive(std::chrono::seconds(30)).status().code(), StatusCode::kUnavailable);
    EXPECT_EQ(closing_sessions(), 1) << "a session closed for its ring left max_sessions before its client let go";
    EXPECT_EQ(s.arena().data()[4095], 0x3c) << "the arena of a client still connected was punched";
  }
  // The client let go: the session is gone.
  int64_t closing = 1;
  for (int i = 0; i < 400 && closing != 0; ++i) {
    closing = closing_sessions();
    if (closing != 0) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  EXPECT_EQ(closing, 0);
  auto sessions = admin.call(ipc::FrameType::kAdminSessions, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(sessions.ok()) << sessions.status();
  EXPECT_TRUE((*sessions)["sessions"].empty()) << sessions->dump();
  expect_daemon_serves();
}

// A client that submits more requests than the completion ring holds and reads no completion:
// the daemon's worker waits for room (asleep, not spinning) and posts every completion, in
// order, once the client reads.
TEST_F(ProtocolAbuse, AClientThatDoesNotReadItsCompletionsGetsThemAllLater) {
  RawSession s(daemon_->client_socket());
  ASSERT_TRUE(s.hello().ok());
  ipc::RingProducer<ipc::RequestDescriptor> requests(s.arena().request_control(), s.arena().request_slots());
  ipc::RingConsumer<ipc::CompletionDescriptor> completions(s.arena().completion_control(),
                                                           s.arena().completion_slots());
  auto push = [&](uint64_t id) {
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kNop);
    d.request_id = id;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (!requests.try_push(d) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
  };
  constexpr uint64_t kRequests = ipc::kRingSlots + 8;
  for (uint64_t id = 1; id <= kRequests; ++id) push(id);  // the last 8 wait for the worker
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the worker waits for room
  for (uint64_t id = 1; id <= kRequests; ++id) {
    ipc::CompletionDescriptor c{};
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    ASSERT_EQ(completions.pop_wait(&c, ipc::WaitPolicy{}, [] { return false; }, deadline), ipc::PopResult::kItem)
        << "completion " << id;
    EXPECT_EQ(c.request_id, id);
    EXPECT_EQ(c.status_code, 0);
  }
}

TEST_F(ProtocolAbuse, ForeignLayerHandleIsRefused) {
  ASSERT_NO_FATAL_FAILURE(restart_with_other_tenant());

  RawSession owner(daemon_->client_socket());
  ASSERT_TRUE(owner.hello().ok());
  auto handle = owner.create_layer(kSpec);
  ASSERT_TRUE(handle.ok());

  expect_child_succeeded(fork_other_tenant([&](RawSession& intruder) {
    auto attach = intruder.call(ipc::FrameType::kAttachLayer, {{"name", "moe"}}, ipc::FrameType::kLayerInfo);
    if (attach.ok()) return 5;  // tenant 'other' has no layer named moe
    auto step = intruder.call(ipc::FrameType::kStep, {{"handle", *handle}}, ipc::FrameType::kOk);
    if (step.status().code() != StatusCode::kPermissionDenied) return 6;
    ipc::RequestDescriptor d{};
    d.op = static_cast<uint32_t>(ipc::Op::kForward);
    d.layer_handle = *handle;
    auto c = intruder.submit(d);
    return c && c->status_code == static_cast<int32_t>(StatusCode::kPermissionDenied) ? 0 : 7;
  }));
  // The owner still uses its layer.
  EXPECT_TRUE(owner.call(ipc::FrameType::kStep, {{"handle", *handle}}, ipc::FrameType::kOk).ok());
}

// Two tenants' layers on one rank: their forwards interleave through the rank's fair lock and
// each gets the result it gets alone, and the metrics count each tenant's time on the rank apart.
TEST_F(ProtocolAbuse, TenantsSharingARankGetTheirOwnResultsAndTheirTimeCountedApart) {
  ASSERT_NO_FATAL_FAILURE(restart_with_other_tenant());
  RawSession mine(daemon_->client_socket());
  ASSERT_TRUE(mine.hello().ok());
  auto handle = mine.create_layer(kSpec);
  ASSERT_TRUE(handle.ok()) << handle.status();
  // x in the arena; y, alone on the rank, is the reference (the other tenant's layer is made
  // alike: the same spec and init_seed give the same weights).
  float* x = reinterpret_cast<float*>(mine.arena().data());
  for (int i = 0; i < 8 * 16; ++i) x[i] = static_cast<float>((i * 37) % 23) / 11.0f - 1.0f;
  auto alone = forward8(mine, *handle);
  ASSERT_TRUE(alone && alone->status_code == 0);
  const std::vector<float> reference(x + 8 * 16, x + 2 * 8 * 16);
  constexpr int kForwards = 300;

  int go[2];
  ASSERT_EQ(::pipe(go), 0);
  const pid_t child = fork_other_tenant([&](RawSession& other) {
    auto theirs = other.create_layer(kSpec);
    if (!theirs.ok()) return 5;
    char c = 0;
    if (::read(go[0], &c, 1) != 1) return 6;
    float* ox = reinterpret_cast<float*>(other.arena().data());
    for (int i = 0; i < 8 * 16; ++i) ox[i] = x[i];
    for (int i = 0; i < kForwards; ++i) {
      auto done = forward8(other, *theirs);
      if (!done || done->status_code != 0) return 7;
      if (std::memcmp(ox + 8 * 16, reference.data(), reference.size() * sizeof(float)) != 0) return 8;
    }
    return 0;
  });
  ASSERT_GE(child, 0);
  ::close(go[0]);
  ASSERT_EQ(::write(go[1], "g", 1), 1);
  ::close(go[1]);
  for (int i = 0; i < kForwards; ++i) {
    auto done = forward8(mine, *handle);
    ASSERT_TRUE(done && done->status_code == 0) << i;
    ASSERT_EQ(std::memcmp(x + 8 * 16, reference.data(), reference.size() * sizeof(float)), 0) << i;
  }
  ASSERT_NO_FATAL_FAILURE(expect_child_succeeded(child));
  ASSERT_FALSE(HasFailure());

  RawSession admin(daemon_->admin_socket());
  auto metrics = admin.call(ipc::FrameType::kAdminMetrics, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  const std::string text = (*metrics)["text"].get<std::string>();
  EXPECT_NE(text.find("# TYPE tuteld_rank_busy_seconds_total counter"), std::string::npos) << text;
  // Every hold is a tenant's, the pinning of their arenas included: none is the daemon's own.
  EXPECT_EQ(text.find("tuteld_rank_busy_seconds_total{rank=\"0\",tenant=\"\"}"), std::string::npos) << text;
  for (const char* tenant : {"default", "other"}) {
    const std::string series = std::string("tuteld_rank_busy_seconds_total{rank=\"0\",tenant=\"") + tenant + "\"} ";
    const size_t at = text.find(series);
    ASSERT_NE(at, std::string::npos) << series << "\n" << text;
    EXPECT_GT(std::stod(text.substr(at + series.size())), 0.0) << series;
  }
}

TEST_F(ProtocolAbuse, UnknownUidIsRefused) {
  ::chmod(daemon_->client_socket().c_str(), 0666);
  ::chmod(daemon_->dir().c_str(), 0755);
  ::chmod((daemon_->dir() + "/run").c_str(), 0755);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    if (::setgid(65534) != 0 || ::setuid(65534) != 0) ::_exit(3);
    RawSession stranger(daemon_->client_socket());
    auto reply = stranger.receive();
    if (!reply.ok() || reply->header.type != static_cast<uint16_t>(ipc::FrameType::kError)) ::_exit(4);
    const Status st = ipc::status_from_error_body(nlohmann::json::parse(reply->body));
    if (st.message().find("belongs to no tenant") == std::string_view::npos) ::_exit(5);
    ::_exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << WEXITSTATUS(status);
  expect_daemon_serves();
}

TEST_F(ProtocolAbuse, ClientKilledMidRequest) {
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    RawSession s(daemon_->client_socket());
    if (!s.hello().ok()) ::_exit(3);
    auto handle = s.create_layer(R"(
name = "big"
experts = 8
model_dim = 256
hidden = 1024
k = 2
init_seed = 1
)");
    if (!handle.ok()) ::_exit(4);
    const ipc::ArenaLayout& l = s.arena().layout();
    const int64_t S = 4096;
    for (;;) {  // training forwards until killed; never waits for completions
      ipc::RequestDescriptor d{};
      d.op = static_cast<uint32_t>(ipc::Op::kForward);
      d.flags = ipc::kFlagTraining;
      d.layer_handle = *handle;
      d.tokens = S;
      d.sequence = 1;
      d.input_offset = l.data_offset;
      d.input_bytes = S * 256 * 4;
      d.output_offset = l.data_offset + S * 256 * 4;
      d.output_bytes = S * 256 * 4;
      ipc::RingProducer<ipc::RequestDescriptor>(s.arena().request_control(), s.arena().request_slots()).try_push(d);
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  expect_daemon_serves();
}

}  // namespace
}  // namespace tutel::testing
