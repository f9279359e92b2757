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
// the same process), both sides willing, and a challenge: each side sends the other a fresh
// nonce over UCX; the receiver writes into its challenge word for the sender a hash of the
// nonce bound to the pair and the group (challenge_answer: sender, receiver, the digest of the
// bootstrap table), and each side then reads that word out of the process the peer's identity
// names and compares it with the answer it computes itself, after the read. The read proves
// ptrace permission, and the value proves that the named process is the peer: a rank that
// states another process's pid (one joined without a peer secret, or a coordinator that hands
// out a forged table) cannot make that process hold the answer. It cannot relay the nonce into
// the words that process keeps for its own groups either, since those hold answers bound to
// another pair and another table; and the reader's own memory holds no answer before its read,
// so naming the reader's pid fails too (it is refused outright anyway). Nothing is ever pulled
// from a process that is not the sender.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <memory>
#include <vector>

#include "tutel/comm/bootstrap.hpp"
#include "tutel/core/secret.hpp"
#include "tutel/core/status.hpp"

namespace tutel::comm::ucx {

// Messages of at least this many bytes are pulled; smaller ones go through UCX.
inline constexpr size_t kPullMinBytes = kPeerMemoryMinBytes;

// What identifies a process across the ranks of one host.
struct HostIdentity {
  char boot_id[40] = {};  // /proc/sys/kernel/random/boot_id
  uint64_t pid_namespace = 0;
  uint32_t pid = 0;
  uint32_t lease_slots = 0;  // how many slots its LeaseTable has, at lease_arena
  uint64_t challenge_words = 0;  // address of one word per rank: the answer to rank r's nonce in word r
  uint64_t lease_arena = 0;      // address of its LeaseTable's slots: the only place its loans are
};

// This process, its challenge words at `challenge_words` (which must stay alive while peers
// may read them).
HostIdentity this_process(const uint64_t* challenge_words);
// Same boot and pid namespace: pids name the same processes. False when either is unknown.
bool same_host(const HostIdentity& a, const HostIdentity& b);

// What a challenge word holds once rank `receiver` received `nonce` from rank `sender` of the
// group whose bootstrap table has digest `table` (table_digest): the first 8 bytes of a SHA-256
// over all four.
uint64_t challenge_answer(uint64_t nonce, int sender, int receiver, const Digest& table);
// The digest every rank of a group computes over its bootstrap table: each rank's payload
// (worker address, host identity), in rank order.
Digest table_digest(const BootstrapTable& table);
// Word `my_rank` of `peer`'s challenge words, read out of the process `peer.pid`; none when that
// process cannot be read (Yama, a container, or it is gone).
std::optional<uint64_t> read_challenge_word(const HostIdentity& peer, int my_rank);

// Sent instead of the data.
struct PullDescriptor {
  uint64_t magic = 0;
  uint64_t data = 0;  // the sender's buffer
  uint64_t bytes = 0;
  uint64_t lease = 0;        // address of the lease slot in the sender (in its lease arena)
  uint64_t lease_value = 0;  // what its lease word holds while the buffer is lent; never 0
  uint64_t receiver = 0;     // the rank it is lent to
};

// Where a lender's loans can be (its HostIdentity's lease arena) and who is pulling: a
// descriptor naming anything else is refused before anything is read.
struct LoanBounds {
  uint64_t arena = 0;
  uint32_t slots = 0;
  int receiver = -1;
};

// Whether a message of `bytes` at `data` is a PullDescriptor (its size and magic). A receive of
// plain bytes gets one where the sender called the collective with a size large enough to be
// pulled and the receiver with exactly sizeof(PullDescriptor): without this check the receiver
// would return the descriptor as its data. Plain data that happens to be 48 bytes starting with
// the magic ("TUTELPUL") reads as one too: a 2^-64 chance for arbitrary bytes.
bool is_pull_descriptor(const void* data, size_t bytes);

// The sender's leases and descriptors, in a fixed arena of slots (peers read them; its address
// and size go in the bootstrap payload, so a puller reads nothing a descriptor names outside
// it). A slot holds its lease word and, right after it, a copy of its descriptor, which the
// puller compares with the one it was sent: a descriptor forged by anyone who can send UCX
// messages names memory this process never lent, and is refused.
// Not thread-safe: the owning rank's mutex guards it.
class LeaseTable {
 public:
  struct Slot {
    std::atomic<uint64_t> lease{0};
    PullDescriptor descriptor;  // right after the lease word: a puller reads both at once
    bool busy = false;
  };
  // More than a rank ever lends at once (one per peer and piece of its collectives in flight).
  static constexpr uint32_t kSlots = 4096;
  LeaseTable();
  // A slot lending `bytes` at `data` to rank `receiver`, its descriptor filled in; null when
  // every slot is lent.
  Slot* lend(const void* data, size_t bytes, int receiver);
  // Where the slots are: for this process's HostIdentity, and (in tests) a puller's bounds.
  uint64_t arena() const { return reinterpret_cast<uint64_t>(slots_.get()); }
  LoanBounds bounds(int receiver) const { return {arena(), kSlots, receiver}; }
  // Withdraws the loan: a read from now on sees 0 and fails. The slot stays taken (a pending
  // send may still read its descriptor).
  static void withdraw(Slot* slot);
  // Withdraws the loan and frees the slot: no request reads its descriptor any more.
  void release(Slot* slot);

 private:
  std::unique_ptr<Slot[]> slots_;  // kSlots, never moved
  std::vector<Slot*> free_;
  uint64_t next_value_;  // random start, so that a lease value says nothing about the count
};

// Copies the message `d` describes from process `pid` into `dst` (`expected` bytes), then
// checks its lease. `who` names the sender in errors. *withdrawn (if given) is set when the
// failure is the sender's withdrawal: it gave up on the collective, and its notice, which names
// the cause, is probably on its way.
Status pull(pid_t pid, const PullDescriptor& d, const LoanBounds& bounds, void* dst, size_t expected,
            const std::string& who, bool* withdrawn = nullptr);

}  // namespace tutel::comm::ucx
