// The rendezvous service: many groups bootstrapping through one long-lived address. Protocol
// tests run ranks as threads of this process; the UCX test forks its ranks.
#include "tutel/comm/rendezvous.hpp"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "comm_test_util.hpp"
#include "tutel/comm/ucx.hpp"

namespace tutel::comm {
namespace {

using namespace std::chrono_literals;
using testing::free_port;
using testing::RawClient;
using Clock = std::chrono::steady_clock;

bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

std::unique_ptr<RendezvousService> start_service(std::chrono::milliseconds join_timeout = 30s,
                                                 int max_groups = 4096) {
  RendezvousOptions o;
  o.host = "127.0.0.1";
  o.port = 0;
  o.join_timeout = join_timeout;
  o.max_groups = max_groups;
  auto service = RendezvousService::start(o);
  EXPECT_TRUE(service.ok()) << service.status();
  return service.ok() ? std::move(service).value() : nullptr;
}

BootstrapOptions member(const RendezvousService& s, std::string group, int rank, int size,
                        std::chrono::milliseconds timeout = 10s) {
  BootstrapOptions o;
  o.coordinator_host = s.host();
  o.coordinator_port = s.port();
  o.rank = rank;
  o.size = size;
  o.timeout = timeout;
  o.rendezvous_group = std::move(group);
  o.rendezvous_owner = "the test";
  return o;
}

struct Outcome {
  std::optional<Result<BootstrapTable>> result;
  int finished = 0;  // 1 for the first call to return, 2 for the next, ...
};

// Runs coordinator_exchange for each member on its own thread.
std::vector<Outcome> exchange_on_threads(const std::vector<BootstrapOptions>& members,
                                         std::string_view round = "test") {
  std::vector<Outcome> out(members.size());
  std::vector<std::thread> threads;
  std::atomic<int> finished{0};
  for (size_t i = 0; i < members.size(); ++i)
    threads.emplace_back([&, i] {
      const BootstrapOptions& o = members[i];
      out[i].result.emplace(
          coordinator_exchange(o, round, o.rendezvous_group + "#" + std::to_string(o.rank)));
      out[i].finished = ++finished;
    });
  for (auto& t : threads) t.join();
  return out;
}

std::string error_of(const Outcome& o) {
  return o.result->ok() ? std::string("(ok)") : std::string(o.result->status().message());
}

void put_u32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

// A join as bootstrap_wire.hpp lays it out, with every field chosen by the test.
std::string join_bytes(uint32_t magic, uint32_t kind, uint32_t rank, uint32_t size,
                       std::string round, std::string body, uint32_t round_len, uint32_t body_len) {
  std::string out;
  for (uint32_t v : {magic, kind, rank, size, 1u, 4242u, round_len, body_len}) put_u32(out, v);
  return out + round + body;
}

constexpr uint32_t kMagic = 0x31424354;

TEST(Rendezvous, TwoGroupsMeetIndependentlyAndAMissingRankDelaysOnlyItsGroup) {
  auto service = start_service();
  ASSERT_TRUE(service);
  // Group A lacks rank 2; group B (same names of ranks, other group) is complete, and is
  // answered first, while A still waits.
  std::vector<BootstrapOptions> members = {
      member(*service, "t/A", 0, 3, 3000ms), member(*service, "t/A", 1, 3, 3000ms),
      member(*service, "t/B", 1, 2, 3000ms), member(*service, "t/B", 0, 2, 3000ms)};
  const auto out = exchange_on_threads(members);
  for (int i : {2, 3}) {
    ASSERT_TRUE(out[i].result->ok()) << error_of(out[i]);
    const BootstrapTable& t = out[i].result->value();
    ASSERT_EQ(t.payloads.size(), 2u);
    EXPECT_EQ(t.payloads[0], "t/B#0");
    EXPECT_EQ(t.payloads[1], "t/B#1");
    EXPECT_EQ(t.addresses[0], "127.0.0.1, pid " + std::to_string(::getpid()));
    EXPECT_LE(out[i].finished, 2) << "group B waited for group A";
  }
  for (int i : {0, 1}) {
    ASSERT_FALSE(out[i].result->ok());
    EXPECT_EQ(out[i].result->status().code(), StatusCode::kTimeout) << error_of(out[i]);
    EXPECT_TRUE(
        contains(error_of(out[i]), "rank 2 never reached the rendezvous service at 127.0.0.1:" +
                                       std::to_string(service->port())))
        << error_of(out[i]);
    EXPECT_TRUE(contains(error_of(out[i]), "group 't/A'")) << error_of(out[i]);
    EXPECT_TRUE(contains(error_of(out[i]), "2 of 3 ranks arrived")) << error_of(out[i]);
  }
  const RendezvousStats st = service->stats();
  EXPECT_EQ(st.groups_completed, 1u);
  EXPECT_EQ(st.groups_failed, 1u);
  EXPECT_EQ(st.pending_groups, 0u);
}

TEST(Rendezvous, ManyGroupsAndRoundsAtOnce) {
  auto service = start_service();
  ASSERT_TRUE(service);
  std::vector<BootstrapOptions> members;
  for (int g = 0; g < 8; ++g)
    for (int r = 0; r < 3; ++r)
      members.push_back(member(*service, "tenant/g" + std::to_string(g), r, 3));
  const auto ucx = exchange_on_threads(members, "ucx");
  for (size_t i = 0; i < members.size(); ++i) {
    ASSERT_TRUE(ucx[i].result->ok()) << error_of(ucx[i]);
    for (int r = 0; r < 3; ++r)
      EXPECT_EQ(ucx[i].result->value().payloads[r],
                members[i].rendezvous_group + "#" + std::to_string(r));
  }
  // The same groups again, in another round: a completed group is forgotten.
  const auto nccl = exchange_on_threads(members, "nccl");
  for (size_t i = 0; i < members.size(); ++i)
    ASSERT_TRUE(nccl[i].result->ok()) << error_of(nccl[i]);
  EXPECT_EQ(service->stats().groups_completed, 16u);
}

TEST(Rendezvous, TenantsWithTheSameGroupNameNeverMeet) {
  auto service = start_service();
  ASSERT_TRUE(service);
  const auto out = exchange_on_threads(
      {member(*service, "a/g", 0, 2, 800ms), member(*service, "b/g", 1, 2, 800ms)});
  ASSERT_FALSE(out[0].result->ok());
  ASSERT_FALSE(out[1].result->ok());
  EXPECT_TRUE(contains(error_of(out[0]), "rank 1 never reached")) << error_of(out[0]);
  EXPECT_TRUE(contains(error_of(out[1]), "rank 0 never reached")) << error_of(out[1]);
}

// Runs `o` on a thread after `delay`.
std::thread exchange_later(const BootstrapOptions& o, std::chrono::milliseconds delay,
                           Outcome* out) {
  return std::thread([o, delay, out] {
    std::this_thread::sleep_for(delay);
    out->result.emplace(coordinator_exchange(o, "test", "x"));
  });
}

TEST(Rendezvous, DuplicateRankFailsTheGroupOnEveryRank) {
  auto service = start_service();
  ASSERT_TRUE(service);
  Outcome first, second, late;
  // A deadline far away: a doomed group fails at once (kInvalidArgument), not at its deadline
  // (kTimeout), and a rank arriving after the verdict hears it too.
  std::thread a = exchange_later(member(*service, "t/dup", 0, 3, 60s), 0ms, &first);
  std::thread b = exchange_later(member(*service, "t/dup", 0, 3, 60s), 300ms, &second);
  std::thread c = exchange_later(member(*service, "t/dup", 1, 3, 60s), 600ms, &late);
  a.join();
  b.join();
  c.join();
  for (const Outcome* o : {&first, &second, &late}) {
    ASSERT_FALSE(o->result->ok());
    EXPECT_EQ(o->result->status().code(), StatusCode::kInvalidArgument) << error_of(*o);
    EXPECT_TRUE(contains(error_of(*o), "rank 0 of group 't/dup' arrived twice")) << error_of(*o);
  }
}

TEST(Rendezvous, RanksDisagreeingOnSizeFailClearly) {
  auto service = start_service();
  ASSERT_TRUE(service);
  Outcome first, second;
  std::thread a = exchange_later(member(*service, "t/shape", 0, 2, 60s), 0ms, &first);
  std::thread b = exchange_later(member(*service, "t/shape", 1, 3, 60s), 300ms, &second);
  a.join();
  b.join();
  for (const Outcome* o : {&first, &second}) {
    ASSERT_FALSE(o->result->ok());
    EXPECT_TRUE(contains(error_of(*o), "was started with size 3")) << error_of(*o);
    EXPECT_TRUE(contains(error_of(*o), "rank 0 (127.0.0.1, pid")) << error_of(*o);
    EXPECT_TRUE(contains(error_of(*o), "with size 2")) << error_of(*o);
  }
}

// The service holds at most max_groups groups: a failed one (which only waits to tell its late
// ranks why) makes room for a new group; with every group waiting for ranks, a join that would
// start another is refused with what to do, and the waiting groups still meet.
TEST(Rendezvous, GroupsBeyondTheLimitAreRefusedAndFailedOnesMakeRoom) {
  auto service = start_service(30s, /*max_groups=*/2);
  ASSERT_TRUE(service);
  Outcome f0, f1;
  std::thread fa = exchange_later(member(*service, "t/failed", 0, 2, 60s), 0ms, &f0);
  std::thread fb = exchange_later(member(*service, "t/failed", 1, 3, 60s), 200ms, &f1);
  fa.join();
  fb.join();
  ASSERT_FALSE(f1.result->ok());  // failed, and kept (it holds one of the two places)
  auto wait_for = [&](uint64_t pending, uint64_t failed) {
    for (int i = 0; i < 1000; ++i) {
      const RendezvousStats s = service->stats();
      if (s.pending_groups == pending && s.failed_groups == failed) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  };
  ASSERT_TRUE(wait_for(1, 1));
  Outcome a0, b0, refused, a1, b1;
  std::thread ta = exchange_later(member(*service, "t/a", 0, 2), 0ms, &a0);
  ASSERT_TRUE(wait_for(2, 1));
  std::thread tb = exchange_later(member(*service, "t/b", 0, 2), 0ms, &b0);  // drops t/failed
  ASSERT_TRUE(wait_for(2, 0));
  std::thread tc = exchange_later(member(*service, "t/c", 0, 2), 0ms, &refused);
  tc.join();
  ASSERT_FALSE(refused.result->ok());
  EXPECT_EQ(refused.result->status().code(), StatusCode::kResourceExhausted) << error_of(refused);
  EXPECT_TRUE(contains(error_of(refused), "2 groups are waiting for ranks, its limit; group 't/c'"))
      << error_of(refused);
  std::thread ta1 = exchange_later(member(*service, "t/a", 1, 2), 0ms, &a1);
  std::thread tb1 = exchange_later(member(*service, "t/b", 1, 2), 0ms, &b1);
  for (std::thread* t : {&ta, &tb, &ta1, &tb1}) t->join();
  for (const Outcome* o : {&a0, &b0, &a1, &b1}) EXPECT_TRUE(o->result->ok()) << error_of(*o);
  EXPECT_EQ(service->stats().pending_groups, 0u);
}

// At its connection limit the service closes the oldest connection that has sent no join, not the
// newcomer: idle connections (renewed every join_timeout by whoever opened them) once kept every
// group out. Ranks that joined are never closed for it: with every connection a joined rank, the
// newcomer is. Here the limit is 4: four idle connections, then a group of two meets; then two
// ranks of a group of three wait, two idle connections fill the limit, and the third rank still
// gets in (the idle ones go, not the waiting ranks).
TEST(Rendezvous, AtItsConnectionLimitTheOldestIdleConnectionMakesRoom) {
  RendezvousOptions options;
  options.max_connections = 4;
  auto started = RendezvousService::start(options);
  ASSERT_TRUE(started.ok()) << started.status();
  const std::unique_ptr<RendezvousService> service = std::move(started).value();
  auto open_idle = [&](int n) {
    std::vector<int> fds;
    for (int i = 0; i < n; ++i) {
      const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_port = htons(service->port());
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
      fds.push_back(fd);
    }
    for (int i = 0; i < 500 && service->stats().connections < static_cast<uint64_t>(n); ++i)
      std::this_thread::sleep_for(2ms);  // accepted
    return fds;
  };
  std::vector<int> idle = open_idle(4);
  EXPECT_EQ(service->stats().connections, 4u);
  const auto pair = exchange_on_threads({member(*service, "t/pair", 0, 2, 5s), member(*service, "t/pair", 1, 2, 5s)});
  for (const Outcome& o : pair) EXPECT_TRUE(o.result->ok()) << error_of(o);

  Outcome r0, r1, r2;
  std::thread t0 = exchange_later(member(*service, "t/three", 0, 3, 10s), 0ms, &r0);
  std::thread t1 = exchange_later(member(*service, "t/three", 1, 3, 10s), 0ms, &r1);
  for (int i = 0; i < 1000 && service->stats().pending_groups == 0; ++i) std::this_thread::sleep_for(2ms);
  std::this_thread::sleep_for(100ms);  // both joined
  std::vector<int> more = open_idle(2);
  std::thread t2 = exchange_later(member(*service, "t/three", 2, 3, 10s), 0ms, &r2);
  for (std::thread* t : {&t0, &t1, &t2}) t->join();
  for (const Outcome* o : {&r0, &r1, &r2}) EXPECT_TRUE(o->result->ok()) << error_of(*o);
  EXPECT_GE(service->stats().refused, 2u);  // the idle connections closed to make room
  for (int fd : idle) ::close(fd);
  for (int fd : more) ::close(fd);
}

TEST(Rendezvous, ARankThatHangsUpIsWithdrawnAndMayJoinAgain) {
  auto service = start_service();
  ASSERT_TRUE(service);
  {
    RawClient quitter(service->port());
    std::string body;
    put_u32(body, 5000);
    body += "gone";
    quitter.send(
        join_bytes(kMagic, 4, 1, 2, "test@t/again", body, 12, static_cast<uint32_t>(body.size())));
    std::this_thread::sleep_for(200ms);
    EXPECT_EQ(service->stats().pending_groups, 1u);
  }  // closed: rank 1 leaves the group
  std::this_thread::sleep_for(200ms);
  const auto out =
      exchange_on_threads({member(*service, "t/again", 0, 2), member(*service, "t/again", 1, 2)});
  for (const Outcome& o : out) {
    ASSERT_TRUE(o.result->ok()) << error_of(o);
    EXPECT_EQ(o.result->value().payloads[1], "t/again#1");
  }
}

// The resident set of this process, in bytes (VmRSS), or 0 when unknown.
uint64_t resident_bytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  return 0;
}

// The members of a group share one answer: a table as large as everything they sent (up to
// size × 1 MiB) is not copied for each of them, which let any local process that can reach the
// service make it allocate size² MiB.
TEST(Rendezvous, AGroupsMembersShareOneCopyOfTheirTable) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's shadow memory grows the resident set with every byte touched";
#endif
  auto service = start_service();
  ASSERT_TRUE(service);
  constexpr uint32_t kSize = 16;
  const std::string payload(size_t{1} << 20, 'p');  // the most a member may send
  std::string body;
  put_u32(body, 10000);
  body += payload;
  const std::string round = "test@t/large";
  std::vector<std::unique_ptr<RawClient>> members;
  const uint64_t before = resident_bytes();
  for (uint32_t r = 0; r < kSize; ++r) {
    members.push_back(std::make_unique<RawClient>(service->port()));
    ASSERT_GE(members.back()->fd, 0);
    // Never read: the answers wait in the service until its write timeout.
    members.back()->send(join_bytes(kMagic, 4, r, kSize, round, body, static_cast<uint32_t>(round.size()),
                                    static_cast<uint32_t>(body.size())));
  }
  const auto deadline = Clock::now() + 10s;
  while (service->stats().groups_completed == 0 && Clock::now() < deadline) std::this_thread::sleep_for(10ms);
  ASSERT_EQ(service->stats().groups_completed, 1u);
  const uint64_t after = resident_bytes();
  ASSERT_GT(before, 0u);
  // One 16 MiB table and what the reads held; a copy per member would be 256 MiB.
  EXPECT_LT(after - std::min(after, before), uint64_t{96} << 20)
      << "the service holds " << ((after - before) >> 20) << " MiB more for one group's answers";
}

// A large group that times out names its first 16 missing ranks and how many are missing in
// all; the service looks no further for them.
TEST(Rendezvous, ALargeGroupThatTimesOutNamesItsFirstMissingRanks) {
  auto service = start_service();
  ASSERT_TRUE(service);
  const auto out = exchange_on_threads({member(*service, "t/large", 0, 100000, 300ms),
                                        member(*service, "t/large", 5, 100000, 300ms)});
  for (const Outcome& o : out) {
    ASSERT_FALSE(o.result->ok());
    EXPECT_EQ(o.result->status().code(), StatusCode::kTimeout) << error_of(o);
    EXPECT_TRUE(contains(error_of(o), "ranks 1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, ... (99998 in all) "
                                      "never reached the rendezvous service"))
        << error_of(o);
  }
}

TEST(Rendezvous, MalformedClientsAreRefusedWithoutDisturbingGroups) {
  auto service = start_service(/*join_timeout=*/700ms);
  ASSERT_TRUE(service);
  const uint16_t port = service->port();
  // A group is waiting for its second rank while the garbage arrives.
  Outcome waiting;
  std::thread w = exchange_later(member(*service, "t/ok", 0, 2, 8000ms), 0ms, &waiting);
  std::this_thread::sleep_for(100ms);

  std::mt19937 rng(7);
  std::string noise(5000, '\0');
  for (char& c : noise) c = static_cast<char>(rng());
  RawClient random_bytes(port), truncated(port), oversized(port), hello(port), bad_key(port),
      silent(port), huge_round(port), bad_rank(port);
  random_bytes.send(noise);
  truncated.send(join_bytes(kMagic, 4, 1, 2, "test@t/ok", "", 9, 100).substr(0, 36));
  oversized.send(join_bytes(kMagic, 4, 1, 2, "", "", 9, 0xffffffffu));
  hello.send(join_bytes(kMagic, 1, 1, 2, "test", "x", 4, 1));
  std::string body;
  put_u32(body, 1000);
  bad_key.send(join_bytes(kMagic, 4, 1, 2, "test-t/ok", body, 9, 4));
  huge_round.send(join_bytes(kMagic, 4, 1, 2, "", "", 0x7fffffffu, 4));
  bad_rank.send(join_bytes(kMagic, 4, 7, 2, "test@t/ok", body, 9, 4));

  EXPECT_TRUE(contains(random_bytes.read_all(), "bad magic"));
  EXPECT_TRUE(contains(oversized.read_all(), "exceeds 1 MiB"));
  EXPECT_TRUE(contains(hello.read_all(), "is a rendezvous service, not a group's own coordinator"));
  EXPECT_TRUE(contains(bad_key.read_all(), "is not \"<round>@<group>\""));
  EXPECT_TRUE(contains(huge_round.read_all(), "group key of"));
  EXPECT_TRUE(contains(bad_rank.read_all(), "malformed join: rank 7, size 2"));
  ::shutdown(truncated.fd, SHUT_WR);  // the rest of its message never comes
  EXPECT_EQ(truncated.read_all(), "");
  EXPECT_EQ(silent.read_all(2000ms), "") << "a silent connection is dropped after join_timeout";

  // The waiting group still completes with its real second rank.
  Outcome second;
  exchange_later(member(*service, "t/ok", 1, 2, 8000ms), 0ms, &second).join();
  w.join();
  ASSERT_TRUE(waiting.result->ok()) << error_of(waiting);
  ASSERT_TRUE(second.result->ok()) << error_of(second);
  EXPECT_EQ(waiting.result->value().payloads[1], "x");
  const RendezvousStats st = service->stats();
  EXPECT_GE(st.refused, 8u);
  EXPECT_EQ(st.groups_completed, 1u);
  EXPECT_EQ(st.groups_failed, 0u);
}

TEST(Rendezvous, AServiceThatIsNotThereIsNamedNotWaitedForForever) {
  BootstrapOptions o;
  o.coordinator_host = "127.0.0.1";
  o.coordinator_port = free_port();
  o.rank = 1;
  o.size = 2;
  o.timeout = 500ms;
  o.rendezvous_group = "t/nobody";
  o.rendezvous_owner = "node 0's daemon";
  Result<BootstrapTable> r = coordinator_exchange(o, "ucx", "x");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), StatusCode::kTimeout);
  EXPECT_TRUE(
      contains(r.status().message(), "could not reach the rendezvous service at 127.0.0.1:" +
                                         std::to_string(o.coordinator_port) + " (node 0's daemon)"))
      << r.status();
}

TEST(Rendezvous, StoppingTheServiceAnswersWaitingRanks) {
  auto service = start_service();
  ASSERT_TRUE(service);
  Outcome waiting;
  std::thread w = exchange_later(member(*service, "t/stop", 0, 2, 8000ms), 0ms, &waiting);
  std::this_thread::sleep_for(300ms);
  service.reset();
  w.join();
  ASSERT_FALSE(waiting.result->ok());
  EXPECT_TRUE(contains(error_of(waiting), "is shutting down")) << error_of(waiting);
}

TEST(Rendezvous, BindsTheAddressGivenOnly) {
  RendezvousOptions o;
  o.host = "localhost";
  EXPECT_FALSE(RendezvousService::start(o).ok());
  o.host = "127.0.0.1";
  auto a = RendezvousService::start(o);
  ASSERT_TRUE(a.ok()) << a.status();
  o.port = (*a)->port();
  auto b = RendezvousService::start(o);  // the port is taken
  ASSERT_FALSE(b.ok());
  EXPECT_TRUE(
      contains(b.status().message(), "cannot listen on 127.0.0.1:" + std::to_string(o.port)));
}

// Two groups of two forked processes each bootstrap UCX communicators through one service and
// all-reduce within their own group. The service runs in a forked child of its own too: a
// process must not fork while one of its threads (the service's) may hold a lock the child needs
// (a child once hung that way).
TEST(Rendezvous, UcxGroupsBootstrapThroughOneService) {
  const uint16_t port = testing::free_port();
  constexpr int kService = 4;
  testing::ProcessGroup children(5, [&](int child, const testing::ChildChannel&) -> std::string {
    if (child == kService) {
      RendezvousOptions ro;
      ro.port = port;
      auto service = RendezvousService::start(ro);
      if (!service.ok()) return "service: " + std::string(service.status().message());
      const auto deadline = std::chrono::steady_clock::now() + 50s;
      while ((*service)->stats().groups_completed < 2 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(10ms);
      const uint64_t completed = (*service)->stats().groups_completed;
      return completed == 2 ? "" : "the service completed " + std::to_string(completed) + " groups, not 2";
    }
    const int group = child / 2, rank = child % 2;
    BootstrapOptions o = testing::loopback_options(port, rank, 2, 1);
    o.coordinator_host = "127.0.0.1";
    o.rendezvous_group = "tenant/group" + std::to_string(group);
    auto comm = ucx_bootstrap(o);
    if (!comm.ok()) return "bootstrap: " + std::string(comm.status().message());
    float value[2] = {float(1 + child), float(10 * group)};
    Status s = (*comm)->all_reduce(value, 2, ReduceOp::kSum);
    if (!s.ok()) return "all_reduce: " + std::string(s.message());
    const float want = group == 0 ? 1 + 2 : 3 + 4;
    if (value[0] != want || value[1] != float(20 * group))
      return "group " + std::to_string(group) + " summed " + std::to_string(value[0]) + ", " +
             std::to_string(value[1]) + ": the groups mixed";
    return "";
  });
  EXPECT_EQ(testing::describe_failures(children.wait_all(60s)), "");
}

}  // namespace
}  // namespace tutel::comm
