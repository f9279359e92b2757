// The session arena: one memfd created by the daemon, sealed against shrink and grow, mapped by
// the daemon and (after SCM_RIGHTS) by exactly one client. Nothing is named under /dev/shm.
// Thread-safety: an Arena is owned by one session; its memory is shared by design.
#pragma once

#include <cstdint>

#include "tutel/core/shared_memory.hpp"
#include "tutel/core/status.hpp"
#include "tutel/ipc/protocol.hpp"

namespace tutel::ipc {

using tutel::UniqueFd;

class Arena {
 public:
  Arena() = default;

  // Daemon side: creates, sizes, seals and maps a new arena, and writes its header and rings.
  static Result<Arena> create(uint64_t arena_bytes);
  // Client side: maps an arena received over the socket; checks the seals, the size (exactly
  // `expected_bytes`, the hello reply's arena_bytes, before mapping anything) and the header.
  static Result<Arena> attach(UniqueFd fd, uint64_t expected_bytes);

  int fd() const { return memory_.fd(); }
  uint8_t* base() const { return memory_.data(); }
  const ArenaLayout& layout() const { return layout_; }
  RingControl* request_control() const;
  RequestDescriptor* request_slots() const;
  RingControl* completion_control() const;
  CompletionDescriptor* completion_slots() const;
  uint8_t* data() const { return base() + layout_.data_offset; }
  // Frees the arena's pages now (SharedMemory::discard_pages): daemon side, once the client is
  // gone and can read nothing more from it.
  void discard_pages() { memory_.discard_pages(); }

 private:
  SharedMemory memory_;
  ArenaLayout layout_{};
};

}  // namespace tutel::ipc
