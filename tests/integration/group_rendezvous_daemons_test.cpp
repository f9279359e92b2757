// Group layers without a coordinator of their own, in a cluster of daemons: the group meets by
// name at node 0's rendezvous service. The layer computes exactly what the same layer
// bootstrapped through an explicit coordinator computes; the failure paths name what is missing
// (a rank, a cluster, node 0).
#include <gtest/gtest.h>

#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "daemon_fixture.hpp"
#include "raw_session.hpp"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

constexpr int64_t kTokens = 24, kModel = 16;

// rendezvous_port 0: the default (the coordinator's address, taken over after the join).
std::string cluster_table(uint16_t port, uint16_t rendezvous_port, int node, int nodes) {
  return "coordinator = \"127.0.0.1:" + std::to_string(port) + "\"\n" +
         (rendezvous_port == 0
              ? std::string()
              : "rendezvous = \"127.0.0.1:" + std::to_string(rendezvous_port) + "\"\n") +
         "nodes = " + std::to_string(nodes) + "\nnode_rank = " + std::to_string(node) +
         "\nbootstrap_timeout_ms = 30000\nheartbeat_interval_ms = 50\npeer_timeout_ms = 1000\n";
}

// Two daemons of a cluster, serving.
std::vector<std::unique_ptr<DaemonProcess>> start_cluster(uint16_t port, uint16_t rendezvous_port) {
  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  for (int n = 0; n < 2; ++n) {
    DaemonOptions o;
    o.cluster = cluster_table(port, rendezvous_port, n, 2);
    daemons.push_back(std::make_unique<DaemonProcess>(o));
  }
  for (auto& d : daemons) EXPECT_TRUE(d->spawn());
  for (auto& d : daemons) EXPECT_TRUE(d->wait_serving(std::chrono::seconds(30))) << d->log();
  return daemons;
}

// The [group] table: by name (port 0) or through a coordinator.
std::string group_layer(const std::string& layer_name, const std::string& group,
                        uint16_t coordinator_port, int rank, int size = 2,
                        int bootstrap_ms = 20000) {
  std::string spec =
      "name = \"" + layer_name +
      "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ncapacity_factor = 1.0\ninit_seed = 77\n"
      "[optimizer]\nkind = \"sgd\"\nlr = 0.1\n[group]\n";
  if (coordinator_port != 0)
    spec += "coordinator = \"127.0.0.1:" + std::to_string(coordinator_port) + "\"\n";
  if (!group.empty()) spec += "name = \"" + group + "\"\n";
  return spec + "size = " + std::to_string(size) + "\nrank = " + std::to_string(rank) +
         "\nbootstrap_timeout_ms = " + std::to_string(bootstrap_ms) +
         "\ncollective_timeout_ms = 20000\n";
}

struct RankRun {
  Status status;
  std::vector<float> y, dx;
  client::ForwardInfo info;
};

// Rank r (on daemon r) creates its layer, runs forward, backward and step on `x[r]`, `dy[r]`.
std::vector<RankRun> run_group(const std::vector<std::unique_ptr<DaemonProcess>>& daemons,
                               const std::function<std::string(int rank)>& spec,
                               const std::vector<std::vector<float>>& x,
                               const std::vector<std::vector<float>>& dy) {
  std::vector<RankRun> out(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      RankRun& o = out[r];
      auto client = client::Client::connect(daemons[r]->client_socket());
      if (!client.ok()) return void(o.status = client.status());
      auto layer = client->create_layer(spec(r));
      if (!layer.ok()) return void(o.status = layer.status());
      o.y.resize(kTokens * kModel);
      o.dx.resize(kTokens * kModel);
      Status st = layer->forward(x[r].data(), kTokens, o.y.data(), &o.info);
      if (st.ok()) st = layer->backward(dy[r].data(), 0.1f, o.dx.data());
      if (st.ok()) st = layer->step().status();
      if (st.ok())
        st = layer->forward(x[r].data(), kTokens, o.y.data(), &o.info);  // after the step
      o.status = st;
    });
  for (auto& t : threads) t.join();
  return out;
}

bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

TEST(GroupRendezvousDaemons, AGroupByNameComputesWhatTheSameGroupWithACoordinatorComputes) {
  const uint16_t rendezvous_port = free_port();  // the cluster's coordinator port, reused
  auto daemons = start_cluster(rendezvous_port, 0);
  ASSERT_FALSE(::testing::Test::HasFailure());
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> x(2), dy(2);
  for (int r = 0; r < 2; ++r) {
    for (int64_t i = 0; i < kTokens * kModel; ++i) x[r].push_back(normal(rng));
    for (int64_t i = 0; i < kTokens * kModel; ++i) dy[r].push_back(normal(rng));
  }
  const auto by_name = run_group(
      daemons, [](int r) { return group_layer("ep_named", "moe-group", 0, r); }, x, dy);
  const uint16_t coordinator = free_port();
  const auto by_coordinator = run_group(
      daemons, [&](int r) { return group_layer("ep_coord", "", coordinator, r); }, x, dy);
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(by_name[r].status.ok()) << by_name[r].status << "\n"
                                        << daemons[0]->log() << daemons[1]->log();
    ASSERT_TRUE(by_coordinator[r].status.ok()) << by_coordinator[r].status;
    // The same computation over the same transport: bit for bit.
    EXPECT_EQ(by_name[r].y, by_coordinator[r].y);
    EXPECT_EQ(by_name[r].dx, by_coordinator[r].dx);
    EXPECT_EQ(by_name[r].info.capacity, by_coordinator[r].info.capacity);
    EXPECT_EQ(by_name[r].info.l_aux, by_coordinator[r].info.l_aux);
    float norm = 0.f;
    for (float v : by_name[r].y) norm += v * v;
    EXPECT_GT(norm, 0.f);
  }
  EXPECT_TRUE(contains(daemons[0]->log(),
                       "group rendezvous service on 127.0.0.1:" + std::to_string(rendezvous_port)));
  // The admin socket tells the two apart: a name and no coordinator, a coordinator and no name.
  RawSession admin(daemons[0]->admin_socket());
  auto layers = admin.call(ipc::FrameType::kAdminLayers, nlohmann::json::object(), ipc::FrameType::kOk);
  ASSERT_TRUE(layers.ok()) << layers.status();
  std::map<std::string, nlohmann::json> group;
  for (const auto& l : (*layers)["layers"]) group[l["name"].get<std::string>()] = l["group"];
  EXPECT_EQ(group["ep_named"]["name"], "moe-group") << layers->dump();
  EXPECT_TRUE(group["ep_named"]["coordinator"].is_null()) << layers->dump();
  EXPECT_EQ(group["ep_coord"]["coordinator"], "127.0.0.1:" + std::to_string(coordinator)) << layers->dump();
  EXPECT_TRUE(group["ep_coord"]["name"].is_null()) << layers->dump();
  for (auto& d : daemons) EXPECT_EQ(d->stop(), 0) << d->log();
}

TEST(GroupRendezvousDaemons, FailuresNameTheMissingRankTheClusterAndNodeZero) {
  const uint16_t rendezvous_port = free_port();  // configured apart from the coordinator
  auto daemons = start_cluster(free_port(), rendezvous_port);
  ASSERT_FALSE(::testing::Test::HasFailure());
  const std::string where = "127.0.0.1:" + std::to_string(rendezvous_port);
  {
    // Rank 1 never comes: rank 0's create fails after its bootstrap timeout, naming rank 1.
    auto client = client::Client::connect(daemons[0]->client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->create_layer(group_layer("lonely", "lonely", 0, 0, 2, 1000));
    ASSERT_FALSE(layer.ok());
    const std::string msg(layer.status().message());
    EXPECT_TRUE(contains(msg, "rank 1 never reached the rendezvous service at " + where)) << msg;
    EXPECT_TRUE(contains(msg, "group 'default/lonely'")) << msg;
  }
  {
    // Without [cluster] a group needs a coordinator.
    DaemonProcess solo(DaemonOptions{});
    ASSERT_TRUE(solo.start());
    auto client = client::Client::connect(solo.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto layer = client->create_layer(group_layer("nocluster", "g", 0, 0));
    ASSERT_FALSE(layer.ok());
    EXPECT_TRUE(contains(std::string(layer.status().message()), "not part of a cluster"))
        << layer.status();
    EXPECT_EQ(solo.stop(), 0) << solo.log();
  }
  // Node 0 dies: a create on node 1 fails (no hang), naming node 0 and the rendezvous address.
  daemons[0]->kill_hard();
  auto client = client::Client::connect(daemons[1]->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(group_layer("orphan", "orphan", 0, 1, 2, 2000));
  ASSERT_FALSE(layer.ok());
  const std::string msg(layer.status().message());
  EXPECT_TRUE(contains(msg, "node 0")) << msg;
  EXPECT_TRUE(contains(msg, where)) << msg;
  EXPECT_EQ(daemons[1]->stop(), 0) << daemons[1]->log();
}

}  // namespace
}  // namespace tutel::testing
