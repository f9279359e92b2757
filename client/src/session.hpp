// One client session with tuteld: the control socket, the mapped arena, the two rings, the
// data-region allocator and the requests in flight. Client and Layer are thin handles on it.
// Thread-safety: its public calls run one at a time, under one recursive mutex (hold()), which
// the Layer calls that read or change their handle's pending forwards take too (see client.hpp).
#pragma once

#include <sys/types.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data_region.hpp"
#include "region_import.hpp"
#include "tutel/client.hpp"
#include "tutel/core/status.hpp"
#include "tutel/ipc/adaptive_spin.hpp"
#include "tutel/ipc/arena.hpp"
#include "tutel/ipc/protocol.hpp"
#include "tutel/ipc/ring.hpp"

namespace tutel::client::internal {

// What a Layer handle knows: the daemon's description and the training forwards it submitted
// that still wait for their backward (sequence -> tokens, oldest first).
struct LayerState {
  std::shared_ptr<Session> session;
  LayerInfo info;
  std::map<uint64_t, int64_t> pending;
  bool destroyed = false;
};

// A device region this client maps (Client::map_device_region).
struct MappedDeviceRegion {
  uint32_t id = 0;
  int rank = 0;
  uint64_t bytes = 0;
  std::string kind, device;
  ImportedMemory memory;
};

// A reply of tuteld's that lacks a field or has one of the wrong type (the JSON readers' InvalidArgument,
// which would read as the caller's mistake) is the daemon's fault: Corruption, naming the frame.
inline Status malformed_reply(const Status& st, std::string_view frame) {
  if (st.code() != StatusCode::kInvalidArgument) return st;
  return Status::Corruption("tuteld's reply to " + std::string(frame) + " is malformed: " + std::string(st.message()));
}

// A data-path request, as Layer builds it.
struct Submission {
  ipc::Op op = ipc::Op::kNop;
  uint32_t flags = 0;
  std::shared_ptr<LayerState> layer;  // null for a nop
  uint64_t sequence = 0;
  int64_t tokens = 0;
  const float* input = nullptr;
  uint64_t input_bytes = 0;
  float* output = nullptr;
  uint64_t output_bytes = 0;
  float dl_aux = 0.f;
  uint64_t noise_key = 0;  // with ipc::kFlagNoiseKey
  const char* input_name = "x";  // for messages
  const char* output_name = "y";
  // The input and output point into one of the session's device regions, not user memory.
  bool in_device_region = false;
};

class Session {
 public:
  static Result<std::shared_ptr<Session>> open(const std::string& socket_path,
                                               const ClientOptions& options);
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // A control request and its reply's body; kError replies become their Status. `send_fds` go
  // with the request. The reply's descriptors go to `fds` when given, else they are closed.
  Result<nlohmann::json> call(ipc::FrameType type, const nlohmann::json& body,
                              ipc::FrameType expected, std::vector<UniqueFd>* fds = nullptr,
                              const std::vector<int>& send_fds = {});

  // Maps a device region on the daemon's `rank` (kMapRegion) and here.
  Result<std::shared_ptr<MappedDeviceRegion>> map_device_region(int rank, uint64_t bytes);
  // Drains the requests in flight, then unmaps the region here and in the daemon. When the
  // drain times out, the region stays mapped on both sides (maps() is still true): call again.
  Status unmap_device_region(const std::shared_ptr<MappedDeviceRegion>& region);
  // Whether `region` is one of this session's mapped regions (false once the session ended).
  bool maps(const std::shared_ptr<MappedDeviceRegion>& region) const;

  // Copies the input into the arena and pushes the descriptor; waits for room (ring slots or
  // data-region space) when needed.
  Result<Ticket> submit(const Submission& s);
  // Completes one request: its output is in the user's buffer when this returns OK. `timeout`
  // bounds this wait (zero: only what has completed already) instead of the request timeout;
  // when it passes, Timeout, and the request stays in flight.
  Result<ForwardInfo> wait(uint64_t request_id, std::optional<std::chrono::milliseconds> timeout = std::nullopt);
  // The word sum an Op::kChecksum request returned.
  Result<uint64_t> wait_checksum(uint64_t request_id);
  // Waits until nothing is in flight (results stay available to wait()).
  Status drain();
  // Gives up on a request whose caller will never wait for it again (a synchronous call that
  // timed out, whose buffers the caller may free): its output is not written, its result is
  // dropped when it completes, and a training forward is no longer pending on its layer. It
  // stays in flight until then, holding its ring slot and data-region blocks. An abandoned
  // training forward is discarded in the daemon after it (its saved state given back), at once
  // where the ring has room, else with the next submit or drain.
  void abandon(uint64_t request_id);

  // A sequence number for a new training forward, unique within the session.
  uint64_t next_sequence() {
    const auto held = hold();
    return next_sequence_++;
  }
  // The session for this thread alone until the lock goes: every public call takes it, so two
  // threads sharing a client take turns (they corrupted the rings and the allocator: one thread
  // took the other's completions, or a block was freed twice). Recursive: a call takes it again
  // inside another.
  [[nodiscard]] std::unique_lock<std::recursive_mutex> hold() const {
    std::unique_lock lock(mutex_, std::try_to_lock);
    if (lock.owns_lock()) return lock;
    // Held elsewhere. In a child forked while a parent thread held it, no one will let go: the
    // child goes on without it, to the fork check that fails its call (only the contended
    // case pays for getpid).
    if (pid_ != ::getpid()) return std::unique_lock(mutex_, std::defer_lock);
    lock.lock();
    return lock;
  }

  void close(const Status& why);
  // OK while the session works; the reason it stopped otherwise.
  const Status& broken() const { return broken_; }

  const std::string& tenant() const { return tenant_; }
  uint64_t id() const { return session_id_; }
  uint64_t data_bytes() const { return region_.capacity(); }
  const std::string& socket_path() const { return socket_path_; }

 private:
  Session() = default;

  struct InFlight {
    ipc::Op op;
    std::shared_ptr<LayerState> layer;
    uint64_t sequence = 0;
    bool training = false;
    std::optional<uint64_t> input_block, output_block;  // data-region offsets
    float* output = nullptr;
    uint64_t output_bytes = 0;
    bool abandoned = false;  // abandon(): completes without a trace
  };
  struct Finished {
    Status status;
    ForwardInfo info;
    uint64_t checksum = 0;  // Op::kChecksum
    // A training forward's layer, so that abandoning it after it completed still takes it off
    // the layer's pending list (weak: LayerState owns the session).
    std::weak_ptr<LayerState> training_layer;
  };
  Result<Finished> wait_finished(uint64_t request_id, std::optional<std::chrono::milliseconds> timeout);

  Status hello(const ClientOptions& options);
  Result<Ticket> submit_in_device_region(const Submission& s);
  // What submit records of a request, and its descriptor without the offsets (a new request id).
  InFlight track(const Submission& s) const;
  ipc::RequestDescriptor describe(const Submission& s);
  // Pushes the descriptor and records the request in flight (or fails the session).
  Result<Ticket> push(const ipc::RequestDescriptor& d, InFlight r);
  // Pops and handles one completion, waiting at most until the request timeout.
  Status complete_one();
  // ... or until `deadline`; `bound` is its length for the message, `bound_is_option` whether it
  // is the request timeout (so the message can say which option to raise).
  Status complete_one(std::optional<std::chrono::steady_clock::time_point> deadline, std::chrono::milliseconds bound,
                      bool bound_is_option);
  std::optional<std::chrono::steady_clock::time_point> request_deadline() const;
  void finish(uint64_t request_id, InFlight& r, const ipc::CompletionDescriptor& c);
  // Discards of abandoned training forwards (layer handle, sequence), sent into free ring slots.
  void queue_discard(uint64_t layer_handle, uint64_t sequence);
  void send_discards();
  void release_blocks(InFlight& r);
  bool peer_gone();  // polls the control socket for EOF, at most once per liveness interval
  Status lost(const std::string& detail);
  Status fail(Status st);  // marks the session broken with `st` and returns it
  // broken_, after the check that this is the process that opened the session. A forked child
  // shares the parent's socket and rings: its requests would take the parent's completions and
  // replies (each side then reads the other's results). In a child the session closes its own
  // copies of them, sends nothing (the parent's session goes on), and says to connect anew.
  const Status& usable();
  // The device region holding [data, data + bytes) and the offset of `data` in it, or an error
  // naming `name` ("x").
  Result<std::pair<uint32_t, uint64_t>> locate(const void* data, uint64_t bytes, const char* name) const;

  mutable std::recursive_mutex mutex_;  // hold()
  std::string socket_path_;
  pid_t pid_ = 0;  // the process that opened the session
  ClientOptions options_;
  ipc::UniqueFd fd_;
  std::optional<ipc::Arena> arena_;
  ipc::RingProducer<ipc::RequestDescriptor> requests_;
  ipc::RingConsumer<ipc::CompletionDescriptor> completions_;
  ipc::WaitPolicy wait_policy_;
  // The spin of each wait for a completion, within wait_policy_.spin: none after a request that
  // outlasted it, so that a client waiting for a long forward leaves the core to the daemon.
  ipc::AdaptiveSpin completion_spin_{std::chrono::microseconds(0)};
  DataRegion region_;
  std::string tenant_;
  uint64_t session_id_ = 0;
  uint32_t next_frame_id_ = 1;
  uint64_t next_request_id_ = 1;  // from a random point: see open()
  uint64_t next_sequence_ = 1;
  std::map<uint64_t, InFlight> in_flight_;
  std::map<uint32_t, std::shared_ptr<MappedDeviceRegion>> device_regions_;
  std::map<uint64_t, Finished> finished_;
  std::deque<std::pair<uint64_t, uint64_t>> discards_;  // queue_discard
  std::chrono::steady_clock::time_point last_liveness_check_{};
  Status broken_;
};

}  // namespace tutel::client::internal
