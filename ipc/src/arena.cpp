#include "tutel/ipc/arena.hpp"

#include <cstring>
#include <new>
#include <string>
#include <utility>

#include "tutel/core/logging.hpp"

namespace tutel::ipc {

RingControl* Arena::request_control() const {
  return reinterpret_cast<RingControl*>(base() + layout_.request_ring_offset);
}
RequestDescriptor* Arena::request_slots() const {
  return reinterpret_cast<RequestDescriptor*>(base() + layout_.request_ring_offset +
                                              sizeof(RingControl));
}
RingControl* Arena::completion_control() const {
  return reinterpret_cast<RingControl*>(base() + layout_.completion_ring_offset);
}
CompletionDescriptor* Arena::completion_slots() const {
  return reinterpret_cast<CompletionDescriptor*>(base() + layout_.completion_ring_offset +
                                                 sizeof(RingControl));
}

Result<Arena> Arena::create(uint64_t arena_bytes) {
  TUTEL_ASSIGN_OR_RETURN(ArenaLayout layout, arena_layout(arena_bytes));
  TUTEL_ASSIGN_OR_RETURN(SharedMemory memory, SharedMemory::create(layout.arena_bytes, "session arena"));
  // arena_layout() rounds to 4096-byte pages, the mapping to the system's (64 KiB on some arm64
  // kernels): lay out what was mapped, a whole number of 4096-byte pages too, so the client's
  // layout of the memfd's size is the same.
  if (memory.bytes() != layout.arena_bytes) {
    TUTEL_ASSIGN_OR_RETURN(layout, arena_layout(memory.bytes()));
    if (layout.arena_bytes != memory.bytes())
      return Status::Internal("the arena's mapping of " + std::to_string(memory.bytes()) +
                              " bytes is not a whole number of 4096-byte pages");
  }
  Arena arena;
  arena.memory_ = std::move(memory);
  arena.layout_ = layout;

  auto* header = new (arena.base()) ArenaHeader{};
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

Result<Arena> Arena::attach(UniqueFd fd, uint64_t expected_bytes) {
  // The layout first: it bounds the size (64 KiB to 64 GiB) before the mapping faults it in.
  Result<ArenaLayout> layout = arena_layout(expected_bytes);
  if (!layout.ok()) return layout.status().with_context("arena size");
  TUTEL_ASSIGN_OR_RETURN(SharedMemory memory,
                         SharedMemory::attach(std::move(fd), "the arena memfd", static_cast<size_t>(expected_bytes)));
  // attach() took exactly expected_bytes, whole pages, which arena_layout() keeps as they are.
  TUTEL_CHECK(layout->arena_bytes == memory.bytes());
  Arena arena;
  arena.memory_ = std::move(memory);
  arena.layout_ = *layout;

  ArenaHeader h;
  std::memcpy(&h, arena.base(), sizeof h);  // a snapshot: the peer may write concurrently
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
