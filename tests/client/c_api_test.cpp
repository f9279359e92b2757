// The C ABI: argument checks, error codes and messages, and a training round trip against the
// fake daemon.
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstddef>
#include <string>
#include <thread>
#include <vector>

#include "fake_daemon.hpp"
#include "tutel/client.h"

extern "C" int tutel_c_header_check(void);  // c_header_check.c, compiled as C

namespace tutel::client {
namespace {

using testing::FakeDaemon;
using testing::FakeDaemonOptions;
using testing::TempDir;

std::string last_error() { return tutel_last_error(); }

TEST(CApi, ConnectToAMissingSocketGivesNullAndSaysWhy) {
  TempDir dir;
  const std::string path = dir.file("absent.sock");
  EXPECT_EQ(tutel_connect(path.c_str()), nullptr);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_UNAVAILABLE);
  EXPECT_NE(last_error().find("Unavailable"), std::string::npos) << last_error();
  EXPECT_NE(last_error().find("is tuteld running?"), std::string::npos) << last_error();
  EXPECT_NE(last_error().find(path), std::string::npos) << last_error();
}

TEST(CApi, HeaderCompilesAsC) { EXPECT_EQ(tutel_c_header_check(), 0); }

TEST(CApi, ConnectWithNullPathGivesNull) {
  EXPECT_EQ(tutel_connect(nullptr), nullptr);
  EXPECT_NE(last_error().find("socket_path is NULL"), std::string::npos) << last_error();
}

TEST(CApi, LastErrorCodeIsTheLastFailureOfThisThread) {
  EXPECT_EQ(tutel_ping(nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_INVALID_ARGUMENT);
  int fresh_thread = 1, after_its_failure = 1;
  std::thread other([&] {
    fresh_thread = tutel_last_error_code();
    TempDir dir;
    (void)tutel_connect(dir.file("absent.sock").c_str());
    after_its_failure = tutel_last_error_code();
  });
  other.join();
  EXPECT_EQ(fresh_thread, TUTEL_OK);
  EXPECT_EQ(after_its_failure, TUTEL_E_UNAVAILABLE);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_INVALID_ARGUMENT);  // this thread's is unchanged
}

TEST(CApi, NullHandlesGiveInvalidArgument) {
  float f = 0;
  int64_t i = 0;
  uint64_t u = 0;
  const char* s = nullptr;
  tutel_layer* layer = nullptr;
  tutel_ticket ticket{};
  EXPECT_EQ(tutel_ping(nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tutel_ping: the client is NULL"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_client_info(nullptr, &s, &u), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_layer_create(nullptr, "name = \"x\"", &layer), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(layer, nullptr);
  EXPECT_EQ(tutel_layer_create(nullptr, "x", nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_layer_attach(nullptr, "x", &layer), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_forward(nullptr, &f, 1, &f, &f), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tutel_forward: the layer is NULL"), std::string::npos)
      << last_error();
  EXPECT_EQ(tutel_backward(nullptr, &f, 0.f, &f), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_infer(nullptr, &f, 1, &f, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_step(nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_zero_grad(nullptr), TUTEL_E_INVALID_ARGUMENT);
  double norm = 0;
  EXPECT_EQ(tutel_grad_norm(nullptr, &norm), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_scale_grads(nullptr, 0.5), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_save(nullptr, "a"), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_load(nullptr, "a"), TUTEL_E_INVALID_ARGUMENT);
  int state_fd = -1;
  uint64_t state_bytes = 0;
  EXPECT_EQ(tutel_export_state(nullptr, &state_fd, &state_bytes), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_import_state(nullptr, 0), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_layer_dims(nullptr, &i, &i, &i), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_layer_name(nullptr), nullptr);
  EXPECT_EQ(tutel_layer_kept_aside(nullptr), nullptr);
  EXPECT_EQ(tutel_forward_stats(nullptr, &i, &i), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_layer_destroy(nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_submit_forward(nullptr, &f, 1, &f, 1, &ticket), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_submit_backward(nullptr, 1, &f, 0.f, &f, &ticket), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_submit_backward_flags(nullptr, 1, &f, 0.f, &f, TUTEL_KEEP_PARAM_GRADS, &ticket),
            TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tutel_submit_backward_flags"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_wait(nullptr, ticket, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_wait_for(nullptr, ticket, 10, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_abandon(nullptr, ticket), TUTEL_E_INVALID_ARGUMENT);
  tutel_layer_release(nullptr);  // no-ops
  tutel_close(nullptr);
}

TEST(CApi, ConnectOptionsAreCheckedAndApplied) {
  TempDir dir;
  FakeDaemon daemon(dir.file("d.sock"), FakeDaemonOptions{});
  ASSERT_EQ(daemon.error(), "");
  const std::string path = dir.file("d.sock");
  tutel_connect_options options{};  // struct_size left 0: a caller that forgot it
  EXPECT_EQ(tutel_connect_with_options(path.c_str(), &options), nullptr);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("set it to sizeof(tutel_connect_options)"), std::string::npos) << last_error();

  // A size that would cut a field in half is refused too.
  options.struct_size = offsetof(tutel_connect_options, name) + 4;
  EXPECT_EQ(tutel_connect_with_options(path.c_str(), &options), nullptr);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_INVALID_ARGUMENT);

  // A caller built against a later, longer struct: the fields past ours are not read.
  struct Later {
    tutel_connect_options known;
    int64_t added[2];
  } later{};
  later.known.struct_size = sizeof later;
  later.known.name = "later-caller";
  later.added[0] = later.added[1] = -1;
  tutel_client* later_caller = tutel_connect_with_options(path.c_str(), &later.known);
  ASSERT_NE(later_caller, nullptr) << last_error();
  EXPECT_EQ(daemon.last_hello().value("client", std::string()), "later-caller");
  tutel_layer* layer = nullptr;
  std::vector<float> x(4, 1.f), y(4);
  ASSERT_EQ(tutel_layer_attach(later_caller, "moe", &layer), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_forward(layer, x.data(), 1, y.data(), nullptr), TUTEL_OK) << last_error();
  tutel_layer_release(layer);
  tutel_close(later_caller);

  // The whole struct: the request timeout bounds a synchronous call, which abandons its request.
  options.struct_size = sizeof options;
  options.request_timeout_ms = 30;
  tutel_client* client = tutel_connect_with_options(path.c_str(), &options);
  ASSERT_NE(client, nullptr) << last_error();
  ASSERT_EQ(tutel_layer_attach(client, "moe", &layer), TUTEL_OK) << last_error();
  daemon.hold_completions(true);
  EXPECT_EQ(tutel_forward(layer, x.data(), 1, y.data(), nullptr), TUTEL_E_TIMEOUT);
  EXPECT_EQ(tutel_backward(layer, y.data(), 0.f, x.data()), TUTEL_E_INVALID_ARGUMENT);  // abandoned: not pending
  daemon.hold_completions(false);
  EXPECT_EQ(tutel_ping(client), TUTEL_OK) << last_error();
  // An unmap whose wait for the requests in flight runs out keeps the handle: the region is
  // still mapped on both sides, and a second unmap gives it back (the handle was freed, the
  // region left mapped and charged until the session ended).
  tutel_region* region = nullptr;
  ASSERT_EQ(tutel_region_map(client, 0, 4096, &region), TUTEL_OK) << last_error();
  tutel_ticket ticket{};
  // A training value other than 0, 1 or TUTEL_TRAINING_WITHOUT_NOISE is refused, not read as 1.
  EXPECT_EQ(tutel_submit_forward(layer, x.data(), 1, y.data(), 5, &ticket), TUTEL_E_INVALID_ARGUMENT);
  // A keyed forward is a training forward (1) or an inference drawing the noise (0): a forward
  // without noise takes no key.
  EXPECT_EQ(tutel_submit_forward_keyed(layer, x.data(), 1, y.data(), TUTEL_TRAINING_WITHOUT_NOISE, 3, &ticket),
            TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("takes no key"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_submit_forward_keyed(layer, x.data(), 1, y.data(), 1, 3, nullptr), TUTEL_E_INVALID_ARGUMENT);
  // The fake daemon reports no gate_noise: 0, as from a daemon before the field.
  double gate_noise = -1;
  EXPECT_EQ(tutel_layer_gate_noise(layer, &gate_noise), TUTEL_OK) << last_error();
  EXPECT_EQ(gate_noise, 0.0);
  EXPECT_EQ(tutel_layer_gate_noise(layer, nullptr), TUTEL_E_INVALID_ARGUMENT);
  daemon.hold_completions(true);
  ASSERT_EQ(tutel_submit_forward(layer, x.data(), 1, y.data(), 0, &ticket), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_region_unmap(region), TUTEL_E_TIMEOUT);
  EXPECT_NE(last_error().find("unmap it again"), std::string::npos) << last_error();
  void* data = nullptr;
  EXPECT_EQ(tutel_region_info(region, &data, nullptr, nullptr, nullptr), TUTEL_OK) << "the handle went";
  EXPECT_NE(data, nullptr);
  EXPECT_TRUE(daemon.unmapped_regions().empty());
  daemon.hold_completions(false);
  EXPECT_EQ(tutel_region_unmap(region), TUTEL_OK) << last_error();
  EXPECT_EQ(daemon.unmapped_regions().size(), 1u);
  tutel_layer_release(layer);
  tutel_close(client);

  // The control timeout bounds a control call; one that runs out closes the session, since the
  // stream may hold half a reply, and every later call says so instead of waiting.
  options.request_timeout_ms = 0;
  options.control_timeout_ms = 50;
  client = tutel_connect_with_options(path.c_str(), &options);
  ASSERT_NE(client, nullptr) << last_error();
  ASSERT_EQ(tutel_layer_attach(client, "moe", &layer), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_step(layer), TUTEL_OK) << last_error();
  daemon.hold_step_replies(true);
  EXPECT_EQ(tutel_step(layer), TUTEL_E_TIMEOUT) << last_error();
  const std::string timed_out = last_error();
  EXPECT_NE(timed_out.find("Timeout"), std::string::npos) << timed_out;
  daemon.hold_step_replies(false);
  EXPECT_NE(timed_out.find("within 50 ms"), std::string::npos) << timed_out;
  EXPECT_NE(timed_out.find("the session was closed"), std::string::npos) << timed_out;
  EXPECT_NE(timed_out.find("control_timeout_ms in C"), std::string::npos) << timed_out;
  // Later calls: Unavailable (not Timeout, which a caller may retry), naming the cause.
  EXPECT_EQ(tutel_step(layer), TUTEL_E_UNAVAILABLE);
  EXPECT_NE(last_error().find("closed after an earlier failure"), std::string::npos) << last_error();
  EXPECT_NE(last_error().find("within 50 ms"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_forward(layer, x.data(), 1, y.data(), nullptr), TUTEL_E_UNAVAILABLE);
  tutel_layer_release(layer);
  tutel_close(client);
}

class CApiWithDaemon : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<FakeDaemon>(dir_.file("d.sock"), FakeDaemonOptions{});
    ASSERT_EQ(daemon_->error(), "");
    client_ = tutel_connect(dir_.file("d.sock").c_str());
    ASSERT_NE(client_, nullptr) << last_error();
  }
  void TearDown() override { tutel_close(client_); }

  TempDir dir_;
  std::unique_ptr<FakeDaemon> daemon_;
  tutel_client* client_ = nullptr;
};

TEST_F(CApiWithDaemon, TrainingRoundTrip) {
  const char* tenant = nullptr;
  uint64_t data_bytes = 0;
  ASSERT_EQ(tutel_client_info(client_, &tenant, &data_bytes), TUTEL_OK);
  EXPECT_STREQ(tenant, "fake");
  EXPECT_GT(data_bytes, 0u);
  EXPECT_EQ(tutel_ping(client_), TUTEL_OK) << last_error();

  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_create(client_, "name = \"moe\"", &layer), TUTEL_OK) << last_error();
  int64_t m = 0, o = 0, e = 0;
  ASSERT_EQ(tutel_layer_dims(layer, &m, &o, &e), TUTEL_OK);
  EXPECT_EQ(m, 4);
  EXPECT_EQ(o, 4);
  EXPECT_EQ(e, 4);

  std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8}, y(8), dx(8);
  float l_aux = 0;
  ASSERT_EQ(tutel_forward(layer, x.data(), 2, y.data(), &l_aux), TUTEL_OK) << last_error();
  EXPECT_FLOAT_EQ(l_aux, 0.5f);
  for (size_t i = 0; i < x.size(); ++i) EXPECT_FLOAT_EQ(y[i], 2 * x[i]);
  int64_t capacity = 0, dropped = -1;
  ASSERT_EQ(tutel_forward_stats(layer, &capacity, &dropped), TUTEL_OK);
  EXPECT_EQ(capacity, 2);
  ASSERT_EQ(tutel_backward(layer, y.data(), 0.01f, dx.data()), TUTEL_OK) << last_error();
  for (size_t i = 0; i < x.size(); ++i) EXPECT_FLOAT_EQ(dx[i], 6 * x[i]);
  // Nothing is pending any more.
  EXPECT_EQ(tutel_backward(layer, y.data(), 0.01f, dx.data()), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("call forward() first"), std::string::npos) << last_error();

  ASSERT_EQ(tutel_step(layer), TUTEL_OK) << last_error();
  EXPECT_EQ(daemon_->steps(), 1);
  EXPECT_EQ(tutel_zero_grad(layer), TUTEL_OK);
  double norm = 0;
  EXPECT_EQ(tutel_grad_norm(layer, &norm), TUTEL_OK) << last_error();
  EXPECT_EQ(norm, 1.5);  // the fake daemon's
  EXPECT_EQ(tutel_grad_norm(layer, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("norm is NULL"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_scale_grads(layer, 0.5), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_scale_grads(layer, INFINITY), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_save(layer, "ck.safetensors"), TUTEL_OK);
  EXPECT_EQ(tutel_load(layer, "ck.safetensors"), TUTEL_OK);
  int state_fd = -1;
  uint64_t state_bytes = 0;
  EXPECT_EQ(tutel_export_state(layer, nullptr, &state_bytes), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_export_state(layer, &state_fd, nullptr), TUTEL_E_INVALID_ARGUMENT);
  ASSERT_EQ(tutel_export_state(layer, &state_fd, &state_bytes), TUTEL_OK) << last_error();
  EXPECT_EQ(state_bytes, 16u);  // the fake daemon's reply
  EXPECT_EQ(tutel_import_state(layer, state_fd), TUTEL_OK) << last_error();
  EXPECT_EQ(::close(state_fd), 0) << "the caller owns the descriptor";
  EXPECT_EQ(tutel_import_state(layer, -1), TUTEL_E_INVALID_ARGUMENT);

  ASSERT_EQ(tutel_infer(layer, x.data(), 2, y.data(), nullptr), TUTEL_OK);
  EXPECT_EQ(tutel_backward(layer, y.data(), 0.f, dx.data()),
            TUTEL_E_INVALID_ARGUMENT);  // infer keeps nothing
  tutel_layer_release(layer);
}

TEST_F(CApiWithDaemon, ArgumentErrors) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_create(client_, "name = \"moe\"", &layer), TUTEL_OK);
  float f[4] = {};
  EXPECT_EQ(tutel_forward(layer, nullptr, 1, f, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_forward(layer, f, -5, f, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("tokens = -5"), std::string::npos) << last_error();
  // An empty batch is sent like any other (null buffers allowed); what the real daemon answers
  // is ClientDaemon.AnEmptyBatchIsAStepThatChangesNothing's.
  EXPECT_EQ(tutel_forward(layer, nullptr, 0, nullptr, nullptr), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_backward(layer, nullptr, 0.f, nullptr), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_save(layer, nullptr), TUTEL_E_INVALID_ARGUMENT);
  tutel_layer* refused = layer;  // a failed create or attach sets its out-parameter to null
  EXPECT_EQ(tutel_layer_create(client_, nullptr, &refused), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(refused, nullptr);
  EXPECT_EQ(tutel_layer_attach(client_, "missing", &refused), TUTEL_E_NOT_FOUND);
  EXPECT_EQ(refused, nullptr);
  EXPECT_NE(last_error().find("NotFound: tenant 'fake' has no layer 'missing'"), std::string::npos)
      << last_error();
  tutel_layer_release(layer);
}

TEST_F(CApiWithDaemon, AsyncMicroBatches) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_attach(client_, "moe", &layer), TUTEL_OK);
  std::vector<float> x1(4, 1.f), x2(8, 2.f), y1(4), y2(8), dx(8);
  tutel_ticket t1{}, t2{}, tb{};
  EXPECT_EQ(tutel_submit_backward_flags(layer, 1, x1.data(), 0.f, y1.data(), 8, &tb), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("unknown flags 8"), std::string::npos) << last_error();
  tb.request_id = tb.sequence = 77;
  EXPECT_EQ(tutel_submit_forward(layer, x1.data(), 1, y1.data(), 3, &tb), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tb.request_id, 0u) << "a failed submit leaves no stale ticket";
  EXPECT_EQ(tb.sequence, 0u);
  ASSERT_EQ(tutel_submit_forward(layer, x1.data(), 1, y1.data(), 1, &t1), TUTEL_OK);
  ASSERT_EQ(tutel_submit_forward(layer, x2.data(), 2, y2.data(), 1, &t2), TUTEL_OK);
  EXPECT_NE(t1.sequence, t2.sequence);
  tutel_forward_info info{};
  ASSERT_EQ(tutel_wait(client_, t2, &info), TUTEL_OK) << last_error();  // out of order
  EXPECT_EQ(info.sequence, t2.sequence);
  EXPECT_EQ(info.capacity, 2);
  ASSERT_EQ(tutel_wait(client_, t1, &info), TUTEL_OK);
  EXPECT_EQ(y1[0], 2.f);
  EXPECT_EQ(y2[7], 4.f);
  EXPECT_EQ(tutel_wait(client_, t1, &info), TUTEL_E_INVALID_ARGUMENT);  // already waited for
  ASSERT_EQ(tutel_submit_backward(layer, t2.sequence, y2.data(), 0.f, dx.data(), &tb), TUTEL_OK);
  ASSERT_EQ(tutel_wait(client_, tb, nullptr), TUTEL_OK);
  EXPECT_EQ(dx[0], 12.f);
  EXPECT_EQ(tutel_submit_backward(layer, t2.sequence, y2.data(), 0.f, dx.data(), &tb),
            TUTEL_E_INVALID_ARGUMENT);
  tutel_layer_release(layer);
}

// tutel_forward_with_info gives each synchronous forward's sequence, so its backward can be
// taken by sequence in any order; the statistics are those tutel_forward_stats keeps.
TEST_F(CApiWithDaemon, ASynchronousForwardGivesItsSequenceForABackwardInAnyOrder) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_attach(client_, "moe", &layer), TUTEL_OK);
  std::vector<float> x1(4, 1.f), x2(8, 2.f), y1(4), y2(8), dx1(4), dx2(8);
  tutel_forward_info first{}, second{};
  ASSERT_EQ(tutel_forward_with_info(layer, x1.data(), 1, y1.data(), &first), TUTEL_OK) << last_error();
  ASSERT_EQ(tutel_forward_with_info(layer, x2.data(), 2, y2.data(), &second), TUTEL_OK) << last_error();
  EXPECT_NE(first.sequence, 0u);
  EXPECT_NE(first.sequence, second.sequence);
  EXPECT_EQ(second.capacity, 2);
  EXPECT_FLOAT_EQ(second.l_aux, 0.5f);
  int64_t capacity = 0;
  ASSERT_EQ(tutel_forward_stats(layer, &capacity, nullptr), TUTEL_OK);
  EXPECT_EQ(capacity, second.capacity);
  tutel_ticket ticket{};
  ASSERT_EQ(tutel_submit_backward(layer, second.sequence, y2.data(), 0.f, dx2.data(), &ticket), TUTEL_OK)
      << last_error();
  ASSERT_EQ(tutel_wait(client_, ticket, nullptr), TUTEL_OK) << last_error();
  EXPECT_EQ(dx2, std::vector<float>(8, 12.f));  // the fake daemon's dx = 3 * dy, dy = 2 * x
  ASSERT_EQ(tutel_backward_checked(layer, 1, y1.data(), 0.f, dx1.data()), TUTEL_OK) << last_error();
  EXPECT_EQ(dx1, std::vector<float>(4, 6.f));
  ASSERT_EQ(tutel_forward_with_info(layer, x1.data(), 1, y1.data(), nullptr), TUTEL_OK) << last_error();
  ASSERT_EQ(tutel_backward(layer, y1.data(), 0.f, dx1.data()), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_forward_with_info(nullptr, x1.data(), 1, y1.data(), &first), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_forward_with_info(layer, x1.data(), -1, y1.data(), &first), TUTEL_E_INVALID_ARGUMENT);
  tutel_layer_release(layer);
}

// tutel_backward_checked refuses a backward whose buffers hold another count of tokens than the
// oldest forward's (tutel_backward would read and write that forward's rows past them), sending
// nothing: the forward still waits, and the backward in order goes through.
TEST_F(CApiWithDaemon, ACheckedBackwardRefusesBuffersOfAnotherForward) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_attach(client_, "moe", &layer), TUTEL_OK);
  std::vector<float> x1(4, 1.f), x2(8, 2.f), y1(4), y2(8), dx1(4), dx2(8);
  ASSERT_EQ(tutel_forward(layer, x1.data(), 1, y1.data(), nullptr), TUTEL_OK) << last_error();
  ASSERT_EQ(tutel_forward(layer, x2.data(), 2, y2.data(), nullptr), TUTEL_OK) << last_error();
  EXPECT_EQ(tutel_backward_checked(layer, 2, y2.data(), 0.f, dx2.data()), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("dy and dx hold 2 tokens, but the oldest training forward"), std::string::npos)
      << last_error();
  EXPECT_EQ(dx2, std::vector<float>(8, 0.f)) << "nothing was written";
  ASSERT_EQ(tutel_backward_checked(layer, 1, y1.data(), 0.f, dx1.data()), TUTEL_OK) << last_error();
  ASSERT_EQ(tutel_backward_checked(layer, 2, y2.data(), 0.f, dx2.data()), TUTEL_OK) << last_error();
  EXPECT_NE(dx2, std::vector<float>(8, 0.f));
  EXPECT_EQ(tutel_backward_checked(layer, 2, y2.data(), 0.f, dx2.data()), TUTEL_E_INVALID_ARGUMENT);  // none left
  EXPECT_EQ(tutel_backward_checked(nullptr, 1, y1.data(), 0.f, dx1.data()), TUTEL_E_INVALID_ARGUMENT);
  tutel_layer_release(layer);
}

// tutel_wait_for waits in slices that leave the request in flight; tutel_abandon gives it up so
// its buffers may go (what the Python module does on KeyboardInterrupt).
TEST_F(CApiWithDaemon, WaitInSlicesAndAbandon) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_attach(client_, "moe", &layer), TUTEL_OK);
  std::vector<float> x(4, 1.f), y(4, -7.f), x2(4, 3.f), y2(4, -7.f);
  tutel_ticket kept{}, dropped{};
  daemon_->hold_completions(true);
  ASSERT_EQ(tutel_submit_forward(layer, x.data(), 1, y.data(), 1, &kept), TUTEL_OK);
  ASSERT_EQ(tutel_submit_forward(layer, x2.data(), 1, y2.data(), 1, &dropped), TUTEL_OK);
  tutel_forward_info info{};
  EXPECT_EQ(tutel_wait_for(client_, kept, 0, &info), TUTEL_E_TIMEOUT);
  EXPECT_EQ(tutel_wait_for(client_, kept, 20, &info), TUTEL_E_TIMEOUT);
  EXPECT_NE(last_error().find("they stay in flight"), std::string::npos) << last_error();
  ASSERT_EQ(tutel_abandon(client_, dropped), TUTEL_OK);
  // Waiting for an abandoned request is refused at once (it waited until the daemon had run it),
  // and the info is zeros, not what the caller left there.
  info.sequence = 99;
  EXPECT_EQ(tutel_wait(client_, dropped, &info), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_NE(last_error().find("abandoned"), std::string::npos) << last_error();
  EXPECT_EQ(info.sequence, 0u);
  daemon_->hold_completions(false);
  int code = TUTEL_E_TIMEOUT;
  for (int i = 0; i < 600 && code == TUTEL_E_TIMEOUT; ++i) code = tutel_wait_for(client_, kept, 100, &info);
  ASSERT_EQ(code, TUTEL_OK) << last_error();
  EXPECT_EQ(info.sequence, kept.sequence);
  EXPECT_EQ(y[0], 2.f);
  EXPECT_EQ(tutel_ping(client_), TUTEL_OK);  // completes the abandoned one too
  EXPECT_EQ(y2[0], -7.f);                    // never written
  EXPECT_EQ(tutel_wait(client_, dropped, nullptr), TUTEL_E_INVALID_ARGUMENT);
  EXPECT_EQ(tutel_abandon(client_, dropped), TUTEL_OK);  // unknown: ignored
  // Only the kept forward waits for its backward.
  std::vector<float> dx(4);
  tutel_ticket tb{};
  EXPECT_EQ(tutel_submit_backward(layer, dropped.sequence, y.data(), 0.f, dx.data(), &tb), TUTEL_E_INVALID_ARGUMENT);
  ASSERT_EQ(tutel_backward(layer, y.data(), 0.f, dx.data()), TUTEL_OK) << last_error();
  EXPECT_EQ(dx[0], 6.f);
  tutel_layer_release(layer);
}

TEST_F(CApiWithDaemon, LayersFailAfterTheClientIsClosed) {
  tutel_layer* layer = nullptr;
  ASSERT_EQ(tutel_layer_attach(client_, "moe", &layer), TUTEL_OK);
  tutel_close(client_);
  client_ = nullptr;
  float f[4] = {};
  EXPECT_EQ(tutel_forward(layer, f, 1, f, nullptr), TUTEL_E_UNAVAILABLE);
  EXPECT_NE(last_error().find("the client was closed"), std::string::npos) << last_error();
  EXPECT_EQ(tutel_step(layer), TUTEL_E_UNAVAILABLE);
  // Every backward says so too, before it looks for a forward (it said "call forward() first").
  EXPECT_EQ(tutel_backward(layer, f, 0.f, f), TUTEL_E_UNAVAILABLE);
  EXPECT_EQ(tutel_backward_device(layer, f, 0.f, f), TUTEL_E_UNAVAILABLE);
  EXPECT_EQ(tutel_backward_device_checked(layer, 1, f, 0.f, f, 0), TUTEL_E_UNAVAILABLE);
  EXPECT_NE(last_error().find("the client was closed"), std::string::npos) << last_error();
  tutel_layer_release(layer);
}

TEST(CApi, RefusedHelloGivesNullWithTheDaemonsReason) {
  TempDir dir;
  FakeDaemonOptions options;
  options.refuse =
      Status::PermissionDenied("uid 1234 / gid 1234 belongs to no tenant; add it to a [[tenant]]");
  FakeDaemon daemon(dir.file("d.sock"), options);
  ASSERT_EQ(daemon.error(), "");
  EXPECT_EQ(tutel_connect(dir.file("d.sock").c_str()), nullptr);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_PERMISSION_DENIED) << last_error();
  EXPECT_NE(last_error().find("PermissionDenied"), std::string::npos) << last_error();
  EXPECT_NE(last_error().find("belongs to no tenant"), std::string::npos) << last_error();
}

}  // namespace
}  // namespace tutel::client
