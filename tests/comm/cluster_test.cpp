// The cluster of daemons (comm/cluster.hpp) over real UCX between forked processes: nodes that
// join see each other up; a node that never arrives fails the join naming it; a stopped node is
// reported down and comes back when it resumes; a killed node stays down while the others keep
// seeing each other. States are awaited ("eventually", with generous bounds), never timed.
#include "tutel/comm/cluster.hpp"

#include <gtest/gtest.h>
#include <signal.h>
#include <unistd.h>

#include <functional>
#include <string>
#include <thread>

#include "beacon.hpp"
#include "comm_test_util.hpp"
#include "ucx_rank.hpp"

namespace tutel::comm {
namespace {

using namespace std::chrono_literals;

// The heartbeats' authentication (comm/ucx/beacon.hpp): a node takes a beacon only from a holder
// of the secret, for this cluster (its table digest), from the sender its tag names, and never
// twice (counters only grow). Anything else that reaches its UCX worker could otherwise say that
// a node left, and every node would report it down for good.
TEST(ClusterBeacons, OnlyFreshBeaconsThatProveTheSecretAreTaken) {
  using ucx::BeaconKind;
  Digest table{};
  table[0] = 7;
  const ucx::BeaconKeys keys{std::string(32, 's'), table};
  ucx::BeaconCheck check(keys, 3);
  const std::string first = ucx::encode_beacon(keys, 1, BeaconKind::kHeartbeat, 1);
  EXPECT_EQ(check.accept(1, first), BeaconKind::kHeartbeat);
  EXPECT_EQ(check.accept(1, first), std::nullopt) << "a replay";
  EXPECT_EQ(check.accept(2, ucx::encode_beacon(keys, 2, BeaconKind::kHeartbeat, 5)), BeaconKind::kHeartbeat);
  EXPECT_EQ(check.accept(2, ucx::encode_beacon(keys, 2, BeaconKind::kBye, 4)), std::nullopt) << "an older one";
  EXPECT_EQ(check.accept(2, ucx::encode_beacon(keys, 1, BeaconKind::kBye, 9)), std::nullopt) << "another sender's";
  ucx::BeaconKeys other_secret = keys, other_cluster = keys;
  other_secret.secret = std::string(32, 't');
  other_cluster.table[0] = 8;
  EXPECT_EQ(check.accept(1, ucx::encode_beacon(other_secret, 1, BeaconKind::kBye, 2)), std::nullopt);
  EXPECT_EQ(check.accept(1, ucx::encode_beacon(other_cluster, 1, BeaconKind::kBye, 2)), std::nullopt);
  EXPECT_EQ(check.accept(1, ucx::encode_beacon({"", table}, 1, BeaconKind::kBye, 2)), std::nullopt) << "no mac";
  std::string tampered = ucx::encode_beacon(keys, 1, BeaconKind::kHeartbeat, 2);
  tampered[0] = static_cast<char>(BeaconKind::kBye);  // a heartbeat turned into a goodbye
  EXPECT_EQ(check.accept(1, tampered), std::nullopt);
  const std::string good = ucx::encode_beacon(keys, 1, BeaconKind::kBye, 2);
  EXPECT_EQ(check.accept(1, good.substr(0, good.size() - 1)), std::nullopt) << "short";
  EXPECT_EQ(check.accept(1, good + "x"), std::nullopt) << "long";
  EXPECT_EQ(check.accept(3, good), std::nullopt) << "no such node";
  EXPECT_EQ(check.accept(-1, good), std::nullopt);
  std::string unknown = ucx::encode_beacon(keys, 1, static_cast<BeaconKind>(3), 3);
  EXPECT_EQ(check.accept(1, unknown), std::nullopt) << "an unknown kind";
  // All the refused ones left the counter where it was: the genuine next one is taken.
  EXPECT_EQ(check.accept(1, good), BeaconKind::kBye);
  // Without a secret only the form is checked: a counter anyone may forge is not kept (one near
  // 2^64 would mute the node for good).
  ucx::BeaconCheck open({"", table}, 2);
  EXPECT_EQ(open.accept(1, ucx::encode_beacon({"", table}, 1, BeaconKind::kHeartbeat, UINT64_MAX)),
            BeaconKind::kHeartbeat);
  EXPECT_EQ(open.accept(1, ucx::encode_beacon({"", table}, 1, BeaconKind::kHeartbeat, 1)), BeaconKind::kHeartbeat);
  EXPECT_EQ(open.accept(1, ucx::encode_beacon(keys, 1, BeaconKind::kHeartbeat, 2)), std::nullopt) << "a mac";
}
using testing::ChildChannel;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

ClusterOptions node_options(uint16_t port, int node, int nodes) {
  ClusterOptions o;
  o.coordinator_port = port;
  o.node_rank = node;
  o.nodes = nodes;
  o.bootstrap_timeout = 20s;
  o.heartbeat_interval = 50ms;
  o.peer_timeout = 1000ms;
  return o;
}

// Polls until `pred(status)` holds or 30 s pass; returns the last status text on failure.
std::string await_status(const Cluster& cluster, const std::function<bool(const std::vector<NodeStatus>&)>& pred,
                         const std::string& what) {
  const auto deadline = std::chrono::steady_clock::now() + 30s;
  std::string last;
  while (std::chrono::steady_clock::now() < deadline) {
    const std::vector<NodeStatus> s = cluster.status();
    if (pred(s)) return "";
    last.clear();
    for (const NodeStatus& n : s)
      last += "node " + std::to_string(n.node) + (n.up ? " up" : " down: " + n.error) + "; ";
    std::this_thread::sleep_for(20ms);
  }
  return "node " + std::to_string(cluster.node_rank()) + " never saw " + what + " (last: " + last + ")";
}

bool all_up_and_heard(const std::vector<NodeStatus>& s) {
  for (const NodeStatus& n : s)
    if (!n.up || (!n.self && n.heartbeats_received < 3)) return false;
  return true;
}

TEST(Cluster, NodesThatJoinSeeEachOtherUp) {
  const uint16_t port = testing::free_port();
  constexpr int kNodes = 3;
  testing::ProcessGroup group(kNodes, [&](int node, const ChildChannel& channel) -> std::string {
    auto cluster = join_cluster(node_options(port, node, kNodes));
    if (!cluster.ok()) return "join: " + cluster.status().to_string();
    std::string error = await_status(**cluster, all_up_and_heard, "every node up");
    const std::vector<NodeStatus> s = (*cluster)->status();
    if ((*cluster)->nodes() != kNodes || (*cluster)->node_rank() != node || s.size() != kNodes)
      error += "wrong shape; ";
    for (int n = 0; n < static_cast<int>(s.size()); ++n) {
      if (s[n].node != n || s[n].self != (n == node)) error += "node " + std::to_string(n) + " misnumbered; ";
      if (n != node && !contains(s[n].address, "127.0.0.1, pid "))
        error += "node " + std::to_string(n) + " has address '" + s[n].address + "'; ";
      if (n != node && s[n].heartbeats_sent == 0) error += "sent nothing to " + std::to_string(n) + "; ";
    }
    // Nobody leaves before everyone has checked: a leaving node is (rightly) reported down.
    channel.notify();
    channel.await_release();
    return error;
  });
  for (int n = 0; n < kNodes; ++n) ASSERT_TRUE(group.wait_notified(n, 60s)) << "node " << n;
  for (int n = 0; n < kNodes; ++n) group.release(n);
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

TEST(Cluster, JoinFailsNamingTheNodeThatNeverArrives) {
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(2, [&](int node, const ChildChannel&) -> std::string {
    ClusterOptions o = node_options(port, node, 3);
    o.bootstrap_timeout = 1500ms;
    auto cluster = join_cluster(o);
    if (cluster.ok()) return "joined a cluster of 3 without node 2";
    if (cluster.status().code() != StatusCode::kTimeout ||
        !contains(cluster.status().message(), "node 2 never reached the coordinator"))
      return "unexpected error: " + cluster.status().to_string();
    return "";
  });
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

// Node 2 is stopped (SIGSTOP), resumed, then killed; nodes 0 and 1 follow its state.
constexpr int kVictim = 2;

TEST(Cluster, AStoppedNodeIsDownUntilItResumesAndAKilledOneStaysDown) {
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(3, [&](int node, const ChildChannel& channel) -> std::string {
    auto cluster = join_cluster(node_options(port, node, 3));
    if (!cluster.ok()) return "join: " + cluster.status().to_string();
    std::string error = await_status(**cluster, all_up_and_heard, "every node up");
    channel.notify();
    if (node == kVictim) {
      for (;;) ::pause();  // heartbeats from its thread until the parent stops or kills it
    }
    const Cluster& c = **cluster;
    auto victim_down_with = [](std::string_view why) {
      return [why](const std::vector<NodeStatus>& s) {
        return !s[kVictim].up && s[kVictim].error.find(why) != std::string::npos;
      };
    };
    // Stopped: silent, so down for want of heartbeats.
    error += await_status(c, victim_down_with("node 2 (127.0.0.1, pid "), "node 2 down");
    error += await_status(c, victim_down_with("sent no heartbeat"), "node 2 silent");
    channel.notify();
    channel.await_release();
    // Resumed: up again.
    error += await_status(c, [](const std::vector<NodeStatus>& s) { return s[kVictim].up; }, "node 2 up again");
    channel.notify();
    channel.await_release();
    // Killed: its connection breaks; it stays down, and the survivors still see each other.
    error += await_status(c, victim_down_with("failed"), "node 2 failed");
    error += await_status(
        c, [](const std::vector<NodeStatus>& s) { return s[0].up && s[1].up; }, "nodes 0 and 1 up");
    // Stay until both survivors have checked: one that leaves is (rightly) down for the other.
    channel.notify();
    channel.await_release();
    return error;
  });
  for (int n = 0; n < 3; ++n) ASSERT_TRUE(group.wait_notified(n, 60s)) << "node " << n << " never joined";
  ::kill(group.pid(kVictim), SIGSTOP);
  const bool saw_down = group.wait_notified(0, 60s) && group.wait_notified(1, 60s);
  ::kill(group.pid(kVictim), SIGCONT);
  EXPECT_TRUE(saw_down);
  group.release(0);
  group.release(1);
  const bool saw_up = group.wait_notified(0, 60s) && group.wait_notified(1, 60s);
  EXPECT_TRUE(saw_up);
  group.kill_child(kVictim);
  group.release(0);
  group.release(1);
  const bool checked = group.wait_notified(0, 60s) && group.wait_notified(1, 60s);
  EXPECT_TRUE(checked);
  group.release(0);
  group.release(1);
  EXPECT_EQ(testing::describe_failures(group.wait_all(), {kVictim}), "");
}

TEST(Cluster, ANodeThatShutsDownIsReportedAsLeft) {
  const uint16_t port = testing::free_port();
  testing::ProcessGroup group(2, [&](int node, const ChildChannel& channel) -> std::string {
    auto cluster = join_cluster(node_options(port, node, 2));
    if (!cluster.ok()) return "join: " + cluster.status().to_string();
    std::string error = await_status(**cluster, all_up_and_heard, "every node up");
    if (node == 1) {
      channel.notify();
      channel.await_release();
      cluster->reset();  // leaves
      return error;
    }
    channel.notify();
    error += await_status(
        **cluster,
        [](const std::vector<NodeStatus>& s) {
          return !s[1].up && s[1].error.find("node 1 (127.0.0.1, pid ") != std::string::npos &&
                 s[1].error.find("left the cluster") != std::string::npos;
        },
        "node 1 leave");
    return error;
  });
  ASSERT_TRUE(group.wait_notified(0, 60s));
  ASSERT_TRUE(group.wait_notified(1, 60s));
  group.release(1);
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

TEST(Cluster, RefusesBadOptions) {
  ClusterOptions o;
  o.nodes = 0;
  EXPECT_TRUE(contains(validate(o).message(), "nodes 0"));
  o.nodes = 2;
  o.node_rank = 2;
  EXPECT_TRUE(contains(validate(o).message(), "node_rank 2"));
  o.node_rank = 1;
  EXPECT_TRUE(contains(validate(o).message(), "coordinator port"));
  o.coordinator_port = 7000;
  o.peer_timeout = 100ms;
  o.heartbeat_interval = 200ms;
  EXPECT_TRUE(contains(validate(o).message(), "must exceed heartbeat_interval"));
  o.peer_timeout = 1000ms;
  EXPECT_TRUE(validate(o).ok());
}

// The check of ClusterBeacons, wired into a running cluster: beacons that reach a node's worker
// without proving the secret change nothing there. Node 2 holds the secret (it must, to pass the
// bootstrap and learn the workers' addresses) but runs no cluster: it joins the barrier by hand,
// then sends node 0 goodbyes claiming to be node 1 that anyone reaching the worker could send
// (under another secret, from another incarnation of the cluster, with no mac), then its own
// genuine goodbye. Node 0 must take the last (which shows the others were delivered, on the same
// endpoint, before it) and keep node 1 up.
TEST(Cluster, ForgedGoodbyesThatReachAWorkerChangeNothing) {
  const uint16_t port = testing::free_port();
  const std::string secret(32, 'k');
  testing::ProcessGroup group(3, [&](int node, const ChildChannel& channel) -> std::string {
    ClusterOptions o = node_options(port, node, 3);
    o.secret = secret;
    if (node == 2) {
      BootstrapOptions b;
      b.coordinator_port = port;
      b.rank = 2;
      b.size = 3;
      b.local_size = 1;
      b.timeout = o.bootstrap_timeout;
      b.collective_timeout = o.peer_timeout;
      b.member = "node";
      b.secret = secret;
      auto rank = ucx::UcxRank::create(b);
      if (!rank.ok()) return "bootstrap: " + rank.status().to_string();
      std::vector<ucx::Transfer> sends, recvs;
      char token = 0, sink[2] = {};
      for (int p = 0; p < 2; ++p) {
        sends.push_back({p, ucx::kClusterJoinTag | 2, &token, 1});
        recvs.push_back({p, ucx::kClusterJoinTag | static_cast<uint64_t>(p), &sink[p], 1});
      }
      ucx::Notice notice;
      Status joined = (*rank)->exchange(sends, recvs, ucx::Clock::now() + 20s, notice, {});
      if (!joined.ok()) return "barrier: " + joined.to_string();
      (*rank)->end_bootstrap();
      const ucx::BeaconKeys keys{secret, (*rank)->table_digest()};
      Digest other_table = keys.table;
      other_table[0] ^= 1;
      const uint64_t big = uint64_t{1} << 40;  // above any counter node 1 reaches meanwhile
      for (const std::string& forged :
           {ucx::encode_beacon({std::string(32, 'x'), keys.table}, 1, ucx::BeaconKind::kBye, big),
            ucx::encode_beacon({secret, other_table}, 1, ucx::BeaconKind::kBye, big),
            ucx::encode_beacon({"", keys.table}, 1, ucx::BeaconKind::kBye, big)}) {
        Status sent = (*rank)->send_beacon(0, ucx::kBeaconTag | 1, forged.data(), forged.size());
        if (!sent.ok()) return "sending a forged goodbye: " + sent.to_string();
      }
      const std::string bye = ucx::encode_beacon(keys, 2, ucx::BeaconKind::kBye, 1);
      Status sent = (*rank)->send_beacon(0, ucx::kBeaconTag | 2, bye.data(), bye.size());
      if (!sent.ok()) return "sending its goodbye: " + sent.to_string();
      channel.notify();
      channel.await_release();
      return "";
    }
    auto cluster = join_cluster(o);
    if (!cluster.ok()) return "join: " + cluster.status().to_string();
    std::string error;
    if (node == 0) {
      const Cluster& c = **cluster;
      error += await_status(c, [](const std::vector<NodeStatus>& s) {
        return !s[2].up && s[2].error.find("left the cluster") != std::string::npos;
      }, "node 2's goodbye");
      // Some heartbeat rounds more, in case a forged one were read after the genuine one.
      for (int i = 0; i < 10 && error.empty(); ++i) {
        const std::vector<NodeStatus> s = c.status();
        if (!s[1].up) error += "a forged goodbye took node 1 down: " + s[1].error;
        std::this_thread::sleep_for(o.heartbeat_interval);
      }
    }
    channel.notify();
    channel.await_release();
    return error;
  });
  for (int n = 0; n < 3; ++n) ASSERT_TRUE(group.wait_notified(n, 60s)) << "node " << n;
  for (int n = 0; n < 3; ++n) group.release(n);
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

TEST(Cluster, ASingleNodeJoinsAtOnce) {
  // In a child: this process must hold no UCX state when later tests fork.
  testing::ProcessGroup group(1, [](int, const ChildChannel&) -> std::string {
    auto cluster = join_cluster(ClusterOptions{});
    if (!cluster.ok()) return "join: " + cluster.status().to_string();
    const std::vector<NodeStatus> s = (*cluster)->status();
    if (s.size() != 1 || !s[0].self || !s[0].up) return "a single node should see itself up";
    return "";
  });
  EXPECT_EQ(testing::describe_failures(group.wait_all()), "");
}

}  // namespace
}  // namespace tutel::comm
