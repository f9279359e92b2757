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

#include <functional>
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
using testing::RawClient;

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
  EXPECT_TRUE(contains(coordinator->status().message(), "1 connection(s) were refused for the peer secret"))
      << coordinator->status();
}

// A process that holds the coordinator's port, answers the rank's challenge with a nonce of its
// own as a coordinator does, and then answers the hello with a table of its own.
class ForgedCoordinator {
 public:
  // `answer(rank_nonce, server_nonce)` gives the bytes sent back after the hello.
  using Answer = std::function<std::string(const std::string&, const std::string&)>;
  explicit ForgedCoordinator(Answer answer) : port_(free_port()) {
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
      char buf[4096];
      // One whole message: header, round, body.
      auto read_message = [&] {
        std::string in;
        while (in.size() < wire::kHeaderBytes ||
               in.size() < wire::kHeaderBytes + wire::decode_header(in.data()).round_len +
                               wire::decode_header(in.data()).body_len) {
          const ssize_t n = ::recv(fd, buf, 1, 0);  // byte by byte: never past the message
          if (n <= 0) break;
          in.append(buf, static_cast<size_t>(n));
        }
        return in;
      };
      const std::string challenge = read_message();
      const std::string rank_nonce = challenge.size() > wire::kHeaderBytes ? challenge.substr(wire::kHeaderBytes) : "";
      const std::string server_nonce(wire::kNonceBytes, 's');
      const std::string reply = wire::encode_challenge(server_nonce);
      (void)!::send(fd, reply.data(), reply.size(), MSG_NOSIGNAL);
      (void)read_message();  // the hello
      const std::string out = answer(rank_nonce, server_nonce);
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
    ForgedCoordinator forged(
        [&](const std::string&, const std::string&) { return wire::encode_table(payloads, addresses, false); });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "has no peer secret");
  }
  {  // A proof made with another secret, for this very hello.
    ForgedCoordinator forged([&](const std::string& rank_nonce, const std::string& server_nonce) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kOtherSecret, rank_nonce, server_nonce, sha256(table));
    });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "does not prove the peer secret");
  }
  {  // The right secret, but for another connection (a recorded answer replayed): other nonces.
    ForgedCoordinator forged([&](const std::string&, const std::string& server_nonce) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kSecret, std::string(wire::kNonceBytes, 'n'), server_nonce, sha256(table));
    });
    expect_refused(exchange(rank_options(forged.port(), 1, 2, kSecret)), "does not prove the peer secret");
  }
  {  // And the proof the real coordinator gives is accepted (the forgeries differ only there).
    ForgedCoordinator genuine([&](const std::string& rank_nonce, const std::string& server_nonce) {
      const std::string table = wire::encode_table(payloads, addresses, true);
      return table + wire::table_mac(kSecret, rank_nonce, server_nonce, sha256(table));
    });
    const Result<BootstrapTable> r = exchange(rank_options(genuine.port(), 1, 2, kSecret));
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r.value().payloads[0], "forged-address");
  }
}

TEST(PeerSecret, AnyChangeToAnAuthenticatedHelloOrAReplayFailsItsCheck) {
  wire::Header h;
  h.kind = wire::kHello;
  h.rank = 3;
  h.size = 8;
  h.pid = 4242;
  const std::string rank_nonce(wire::kNonceBytes, 'q'), server_nonce(wire::kNonceBytes, 's');
  const std::string message =
      wire::encode_authenticated(h, "ucx@t/g", "the-payload", kSecret, rank_nonce, server_nonce);
  EXPECT_TRUE(wire::verify_authenticated(message, kSecret, rank_nonce, server_nonce));
  EXPECT_FALSE(wire::verify_authenticated(message, kOtherSecret, rank_nonce, server_nonce));
  // The same hello on another connection (a replay): the server's nonce differs there.
  EXPECT_FALSE(wire::verify_authenticated(message, kSecret, rank_nonce, std::string(wire::kNonceBytes, 't')));
  EXPECT_FALSE(wire::verify_authenticated(message, kSecret, std::string(wire::kNonceBytes, 'r'), server_nonce));
  std::mt19937 rng(std::random_device{}());
  for (size_t at = 0; at < message.size(); ++at) {
    std::string changed = message;
    changed[at] = static_cast<char>(changed[at] ^ (1 + rng() % 255));
    EXPECT_FALSE(wire::verify_authenticated(changed, kSecret, rank_nonce, server_nonce)) << "byte " << at;
  }
  EXPECT_FALSE(wire::verify_authenticated(message.substr(0, 40), kSecret, rank_nonce, server_nonce));
}

// A hello recorded on one connection, replayed on another: the coordinator's challenge differs
// there, so the replay is refused, and the real rank still joins.
TEST(PeerSecret, AHelloReplayedOnAnotherConnectionIsRefused) {
  const uint16_t port = free_port();
  std::optional<Result<BootstrapTable>> coordinator;
  std::thread rank0([&] { coordinator.emplace(exchange(rank_options(port, 0, 2, kSecret, 15s))); });
  wire::Header h;
  h.kind = wire::kHello;
  h.rank = 1;
  h.size = 2;
  h.local_size = 1;
  h.pid = 4242;
  const std::string rank_nonce(wire::kNonceBytes, 'r');
  std::string recorded;
  {  // What a genuine rank sent on its connection (which then broke before the table).
    RawClient first(port, 2s);
    first.send(wire::encode_challenge(rank_nonce));
    const std::string challenge = first.read(wire::kHeaderBytes + wire::kNonceBytes);
    ASSERT_EQ(challenge.size(), wire::kHeaderBytes + wire::kNonceBytes);
    recorded = wire::encode_authenticated(h, "test", "payload-1", kSecret, rank_nonce,
                                          challenge.substr(wire::kHeaderBytes));
  }
  RawClient replay(port, 2s);
  replay.send(wire::encode_challenge(rank_nonce));
  ASSERT_EQ(replay.read(wire::kHeaderBytes + wire::kNonceBytes).size(), wire::kHeaderBytes + wire::kNonceBytes);
  replay.send(recorded);
  const std::string answer = replay.read_all();
  ASSERT_GE(answer.size(), wire::kHeaderBytes);
  EXPECT_EQ(wire::decode_header(answer.data()).kind, wire::kError);
  EXPECT_TRUE(contains(answer, "peer secret is not the coordinator's")) << answer.substr(wire::kHeaderBytes);
  // A plain hello announcing a megabyte is refused at its header: the coordinator reads no body
  // it would refuse anyway.
  RawClient plain(port, 2s);
  std::string header;
  for (uint32_t v : {wire::kMagic, wire::kHello, 1u, 2u, 1u, 4242u, 4u, 1u << 20}) wire::put_u32(header, v);
  plain.send(header);  // and nothing more
  const std::string refused = plain.read_all();
  EXPECT_TRUE(contains(refused, "requires the peer secret")) << refused;
  const Result<BootstrapTable> real = exchange(rank_options(port, 1, 2, kSecret));
  rank0.join();
  ASSERT_TRUE(real.ok()) << real.status();
  ASSERT_TRUE(coordinator->ok()) << coordinator->status();
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

  // Malformed handshakes are refused, touching no group: a challenge of the wrong size, a second
  // challenge, an authenticated join that skipped its challenge.
  wire::Header bad;
  bad.kind = wire::kChallenge | wire::kAuthenticated;
  {
    RawClient c(s.port());
    c.send(wire::encode(bad, {}, "short"));
    EXPECT_TRUE(contains(c.read_all(), "malformed challenge"));
  }
  {
    RawClient c(s.port());
    c.send(wire::encode_challenge(std::string(wire::kNonceBytes, 'a')));
    EXPECT_EQ(c.read(wire::kHeaderBytes + wire::kNonceBytes).size(), wire::kHeaderBytes + wire::kNonceBytes);
    c.send(wire::encode_challenge(std::string(wire::kNonceBytes, 'b')));
    EXPECT_TRUE(contains(c.read_all(), "malformed challenge"));
  }
  {
    RawClient c(s.port());
    wire::Header join;
    join.kind = wire::kJoin;
    join.rank = 0;
    join.size = 2;
    join.local_size = 1;
    std::string body;
    wire::put_u32(body, 1000);
    c.send(wire::encode_authenticated(join, "test@t/h", body, kSecret, std::string(wire::kNonceBytes, 'a'),
                                      std::string(wire::kNonceBytes, 'b')));
    EXPECT_TRUE(contains(c.read_all(), "without its challenge first"));
  }
  EXPECT_EQ(s.stats().groups_completed, 1u);
  EXPECT_EQ(s.stats().pending_groups, 0u);

  // A service without a secret refuses an authenticated join rather than misreading it.
  auto plain = RendezvousService::start(RendezvousOptions{});
  ASSERT_TRUE(plain.ok()) << plain.status();
  expect_refused(exchange(member(**plain, "t/g", 0, kSecret)), "has no peer secret");
}

}  // namespace
}  // namespace tutel::comm
