// The TCP coordinator alone (no UCX): ranks are threads of this process.
#include "tutel/comm/bootstrap.hpp"

#include <gtest/gtest.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bootstrap_wire.hpp"
#include "comm_test_util.hpp"

namespace tutel::comm {
namespace {

using namespace std::chrono_literals;
using testing::free_port;
using testing::loopback_options;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

// Runs coordinator_exchange for each listed rank on its own thread.
std::vector<std::optional<Result<BootstrapTable>>> exchange_on_threads(
    const std::vector<BootstrapOptions>& ranks, const std::vector<std::string>& payloads,
    std::string_view round = "test") {
  std::vector<std::optional<Result<BootstrapTable>>> out(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i)
    threads.emplace_back(
        [&, i] { out[i].emplace(coordinator_exchange(ranks[i], round, payloads[i])); });
  for (auto& t : threads) t.join();
  return out;
}

TEST(Bootstrap, EveryRankGetsEveryPayloadInRankOrder) {
  const uint16_t port = free_port();
  const int n = 5;
  std::vector<BootstrapOptions> ranks;
  std::vector<std::string> payloads;
  for (int r = n - 1; r >= 0; --r) {  // start the coordinator last: the others must retry
    ranks.push_back(loopback_options(port, r, n, 1));
    payloads.push_back(r == 2 ? std::string(300000, 'x') : "payload-" + std::to_string(r));
  }
  const auto results = exchange_on_threads(ranks, payloads);
  for (size_t i = 0; i < results.size(); ++i) {
    ASSERT_TRUE(results[i]->ok()) << results[i]->status();
    const BootstrapTable& t = results[i]->value();
    ASSERT_EQ(t.payloads.size(), size_t(n));
    for (int r = 0; r < n; ++r) {
      EXPECT_EQ(t.payloads[r], r == 2 ? std::string(300000, 'x') : "payload-" + std::to_string(r));
      EXPECT_EQ(t.addresses[r], "127.0.0.1, pid " + std::to_string(::getpid()));
    }
  }
}

TEST(Bootstrap, MissingRankTimesOutNamingIt) {
  const uint16_t port = free_port();
  std::vector<BootstrapOptions> ranks = {loopback_options(port, 0, 4, 1),
                                         loopback_options(port, 2, 4, 1)};
  for (auto& o : ranks) o.timeout = 800ms;
  const auto results = exchange_on_threads(ranks, {"a", "b"});
  for (const auto& r : results) {
    ASSERT_FALSE(r->ok());
    EXPECT_EQ(r->status().code(), StatusCode::kTimeout) << r->status();
    EXPECT_TRUE(contains(r->status().message(), "ranks 1, 3 never reached the coordinator"))
        << r->status();
  }
}

TEST(Bootstrap, NoCoordinatorIsATimeout) {
  auto o = loopback_options(free_port(), 1, 2, 1);
  o.timeout = 300ms;
  auto r = coordinator_exchange(o, "test", "x");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kTimeout);
  EXPECT_TRUE(contains(r.status().message(), "could not reach the coordinator")) << r.status();
}

// A bootstrap whose ranks may never come (a daemon shutting down while a group layer waits for
// its peers) ends when its cancel flag is raised, on the coordinator and on the ranks waiting
// for it or for its answer, long before its timeout.
TEST(Bootstrap, RaisingTheCancelFlagEndsEveryWaitWithAborted) {
  const uint16_t port = free_port();
  auto cancel = std::make_shared<std::atomic<bool>>(false);
  std::vector<BootstrapOptions> ranks = {loopback_options(port, 0, 4, 1),  // waits for ranks 1, 3
                                         loopback_options(port, 2, 4, 1),  // waits for the table
                                         // another group's rank that finds no coordinator
                                         loopback_options(free_port(), 1, 2, 1)};
  for (auto& o : ranks) {
    o.timeout = 60s;  // what a test without the flag would wait out
    o.cancel = cancel;
  }
  std::thread raise([&] {
    std::this_thread::sleep_for(300ms);
    cancel->store(true);
  });
  const auto results = exchange_on_threads(ranks, {"a", "b", "c"});
  raise.join();
  for (const auto& r : results) {
    ASSERT_FALSE(r->ok());
    EXPECT_EQ(r->status().code(), StatusCode::kAborted) << r->status();
    EXPECT_TRUE(contains(r->status().message(), "cancel")) << r->status();
  }
}

// Rank 1 meets the coordinator (rank 0 of 2) that runs in the child `child`, and both succeed.
void expect_child_coordinator_meets_rank_one(pid_t child, uint16_t port) {
  auto o = loopback_options(port, 1, 2, 1);
  o.timeout = 30s;
  const auto table = coordinator_exchange(o, "test", "one");
  EXPECT_TRUE(table.ok()) << table.status();
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "the coordinator failed: status " << status;
}

// Connections that close without a hello (ranks that gave up and retry, stray clients) give their
// descriptor back at once, and a coordinator out of descriptors waits instead of spinning: a
// stream of them does not keep the real ranks out. The coordinator runs in a child whose limit
// is 64 descriptors; 150 connections come and go before rank 1 arrives.
TEST(Bootstrap, ConnectionsThatComeAndGoDoNotUseUpTheCoordinatorsDescriptors) {
  const uint16_t port = free_port();
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    const rlimit limit{64, 64};
    if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(2);
    auto o = loopback_options(port, 0, 2, 1);
    o.timeout = 30s;
    ::_exit(coordinator_exchange(o, "test", "zero").ok() ? 0 : 1);
  }
  int connected = 0;
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (connected < 150 && std::chrono::steady_clock::now() < deadline) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) ++connected;
    else std::this_thread::sleep_for(5ms);  // not listening yet
    ::close(fd);
    // Now and then a moment for the coordinator to accept: a full backlog drops the next SYN,
    // which loopback retries only after a second.
    if (connected % 8 == 0) std::this_thread::sleep_for(1ms);
  }
  EXPECT_EQ(connected, 150);
  expect_child_coordinator_meets_rank_one(child, port);
}

// A TCP connection to the coordinator on loopback (retrying until it listens), or -1.
int connect_to(uint16_t port, int receive_buffer = 0) {
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (std::chrono::steady_clock::now() < deadline) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (receive_buffer > 0) ::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &receive_buffer, sizeof receive_buffer);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0) return fd;
    ::close(fd);
    std::this_thread::sleep_for(5ms);  // not listening yet
  }
  return -1;
}

bool send_everything(int fd, const std::string& bytes) {
  for (size_t off = 0; off < bytes.size();) {
    const ssize_t n = ::send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

// A plain (unauthenticated) hello of `rank` in a group of `size`, from this process.
std::string hello_of(uint32_t rank, uint32_t size, const std::string& round, const std::string& body) {
  wire::Header h;
  h.kind = wire::kHello;
  h.rank = rank;
  h.size = size;
  h.local_size = 1;
  h.pid = static_cast<uint32_t>(::getpid());
  return wire::encode(h, round, body);
}

// A coordinator (rank 0 of 2) in a child process whose data is capped at 256 MiB: what anyone
// reaching its port makes it hold must stay under that. Its pid.
pid_t fork_capped_coordinator(uint16_t port) {
  const pid_t child = ::fork();
  if (child == 0) {
    const rlimit limit{256u << 20, 256u << 20};
    if (::setrlimit(RLIMIT_DATA, &limit) != 0) ::_exit(2);
    auto o = loopback_options(port, 0, 2, 1);
    o.timeout = 60s;
    ::_exit(coordinator_exchange(o, "test", "zero").ok() ? 0 : 1);
  }
  return child;
}

// A refused hello is dropped with what it had sent: the coordinator once kept every refused
// connection's buffer (up to 1 MiB each) until the bootstrap ended, so anyone reaching the port
// could grow it without bound. Here 400 whole hellos of another round (about 400 MiB in all) go
// to a coordinator whose data is capped at 256 MiB; it must still meet its rank 1.
TEST(Bootstrap, RefusedHellosDoNotAccumulateInTheCoordinator) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' shadow memory does not fit under a data limit";
#endif
  const uint16_t port = free_port();
  const pid_t child = fork_capped_coordinator(port);
  ASSERT_GE(child, 0);
  const std::string hello = hello_of(1, 2, "another-round", std::string(wire::kMaxPayload, 'x'));
  for (int sent = 0; sent < 400; ++sent) {
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    (void)send_everything(fd, hello);  // refused early (the coordinator hung up): counts all the same
    char reply[256];
    (void)::recv(fd, reply, sizeof reply, 0);  // the refusal, then EOF
    ::close(fd);
  }
  expect_child_coordinator_meets_rank_one(child, port);
}

// A rank whose bootstrap was cancelled after its hello (a daemon told to stop, a client that gave
// up) may arrive again: its first connection's end takes it out of the table. It once stayed,
// and its second hello failed the whole group as "rank 1 arrived twice" (with the same pid).
// The first arrival is what a cancelled rank leaves on the wire, a hello and then its end, sent
// raw: a client cancelled by a timer could give up before its hello on a loaded machine, and
// the test would pass without reaching the fix. Whether the coordinator reads the hello before
// or after the end, and the end before or after the second hello, it must take the rank once.
TEST(Bootstrap, ARankCancelledAfterItsHelloMayArriveAgain) {
  const uint16_t port = free_port();
  std::optional<Result<BootstrapTable>> zero, again, two;
  std::thread coordinator([&] { zero.emplace(coordinator_exchange(loopback_options(port, 0, 3, 1), "test", "zero")); });
  const int first = connect_to(port);
  EXPECT_GE(first, 0);
  EXPECT_TRUE(send_everything(first, hello_of(1, 3, "test", "one-first")));
  ::close(first);
  std::thread one([&] { again.emplace(coordinator_exchange(loopback_options(port, 1, 3, 1), "test", "one")); });
  std::thread late([&] { two.emplace(coordinator_exchange(loopback_options(port, 2, 3, 1), "test", "two")); });
  coordinator.join();
  one.join();
  late.join();
  for (const auto* r : {&*zero, &*again, &*two}) {
    ASSERT_TRUE(r->ok()) << r->status();
    EXPECT_EQ(r->value().payloads, (std::vector<std::string>{"zero", "one", "two"}));
  }
}

// An arrived rank says nothing more until the table: one that does is dropped (and logged), and
// the rank may arrive again; one that arrives and hangs up for good is named as such when the
// group times out, apart from ranks that never came (rank 3 here).
TEST(Bootstrap, AnArrivedRankThatSpeaksOrHangsUpLeavesTheTable) {
  const uint16_t port = free_port();
  std::optional<Result<BootstrapTable>> zero;
  auto o0 = loopback_options(port, 0, 4, 1);
  o0.timeout = 3s;
  std::thread coordinator([&] { zero.emplace(coordinator_exchange(o0, "test", "zero")); });
  auto raw_hello = [&](uint32_t rank) {
    const int fd = connect_to(port);
    EXPECT_GE(fd, 0);
    EXPECT_TRUE(send_everything(fd, hello_of(rank, 4, "test", "raw")));
    return fd;
  };
  // Rank 1 arrives and talks out of turn (in the same send, so the coordinator may read both
  // at once or not, depending on the machine's load): dropped either way; it arrives again,
  // properly, and stays (a second arrival of a rank still there would fail the group as a
  // duplicate instead).
  const int talker = connect_to(port);
  EXPECT_GE(talker, 0);
  EXPECT_TRUE(send_everything(talker, hello_of(1, 4, "test", "raw") + "more"));
  const int again = raw_hello(1);
  // Rank 2 arrives and hangs up; it never comes back.
  const int quitter = raw_hello(2);
  ::close(quitter);
  coordinator.join();
  ::close(talker);
  ::close(again);
  ASSERT_FALSE(zero->ok());
  EXPECT_EQ(zero->status().code(), StatusCode::kTimeout) << zero->status();
  EXPECT_TRUE(contains(zero->status().message(), "rank 3 never reached the coordinator at 127.0.0.1:" +
                                                     std::to_string(port) + " (2 of 4 ranks arrived)"))
      << zero->status();
  EXPECT_TRUE(contains(zero->status().message(), "; rank 2 reached it and then hung up or were cut off"))
      << zero->status();
}

// A rank that takes none of the table (stopped, or not reading) costs only itself: the others
// get theirs, and rank 0 fails naming it, rather than the others failing on one shared deadline
// while rank 0 went on as if the group had started. Rank 7 here is a raw socket that sends its
// hello and never reads, with a small receive buffer, so that the 7 MiB table cannot fit in the
// sockets' buffers.
TEST(Bootstrap, ARankThatTakesNoTableFailsOnlyItselfAndRankZero) {
  const uint16_t port = free_port();
  constexpr int kSize = 8;
  const std::string big(wire::kMaxPayload, 'x');
  std::vector<BootstrapOptions> ranks;
  std::vector<std::string> payloads;
  for (int r = 0; r < kSize - 1; ++r) {
    ranks.push_back(loopback_options(port, r, kSize, 1));
    payloads.push_back(big);
  }
  std::atomic<bool> answered{false};
  std::thread stalled([&] {
    const int fd = connect_to(port, 4096);
    ASSERT_GE(fd, 0);
    EXPECT_TRUE(send_everything(fd, hello_of(kSize - 1, kSize, "test", "seven")));
    while (!answered.load()) std::this_thread::sleep_for(10ms);  // never reads
    ::close(fd);
  });
  const auto results = exchange_on_threads(ranks, payloads);
  answered = true;
  stalled.join();
  for (int r = 1; r < kSize - 1; ++r) {
    ASSERT_TRUE(results[r]->ok()) << "rank " << r << ": " << results[r]->status();
    EXPECT_EQ(results[r]->value().payloads[kSize - 1], "seven");
  }
  ASSERT_FALSE(results[0]->ok());
  EXPECT_EQ(results[0]->status().code(), StatusCode::kUnavailable) << results[0]->status();
  EXPECT_TRUE(contains(results[0]->status().message(), "rank 7 could not be sent the group's table (it took none of "
                                                       "the answer for 2 s"))
      << results[0]->status();
}

// Connections that send part of a hello and then stall hold the coordinator's memory only up to a
// bound: past the group's ranks twice over (and some), the oldest without a hello is dropped.
// Each once kept its buffer, up to a whole hello (1 MiB), until the bootstrap deadline. Here 300
// stall with all but the last byte of a 1 MiB hello sent, against a coordinator whose data is
// capped at 256 MiB; it must still meet its rank 1.
TEST(Bootstrap, StalledHellosHoldTheCoordinatorsMemoryOnlyUpToABound) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "the sanitizers' shadow memory does not fit under a data limit";
#endif
  const uint16_t port = free_port();
  const pid_t child = fork_capped_coordinator(port);
  ASSERT_GE(child, 0);
  std::string hello = hello_of(1, 2, "test", std::string(wire::kMaxPayload, 'x'));
  hello.pop_back();  // never complete
  std::vector<int> stalled;
  for (int i = 0; i < 300; ++i) {
    const int fd = connect_to(port);
    ASSERT_GE(fd, 0);
    (void)send_everything(fd, hello);  // a dropped one fails here: it counts all the same
    stalled.push_back(fd);
  }
  expect_child_coordinator_meets_rank_one(child, port);
  for (int fd : stalled) ::close(fd);
}

// What a rank believes of an error answer, which is not authenticated: a message of at most
// 64 KiB, shown escaped (no forged log lines), with a status code this build knows. A fake
// coordinator answers each connection with one error.
TEST(Bootstrap, AnErrorAnswerIsBoundedEscapedAndOfAKnownCode) {
  struct Case {
    uint32_t code;
    std::string body;
    StatusCode want;
    std::string says;
  };
  const std::vector<Case> cases = {
      {99, "forged\nWARN line", StatusCode::kInternal, "says: forged\\x0aWARN line"},
      {static_cast<uint32_t>(StatusCode::kPermissionDenied), "no", StatusCode::kPermissionDenied, "says: no"},
      {static_cast<uint32_t>(StatusCode::kInvalidArgument), std::string((64 << 10) + 1, 'x'), StatusCode::kCorruption,
       "malformed answer"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.says);
    const int listener = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    ASSERT_EQ(::bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
    ASSERT_EQ(::listen(listener, 4), 0);
    socklen_t len = sizeof addr;
    ASSERT_EQ(::getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    std::thread fake([&] {
      const int fd = ::accept(listener, nullptr, nullptr);
      if (fd < 0) return;
      char hello[256];
      (void)::recv(fd, hello, sizeof hello, 0);
      wire::Header h;
      h.kind = wire::kError;
      h.rank = c.code;
      (void)send_everything(fd, wire::encode(h, {}, c.body));
      char sink[64];
      (void)::recv(fd, sink, sizeof sink, 0);  // until the rank hangs up
      ::close(fd);
    });
    auto o = loopback_options(ntohs(addr.sin_port), 1, 2, 1);
    o.timeout = 3s;
    const auto r = coordinator_exchange(o, "test", "one");
    fake.join();
    ::close(listener);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), c.want) << r.status();
    EXPECT_TRUE(contains(r.status().message(), c.says)) << r.status();
  }
}

// A group's own coordinator refuses a rank that names another group (two tenants' layers given
// one address), and serves the ranks that name its own.
TEST(Bootstrap, ARankNamingAnotherGroupIsRefused) {
  const uint16_t port = free_port();
  std::vector<BootstrapOptions> ranks = {loopback_options(port, 0, 2, 1), loopback_options(port, 1, 2, 1)};
  ranks[0].group_name = "a/moe";
  ranks[1].group_name = "b/moe";
  for (auto& o : ranks) o.timeout = 2s;
  auto results = exchange_on_threads(ranks, {"zero", "one"});
  ASSERT_FALSE(results[1]->ok());
  EXPECT_TRUE(contains(results[1]->status().message(), "runs round 'test@a/moe', not 'test@b/moe'"))
      << results[1]->status();
  ASSERT_FALSE(results[0]->ok()) << "rank 1 never arrived";
  ranks[1].group_name = "a/moe";
  results = exchange_on_threads(ranks, {"zero", "one"});
  for (const auto& r : results) EXPECT_TRUE(r->ok()) << r->status();
}

TEST(Bootstrap, DuplicateRankFailsEveryone) {
  const uint16_t port = free_port();
  std::vector<BootstrapOptions> ranks = {loopback_options(port, 0, 3, 1),
                                         loopback_options(port, 1, 3, 1),
                                         loopback_options(port, 1, 3, 1)};
  for (auto& o : ranks) o.timeout = 5s;
  const auto results = exchange_on_threads(ranks, {"a", "b", "c"});
  for (const auto& r : results) {
    ASSERT_FALSE(r->ok());
    EXPECT_TRUE(contains(r->status().message(), "rank 1 arrived twice")) << r->status();
  }
}

TEST(Bootstrap, MismatchedGroupShapeFailsEveryone) {
  const uint16_t port = free_port();
  std::vector<BootstrapOptions> ranks = {loopback_options(port, 0, 2, 1),
                                         loopback_options(port, 1, 2, 2)};
  for (auto& o : ranks) o.timeout = 5s;
  const auto results = exchange_on_threads(ranks, {"a", "b"});
  for (const auto& r : results) {
    ASSERT_FALSE(r->ok());
    EXPECT_EQ(r->status().code(), StatusCode::kInvalidArgument);
    EXPECT_TRUE(contains(r->status().message(), "local_size 2")) << r->status();
  }
}

TEST(Bootstrap, ConsecutiveRoundsOnOnePort) {
  const uint16_t port = free_port();
  const int n = 3;
  std::vector<std::optional<Result<BootstrapTable>>> second(n);
  std::vector<std::thread> threads;
  for (int r = 0; r < n; ++r) {
    threads.emplace_back([&, r] {
      const auto o = loopback_options(port, r, n, 1);
      auto first = coordinator_exchange(o, "ucx", "first-" + std::to_string(r));
      if (!first.ok()) {
        second[r].emplace(std::move(first).status());
        return;
      }
      second[r].emplace(coordinator_exchange(o, "nccl", r == 0 ? "unique-id" : ""));
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < n; ++r) {
    ASSERT_TRUE(second[r]->ok()) << second[r]->status();
    EXPECT_EQ(second[r]->value().payloads[0], "unique-id");  // the NCCL id hook
  }
}

TEST(Bootstrap, ValidatesOptions) {
  EXPECT_FALSE(validate(loopback_options(1234, 2, 2, 1)).ok());  // rank >= size
  EXPECT_FALSE(validate(loopback_options(1234, 0, 2, 0)).ok());  // local_size 0
  EXPECT_FALSE(validate(loopback_options(1234, 0, 2, 3)).ok());  // local_size > size
  EXPECT_FALSE(validate(loopback_options(0, 0, 2, 1)).ok());     // no port
  EXPECT_TRUE(validate(loopback_options(0, 0, 1, 1)).ok());      // alone: no port needed
  EXPECT_TRUE(validate(loopback_options(1234, 1, 4, 3)).ok());   // 2DH refuses later, not here
  auto hour = loopback_options(1234, 0, 2, 1);
  hour.timeout = std::chrono::hours(1);
  EXPECT_TRUE(validate(hour).ok());
  hour.timeout += 1ms;  // past what a group may wait (and a join's 32-bit milliseconds near 2^32)
  const Status long_wait = validate(hour);
  EXPECT_EQ(long_wait.code(), StatusCode::kInvalidArgument);
  EXPECT_TRUE(contains(long_wait.message(), "above the most a group may wait, 3600000 ms")) << long_wait;
  auto o = loopback_options(1234, 0, 2, 1);
  o.coordinator_host = "localhost";
  EXPECT_FALSE(coordinator_exchange(o, "test", "").ok());  // numeric addresses only
}

TEST(Bootstrap, SingleRankNeedsNoCoordinator) {
  auto r = coordinator_exchange(loopback_options(0, 0, 1, 1), "test", "solo");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->payloads, std::vector<std::string>{"solo"});
}

}  // namespace
}  // namespace tutel::comm
