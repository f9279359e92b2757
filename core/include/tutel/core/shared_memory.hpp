// Memory shared between processes of one host by passing a file descriptor (SCM_RIGHTS), never
// by a name under /dev/shm: a memfd, sized once and sealed against shrink and grow, so the
// process that receives it cannot truncate it under the other and crash it with SIGBUS.
//
// Used by the session arena (ipc/) and by the CPU backend's shareable memory (kernels/).
// Thread-safety: values; the mapped memory is shared by design.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel {

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
  int release() {
    const int f = fd_;
    fd_ = -1;
    return f;
  }
  // Closes the descriptor held (never retried: Linux frees the fd even on EINTR) and holds `fd`.
  void reset(int fd = -1);
  // Closes now and returns close()'s errno (0 on success): for a written file, the first sign of
  // a failed write-back.
  int close();

 private:
  int fd_ = -1;
};

// A memfd mapped MAP_SHARED for reading and writing, unmapped on destruction (the fd is kept, so
// the memory can be handed to another process). Move-only.
class SharedMemory {
 public:
  SharedMemory() = default;
  SharedMemory(SharedMemory&& o) noexcept { *this = std::move(o); }
  SharedMemory& operator=(SharedMemory&& o) noexcept;
  SharedMemory(const SharedMemory&) = delete;
  SharedMemory& operator=(const SharedMemory&) = delete;
  ~SharedMemory();

  // Creates a memfd of `bytes` (> 0; rounded up to whole pages), seals it against shrink, grow
  // and further seals, and maps it with every page faulted in now rather than on first touch.
  // `what` names it in error messages and in /proc/<pid>/fd ("session arena").
  static Result<SharedMemory> create(size_t bytes, std::string_view what);
  // Maps a memfd received from another process: refuses anything that is not a regular file of
  // exactly `expected_bytes` (what the peer announced), sealed against shrink and grow. The size
  // is checked before anything is mapped: the peer chooses it, and mapping faults every page in.
  // `what` names it in error messages ("the arena memfd").
  static Result<SharedMemory> attach(UniqueFd fd, std::string_view what, size_t expected_bytes);

  uint8_t* data() const { return data_; }
  // Frees the pages now, whoever else maps or holds the memfd: for memory lent to another
  // process whose loan has ended (a session arena once its client hung up, a device region its
  // client unmapped), which that process could otherwise keep, at this process's charge, for as
  // long as it keeps the descriptor. Every mapping stays valid and reads zeros; pages written
  // later belong to whoever writes them. Only when no one may still read what it held.
  void discard_pages();
  size_t bytes() const { return bytes_; }
  int fd() const { return fd_.get(); }
  // Hands the descriptor over (the mapping stays): for memory passed to another process, so this
  // side holds no descriptor per mapping.
  UniqueFd take_fd() { return std::move(fd_); }

 private:
  // Maps all `size` bytes of `fd` shared, read-write, faulted in; `what` names it in errors.
  static Result<SharedMemory> map(UniqueFd fd, size_t size, const std::string& what);
  void unmap() noexcept;

  UniqueFd fd_;
  uint8_t* data_ = nullptr;
  size_t bytes_ = 0;
};

// The size of a page of mapped memory.
size_t page_bytes();

// A new, empty memfd that may be sealed (MFD_ALLOW_SEALING), closed on exec, with an exec policy
// where the kernel has one; `what` names it in /proc/<pid>/fd and in the error.
Result<UniqueFd> create_memfd(std::string_view what);

// OK when `fd` is a regular file in ordinary memory (tmpfs or shmem: a memfd without
// MFD_HUGETLB), else InvalidArgument naming `what`. Such a file never blocks a read or a write,
// as one on a network or FUSE mount can. A mapping of it can still fault: past its end, or at
// a hole when no page can be had for it (strict overcommit), and a hugetlb file's even so.
Status check_memory_file(int fd, std::string_view what);

// The offset of the first hole in the file `fd` (its size where it has none: SEEK_HOLE), with
// the descriptor's offset, shared with whoever sent it, left as it was. To SEEK_HOLE a page
// that fallocate reserved in a memfd is a hole until it is written.
Result<uint64_t> first_hole(int fd);

}  // namespace tutel
