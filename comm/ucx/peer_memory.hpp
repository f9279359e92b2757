// Peer memory: large messages between processes of one host, copied by the receiver straight
// out of the sender's memory (process_vm_readv), with UCX carrying only a small descriptor one
// way and an acknowledgement back.
//
// Why not UCX's own shared-memory transports: in UCX 1.13 they do not support peer-failure
// handling (UCP_ERR_HANDLING_MODE_PEER), and without it a dead peer is a hang or undefined
// behaviour (comm/README.md). Here the control messages keep going over UCX with peer-failure
// handling, so a dead peer is still an error naming it; the copy itself is a system call whose
// failure (ESRCH: the sender is gone) is an ordinary error.
//
// Safety when a collective is abandoned: the sender lends its buffer under a *lease*, a word in
// its own memory that holds a fresh value while the buffer is lent and 0 once it is withdrawn.
// The receiver reads the data and then the lease in one process_vm_readv (the kernel copies the
// iovecs in order); a valid lease proves that the buffer was still lent when the data was read.
// A sender that gives up withdraws its leases before it returns, so a late reader gets an error,
// never the caller's reused buffer.
//
// Who may pull from whom is settled at bootstrap: same boot and pid namespace (so a pid names
// the same process), and a challenge: each side sends the other a fresh nonce over UCX, the
// other receives it into its challenge word for that rank, and each side then reads that word
// out of the process the peer's identity names. The read proves ptrace permission, and the
// value proves that the named process is the peer: a process that states another's pid (a
// rank joined without a peer secret, or a coordinator that hands out a forged table) cannot
// place the nonce in that process's memory, so nothing is ever pulled from a process that is
// not the sender.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <deque>
#include <string>
#include <vector>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::ucx {

// Messages of at least this many bytes are pulled; smaller ones go through UCX.
inline constexpr size_t kPullMinBytes = kPeerMemoryMinBytes;

// What identifies a process across the ranks of one host.
struct HostIdentity {
  char boot_id[40] = {};  // /proc/sys/kernel/random/boot_id
  uint64_t pid_namespace = 0;
  uint32_t pid = 0;
  uint32_t unused = 0;
  uint64_t challenge_words = 0;  // address of one word per rank: rank r's nonce lands in word r
};

// This process, its challenge words at `challenge_words` (which must stay alive while peers
// may read them).
HostIdentity this_process(const uint64_t* challenge_words);
// Same boot and pid namespace: pids name the same processes. False when either is unknown.
bool same_host(const HostIdentity& a, const HostIdentity& b);

// What reading our nonce back out of the process a peer's identity names showed.
enum class ChallengeAnswer {
  kHeld,        // the process holds it: it is the peer, and we may read its memory
  kUnreadable,  // we may not read that process (Yama, a container, or it is gone)
  kNotHeld,     // readable, but not holding it: the identity names another process
};
// Reads word `my_rank` of `peer`'s challenge words in the process `peer.pid` and compares it
// with `nonce`, the value we sent that peer (and that it said it received).
ChallengeAnswer read_challenge(const HostIdentity& peer, int my_rank, uint64_t nonce);

// Sent instead of the data.
struct PullDescriptor {
  uint64_t magic = 0;
  uint64_t data = 0;  // the sender's buffer
  uint64_t bytes = 0;
  uint64_t lease = 0;        // address of the lease word in the sender
  uint64_t lease_value = 0;  // what it holds while the buffer is lent
};

// Whether a message of `bytes` at `data` is a PullDescriptor (its size and magic). A receive of
// plain bytes gets one where the sender called the collective with a size large enough to be
// pulled and the receiver with exactly sizeof(PullDescriptor): without this check the receiver
// would return the descriptor as its data. Plain data that happens to be 40 bytes starting with
// the magic ("TUTELPUL") reads as one too: a 2^-64 chance for arbitrary bytes.
bool is_pull_descriptor(const void* data, size_t bytes);

// The sender's leases and descriptors, in slots whose addresses never change (peers read them).
// Not thread-safe: the owning rank's mutex guards it.
class LeaseTable {
 public:
  struct Slot {
    std::atomic<uint64_t> lease{0};
    PullDescriptor descriptor;
    bool busy = false;
  };
  // A slot lending `bytes` at `data`, its descriptor filled in.
  Slot* lend(const void* data, size_t bytes);
  // Withdraws the loan: a read from now on sees 0 and fails. The slot stays taken (a pending
  // send may still read its descriptor).
  static void withdraw(Slot* slot);
  // Withdraws the loan and frees the slot: no request reads its descriptor any more.
  void release(Slot* slot);

 private:
  std::deque<Slot> slots_;  // a deque never moves its elements
  std::vector<Slot*> free_;
  uint64_t next_value_ = 1;
};

// Copies the message `d` describes from process `pid` into `dst` (`expected` bytes), then
// checks its lease. `who` names the sender in errors. *withdrawn (if given) is set when the
// failure is the sender's withdrawal: it gave up on the collective, and its notice, which names
// the cause, is probably on its way.
Status pull(pid_t pid, const PullDescriptor& d, void* dst, size_t expected, const std::string& who,
            bool* withdrawn = nullptr);

}  // namespace tutel::comm::ucx
