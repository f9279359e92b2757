// The C++ API's mechanics against the fake daemon: flow control, arena limits, errors carried by
// completions, and a daemon that dies mid-request.
#include "tutel/client.hpp"

#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "fake_daemon.hpp"

namespace tutel::client {
namespace {

using testing::FakeDaemon;
using testing::FakeDaemonOptions;
using testing::TempDir;

struct Fixture {
  explicit Fixture(FakeDaemonOptions options = {}) : daemon(dir.file("d.sock"), options) {}
  Result<Client> connect(ClientOptions options = {}) {
    return Client::connect(dir.file("d.sock"), options);
  }
  // A client whose waits for a completion give up after `timeout`.
  Result<Client> connect_with_request_timeout(std::chrono::milliseconds timeout) {
    ClientOptions options;
    options.request_timeout = timeout;
    return connect(options);
  }
  TempDir dir;
  FakeDaemon daemon;
};

TEST(Client, HelloCarriesNameAndPid) {
  Fixture f;
  ClientOptions options;
  options.name = "trainer-7";
  auto client = f.connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->is_connected());
  EXPECT_EQ(client->tenant(), "fake");
  EXPECT_EQ(client->session_id(), 1u);
  const auto hello = f.daemon.last_hello();
  EXPECT_EQ(hello.value("client", std::string()), "trainer-7");
  EXPECT_EQ(hello.value("pid", int64_t{0}), static_cast<int64_t>(::getpid()));
  EXPECT_TRUE(client->ping().ok());
}

TEST(Client, SequencesAreUniqueAcrossHandlesOfOneSession) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto a = client->attach_layer("moe");
  auto b = client->attach_layer("moe");
  ASSERT_TRUE(a.ok() && b.ok());
  std::vector<float> x(4, 1.f), y(4);
  ForwardInfo ia, ib;
  ASSERT_TRUE(a->forward(x.data(), 1, y.data(), &ia).ok());
  ASSERT_TRUE(b->forward(x.data(), 1, y.data(), &ib).ok());
  EXPECT_NE(ia.sequence, ib.sequence);
  EXPECT_EQ(ia.dropped,
            static_cast<int64_t>(ia.sequence));  // the fake echoes the descriptor's sequence
  EXPECT_EQ(a->pending_backwards(), 1u);
  EXPECT_EQ(a->oldest_pending_sequence(), ia.sequence);
  // b's forward cannot be backwarded through a.
  EXPECT_EQ(a->backward(ib.sequence, y.data(), 0.f, x.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(a->backward(y.data(), 0.f, x.data()).ok());
  EXPECT_TRUE(b->backward(ib.sequence, y.data(), 0.f, x.data()).ok());
}

TEST(Client, MoreMicroBatchesThanRingSlots) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  constexpr int kBatches = 150;  // > 64 slots: submit waits for completions by itself
  std::vector<std::vector<float>> xs(kBatches), ys(kBatches);
  std::vector<Ticket> tickets;
  for (int i = 0; i < kBatches; ++i) {
    xs[i].assign(4 * (1 + i % 3), static_cast<float>(i));
    ys[i].assign(xs[i].size(), -1.f);
    auto t = layer->submit_forward(xs[i].data(), 1 + i % 3, ys[i].data());
    ASSERT_TRUE(t.ok()) << t.status();
    tickets.push_back(*t);
  }
  for (int i = kBatches - 1; i >= 0; --i) {
    auto info = client->wait(tickets[i]);
    ASSERT_TRUE(info.ok()) << info.status();
    EXPECT_EQ(info->sequence, tickets[i].sequence);
    for (float v : ys[i]) ASSERT_EQ(v, 2.f * i);
  }
  EXPECT_EQ(layer->pending_backwards(), static_cast<size_t>(kBatches));
}

TEST(Client, StepWaitsForRequestsInFlight) {
  FakeDaemonOptions options;
  options.delay = std::chrono::milliseconds(20);
  Fixture f(options);
  auto client = f.connect();
  ASSERT_TRUE(client.ok());
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4), dx(4);
  auto t = layer->submit_forward(x.data(), 1, y.data());
  ASSERT_TRUE(t.ok());
  auto step = layer->step();
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 1);
  EXPECT_EQ(f.daemon.requests_seen(), 1u);
  EXPECT_EQ(y[0], 2.f);  // completed before the step
  EXPECT_TRUE(client->wait(*t).ok());
  auto saved = layer->save("ck.safetensors");
  ASSERT_TRUE(saved.ok());
  EXPECT_EQ(*saved, "/state/fake/checkpoints/ck.safetensors");
}

TEST(Client, RequestLargerThanTheArenaSaysWhatToRaise) {
  FakeDaemonOptions options;
  options.arena_bytes = 256 << 10;
  Fixture f(options);
  auto client = f.connect();
  ASSERT_TRUE(client.ok());
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  const int64_t tokens = 20000;  // 20000·4·4 bytes in and out: 625 KiB > the data region
  std::vector<float> x(tokens * 4), y(tokens * 4);
  const Status st = layer->forward(x.data(), tokens, y.data());
  EXPECT_EQ(st.code(), StatusCode::kResourceExhausted);
  EXPECT_NE(st.message().find("server.arena_bytes"), std::string::npos) << st;
  EXPECT_NE(st.message().find("20000 tokens"), std::string::npos) << st;
  EXPECT_EQ(layer->pending_backwards(), 0u);
  // The session still works.
  EXPECT_TRUE(layer->forward(x.data(), 100, y.data()).ok());
}

TEST(Client, CompletionErrorsKeepTheirCodeAndMessage) {
  FakeDaemonOptions options;
  options.fail_request = 2;  // the first request is the ping
  Fixture f(options);
  auto client = f.connect();
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(client->ping().ok());
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4), y(4);
  const Status st = layer->forward(x.data(), 1, y.data());
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(st.message(), "x has 12 bytes; 3 tokens need 48");  // the code prefix is not repeated
  EXPECT_EQ(layer->pending_backwards(), 0u);                    // a failed forward has no backward
  EXPECT_TRUE(layer->forward(x.data(), 1, y.data()).ok());
}

TEST(Client, DaemonDeathFailsTheWaitInsteadOfHanging) {
  FakeDaemonOptions options;
  options.hang_up_after = 2;
  Fixture f(options);
  ClientOptions copts;
  copts.liveness_interval = std::chrono::milliseconds(50);
  auto client = f.connect(copts);
  ASSERT_TRUE(client.ok());
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4), y(4);
  ASSERT_TRUE(layer->forward(x.data(), 1, y.data()).ok());
  const auto started = std::chrono::steady_clock::now();
  const Status st = layer->forward(x.data(), 1, y.data());
  const auto waited = std::chrono::steady_clock::now() - started;
  EXPECT_EQ(st.code(), StatusCode::kUnavailable) << st;
  EXPECT_NE(st.message().find("lost the connection to tuteld"), std::string::npos) << st;
  EXPECT_LT(waited, std::chrono::seconds(5));
  EXPECT_FALSE(client->is_connected());
  // Every later call fails the same way, at once.
  EXPECT_EQ(layer->step().status().code(), StatusCode::kUnavailable);
  EXPECT_EQ(client->ping().code(), StatusCode::kUnavailable);
}

// A daemon that answers 300 ms late and a client whose waits give up after 50 ms, with a
// one-token forward submitted and still in flight.
class ForwardInFlightOnASlowDaemon : public ::testing::Test {
 protected:
  void SetUp() override {
    auto client = f_.connect_with_request_timeout(std::chrono::milliseconds(50));
    ASSERT_TRUE(client.ok()) << client.status();
    client_.emplace(std::move(*client));
    auto layer = client_->attach_layer("moe");
    ASSERT_TRUE(layer.ok()) << layer.status();
    layer_.emplace(std::move(*layer));
    auto ticket = layer_->submit_forward(x_.data(), 1, y_.data());
    ASSERT_TRUE(ticket.ok()) << ticket.status();
    ticket_ = *ticket;
  }
  static FakeDaemonOptions late() {
    FakeDaemonOptions options;
    options.delay = std::chrono::milliseconds(300);
    return options;
  }
  Fixture f_{late()};
  std::optional<Client> client_;
  std::optional<Layer> layer_;  // after client_: goes first
  std::vector<float> x_ = std::vector<float>(4, 1.f), y_ = std::vector<float>(4);
  Ticket ticket_;
};

TEST_F(ForwardInFlightOnASlowDaemon, RequestTimeoutLeavesTheRequestInFlight) {
  auto first = client_->wait(ticket_);
  EXPECT_EQ(first.status().code(), StatusCode::kTimeout) << first.status();
  Result<ForwardInfo> later = Status::Internal("unset");
  for (int i = 0; i < 40; ++i) {
    later = client_->wait(ticket_);
    if (later.status().code() != StatusCode::kTimeout) break;
  }
  EXPECT_TRUE(later.ok()) << later.status();
  EXPECT_EQ(y_[0], 2.f);
}

// A control call of a layer waits for the requests in flight first; when that wait times out,
// it says so, and that nothing was sent (the wait's own "wait again" is for ticket holders).
TEST_F(ForwardInFlightOnASlowDaemon, AStepThatTimesOutWaitingForRequestsSaysNothingWasSent) {
  const int64_t steps = f_.daemon.steps();
  auto step = layer_->step();
  EXPECT_EQ(step.status().code(), StatusCode::kTimeout) << step.status();
  EXPECT_NE(step.status().message().find("nothing was sent"), std::string::npos) << step.status();
  EXPECT_EQ(f_.daemon.steps(), steps);
}

// A synchronous call that times out gives its request up: the caller may have freed its buffers
// by the time it completes, and no later backward pairs with a forward the caller never saw; a
// training forward is discarded in the daemon after it (the caller has no sequence to do it
// with, and the daemon held its state for a backward that never comes).
TEST(Client, TimedOutSynchronousForwardIsAbandoned) {
  Fixture f;
  auto client = f.connect_with_request_timeout(std::chrono::milliseconds(20));
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4, -7.f);
  f.daemon.hold_completions(true);
  const Status st = layer->forward(x.data(), 1, y.data());
  EXPECT_EQ(st.code(), StatusCode::kTimeout) << st;
  EXPECT_NE(st.message().find("was given up"), std::string_view::npos) << st;  // not "wait again"
  EXPECT_EQ(layer->pending_backwards(), 0u);
  f.daemon.hold_completions(false);

  // The next forward's wait also completes the abandoned one, and its discard.
  std::vector<float> x2(4, 5.f), y2(4), dy(4, 1.f), dx(4);
  ForwardInfo info;
  ASSERT_TRUE(layer->forward(x2.data(), 1, y2.data(), &info).ok());
  EXPECT_EQ(f.daemon.requests_seen(), 3u);
  EXPECT_EQ(f.daemon.discarded(), std::vector<uint64_t>{info.sequence - 1});
  EXPECT_EQ(y[0], -7.f);  // never written
  EXPECT_EQ(y2[0], 10.f);
  EXPECT_EQ(layer->pending_backwards(), 1u);
  EXPECT_EQ(layer->oldest_pending_sequence(), info.sequence);
  ASSERT_TRUE(layer->backward(dy.data(), 0.f, dx.data()).ok());
  EXPECT_EQ(layer->pending_backwards(), 0u);
  EXPECT_TRUE(client->ping().ok());

  // A backward that times out has consumed its forward, and the daemon still runs it: its
  // message says not to call again (a retry would pair with the next forward), not "call again".
  ASSERT_TRUE(layer->forward(x2.data(), 1, y2.data(), &info).ok());
  f.daemon.hold_completions(true);
  const Status backward = layer->backward(dy.data(), 0.f, dx.data());
  EXPECT_EQ(backward.code(), StatusCode::kTimeout) << backward;
  EXPECT_NE(backward.message().find("do not call backward again for it"), std::string_view::npos) << backward;
  EXPECT_EQ(backward.message().find("call again,"), std::string_view::npos) << backward;
  EXPECT_EQ(layer->pending_backwards(), 0u);
  f.daemon.hold_completions(false);
  EXPECT_TRUE(client->ping().ok());
  // A closed client says so, as its layers do (it said "moved from").
  client->close();
  EXPECT_EQ(client->ping().code(), StatusCode::kUnavailable);
  EXPECT_NE(client->ping().message().find("the client was closed"), std::string_view::npos) << client->ping();
}

// unmap() waits for the requests in flight; when that times out it changes nothing, so the region
// stays usable and charged in the daemon until a second unmap() gives it back.
TEST(Client, DeviceRegionUnmapThatTimesOutCanBeRetried) {
  Fixture f;
  auto client = f.connect_with_request_timeout(std::chrono::milliseconds(20));
  ASSERT_TRUE(client.ok()) << client.status();
  auto region = client->map_device_region(0, 4096);
  ASSERT_TRUE(region.ok()) << region.status();
  auto* data = static_cast<float*>(region->data());
  ASSERT_NE(data, nullptr);
  data[0] = 42.f;
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4);
  f.daemon.hold_completions(true);
  auto t = layer->submit_forward(x.data(), 1, y.data());
  ASSERT_TRUE(t.ok()) << t.status();

  const Status st = region->unmap();
  EXPECT_EQ(st.code(), StatusCode::kTimeout) << st;
  EXPECT_NE(st.message().find("unmap it again"), std::string::npos) << st;
  ASSERT_EQ(region->data(), data);  // still mapped here
  EXPECT_EQ(data[0], 42.f);
  EXPECT_TRUE(f.daemon.unmapped_regions().empty());

  f.daemon.hold_completions(false);
  const Status again = region->unmap();
  EXPECT_TRUE(again.ok()) << again;
  EXPECT_EQ(region->data(), nullptr);
  EXPECT_EQ(f.daemon.unmapped_regions(), std::vector<int64_t>{1});
  EXPECT_TRUE(client->wait(*t).ok());  // its result was kept
  EXPECT_EQ(y[0], 2.f);
}

TEST(Client, MovedFromObjectsSaySo) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok());
  Client moved = std::move(*client);
  EXPECT_EQ(client->ping().code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(moved.ping().ok());
  auto layer = moved.attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  Layer other = std::move(*layer);
  EXPECT_EQ(layer->zero_grad().code(), StatusCode::kInvalidArgument);
  // The synchronous data calls too (they once waited on the moved-from handle's null session).
  std::vector<float> x(4, 1.f), y(4);
  EXPECT_EQ(layer->forward(x.data(), 1, y.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->infer(x.data(), 1, y.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->backward(1, y.data(), 0.f, x.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->forward_device(x.data(), 1, y.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->infer_device(x.data(), 1, y.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->backward_device(1, y.data(), 0.f, x.data()).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(other.zero_grad().ok());
  EXPECT_TRUE(other.destroy().ok());
  EXPECT_EQ(other.zero_grad().code(), StatusCode::kNotFound);
}

TEST(Client, ChecksumOfNullDataIsRefused) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(client->transfer_checksum(nullptr, 8).status().code(), StatusCode::kInvalidArgument);
  auto empty = client->transfer_checksum(nullptr, 0);
  EXPECT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(client->ping().ok());
}

// milliseconds::max() reads as "forever": it once wrapped into a deadline already past, so every
// control call timed out (closing the session) and every wait gave up at once.
TEST(Client, TheLongestTimeoutsMeanNoBound) {
  Fixture f;
  ClientOptions options;
  options.control_timeout = std::chrono::milliseconds::max();
  options.request_timeout = std::chrono::milliseconds::max();
  auto client = f.connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::vector<float> x(4, 1.5f), y(4);
  const Status st = layer->forward(x.data(), 1, y.data());
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(y[0], 3.f);
  auto step = layer->step();
  EXPECT_TRUE(step.ok()) << step.status();
}

// The request timeout is kept to the millisecond, not to the next liveness poll: with a poll every
// 10 s, a 50 ms timeout once waited the whole 10 s.
TEST(Client, ARequestTimeoutDoesNotWaitForTheNextLivenessPoll) {
  Fixture f;
  ClientOptions options;
  options.request_timeout = std::chrono::milliseconds(50);
  options.liveness_interval = std::chrono::milliseconds(10000);
  auto client = f.connect(options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4);
  f.daemon.hold_completions(true);
  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(layer->forward(x.data(), 1, y.data()).code(), StatusCode::kTimeout);
  // A bound on behaviour, not a speed: far below the 10 s the old wait took, far above 50 ms.
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(5));
  f.daemon.hold_completions(false);
  EXPECT_TRUE(client->wait_all().ok());
}

// wait(ticket, timeout) bounds one wait and leaves the request in flight; abandon() then makes
// sure nothing is written into buffers the caller is about to free (the Python module's Ctrl-C).
TEST(Client, AWaitWithItsOwnTimeoutAndAnAbandonedRequest) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4, -7.f), x2(4, 2.f), y2(4, -7.f);
  f.daemon.hold_completions(true);
  auto kept = layer->submit_forward(x.data(), 1, y.data());
  auto dropped = layer->submit_forward(x2.data(), 1, y2.data());
  ASSERT_TRUE(kept.ok() && dropped.ok());
  EXPECT_EQ(client->wait(*kept, std::chrono::milliseconds(0)).status().code(), StatusCode::kTimeout);
  auto slice = client->wait(*kept, std::chrono::milliseconds(30));
  EXPECT_EQ(slice.status().code(), StatusCode::kTimeout) << slice.status();
  EXPECT_NE(slice.status().message().find("within 30 ms"), std::string::npos) << slice.status();
  EXPECT_EQ(layer->pending_backwards(), 2u);

  client->abandon(*dropped);
  EXPECT_EQ(layer->pending_backwards(), 1u);  // no backward can pair with it
  f.daemon.hold_completions(false);
  auto got = client->wait(*kept, std::chrono::milliseconds(60000));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(y[0], 2.f);
  ASSERT_TRUE(client->wait_all().ok());
  EXPECT_EQ(y2[0], -7.f);  // completed, never written
  EXPECT_EQ(client->wait(*dropped).status().code(), StatusCode::kInvalidArgument);  // forgotten
  client->abandon(*dropped);                                                       // ignored
  EXPECT_EQ(layer->pending_backwards(), 1u);
  EXPECT_EQ(layer->oldest_pending_sequence(), kept->sequence);
}

// A training forward that completed while the caller waited for a later request, then abandoned,
// is not pending either: the default backward would otherwise pair with it.
TEST(Client, AnAbandonedForwardThatHadCompletedIsNotPending) {
  Fixture f;
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(4, 1.f), y(4), x2(4, 2.f), y2(4), dy(4, 1.f), dx(4);
  auto first = layer->submit_forward(x.data(), 1, y.data());
  auto second = layer->submit_forward(x2.data(), 1, y2.data());
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_TRUE(client->wait(*second).ok());  // pops the first's completion on the way
  client->abandon(*first);
  EXPECT_EQ(layer->pending_backwards(), 1u);
  EXPECT_EQ(layer->oldest_pending_sequence(), second->sequence);
  EXPECT_EQ(client->wait(*first).status().code(), StatusCode::kInvalidArgument);
}

// A MapRegion reply that lacks a field is the daemon's fault (Corruption, not the caller's
// InvalidArgument), and the region it holds is given back rather than left charged.
// A frame from the daemon that fails validation is the daemon's fault: Corruption, not the
// InvalidArgument that reads as the caller's mistake.
TEST(Client, AMalformedFrameFromTheDaemonIsCorruption) {
  TempDir dir;
  FakeDaemon daemon(dir.file("fake.sock"), {});
  ASSERT_TRUE(daemon.error().empty()) << daemon.error();
  auto client = Client::connect(dir.file("fake.sock"));
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("oversized_reply");
  EXPECT_EQ(layer.status().code(), StatusCode::kCorruption) << layer.status();
  EXPECT_NE(layer.status().message().find("malformed frame"), std::string::npos) << layer.status();
}

TEST(Client, AMalformedMapRegionReplyGivesTheRegionBack) {
  FakeDaemonOptions options;
  options.map_region_omits = "device";
  Fixture f(options);
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto region = client->map_device_region(0, 4096);
  ASSERT_FALSE(region.ok());
  EXPECT_EQ(region.status().code(), StatusCode::kCorruption) << region.status();
  EXPECT_NE(region.status().message().find("reply to MapRegion is malformed"), std::string::npos) << region.status();
  EXPECT_EQ(f.daemon.unmapped_regions(), std::vector<int64_t>{1});
  EXPECT_TRUE(client->ping().ok());
}

// A GradNorm reply: a number, or null with "not_finite" naming inf or nan (JSON has neither),
// each given back as the double; anything else is the daemon's fault (Corruption), and the
// session goes on.
TEST(Client, GradNormRepliesAreReadAndMalformedOnesRefused) {
  Fixture f(FakeDaemonOptions{});
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok()) << layer.status();
  f.daemon.set_grad_norm_reply({{"norm", 2.5}});
  EXPECT_EQ(*layer->grad_norm(), 2.5);
  f.daemon.set_grad_norm_reply({{"norm", nullptr}, {"not_finite", "inf"}});
  EXPECT_EQ(*layer->grad_norm(), std::numeric_limits<double>::infinity());
  f.daemon.set_grad_norm_reply({{"norm", nullptr}, {"not_finite", "nan"}});
  EXPECT_TRUE(std::isnan(*layer->grad_norm()));
  for (const nlohmann::json& bad : {nlohmann::json::object(), nlohmann::json{{"norm", "2.5"}},
                                    nlohmann::json{{"norm", nullptr}},
                                    nlohmann::json{{"norm", nullptr}, {"not_finite", "huge"}},
                                    nlohmann::json{{"not_finite", 1}}}) {
    f.daemon.set_grad_norm_reply(bad);
    const Result<double> norm = layer->grad_norm();
    ASSERT_FALSE(norm.ok()) << bad.dump();
    EXPECT_EQ(norm.status().code(), StatusCode::kCorruption) << norm.status();
    EXPECT_NE(norm.status().message().find("reply to GradNorm is malformed"), std::string::npos) << norm.status();
  }
  // A factor JSON cannot carry is refused before it is sent.
  EXPECT_EQ(layer->scale_grads(std::nan("")).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(client->ping().ok());
}

// ExportState's reply is checked before anything is read from the memfd: "bytes" must be a
// size within the memory the library gave (at least a safetensors length prefix); anything else
// is a malformed reply. A daemon without the frame (no state_bytes) is said to be too old.
TEST(Client, ExportStateRepliesAreCheckedAndTheMemfdGoesWithTheFrames) {
  Fixture f(FakeDaemonOptions{});
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->info().state_bytes, 4096u);
  Result<ExportedState> state = layer->export_state();
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->size(), 16u);
  ASSERT_NE(state->data(), nullptr);
  const int fd = state->dup_fd();
  ASSERT_GE(fd, 0);
  struct stat st {};
  ASSERT_EQ(::fstat(fd, &st), 0);
  EXPECT_GE(static_cast<uint64_t>(st.st_size), 4096u);  // the memory the library allocated
  EXPECT_EQ(layer->import_state(fd).code(), StatusCode::kOk);
  struct stat sent {};
  ASSERT_EQ(::fstat(fd, &sent), 0);
  EXPECT_EQ(f.daemon.last_import_inode(), sent.st_ino) << "a memfd goes as it is, not a copy";
  ::close(fd);
  // Refused here, and the session goes on: no descriptor, a closed one (the send would fail, and
  // a failed send ends the session), a pipe.
  EXPECT_EQ(layer->import_state(-1).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->import_state(fd).code(), StatusCode::kInvalidArgument) << "closed";
  int pipe_fds[2];
  ASSERT_EQ(::pipe(pipe_fds), 0);
  const Status piped = layer->import_state(pipe_fds[0]);
  EXPECT_EQ(piped.code(), StatusCode::kInvalidArgument) << piped;
  EXPECT_NE(piped.message().find("not a regular file"), std::string_view::npos) << piped;
  ::close(pipe_fds[0]);
  ::close(pipe_fds[1]);
  EXPECT_TRUE(client->ping().ok());
  // A file on disk is copied into a memfd, which the daemon reads.
  char path[] = "/tmp/tutel_client_state_XXXXXX";
  const int disk = ::mkstemp(path);
  ASSERT_GE(disk, 0);
  const std::string contents(3 << 20, 'q');  // past the copy's 1 MiB chunks
  ASSERT_EQ(::write(disk, contents.data(), contents.size()), static_cast<ssize_t>(contents.size()));
  EXPECT_EQ(layer->import_state(disk).code(), StatusCode::kOk);
  ::close(disk);
  ::unlink(path);
  EXPECT_TRUE(f.daemon.last_import().second) << "the daemon got a memfd";
  EXPECT_TRUE(f.daemon.last_import().first == contents) << "the copy is not the file";
  EXPECT_NE(f.daemon.last_import_inode(), sent.st_ino);
  EXPECT_EQ(f.daemon.state_frame_fds(), (std::vector<size_t>{1, 1, 1}));
  ExportedState moved = std::move(*state);
  EXPECT_EQ(moved.size(), 16u);
  EXPECT_EQ(state->dup_fd(), -1);  // moved from

  for (const nlohmann::json& bad : {nlohmann::json::object(), nlohmann::json{{"bytes", "16"}},
                                    nlohmann::json{{"bytes", -1}}, nlohmann::json{{"bytes", 7}},
                                    nlohmann::json{{"bytes", uint64_t{1} << 40}}}) {
    f.daemon.set_export_state_reply(bad);
    const Result<ExportedState> refused = layer->export_state();
    ASSERT_FALSE(refused.ok()) << bad.dump();
    EXPECT_EQ(refused.status().code(), StatusCode::kCorruption) << refused.status();
    EXPECT_NE(refused.status().message().find("reply to ExportState is malformed"), std::string::npos)
        << refused.status();
  }
  EXPECT_TRUE(client->ping().ok());
}

TEST(Client, ExportStateFromADaemonWithoutItSaysSo) {
  FakeDaemonOptions options;
  options.state_bytes = 0;
  Fixture f(options);
  auto client = f.connect();
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("moe");
  ASSERT_TRUE(layer.ok()) << layer.status();
  const Result<ExportedState> state = layer->export_state();
  EXPECT_EQ(state.status().code(), StatusCode::kUnimplemented) << state.status();
  EXPECT_NE(state.status().message().find("use save()"), std::string::npos) << state.status();
  EXPECT_TRUE(f.daemon.state_frame_fds().empty());
}

}  // namespace
}  // namespace tutel::client
