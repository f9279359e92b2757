#include "peer_memory.hpp"

#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <fstream>
#include <random>

namespace tutel::comm::ucx {
namespace {

constexpr uint64_t kDescriptorMagic = 0x54555445'4C50554CULL;  // "TUTELPUL"

}  // namespace

HostIdentity this_process(const uint64_t* challenge_words) {
  HostIdentity id;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string text;
  if (boot >> text) std::strncpy(id.boot_id, text.c_str(), sizeof id.boot_id - 1);
  struct stat ns{};
  if (::stat("/proc/self/ns/pid", &ns) == 0) id.pid_namespace = static_cast<uint64_t>(ns.st_ino);
  id.pid = static_cast<uint32_t>(::getpid());
  id.challenge_words = reinterpret_cast<uint64_t>(challenge_words);
  return id;
}

bool same_host(const HostIdentity& a, const HostIdentity& b) {
  return a.boot_id[0] != '\0' && a.pid_namespace != 0 &&
         std::strncmp(a.boot_id, b.boot_id, sizeof a.boot_id) == 0 && a.pid_namespace == b.pid_namespace;
}

uint64_t challenge_answer(uint64_t nonce, int sender, int receiver, const Digest& table) {
  const int64_t pair[2] = {sender, receiver};
  Sha256 h;
  h.update("tutel peer-memory challenge");
  h.update(&nonce, sizeof nonce).update(pair, sizeof pair).update(table.data(), table.size());
  const Digest d = h.finish();
  uint64_t answer = 0;
  std::memcpy(&answer, d.data(), sizeof answer);
  return answer;
}

Digest table_digest(const BootstrapTable& table) {
  Sha256 h;
  for (const std::string& payload : table.payloads) {
    const uint64_t bytes = payload.size();  // lengths too: no two tables hash alike by regrouping
    h.update(&bytes, sizeof bytes).update(payload);
  }
  return h.finish();
}

std::optional<uint64_t> read_challenge_word(const HostIdentity& peer, int my_rank) {
  uint64_t value = 0;
  iovec local{&value, sizeof value};
  // Unsigned arithmetic: a stated address near the top wraps to another wrong address, which
  // at worst reads as unreadable or as a wrong answer.
  iovec remote{reinterpret_cast<void*>(peer.challenge_words + uint64_t{sizeof value} * static_cast<uint64_t>(my_rank)),
               sizeof value};
  const ssize_t n = ::process_vm_readv(static_cast<pid_t>(peer.pid), &local, 1, &remote, 1, 0);
  if (n != static_cast<ssize_t>(sizeof value)) return std::nullopt;
  return value;
}

static_assert(offsetof(LeaseTable::Slot, lease) == 0 && offsetof(LeaseTable::Slot, descriptor) == sizeof(uint64_t),
              "a puller reads a slot's lease word and its descriptor's copy as one block");

LeaseTable::LeaseTable() : slots_(std::make_unique<Slot[]>(kSlots)), next_value_(std::random_device{}()) {
  free_.reserve(kSlots);
  for (uint32_t i = kSlots; i > 0; --i) free_.push_back(&slots_[i - 1]);
}

LeaseTable::Slot* LeaseTable::lend(const void* data, size_t bytes, int receiver) {
  if (free_.empty()) return nullptr;
  Slot* slot = free_.back();
  free_.pop_back();
  slot->busy = true;
  if (++next_value_ == 0) ++next_value_;  // 0 is a withdrawn loan's
  const uint64_t value = next_value_;
  slot->descriptor = PullDescriptor{kDescriptorMagic,  reinterpret_cast<uint64_t>(data),
                                    bytes,             reinterpret_cast<uint64_t>(&slot->lease),
                                    value,             static_cast<uint64_t>(receiver)};
  slot->lease.store(value, std::memory_order_seq_cst);
  return slot;
}

void LeaseTable::withdraw(Slot* slot) {
  // seq_cst: the withdrawal is visible before the caller gets its buffer back.
  slot->lease.store(0, std::memory_order_seq_cst);
}

void LeaseTable::release(Slot* slot) {
  withdraw(slot);
  slot->busy = false;
  free_.push_back(slot);
}

bool is_pull_descriptor(const void* data, size_t bytes) {
  uint64_t magic = 0;
  if (bytes != sizeof(PullDescriptor)) return false;
  std::memcpy(&magic, data, sizeof magic);
  return magic == kDescriptorMagic;
}

namespace {

// What a puller reads of a lender's slot: its lease word, then its copy of the descriptor.
struct SlotImage {
  uint64_t lease = 0;
  PullDescriptor copy;
};
static_assert(sizeof(SlotImage) == sizeof(uint64_t) + sizeof(PullDescriptor));

// The slot as read, before (`after_data` false) or after the data: the loan must still stand and
// the slot hold the very descriptor that was sent.
Status check_slot(const SlotImage& slot, const PullDescriptor& d, const std::string& who, bool* withdrawn,
                  bool after_data) {
  if (slot.lease != d.lease_value) {
    if (withdrawn != nullptr) *withdrawn = true;
    return Status::Unavailable(who + " withdrew the message before it was read (it gave up on the collective)");
  }
  if (std::memcmp(&slot.copy, &d, sizeof d) != 0)
    return Status::Corruption(who + " sent a pull descriptor its lease slot does not hold (a forged message); " +
                              (after_data ? "what was read is not its message" : "nothing was read"));
  return Status::OK();
}

// A failed process_vm_readv (err 0: a short read) of `what` ("its lease slot", "the message from
// its memory"). The message's buffer may be gone, the slot never: the arena lives as long as the
// lender's rank.
Status read_failure(int err, const std::string& who, const char* what, bool* withdrawn, bool reading_message) {
  if (err == ESRCH) return Status::Unavailable(who + " failed: its process exited (process_vm_readv: no such process)");
  // The sender frees a buffer only after it returned from the collective, which it does only
  // after withdrawing the loan: an unmapped buffer is a withdrawn one.
  if (err == EFAULT && reading_message) {
    if (withdrawn != nullptr) *withdrawn = true;
    return Status::Unavailable(who + " withdrew the message before it was read (its buffer is gone: it gave up "
                                     "on the collective)");
  }
  return Status::Unavailable(who + ": cannot read " + what + " (process_vm_readv: " +
                             (err == 0 ? std::string("short read") : std::string(std::strerror(err))) + ")");
}

}  // namespace

Status pull(pid_t pid, const PullDescriptor& d, const LoanBounds& bounds, void* dst, size_t expected,
            const std::string& who, bool* withdrawn) {
  if (d.magic != kDescriptorMagic)
    return Status::InvalidArgument(who + " sent a message that is not a pull descriptor: the ranks called the "
                                         "collective with different sizes");
  if (d.bytes != expected)
    return Status::InvalidArgument(who + " offered " + std::to_string(d.bytes) + " bytes where " +
                                   std::to_string(expected) +
                                   " were expected: the ranks called the collective with different sizes");
  // Nothing is read that the lender did not lend to this rank: its slot must be one of its lease
  // arena's (announced in the challenged bootstrap), the loan this rank's, and the slot's own copy
  // of the descriptor (read below with the lease word) the one sent. A descriptor anyone can send
  // on the pair's tag named any address of the lender's, which this rank copied out as its data.
  const uint64_t arena_bytes = uint64_t{bounds.slots} * sizeof(LeaseTable::Slot);
  if (d.receiver != static_cast<uint64_t>(bounds.receiver) || d.lease_value == 0 || d.lease < bounds.arena ||
      d.lease - bounds.arena >= arena_bytes || (d.lease - bounds.arena) % sizeof(LeaseTable::Slot) != 0)
    return Status::Corruption(who + " sent a pull descriptor that names no loan of its to this rank (another "
                                    "build, or a forged message); nothing was read");
  SlotImage slot;
  // The slot first: its copy of the descriptor is checked before anything it names is read (then
  // read again after the data, so that a loan withdrawn meanwhile is seen).
  {
    iovec l{&slot, sizeof slot}, r{reinterpret_cast<void*>(d.lease), sizeof slot};
    ssize_t n;
    do n = ::process_vm_readv(pid, &l, 1, &r, 1, 0);
    while (n < 0 && errno == EINTR);
    if (n != static_cast<ssize_t>(sizeof slot)) return read_failure(n < 0 ? errno : 0, who, "its lease slot", withdrawn, false);
    TUTEL_RETURN_IF_ERROR(check_slot(slot, d, who, withdrawn, false));
  }
  size_t done = 0;
  // process_vm_readv may stop short (it copies at most IOV_MAX pages' worth per call on some
  // kernels); continue where it stopped. The slot always comes last.
  while (done < expected + sizeof slot) {
    iovec l[2], r[2];
    int count = 0;
    if (done < expected) {
      l[count] = {static_cast<char*>(dst) + done, expected - done};
      r[count] = {reinterpret_cast<char*>(d.data) + done, expected - done};
      ++count;
    }
    const size_t in_slot = done > expected ? done - expected : 0;
    l[count] = {reinterpret_cast<char*>(&slot) + in_slot, sizeof slot - in_slot};
    r[count] = {reinterpret_cast<char*>(d.lease) + in_slot, sizeof slot - in_slot};
    ++count;
    const ssize_t n = ::process_vm_readv(pid, l, static_cast<unsigned long>(count), r,
                                         static_cast<unsigned long>(count), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return read_failure(errno, who, "the message from its memory", withdrawn, true);
    if (n == 0) return Status::Unavailable(who + ": process_vm_readv made no progress");
    done += static_cast<size_t>(n);
  }
  return check_slot(slot, d, who, withdrawn, true);
}

}  // namespace tutel::comm::ucx
