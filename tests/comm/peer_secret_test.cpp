// The peer secret on the bootstrap (bootstrap_wire.hpp): ranks that prove it meet, at a group's
// own coordinator and at the rendezvous service; a rank without it, or with another, is refused
// there and the group still meets with its real rank; a coordinator that cannot prove it (none,
// another, or a forged table) is not believed. Ranks are threads of this process (no UCX).
#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "bootstrap_wire.hpp"
#include "comm_test_util.hpp"
#include "tutel/comm/rendezvous.hpp"
#include "tutel/core/secret.hpp"

namespace tutel::comm {
namespace {

using namespace std::chrono_literals;
using testing::free_port;
using testing::loopback_options;

const std::string kSecret = "the-deployment-peer-secret-0123456789";
const std::string kOtherSecret = "another-deployment-secret-9876543210";

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

BootstrapOptions rank_options(uint16_t port, int rank, int size, const std::string& secret,
                              std::chrono::milliseconds timeout = 10s) {
  BootstrapOptions o = loopback_options(port, rank, size, 1);
  o.timeout = timeout;
  o.secret = secret;
  return o;
}

Result<BootstrapTable> exchange(const BootstrapOptions& o) {
  return coordinator_exchange(o, "test", "payload-" + std::to_string(o.rank));
}

void expect_refused(const Result<BootstrapTable>& r, std::string_view why) {
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kPermissionDenied) << r.status();
  EXPECT_TRUE(contains(r.status().message(), why)) << r.status();
  EXPECT_TRUE(contains(r.status().message(), "peer_secret_file")) << r.status();
}

TEST(PeerSecret, RanksThatProveItMeetAtTheirCoordinator) {
  const uint16_t port = free_port();
  const int n = 4;
  std::vector<std::optional<Result<BootstrapTable>>> out(n);
  std::vector<std::thread> threads;
  for (int r = n - 1; r >= 0; --r)
    threads.emplace_back([&, r] { out[r].emplace(exchange(rank_options(port, r, n, kSecret))); });
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(out[r]->ok()) << out[r]->status();
    for (int q = 0; q < n; ++q) EXPECT_EQ(out[r]->value().payloads[q], "payload-" + std::to_string(q));
  }
}

TEST(PeerSecret, ARankWithoutTheSecretOrWithAnotherIsRefusedAndTheGroupStillMeets) {
  const uint16_t port = free_port();
  std::optional<Result<BootstrapTable>> coordinator;
  std::thread rank0([&] { coordinator.emplace(exchange(rank_options(port, 0, 2, kSecret, 15s))); });
  expect_refused(exchange(rank_options(port, 1, 2, kOtherSecret)), "is not the coordinator's");
  expect_refused(exchange(rank_options(port, 1, 2, "")), "requires the peer secret");
  const Result<BootstrapTable> real = exchange(rank_options(port, 1, 2, kSecret));
  rank0.join();
  ASSERT_TRUE(real.ok()) << real.status();
  ASSERT_TRUE(coordinator->ok()) << coordinator->status();
  EXPECT_EQ(coordinator->value().payloads[1], "payload-1");
  EXPECT_EQ(real.value().payloads[0], "payload-0");
}

TEST(PeerSecret, ACoordinatorWithoutASecretRefusesAnAuthenticatedHello) {
  const uint16_t port = free_port();
  std::optional<Result<BootstrapTable>> coordinator;
  std::thread rank0([&] { coordinator.emplace(exchange(rank_options(port, 0, 2, "", 1500ms))); });
  expect_refused(exchange(rank_options(port, 1, 2, kSecret)), "has no peer secret");
  rank0.join();
  EXPECT_EQ(coordinator->status().code(), StatusCode::kTimeout) << coordinator->status();
  // Rank 0 says why rank 1 is missing, not only that it is.
  EXPECT_TRUE(contains(coordinator->status().message(), "1 hello(s) were refused for the peer secret"))
      << coordinator->status();
}

// A process that holds the coordinator's port and answers with a table of its own.
class ForgedCoordinator {
 public:
  // `answer(nonce_of_the_hello)` gives the bytes sent back.
  explicit ForgedCoordinator(std::function<std::string(const std::string&)> answer) : port_(free_port()) {
    listener_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    const int one = 1;
    ::setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(port_);
    EXPECT_EQ(::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    EXPECT_EQ(::listen(listener_, 4), 0);
    thread_ = std::thread([this, answer] {
      pollfd p{listener_, POLLIN, 0};
      if (::poll(&p, 1, 10000) <= 0) return;
      const int fd = ::accept(listener_, nullptr, nullptr);
      if (fd < 0) return;
      std::string in;
      char buf[4096];
      // The whole hello: header, round, body (the nonce and the mac at its end).
      while (in.size() < wire::kHeaderBytes ||
             in.size() < wire::kHeaderBytes + wire::decode_header(in.data()).round_len +
                             wire::decode_header(in.data()).body_len) {
        const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
        if (n <= 0) break;
        in.append(buf, static_cast<size_t>(n));
      }
      const std::string nonce =
          in.size() >= wire::kAuthBytes ? in.substr(in.size() - wire::kAuthBytes, wire::kNonceBytes) : "";
      const std::string out = answer(nonce);
      (void)!::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
      ::shutdown(fd, SHUT_WR);
      while (::recv(fd, buf, sizeof buf, 0) > 0) {
      }
      ::close(fd);
    });
  }
  ~ForgedCoordinator() {
    thread_.join();
    ::close(listener_);
  }
  uint16_t port() const { return port_; }

 private:
  uint16_t port_;
  int listener_ = -1;
  std::thread thread_;
};

TEST(PeerSecret, ARankDoesNotBelieveATableThatDoesNotProveTheSecret) {
  const std::vector<std::string> payloads = {"forged-address", "payload-1"};
  const std::vector<std::string> addresses = {"127.0.0.1, pid 1", "127.0.0.1, pid 2"};
  {  // No proof at all: a coordinator without the secret (or an impostor) answering plainly.
    ForgedCoordinator forged([&](const std::string&) { return wire::encode_table(payloads, addresses, false); });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "has no peer secret");
  }
  {  // A proof made with another secret, for this very hello.
    ForgedCoordinator forged([&](const std::string& nonce) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kOtherSecret, nonce, sha256(table));
    });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "does not prove the peer secret");
  }
  {  // The right secret, but for another hello (a recorded answer replayed): another nonce.
    ForgedCoordinator forged([&](const std::string&) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kSecret, std::string(wire::kNonceBytes, 'n'), sha256(table));
    });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "does not prove the peer secret");
  }
  {  // And the proof the real coordinator gives is accepted (the forgeries differ only there).
    ForgedCoordinator genuine([&](const std::string& nonce) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kSecret, nonce, sha256(table));
    });
    const Result<BootstrapTable> r = exchange(rank_options(genuine.port(), 1, 2, kSecret));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r.value().payloads[0], "forged-address");
  }
}

TEST(PeerSecret, AnyChangeToAnAuthenticatedHelloFailsItsCheck) {
  wire::Header h;
  h.kind = wire::kHello;
  h.rank = 3;
  h.size = 8;
  h.pid = 4242;
  const std::string nonce(wire::kNonceBytes, 'q');
  const std::string message = wire::encode_authenticated(h, "ucx@t/g", "the-payload", kSecret, nonce);
  std::string got;
  ASSERT_TRUE(wire::verify_authenticated(message, kSecret, &got));
  EXPECT_EQ(got, nonce);
  EXPECT_FALSE(wire::verify_authenticated(message, kOtherSecret, &got));
  std::mt19937 rng(std::random_device{}());
  for (size_t at = 0; at < message.size(); ++at) {
    std::string changed = message;
    changed[at] = static_cast<char>(changed[at] ^ (1 + rng() % 255));
    EXPECT_FALSE(wire::verify_authenticated(changed, kSecret, &got)) << "byte " << at;
  }
  EXPECT_FALSE(wire::verify_authenticated(message.substr(0, 40), kSecret, &got));
}

TEST(PeerSecret, SecretsOutsideTheirBoundsAreRefused) {
  BootstrapOptions o = rank_options(free_port(), 0, 2, "too-short");
  EXPECT_EQ(validate(o).code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(validate(o).message(), "a peer secret is 16 to 4096 bytes")) << validate(o);
  RendezvousOptions r;
  r.secret = std::string(4097, 's');
  EXPECT_EQ(RendezvousService::start(r).status().code(), StatusCode::kInvalidArgument);
}

BootstrapOptions member(const RendezvousService& s, const std::string& group, int rank, const std::string& secret) {
  BootstrapOptions o = rank_options(s.port(), rank, 2, secret, 3s);
  o.coordinator_host = s.host();
  o.rendezvous_group = group;
  o.rendezvous_owner = "the test";
  return o;
}

TEST(PeerSecret, TheRendezvousServiceServesOnlyJoinsThatProveItsSecret) {
  RendezvousOptions ro;
  ro.secret = kSecret;
  auto service = RendezvousService::start(ro);
  ASSERT_TRUE(service.ok()) << service.status();
  const RendezvousService& s = **service;

  std::optional<Result<BootstrapTable>> first;
  std::thread rank0([&] { first.emplace(exchange(member(s, "t/g", 0, kSecret))); });
  expect_refused(exchange(member(s, "t/g", 1, "")), "requires the peer secret");
  expect_refused(exchange(member(s, "t/g", 1, kOtherSecret)), "does not prove this service's peer secret");
  const Result<BootstrapTable> second = exchange(member(s, "t/g", 1, kSecret));
  rank0.join();
  ASSERT_TRUE(second.ok()) << second.status();
  ASSERT_TRUE(first->ok()) << first->status();
  EXPECT_EQ(first->value().payloads[1], "payload-1");
  EXPECT_EQ(second.value().payloads[0], "payload-0");
  EXPECT_EQ(s.stats().groups_completed, 1u);
  EXPECT_GE(s.stats().refused, 2u);

  // A service without a secret refuses an authenticated join rather than misreading it.
  auto plain = RendezvousService::start(RendezvousOptions{});
  ASSERT_TRUE(plain.ok()) << plain.status();
  expect_refused(exchange(member(**plain, "t/g", 0, kSecret)), "has no peer secret");
}

}  // namespace
}  // namespace tutel::comm
