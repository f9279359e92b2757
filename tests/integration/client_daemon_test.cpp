// The real tuteld with the real client library, tutelctl, train_toy and the metrics endpoint:
// several clients at once, a client killed mid-request, a config error at start-up, and a
// clean shutdown while requests are in flight.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <optional>
#include <functional>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "../common/sanitizers.hpp"
#include "daemon_fixture.hpp"
#include "tutel/client.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/openmp_spin.hpp"  // the constant only: this test links no kernels

namespace tutel::testing {
namespace {

std::string spec(const std::string& name, int64_t model_dim = 16, int init_seed = 5) {
  return "name = \"" + name + "\"\nexperts = 4\nmodel_dim = " + std::to_string(model_dim) +
         "\nhidden = 32\nk = 2\ninit_seed = " + std::to_string(init_seed) +
         "\n[optimizer]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n";
}

// The file the daemon moved aside into the default tenant's checkpoints whose name starts with
// `prefix` ("g.superseded-"), or "" where there is none.
std::string kept_aside(const DaemonProcess& d, const std::string& prefix) {
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(d.dir() + "/state/default/checkpoints", ec))
    if (entry.path().filename().string().rfind(prefix, 0) == 0) return entry.path().filename().string();
  return "";
}

// Exports `from`'s state and imports it into `to`, through the client library's memfd.
Status copy_state(client::Layer& from, client::Layer& to) {
  TUTEL_ASSIGN_OR_RETURN(client::ExportedState state, from.export_state());
  const int fd = state.dup_fd();
  const Status imported = to.import_state(fd);
  ::close(fd);
  return imported;
}

class ClientDaemon : public ::testing::Test {
 protected:
  void SetUp() override {
    daemon_ = std::make_unique<DaemonProcess>(DaemonOptions{});
    ASSERT_TRUE(daemon_->start());
  }
  void TearDown() override {
    EXPECT_TRUE(daemon_->alive()) << daemon_->log();
    EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  }
  nlohmann::json ctl_json(const std::string& what) {
    auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " --json " + what);
    EXPECT_EQ(code, 0) << out;
    return nlohmann::json::parse(out, nullptr, false);
  }
  std::unique_ptr<DaemonProcess> daemon_;
};

TEST_F(ClientDaemon, TrainToyLearns) {
  auto [code, out] = run_command(std::string(TRAIN_TOY_BIN) + " --socket " + daemon_->client_socket() + " --steps 200");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("held-out loss"), std::string::npos) << out;
}

TEST_F(ClientDaemon, ConcurrentClientsTrainTheirOwnLayers) {
  constexpr int kClients = 3, kSteps = 20;
  std::vector<pid_t> children;
  for (int c = 0; c < kClients; ++c) {
    const pid_t pid = ::fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      auto client = client::Client::connect(daemon_->client_socket());
      if (!client.ok()) ::_exit(3);
      auto layer = client->create_layer(spec("layer" + std::to_string(c)));
      if (!layer.ok()) ::_exit(4);
      std::mt19937 rng(c);
      std::normal_distribution<float> n;
      const int64_t S = 24 + 8 * c;
      std::vector<float> x(S * 16), y(S * 16), dy(S * 16), dx(S * 16);
      for (int step = 0; step < kSteps; ++step) {
        for (float& v : x) v = n(rng);
        for (float& v : dy) v = n(rng);
        // Two micro-batches in flight, backwards in reverse order.
        auto t1 = layer->submit_forward(x.data(), S, y.data());
        auto t2 = layer->submit_forward(x.data(), S, y.data());
        if (!t1.ok() || !t2.ok() || !client->wait(*t1).ok() || !client->wait(*t2).ok()) ::_exit(5);
        if (!layer->backward(t2->sequence, dy.data(), 0.01f, dx.data()).ok()) ::_exit(6);
        if (!layer->backward(t1->sequence, dy.data(), 0.01f, dx.data()).ok()) ::_exit(7);
        if (!layer->step().ok() || !layer->zero_grad().ok()) ::_exit(8);
      }
      ::_exit(0);
    }
    children.push_back(pid);
  }
  for (pid_t pid : children) {
    int status = 0;
    ASSERT_EQ(::waitpid(pid, &status, 0), pid);
    EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "client exit " << WEXITSTATUS(status) << "\n"
                                                              << daemon_->log();
  }
  const nlohmann::json layers = ctl_json("layers");
  ASSERT_TRUE(layers.contains("layers")) << layers;
  int trained = 0;
  for (const auto& l : layers["layers"]) {
    EXPECT_EQ(l["pending_backwards"], 0) << l;
    if (l["step"] == kSteps) ++trained;
  }
  EXPECT_EQ(trained, kClients);
}

// Client::close while another thread calls on the same client: that thread's calls fail with
// Unavailable, none crashes or waits on a freed session (close used to free it under them).
TEST_F(ClientDaemon, CloseWhileAnotherThreadCallsFailsThatThreadsCallsCleanly) {
  for (int round = 0; round < 20; ++round) {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    std::atomic<bool> started{false};
    Status last;
    std::thread pinger([&] {
      for (;;) {
        last = client->ping();
        started = true;
        if (!last.ok()) return;
      }
    });
    while (!started) std::this_thread::yield();
    client->close();
    pinger.join();
    EXPECT_EQ(last.code(), StatusCode::kUnavailable) << last;
    EXPECT_NE(last.message().find("closed"), std::string::npos) << last;
  }
}

// A forked child cannot use its parent's session, abandon included: an abandon there pushed a
// discard into the parent's ring under the request id the parent used next (the parent's
// backward then returned stale bytes, and its next call found its session closed).
TEST_F(ClientDaemon, AForkedChildsAbandonLeavesTheParentsSessionAlone) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(spec("forked"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  const int64_t S = 16;
  std::vector<float> x(S * 16), y(S * 16), dy(S * 16, 0.5f), dx(S * 16, -7.f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  auto ticket = layer->submit_forward(x.data(), S, y.data());
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    client->abandon(*ticket);
    ::_exit(client->ping().code() == StatusCode::kUnavailable ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "child exit " << WEXITSTATUS(status);
  ASSERT_TRUE(client->wait(*ticket).ok());
  ASSERT_TRUE(layer->backward(ticket->sequence, dy.data(), 0.f, dx.data()).ok());
  // The same backward on a fresh forward of the same x: the child's abandon changed nothing.
  std::vector<float> y2(S * 16), dx2(S * 16);
  ASSERT_TRUE(layer->forward(x.data(), S, y2.data()).ok());
  ASSERT_TRUE(layer->backward(dy.data(), 0.f, dx2.data()).ok());
  EXPECT_EQ(y, y2);
  EXPECT_EQ(dx, dx2);
  EXPECT_TRUE(client->ping().ok());
}

// Closing a client in the process that connected ends its session at once, even while a child
// forked after the connect (a DataLoader worker) still holds a copy of the socket.
TEST_F(ClientDaemon, ClosingInTheParentEndsTheSessionWhileAForkedChildLives) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  int hold[2];
  ASSERT_EQ(::pipe(hold), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(hold[1]);
    char c;
    (void)::read(hold[0], &c, 1);  // until the parent lets go
    ::_exit(0);
  }
  ::close(hold[0]);
  ASSERT_EQ(ctl_json("status")["sessions"], 1);
  client->close();
  int64_t sessions = 1;
  for (int i = 0; i < 500 && sessions != 0; ++i) {
    sessions = ctl_json("status")["sessions"].get<int64_t>();
    if (sessions != 0) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::close(hold[1]);
  int status = 0;
  ::waitpid(child, &status, 0);
  EXPECT_EQ(sessions, 0) << "the session outlived its client's close while a forked child lived";
}

TEST_F(ClientDaemon, KilledClientFreesItsSessionAndPendingForwards) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto client = client::Client::connect(daemon_->client_socket());
    if (!client.ok()) ::_exit(3);
    auto layer = client->create_layer(spec("victim", 256));
    if (!layer.ok()) ::_exit(4);
    const int64_t S = 2048;
    std::vector<float> x(S * 256, 0.5f), y(S * 256);
    for (int i = 0;; ++i) (void)layer->forward(x.data(), S, y.data());  // never backward
  }
  // Wait until the victim has forwards pending, then kill it mid-stream.
  for (int i = 0; i < 500; ++i) {
    const nlohmann::json layers = ctl_json("layers");
    bool pending = false;
    for (const auto& l : layers.value("layers", nlohmann::json::array())) pending |= l["pending_backwards"] > 1;
    if (pending) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  ::waitpid(pid, &status, 0);
  // The session goes, its pending forwards go, the layer stays (owned by the tenant).
  bool freed = false;
  for (int i = 0; i < 500 && !freed; ++i) {
    const nlohmann::json status_json = ctl_json("status");
    const nlohmann::json layers = ctl_json("layers");
    freed = status_json["sessions"] == 0 && !layers["layers"].empty() && layers["layers"][0]["pending_backwards"] == 0;
    if (!freed) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(freed) << daemon_->log();
  // Another client of the tenant re-attaches to the layer and uses it.
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("victim");
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::vector<float> x(8 * 256, 1.f), y(8 * 256);
  EXPECT_TRUE(layer->infer(x.data(), 8, y.data()).ok());
}

// What layers held goes back to the system when they go. Their tensors are blocks of megabytes,
// which glibc serves from its heaps once a freed block has raised its mmap threshold, and freed
// there they stayed resident: six layers trained at a few batch sizes and destroyed left ~390 MB
// behind (1.7 GB after six such rounds). tuteld fixes the threshold at 1 MiB; this leaves ~20 MB.
TEST_F(ClientDaemon, ALayersMemoryGoesBackToTheSystemWhenItIsDestroyed) {
  if (tutel::testing::kUnderSanitizer)
    GTEST_SKIP() << "the sanitizers' allocators do not follow glibc's mmap threshold, and their shadow "
                    "and trace memory count in VmRSS";
  const char* tunables = std::getenv("GLIBC_TUNABLES");
  if (std::getenv("MALLOC_MMAP_THRESHOLD_") != nullptr ||
      (tunables != nullptr && std::strstr(tunables, "mmap_threshold") != nullptr))
    GTEST_SKIP() << "this environment sets glibc's mmap threshold, which tuteld leaves to stand";
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  const int64_t M = 256;
  std::vector<float> x(300 * M, 0.25f), y(300 * M), dx(300 * M);
  // One round first: what stays for good (oneDNN's kernels and caches, the pool's threads).
  for (int round = 0; round < 2; ++round) {
    const int64_t before = daemon_->resident_mib();
    ASSERT_GT(before, 0) << "no VmRSS for the daemon in /proc";
    std::vector<client::Layer> layers;
    for (int i = 0; i < 6; ++i) {
      const int H = 512 << (i % 3);
      auto layer = client->create_layer("name = \"l" + std::to_string(round) + "_" + std::to_string(i) +
                                        "\"\nexperts = 8\nmodel_dim = 256\nhidden = " + std::to_string(H) +
                                        "\nk = 2\ninit_seed = 1\n");
      ASSERT_TRUE(layer.ok()) << layer.status();
      for (int64_t S : {1, 7, 33, 100, 300}) {
        ASSERT_TRUE(layer->forward(x.data(), S, y.data()).ok());
        ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
        ASSERT_TRUE(layer->infer(x.data(), S, y.data()).ok());
      }
      layers.push_back(std::move(*layer));
    }
    const int64_t held = daemon_->resident_mib();
    for (auto& layer : layers) ASSERT_TRUE(layer.destroy().ok());
    const int64_t after = daemon_->resident_mib();
    SCOPED_TRACE(::testing::Message() << "round " << round << ": " << before << " MiB before, " << held
                                      << " MiB with the layers, " << after << " MiB after");
    ASSERT_GT(held - before, 300) << "the layers should have held hundreds of MiB";
    if (round == 1) {
      EXPECT_LT(after - before, 64) << "their memory should have gone back to the system";
    }
  }
}

// A destroyed layer stays destroyed across restarts: its checkpoint in state_dir goes with it
// (it used to come back, with its old step, at the next start).
TEST_F(ClientDaemon, ADestroyedLayerDoesNotComeBackAtTheNextStart) {
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE(client->create_layer(spec("gone")).ok());
    ASSERT_TRUE(client->create_layer(spec("kept")).ok());
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();  // both checkpointed
  ASSERT_TRUE(daemon_->start());
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto gone = client->attach_layer("gone");
    ASSERT_TRUE(gone.ok()) << gone.status() << daemon_->log();  // restored
    ASSERT_TRUE(gone->destroy().ok());
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(client->attach_layer("gone").status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(client->attach_layer("kept").ok());
}

// tutelctl destroy: the operator destroys a layer as its client would, while a session holds its
// handle: the holder's next request answers NotFound, the other layer serves on, and the
// checkpoint goes with it (the next start does not bring it back). No such layer: exit 1 naming it.
TEST_F(ClientDaemon, TheOperatorDestroysALayerAsItsClientWould) {
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE(client->create_layer(spec("doomed")).ok());
    ASSERT_TRUE(client->create_layer(spec("kept")).ok());
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();  // both checkpointed
  ASSERT_TRUE(daemon_->start());
  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket();
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto doomed = client->attach_layer("doomed");
    auto kept = client->attach_layer("kept");
    ASSERT_TRUE(doomed.ok() && kept.ok()) << daemon_->log();
    std::vector<float> x(8 * 16, 0.25f), y(8 * 16);
    ASSERT_TRUE(doomed->forward(x.data(), 8, y.data()).ok());
    auto [code, out] = run_command(ctl + " destroy default/doomed");
    EXPECT_EQ(code, 0) << out;
    EXPECT_EQ(out, "default/doomed destroyed\n");
    const Status after = doomed->forward(x.data(), 8, y.data());
    EXPECT_EQ(after.code(), StatusCode::kNotFound) << after;
    EXPECT_TRUE(kept->forward(x.data(), 8, y.data()).ok());
    EXPECT_EQ(client->attach_layer("doomed").status().code(), StatusCode::kNotFound);
    EXPECT_FALSE(std::filesystem::exists(daemon_->dir() + "/state/default/doomed.safetensors"));
    EXPECT_NE(daemon_->log().find("layer default/doomed destroyed by the operator"), std::string::npos)
        << daemon_->log();
    const nlohmann::json layers = ctl_json("layers");
    ASSERT_EQ(layers["layers"].size(), 1u) << layers.dump();
    EXPECT_EQ(layers["layers"][0]["name"], "kept");
    // Twice, or a layer that never was: refused, naming it.
    for (const std::string missing : {"default/doomed", "nobody/kept"}) {
      auto [again, message] = run_command(ctl + " destroy " + missing);
      EXPECT_EQ(again, 1) << message;
      EXPECT_NE(message.find("NotFound: no layer " + missing + " to destroy"), std::string::npos) << message;
    }
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(client->attach_layer("doomed").status().code(), StatusCode::kNotFound);
  EXPECT_TRUE(client->attach_layer("kept").ok());
}

// A group layer is checkpointed at exit but not restored at start (its peers restart on their own
// schedule): created again with the same spec, it resumes from its checkpoint, with its step and
// weights, and the checkpoint written at the next exit carries on from there (it used to be
// created afresh, and its trained checkpoint overwritten).
TEST_F(ClientDaemon, AGroupLayerCreatedAgainResumesFromItsCheckpoint) {
  const std::string group_spec = spec("g") + "[group]\ncoordinator = \"127.0.0.1:" + std::to_string(free_port()) +
                                 "\"\nsize = 1\nrank = 0\n";
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16), dx(8 * 16), y_before(8 * 16), y_after(8 * 16);
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->create_layer(group_spec);
    ASSERT_TRUE(layer.ok()) << layer.status();
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(layer->forward(x.data(), 8, y.data()).ok());
      ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
      ASSERT_TRUE(layer->step().ok());
    }
    ASSERT_TRUE(layer->infer(x.data(), 8, y_before.data()).ok());
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_EQ(client->attach_layer("g").status().code(), StatusCode::kNotFound) << "not restored at start";
  // With other timeouts (they change nothing the layer holds): the same layer.
  auto layer = client->create_layer(group_spec + "bootstrap_timeout_ms = 7000\ncollective_timeout_ms = 6000\n");
  ASSERT_TRUE(layer.ok()) << layer.status() << daemon_->log();
  EXPECT_EQ(layer->info().step, 3);
  EXPECT_EQ(layer->info().kept_aside, "") << "a layer that resumed moved nothing aside";
  ASSERT_TRUE(layer->infer(x.data(), 8, y_after.data()).ok());
  EXPECT_EQ(y_after, y_before) << "the trained weights are back";
  EXPECT_NE(daemon_->log().find("resumes from"), std::string::npos) << daemon_->log();

  // Another layer under the name (here another model_dim) is a new layer: it starts afresh.
  layer = Status::Aborted("released");
  client = Status::Aborted("disconnected");
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  auto other_client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(other_client.ok()) << other_client.status();
  std::string other_spec = group_spec;
  other_spec.replace(other_spec.find("model_dim = 16"), 14, "model_dim = 8");
  auto other = other_client->create_layer(other_spec);
  ASSERT_TRUE(other.ok()) << other.status() << daemon_->log();
  EXPECT_EQ(other->info().step, 0);
  EXPECT_NE(daemon_->log().find("is created afresh"), std::string::npos) << daemon_->log();
  // The trained checkpoint is not lost (the new layer's would replace it at exit, a destroy
  // delete it): it is kept among the tenant's checkpoints, and loads into a layer of its spec.
  const std::string kept = kept_aside(*daemon_, "g.superseded-");
  ASSERT_FALSE(kept.empty()) << daemon_->log();
  EXPECT_EQ(other->info().kept_aside, kept) << "the creation's reply does not say where the checkpoint went";
  ASSERT_TRUE(other->destroy().ok());
  auto twin = other_client->create_layer(spec("twin"));
  ASSERT_TRUE(twin.ok()) << twin.status();
  ASSERT_TRUE(twin->load(kept).ok()) << daemon_->log();
  ASSERT_TRUE(twin->infer(x.data(), 8, y_after.data()).ok());
  EXPECT_EQ(y_after, y_before) << "the kept checkpoint holds the trained weights";
}

// A layer outside any group created under a group layer's name, while that group layer waits
// for its ranks to create it again, is another layer: the group's checkpoint moves aside, as
// for a group of another spec (the new layer's destroy deleted it, its exit checkpoint replaced
// it: a trainer's "attach, else create" without [group] lost the trained group layer).
TEST_F(ClientDaemon, ALayerCreatedUnderADormantGroupLayersNameKeepsItsCheckpointAside) {
  const std::string group_spec = spec("g") + "[group]\ncoordinator = \"127.0.0.1:" + std::to_string(free_port()) +
                                 "\"\nsize = 1\nrank = 0\n";
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16), dx(8 * 16), y_before(8 * 16), y_after(8 * 16);
  {
    auto client = client::Client::connect(daemon_->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->create_layer(group_spec);
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_TRUE(layer->forward(x.data(), 8, y.data()).ok());
    ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
    ASSERT_TRUE(layer->step().ok());
    ASSERT_TRUE(layer->infer(x.data(), 8, y_before.data()).ok());
  }
  ASSERT_EQ(daemon_->stop(), 0) << daemon_->log();
  ASSERT_TRUE(daemon_->start());
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto plain = client->create_layer(spec("g"));
  ASSERT_TRUE(plain.ok()) << plain.status() << daemon_->log();
  EXPECT_EQ(plain->info().step, 0);
  const std::string kept = kept_aside(*daemon_, "g.superseded-");
  ASSERT_FALSE(kept.empty()) << daemon_->log();
  EXPECT_EQ(plain->info().kept_aside, kept) << "the creation's reply does not say where the checkpoint went";
  ASSERT_TRUE(plain->destroy().ok());
  auto twin = client->create_layer(spec("twin"));
  ASSERT_TRUE(twin.ok()) << twin.status();
  ASSERT_TRUE(twin->load(kept).ok()) << daemon_->log();
  ASSERT_TRUE(twin->infer(x.data(), 8, y_after.data()).ok());
  EXPECT_EQ(y_after, y_before) << "the kept checkpoint holds the trained group layer's weights";
}

// Threads may share one client: their calls take turns. Two threads infer on the client's two
// layers and a third runs training forwards and their backwards (by sequence) on a third, all
// at once, many times: every call succeeds and every result is the one the same call gives
// alone. (Two threads on one client corrupted the session: one took the other's completions,
// or a block of the arena was freed twice.)
// A ticket names a request of the client that submitted it: another client of the process
// refuses it. Every client counted its requests from 1, so the second client's wait took its own
// request of the same number (its real wait then failed), and an abandon gave up that one.
TEST_F(ClientDaemon, AnotherClientsTicketIsRefused) {
  auto first = client::Client::connect(daemon_->client_socket());
  auto second = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(first.ok() && second.ok());
  auto layer = first->create_layer(spec("shared"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  auto same = second->attach_layer("shared");
  ASSERT_TRUE(same.ok()) << same.status();
  std::vector<float> x(4 * 16, 0.5f), y1(4 * 16), y2(4 * 16), expected(4 * 16);
  ASSERT_TRUE(layer->infer(x.data(), 4, expected.data()).ok());
  ASSERT_TRUE(same->infer(x.data(), 4, y2.data()).ok());  // each client has sent as many requests
  auto t1 = layer->submit_forward(x.data(), 4, y1.data(), false);
  auto t2 = same->submit_forward(x.data(), 4, y2.data(), false);
  ASSERT_TRUE(t1.ok() && t2.ok());
  const auto foreign = second->wait(*t1);
  EXPECT_EQ(foreign.status().code(), StatusCode::kInvalidArgument) << foreign.status();
  second->abandon(*t1);  // names nothing there: a no-op
  ASSERT_TRUE(second->wait(*t2).ok());
  ASSERT_TRUE(first->wait(*t1).ok());
  EXPECT_EQ(y1, expected);
  EXPECT_EQ(y2, expected);
}

TEST_F(ClientDaemon, ThreadsSharingOneClientTakeTurns) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  constexpr int64_t kTokens = 8, kModel = 16;
  constexpr int kRounds = 300;
  std::vector<client::Layer> layers;
  std::vector<std::vector<float>> x(3), want_y(3);
  for (int i = 0; i < 3; ++i) {
    auto layer = client->create_layer(spec("shared" + std::to_string(i), kModel, 5 + i));
    ASSERT_TRUE(layer.ok()) << layer.status();
    layers.push_back(std::move(*layer));
    for (int64_t j = 0; j < kTokens * kModel; ++j) x[i].push_back(normal(rng));
    want_y[i].resize(kTokens * kModel);
    ASSERT_TRUE(layers[i].infer(x[i].data(), kTokens, want_y[i].data()).ok());
  }
  std::vector<float> want_dx(kTokens * kModel), dy(kTokens * kModel, 0.5f);
  {  // the training thread's dx, alone (its gradients are zeroed below)
    client::ForwardInfo info;
    std::vector<float> y(kTokens * kModel);
    ASSERT_TRUE(layers[2].forward(x[2].data(), kTokens, y.data(), &info).ok());
    ASSERT_TRUE(layers[2].backward(info.sequence, dy.data(), 0.f, want_dx.data()).ok());
  }
  std::vector<Status> failures(3);
  std::vector<int> mismatches(3, 0);
  auto run = [&](int i) {
    std::vector<float> y(kTokens * kModel), dx(kTokens * kModel);
    for (int round = 0; round < kRounds && failures[i].ok(); ++round) {
      if (i < 2) {
        failures[i] = layers[i].infer(x[i].data(), kTokens, y.data());
        mismatches[i] += y != want_y[i];
        continue;
      }
      client::ForwardInfo info;
      failures[i] = layers[i].forward(x[i].data(), kTokens, y.data(), &info);
      if (failures[i].ok()) failures[i] = layers[i].backward(info.sequence, dy.data(), 0.f, dx.data());
      mismatches[i] += (y != want_y[i]) + (dx != want_dx);
    }
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < 3; ++i) threads.emplace_back(run, i);
  for (auto& t : threads) t.join();
  for (int i = 0; i < 3; ++i) {
    EXPECT_TRUE(failures[i].ok()) << "thread " << i << ": " << failures[i];
    EXPECT_EQ(mismatches[i], 0) << "thread " << i;
  }
  EXPECT_TRUE(client->is_connected());
  EXPECT_EQ(layers[2].pending_backwards(), 0u);
}

TEST_F(ClientDaemon, TutelctlAndMetricsReportTheWork) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("observed"));
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(32 * 16, 0.25f), y(32 * 16), dx(32 * 16);
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
  ASSERT_TRUE(layer->step().ok());

  const nlohmann::json status = ctl_json("status");
  EXPECT_EQ(status["sessions"], 1);
  EXPECT_EQ(status["layers"], 1);
  EXPECT_EQ(status["out_of_service"], nlohmann::json::array()) << status;  // every rank serves
  auto [scode, status_text] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " status");
  EXPECT_EQ(scode, 0) << status_text;
  std::istringstream status_lines(status_text);
  bool none_out = false;
  for (std::string line; std::getline(status_lines, line);)
    none_out |= line.rfind("out of service", 0) == 0 && line.size() >= 4 && line.substr(line.size() - 4) == "none";
  EXPECT_TRUE(none_out) << status_text;
  const nlohmann::json tenants = ctl_json("tenants");
  EXPECT_EQ(tenants["tenants"][0]["name"], "default");
  EXPECT_GT(tenants["tenants"][0]["memory_bytes"], 0);
  auto [code, table] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " layers");
  EXPECT_EQ(code, 0);
  EXPECT_NE(table.find("default/observed"), std::string::npos) << table;

  // Prometheus over HTTP on loopback, at the port the daemon reports.
  const int port = status["metrics_port"];
  ASSERT_GT(port, 0);
  auto scrape = [&](const std::string& request) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    std::string response;
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        ::write(fd, request.data(), request.size()) != static_cast<ssize_t>(request.size())) {
      ::close(fd);
      return response;
    }
    char buf[4096];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof(buf))) > 0) response.append(buf, n);
    ::close(fd);
    return response;
  };
  // A request typed by hand ends its lines with a bare LF: answered too.
  EXPECT_NE(scrape("GET /metrics HTTP/1.0\n\n").find("200 OK"), std::string::npos);
  // A head past 8 KiB is refused whether it arrives in one piece or several (it was answered when
  // one read took all of it, as here: short enough to be read whole, so no reset loses the reply).
  const std::string long_head = "GET /metrics HTTP/1.1\r\nX-Pad: " + std::string(9000, 'a') + "\r\n\r\n";
  EXPECT_NE(scrape(long_head).find("431 "), std::string::npos);
  const std::string response = scrape("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n");
  EXPECT_NE(response.find("200 OK"), std::string::npos) << response;
  for (const char* needle :
       {"tuteld_requests_total{tenant=\"default\",layer=\"observed\",op=\"forward\"} 1",
        "tuteld_requests_total{tenant=\"default\",layer=\"observed\",op=\"step\"} 1", "tuteld_request_seconds_bucket",
        "tuteld_tokens_total{tenant=\"default\",layer=\"observed\"} 32", "tuteld_capacity{", "tuteld_tenant_memory_bytes",
        "tuteld_active_sessions 1", "tuteld_rank_in_service{rank=\"0\",device=\"cpu:0\"} 1"})
    EXPECT_NE(response.find(needle), std::string::npos) << needle << "\n" << response;

  // A request the daemon refuses is counted as an error of its layer and operation.
  EXPECT_FALSE(layer->load("no-such-file.safetensors").ok());
  auto [mcode, metrics] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " metrics");
  EXPECT_EQ(mcode, 0);
  EXPECT_NE(metrics.find("tuteld_errors_total{tenant=\"default\",layer=\"observed\",op=\"load\"} 1"),
            std::string::npos)
      << metrics;

  // Admin checkpoint to an absolute path, in a directory that does not exist yet.
  const std::string ckpt = daemon_->dir() + "/admin-ckpt/observed.safetensors";
  auto [ccode, cout] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() +
                           " checkpoint default/observed " + ckpt);
  EXPECT_EQ(ccode, 0) << cout;
  EXPECT_TRUE(std::filesystem::exists(ckpt));
}

// A client's name is its own text: a newline in it must not forge a line of the daemon's log,
// and tutelctl shows it escaped.
TEST_F(ClientDaemon, AClientsNameIsEscapedBeforeItIsLoggedOrShown) {
  client::ClientOptions options;
  options.name = "trainer\nERROR forged line";
  auto client = client::Client::connect(daemon_->client_socket(), options);
  ASSERT_TRUE(client.ok()) << client.status();
  const nlohmann::json sessions = ctl_json("sessions")["sessions"];
  ASSERT_EQ(sessions.size(), 1u) << sessions.dump();
  EXPECT_EQ(sessions[0]["client"], "trainer\\x0aERROR forged line") << sessions.dump();
  const std::string log = daemon_->log();
  EXPECT_EQ(log.find("\nERROR forged line"), std::string::npos) << log;
  EXPECT_NE(log.find("client 'trainer\\x0aERROR forged line'"), std::string::npos) << log;
  // The table shows the daemon's escaped text as it is (escaped once: a backslash was doubled).
  auto [code, table] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " sessions");
  EXPECT_EQ(code, 0) << table;
  EXPECT_NE(table.find("trainer\\x0aERROR forged line"), std::string::npos) << table;
  EXPECT_EQ(table.find("\\\\x0a"), std::string::npos) << table;
  // A long name is cut where a character begins: 'a' and 100 two-byte characters, 201 bytes,
  // become 'a' and 63 of them (127 bytes), not 'a', 63 and half of the 64th.
  client::ClientOptions long_name;
  long_name.name = "a";
  for (int i = 0; i < 100; ++i) long_name.name += "\xc3\xa9";
  auto second = client::Client::connect(daemon_->client_socket(), long_name);
  ASSERT_TRUE(second.ok()) << second.status();
  bool found = false;
  const nlohmann::json now = ctl_json("sessions")["sessions"];
  for (const auto& session : now)
    if (session["client"].get<std::string>().rfind("a\xc3\xa9", 0) == 0) {
      found = true;
      EXPECT_EQ(session["client"].get<std::string>(), long_name.name.substr(0, 127)) << session.dump();
    }
  EXPECT_TRUE(found) << now.dump();
}

// A destroyed layer's series go with it: layers created and destroyed under ever new names
// must not grow the daemon's metrics (and the admin reply that carries them) for good.
TEST_F(ClientDaemon, ADestroyedLayersSeriesGoWithIt) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  std::vector<float> x(32 * 16, 0.25f), y(32 * 16);
  for (const char* name : {"churn0", "churn1"}) {
    auto layer = client->create_layer(spec(name));
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_TRUE(layer->forward(x.data(), 32, y.data()).ok());
    const std::string during = ctl_json("metrics")["text"].get<std::string>();
    EXPECT_NE(during.find(std::string("layer=\"") + name + "\""), std::string::npos) << during;
    ASSERT_TRUE(layer->destroy().ok());
  }
  const std::string after = ctl_json("metrics")["text"].get<std::string>();
  EXPECT_EQ(after.find("layer=\"churn"), std::string::npos) << after;
  // Their parameters are gone from the tenant's memory too.
  EXPECT_NE(after.find("\ntuteld_tenant_memory_bytes{tenant=\"default\"} 0\n"), std::string::npos) << after;
}

// The value of the series `name{labels}` in Prometheus text, or -1 when it is absent.
double metric_value(const std::string& text, const std::string& series) {
  const size_t at = text.find("\n" + series + " ");
  return at == std::string::npos ? -1 : std::stod(text.substr(at + series.size() + 2));
}

// Prometheus's process series show the daemon's own resources, as /proc shows them from outside.
TEST_F(ClientDaemon, TheMetricsShowTheProcesssOwnResources) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  ASSERT_TRUE(client->create_layer(spec("resources")).ok());
  const double fds = static_cast<double>(daemon_->open_descriptors());
  const double threads = static_cast<double>(daemon_->threads());
  const double resident = static_cast<double>(daemon_->resident_mib()) * (1 << 20);
  const std::string text = ctl_json("metrics")["text"].get<std::string>();
  const double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  // Nothing else runs on the daemon meanwhile but tutelctl's own connection and its thread.
  EXPECT_NEAR(metric_value(text, "process_open_fds"), fds, 4) << text;
  EXPECT_NEAR(metric_value(text, "tuteld_threads"), threads, 4) << text;
  EXPECT_NEAR(metric_value(text, "process_resident_memory_bytes"), resident, 0.25 * resident + (32 << 20)) << text;
  EXPECT_GE(metric_value(text, "process_virtual_memory_bytes"), metric_value(text, "process_resident_memory_bytes"));
  EXPECT_GE(metric_value(text, "process_max_fds"), metric_value(text, "process_open_fds"));
  EXPECT_GE(metric_value(text, "process_cpu_seconds_total"), 0) << text;
  const double started = metric_value(text, "process_start_time_seconds");
  EXPECT_LE(started, now + 1) << text;
  EXPECT_GT(started, now - 600) << "the daemon started with this test: " << text;
  for (const char* type : {"# TYPE process_cpu_seconds_total counter", "# TYPE process_resident_memory_bytes gauge"})
    EXPECT_NE(text.find(type), std::string::npos) << type;
}

// A backward for dx alone (ParamGrads::kKeep) between a plain backward and a step: its dx is a
// plain backward's, and the step is the plain backward's alone. Layer a: plain (x1, dy1), then
// kKeep (x2, dy2), step. Layer b, a twin: plain (x2, dy2) for the dx to compare, zero_grad, plain
// (x1, dy1), step. The two must then give the same outputs, bit for bit.
TEST_F(ClientDaemon, ABackwardForDxAloneLeavesTheParameterGradients) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto a = client->create_layer(spec("dx_only_a"));
  auto b = client->create_layer(spec("dx_only_b"));  // the same init_seed: the same parameters
  ASSERT_TRUE(a.ok() && b.ok());
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  auto random = [&] {
    std::vector<float> v(32 * 16);
    for (float& f : v) f = normal(rng);
    return v;
  };
  const std::vector<float> x1 = random(), x2 = random(), dy1 = random(), dy2 = random();
  std::vector<float> y(32 * 16), dx(32 * 16), dx_kept(32 * 16), dx_plain(32 * 16), before(32 * 16);
  ASSERT_TRUE(a->infer(x1.data(), 32, before.data()).ok());
  client::ForwardInfo info;
  auto train = [&](client::Layer& layer, const std::vector<float>& x, const std::vector<float>& dy,
                   std::vector<float>& dx_out, client::Layer::ParamGrads grads) {
    ASSERT_TRUE(layer.forward(x.data(), 32, y.data(), &info).ok());
    ASSERT_TRUE(layer.backward(info.sequence, dy.data(), 0.5f, dx_out.data(), grads).ok());
  };
  using client::Layer;
  ASSERT_NO_FATAL_FAILURE(train(*a, x1, dy1, dx, Layer::ParamGrads::kAccumulate));
  ASSERT_NO_FATAL_FAILURE(train(*a, x2, dy2, dx_kept, Layer::ParamGrads::kKeep));
  ASSERT_TRUE(a->step().ok());
  ASSERT_NO_FATAL_FAILURE(train(*b, x2, dy2, dx_plain, Layer::ParamGrads::kAccumulate));
  ASSERT_TRUE(b->zero_grad().ok());
  ASSERT_NO_FATAL_FAILURE(train(*b, x1, dy1, dx, Layer::ParamGrads::kAccumulate));
  ASSERT_TRUE(b->step().ok());
  EXPECT_EQ(dx_kept, dx_plain);
  std::vector<float> ya(32 * 16), yb(32 * 16);
  ASSERT_TRUE(a->infer(x1.data(), 32, ya.data()).ok());
  ASSERT_TRUE(b->infer(x1.data(), 32, yb.data()).ok());
  EXPECT_EQ(ya, yb) << "the step after a dx-only backward is not the plain backward's alone";
  EXPECT_NE(ya, before) << "the step moved nothing";
}

// A forward's own noise key selects its gate noise: a forward run again with its key (a trainer's
// recomputation under reentrant checkpointing) draws the same noise and so gives the same y and
// the same gradients, an inference with the key is that training forward's y (train mode under
// no_grad), and another key, or none, draws other noise. A forward without noise takes no key.
TEST_F(ClientDaemon, AForwardsNoiseKeyDrawsItsNoiseAgain) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  // Two layers of one init_seed and noise_seed: the same parameters, the same noise per key.
  auto noisy = [](const std::string& name) {
    std::string text = spec(name);
    return text.insert(text.find("[optimizer]"), "gate_noise = 1.0\nnoise_seed = 7\n");
  };
  auto a = client->create_layer(noisy("keyed_a"));
  auto b = client->create_layer(noisy("keyed_b"));
  ASSERT_TRUE(a.ok() && b.ok()) << a.status() << b.status();
  EXPECT_EQ(a->info().gate_noise, 1.0);
  std::mt19937_64 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(32 * 16), dy(32 * 16);
  for (float& f : x) f = normal(rng);
  for (float& f : dy) f = normal(rng);
  const uint64_t key = rng(), other_key = key ^ 1;
  using Mode = client::Layer::ForwardMode;
  using Key = client::Layer::NoiseKey;
  // y of one forward on `layer` (waited for), its sequence in *sequence for a training one.
  auto run = [&](client::Layer& layer, Mode mode, std::optional<uint64_t> noise_key, uint64_t* sequence = nullptr) {
    std::vector<float> y(32 * 16);
    auto ticket = noise_key ? layer.submit_forward(x.data(), 32, y.data(), mode, Key{*noise_key})
                            : layer.submit_forward(x.data(), 32, y.data(), mode);
    EXPECT_TRUE(ticket.ok()) << ticket.status();
    if (!ticket.ok()) return y;
    EXPECT_TRUE(client->wait(*ticket).ok());
    if (sequence != nullptr) *sequence = ticket->sequence;
    return y;
  };
  uint64_t first = 0, again = 0;
  const std::vector<float> y_first = run(*a, Mode::kTraining, key, &first);
  const std::vector<float> y_inferred = run(*a, Mode::kInference, key);
  const std::vector<float> y_again = run(*b, Mode::kTraining, key, &again);
  EXPECT_EQ(y_inferred, y_first) << "an inference with the key is not the training forward's y";
  EXPECT_EQ(y_again, y_first) << "the key's recomputation drew other noise";
  EXPECT_NE(run(*a, Mode::kInference, other_key), y_first) << "another key drew the same noise";
  EXPECT_NE(run(*a, Mode::kInference, std::nullopt), y_first) << "an inference without a key drew noise";
  // The same noise, the same routing: both layers' gradients, and so their steps, are alike.
  std::vector<float> dx_a(32 * 16), dx_b(32 * 16);
  ASSERT_TRUE(a->backward(first, dy.data(), 0.5f, dx_a.data()).ok());
  ASSERT_TRUE(b->backward(again, dy.data(), 0.5f, dx_b.data()).ok());
  EXPECT_EQ(dx_a, dx_b);
  ASSERT_TRUE(a->step().ok());
  ASSERT_TRUE(b->step().ok());
  EXPECT_EQ(run(*a, Mode::kInference, key), run(*b, Mode::kInference, key)) << "the steps differ";
  // A forward without gate noise takes no key (the library refuses it before sending).
  std::vector<float> y(32 * 16);
  auto refused = a->submit_forward(x.data(), 32, y.data(), Mode::kTrainingWithoutNoise, Key{key});
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument) << refused.status();
}

// A step, load or import between a training forward and its backward changes the parameters the
// backward runs with, not the activations the forward saved: the backward was the gradient of no
// function, returned without a word (a review measured dx off by 2.4 against either set of
// weights). It is refused and the forward dropped; backwards before the step, and a step that
// applies nothing (no gradients since zero_grad), change nothing of this.
TEST_F(ClientDaemon, ABackwardAfterTheParametersChangedIsRefused) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(spec("stale_forward"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(32 * 16), y(32 * 16), dy(32 * 16), dx(32 * 16);
  for (float& f : x) f = normal(rng);
  for (float& f : dy) f = normal(rng);
  client::ForwardInfo a, b;
  auto refused = [&](const Status& s) {
    EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("the parameters changed"), std::string_view::npos) << s;
  };
  // Accumulation over two forwards, then the step: as before.
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &a).ok());
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &b).ok());
  ASSERT_TRUE(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()).ok());
  ASSERT_TRUE(layer->backward(b.sequence, dy.data(), 0.5f, dx.data()).ok());
  ASSERT_TRUE(layer->save("stale.safetensors").ok());
  // A forward, a step that applies the gradients, its backward: refused, and the forward gone.
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &a).ok());
  auto step = layer->step();
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 1);
  refused(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()));
  EXPECT_FALSE(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()).ok());
  // A step with nothing to apply leaves a forward's backward valid.
  ASSERT_TRUE(layer->zero_grad().ok());
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &a).ok());
  ASSERT_TRUE(layer->step().ok());
  ASSERT_TRUE(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()).ok());
  // A load between them: refused too.
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &a).ok());
  ASSERT_TRUE(layer->load("stale.safetensors").ok());
  refused(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()));
  // The layer trains on.
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &a).ok());
  ASSERT_TRUE(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()).ok());
  EXPECT_TRUE(layer->step().ok());
}

// An empty batch (0 tokens, null buffers) is a request like any other on a layer without
// [group]: the forward says capacity 0, nothing dropped, l_aux 0; a training forward waits for
// its backward, which consumes it and adds nothing to the gradients (their norm stays 0); the
// asynchronous calls and inference take it too, and the layer goes on. Negative counts are
// refused before anything is sent. (Expert-parallel layers: ExpertParallelDaemons.)
TEST_F(ClientDaemon, AnEmptyBatchIsAStepThatChangesNothing) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(spec("empty_batch"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  client::ForwardInfo info;
  info.l_aux = 1.f;
  info.capacity = info.dropped = -1;
  ASSERT_TRUE(layer->forward(nullptr, 0, nullptr, &info).ok());
  EXPECT_EQ(info.capacity, 0);
  EXPECT_EQ(info.dropped, 0);
  EXPECT_EQ(info.l_aux, 0.f);
  ASSERT_TRUE(layer->backward(info.sequence, nullptr, 0.5f, nullptr).ok());
  const Status twice = layer->backward(info.sequence, nullptr, 0.5f, nullptr);
  EXPECT_NE(twice.message().find("no training forward"), std::string_view::npos) << twice;
  auto norm = layer->grad_norm();
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_EQ(*norm, 0.0);
  ASSERT_TRUE(layer->infer(nullptr, 0, nullptr, &info).ok());
  auto ticket = layer->submit_forward(nullptr, 0, nullptr);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE(client->wait(*ticket).ok());
  auto back = layer->submit_backward(ticket->sequence, nullptr, 0.f, nullptr);
  ASSERT_TRUE(back.ok()) << back.status();
  ASSERT_TRUE(client->wait(*back).ok());
  norm = layer->grad_norm();
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_EQ(*norm, 0.0);
  const Status negative = layer->forward(nullptr, -1, nullptr, &info);
  EXPECT_EQ(negative.code(), StatusCode::kInvalidArgument) << negative;
  EXPECT_NE(negative.message().find("negative"), std::string_view::npos) << negative;
  // Null buffers with tokens are still refused, and a real batch runs as before.
  EXPECT_EQ(layer->forward(nullptr, 4, nullptr, &info).code(), StatusCode::kInvalidArgument);
  std::vector<float> x(4 * 16, 0.25f), y(4 * 16), dx(4 * 16);
  ASSERT_TRUE(layer->forward(x.data(), 4, y.data(), &info).ok());
  EXPECT_GT(info.capacity, 0);
  ASSERT_TRUE(layer->backward(info.sequence, y.data(), 0.f, dx.data()).ok());
  norm = layer->grad_norm();
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_GT(*norm, 0.0);
}

// Every parameter a layer saved as `name` (no optimizer state), in the file's order; empty when
// the file cannot be read.
std::vector<float> saved_parameters(const DaemonProcess& d, const std::string& name) {
  auto file = SafetensorsFile::open(d.dir() + "/state/default/checkpoints/" + name);
  if (!file.ok()) return {};
  std::vector<float> all;
  for (const SafetensorsTensor& t : file->tensors()) {
    if (t.name.rfind("optimizer.", 0) == 0 || t.dtype != DType::kF32) continue;
    const float* p = static_cast<const float*>(t.data);
    all.insert(all.end(), p, p + t.shape.numel());
  }
  return all;
}

// The gradient norm is the norm of what the step applies, and scale_grads scales it: after one
// SGD step (lr 0.05; on the first step momentum applies the gradient itself) from gradients
// scaled by 0.25, (before − after) / lr has the norm 0.25 · grad_norm (rtol 1e-3: the weights'
// f32 rounding over lr). A refused scale (beyond f32, not finite) changes nothing; a NaN in the
// gradients gives a NaN norm; zero_grad gives 0.
TEST_F(ClientDaemon, TheGradientNormIsTheStepsAndScaleGradsScalesIt) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("norm"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(32 * 16), dy(32 * 16), y(32 * 16), dx(32 * 16);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(layer->backward(dy.data(), 0.5f, dx.data()).ok());
  const Result<double> norm = layer->grad_norm();
  ASSERT_TRUE(norm.ok()) << norm.status();
  EXPECT_GT(*norm, 0.0);
  // Refused, and nothing changes: beyond f32 (the daemon), not finite (the library).
  EXPECT_EQ(layer->scale_grads(1e300).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->scale_grads(std::nan("")).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(layer->scale_grads(INFINITY).code(), StatusCode::kInvalidArgument);
  const Result<double> again = layer->grad_norm();
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, *norm);
  ASSERT_TRUE(layer->save("norm_before").ok());
  ASSERT_TRUE(layer->scale_grads(0.25).ok());
  const Result<double> scaled = layer->grad_norm();
  ASSERT_TRUE(scaled.ok()) << scaled.status();
  EXPECT_NEAR(*scaled, 0.25 * *norm, 1e-6 * *norm);
  ASSERT_TRUE(layer->step().ok());
  ASSERT_TRUE(layer->save("norm_after").ok());
  const std::vector<float> before = saved_parameters(*daemon_, "norm_before"),
                           after = saved_parameters(*daemon_, "norm_after");
  ASSERT_EQ(before.size(), after.size());
  ASSERT_FALSE(before.empty());
  double applied = 0;
  for (size_t i = 0; i < before.size(); ++i) {
    const double g = (double(before[i]) - double(after[i])) / 0.05;
    applied += g * g;
  }
  EXPECT_NEAR(std::sqrt(applied), 0.25 * *norm, 1e-3 * *norm);

  ASSERT_TRUE(layer->zero_grad().ok());
  const Result<double> zero = layer->grad_norm();
  ASSERT_TRUE(zero.ok()) << zero.status();
  EXPECT_EQ(*zero, 0.0);
  dy[7] = std::nanf("");
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(layer->backward(dy.data(), 0.5f, dx.data()).ok());
  const Result<double> nan = layer->grad_norm();
  ASSERT_TRUE(nan.ok()) << nan.status();
  EXPECT_TRUE(std::isnan(*nan)) << *nan;
}

// Every tensor of a state file (parameters and optimizer state), by name.
std::map<std::string, std::vector<float>> state_tensors(const SafetensorsFile& file) {
  std::map<std::string, std::vector<float>> out;
  for (const SafetensorsTensor& t : file.tensors()) {
    std::vector<float>& values = out[t.name];
    values.resize(t.nbytes / sizeof(float));
    std::memcpy(values.data(), t.data, t.nbytes);
  }
  return out;
}

// A layer's exported state: its tensors by name, and its metadata (both empty where it failed).
std::pair<std::map<std::string, std::vector<float>>, std::map<std::string, std::string>> exported_state(
    client::Layer& layer) {
  Result<client::ExportedState> state = layer.export_state();
  EXPECT_TRUE(state.ok()) << state.status();
  if (!state.ok()) return {};
  const int copy = state->dup_fd();
  Result<SafetensorsFile> file = SafetensorsFile::read(copy, "the export", 1 << 24);
  ::close(copy);
  EXPECT_TRUE(file.ok()) << file.status();
  if (!file.ok()) return {};
  return {state_tensors(*file), file->metadata()};
}

// A layer's exported state is the file save() writes, byte for byte; imported into another
// layer (another initialisation), it makes that layer the first one's twin: the same outputs,
// and after the same training step, the same parameters and momentum (so the step count and
// optimizer state came along), bit for bit. A file opened on disk imports as well.
TEST_F(ClientDaemon, AnExportedStateIsTheSavedFileAndImportingItMakesATwin) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto first = client->create_layer(spec("first"));
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = client->create_layer(spec("second", 16, /*init_seed=*/6));
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_GE(first->info().state_bytes, uint64_t{4 * 16 + 2 * 4 * 32 * 16 + 4 * 32 + 4 * 16} * 4 * 2);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  auto random = [&](size_t n) {
    std::vector<float> v(n);
    for (float& e : v) e = normal(rng);
    return v;
  };
  auto train_step = [&](client::Layer& layer, const std::vector<float>& x, const std::vector<float>& dy) {
    std::vector<float> y(32 * 16), dx(32 * 16);
    EXPECT_TRUE(layer.forward(x.data(), 32, y.data()).ok());
    EXPECT_TRUE(layer.backward(dy.data(), 0.5f, dx.data()).ok());
    EXPECT_TRUE(layer.step().ok());
    EXPECT_TRUE(layer.zero_grad().ok());
    return y;
  };
  for (int i = 0; i < 2; ++i) train_step(*first, random(32 * 16), random(32 * 16));

  ASSERT_TRUE(first->save("first.safetensors").ok());
  Result<client::ExportedState> exported = first->export_state();
  ASSERT_TRUE(exported.ok()) << exported.status();
  std::ifstream saved_file(daemon_->dir() + "/state/default/checkpoints/first.safetensors", std::ios::binary);
  const std::string saved((std::istreambuf_iterator<char>(saved_file)), std::istreambuf_iterator<char>());
  ASSERT_EQ(exported->size(), saved.size());
  EXPECT_EQ(0, std::memcmp(exported->data(), saved.data(), saved.size())) << "the export is not the saved file";

  const int fd = exported->dup_fd();
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(second->import_state(fd).ok());
  ::close(fd);
  const std::vector<float> x = random(32 * 16), dy = random(32 * 16);
  EXPECT_EQ(train_step(*first, x, dy), train_step(*second, x, dy)) << "the twins' outputs differ";
  auto state_of = [&](client::Layer& layer) {
    auto [tensors, metadata] = exported_state(layer);
    return std::make_pair(std::move(tensors), metadata["tuteld.step"]);
  };
  const auto [first_state, first_step] = state_of(*first);
  const auto [second_state, second_step] = state_of(*second);
  EXPECT_EQ(first_step, "3");
  EXPECT_EQ(second_step, "3");
  ASSERT_EQ(first_state.size(), 10u);  // 5 parameters and their momentum
  EXPECT_TRUE(first_state == second_state) << "the twins' parameters or momentum differ after the same step";

  // The saved file, opened here and handed over as it is.
  const int on_disk = ::open((daemon_->dir() + "/state/default/checkpoints/first.safetensors").c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(on_disk, 0);
  ASSERT_TRUE(second->import_state(on_disk).ok());
  ::close(on_disk);
  EXPECT_EQ(state_of(*second).second, "2");
}

// A file holds its optimizer's name (metadata tuteld.optimizer): another optimizer's state is no
// state of this one's. An SGD layer's state (momentum, step 1) imported into an AdamW layer of
// the same shapes gives it the weights, zero moments and step 0 (SGD's momentum taken for
// AdamW's first moment, with no second, once moved a weight 5000 times as far as a fresh start),
// and the daemon's log says so; the same optimizer's state is taken whole.
// A file without a bias the layer has (written by a layer without it) is refused naming the
// tensor and the spec key that describes such a layer; the layer is left as it was.
TEST_F(ClientDaemon, AFileWithoutABiasNamesTheSpecKey) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto plain = client->create_layer("name = \"nobias\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\nk = 1\n"
                                    "init_seed = 1\nhas_fc1_bias = false\n");
  ASSERT_TRUE(plain.ok()) << plain.status();
  ASSERT_TRUE(plain->save("nobias.safetensors").ok());
  auto biased = client->create_layer("name = \"biased\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\nk = 1\ninit_seed = 2\n");
  ASSERT_TRUE(biased.ok()) << biased.status();
  const Status refused = biased->load("nobias.safetensors");
  EXPECT_EQ(refused.code(), StatusCode::kNotFound) << refused;
  EXPECT_NE(refused.message().find("batched_fc1_bias' is missing"), std::string_view::npos) << refused;
  EXPECT_NE(refused.message().find("has_fc1_bias = false"), std::string_view::npos) << refused;
}

// A Tutel model's state dict loads as it is: the layer's tensors under one prefix among the
// model's other tensors, in bf16 (exactly) or f64 (rounded to nearest f32), give the layer the
// values an f32 file of Tutel's names gives it, bit for bit, and so its outputs. A file of two
// layers, or with an integer tensor, is refused naming them, the layer left as it was.
TEST_F(ClientDaemon, ATutelModelsStateDictLoadsAsItIs) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto source = client->create_layer(spec("source"));
  ASSERT_TRUE(source.ok()) << source.status();
  std::map<std::string, std::vector<float>> params;
  for (auto& [name, values] : exported_state(*source).first)
    if (name.rfind("optimizer.", 0) != 0) params[name] = values;
  ASSERT_EQ(params.size(), 5u);
  const std::string dir = daemon_->dir() + "/state/default/checkpoints/";
  std::filesystem::create_directories(dir);
  // A file of the values `stored` under each of `prefixes`, in `dtype` (the gate in `gate_dtype`
  // where given), beside tensors of the model that are no part of the layer.
  std::vector<std::vector<uint8_t>> keep;  // the entries' bytes, alive until written
  auto write = [&](const std::string& file, const std::map<std::string, std::vector<double>>& stored,
                   const std::vector<std::string>& prefixes, DType file_dtype,
                   std::optional<DType> gate_dtype = std::nullopt) {
    std::vector<SafetensorsEntry> entries;
    static const float other[3] = {1.f, 2.f, 3.f};
    entries.push_back({"embed.weight", DType::kF32, Shape{3}, other});
    for (const std::string& prefix : prefixes) {
      entries.push_back({prefix + "experts.local_buffer", DType::kF32, Shape{3}, other});
      for (const auto& [name, values] : stored) {
        const DType dtype = name == "gates.0.wg.weight" && gate_dtype ? *gate_dtype : file_dtype;
        std::vector<uint8_t>& bytes = keep.emplace_back(values.size() * dtype_size(dtype));
        for (size_t i = 0; i < values.size(); ++i) {
          if (dtype == DType::kBF16) {
            const uint16_t h = f32_to_bf16(static_cast<float>(values[i]));
            std::memcpy(&bytes[2 * i], &h, 2);
          } else if (dtype == DType::kF64) {
            std::memcpy(&bytes[8 * i], &values[i], 8);
          } else if (dtype == DType::kF32) {
            const float f = static_cast<float>(values[i]);
            std::memcpy(&bytes[4 * i], &f, 4);
          } else {
            const int32_t n = static_cast<int32_t>(values[i]);
            std::memcpy(&bytes[4 * i], &n, 4);
          }
        }
        const int64_t n = static_cast<int64_t>(values.size());
        const Shape shape = name == "gates.0.wg.weight"          ? Shape{4, 16}
                            : name == "experts.batched_fc1_w"    ? Shape{4, 32, 16}
                            : name == "experts.batched_fc2_w"    ? Shape{4, 32, 16}
                            : name == "experts.batched_fc1_bias" ? Shape{4, 32}
                                                                 : Shape{4, n / 4};
        entries.push_back({prefix + name, dtype, shape, bytes.data()});
      }
    }
    const Status written = write_safetensors(dir + file, entries);
    ASSERT_TRUE(written.ok()) << written;
  };
  // The values each file holds, and what a layer must take from them.
  std::map<std::string, std::vector<double>> bf16_values, f64_values, bf16_want, f64_want;
  std::mt19937_64 rng(std::random_device{}());
  std::uniform_real_distribution<double> nudge(-1.0, 1.0);
  for (const auto& [name, values] : params) {
    for (float v : values) {
      const float b = bf16_to_f32(f32_to_bf16(v));
      bf16_values[name].push_back(b);
      bf16_want[name].push_back(b);
      // Between v and its neighbours: the f32 nearest to it is v (within half an ULP).
      const double ulp = std::nextafter(std::abs(v), INFINITY) - std::abs(v);
      f64_values[name].push_back(v + 0.49 * ulp * nudge(rng));
      f64_want[name].push_back(v);
    }
  }
  ASSERT_NO_FATAL_FAILURE(write("model_bf16.safetensors", bf16_values, {"layers.3.moe."}, DType::kBF16));
  ASSERT_NO_FATAL_FAILURE(write("model_f64.safetensors", f64_values, {"model.layers.0.mlp."}, DType::kF64));
  ASSERT_NO_FATAL_FAILURE(write("plain.safetensors", bf16_want, {""}, DType::kF32));
  ASSERT_NO_FATAL_FAILURE(write("two_layers.safetensors", bf16_values, {"l0.", "l1."}, DType::kBF16));
  auto from = [](const std::string& name, const std::string& file) {
    return "name = \"" + name + "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\nweights = \"" + file + "\"\n";
  };
  auto from_model = client->create_layer(from("from_model", "model_bf16.safetensors"));
  ASSERT_TRUE(from_model.ok()) << from_model.status();
  auto from_plain = client->create_layer(from("from_plain", "plain.safetensors"));
  ASSERT_TRUE(from_plain.ok()) << from_plain.status();
  auto values_of = [&](client::Layer& layer) {
    std::map<std::string, std::vector<double>> out;
    for (auto& [name, values] : exported_state(layer).first)
      if (name.rfind("optimizer.", 0) != 0) out[name].assign(values.begin(), values.end());
    return out;
  };
  EXPECT_TRUE(values_of(*from_model) == bf16_want) << "the bf16 model's layer holds other values";
  EXPECT_TRUE(values_of(*from_plain) == bf16_want);
  std::vector<float> x(24 * 16), y_model(24 * 16), y_plain(24 * 16);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (float& v : x) v = normal(rng);
  ASSERT_TRUE(from_model->forward(x.data(), 24, y_model.data()).ok());
  ASSERT_TRUE(from_plain->forward(x.data(), 24, y_plain.data()).ok());
  EXPECT_EQ(y_model, y_plain);

  // An f64 model loaded into a layer: each value to its nearest f32.
  ASSERT_TRUE(from_plain->load("model_f64.safetensors").ok());
  EXPECT_TRUE(values_of(*from_plain) == f64_want) << "the f64 values were not rounded to their nearest f32";

  // With its optimizer state under the same prefix (as tuteld.nn's state dict names it): taken too.
  ASSERT_NO_FATAL_FAILURE(write("with_state.safetensors", bf16_values,
                                {"m.", "m.optimizer.state0.", "m.optimizer.state1."}, DType::kBF16));
  ASSERT_TRUE(from_plain->load("with_state.safetensors").ok());
  size_t states = 0;
  for (auto& [name, values] : exported_state(*from_plain).first) {
    const std::string param = name.rfind("optimizer.state", 0) == 0 ? name.substr(17) : name;
    EXPECT_TRUE(std::vector<double>(values.begin(), values.end()) == bf16_want.at(param)) << name;
    states += name != param;
  }
  EXPECT_EQ(states, 10u);
  // Optimizer state alone is no layer's parameters (its momentum was once taken for its weights).
  ASSERT_NO_FATAL_FAILURE(write("only_state.safetensors", bf16_values, {"optimizer.state0."}, DType::kBF16));
  auto only_state = client->create_layer(from("only_state", "only_state.safetensors"));
  EXPECT_EQ(only_state.status().code(), StatusCode::kNotFound) << only_state.status();

  // Two layers in the file: which one is not guessed.
  auto two = client->create_layer(from("two", "two_layers.safetensors"));
  ASSERT_FALSE(two.ok());
  EXPECT_EQ(two.status().code(), StatusCode::kInvalidArgument) << two.status();
  EXPECT_NE(two.status().message().find("'l0.', 'l1.'"), std::string_view::npos) << two.status();
  const Status into_existing = from_model->load("two_layers.safetensors");
  EXPECT_EQ(into_existing.code(), StatusCode::kInvalidArgument) << into_existing;
  // An integer tensor among the layer's: refused before anything is copied.
  ASSERT_NO_FATAL_FAILURE(write("mixed.safetensors", bf16_values, {"moe."}, DType::kBF16, DType::kI32));
  const std::map<std::string, std::vector<double>> before = values_of(*from_model);
  const Status mixed = from_model->load("mixed.safetensors");
  EXPECT_EQ(mixed.code(), StatusCode::kInvalidArgument) << mixed;
  EXPECT_NE(mixed.message().find("'moe.gates.0.wg.weight' is i32"), std::string_view::npos) << mixed;
  EXPECT_TRUE(values_of(*from_model) == before) << "a refused load changed the layer";
  // The names come from the file: the error shows them escaped (no terminal control reaches the
  // trainer's terminal or the daemon's log), whatever the prefix holds.
  ASSERT_NO_FATAL_FAILURE(
      write("controls.safetensors", bf16_values, {"m\n\x1b[2J\xe2\x80\xae."}, DType::kBF16, DType::kI32));
  const Status controls = from_model->load("controls.safetensors");
  EXPECT_EQ(controls.code(), StatusCode::kInvalidArgument) << controls;
  EXPECT_NE(controls.message().find(R"('m\x0a\x1b[2J\u202e.gates.0.wg.weight' is i32)"), std::string_view::npos)
      << controls;
  EXPECT_FALSE(has_control_characters(controls.message())) << controls;
  EXPECT_TRUE(values_of(*from_model) == before) << "a refused load changed the layer";
}

TEST_F(ClientDaemon, AnotherOptimizersStateIsNotTaken) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto sgd = client->create_layer(spec("sgd_source"));
  const std::string adamw_spec = "name = \"adamw_target\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\n"
                                 "init_seed = 9\n[optimizer]\nkind = \"adamw\"\n";
  auto adamw = client->create_layer(adamw_spec);
  ASSERT_TRUE(sgd.ok() && adamw.ok());
  std::vector<float> x(32 * 16, 0.5f), y(32 * 16), dx(32 * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * float(i));
  ASSERT_TRUE(sgd->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(sgd->backward(y.data(), 0.5f, dx.data()).ok());
  ASSERT_TRUE(sgd->step().ok());
  const auto [source, source_meta] = exported_state(*sgd);
  EXPECT_EQ(source_meta.at("tuteld.optimizer"), "sgd");
  ASSERT_TRUE(copy_state(*sgd, *adamw).ok());
  const auto [target, target_meta] = exported_state(*adamw);
  EXPECT_EQ(target_meta.at("tuteld.optimizer"), "adamw");
  EXPECT_EQ(target_meta.at("tuteld.step"), "0");
  size_t moments = 0;
  for (const auto& [name, values] : target) {
    if (name.rfind("optimizer.", 0) == 0) {
      ++moments;
      EXPECT_TRUE(std::all_of(values.begin(), values.end(), [](float v) { return v == 0.f; })) << name;
    } else {
      EXPECT_EQ(values, source.at(name)) << name;
    }
  }
  EXPECT_EQ(moments, 10u);  // exp_avg and exp_avg_sq of 5 parameters
  EXPECT_NE(daemon_->log().find("holds the state of a sgd optimizer"), std::string::npos) << daemon_->log();
  // The same optimizer's state is taken whole: the AdamW layer's own export, back into it.
  ASSERT_TRUE(adamw->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(adamw->backward(y.data(), 0.5f, dx.data()).ok());
  ASSERT_TRUE(adamw->step().ok());
  const auto [stepped, stepped_meta] = exported_state(*adamw);
  ASSERT_TRUE(copy_state(*adamw, *adamw).ok());
  const auto [reloaded, reloaded_meta] = exported_state(*adamw);
  EXPECT_EQ(reloaded_meta.at("tuteld.step"), "1");
  EXPECT_TRUE(reloaded == stepped);
}

// Optimizer state is taken whole or not at all. A file lacking one of AdamW's moments (a
// hand-edited or filtered checkpoint) had the other taken at the file's step with the missing
// one zeroed: the next update was 6.4 times too large. Now all of it starts afresh, step 0,
// while the parameters are taken.
TEST_F(ClientDaemon, OptimizerStateIsTakenWholeOrNotAtAll) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  const std::string adamw = "experts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\n[optimizer]\nkind = \"adamw\"\n";
  auto source = client->create_layer("name = \"whole_src\"\ninit_seed = 3\n" + adamw);
  auto target = client->create_layer("name = \"whole_dst\"\ninit_seed = 4\n" + adamw);
  ASSERT_TRUE(source.ok() && target.ok());
  std::vector<float> x(32 * 16), y(32 * 16), dx(32 * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * float(i));
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(source->forward(x.data(), 32, y.data()).ok());
    ASSERT_TRUE(source->backward(y.data(), 0.5f, dx.data()).ok());
    ASSERT_TRUE(source->step().ok());
  }
  // The source's export, less one second moment.
  Result<client::ExportedState> state = source->export_state();
  ASSERT_TRUE(state.ok()) << state.status();
  const int copy = state->dup_fd();
  Result<SafetensorsFile> file = SafetensorsFile::read(copy, "the export", 1 << 24);
  ::close(copy);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<SafetensorsEntry> kept;
  std::string dropped;
  for (const SafetensorsTensor& t : file->tensors()) {
    if (dropped.empty() && t.name.rfind("optimizer.state1.", 0) == 0) {
      dropped = t.name;
      continue;
    }
    kept.push_back({t.name, t.dtype, t.shape, t.data});
  }
  ASSERT_FALSE(dropped.empty());
  EXPECT_EQ(file->metadata().at("tuteld.step"), "3");
  const std::string partial = daemon_->dir() + "/partial.safetensors";
  ASSERT_TRUE(write_safetensors(partial, kept, file->metadata()).ok());
  const int fd = ::open(partial.c_str(), O_RDONLY | O_CLOEXEC);
  ASSERT_GE(fd, 0);
  const Status imported = target->import_state(fd);
  ::close(fd);
  ASSERT_TRUE(imported.ok()) << imported;
  const auto [source_values, source_meta] = exported_state(*source);
  const auto [values, meta] = exported_state(*target);
  EXPECT_EQ(meta.at("tuteld.step"), "0");
  size_t states = 0;
  for (const auto& [name, v] : values) {
    if (name.rfind("optimizer.", 0) == 0) {
      ++states;
      EXPECT_TRUE(std::all_of(v.begin(), v.end(), [](float f) { return f == 0.f; })) << name;
    } else {
      EXPECT_EQ(v, source_values.at(name)) << name;
    }
  }
  EXPECT_EQ(states, 10u);  // exp_avg and exp_avg_sq of 5 parameters, all afresh
}

// A step applies only gradients that are there, and the settings it is given. Three twins (the
// same init_seed; SGD, lr 0.05, momentum 0.9, whose first step moves a parameter by lr · (g +
// weight_decay · w) with the momentum buffer = that gradient):
// - a step with no backward since the layer's creation, or since zero_grad() (set_to_none),
//   or after a backward for dx alone, changes nothing, step count included (torch skips a
//   parameter whose .grad is None; SGD's momentum and AdamW's decay would move it otherwise);
// - after the same backward, a step at lr 0.025 moves every parameter by half as much as one at
//   the spec's 0.05, and one with weight_decay 0.5 by lr · 0.5 · w more (atol 2e-6: f32 weights
//   and updates of ~1e-2);
// - zero_grad(set_to_none = false) leaves zeros that a step applies (the momentum moves it)
//   where there were gradients, and none where there were none (torch zeroes only the .grad
//   that exist): after a backward for dx alone, that step changes nothing either;
// - overrides that are negative, beyond f32 or not finite are refused and change nothing.
TEST_F(ClientDaemon, AStepAppliesOnlyGradientsThatAreThereWithTheSettingsItIsGiven) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto half = client->create_layer(spec("lr_half"));
  auto plain = client->create_layer(spec("lr_plain"));
  auto decayed = client->create_layer(spec("lr_decayed"));
  ASSERT_TRUE(half.ok() && plain.ok() && decayed.ok());
  auto parameters = [](client::Layer& layer) {
    std::map<std::string, std::vector<float>> out;
    for (auto& [name, values] : exported_state(layer).first)
      if (name.rfind("optimizer.", 0) != 0) out[name] = std::move(values);
    return out;
  };
  const auto w0 = parameters(*half);
  ASSERT_EQ(w0.size(), 5u);
  ASSERT_TRUE(w0 == parameters(*plain) && w0 == parameters(*decayed)) << "twins differ before training";

  // Nothing to apply yet: nothing moves.
  auto count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 0);
  EXPECT_TRUE(parameters(*half) == w0) << "a step without gradients moved the layer";

  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> x(32 * 16), dy(32 * 16), y(32 * 16), dx(32 * 16);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);
  auto train = [&](client::Layer& layer, client::Layer::ParamGrads grads) {
    client::ForwardInfo info;
    ASSERT_TRUE(layer.forward(x.data(), 32, y.data(), &info).ok());
    ASSERT_TRUE(layer.backward(info.sequence, dy.data(), 0.5f, dx.data(), grads).ok());
  };
  for (client::Layer* layer : {&*half, &*plain, &*decayed})
    ASSERT_NO_FATAL_FAILURE(train(*layer, client::Layer::ParamGrads::kAccumulate));
  client::Layer::StepOptions at_half, with_decay;
  at_half.lr = 0.025;
  with_decay.weight_decay = 0.5;
  count = half->step(at_half);
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 1);
  ASSERT_TRUE(plain->step().ok());
  ASSERT_TRUE(decayed->step(with_decay).ok());
  const auto wh = parameters(*half), wp = parameters(*plain), wd = parameters(*decayed);
  double worst_half = 0, worst_decay = 0, moved = 0;
  for (const auto& [name, w] : w0) {
    ASSERT_EQ(wh.at(name).size(), w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      const double step_plain = double(w[i]) - wp.at(name)[i], step_half = double(w[i]) - wh.at(name)[i],
                   step_decay = double(w[i]) - wd.at(name)[i];
      moved = std::max(moved, std::abs(step_plain));
      worst_half = std::max(worst_half, std::abs(step_half - 0.5 * step_plain));
      worst_decay = std::max(worst_decay, std::abs(step_decay - step_plain - 0.05 * 0.5 * double(w[i])));
    }
  }
  EXPECT_GT(moved, 1e-3) << "the step at the spec's lr moved nothing";
  EXPECT_LE(worst_half, 2e-6) << "a step at lr 0.025 is not half of one at 0.05";
  EXPECT_LE(worst_decay, 2e-6) << "weight_decay 0.5 did not add lr · 0.5 · w";

  // Set to none: the next step changes nothing; nor after a backward for dx alone.
  ASSERT_TRUE(half->zero_grad().ok());
  count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 1);
  EXPECT_TRUE(parameters(*half) == wh) << "a step after zero_grad moved the layer";
  ASSERT_NO_FATAL_FAILURE(train(*half, client::Layer::ParamGrads::kKeep));
  count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 1);
  EXPECT_TRUE(parameters(*half) == wh) << "a step after a backward for dx alone moved the layer";
  // No gradients to keep as zeros: still nothing to apply.
  ASSERT_TRUE(half->zero_grad(/*set_to_none=*/false).ok());
  count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 1);
  EXPECT_TRUE(parameters(*half) == wh) << "zero_grad(set_to_none = false) made absent gradients present";
  // Gradients kept as zeros: the momentum moves it.
  ASSERT_NO_FATAL_FAILURE(train(*half, client::Layer::ParamGrads::kAccumulate));
  count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 2);
  const auto w2 = parameters(*half);
  ASSERT_TRUE(half->zero_grad(/*set_to_none=*/false).ok());
  count = half->step();
  ASSERT_TRUE(count.ok()) << count.status();
  EXPECT_EQ(*count, 3);
  const auto wz = parameters(*half);
  EXPECT_FALSE(wz == w2) << "a step on zeroed (not absent) gradients did not apply the momentum";

  // Refused overrides change nothing.
  client::Layer::StepOptions negative, beyond_f32, nan;
  negative.lr = -0.1;
  beyond_f32.weight_decay = 1e39;
  nan.lr = std::nan("");
  for (const auto* o : {&negative, &beyond_f32, &nan}) {
    const Status refused = half->step(*o).status();
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
  }
  EXPECT_NE(half->step(negative).status().message().find("lr must be a finite number >= 0"), std::string_view::npos);
  EXPECT_NE(half->step(beyond_f32).status().message().find("weight_decay"), std::string_view::npos);
  EXPECT_TRUE(parameters(*half) == wz);
  EXPECT_EQ(half->info().step, 3);
}

// A training forward its trainer will not backward (skipped, or its wait abandoned) is
// discarded: it is no longer pending in the daemon and its memory goes back to the tenant; a
// discard of a forward that is not pending is no error; the layer trains on as before.
TEST_F(ClientDaemon, ADiscardedForwardFreesWhatItHeld) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("discarded"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  auto held = [&] {
    const nlohmann::json layers = ctl_json("layers");
    for (const auto& l : layers["layers"])
      if (l["name"] == "discarded") return std::make_pair(l["pending_backwards"].get<int64_t>(), l["pending_bytes"].get<int64_t>());
    ADD_FAILURE() << layers;
    return std::make_pair(int64_t{-1}, int64_t{-1});
  };
  std::vector<float> x(32 * 16, 0.25f), y(32 * 16), dx(32 * 16);
  client::ForwardInfo kept, skipped;
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &kept).ok());
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data(), &skipped).ok());
  EXPECT_EQ(held().first, 2);
  const int64_t one_forward = held().second / 2;
  EXPECT_GT(one_forward, 0);
  ASSERT_TRUE(layer->discard(skipped.sequence).ok());
  EXPECT_EQ(held(), std::make_pair(int64_t{1}, one_forward));
  EXPECT_TRUE(layer->discard(skipped.sequence).ok());  // no longer pending: no error
  EXPECT_TRUE(layer->discard(12345).ok());              // never made: no error
  EXPECT_EQ(layer->backward(skipped.sequence, y.data(), 0.f, dx.data()).code(), StatusCode::kInvalidArgument);
  // An abandoned wait: the client forgets the forward and discards it in the daemon itself (a
  // caller had to, and one whose synchronous forward timed out had no sequence to do it with);
  // a discard of it after that is no error.
  auto ticket = layer->submit_forward(x.data(), 32, y.data(), true);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  client->abandon(*ticket);
  ASSERT_TRUE(client->wait_all().ok());
  EXPECT_EQ(held(), std::make_pair(int64_t{1}, one_forward));
  ASSERT_TRUE(layer->discard(ticket->sequence).ok());
  EXPECT_EQ(held(), std::make_pair(int64_t{1}, one_forward));
  ASSERT_TRUE(layer->backward(kept.sequence, y.data(), 0.f, dx.data()).ok());
  EXPECT_EQ(held(), std::make_pair(int64_t{0}, int64_t{0}));
  ASSERT_TRUE(layer->step().ok());
}

// Runs forwards of `a` and `b` (layers of two sessions) at once, in rounds, until `waited()` is
// above 0 or 50 rounds passed; returns the last `waited()`. The assertion is that waits are
// counted, never how long they take.
double overlap_until_waited(client::Layer& a, client::Layer& b, const std::function<double()>& waited) {
  std::vector<float> x(256 * 16, 0.25f), ya(256 * 16), yb(256 * 16);
  double total = 0;
  for (int round = 0; round < 50 && total <= 0; ++round) {
    Status in_b;
    std::thread t([&] {
      for (int i = 0; i < 20 && in_b.ok(); ++i) in_b = b.infer(x.data(), 256, yb.data());
    });
    Status in_a;
    for (int i = 0; i < 20 && in_a.ok(); ++i) in_a = a.infer(x.data(), 256, ya.data());
    t.join();
    EXPECT_TRUE(in_a.ok()) << in_a;
    EXPECT_TRUE(in_b.ok()) << in_b;
    if (!in_a.ok() || !in_b.ok()) return total;
    total = waited();
  }
  return total;
}

// The time requests waited for their layer: nothing while one session runs its forwards one
// after another; something once two sessions run forwards of the same layer at once.
TEST_F(ClientDaemon, WaitsForABusyLayerAreCounted) {
  auto first = client::Client::connect(daemon_->client_socket());
  auto second = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(first.ok() && second.ok());
  auto layer = first->create_layer(spec("busy"));
  ASSERT_TRUE(layer.ok()) << layer.status();
  auto attached = second->attach_layer("busy");
  ASSERT_TRUE(attached.ok()) << attached.status();
  auto waited = [&] {
    const std::string text = ctl_json("metrics")["text"].get<std::string>();
    EXPECT_NE(text.find("# TYPE tuteld_layer_wait_seconds_total counter"), std::string::npos) << text;
    return metric_value(text, "tuteld_layer_wait_seconds_total{tenant=\"default\",layer=\"busy\"}");
  };
  std::vector<float> x(256 * 16, 0.25f), y(256 * 16);
  for (int i = 0; i < 5; ++i) ASSERT_TRUE(layer->infer(x.data(), 256, y.data()).ok());
  EXPECT_EQ(waited(), 0.0);
  EXPECT_GT(overlap_until_waited(*layer, *attached, waited), 0.0)
      << "1000 forwards of one layer from each of two sessions at once never overlapped";
}

// The layers of one rank share its device: two sessions' forwards of two layers wait for it,
// and the wait is counted on the layer that waited.
TEST_F(ClientDaemon, WaitsForTheDeviceAreCountedToo) {
  auto first = client::Client::connect(daemon_->client_socket());
  auto second = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(first.ok() && second.ok());
  auto a = first->create_layer(spec("device_a"));
  auto b = second->create_layer(spec("device_b"));
  ASSERT_TRUE(a.ok() && b.ok());
  auto waited = [&] {
    const std::string text = ctl_json("metrics")["text"].get<std::string>();
    double sum = 0;
    for (const char* name : {"device_a", "device_b"}) {
      const double v = metric_value(
          text, std::string("tuteld_layer_wait_seconds_total{tenant=\"default\",layer=\"") + name + "\"}");
      EXPECT_GE(v, 0.0) << name << " has no series\n" << text;
      sum += std::max(v, 0.0);
    }
    return sum;
  };
  EXPECT_GT(overlap_until_waited(*a, *b, waited), 0.0)
      << "1000 forwards of each of two layers on one rank at once never overlapped";
}

TEST_F(ClientDaemon, PlanCachesAreShownByTutelctlAndMetrics) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("cached"));
  ASSERT_TRUE(layer.ok());
  std::vector<float> x(32 * 16, 0.25f), y(32 * 16), dx(32 * 16);
  // A training forward, then two alike inference forwards: the second runs on the first's plan.
  ASSERT_TRUE(layer->forward(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
  ASSERT_TRUE(layer->infer(x.data(), 32, y.data()).ok());
  ASSERT_TRUE(layer->infer(x.data(), 32, y.data()).ok());
  constexpr int64_t kForwards = 3;

  const nlohmann::json layers = ctl_json("layers");
  ASSERT_EQ(layers["layers"].size(), 1u) << layers.dump();
  const nlohmann::json plans = layers["layers"][0]["plans"];
  ASSERT_TRUE(plans.is_object()) << layers.dump();
  EXPECT_EQ(plans["kind"], "host");
  EXPECT_GE(plans["plans"].get<int64_t>(), 1);
  EXPECT_EQ(plans["held"], 0);  // no forward waits for its backward
  EXPECT_GT(plans["bytes"].get<int64_t>(), 0);
  EXPECT_GE(plans["max_bytes"].get<uint64_t>(), plans["bytes"].get<uint64_t>());
  EXPECT_GE(plans["builds"].get<int64_t>(), 1);
  EXPECT_GE(plans["hits"].get<int64_t>(), 1);
  EXPECT_EQ(plans["build_failures"], 0);
  EXPECT_EQ(plans["evictions"], 0);
  // One lookup per forward, and one more for a forward rerun on a bigger capacity bucket.
  EXPECT_EQ(plans["hits"].get<int64_t>() + plans["misses"].get<int64_t>(),
            kForwards + plans["capacity_moves"].get<int64_t>())
      << plans.dump();

  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " ";
  auto [code, table] = run_command(ctl + "plans");
  EXPECT_EQ(code, 0) << table;
  EXPECT_NE(table.find("EVICTIONS"), std::string::npos) << table;
  const size_t row = table.find("\ndefault/cached ");
  ASSERT_NE(row, std::string::npos) << table;
  const std::string line = table.substr(row + 1, table.find('\n', row + 1) - row - 1);
  EXPECT_NE(line.find(" host "), std::string::npos) << table;

  auto [mcode, metrics] = run_command(ctl + "metrics");
  EXPECT_EQ(mcode, 0) << metrics;
  auto series = [&](const std::string& name) {
    return metric_value(metrics, name + "{tenant=\"default\",layer=\"cached\"}");
  };
  EXPECT_EQ(series("tuteld_plan_cache_plans"), plans["plans"].get<double>()) << metrics;
  EXPECT_EQ(series("tuteld_plan_cache_bytes"), plans["bytes"].get<double>()) << metrics;
  EXPECT_EQ(series("tuteld_plan_cache_hits_total"), plans["hits"].get<double>()) << metrics;
  EXPECT_EQ(series("tuteld_plan_cache_misses_total"), plans["misses"].get<double>()) << metrics;
  EXPECT_EQ(series("tuteld_plan_cache_evictions_total"), 0) << metrics;
  for (const char* type :
       {"# TYPE tuteld_plan_cache_bytes gauge", "# TYPE tuteld_plan_cache_plans gauge",
        "# TYPE tuteld_plan_cache_hits_total counter",
        "# TYPE tuteld_plan_cache_misses_total counter",
        "# TYPE tuteld_plan_cache_evictions_total counter"})
    EXPECT_NE(metrics.find(type), std::string::npos) << type << "\n" << metrics;

  // A destroyed layer's series go with it.
  ASSERT_TRUE(layer->destroy().ok());
  auto [dcode, after] = run_command(ctl + "metrics");
  EXPECT_EQ(dcode, 0) << after;
  EXPECT_EQ(after.find("tuteld_plan_cache_plans{"), std::string::npos) << after;
}

TEST_F(ClientDaemon, ShutdownWhileRequestsAreInFlight) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("busy", 256));
  ASSERT_TRUE(layer.ok());
  const int64_t S = 1024;
  std::vector<float> x(S * 256, 0.1f), y(S * 256);
  std::vector<client::Ticket> tickets;
  for (int i = 0; i < 8; ++i) {
    auto t = layer->submit_forward(x.data(), S, y.data(), /*training=*/false);
    ASSERT_TRUE(t.ok());
    tickets.push_back(*t);
  }
  EXPECT_EQ(daemon_->stop(), 0) << daemon_->log();
  // Every request either completed or fails with a clear error; nothing hangs.
  for (const auto& t : tickets) {
    auto r = client->wait(t);
    if (!r.ok()) {
      EXPECT_EQ(r.status().code(), StatusCode::kUnavailable) << r.status();
    }
  }
  EXPECT_TRUE(std::filesystem::exists(daemon_->dir() + "/state/default/busy.safetensors"));
  ASSERT_TRUE(daemon_->start());  // for TearDown, and: the layer is restored
  auto again = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(again.ok());
  EXPECT_TRUE(again->attach_layer("busy").ok());
}

// tutelctl drain: the daemon takes no new client sessions and creates no layers, with a message
// saying so and what to do, while the open session trains on; drain --wait waits for the open
// sessions to close (and fails when they do not in time); undrain takes new ones again.
TEST_F(ClientDaemon, DrainRefusesNewSessionsAndLayersWhileOpenOnesGoOn) {
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  auto layer = client->create_layer(spec("before"));
  ASSERT_TRUE(layer.ok());
  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " ";
  auto [code, out] = run_command(ctl + "drain");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("draining: 1 client session(s) still open"), std::string::npos) << out;
  EXPECT_EQ(ctl_json("status")["draining"], true);
  EXPECT_NE(ctl_json("metrics")["text"].get<std::string>().find("\ntuteld_draining 1\n"),
            std::string::npos);

  auto refused = client::Client::connect(daemon_->client_socket());
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kUnavailable) << refused.status();
  EXPECT_NE(refused.status().message().find("tutelctl undrain"), std::string::npos)
      << refused.status();
  auto more = client->create_layer(spec("during"));
  ASSERT_FALSE(more.ok());
  EXPECT_NE(more.status().message().find("draining"), std::string::npos) << more.status();
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16), dx(8 * 16);
  EXPECT_TRUE(layer->forward(x.data(), 8, y.data()).ok());
  EXPECT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
  EXPECT_TRUE(layer->step().ok());
  EXPECT_TRUE(client->attach_layer("before").ok());

  // Which sessions keep the drain waiting: this process's.
  const nlohmann::json open = ctl_json("sessions")["sessions"];
  ASSERT_EQ(open.size(), 1u) << open.dump();
  EXPECT_EQ(open[0]["pid"].get<int64_t>(), ::getpid()) << open.dump();
  EXPECT_EQ(open[0]["tenant"], "default");
  auto [table_code, table] = run_command(ctl + "sessions");
  EXPECT_EQ(table_code, 0) << table;
  EXPECT_NE(table.find(std::to_string(::getpid())), std::string::npos) << table;

  auto [still_code, still_out] = run_command(ctl + "drain --wait 0.2");
  EXPECT_EQ(still_code, 1) << still_out;  // the session is still open
  // --wait 0 looks once (it exited 0 here, as without --wait: `drain --wait 0 && stop` stopped
  // a daemon with sessions open).
  auto [once_code, once_out] = run_command(ctl + "drain --wait 0");
  EXPECT_EQ(once_code, 1) << once_out;
  client->close();
  auto [drained_code, drained_out] = run_command(ctl + "drain --wait 30");
  EXPECT_EQ(drained_code, 0) << drained_out;
  EXPECT_NE(drained_out.find("drained: no client sessions open"), std::string::npos) << drained_out;
  EXPECT_EQ(run_command(ctl + "sessions").second, "(no client sessions)\n");

  auto [undrain_code, undrain_out] = run_command(ctl + "undrain");
  EXPECT_EQ(undrain_code, 0) << undrain_out;
  EXPECT_EQ(ctl_json("status")["draining"], false);
  EXPECT_NE(ctl_json("metrics")["text"].get<std::string>().find("\ntuteld_draining 0\n"),
            std::string::npos);
  auto back = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_TRUE(back->create_layer(spec("after")).ok());
}

// pin and unpin name a layer that exists and keeps plans; tutelctl says what is wrong otherwise.
TEST_F(ClientDaemon, PinRefusesWhatCannotBePinned) {
  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + daemon_->admin_socket() + " ";
  auto [missing_code, missing_out] = run_command(ctl + "pin default/missing");
  EXPECT_EQ(missing_code, 1) << missing_out;
  EXPECT_NE(missing_out.find("missing"), std::string::npos) << missing_out;
  auto [usage_code, usage_out] = run_command(ctl + "pin no-slash");
  EXPECT_EQ(usage_code, 2) << usage_out;
  EXPECT_NE(usage_out.find("TENANT/NAME"), std::string::npos) << usage_out;
  auto client = client::Client::connect(daemon_->client_socket());
  ASSERT_TRUE(client.ok());
  ASSERT_TRUE(client->create_layer(spec("kept")).ok());
  EXPECT_EQ(ctl_json("pin default/kept")["pinned"], true);
  EXPECT_EQ(ctl_json("layers")["layers"][0]["pinned"], true);
  EXPECT_EQ(ctl_json("unpin default/kept")["pinned"], false);
  EXPECT_EQ(ctl_json("layers")["layers"][0]["pinned"], false);
}

// SIGTERM and SIGINT are blocked in every thread of a serving daemon (pool threads, rank
// threads, OpenMP's and UCX's included) and taken by its signal thread with sigwaitinfo: a
// handler no longer runs on whichever thread a signal lands on (signal_watcher.hpp). The daemon
// still stops on either.
TEST(DaemonStartup, EveryThreadBlocksTheTerminationSignalsAndEitherStopsTheDaemon) {
  for (int signum : {SIGTERM, SIGINT}) {
    SCOPED_TRACE(signum == SIGTERM ? "SIGTERM" : "SIGINT");
    DaemonProcess daemon(DaemonOptions{.threads_per_rank = 2});
    ASSERT_TRUE(daemon.start());
    {  // work on every kind of thread: the pool (create), the rank and its OpenMP team (forward)
      auto client = client::Client::connect(daemon.client_socket());
      ASSERT_TRUE(client.ok()) << client.status();
      auto layer = client->create_layer("name = \"l\"\nexperts = 4\nmodel_dim = 64\nhidden = 128\nk = 2\ninit_seed = 1\n");
      ASSERT_TRUE(layer.ok()) << layer.status();
      std::vector<float> x(64 * 64, 0.5f), y(64 * 64);
      ASSERT_TRUE(layer->forward(x.data(), 64, y.data()).ok());
    }
    size_t threads = 0, signal_threads = 0;
    const uint64_t wanted = (uint64_t{1} << (SIGTERM - 1)) | (uint64_t{1} << (SIGINT - 1));
    const std::string tasks = "/proc/" + std::to_string(daemon.pid()) + "/task";
    for (const auto& task : std::filesystem::directory_iterator(tasks)) {
      std::ifstream status(task.path() / "status");
      std::string line, name;
      uint64_t blocked = 0;
      bool found = false;
      while (std::getline(status, line)) {
        if (line.rfind("Name:", 0) == 0) name = line.substr(5);
        if (line.rfind("SigBlk:", 0) == 0) {
          blocked = std::stoull(line.substr(7), nullptr, 16);
          found = true;
        }
      }
      if (!found) continue;  // the thread ended meanwhile
      ++threads;
      // While it waits in sigwaitinfo, the kernel shows the signal thread without them blocked.
      if (name.find("tuteld-signals") != std::string::npos) {
        ++signal_threads;
        continue;
      }
      EXPECT_EQ(blocked & wanted, wanted) << "thread " << task.path().filename() << name;
    }
    EXPECT_EQ(signal_threads, 1u);
    EXPECT_GE(threads, 4u) << "the loop, the signal thread, a pool thread, the rank's";
    ASSERT_EQ(::kill(daemon.pid(), signum), 0);
    EXPECT_EQ(daemon.wait_exit(std::chrono::seconds(30)), 0) << daemon.log();
    EXPECT_NE(daemon.log().find("signal " + std::to_string(signum) + ": shutting down"), std::string::npos)
        << daemon.log();
  }
}

// A CPU rank's idle OpenMP threads spin briefly, not for libgomp's default, where the operator
// chose neither GOMP_SPINCOUNT nor OMP_WAIT_POLICY: tuteld set it and executed itself again
// (tutel/kernels/openmp_spin.hpp; openmp_spin_test checks what libgomp then runs with).
TEST(DaemonStartup, ItsOpenMpThreadsSpinBrieflyUnlessTheEnvironmentChose) {
  if (std::getenv("GOMP_SPINCOUNT") != nullptr || std::getenv("OMP_WAIT_POLICY") != nullptr)
    GTEST_SKIP() << "this environment chooses OpenMP's spin, which tuteld leaves to stand";
  DaemonProcess daemon(DaemonOptions{});
  ASSERT_TRUE(daemon.start());
  std::ifstream file("/proc/" + std::to_string(daemon.pid()) + "/environ", std::ios::binary);
  const std::string environment((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  EXPECT_NE(environment.find(std::string("GOMP_SPINCOUNT=") + tutel::kOpenmpSpinCount + '\0'), std::string::npos);
  // Started serving: the exec kept the pid the test spawned and its descriptors.
  EXPECT_TRUE(client::Client::connect(daemon.client_socket()).ok());
}

// The client socket takes the config's mode and group; each socket named the wrong way round
// (tutelctl at the client socket, a client at the admin socket) says which one it is.
TEST(DaemonStartup, TheClientSocketsModeAndGroupAndWhichSocketIsWhich) {
  const bool root = ::geteuid() == 0;
  DaemonProcess daemon(DaemonOptions{.extra_server = std::string("client_socket_mode = \"0666\"\n") +
                                                     (root ? "client_socket_group = 65534\n" : "")});
  ASSERT_TRUE(daemon.start());
  struct stat st {};
  ASSERT_EQ(::stat(daemon.client_socket().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0666u);
  if (root) {
    EXPECT_EQ(st.st_gid, 65534u);
  }
  ASSERT_EQ(::stat(daemon.admin_socket().c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u) << "the admin socket stays the daemon user's";

  auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemon.client_socket() + " status");
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("this is tuteld's client socket"), std::string::npos) << out;
  EXPECT_NE(out.find("go to its admin_socket (" + daemon.admin_socket() + ")"), std::string::npos) << out;
  auto wrong = client::Client::connect(daemon.admin_socket());
  ASSERT_FALSE(wrong.ok());
  EXPECT_NE(wrong.status().message().find("this is tuteld's admin socket"), std::string_view::npos) << wrong.status();
  EXPECT_NE(wrong.status().message().find("connect to its client_socket (" + daemon.client_socket() + ")"),
            std::string_view::npos)
      << wrong.status();
  EXPECT_EQ(daemon.stop(), 0) << daemon.log();
}

TEST(DaemonStartup, VersionNeedsNoConfigAndMatchesTheStatus) {
  auto [code, out] = run_command(std::string(TUTELD_BIN) + " --version");
  EXPECT_EQ(code, 0) << out;
  EXPECT_NE(out.find("tuteld " TUTEL_VERSION), std::string::npos) << out;
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  auto [scode, status] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json status");
  EXPECT_EQ(scode, 0) << status;
  EXPECT_NE(status.find("\"version\": \"" TUTEL_VERSION "\""), std::string::npos) << status;
}

TEST(DaemonStartup, ConfigErrorsNameFileLineAndKey) {
  DaemonProcess d(DaemonOptions{.extra_server = "spin_uss = 5"});
  EXPECT_FALSE(d.start());
  const std::string log = d.log();
  EXPECT_NE(log.find("tuteld.toml:"), std::string::npos) << log;
  EXPECT_NE(log.find("spin_uss"), std::string::npos) << log;
  EXPECT_NE(log.find("spin_us"), std::string::npos) << "suggests the known key\n" << log;
}

// A *.safetensors entry in state_dir that cannot be read (here a symlink loop) stops the start
// with an error naming it: skipping it would create the layer afresh and checkpoint over it at
// exit, and the unchecked stat used to throw out of the daemon (SIGABRT).
TEST(DaemonStartup, AStateFileItCannotReadStopsTheStartNamingIt) {
  DaemonProcess d(DaemonOptions{});
  std::filesystem::create_directories(d.dir() + "/state/default");
  std::filesystem::create_symlink("loop.safetensors", d.dir() + "/state/default/loop.safetensors");
  EXPECT_FALSE(d.start());
  const std::string log = d.log();
  EXPECT_NE(log.find("cannot read"), std::string::npos) << log;
  EXPECT_NE(log.find("loop.safetensors"), std::string::npos) << log;
  EXPECT_EQ(log.find("terminate called"), std::string::npos) << log;
}

// A damaged checkpoint (a file cut short) stops the start naming it and saying how to start
// without it; the file stays where it is.
TEST(DaemonStartup, ADamagedCheckpointStopsTheStartSayingHowToGoOn) {
  DaemonProcess d(DaemonOptions{});
  const std::string file = d.dir() + "/state/default/cut.safetensors";
  std::filesystem::create_directories(d.dir() + "/state/default");
  { std::ofstream(file) << std::string("\x40\0\0\0\0\0\0\0{\"x\":", 12); }
  EXPECT_FALSE(d.start());
  const std::string log = d.log();
  EXPECT_NE(log.find("a layer's checkpoint in state_dir cannot be read; move " + file +
                     " out of state_dir to start without that layer"),
            std::string::npos)
      << log;
  EXPECT_TRUE(std::filesystem::exists(file));
  // A file whose layer spec is not valid says the same.
  const int32_t one = 1;
  ASSERT_TRUE(write_safetensors(file, {{"x", DType::kI32, {1}, &one}}, {{"tuteld.spec", "experts = \"many\""}}).ok());
  EXPECT_FALSE(d.start());
  EXPECT_NE(d.log().find("the layer spec in a checkpoint in state_dir is not valid; move " + file +
                         " out of state_dir to start without that layer"),
            std::string::npos)
      << d.log();
}

// A tenant's quotas never decide whether the daemon starts. A tenant with max_layers = 2
// destroys the config file's layer and fills its quota with two of its own: at the next start
// the config's layer takes its place first, one of the client's is left out (its checkpoint
// moved among the tenant's checkpoints, the log saying why), and the daemon serves. (It once
// failed to start: "tenant 'default' has reached its quota of 2 layers", keeping every tenant
// out.)
TEST(DaemonStartup, ATenantsQuotaCannotKeepTheDaemonFromStarting) {
  DaemonOptions o;
  o.default_tenant_extra = "max_layers = 2";
  o.layers = "[[layer]]\ntenant = \"default\"\nname = \"configured\"\n"
             "experts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 1\n";
  DaemonProcess d(o);
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto configured = client->attach_layer("configured");
    ASSERT_TRUE(configured.ok()) << configured.status();
    ASSERT_TRUE(configured->destroy().ok());
    ASSERT_TRUE(client->create_layer(spec("mine_a")).ok());
    ASSERT_TRUE(client->create_layer(spec("mine_b")).ok());
  }
  ASSERT_EQ(d.stop(), 0) << d.log();  // both checkpointed
  ASSERT_TRUE(d.start()) << d.log();
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status() << d.log();
  EXPECT_TRUE(client->attach_layer("configured").ok()) << d.log();
  const bool a = client->attach_layer("mine_a").ok(), b = client->attach_layer("mine_b").ok();
  EXPECT_TRUE(a != b) << "exactly one of the client's layers fits beside the config's";
  const std::string left_out = a ? "mine_b" : "mine_a";
  EXPECT_NE(d.log().find("not restoring layer default/" + left_out), std::string::npos) << d.log();
  // Kept among the tenant's checkpoints, where a layer created under its name cannot replace it
  // at exit, and loadable.
  EXPECT_FALSE(std::filesystem::exists(d.dir() + "/state/default/" + left_out + ".safetensors"));
  const std::string kept = kept_aside(d, left_out + ".left-out-");
  ASSERT_FALSE(kept.empty()) << d.log();
  // Its attach says where it went.
  auto gone = client->attach_layer(left_out);
  EXPECT_EQ(gone.status().code(), StatusCode::kNotFound) << gone.status();
  EXPECT_NE(gone.status().message().find(kept), std::string_view::npos) << gone.status();
  auto kept_layer = client->attach_layer(a ? "mine_a" : "mine_b");
  ASSERT_TRUE(kept_layer.ok());
  EXPECT_TRUE(kept_layer->load(kept).ok());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// The config's [[layer]] says what the layer is, also once it has a checkpoint (which the start
// restored as it was, the config's change ignored without a word and written back at exit): a
// change of its settings (here k, the capacity and the learning rate) resumes the checkpoint
// under them; a change of what it holds (the experts) or of where it starts (new weights) makes
// a new layer, the old checkpoint moved aside among the tenant's checkpoints, loadable.
TEST(DaemonStartup, AConfigLayersChangedSpecIsTakenOrMakesANewLayer) {
  auto configured = [](const std::string& keys) {
    DaemonOptions o;
    o.layers = "[[layer]]\ntenant = \"default\"\nname = \"cfg\"\nmodel_dim = 16\nhidden = 32\n" + keys +
               "[layer.optimizer]\nkind = \"sgd\"\nlr = 0.01\n";
    return o;
  };
  DaemonProcess d(configured("experts = 4\nk = 2\ninit_seed = 1\n"));
  ASSERT_TRUE(d.start()) << d.log();
  std::vector<float> x(8 * 16, 0.25f), y(8 * 16), trained(8 * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * static_cast<float>(i));
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->attach_layer("cfg");
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_TRUE(layer->forward(x.data(), 8, y.data()).ok());
    ASSERT_TRUE(layer->backward(y.data(), 0.f, trained.data()).ok());
    ASSERT_TRUE(layer->step().ok());
    ASSERT_TRUE(layer->infer(x.data(), 8, trained.data()).ok());
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  // Settings changed: resumed, at its step, with its weights, under the new spec.
  d.reconfigure(configured("experts = 4\nk = 1\ncapacity_factor = 2.0\ninit_seed = 1\n"));
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->attach_layer("cfg");
    ASSERT_TRUE(layer.ok()) << layer.status();
    EXPECT_EQ(layer->info().step, 1);
    EXPECT_EQ(layer->info().k, 1) << "the config's k was not taken";
    auto state = layer->export_state();
    ASSERT_TRUE(state.ok()) << state.status();
    const std::string file(reinterpret_cast<const char*>(state->data()), state->size());
    EXPECT_NE(file.find("capacity_factor = 2"), std::string::npos) << "the spec written is not the config's";
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  EXPECT_NE(d.log().find("resumes from"), std::string::npos) << d.log();
  // Back to k = 2: the trained weights answer as before the restarts.
  d.reconfigure(configured("experts = 4\nk = 2\ninit_seed = 1\n"));
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->attach_layer("cfg");
    ASSERT_TRUE(layer.ok()) << layer.status();
    ASSERT_TRUE(layer->infer(x.data(), 8, y.data()).ok());
    EXPECT_EQ(y, trained);
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  // Another number of experts: a new layer, from step 0; the old checkpoint kept aside.
  d.reconfigure(configured("experts = 2\nk = 2\ninit_seed = 1\n"));
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->attach_layer("cfg");
    ASSERT_TRUE(layer.ok()) << layer.status();
    EXPECT_EQ(layer->info().experts, 2);
    EXPECT_EQ(layer->info().step, 0);
  }
  EXPECT_FALSE(kept_aside(d, "cfg.superseded-").empty()) << d.log();
  ASSERT_EQ(d.stop(), 0) << d.log();
  // A new starting point (another seed) also makes a new layer.
  std::filesystem::remove_all(d.dir() + "/state/default/checkpoints");
  d.reconfigure(configured("experts = 2\nk = 2\ninit_seed = 9\n"));
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_FALSE(kept_aside(d, "cfg.superseded-").empty()) << d.log();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// A config layer resumes only from a checkpoint of a config layer started from the same weights:
// a client's layer of its name is kept aside (it once became the config's layer), and the weights
// file is the same one however the config reaches it (through a link, or moved with its
// directory, where the first path is gone), but another file is a new starting point.
// A [[layer]] taken out of the config keeps its checkpoint: the next start restores it, says so
// and serves it (it once came back without a word). While the config names it, tutelctl destroy
// refuses it (the next start would create it afresh, its checkpoint gone); then it may.
TEST(DaemonStartup, ALayerTakenOutOfTheConfigIsRestoredWithAWarning) {
  DaemonOptions with_layer;
  with_layer.layers = "[[layer]]\ntenant = \"default\"\nname = \"gone\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\n"
                      "k = 2\ninit_seed = 1\n";
  DaemonProcess d(with_layer);
  ASSERT_TRUE(d.start()) << d.log();
  const std::string destroy = std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " destroy default/gone";
  {
    auto [code, out] = run_command(destroy);
    EXPECT_EQ(code, 1) << out;
    EXPECT_NE(out.find("InvalidArgument"), std::string::npos) << out;
    EXPECT_NE(out.find("take it out of the config and restart tuteld first"), std::string::npos) << out;
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  d.reconfigure(DaemonOptions{});
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_NE(d.log().find("layer default/gone came from the config, which no longer names it; it was restored from"),
            std::string::npos)
      << d.log();
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->attach_layer("gone").ok());
  auto [code, out] = run_command(destroy);
  EXPECT_EQ(code, 0) << out;
  EXPECT_EQ(client->attach_layer("gone").status().code(), StatusCode::kNotFound);
  EXPECT_EQ(d.stop(), 0) << d.log();
}

TEST(DaemonStartup, AConfigLayerResumesOnlyFromItsOwnCheckpointOfItsOwnWeights) {
  const std::string layer_keys = "experts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\n";
  DaemonProcess d(DaemonOptions{});
  std::vector<float> x(8 * 16), y(8 * 16), dx(8 * 16);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::cos(0.21f * static_cast<float>(i));
  auto train_step = [&](client::Layer& layer) {
    ASSERT_TRUE(layer.forward(x.data(), 8, y.data()).ok());
    ASSERT_TRUE(layer.backward(y.data(), 0.f, dx.data()).ok());
    ASSERT_TRUE(layer.step().ok());
  };
  // step(name) of the layer `name`, or -1 where it cannot be attached.
  auto step_of = [&](const std::string& name) -> int64_t {
    auto client = client::Client::connect(d.client_socket());
    if (!client.ok()) return -1;
    auto layer = client->attach_layer(name);
    return layer.ok() ? layer->info().step : -1;
  };
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto source = client->create_layer("name = \"source\"\n" + layer_keys + "init_seed = 1\n");
    ASSERT_TRUE(source.ok()) << source.status();
    ASSERT_TRUE(source->save("init.safetensors").ok());
    ASSERT_TRUE(source->destroy().ok());
    auto mine = client->create_layer("name = \"cl\"\n" + layer_keys + "init_seed = 1\n");
    ASSERT_TRUE(mine.ok()) << mine.status();
    ASSERT_NO_FATAL_FAILURE(train_step(*mine));
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  const std::string checkpoints = d.dir() + "/state/default/checkpoints";
  auto configured = [&](const std::string& weights) {
    DaemonOptions o;
    o.layers = "[[layer]]\ntenant = \"default\"\nname = \"cl\"\n" + layer_keys + "init_seed = 1\n" +
               "[[layer]]\ntenant = \"default\"\nname = \"cfg\"\n" + layer_keys + "weights = \"" + weights + "\"\n";
    return o;
  };
  // The client's "cl" is no checkpoint of the config's "cl", whatever their specs.
  d.reconfigure(configured(checkpoints + "/init.safetensors"));
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_EQ(step_of("cl"), 0);
  EXPECT_FALSE(kept_aside(d, "cl.superseded-").empty()) << d.log();
  EXPECT_NE(d.log().find("is of a layer a client created under that name"), std::string::npos) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto cfg = client->attach_layer("cfg");
    ASSERT_TRUE(cfg.ok()) << cfg.status();
    ASSERT_NO_FATAL_FAILURE(train_step(*cfg));
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  // The same weights through a link: resumed.
  std::filesystem::create_directory_symlink(checkpoints, d.dir() + "/link");
  d.reconfigure(configured(d.dir() + "/link/init.safetensors"));
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_EQ(step_of("cfg"), 1) << d.log();
  EXPECT_EQ(step_of("cl"), 0) << "the config's own cl resumes from its own checkpoint";
  ASSERT_EQ(d.stop(), 0) << d.log();
  // Moved elsewhere under its name, the first path gone: resumed.
  std::filesystem::create_directories(d.dir() + "/moved");
  std::filesystem::rename(checkpoints + "/init.safetensors", d.dir() + "/moved/init.safetensors");
  d.reconfigure(configured(d.dir() + "/moved/init.safetensors"));
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_EQ(step_of("cfg"), 1) << d.log();
  ASSERT_EQ(d.stop(), 0) << d.log();
  // Another file: a new starting point, the trained checkpoint kept aside, the log saying why.
  std::filesystem::copy_file(d.dir() + "/moved/init.safetensors", d.dir() + "/moved/other.safetensors");
  d.reconfigure(configured(d.dir() + "/moved/other.safetensors"));
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_EQ(step_of("cfg"), 0) << d.log();
  EXPECT_FALSE(kept_aside(d, "cfg.superseded-").empty()) << d.log();
  EXPECT_NE(d.log().find("is of a layer created from " + d.dir() + "/moved/init.safetensors"), std::string::npos)
      << d.log();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// state_dir holds the layers' own checkpoints, each in its tenant's directory. An operator's
// checkpoint may not go among them (a backup there stopped every later start; a copy in another
// tenant's directory was restored as that tenant's), only into a tenant's checkpoints/; a file
// of one tenant found in another's directory (moved there by hand: a tenant renamed) is that
// tenant's, with a warning; a tenant named as the daemon's lock is refused; a tenant's directory
// the config no longer names is logged.
TEST(DaemonStartup, StateDirHoldsOnlyEachTenantsOwnLayers) {
  DaemonOptions o;
  o.extra_tenants = "[[tenant]]\nname = \"other\"\nuids = [" + std::to_string(::getuid() + 1) + "]\n";
  DaemonProcess d(o);
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE(client->create_layer(spec("secret")).ok());
  }
  const std::string ctl = std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " checkpoint default/secret ";
  const std::string state = d.dir() + "/state/";
  for (const std::string& inside : {state + "default/backup.safetensors", state + "other/secret.safetensors",
                                    state + "default/../other/x.safetensors", state + "x.safetensors"}) {
    auto [code, out] = run_command(ctl + inside);
    EXPECT_EQ(code, 1) << inside << ": " << out;
    EXPECT_NE(out.find("inside state_dir"), std::string::npos) << out;
    EXPECT_FALSE(std::filesystem::exists(inside)) << inside;
  }
  auto [code, out] = run_command(ctl + state + "other/checkpoints/from_default.safetensors");
  EXPECT_EQ(code, 0) << out;
  ASSERT_EQ(d.stop(), 0) << d.log();
  // Moved there by hand (a tenant renamed): restored as that directory's tenant's, and said.
  std::filesystem::create_directories(state + "other");
  std::filesystem::copy_file(state + "default/secret.safetensors", state + "other/secret.safetensors");
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_NE(d.log().find("other/secret.safetensors holds a layer of tenant 'default' (its tuteld.tenant); it is "
                         "restored as tenant 'other''s"),
            std::string::npos)
      << d.log();
  ASSERT_EQ(d.stop(), 0) << d.log();
  // A tenant the config drops: its files stay, and the log says nobody serves them.
  d.reconfigure(DaemonOptions{.extra_tenants = "[[tenant]]\nname = \"third\"\nuids = [" +
                                               std::to_string(::getuid() + 2) + "]\n"});
  ASSERT_TRUE(d.start()) << d.log();
  EXPECT_NE(d.log().find("holds 1 layer checkpoint(s) of tenant 'other', which the config does not name"),
            std::string::npos)
      << d.log();
  ASSERT_EQ(d.stop(), 0) << d.log();
  EXPECT_TRUE(std::filesystem::exists(state + "other/secret.safetensors"));
  d.reconfigure(DaemonOptions{.extra_tenants = "[[tenant]]\nname = \"tuteld.lock\"\nuids = [" +
                                               std::to_string(::getuid() + 1) + "]\n"});
  EXPECT_FALSE(d.start());
  EXPECT_NE(d.log().find("is reserved"), std::string::npos) << d.log();
}

// A layer's checkpoint in state_dir is <name>.safetensors and nothing else. A copy under another
// name (a backup) was restored under the name in its spec and clashed with the real one
// ("already has a layer", naming no file), and a renamed one came back under its old name and
// clashed at the next start; an entry that is not a regular file (a FIFO here) was skipped in
// silence, its layer created afresh and checkpointed over at exit. Each stops the start, naming
// the file; moved out, the daemon starts.
TEST(DaemonStartup, ACheckpointUnderAnotherNameOrNotAFileStopsTheStartNamingIt) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start()) << d.log();
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    ASSERT_TRUE(client->create_layer(spec("orig")).ok());
  }
  ASSERT_EQ(d.stop(), 0) << d.log();
  const std::string state = d.dir() + "/state/default/";
  std::filesystem::copy_file(state + "orig.safetensors", state + "backup.safetensors");
  EXPECT_FALSE(d.start());
  std::string log = d.log();
  EXPECT_NE(log.find("backup.safetensors holds layer 'orig'"), std::string::npos) << log;
  std::filesystem::remove(state + "backup.safetensors");
  ASSERT_EQ(::mkfifo((state + "pipe.safetensors").c_str(), 0600), 0);
  EXPECT_FALSE(d.start());  // at once: a FIFO is never opened
  log = d.log();
  EXPECT_NE(log.find("pipe.safetensors in state_dir is not a regular file"), std::string::npos) << log;
  std::filesystem::remove(state + "pipe.safetensors");
  ASSERT_TRUE(d.start()) << d.log();
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->attach_layer("orig").ok());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// A file past RLIMIT_FSIZE raised SIGXFSZ, which killed the daemon in a save or in its exit
// checkpoints (every later layer's lost). A save now fails as an IOError and the daemon serves
// on; at exit the other layers are still checkpointed, and the exit status says one failed.
TEST(DaemonStartup, AFileSizeLimitFailsTheSaveNotTheDaemon) {
  DaemonProcess d(DaemonOptions{});
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &old), 0);
  rlimit small = old;
  // Inherited by the daemon (this process spawns it and lets go): above its 16 MiB arenas, which
  // are files too, below the big layer's checkpoint.
  small.rlim_cur = 20 << 20;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const auto spawned = d.spawn();
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &old), 0);
  ASSERT_TRUE(spawned);
  ASSERT_TRUE(d.wait_serving(std::chrono::seconds(10)));
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    // 32 MiB of parameters and momentum, and a few KiB.
    auto big = client->create_layer(spec("big", 16384));
    auto tiny = client->create_layer(spec("tiny", 4));
    ASSERT_TRUE(big.ok() && tiny.ok()) << d.log();
    auto saved = big->save("big.safetensors");
    EXPECT_EQ(saved.status().code(), StatusCode::kIOError) << saved.status();
    EXPECT_TRUE(d.alive()) << d.log();
    EXPECT_TRUE(tiny->save("tiny.safetensors").ok());
  }
  EXPECT_EQ(d.stop(), 75) << d.log();  // daemon::kExitCheckpointFailed
  const std::string log = d.log();
  EXPECT_NE(log.find("checkpoint of default/big failed"), std::string::npos) << log;
  EXPECT_TRUE(std::filesystem::exists(d.dir() + "/state/default/tiny.safetensors")) << log;
}

// A counter of `tutelctl metrics`, by its whole series name ("name{labels}"); -1 where absent.
int64_t metric_value(const DaemonProcess& d, const std::string& series) {
  auto [code, text] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " metrics", false);
  if (code != 0) return -1;
  const size_t at = text.find("\n" + series + " ");
  return at == std::string::npos ? -1 : std::stoll(text.substr(at + series.size() + 2));
}

// Polls `done` every 20 ms for at most 60 s (a bound on a hang, not a timing assertion).
bool eventually(const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (std::chrono::steady_clock::now() < deadline) {
    if (done()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return done();
}

// The step a checkpoint file records ("" where there is no readable file).
std::string checkpointed_step(const std::string& path) {
  auto file = SafetensorsFile::open(path);
  if (!file.ok()) return "";
  const auto it = file->metadata().find("tuteld.step");
  return it == file->metadata().end() ? "" : it->second;
}

// server.checkpoint_interval_s: trained layers are written between exits, so a SIGKILL (an OOM
// kill, a crash) loses at most an interval's training; a layer as its last checkpoint is not
// written again; a failed write is logged and counted, the daemon goes on, and the next round
// writes the file; a destroyed layer's file does not come back.
TEST(DaemonStartup, PeriodicCheckpointsSurviveAKill) {
  DaemonProcess d(DaemonOptions{.extra_server = "checkpoint_interval_s = 1\n"});
  ASSERT_TRUE(d.start());
  const std::string state = d.dir() + "/state/default/";
  const std::string written = "tuteld_periodic_checkpoints_total{result=\"written\"}";
  const std::string unchanged = "tuteld_periodic_checkpoints_total{result=\"unchanged\"}";
  const std::string failed = "tuteld_periodic_checkpoints_total{result=\"failed\"}";
  std::vector<float> x(8 * 16), y(8 * 16), dx(8 * 16), trained(8 * 16), after(8 * 16);
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  for (float& v : x) v = normal(rng);
  {
    auto client = client::Client::connect(d.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->create_layer(spec("trained"));
    auto idle = client->create_layer(spec("idle", 16, 9));
    ASSERT_TRUE(layer.ok() && idle.ok()) << d.log();
    for (int i = 0; i < 3; ++i) {
      ASSERT_TRUE(layer->forward(x.data(), 8, y.data()).ok());
      ASSERT_TRUE(layer->backward(y.data(), 0.f, dx.data()).ok());
      ASSERT_TRUE(layer->step().ok());
    }
    ASSERT_TRUE(layer->infer(x.data(), 8, trained.data()).ok());
    ASSERT_TRUE(eventually([&] { return checkpointed_step(state + "trained.safetensors") == "3"; })) << d.log();
    ASSERT_TRUE(eventually([&] { return std::filesystem::exists(state + "idle.safetensors"); })) << d.log();
    EXPECT_EQ(metric_value(d, failed), 0);

    // Unchanged since: not written again (the same file, not a new one renamed over it).
    struct stat before {};
    ASSERT_EQ(::stat((state + "idle.safetensors").c_str(), &before), 0);
    const int64_t seen = metric_value(d, unchanged);
    ASSERT_TRUE(eventually([&] { return metric_value(d, unchanged) >= seen + 4; })) << d.log();  // two rounds
    struct stat now {};
    ASSERT_EQ(::stat((state + "idle.safetensors").c_str(), &now), 0);
    EXPECT_EQ(now.st_ino, before.st_ino) << "an unchanged layer was written again";

    // A write that fails (a symbolic link in the file's place, which a checkpoint never replaces)
    // is the layer's: logged, counted, the daemon serves on, the next round writes it.
    ASSERT_EQ(::unlink((state + "trained.safetensors").c_str()), 0);
    ASSERT_EQ(::symlink("elsewhere.safetensors", (state + "trained.safetensors").c_str()), 0);
    ASSERT_TRUE(eventually([&] { return metric_value(d, failed) >= 1; })) << d.log();
    EXPECT_NE(d.log().find("periodic checkpoint of default/trained failed"), std::string::npos) << d.log();
    EXPECT_TRUE(layer->infer(x.data(), 8, after.data()).ok());
    EXPECT_EQ(after, trained);
    ASSERT_EQ(::unlink((state + "trained.safetensors").c_str()), 0);
    ASSERT_TRUE(eventually([&] { return checkpointed_step(state + "trained.safetensors") == "3"; })) << d.log();

    // Destroyed: its file goes, and no round brings it back.
    ASSERT_TRUE(idle->destroy().ok());
    const int64_t rounds = metric_value(d, unchanged);
    ASSERT_TRUE(eventually([&] { return metric_value(d, unchanged) >= rounds + 2; })) << d.log();
    EXPECT_FALSE(std::filesystem::exists(state + "idle.safetensors"));
  }
  d.kill_hard();  // no exit checkpoint: what survives is the periodic one
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->attach_layer("trained");
  ASSERT_TRUE(layer.ok()) << layer.status() << d.log();
  EXPECT_EQ(layer->info().step, 3);
  ASSERT_TRUE(layer->infer(x.data(), 8, after.data()).ok());
  EXPECT_EQ(after, trained) << "the trained weights came back";
  EXPECT_EQ(client->attach_layer("idle").status().code(), StatusCode::kNotFound);
  // Restored from its file: the next rounds find it unchanged.
  const int64_t seen = metric_value(d, unchanged);
  ASSERT_TRUE(eventually([&] { return metric_value(d, unchanged) >= seen + 1; })) << d.log();
  EXPECT_EQ(metric_value(d, written), 0) << d.log();
}

// state_dir holds every tenant's weights and optimizer state: the daemon creates it private.
TEST(DaemonStartup, CreatesStateDirPrivate) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  const auto perms = std::filesystem::status(d.dir() + "/state").permissions();
  EXPECT_EQ(perms & (std::filesystem::perms::group_all | std::filesystem::perms::others_all),
            std::filesystem::perms::none);
  EXPECT_EQ(d.stop(), 0) << d.log();
  EXPECT_EQ(d.log().find("is open to"), std::string::npos) << d.log();
  // One that exists keeps the modes its operator gave it, with a warning where others may read.
  std::filesystem::permissions(d.dir() + "/state", std::filesystem::perms(0750));
  ASSERT_TRUE(d.start());
  EXPECT_EQ(d.stop(), 0) << d.log();
  EXPECT_NE(d.log().find("state_dir " + d.dir() + "/state is open to its group (mode 0750)"), std::string::npos)
      << d.log();
  EXPECT_EQ(std::filesystem::status(d.dir() + "/state").permissions(), std::filesystem::perms(0750));
  // Also where the sockets lie inside it, their directories made first (the daemon then stops
  // at its missing peer secret, right after making state_dir).
  char tmpl[] = "/tmp/tuteld-inside-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string dir = tmpl;
  {
    std::ofstream f(dir + "/tuteld.toml");
    f << "[server]\nclient_socket = \"st/run/client.sock\"\nadmin_socket = \"st/run/admin.sock\"\n"
      << "state_dir = \"st\"\nmetrics_listen = \"\"\npeer_secret_file = \"missing.secret\"\n[backend]\nkind = \"cpu\"\n"
      << "[[tenant]]\nname = \"default\"\nuids = [" << ::getuid() << "]\n";
  }
  const mode_t umask_was = ::umask(022);
  auto [code, out] = run_command("timeout -s KILL 60 " + std::string(TUTELD_BIN) + " --config " + dir + "/tuteld.toml");
  ::umask(umask_was);
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("missing.secret"), std::string::npos) << out;
  EXPECT_EQ(std::filesystem::status(dir + "/st").permissions() &
                (std::filesystem::perms::group_all | std::filesystem::perms::others_all),
            std::filesystem::perms::none);
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

// train_toy refuses integer options past what it stores (an int), instead of wrapping them: 2^32
// workers became 0, and a division by zero.
TEST(TrainToyOptions, IntegersPastAnIntAreRefused) {
  for (const char* option : {"--world 4294967296", "--world 4294967298", "--steps 4294967296", "--print-every 4294967296"}) {
    auto [code, out] = run_command(std::string(TRAIN_TOY_BIN) + " " + option + " --socket /nonexistent");
    EXPECT_EQ(code, 2) << option << "\n" << out;
    EXPECT_NE(out.find("needs an integer in [1, 2147483647]"), std::string::npos) << option << "\n" << out;
  }
}

TEST(DaemonStartup, RefusesASecondDaemonOnTheSameSocket) {
  DaemonProcess first(DaemonOptions{});
  ASSERT_TRUE(first.start());
  auto [code, out] = run_command(std::string(TUTELD_BIN) + " --config " + first.config_path());
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("another tuteld is running with client_socket"), std::string::npos) << out;
  EXPECT_NE(out.find("is locked by another process (pid " + std::to_string(first.pid()) + ")"), std::string::npos)
      << out;
  // With a state_dir of its own, refused before it creates it.
  char tmpl[] = "/tmp/tuteld-second-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string second_dir = tmpl;
  {
    std::ofstream f(second_dir + "/tuteld.toml");
    f << "[server]\nclient_socket = \"" << first.client_socket() << "\"\nadmin_socket = \"" << first.admin_socket()
      << "\"\nstate_dir = \"state2\"\nmetrics_listen = \"\"\n[backend]\nkind = \"cpu\"\nranks = 1\n\n[[tenant]]\n"
      << "name = \"default\"\nuids = [" << ::getuid() << "]\n";
  }
  std::tie(code, out) = run_command("timeout -s KILL 60 " + std::string(TUTELD_BIN) + " --config " + second_dir + "/tuteld.toml");
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("another tuteld is running with client_socket"), std::string::npos) << out;
  EXPECT_FALSE(std::filesystem::exists(second_dir + "/state2")) << "a refused daemon created its state_dir";
  std::error_code ec;
  std::filesystem::remove_all(second_dir, ec);
  EXPECT_TRUE(first.alive());
  EXPECT_EQ(first.stop(), 0);
}

// Two daemons on one state_dir would write each other's checkpoints, and the second would remove
// the first's saves under way as leftovers of a crash: the second is refused before it touches
// anything there, whatever its sockets.
TEST(DaemonStartup, RefusesASecondDaemonOnTheSameStateDir) {
  DaemonProcess first(DaemonOptions{});
  ASSERT_TRUE(first.start());
  const std::string checkpoints = first.dir() + "/state/default/checkpoints";
  std::filesystem::create_directories(checkpoints);
  const std::string saving = checkpoints + "/.ck.safetensors.tmp-0123456789abcdef";  // a save under way
  { std::ofstream(saving) << "half a checkpoint"; }
  char tmpl[] = "/tmp/tuteld-second-XXXXXX";
  ASSERT_NE(::mkdtemp(tmpl), nullptr);
  const std::string second_dir = tmpl;
  {
    std::ofstream f(second_dir + "/tuteld.toml");
    f << "[server]\nclient_socket = \"run/client.sock\"\nadmin_socket = \"run/admin.sock\"\n"
      << "state_dir = \"" << first.dir() << "/state\"\n"
      << "[backend]\nkind = \"cpu\"\nranks = 1\n\n[[tenant]]\nname = \"default\"\nuids = [" << ::getuid() << "]\n";
  }
  // Bounded: a daemon that wrongly starts would otherwise serve until killed.
  auto [code, out] = run_command("timeout -s KILL 60 " + std::string(TUTELD_BIN) + " --config " + second_dir + "/tuteld.toml");
  EXPECT_NE(code, 0);
  EXPECT_NE(out.find("another tuteld is running with state_dir"), std::string::npos) << out;
  EXPECT_NE(out.find("is locked by another process (pid " + std::to_string(first.pid()) + ")"), std::string::npos)
      << out;
  EXPECT_TRUE(std::filesystem::exists(saving));
  EXPECT_FALSE(std::filesystem::exists(second_dir + "/run/client.sock"));
  std::error_code ec;
  std::filesystem::remove_all(second_dir, ec);
  std::filesystem::remove(saving, ec);
  EXPECT_TRUE(first.alive());
  EXPECT_EQ(first.stop(), 0);
}

// A tenant's max_sessions bounds its connected clients: one more is refused at connect, saying
// what to do, and a closed session makes room again. tutelctl shows the count.
TEST(DaemonLimits, MaxSessionsRefusesOneMoreClientAndRecovers) {
  DaemonOptions options;
  options.default_max_sessions = 2;
  DaemonProcess d(options);
  ASSERT_TRUE(d.start());
  auto first = client::Client::connect(d.client_socket());
  auto second = client::Client::connect(d.client_socket());
  ASSERT_TRUE(first.ok() && second.ok());
  auto third = client::Client::connect(d.client_socket());
  ASSERT_FALSE(third.ok());
  EXPECT_EQ(third.status().code(), StatusCode::kResourceExhausted) << third.status();
  EXPECT_NE(third.status().message().find("raise max_sessions"), std::string::npos) << third.status();
  auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json tenants");
  ASSERT_EQ(code, 0) << out;
  const auto tenants = nlohmann::json::parse(out)["tenants"];
  ASSERT_EQ(tenants.size(), 1u);
  EXPECT_EQ(tenants[0]["sessions"].get<int64_t>(), 2);
  EXPECT_EQ(tenants[0]["max_sessions"].get<int64_t>(), 2);
  // The existing sessions are untouched; closing one makes room (the close is asynchronous).
  EXPECT_TRUE(first->ping().ok());
  second->close();
  Result<client::Client> again = Status::Unavailable("not tried");
  for (int i = 0; i < 200 && !again.ok(); ++i) {
    again = client::Client::connect(d.client_socket());
    if (!again.ok()) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->ping().ok());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// An admin answer too long for one frame (the layers table of thousands of layers) is answered
// with why, and the admin session goes on; it used to be closed, and tutelctl said tuteld could
// not be reached.
TEST(DaemonLimits, AnAdminAnswerTooLongForAFrameIsRefusedSayingWhy) {
  DaemonOptions options;
  options.default_tenant_extra = "max_layers = 4096\n";
  DaemonProcess d(options);
  ASSERT_TRUE(d.start());
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto create = [&](int i) {
    return client->create_layer("name = \"l" + std::to_string(i) +
                                "\"\nexperts = 2\nmodel_dim = 2\nhidden = 2\nk = 1\ninit_seed = 1\n"
                                "[optimizer]\nkind = \"sgd\"\nlr = 0.1\n");
  };
  std::vector<client::Layer> layers;
  auto first = create(0);
  ASSERT_TRUE(first.ok()) << first.status();
  layers.push_back(std::move(*first));
  // One layer's share of the answer; then enough layers to pass the limit.
  auto [one_code, one] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json layers");
  ASSERT_EQ(one_code, 0) << one;
  const size_t per_layer = nlohmann::json::parse(one)["layers"][0].dump().size();
  constexpr size_t kFrameLimit = size_t{1} << 20;  // ipc::kMaxFrameBody
  for (size_t i = 1; i < kFrameLimit / per_layer + 16; ++i) {
    auto layer = create(static_cast<int>(i));
    ASSERT_TRUE(layer.ok()) << layer.status();
    layers.push_back(std::move(*layer));
  }
  auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " layers");
  EXPECT_EQ(code, 1) << out;
  EXPECT_NE(out.find("ResourceExhausted: the answer is"), std::string::npos) << out;
  EXPECT_NE(out.find("more than a frame's 1048576"), std::string::npos) << out;
  EXPECT_EQ(out.find("cannot reach"), std::string::npos) << out;
  auto [status_code, status] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " status");
  EXPECT_EQ(status_code, 0) << status;
  EXPECT_EQ(d.stop(), 0) << d.log();
}

}  // namespace
}  // namespace tutel::testing
