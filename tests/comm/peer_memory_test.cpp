// Peer memory's pieces in one process (process_vm_readv on our own pid works like on a
// neighbour's): a loan is read exactly; a withdrawn loan, a wrong size, a foreign message and a
// gone process are errors, and nothing is copied from a withdrawn loan that could be mistaken
// for data. The protocol between processes runs in every multi-process comm test (chunks of
// 64 KiB and more are pulled; `peers()` says so).
#include "peer_memory.hpp"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

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

TEST(PeerMemory, HostIdentityAndProbe) {
  const uint64_t probe = 0x1234'5678'9abc'def1ULL;
  const HostIdentity me = this_process(&probe);
  EXPECT_TRUE(same_host(me, me));
  EXPECT_TRUE(can_read(me));
  HostIdentity other = me;
  other.pid_namespace += 1;  // another container: pids mean other processes
  EXPECT_FALSE(same_host(me, other));
  HostIdentity wrong_probe = me;
  wrong_probe.probe_value ^= 1;  // a pid that is not the process it claims to be
  EXPECT_FALSE(can_read(wrong_probe));
}

}  // namespace
}  // namespace tutel::comm::ucx
