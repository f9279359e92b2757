// Secrets, end to end with the real tuteld (docs/config.md): a tenant's secret_file makes its
// clients present the secret in their hello (C++, the C ABI, TUTEL_SECRET_FILE), and a
// [server] peer_secret_file makes the daemons of a deployment prove theirs at every bootstrap
// (the cluster join, the rendezvous service, a group's own coordinator). Files that would leak
// the secret, or hold none, stop the daemon at start-up.
#include <gtest/gtest.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "daemon_fixture.hpp"
#include "tutel/admin_client.hpp"
#include "tutel/client.h"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// Secret files in a private directory of the test's own, removed at the end.
class SecretFiles {
 public:
  SecretFiles() {
    char tmpl[] = "/tmp/tutel-secrets-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
  }
  ~SecretFiles() {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  std::string write(const std::string& name, const std::string& content, mode_t mode = 0600) const {
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << content;
    EXPECT_EQ(::chmod(path.c_str(), mode), 0);
    return path;
  }

 private:
  std::string dir_;
};

constexpr const char* kSpec =
    "name = \"guarded\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 5\n";

DaemonOptions with_tenant_secret(const std::string& path) {
  DaemonOptions o;
  o.default_tenant_extra = "secret_file = \"" + path + "\"";
  return o;
}

TEST(TenantSecret, ClientsMustPresentTheTenantsSecret) {
  SecretFiles files;
  const std::string secret = files.write("tenant", "tenant-secret-0123456789abcdef\n");
  const std::string wrong = files.write("wrong", "not-the-tenant-secret-0123456789\n");
  DaemonProcess d(with_tenant_secret(secret));
  ASSERT_TRUE(d.start());
  ::unsetenv("TUTEL_SECRET_FILE");

  auto none = client::Client::connect(d.client_socket());
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.status().code(), StatusCode::kPermissionDenied) << none.status();
  EXPECT_TRUE(contains(none.status().message(), "tenant 'default' requires its secret")) << none.status();
  EXPECT_TRUE(contains(none.status().message(), "gave none")) << none.status();

  client::ClientOptions options;
  options.secret_file = wrong;
  auto other = client::Client::connect(d.client_socket(), options);
  ASSERT_FALSE(other.ok());
  EXPECT_EQ(other.status().code(), StatusCode::kPermissionDenied) << other.status();
  EXPECT_TRUE(contains(other.status().message(), "gave another one")) << other.status();

  // The right secret: the session serves as any other.
  options.secret_file = secret;
  auto client = client::Client::connect(d.client_socket(), options);
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status();
  std::vector<float> x(8 * 16, 0.25f), y(8 * 16);
  ASSERT_TRUE(layer->infer(x.data(), 8, y.data()).ok());

  // From the environment, as the C ABI and the Python module take it.
  ::setenv("TUTEL_SECRET_FILE", secret.c_str(), 1);
  auto from_env = client::Client::connect(d.client_socket());
  EXPECT_TRUE(from_env.ok()) << from_env.status();
  tutel_client* c = tutel_connect(d.client_socket().c_str());
  EXPECT_NE(c, nullptr) << tutel_last_error();
  tutel_close(c);
  ::unsetenv("TUTEL_SECRET_FILE");
  c = tutel_connect(d.client_socket().c_str());
  EXPECT_EQ(c, nullptr);
  EXPECT_EQ(tutel_last_error_code(), TUTEL_E_PERMISSION_DENIED) << tutel_last_error();
  c = tutel_connect_with_secret(d.client_socket().c_str(), secret.c_str());
  EXPECT_NE(c, nullptr) << tutel_last_error();
  tutel_close(c);

  // Any bytes: a secret from /dev/urandom, not UTF-8, with a NUL in it.
  {
    const std::string binary("\xff\xfe\x00\x80random-bytes\xc3\x28\x01!", 20);
    SecretFiles binary_files;
    const std::string path = binary_files.write("binary", binary);
    DaemonProcess raw(with_tenant_secret(path));
    ASSERT_TRUE(raw.start());
    client::ClientOptions raw_options;
    raw_options.secret_file = path;
    auto admitted = client::Client::connect(raw.client_socket(), raw_options);
    EXPECT_TRUE(admitted.ok()) << admitted.status();
    raw_options.secret_file = secret;
    EXPECT_EQ(client::Client::connect(raw.client_socket(), raw_options).status().code(),
              StatusCode::kPermissionDenied);
    EXPECT_EQ(raw.stop(), 0) << raw.log();
  }

  // A secret file others could read is refused by the client before anything is sent.
  options.secret_file = files.write("leaky", "tenant-secret-0123456789abcdef\n", 0644);
  auto leaky = client::Client::connect(d.client_socket(), options);
  ASSERT_FALSE(leaky.ok());
  EXPECT_TRUE(contains(leaky.status().message(), "chmod o-rwx,g-w")) << leaky.status();

  // The refused sessions are gone; the daemon served on.
  EXPECT_TRUE(d.alive()) << d.log();
  EXPECT_TRUE(contains(d.log(), "no secret for tenant default")) << d.log();
  EXPECT_TRUE(contains(d.log(), "wrong secret for tenant default")) << d.log();
  EXPECT_FALSE(contains(d.log(), "tenant-secret-0123456789abcdef")) << "the secret must never be logged";
  // The operator sees the refusals: two hellos here (none, another) and the C call without one.
  auto admin = client::AdminClient::connect(d.admin_socket());
  ASSERT_TRUE(admin.ok()) << admin.status();
  auto metrics = admin->metrics();
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_TRUE(contains(*metrics, "tuteld_sessions_refused_total{tenant=\\\"default\\\",reason=\\\"secret\\\"} 3"))
      << *metrics;
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// A unix connection that never sends its hello: what a process under the tenant's uid but
// without its secret can open.
struct SilentConnection {
  int fd = -1;
  explicit SilentConnection(const std::string& path) {
    fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path.c_str());
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0) << std::strerror(errno);
  }
  ~SilentConnection() { ::close(fd); }
  // Whether the daemon closed it (bounded wait), after whatever it said.
  bool closed_by_daemon(std::chrono::milliseconds wait) const {
    const auto deadline = std::chrono::steady_clock::now() + wait;
    char buf[4096];
    while (std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd, POLLIN, 0};
      if (::poll(&p, 1, 50) <= 0) continue;
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n == 0) return true;
      if (n < 0) return errno != EAGAIN && errno != EINTR;
    }
    return false;
  }
};

// Sessions count against max_sessions from their hello on: connections that never send one
// (without the secret, a process under the tenant's uid can open nothing else) do not keep the
// tenant's clients out. A tenant keeps at most max_sessions of them, the oldest closed to make
// room for a newcomer, so they cannot take the daemon's descriptors either.
TEST(TenantSecret, ConnectionsThatNeverSayHelloHoldNoSessionPlace) {
  SecretFiles files;
  const std::string secret = files.write("tenant", "tenant-secret-0123456789abcdef\n");
  DaemonOptions o = with_tenant_secret(secret);
  o.default_max_sessions = 2;
  o.extra_server = "hello_timeout_ms = 60000";  // none closed for silence in this test
  DaemonProcess d(o);
  ASSERT_TRUE(d.start());
  std::vector<std::unique_ptr<SilentConnection>> silent;
  for (int i = 0; i < 4; ++i) silent.push_back(std::make_unique<SilentConnection>(d.client_socket()));
  // The two oldest made room for the two newest.
  EXPECT_TRUE(silent[0]->closed_by_daemon(std::chrono::seconds(10)));
  EXPECT_TRUE(silent[1]->closed_by_daemon(std::chrono::seconds(10)));
  client::ClientOptions options;
  options.secret_file = secret;
  auto first = client::Client::connect(d.client_socket(), options);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = client::Client::connect(d.client_socket(), options);
  ASSERT_TRUE(second.ok()) << second.status();
  // The first client made room for itself (silent[2] and silent[3] were the two without a
  // hello); then one place without a hello was free again for the second.
  EXPECT_TRUE(silent[2]->closed_by_daemon(std::chrono::seconds(10)));
  EXPECT_FALSE(silent[3]->closed_by_daemon(std::chrono::milliseconds(300)));
  auto third = client::Client::connect(d.client_socket(), options);
  EXPECT_EQ(third.status().code(), StatusCode::kResourceExhausted) << third.status();
  EXPECT_TRUE(contains(third.status().message(), "already has 2 client sessions")) << third.status();
  EXPECT_TRUE(first->ping().ok());
  auto admin = client::AdminClient::connect(d.admin_socket());
  ASSERT_TRUE(admin.ok()) << admin.status();
  auto metrics = admin->metrics();
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_TRUE(contains(*metrics, "reason=\\\"no_hello_evicted\\\"} 3")) << *metrics;
  EXPECT_TRUE(contains(*metrics, "reason=\\\"max_sessions\\\"} 1")) << *metrics;
  EXPECT_EQ(d.stop(), 0) << d.log();
}

TEST(TenantSecret, AConnectionWithoutAHelloIsClosedAfterHelloTimeout) {
  DaemonOptions o;
  o.extra_server = "hello_timeout_ms = 300";
  DaemonProcess d(o);
  ASSERT_TRUE(d.start());
  SilentConnection silent(d.client_socket());
  EXPECT_TRUE(silent.closed_by_daemon(std::chrono::seconds(10)));
  EXPECT_TRUE(contains(d.log(), "no hello within 300 ms; closing it")) << d.log();
  auto admin = client::AdminClient::connect(d.admin_socket());
  ASSERT_TRUE(admin.ok()) << admin.status();
  auto metrics = admin->metrics();
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  EXPECT_TRUE(contains(*metrics, "reason=\\\"hello_timeout\\\"} 1")) << *metrics;
  // A client that says hello at once is served as ever.
  auto client = client::Client::connect(d.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  EXPECT_TRUE(client->ping().ok());
  EXPECT_EQ(d.stop(), 0) << d.log();
}

TEST(TenantSecret, ADaemonWhoseSecretFileIsUnsafeMissingOrEmptyDoesNotStart) {
  SecretFiles files;
  const struct {
    std::string path;
    const char* expected;
  } cases[] = {
      {files.write("readable", "tenant-secret-0123456789abcdef\n", 0644), "chmod o-rwx,g-w"},
      {files.write("short", "short\n"), "a secret is 16 to 4096 bytes"},
      {files.write("empty", ""), "a secret is 16 to 4096 bytes"},
      {"/nonexistent/tutel/secret", "cannot open tenant 'default' secret_file '/nonexistent/tutel/secret'"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.path);
    DaemonProcess d(with_tenant_secret(c.path));
    ASSERT_TRUE(d.spawn());
    EXPECT_EQ(d.wait_exit(std::chrono::seconds(10)), 1) << d.log();
    EXPECT_TRUE(contains(d.log(), c.expected)) << d.log();
    EXPECT_FALSE(contains(d.log(), "serving on")) << d.log();
  }
}

// --- the peer secret ---------------------------------------------------------------------

std::string cluster_table(uint16_t port, int node, int bootstrap_ms) {
  return "coordinator = \"127.0.0.1:" + std::to_string(port) + "\"\nnodes = 2\nnode_rank = " +
         std::to_string(node) + "\nbootstrap_timeout_ms = " + std::to_string(bootstrap_ms) +
         "\nheartbeat_interval_ms = 50\npeer_timeout_ms = 1000\n";
}

DaemonOptions with_peer_secret(const std::string& path, const std::string& cluster = "") {
  DaemonOptions o;
  if (!path.empty()) o.extra_server = "peer_secret_file = \"" + path + "\"";
  o.cluster = cluster;
  return o;
}

std::string group_spec(const std::string& name, const std::string& group, uint16_t coordinator, int rank,
                       int bootstrap_ms) {
  std::string spec = "name = \"" + name +
                     "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 9\n[group]\n";
  if (coordinator != 0) spec += "coordinator = \"127.0.0.1:" + std::to_string(coordinator) + "\"\n";
  if (!group.empty()) spec += "name = \"" + group + "\"\n";
  return spec + "size = 2\nrank = " + std::to_string(rank) + "\nbootstrap_timeout_ms = " +
         std::to_string(bootstrap_ms) + "\ncollective_timeout_ms = 20000\n";
}

// Rank r creates its layer on daemons[r] and runs one inference forward; its y, or the error.
std::vector<Result<std::vector<float>>> run_group(const std::vector<DaemonProcess*>& daemons,
                                                  const std::function<std::string(int)>& spec) {
  std::vector<Result<std::vector<float>>> out(2, Status::Internal("not run"));
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      auto client = client::Client::connect(daemons[r]->client_socket());
      if (!client.ok()) return void(out[r] = client.status());
      auto layer = client->create_layer(spec(r));
      if (!layer.ok()) return void(out[r] = layer.status());
      std::vector<float> x(8 * 16), y(8 * 16);
      std::mt19937 rng(r + 1);
      std::normal_distribution<float> n;
      for (float& v : x) v = n(rng);
      const Status st = layer->infer(x.data(), 8, y.data());
      out[r] = st.ok() ? Result<std::vector<float>>(std::move(y)) : Result<std::vector<float>>(st);
    });
  for (auto& t : threads) t.join();
  return out;
}

TEST(PeerSecret, DaemonsSharingTheSecretFormAClusterAndItsGroups) {
  SecretFiles files;
  const std::string secret = files.write("peers", "deployment-peer-secret-0123456789\n");
  const uint16_t port = free_port();
  DaemonProcess node0(with_peer_secret(secret, cluster_table(port, 0, 30000)));
  DaemonProcess node1(with_peer_secret(secret, cluster_table(port, 1, 30000)));
  ASSERT_TRUE(node0.spawn());
  ASSERT_TRUE(node1.spawn());
  ASSERT_TRUE(node0.wait_serving(std::chrono::seconds(30))) << node0.log();
  ASSERT_TRUE(node1.wait_serving(std::chrono::seconds(30))) << node1.log();
  // By name, through node 0's rendezvous service; and through a group's own coordinator.
  const auto by_name = run_group({&node0, &node1}, [](int r) { return group_spec("named", "g", 0, r, 20000); });
  const uint16_t coordinator = free_port();
  const auto by_coordinator =
      run_group({&node0, &node1}, [&](int r) { return group_spec("coord", "", coordinator, r, 20000); });
  for (int r = 0; r < 2; ++r) {
    ASSERT_TRUE(by_name[r].ok()) << by_name[r].status() << node0.log() << node1.log();
    ASSERT_TRUE(by_coordinator[r].ok()) << by_coordinator[r].status();
    EXPECT_EQ(by_name[r].value(), by_coordinator[r].value());  // same weights, same tokens
  }
  // The nodes' heartbeats prove the secret too (comm/ucx/beacon.hpp): node 0's goodbye reaches
  // node 1 as such, and neither node ignored a beacon.
  EXPECT_EQ(node0.stop(), 0) << node0.log();
  bool left = false;
  for (int i = 0; i < 300 && !left; ++i) {
    left = node1.log().find("left the cluster (its daemon shut down)") != std::string::npos;
    if (!left) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(left) << node1.log();
  EXPECT_EQ(node1.stop(), 0) << node1.log();
  for (const DaemonProcess* node : {&node0, &node1})
    EXPECT_EQ(node->log().find("ignoring a heartbeat"), std::string::npos) << node->log();
}

TEST(PeerSecret, ANodeWithAnotherSecretCannotJoinTheCluster) {
  SecretFiles files;
  const uint16_t port = free_port();
  DaemonProcess node0(
      with_peer_secret(files.write("a", "deployment-peer-secret-0123456789\n"), cluster_table(port, 0, 2000)));
  DaemonProcess node1(
      with_peer_secret(files.write("b", "some-other-peer-secret-9876543210\n"), cluster_table(port, 1, 2000)));
  ASSERT_TRUE(node0.spawn());
  ASSERT_TRUE(node1.spawn());
  EXPECT_EQ(node1.wait_exit(std::chrono::seconds(30)), 1) << node1.log();
  EXPECT_TRUE(contains(node1.log(), "peer secret is not the coordinator's")) << node1.log();
  EXPECT_EQ(node0.wait_exit(std::chrono::seconds(30)), 1) << node0.log();
  EXPECT_TRUE(contains(node0.log(), "node 1 never reached the coordinator")) << node0.log();
  EXPECT_TRUE(contains(node0.log(), "connection(s) were refused for the peer secret")) << node0.log();
}

TEST(PeerSecret, AGroupRankOnADaemonWithoutTheSecretIsRefusedAtTheCoordinator) {
  SecretFiles files;
  DaemonProcess guarded(with_peer_secret(files.write("a", "deployment-peer-secret-0123456789\n")));
  DaemonProcess open(with_peer_secret(""));
  ASSERT_TRUE(guarded.start());
  ASSERT_TRUE(open.start());
  const uint16_t coordinator = free_port();
  const auto out =
      run_group({&guarded, &open}, [&](int r) { return group_spec("mixed", "", coordinator, r, 1500); });
  ASSERT_FALSE(out[1].ok());
  EXPECT_EQ(out[1].status().code(), StatusCode::kPermissionDenied) << out[1].status();
  EXPECT_TRUE(contains(out[1].status().message(), "requires the peer secret")) << out[1].status();
  ASSERT_FALSE(out[0].ok());
  EXPECT_TRUE(contains(out[0].status().message(), "rank 1 never reached the coordinator")) << out[0].status();
  EXPECT_TRUE(contains(out[0].status().message(), "1 connection(s) were refused for the peer secret")) << out[0].status();
  EXPECT_EQ(guarded.stop(), 0) << guarded.log();
  EXPECT_EQ(open.stop(), 0) << open.log();
}

}  // namespace
}  // namespace tutel::testing
