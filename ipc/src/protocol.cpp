#include "tutel/ipc/protocol.hpp"

#include <cinttypes>
#include <cstdio>
#include <string>

namespace tutel::ipc {
namespace {

constexpr uint64_t kArenaPage = 4096;
constexpr uint64_t kMinArenaBytes = 64ull << 10;
constexpr uint64_t kMaxArenaBytes = 64ull << 30;

constexpr uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

std::string hex32(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08" PRIx32, v);
  return buf;
}

}  // namespace

std::string_view frame_type_name(FrameType t) {
  // clang-format off
  switch (t) {
    case FrameType::kHello: return "Hello";
    case FrameType::kCreateLayer: return "CreateLayer";
    case FrameType::kAttachLayer: return "AttachLayer";
    case FrameType::kDestroyLayer: return "DestroyLayer";
    case FrameType::kStep: return "Step";
    case FrameType::kZeroGrad: return "ZeroGrad";
    case FrameType::kSave: return "Save";
    case FrameType::kLoad: return "Load";
    case FrameType::kMapRegion: return "MapRegion";
    case FrameType::kUnmapRegion: return "UnmapRegion";
    case FrameType::kGradNorm: return "GradNorm";
    case FrameType::kScaleGrads: return "ScaleGrads";
    case FrameType::kExportState: return "ExportState";
    case FrameType::kImportState: return "ImportState";
    case FrameType::kAdminStatus: return "AdminStatus";
    case FrameType::kAdminTenants: return "AdminTenants";
    case FrameType::kAdminLayers: return "AdminLayers";
    case FrameType::kAdminCheckpoint: return "AdminCheckpoint";
    case FrameType::kAdminMetrics: return "AdminMetrics";
    case FrameType::kAdminPeers: return "AdminPeers";
    case FrameType::kAdminPin: return "AdminPin";
    case FrameType::kAdminDrain: return "AdminDrain";
    case FrameType::kAdminSessions: return "AdminSessions";
    case FrameType::kAdminDestroy: return "AdminDestroy";
    case FrameType::kHelloReply: return "HelloReply";
    case FrameType::kLayerInfo: return "LayerInfo";
    case FrameType::kOk: return "Ok";
    case FrameType::kError: return "Error";
  }
  // clang-format on
  return "Unknown";
}

std::string encode_frame(FrameType type, uint32_t request_id, std::string_view body) {
  FrameHeader h;
  h.type = static_cast<uint16_t>(type);
  h.body_length = static_cast<uint32_t>(body.size());
  h.request_id = request_id;
  std::string out(reinterpret_cast<const char*>(&h), sizeof h);
  out.append(body);
  return out;
}

bool is_known_frame_type(uint16_t t) {
  return frame_type_name(static_cast<FrameType>(t)) != "Unknown";
}

Status validate_header(const FrameHeader& h) {
  if (h.magic != kFrameMagic) {
    return Status::Corruption("frame magic " + hex32(h.magic) + " is not 'TUTL' (" +
                              hex32(kFrameMagic) +
                              "): not a tuteld peer (is another program using this socket?)");
  }
  if (h.version != kProtocolVersion) {
    return Status::InvalidArgument(
        "peer speaks protocol version " + std::to_string(h.version) + ", this side speaks " +
        std::to_string(kProtocolVersion) +
        "; upgrade the client or the daemon so both speak the same version");
  }
  if (!is_known_frame_type(h.type)) {
    return Status::InvalidArgument("unknown frame type " + std::to_string(h.type) +
                                   " (a peer built from a newer protocol?)");
  }
  if (h.body_length > kMaxFrameBody) {
    return Status::InvalidArgument("frame body of " + std::to_string(h.body_length) +
                                   " bytes exceeds the limit of " + std::to_string(kMaxFrameBody) +
                                   " bytes");
  }
  return Status::OK();
}

Result<ArenaLayout> arena_layout(uint64_t arena_bytes) {
  if (arena_bytes < kMinArenaBytes) {
    return Status::InvalidArgument("arena of " + std::to_string(arena_bytes) +
                                   " bytes is below the minimum of " +
                                   std::to_string(kMinArenaBytes) + " bytes (64 KiB)");
  }
  if (arena_bytes > kMaxArenaBytes) {
    return Status::InvalidArgument("arena of " + std::to_string(arena_bytes) +
                                   " bytes exceeds the maximum of " +
                                   std::to_string(kMaxArenaBytes) + " bytes (64 GiB)");
  }
  ArenaLayout l{};
  l.arena_bytes = align_up(arena_bytes, kArenaPage);
  // The header owns the first page; the rings follow on cache-line boundaries so the two
  // processes' index updates never share a line with anything else.
  l.request_ring_offset = kArenaPage;
  const uint64_t request_ring_bytes = sizeof(RingControl) + kRingSlots * sizeof(RequestDescriptor);
  l.completion_ring_offset = align_up(l.request_ring_offset + request_ring_bytes, kCacheLine);
  const uint64_t completion_ring_bytes =
      sizeof(RingControl) + kRingSlots * sizeof(CompletionDescriptor);
  l.data_offset = align_up(l.completion_ring_offset + completion_ring_bytes, kArenaPage);
  l.data_bytes = l.arena_bytes - l.data_offset;
  return l;
}

Status check_range(uint64_t begin, uint64_t end, uint64_t offset, uint64_t bytes, std::string_view what,
                   std::string_view where) {
  const std::string name(what);
  if (offset % 4 != 0 || bytes % 4 != 0) {
    return Status::InvalidArgument(name + ": offset " + std::to_string(offset) + " and size " +
                                   std::to_string(bytes) +
                                   " must both be multiples of 4 bytes (f32 tensors)");
  }
  // offset + bytes is never computed before both are known to be inside, so it cannot wrap.
  if (offset < begin || offset > end || bytes > end - offset) {
    return Status::OutOfRange(name + ": bytes [" + std::to_string(offset) + ", " +
                              std::to_string(offset) + " + " + std::to_string(bytes) +
                              ") lie outside " + std::string(where) + " [" + std::to_string(begin) +
                              ", " + std::to_string(end) + ")");
  }
  return Status::OK();
}

Status check_data_range(const ArenaLayout& layout, uint64_t offset, uint64_t bytes,
                        std::string_view what) {
  return check_range(layout.data_offset, layout.data_offset + layout.data_bytes, offset, bytes, what,
                     "the arena's data region");
}

}  // namespace tutel::ipc
