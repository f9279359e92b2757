// The wire protocol between libtutel_client and tuteld (docs/protocol.md).
//
// Control: length-prefixed frames on a unix stream socket — a fixed 16-byte header, then a
// UTF-8 JSON object body. Data: fixed-size descriptors on two single-producer/single-consumer
// rings inside the session's shared-memory arena. Everything here is plain data and pure
// functions (no I/O), shared by the daemon and the client.
// Thread-safety: all functions are pure; structs are values.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"

namespace tutel::ipc {

inline constexpr uint32_t kFrameMagic = 0x4C545554;  // "TUTL" little-endian
inline constexpr uint16_t kProtocolVersion = 1;
inline constexpr uint32_t kMaxFrameBody = 1u << 20;  // larger frames are refused

enum class FrameType : uint16_t {
  // client → daemon (client socket)
  kHello = 1,         // {"client": str, "secret"?: str}     → kHelloReply + the arena fd (a "pid" is
                      // informational: the daemon reads the peer's credentials)
  kCreateLayer = 2,   // {"spec": toml text}                  → kLayerInfo
  kAttachLayer = 3,   // {"name": str}                        → kLayerInfo
  kDestroyLayer = 4,  // {"handle": int}                      → kOk
  kStep = 5,          // {"handle", "lr"?, "weight_decay"?}   → kOk {"step", "applied", "lr",
                      // "weight_decay"}
  kZeroGrad = 6,      // {"handle": int}                      → kOk
  kSave = 7,          // {"handle": int, "path": str}         → kOk
  kLoad = 8,          // {"handle": int, "path": str}         → kOk
  kMapRegion = 9,     // {"rank": int, "bytes": int}          → kOk {"region", "bytes", "kind",
                      // "device", "handle"?} + fd?
  kUnmapRegion = 10,  // {"region": int}                      → kOk
  kGradNorm = 11,     // {"handle": int}                      → kOk {"norm": number} or, not
                      // finite, {"norm": null, "not_finite": "inf" | "nan"}
  kScaleGrads = 12,   // {"handle": int, "factor": number}    → kOk
  kExportState = 13,  // {"handle": int} + a memfd            → kOk {"bytes": int}: the layer's
                      // state, as kSave writes it, at the memfd's start (protocol.md §2)
  kImportState = 14,  // {"handle": int} + a memfd            → kOk: as kLoad, from that file
  // admin → daemon (admin socket): 32 to 63
  kAdminStatus = 32,      // {}                                  → kOk {status object}
  kAdminTenants = 33,     // {}                                  → kOk {"tenants": [...]}
  kAdminLayers = 34,      // {}                                  → kOk {"layers": [...]}
  kAdminCheckpoint = 35,  // {"layer": "tenant/name", "path": str} → kOk
  kAdminMetrics = 36,     // {}                                  → kOk {"text": prometheus text}
  kAdminPeers = 37,       // {}                                  → kOk {"groups": [...]}
  kAdminPin = 38,         // {"layer": "tenant/name", "pinned": bool} → kOk {"layer", "pinned"}
  kAdminDrain = 39,       // {"draining": bool}                  → kOk {"draining", "sessions"}
  kAdminSessions = 40,    // {}                                  → kOk {"sessions": [...]}
  kAdminDestroy = 41,     // {"layer": "tenant/name"}            → kOk {"layer"}: as its client's
                          // kDestroyLayer, after the layer's control frames before it
  // daemon → peer (replies carry the request's request_id)
  kHelloReply = 64,  // {"session": int, "tenant": str, "arena_bytes": int, ...layout}
  kLayerInfo =
      65,       // {"handle": int, "name": str, "experts": int, "model_dim": int, "output_dim": int}
  kOk = 66,     // {} or a type-specific object
  kError = 67,  // {"code": int, "code_name": str, "message": str}
};

std::string_view frame_type_name(FrameType t);

// Whether `t` is a request of the admin socket's (types 32 to 63 are kept for them), which a
// client socket answers by naming the socket it should have gone to.
constexpr bool is_admin_request(FrameType t) {
  const auto code = static_cast<uint16_t>(t);
  return code >= static_cast<uint16_t>(FrameType::kAdminStatus) && code < static_cast<uint16_t>(FrameType::kHelloReply);
}
bool is_known_frame_type(uint16_t t);

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint16_t version = kProtocolVersion;
  uint16_t type = 0;
  uint32_t body_length = 0;
  uint32_t request_id = 0;
};
static_assert(sizeof(FrameHeader) == 16);

// Checks magic, version, type and length; the message says what was wrong and what to do.
Status validate_header(const FrameHeader& h);

// One frame's bytes as send_frame writes them (header, then body), unchecked: for callers that
// need the bytes themselves (tests writing bursts or malformed streams, fuzz seeds).
std::string encode_frame(FrameType type, uint32_t request_id, std::string_view body);

// Shared-memory arena layout. All offsets are from the arena's start; everything the client
// writes is untrusted by the daemon and validated before use.
inline constexpr uint32_t kArenaMagic = 0x414C5554;  // "TULA"
inline constexpr uint32_t kRingSlots = 64;
inline constexpr size_t kCacheLine = 64;

enum class Op : uint32_t {
  kNop = 0,       // an empty round trip
  kForward = 1,
  kBackward = 2,
  // Reads input_bytes at input_offset and returns the sum of its 32-bit words (mod 2^64) in
  // CompletionDescriptor::checksum: verifies and measures the shared-memory path.
  kChecksum = 3,
  // Drops the session's training forward `sequence` of `layer_handle` that will never be
  // backwarded (its graph was dropped, its wait abandoned), with the memory it holds; a forward
  // that is not pending (backwarded, never made) is no error. Not held to max_inflight. On an
  // expert-parallel layer it is this rank's alone (no collective).
  kDiscard = 4,
};
enum RequestFlags : uint32_t {
  kFlagTraining = 1u << 0,  // forward keeps what backward needs, under `sequence`
  // The offsets are into the session's device region `region` (kMapRegion), not the arena.
  kFlagDeviceRegion = 1u << 1,
  // Backward only: dx alone; the parameter gradients are left as they were (the gradient of
  // the input alone, a frozen module).
  kFlagKeepParamGrads = 1u << 2,
  // Forward only, with kFlagTraining: routed as an inference is, without gate noise (a module
  // in eval mode whose input needs a gradient); refused on a layer with gate_noise > 0, whose
  // training forwards draw it.
  kFlagWithoutNoise = 1u << 3,
  // Forward only: the gate noise is drawn from the request's noise_key (with the spec's
  // noise_seed) instead of the daemon's (step, sequence) key, so a forward run again with its
  // key draws the same noise (a trainer's recomputation: reentrant checkpointing, whose key
  // comes from the trainer's generator). Without kFlagTraining: an inference routed as a
  // training forward is, the noise drawn and nothing kept for a backward (a module in train
  // mode under no_grad). Not with kFlagWithoutNoise.
  kFlagNoiseKey = 1u << 4,
};
inline constexpr uint32_t kKnownRequestFlags =
    kFlagTraining | kFlagDeviceRegion | kFlagKeepParamGrads | kFlagWithoutNoise | kFlagNoiseKey;

// One request (client → daemon). 128 bytes.
struct RequestDescriptor {
  uint64_t request_id;
  uint32_t op;             // Op
  uint32_t flags;          // RequestFlags
  uint64_t layer_handle;
  uint64_t sequence;       // pairs a training forward with its backward
  int64_t tokens;          // S
  uint64_t input_offset;   // forward: x [S, M] f32; backward: dy [S, O] f32 (arena or region)
  uint64_t input_bytes;
  uint64_t output_offset;  // forward: y [S, O] f32; backward: dx [S, M] f32
  uint64_t output_bytes;
  float dl_aux;            // backward only
  uint32_t region;         // with kFlagDeviceRegion: the device region the offsets are into
  uint64_t noise_key;      // with kFlagNoiseKey: the key of the forward's gate noise
  uint8_t reserved[40];
};
static_assert(sizeof(RequestDescriptor) == 128);
static_assert(offsetof(RequestDescriptor, noise_key) == 80);  // docs/protocol.md's table

// One completion (daemon → client). 384 bytes.
struct CompletionDescriptor {
  uint64_t request_id;
  int32_t status_code;  // StatusCode; 0 = OK
  float l_aux;
  int64_t capacity;
  int64_t dropped;
  uint64_t checksum;    // Op::kChecksum only
  char message[344];    // NUL-terminated error message when status_code != 0
};
static_assert(sizeof(CompletionDescriptor) == 384);

// Ring control block: producer and consumer indices on their own cache lines, plus a futex
// doorbell for the consumer (see ring.hpp for the protocol).
struct alignas(kCacheLine) RingControl {
  alignas(kCacheLine) std::atomic<uint64_t> head;      // next slot the producer writes
  alignas(kCacheLine) std::atomic<uint64_t> tail;      // next slot the consumer reads
  alignas(kCacheLine) std::atomic<uint32_t> doorbell;  // futex word, bumped on each wake
  std::atomic<uint32_t> consumer_waiting;              // 1 while the consumer may sleep
};
static_assert(std::atomic<uint64_t>::is_always_lock_free);

struct ArenaHeader {
  uint32_t magic;
  uint32_t version;
  uint64_t arena_bytes;
  uint64_t request_ring_offset;     // RingControl, then kRingSlots RequestDescriptors
  uint64_t completion_ring_offset;  // RingControl, then kRingSlots CompletionDescriptors
  uint64_t data_offset;             // the client's region for tensors
  uint64_t data_bytes;
};

struct ArenaLayout {
  uint64_t request_ring_offset, completion_ring_offset, data_offset, data_bytes, arena_bytes;
};
// The layout the daemon creates for an arena of `arena_bytes` (rounded up to pages).
Result<ArenaLayout> arena_layout(uint64_t arena_bytes);

// OK when [offset, offset + bytes) lies inside [begin, end) and is 4-byte aligned; `what` names
// the tensor and `where` the range in the message ("the arena's data region").
Status check_range(uint64_t begin, uint64_t end, uint64_t offset, uint64_t bytes, std::string_view what,
                   std::string_view where);
// OK when [offset, offset + bytes) lies inside the data region and is 4-byte aligned.
Status check_data_range(const ArenaLayout& layout, uint64_t offset, uint64_t bytes, std::string_view what);

}  // namespace tutel::ipc
