// Peer memory's pieces in one process (process_vm_readv on our own pid works like on a
// neighbour's): a loan is read exactly; a withdrawn loan, a wrong size, a foreign message and a
// gone process are errors, and nothing is copied from a withdrawn loan that could be mistaken
// for data; only the process that received a challenge's nonce answers it. The protocol
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
    LeaseTable::Slot* slot = leases.lend(data.data(), data.size());
    std::vector<uint8_t> got(bytes, 0);
    ASSERT_TRUE(pull(::getpid(), slot->descriptor, got.data(), bytes, "rank 1").ok());
    EXPECT_EQ(got, data);
    leases.release(slot);
  }
}

TEST(PeerMemory, AWithdrawnLoanFailsAndSlotsAreReusedWithFreshLeases) {
  LeaseTable leases;
  std::vector<uint8_t> data = random_bytes(65536), got(65536, 0);
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size());
  const PullDescriptor late = slot->descriptor;  // what a slow receiver holds
  leases.release(slot);
  bool withdrawn = false;
  Status s = pull(::getpid(), late, got.data(), got.size(), "rank 3 (127.0.0.1, pid 1)", &withdrawn);
  EXPECT_EQ(s.code(), StatusCode::kUnavailable);
  EXPECT_TRUE(withdrawn);
  EXPECT_NE(s.message().find("rank 3 (127.0.0.1, pid 1) withdrew the message"), std::string_view::npos) << s;
  // The slot lends again, to another buffer: the old descriptor still fails (its lease value is
  // not the new one), the new one reads the new buffer.
  std::vector<uint8_t> other = random_bytes(65536);
  LeaseTable::Slot* again = leases.lend(other.data(), other.size());
  EXPECT_EQ(again, slot);
  EXPECT_FALSE(pull(::getpid(), late, got.data(), got.size(), "rank 3").ok());
  ASSERT_TRUE(pull(::getpid(), again->descriptor, got.data(), got.size(), "rank 3").ok());
  EXPECT_EQ(got, other);
}

TEST(PeerMemory, SizesThatDisagreeAndForeignMessagesAreErrors) {
  LeaseTable leases;
  std::vector<uint8_t> data = random_bytes(100000), got(200000, 0);
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size());
  Status s = pull(::getpid(), slot->descriptor, got.data(), 200000, "rank 2");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("different sizes"), std::string_view::npos) << s;
  EXPECT_TRUE(std::all_of(got.begin(), got.end(), [](uint8_t b) { return b == 0; }));
  PullDescriptor foreign = slot->descriptor;
  foreign.magic ^= 1;
  s = pull(::getpid(), foreign, got.data(), 100000, "rank 2");
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  leases.release(slot);
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
  LeaseTable::Slot* slot = leases.lend(region, bytes);
  const PullDescriptor d = slot->descriptor;
  ::munmap(region, bytes);
  bool withdrawn = false;
  const Status s = pull(::getpid(), d, got.data(), bytes, "rank 4", &withdrawn);
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
  LeaseTable::Slot* slot = leases.lend(data.data(), data.size());
  const Status s = pull(child, slot->descriptor, got.data(), got.size(), "rank 5 (127.0.0.1, pid 9)");
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

TEST(PeerMemory, OnlyTheProcessThatReceivedTheNonceAnswersTheChallenge) {
  // The words are allocated before the forks, so the same address is valid in every process:
  // only the value tells the peer from a process whose pid a liar stated.
  const auto random = tutel::random_bytes(sizeof(uint64_t));
  ASSERT_TRUE(random.ok()) << random.status();
  uint64_t nonce = 0;
  std::memcpy(&nonce, random->data(), sizeof nonce);
  nonce |= 1;  // never the words' initial 0
  std::vector<uint64_t> words(4, 0);
  const int my_rank = 2;
  int hold_peer = -1, hold_bystander = -1;
  const pid_t peer = spawn_waiting_child(&hold_peer, [&] { words[my_rank] = nonce; });
  const pid_t bystander = spawn_waiting_child(&hold_bystander, [] {});
  ASSERT_GT(peer, 0);
  ASSERT_GT(bystander, 0);

  HostIdentity honest = this_process(words.data());
  honest.pid = static_cast<uint32_t>(peer);
  EXPECT_EQ(read_challenge(honest, my_rank, nonce), ChallengeAnswer::kHeld);
  EXPECT_EQ(read_challenge(honest, my_rank, nonce ^ 1), ChallengeAnswer::kNotHeld) << "another nonce";
  EXPECT_EQ(read_challenge(honest, 1, nonce), ChallengeAnswer::kNotHeld) << "another rank's word";

  HostIdentity liar = honest;  // the peer states the bystander's pid
  liar.pid = static_cast<uint32_t>(bystander);
  EXPECT_EQ(read_challenge(liar, my_rank, nonce), ChallengeAnswer::kNotHeld);
  liar.pid = static_cast<uint32_t>(::getpid());  // or ours: we never wrote the nonce into our words
  EXPECT_EQ(read_challenge(liar, my_rank, nonce), ChallengeAnswer::kNotHeld);

  HostIdentity unmapped = honest;
  unmapped.challenge_words = 8;  // page 0
  EXPECT_EQ(read_challenge(unmapped, my_rank, nonce), ChallengeAnswer::kUnreadable);
  unmapped.challenge_words = ~uint64_t{0} - 7;  // wraps past the top for rank 2
  EXPECT_EQ(read_challenge(unmapped, my_rank, nonce), ChallengeAnswer::kUnreadable);

  ::close(hold_peer);
  ::close(hold_bystander);
  ::waitpid(peer, nullptr, 0);
  ::waitpid(bystander, nullptr, 0);
  EXPECT_EQ(read_challenge(honest, my_rank, nonce), ChallengeAnswer::kUnreadable) << "a gone process";
}

}  // namespace
}  // namespace tutel::comm::ucx
