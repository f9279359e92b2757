#include "tutel/ipc/arena.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>
#include <string>
#include <utility>

namespace tutel::ipc {
namespace {

// Linux ≥ 6.3 warns about memfds created without an exec policy; older kernels reject the flag.
constexpr unsigned kMfdNoexecSeal = 0x0008U;
constexpr int kRequiredSeals = F_SEAL_SHRINK | F_SEAL_GROW;

std::string errno_text(int err) { return std::strerror(err); }

}  // namespace

UniqueFd& UniqueFd::operator=(UniqueFd&& o) noexcept {
  if (this != &o) reset(o.release());
  return *this;
}

void UniqueFd::reset(int fd) {
  if (fd_ >= 0 && fd_ != fd) ::close(fd_);  // never retried: Linux frees the fd even on EINTR
  fd_ = fd;
}

Arena::Arena(Arena&& o) noexcept
    : fd_(std::move(o.fd_)), base_(std::exchange(o.base_, nullptr)), layout_(o.layout_) {}

Arena& Arena::operator=(Arena&& o) noexcept {
  if (this != &o) {
    if (base_ != nullptr) ::munmap(base_, layout_.arena_bytes);
    fd_ = std::move(o.fd_);
    base_ = std::exchange(o.base_, nullptr);
    layout_ = o.layout_;
  }
  return *this;
}

Arena::~Arena() {
  if (base_ != nullptr) ::munmap(base_, layout_.arena_bytes);
}

RingControl* Arena::request_control() const {
  return reinterpret_cast<RingControl*>(base_ + layout_.request_ring_offset);
}
RequestDescriptor* Arena::request_slots() const {
  return reinterpret_cast<RequestDescriptor*>(base_ + layout_.request_ring_offset +
                                              sizeof(RingControl));
}
RingControl* Arena::completion_control() const {
  return reinterpret_cast<RingControl*>(base_ + layout_.completion_ring_offset);
}
CompletionDescriptor* Arena::completion_slots() const {
  return reinterpret_cast<CompletionDescriptor*>(base_ + layout_.completion_ring_offset +
                                                 sizeof(RingControl));
}

Result<Arena> Arena::create(uint64_t arena_bytes, const char* debug_name) {
  TUTEL_ASSIGN_OR_RETURN(const ArenaLayout layout, arena_layout(arena_bytes));
  const char* name = (debug_name != nullptr && *debug_name != '\0') ? debug_name : "tuteld-arena";
  UniqueFd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | kMfdNoexecSeal));
  if (!fd.valid() && errno == EINVAL)
    fd.reset(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid())
    return Status::IOError("memfd_create for the session arena: " + errno_text(errno));
  if (::ftruncate(fd.get(), static_cast<off_t>(layout.arena_bytes)) != 0) {
    return Status::ResourceExhausted("cannot size the session arena to " +
                                     std::to_string(layout.arena_bytes) +
                                     " bytes: " + errno_text(errno));
  }
  // F_SEAL_SEAL stops the client from adding seals of its own (e.g. F_SEAL_FUTURE_WRITE).
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return Status::IOError("sealing the session arena: " + errno_text(errno));
  }
  // MAP_POPULATE faults every page in now, once, instead of on the data path: a request that
  // touches fresh arena pages would otherwise pay a page fault per 4 KiB.
  void* base = ::mmap(nullptr, layout.arena_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);
  if (base == MAP_FAILED) {
    return Status::ResourceExhausted("mapping the session arena of " +
                                     std::to_string(layout.arena_bytes) +
                                     " bytes: " + errno_text(errno));
  }
  Arena arena;
  arena.fd_ = std::move(fd);
  arena.base_ = static_cast<uint8_t*>(base);
  arena.layout_ = layout;

  auto* header = new (arena.base_) ArenaHeader{};
  header->magic = kArenaMagic;
  header->version = kProtocolVersion;
  header->arena_bytes = layout.arena_bytes;
  header->request_ring_offset = layout.request_ring_offset;
  header->completion_ring_offset = layout.completion_ring_offset;
  header->data_offset = layout.data_offset;
  header->data_bytes = layout.data_bytes;
  new (arena.request_control()) RingControl();
  std::memset(static_cast<void*>(arena.request_slots()), 0, kRingSlots * sizeof(RequestDescriptor));
  new (arena.completion_control()) RingControl();
  std::memset(static_cast<void*>(arena.completion_slots()), 0,
              kRingSlots * sizeof(CompletionDescriptor));
  return arena;
}

Result<Arena> Arena::attach(UniqueFd fd) {
  if (!fd.valid()) return Status::InvalidArgument("arena fd is not a valid descriptor");
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0)
    return Status::IOError("fstat on the arena fd: " + errno_text(errno));
  if (!S_ISREG(st.st_mode)) {
    return Status::InvalidArgument("the arena fd is not a memfd (not a regular file)");
  }
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) {
    return Status::InvalidArgument("the arena fd does not support seals (not a memfd): " +
                                   errno_text(errno));
  }
  if ((seals & kRequiredSeals) != kRequiredSeals) {
    return Status::PermissionDenied(
        "the arena memfd is not sealed against shrink and grow; refusing to map it (the peer "
        "could truncate it and crash this process with SIGBUS)");
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  Result<ArenaLayout> layout = arena_layout(size);
  if (!layout.ok()) return layout.status().with_context("arena memfd size");
  if (layout->arena_bytes != size) {
    return Status::InvalidArgument("the arena memfd holds " + std::to_string(size) +
                                   " bytes, not a whole number of 4096-byte pages");
  }
  void* base = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd.get(), 0);  // as create()
  if (base == MAP_FAILED) {
    return Status::ResourceExhausted("mapping the session arena of " + std::to_string(size) +
                                     " bytes: " + errno_text(errno));
  }
  Arena arena;
  arena.fd_ = std::move(fd);
  arena.base_ = static_cast<uint8_t*>(base);
  arena.layout_ = *layout;

  ArenaHeader h;
  std::memcpy(&h, arena.base_, sizeof h);  // a snapshot: the peer may write concurrently
  if (h.magic != kArenaMagic) {
    return Status::Corruption("the arena header's magic is wrong: the fd is not a tuteld arena");
  }
  if (h.version != kProtocolVersion) {
    return Status::InvalidArgument("the arena was laid out for protocol version " +
                                   std::to_string(h.version) + ", this side speaks " +
                                   std::to_string(kProtocolVersion) +
                                   "; upgrade the client or the daemon");
  }
  const ArenaLayout& l = arena.layout_;
  auto field = [](const char* name, uint64_t got, uint64_t want) {
    return Status::Corruption(std::string("the arena header's ") + name + " is " +
                              std::to_string(got) + ", expected " + std::to_string(want) +
                              " for an arena of this size");
  };
  if (h.arena_bytes != l.arena_bytes) return field("arena_bytes", h.arena_bytes, l.arena_bytes);
  if (h.request_ring_offset != l.request_ring_offset) {
    return field("request_ring_offset", h.request_ring_offset, l.request_ring_offset);
  }
  if (h.completion_ring_offset != l.completion_ring_offset) {
    return field("completion_ring_offset", h.completion_ring_offset, l.completion_ring_offset);
  }
  if (h.data_offset != l.data_offset) return field("data_offset", h.data_offset, l.data_offset);
  if (h.data_bytes != l.data_bytes) return field("data_bytes", h.data_bytes, l.data_bytes);
  return arena;
}

}  // namespace tutel::ipc
