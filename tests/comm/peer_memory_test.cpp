// Peer memory's pieces in one process (process_vm_readv on our own pid works like on a
// neighbour's): a loan is read exactly; a withdrawn loan, a wrong size, a foreign message and a
// gone process are errors, and nothing is copied from a withdrawn loan that could be mistaken
// for data; only the peer that received a challenge's nonce holds its answer. The protocol
// between processes runs in every multi-process comm test (chunks of
// 64 KiB and more are pulled; `peers()` says so).
#include "peer_memory.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>
#include <vector>

#include "tutel/core/secret.hpp"

namespace tutel::comm::ucx {
namespace {

std::vector<uint8_t> random_bytes(size_t n) {
  std::mt19937 rng(std::random_device{}());
  std::vector<uint8_t> v(n);
  for (auto& b : v) b = static_cast<uint8_t>(rng());
  return v;
}

TEST(PeerMemory, ALoanIsReadExactly) {
  LeaseTable leases;
  for (size_t bytes : {size_t{1}, size_t{4096}, size_t{3} << 20}) {
    const std::vector<uint8_t> data = random_bytes(bytes);
    LeaseTable::Slot* slot = leases.lend(data.data(), data.size(), 1);
    std::vector<uint8_t> got(bytes, 0);
    ASSERT_TRUE(pull(::getpid(), slot->descriptor, leases.bounds(1), got.data(), bytes, "rank 1").ok());
    EXPECT_EQ(got, data);
    leases.release(slot);
  }
}

TEST(PeerMemory, AWithdrawnLoanFailsAndSlotsAreReusedWithFreshLeases) {
  LeaseTable leases;
  std::vector<uint8_t> data = random_bytes(65536), got(65536, 0);
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size(), 1);
  const PullDescriptor late = slot->descriptor;  // what a slow receiver holds
  leases.release(slot);
  bool withdrawn = false;
  Status s = pull(::getpid(), late, leases.bounds(1), got.data(), got.size(), "rank 3 (127.0.0.1, pid 1)", &withdrawn);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(withdrawn);
  EXPECT_NE(s.message().find("rank 3 (127.0.0.1, pid 1) withdrew the message"), std::string_view::npos) << s;
  // The slot lends again, to another buffer: the old descriptor still fails (its lease value is
  // not the new one), the new one reads the new buffer.
  std::vector<uint8_t> other = random_bytes(65536);
  LeaseTable::Slot* again = leases.lend(other.data(), other.size(), 1);
  EXPECT_EQ(again, slot);
  EXPECT_FALSE(pull(::getpid(), late, leases.bounds(1), got.data(), got.size(), "rank 3").ok());
  ASSERT_TRUE(pull(::getpid(), again->descriptor, leases.bounds(1), got.data(), got.size(), "rank 3").ok());
  EXPECT_EQ(got, other);
}

TEST(PeerMemory, SizesThatDisagreeAndForeignMessagesAreErrors) {
  LeaseTable leases;
  std::vector<uint8_t> data = random_bytes(100000), got(200000, 0);
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size(), 1);
  Status s = pull(::getpid(), slot->descriptor, leases.bounds(1), got.data(), 200000, "rank 2");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("different sizes"), std::string_view::npos) << s;
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == 0; }));
  PullDescriptor foreign = slot->descriptor;
  foreign.magic ^= 1;
  s = pull(::getpid(), foreign, leases.bounds(1), got.data(), 100000, "rank 2");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  leases.release(slot);
}

// A descriptor is read only where it names a loan of the lender's to this rank: in the lender's
// lease arena, at a slot whose own copy is the descriptor sent, with a lease value that is not 0.
// Anyone who can send UCX messages on the pair's tag could make a rank copy any memory of the
// lender's out as its data (the review's probe read another rank's private buffer, both sides
// reporting OK).
TEST(PeerMemory, AForgedDescriptorReadsNothing) {
  LeaseTable leases;
  const std::vector<uint8_t> lent = random_bytes(65536), secret = random_bytes(65536);
  LeaseTable::Slot* slot = leases.lend(lent.data(), lent.size(), 1);
  ASSERT_NE(slot, nullptr);
  std::vector<uint8_t> got(65536, 0);
  const uint64_t word = 0x1234;  // a word of the lender's that the forger knows
  auto refused = [&](PullDescriptor d, const LoanBounds& bounds) {
    std::fill(got.begin(), got.end(), 0);
    const Status s = pull(::getpid(), d, bounds, got.data(), got.size(), "rank 1");
    const bool read_secret = std::equal(got.begin(), got.end(), secret.begin());
    return !s.ok() && !read_secret ? ::testing::AssertionSuccess()
                                   : ::testing::AssertionFailure() << s << (read_secret ? " and the secret was read" : "");
  };
  PullDescriptor d = slot->descriptor;
  d.data = reinterpret_cast<uint64_t>(secret.data());  // the real slot, another buffer
  EXPECT_TRUE(refused(d, leases.bounds(1)));
  d = slot->descriptor;
  d.data = reinterpret_cast<uint64_t>(secret.data());
  d.lease = reinterpret_cast<uint64_t>(&word);  // a lease word outside the arena
  d.lease_value = word;
  EXPECT_TRUE(refused(d, leases.bounds(1)));
  d = slot->descriptor;
  d.lease += 8;  // inside the arena, not a slot's start
  EXPECT_TRUE(refused(d, leases.bounds(1)));
  EXPECT_TRUE(refused(slot->descriptor, leases.bounds(2)));  // lent to rank 1, pulled by rank 2
  LeaseTable::Slot* idle = leases.lend(secret.data(), secret.size(), 1);
  leases.release(idle);  // a slot lent before, its lease 0 now
  d = idle->descriptor;
  d.lease_value = 0;
  EXPECT_TRUE(refused(d, leases.bounds(1)));
  // The real one still reads.
  ASSERT_TRUE(pull(::getpid(), slot->descriptor, leases.bounds(1), got.data(), got.size(), "rank 1").ok());
  EXPECT_EQ(got, lent);
  leases.release(slot);
}

// Every slot lent: the next loan is refused (the sender's collective fails with
// ResourceExhausted), and a released slot lends again.
TEST(PeerMemory, TheLeaseArenaIsBounded) {
  LeaseTable leases;
  const uint8_t byte = 7;
  std::vector<LeaseTable::Slot*> slots;
  for (uint32_t i = 0; i < LeaseTable::kSlots; ++i) {
    slots.push_back(leases.lend(&byte, 1, 1));
    ASSERT_NE(slots.back(), nullptr);
  }
  EXPECT_EQ(leases.lend(&byte, 1, 1), nullptr);
  leases.release(slots.back());
  EXPECT_NE(leases.lend(&byte, 1, 1), nullptr);
}

// A sender frees its buffer only after it withdrew the loan: an unmapped buffer reads as a
// withdrawal (so the receiver waits for the sender's notice, which names the cause).
TEST(PeerMemory, AnUnmappedBufferIsAWithdrawal) {
  const size_t bytes = 1 << 20;
  // Allocated first: allocated after the munmap, it could land on the freed addresses.
  std::vector<uint8_t> got(bytes);
  void* region = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(region, MAP_FAILED);
  LeaseTable leases;
  LeaseTable::Slot* slot = leases.lend(region, bytes, 1);
  const PullDescriptor d = slot->descriptor;
  ::munmap(region, bytes);
  bool withdrawn = false;
  const Status s = pull(::getpid(), d, leases.bounds(1), got.data(), bytes, "rank 4", &withdrawn);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(withdrawn);
  EXPECT_NE(s.message().find("rank 4 withdrew the message"), std::string_view::npos) << s;
  leases.release(slot);
}

TEST(PeerMemory, AGoneProcessIsAnErrorNamingIt) {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  ASSERT_GT(child, 0);
  ::waitpid(child, nullptr, 0);  // reaped: its pid names nobody (until reused, which it is not so soon)
  LeaseTable leases;
  std::vector<uint8_t> data(65536), got(65536);
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size(), 1);
  const Status s = pull(child, slot->descriptor, leases.bounds(1), got.data(), got.size(), "rank 5 (127.0.0.1, pid 9)");
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("rank 5 (127.0.0.1, pid 9) failed: its process exited"), std::string_view::npos) << s;
  leases.release(slot);
}

TEST(PeerMemory, HostIdentity) {
  uint64_t words[2] = {};
  const HostIdentity me = this_process(words);
  EXPECT_TRUE(same_host(me, me));
  EXPECT_EQ(me.pid, static_cast<uint32_t>(::getpid()));
  EXPECT_EQ(me.challenge_words, reinterpret_cast<uint64_t>(words));
  HostIdentity other = me;
  other.pid_namespace += 1;  // another container: pids mean other processes
  EXPECT_FALSE(same_host(me, other));
}

// A child that stays alive until the returned pipe's write end is closed; `before` runs in it
// first, and the child says so on its own pipe before the parent goes on.
template <typename Before>
pid_t spawn_waiting_child(int* hold_fd, Before before) {
  int hold[2], ready[2];
  if (::pipe(hold) != 0 || ::pipe(ready) != 0) return -1;
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(hold[1]);
    ::close(ready[0]);
    before();
    char c = 'r';
    (void)!::write(ready[1], &c, 1);
    (void)!::read(hold[0], &c, 1);  // returns when the parent closes its end
    ::_exit(0);
  }
  ::close(hold[0]);
  ::close(ready[1]);
  char c = 0;
  (void)!::read(ready[0], &c, 1);
  ::close(ready[0]);
  *hold_fd = hold[1];
  return child;
}

TEST(PeerMemory, ChallengeAnswersAreBoundToTheNonceThePairAndTheGroup) {
  const Digest one = sha256("group one"), two = sha256("group two");
  const uint64_t base = challenge_answer(42, 2, 3, one);
  EXPECT_EQ(challenge_answer(42, 2, 3, one), base);
  EXPECT_NE(challenge_answer(43, 2, 3, one), base);
  EXPECT_NE(challenge_answer(42, 3, 2, one), base) << "the other direction of the pair";
  EXPECT_NE(challenge_answer(42, 2, 4, one), base) << "another receiver";
  EXPECT_NE(challenge_answer(42, 1, 3, one), base) << "another sender";
  EXPECT_NE(challenge_answer(42, 2, 3, two), base) << "another group's table";
  EXPECT_NE(challenge_answer(42, 2, 3, one), uint64_t{42}) << "the nonce itself";
  // The table's digest covers each payload and where it ends.
  BootstrapTable a, b;
  a.payloads = {"ab", "c"};
  b.payloads = {"a", "bc"};
  EXPECT_NE(table_digest(a), table_digest(b));
  EXPECT_EQ(table_digest(a), table_digest(a));
}

TEST(PeerMemory, OnlyThePeerHoldsTheAnswerToItsChallenge) {
  // The words are allocated before the forks, so the same address is valid in every process:
  // only the value tells the peer from a process whose pid a liar stated.
  const auto random = tutel::random_bytes(sizeof(uint64_t));
  ASSERT_TRUE(random.ok()) << random.status();
  uint64_t nonce = 0;
  std::memcpy(&nonce, random->data(), sizeof nonce);
  const Digest group = sha256("this group's table"), another_table = sha256("another group's table");
  const int me = 2, peer_rank = 3;
  std::vector<uint64_t> words(4, 0);
  // The peer received our nonce as rank 3 of our group and wrote its answer into word 2.
  int hold_peer = -1, hold_other_pair = -1, hold_other_group = -1, hold_raw = -1, hold_bystander = -1;
  const pid_t peer =
      spawn_waiting_child(&hold_peer, [&] { words[me] = challenge_answer(nonce, me, peer_rank, group); });
  // Processes a liar could name, holding what a relay can put there: the answer to the same
  // nonce for another pair or in another group, or the raw nonce; and one holding nothing.
  const pid_t other_pair =
      spawn_waiting_child(&hold_other_pair, [&] { words[me] = challenge_answer(nonce, me, 1, group); });
  const pid_t other_group =
      spawn_waiting_child(&hold_other_group, [&] { words[me] = challenge_answer(nonce, me, peer_rank, another_table); });
  const pid_t raw = spawn_waiting_child(&hold_raw, [&] { words[me] = nonce; });
  const pid_t bystander = spawn_waiting_child(&hold_bystander, [] {});
  for (pid_t child : {peer, other_pair, other_group, raw, bystander}) ASSERT_GT(child, 0);

  const uint64_t expected = challenge_answer(nonce, me, peer_rank, group);
  HostIdentity named = this_process(words.data());
  auto read_from = [&](pid_t pid) {
    named.pid = static_cast<uint32_t>(pid);
    return read_challenge_word(named, me);
  };
  EXPECT_EQ(read_from(peer), std::optional<uint64_t>(expected));
  for (pid_t liar : {other_pair, other_group, raw, bystander, ::getpid()}) {
    SCOPED_TRACE("pid " + std::to_string(liar));
    const std::optional<uint64_t> word = read_from(liar);
    ASSERT_TRUE(word.has_value());  // readable: the same user
    EXPECT_NE(*word, expected);
  }
  named.pid = static_cast<uint32_t>(peer);
  EXPECT_NE(read_challenge_word(named, 1), std::optional<uint64_t>(expected)) << "another rank's word";
  HostIdentity unmapped = named;
  unmapped.challenge_words = 8;  // page 0
  EXPECT_EQ(read_challenge_word(unmapped, me), std::nullopt);
  unmapped.challenge_words = ~uint64_t{0} - 7;  // wraps past the top for rank 2
  EXPECT_EQ(read_challenge_word(unmapped, me), std::nullopt);

  for (int fd : {hold_peer, hold_other_pair, hold_other_group, hold_raw, hold_bystander}) ::close(fd);
  for (pid_t child : {peer, other_pair, other_group, raw, bystander}) ::waitpid(child, nullptr, 0);
  EXPECT_EQ(read_challenge_word(named, me), std::nullopt) << "a gone process";
}

}  // namespace
}  // namespace tutel::comm::ucx
