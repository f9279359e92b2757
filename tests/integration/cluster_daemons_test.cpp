// Daemons with a [cluster] table: they serve only once every node has joined, or exit naming the
// nodes that never came; tutelctl peers and the metrics show every node and its state; a node
// that dies is reported down while the others keep serving; a group layer's peers show the bytes
// its collectives moved, equal on both ends. States are awaited with generous bounds, not timed.
#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "daemon_fixture.hpp"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

using nlohmann::json;

json peers_of(const DaemonProcess& d) {
  const auto [rc, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json peers", false);
  if (rc != 0) return json();
  return json::parse(out, nullptr, /*allow_exceptions=*/false);
}

// Polls `tutelctl peers` until pred holds (30 s at most); the last reply for the message.
::testing::AssertionResult await_peers(const DaemonProcess& d, const std::function<bool(const json&)>& pred) {
  json last;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (std::chrono::steady_clock::now() < deadline) {
    last = peers_of(d);
    if (!last.is_discarded() && !last.is_null() && pred(last)) return ::testing::AssertionSuccess();
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return ::testing::AssertionFailure() << "last tutelctl peers reply: " << last.dump(2);
}

std::string cluster_table(uint16_t port, int node, int nodes, int bootstrap_ms = 30000) {
  return "coordinator = \"127.0.0.1:" + std::to_string(port) + "\"\nnodes = " + std::to_string(nodes) +
         "\nnode_rank = " + std::to_string(node) + "\nbootstrap_timeout_ms = " + std::to_string(bootstrap_ms) +
         "\nheartbeat_interval_ms = 50\npeer_timeout_ms = 1000\n";
}

std::vector<std::unique_ptr<DaemonProcess>> make_cluster(uint16_t port, int nodes, int bootstrap_ms = 30000) {
  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  for (int n = 0; n < nodes; ++n) {
    DaemonOptions o;
    o.cluster = cluster_table(port, n, nodes, bootstrap_ms);
    daemons.push_back(std::make_unique<DaemonProcess>(o));
  }
  return daemons;
}

bool ptrace_allowed() {
  std::ifstream f("/proc/sys/kernel/yama/ptrace_scope");
  int scope = 0;
  return !f || ((f >> scope) && scope == 0);
}

bool node_is(const json& reply, int node, const std::string& state) {
  const json& nodes = reply["cluster"]["nodes"];
  return nodes.is_array() && static_cast<int>(nodes.size()) > node && nodes[node]["state"] == state;
}

TEST(ClusterDaemons, ServeOnceCompleteAndSeeEveryNodeUp) {
  const uint16_t port = free_port();
  auto daemons = make_cluster(port, 3);
  // Node 2 starts last: the others must not serve before it has joined.
  ASSERT_TRUE(daemons[0]->spawn());
  ASSERT_TRUE(daemons[1]->spawn());
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  EXPECT_EQ(daemons[0]->log().find("serving on"), std::string::npos) << daemons[0]->log();
  ASSERT_TRUE(daemons[2]->spawn());
  for (auto& d : daemons) ASSERT_TRUE(d->wait_serving(std::chrono::seconds(30))) << d->log();

  for (int n = 0; n < 3; ++n) {
    SCOPED_TRACE("node " + std::to_string(n));
    ASSERT_TRUE(await_peers(*daemons[n], [](const json& r) {
      for (const json& node : r["cluster"]["nodes"])
        if (node["state"] != "up" || (!node["self"].get<bool>() && node["heartbeats_received"].get<int64_t>() < 2))
          return false;
      return r["cluster"]["nodes"].size() == 3;
    }));
    const json r = peers_of(*daemons[n]);
    EXPECT_EQ(r["cluster"]["node_rank"], n);
    for (int m = 0; m < 3; ++m) {
      const json& node = r["cluster"]["nodes"][m];
      EXPECT_EQ(node["node"], m);
      EXPECT_EQ(node["self"], m == n);
      EXPECT_EQ(node["first_rank"], m);  // one rank per node here
      if (m != n) {
        EXPECT_NE(node["address"].get<std::string>().find("127.0.0.1, pid"), std::string::npos) << node;
      }
    }
  }
  // The human table and the metrics say the same.
  const std::string table = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[1]->admin_socket() + " peers", false).second;
  EXPECT_NE(table.find("NODE"), std::string::npos) << table;
  EXPECT_NE(table.find("self"), std::string::npos) << table;
  const std::string metrics =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[1]->admin_socket() + " metrics", false).second;
  for (int m = 0; m < 3; ++m)
    EXPECT_NE(metrics.find("tuteld_node_up{node=\"" + std::to_string(m) + "\"} 1"), std::string::npos) << metrics;
  for (auto& d : daemons) EXPECT_EQ(d->stop(), 0) << d->log();
}

TEST(ClusterDaemons, StartUpFailsNamingTheMissingNode) {
  const uint16_t port = free_port();
  auto daemons = make_cluster(port, 3, /*bootstrap_ms=*/1500);
  ASSERT_TRUE(daemons[0]->spawn());
  ASSERT_TRUE(daemons[1]->spawn());
  for (int n = 0; n < 2; ++n) {
    SCOPED_TRACE("node " + std::to_string(n));
    EXPECT_EQ(daemons[n]->wait_exit(std::chrono::seconds(30)), 1) << daemons[n]->log();
    const std::string log = daemons[n]->log();
    EXPECT_NE(log.find("node 2 never reached the coordinator at 127.0.0.1:" + std::to_string(port)), std::string::npos)
        << log;
    EXPECT_EQ(log.find("serving on"), std::string::npos) << log;
    // It removed its sockets: nothing is left for a client to hang on.
    EXPECT_FALSE(std::filesystem::exists(daemons[n]->client_socket()));
  }
}

// A daemon still starting (here: waiting for the cluster's other node, which may take minutes)
// ends at SIGTERM or SIGINT as the signal's default action would: the signals are blocked in
// every thread of tuteld and taken by one (signal_watcher.hpp), which until the daemon serves
// lets them end it, killed by the signal, as a service manager expects.
TEST(ClusterDaemons, ASignalWhileStartingEndsTheDaemonByThatSignal) {
  for (int signum : {SIGTERM, SIGINT}) {
    SCOPED_TRACE(signum == SIGTERM ? "SIGTERM" : "SIGINT");
    auto daemons = make_cluster(free_port(), 2, /*bootstrap_ms=*/120000);
    ASSERT_TRUE(daemons[0]->spawn());
    bool joining = false;
    for (int i = 0; i < 1000 && !joining; ++i) {
      joining = daemons[0]->log().find("joining the cluster") != std::string::npos;
      if (!joining) std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    ASSERT_TRUE(joining) << daemons[0]->log();
    ASSERT_EQ(::kill(daemons[0]->pid(), signum), 0);
    EXPECT_EQ(daemons[0]->wait_exit(std::chrono::seconds(20)), 128 + signum) << daemons[0]->log();
    EXPECT_EQ(daemons[0]->term_signal(), signum) << "killed by the signal, not an exit code";
    EXPECT_EQ(daemons[0]->log().find("serving on"), std::string::npos) << daemons[0]->log();
  }
}

TEST(ClusterDaemons, ADeadNodeIsDownWhileTheOthersServe) {
  const uint16_t port = free_port();
  auto daemons = make_cluster(port, 3);
  for (auto& d : daemons) ASSERT_TRUE(d->spawn());
  for (auto& d : daemons) ASSERT_TRUE(d->wait_serving(std::chrono::seconds(30))) << d->log();
  ASSERT_TRUE(await_peers(*daemons[0], [](const json& r) { return node_is(r, 2, "up"); }));

  daemons[2]->kill_hard();
  for (int n = 0; n < 2; ++n) {
    SCOPED_TRACE("node " + std::to_string(n));
    EXPECT_TRUE(await_peers(*daemons[n], [&](const json& r) {
      return node_is(r, 2, "down") && node_is(r, 1 - n, "up") &&
             r["cluster"]["nodes"][2]["last_error"].get<std::string>().find("node 2 (127.0.0.1, pid") !=
                 std::string::npos;
    }));
  }
  const std::string metrics =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[0]->admin_socket() + " metrics", false).second;
  EXPECT_NE(metrics.find("tuteld_node_up{node=\"2\"} 0"), std::string::npos) << metrics;
  // The survivors serve.
  auto client = client::Client::connect(daemons[0]->client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer("name = \"solo\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 1\n");
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::vector<float> x(8 * 16, 0.25f), y(8 * 16);
  EXPECT_TRUE(layer->infer(x.data(), 8, y.data()).ok());
  for (int n = 0; n < 2; ++n) EXPECT_EQ(daemons[n]->stop(), 0) << daemons[n]->log();
}

// A group layer of two ranks, on two daemons (over UCX) or both on one daemon (through memory):
// each side's peers row counts what it sent and received, and what one side sent is what the
// other received.
void check_group_peers(bool one_daemon) {
  DaemonOptions options;
  options.ranks = one_daemon ? 2 : 1;
  DaemonProcess d0(options), d1(options);
  ASSERT_TRUE(d0.start());
  if (!one_daemon) {
    ASSERT_TRUE(d1.start());
  }
  DaemonProcess* daemons[2] = {&d0, one_daemon ? &d0 : &d1};
  // Two daemons of one host pull large messages out of each other's memory where the kernel
  // lets a process read a sibling's (no Yama restriction).
  const std::string via = one_daemon ? "memory" : ptrace_allowed() ? "ucx+peer-memory" : "ucx";
  const uint16_t port = free_port();
  constexpr int64_t kTokens = 24;
  std::vector<Status> results(2);
  std::vector<std::thread> threads;
  std::vector<std::optional<client::Client>> clients(2);
  std::vector<std::optional<client::Layer>> layers(2);
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      auto c = client::Client::connect(daemons[r]->client_socket());
      if (!c.ok()) return void(results[r] = c.status());
      clients[r].emplace(std::move(*c));
      auto l = clients[r]->create_layer(
          "name = \"ep" + std::to_string(one_daemon ? r : 0) + "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 5\n[group]\ncoordinator = "
          "\"127.0.0.1:" + std::to_string(port) + "\"\nsize = 2\nrank = " + std::to_string(r) +
          "\nbootstrap_timeout_ms = 20000\n");
      if (!l.ok()) return void(results[r] = l.status());
      layers[r].emplace(std::move(*l));
      std::vector<float> x(kTokens * 16, 0.1f * static_cast<float>(r + 1)), y(kTokens * 16);
      results[r] = layers[r]->infer(x.data(), kTokens, y.data());
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) ASSERT_TRUE(results[r].ok()) << results[r] << d0.log() << d1.log();

  const json p0 = peers_of(d0), p1 = peers_of(*daemons[1]);
  ASSERT_TRUE(p0["cluster"].is_null()) << p0;
  ASSERT_EQ(p0["groups"].size(), one_daemon ? 2u : 1u) << p0;
  ASSERT_EQ(p1["groups"].size(), one_daemon ? 2u : 1u) << p1;
  auto group_of_rank = [](const json& reply, int rank) {
    for (const json& g : reply["groups"])
      if (g["rank"] == rank) return g;
    return json();
  };
  // A group that met at its coordinator names it; it has no [group] name.
  EXPECT_EQ(group_of_rank(p0, 0)["coordinator"], "127.0.0.1:" + std::to_string(port)) << p0;
  EXPECT_TRUE(group_of_rank(p0, 0)["name"].is_null()) << p0;
  const json g0 = group_of_rank(p0, 0)["peers"][0];
  const json g1 = group_of_rank(p1, 1)["peers"][0];
  EXPECT_EQ(g0["rank"], 1);
  EXPECT_EQ(g1["rank"], 0);
  EXPECT_EQ(g0["via"], via);
  EXPECT_EQ(g1["via"], via);
  EXPECT_EQ(g0["state"], "up");
  EXPECT_GT(g0["bytes_sent"].get<uint64_t>(), 0u) << p0;
  EXPECT_EQ(g0["bytes_sent"], g1["bytes_received"]) << p0 << p1;
  EXPECT_EQ(g0["bytes_received"], g1["bytes_sent"]) << p0 << p1;
  // An inference forward's two all-to-alls carry at least the dispatched tokens: a [E/W, C, M]
  // float block each way per all-to-all, C ≥ 1.
  EXPECT_GE(g0["bytes_sent"].get<uint64_t>(), 2u * 2 * 16 * 4) << p0;
  const std::string metrics = run_command(std::string(TUTELCTL_BIN) + " --socket " + d0.admin_socket() + " metrics", false).second;
  EXPECT_NE(metrics.find("tuteld_peer_sent_bytes_total{layer=\"default/ep0\",peer=\"1\"} " +
                         std::to_string(g0["bytes_sent"].get<uint64_t>())),
            std::string::npos)
      << metrics;
  const std::string table = run_command(std::string(TUTELCTL_BIN) + " --socket " + d0.admin_socket() + " peers", false).second;
  EXPECT_NE(table.find("(not part of a cluster)"), std::string::npos) << table;
  EXPECT_NE(table.find("default/ep0"), std::string::npos) << table;
  EXPECT_NE(table.find(via), std::string::npos) << table;
  layers[0].reset();
  layers[1].reset();
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  if (!one_daemon) {
    EXPECT_EQ(d1.stop(), 0) << d1.log();
  }
}

TEST(ClusterDaemons, GroupPeersOnTwoDaemonsCountTheirTraffic) { check_group_peers(/*one_daemon=*/false); }

TEST(ClusterDaemons, GroupRanksOfOneDaemonExchangeThroughMemory) { check_group_peers(/*one_daemon=*/true); }

}  // namespace
}  // namespace tutel::testing
