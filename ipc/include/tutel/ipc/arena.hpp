// The session arena: one memfd created by the daemon, sealed against shrink and grow, mapped by
// the daemon and (after SCM_RIGHTS) by exactly one client. Nothing is named under /dev/shm.
// Thread-safety: an Arena is owned by one session; its memory is shared by design.
#pragma once

#include <cstdint>

#include "tutel/core/status.hpp"
#include "tutel/ipc/protocol.hpp"

namespace tutel::ipc {

// An owned file descriptor (closed on destruction). Move-only.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& o) noexcept : fd_(o.release()) {}
  UniqueFd& operator=(UniqueFd&& o) noexcept;
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }
  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release() { int f = fd_; fd_ = -1; return f; }
  void reset(int fd = -1);

 private:
  int fd_ = -1;
};

class Arena {
 public:
  Arena() = default;
  Arena(Arena&&) noexcept;
  Arena& operator=(Arena&&) noexcept;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena();

  // Daemon side: creates, sizes, seals and maps a new arena, and writes its header and rings.
  static Result<Arena> create(uint64_t arena_bytes, const char* debug_name);
  // Client side: maps an arena received over the socket; checks the seals, the size and the header.
  static Result<Arena> attach(UniqueFd fd);

  int fd() const { return fd_.get(); }
  uint8_t* base() const { return base_; }
  const ArenaLayout& layout() const { return layout_; }
  RingControl* request_control() const;
  RequestDescriptor* request_slots() const;
  RingControl* completion_control() const;
  CompletionDescriptor* completion_slots() const;
  uint8_t* data() const { return base_ + layout_.data_offset; }

 private:
  UniqueFd fd_;
  uint8_t* base_ = nullptr;
  ArenaLayout layout_{};
};

}  // namespace tutel::ipc
