// The data path: each client session's worker consumes its request ring, validates every
// descriptor against the session's own arena and tenant, runs the layer, and posts a completion.
#include <sys/socket.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <thread>

#include "daemon_impl.hpp"
#include "guarded.hpp"
#include "tutel/core/logging.hpp"
#include "tutel/ipc/adaptive_spin.hpp"

namespace tutel::daemon {
namespace {

void set_message(ipc::CompletionDescriptor& c, const Status& st) {
  c.status_code = static_cast<int32_t>(st.code());
  const std::string_view m = st.message();  // the code travels in status_code
  const size_t n = std::min(m.size(), sizeof(c.message) - 1);
  std::memcpy(c.message, m.data(), n);
  c.message[n] = '\0';
}

// Where a request's tensors live: the session's arena (its data region), or one of its device
// regions. Offsets are relative to `base`; every range must lie in [begin, end).
struct RequestMemory {
  uint8_t* base = nullptr;
  uint64_t begin = 0, end = 0;
  const char* where = "the arena's data region";
  ClientMemory kind = ClientMemory::kHost;
  std::shared_ptr<const DeviceRegion> region;  // held until the request completes
};

// The ranges a request reads and writes, in bytes, both inside its memory and disjoint.
Status check_ranges(const RequestMemory& mem, const ipc::RequestDescriptor& d, uint64_t in_bytes,
                    uint64_t out_bytes, const char* in_name, const char* out_name) {
  if (d.input_bytes != in_bytes)
    return Status::InvalidArgument(std::string(in_name) + " has " + std::to_string(d.input_bytes) + " bytes; " +
                                   std::to_string(d.tokens) + " tokens need " + std::to_string(in_bytes));
  if (d.output_bytes != out_bytes)
    return Status::InvalidArgument(std::string(out_name) + " has " + std::to_string(d.output_bytes) + " bytes; " +
                                   std::to_string(d.tokens) + " tokens need " + std::to_string(out_bytes));
  TUTEL_RETURN_IF_ERROR(ipc::check_range(mem.begin, mem.end, d.input_offset, d.input_bytes, in_name, mem.where));
  TUTEL_RETURN_IF_ERROR(ipc::check_range(mem.begin, mem.end, d.output_offset, d.output_bytes, out_name, mem.where));
  if (d.input_offset < d.output_offset + d.output_bytes && d.output_offset < d.input_offset + d.input_bytes)
    return Status::InvalidArgument(std::string(in_name) + " and " + out_name + " overlap in " + mem.where +
                                   "; use separate buffers");
  return Status::OK();
}

// The memory request `d` addresses: the arena, or the device region it names, which must be on
// the layer's device.
Result<RequestMemory> request_memory(const Session& s, const ipc::RequestDescriptor& d, const ServedLayer& layer) {
  RequestMemory mem;
  if ((d.flags & ipc::kFlagDeviceRegion) == 0) {
    const ipc::ArenaLayout& layout = s.arena->layout();
    mem.base = s.arena->base();
    mem.begin = layout.data_offset;
    mem.end = layout.data_offset + layout.data_bytes;
    return mem;
  }
  TUTEL_ASSIGN_OR_RETURN(mem.region, s.regions.find(d.region));
  // The rank, not only the device: CPU ranks all name cpu:0, and two ranks may share a GPU.
  if (mem.region->rank_index() != layer.rank_index() || mem.region->device() != layer.device())
    return Status::InvalidArgument("device region " + std::to_string(d.region) + " is on " +
                                   mem.region->device().to_string() + " (rank " +
                                   std::to_string(mem.region->rank_index()) + ") but layer '" + layer.name() +
                                   "' runs on " + layer.device().to_string() +
                                   "; map a region on the layer's rank (LayerInfo's rank)");
  mem.base = mem.region->data();
  mem.begin = 0;
  mem.end = mem.region->bytes();
  mem.where = "the device region";
  mem.kind = ClientMemory::kDevice;
  return mem;
}

// The sum of the range's 32-bit words, mod 2^64 (check_data_range guarantees 4-byte alignment).
__attribute__((optimize("tree-vectorize"))) uint64_t word_sum(const uint8_t* data, uint64_t bytes) {
  // Two 32-bit words per 64-bit load, split with a mask and a shift: a loop the compiler
  // vectorises, so the sum runs at memory speed.
  const uint64_t pairs = bytes / 8;
  uint64_t low = 0, high = 0;
  for (uint64_t i = 0; i < pairs; ++i) {
    uint64_t w;
    std::memcpy(&w, data + 8 * i, 8);
    low += w & 0xffffffffu;
    high += w >> 32;
  }
  uint64_t sum = low + high;
  if (bytes % 8) {
    uint32_t last;
    std::memcpy(&last, data + 8 * pairs, 4);
    sum += last;
  }
  return sum;
}

}  // namespace

void DaemonImpl::run_worker(const std::shared_ptr<Session>& s) {
  const ipc::WaitPolicy policy{config_.server.spin, std::chrono::milliseconds(200)};
  const ipc::ArenaLayout layout = s->arena->layout();
  uint8_t* const base = s->arena->base();
  // Off the event loop: pinning takes each rank's lock, which a long layer op may hold.
  s->pinned = HostRegistration::register_with(ranks_, s->tenant, s->arena->data(), layout.data_bytes,
                                              "session " + std::to_string(s->id) + "'s arena");
  auto stopped = [&] { return s->stop.load(std::memory_order_relaxed); };
  // The spin of each wait for a request, within the configured one: none after a wait that
  // outlasted it (the client computes between its requests: spinning would take its core).
  ipc::AdaptiveSpin request_spin(policy.spin);
  ipc::RequestDescriptor d;
  while (!stopped()) {
    const auto waiting_since = std::chrono::steady_clock::now();
    const ipc::PopResult r =
        s->requests.pop_wait(&d, ipc::WaitPolicy{request_spin.next(), policy.timeout}, stopped);
    request_spin.observe(std::chrono::steady_clock::now() - waiting_since);
    if (r == ipc::PopResult::kEmpty) continue;
    if (r == ipc::PopResult::kCorrupt) {
      // The loop closes the session when it hears this thread has returned (on_workers_exited):
      // as any session tuteld closes itself, not as one whose client hung up.
      s->ring_corrupt = true;
      return;
    }
    const auto started = std::chrono::steady_clock::now();
    ipc::CompletionDescriptor c{};
    c.request_id = d.request_id;
    std::string layer_name, op_name = d.op == uint32_t(ipc::Op::kForward) ? "forward"
                                      : d.op == uint32_t(ipc::Op::kBackward) ? "backward"
                                      : d.op == uint32_t(ipc::Op::kChecksum) ? "checksum"
                                      : d.op == uint32_t(ipc::Op::kDiscard)  ? "discard"
                                                                             : "nop";
    Status st;
    int64_t tokens = 0, dropped = 0;
    // kFlagKeepParamGrads means something on a backward only, kFlagWithoutNoise and
    // kFlagNoiseKey on a forward only: elsewhere each is as unknown.
    constexpr uint32_t kForwardOnly = ipc::kFlagWithoutNoise | ipc::kFlagNoiseKey;
    const uint32_t known_flags =
        d.op == uint32_t(ipc::Op::kBackward)  ? ipc::kKnownRequestFlags & ~kForwardOnly
        : d.op == uint32_t(ipc::Op::kForward) ? ipc::kKnownRequestFlags & ~uint32_t{ipc::kFlagKeepParamGrads}
                                              : ipc::kKnownRequestFlags & ~(ipc::kFlagKeepParamGrads | kForwardOnly);
    const uint32_t unknown_flags = d.flags & ~known_flags;
    auto unknown_flags_status = [&] {
      return Status::InvalidArgument("unknown request flags " + std::to_string(unknown_flags) +
                                     " (1 = training, 2 = device region, 4 = a backward that keeps the "
                                     "parameter gradients, 8 = a forward without gate noise, 16 = a forward "
                                     "with its own noise key); upgrade the daemon or fix the client");
    };
    if (d.op == uint32_t(ipc::Op::kNop)) {
      // An empty request: measures the round trip.
      if (unknown_flags != 0) st = unknown_flags_status();
    } else if (d.op == uint32_t(ipc::Op::kChecksum)) {
      st = unknown_flags != 0 ? unknown_flags_status()
           : (d.flags & ipc::kFlagDeviceRegion) != 0
               ? Status::InvalidArgument("checksum reads the arena only; clear the device-region flag")
               : ipc::check_data_range(layout, d.input_offset, d.input_bytes, "input");
      if (st.ok()) c.checksum = word_sum(base + d.input_offset, d.input_bytes);
    } else if (d.op != uint32_t(ipc::Op::kForward) && d.op != uint32_t(ipc::Op::kBackward) &&
               d.op != uint32_t(ipc::Op::kDiscard)) {
      st = Status::InvalidArgument("unknown op " + std::to_string(d.op) +
                                   " (1 = forward, 2 = backward, 3 = checksum, 4 = discard)");
    } else if (auto ref = registry_->find(s->tenant, d.layer_handle); !ref.ok()) {
      st = ref.status();
    } else if (d.op == uint32_t(ipc::Op::kDiscard)) {
      // Not held to max_inflight: a discard only gives memory back, and one refused would leave
      // the forward held until the session ends. It is this rank's alone, even on a group layer.
      ServedLayer& layer = *ref->layer;
      layer_name = layer.name();
      st = unknown_flags != 0 ? unknown_flags_status() : guarded([&] { return layer.discard(s->id, d.sequence); });
    } else if (unknown_flags != 0 || !registry_->try_begin_request(s->tenant)) {
      // Refused here, before the layer: a group layer's peers are told through its step (so are
      // the refusals below).
      const bool backward = d.op == uint32_t(ipc::Op::kBackward);
      ServedLayer& layer = *ref->layer;
      layer_name = layer.name();
      st = layer.refuse_step(
          backward, s->id, d.sequence,
          unknown_flags != 0
              ? unknown_flags_status()
              : Status::ResourceExhausted("tenant '" + s->tenant +
                                          "' has its quota of requests in flight; wait for completions"));
      if (layer.definition().group) metrics_.set_peer_state(s->tenant + "/" + layer_name, layer.group_error().empty());
    } else {
      ServedLayer& layer = *ref->layer;
      layer_name = layer.name();
      const LayerSpec& spec = layer.definition().spec;
      const uint64_t M = spec.model_dim, O = spec.out_dim();
      const bool backward = d.op == uint32_t(ipc::Op::kBackward);
      auto refuse = [&](Status why) { return layer.refuse_step(backward, s->id, d.sequence, std::move(why)); };
      Result<RequestMemory> mem = request_memory(*s, d, layer);
      if (!mem.ok()) {
        st = refuse(mem.status());
      } else if (d.tokens < 0 || d.tokens > (int64_t{1} << 30) / spec.k) {
        // An empty batch (0) is a request like any other: an expert-parallel rank's peers need
        // its part of the step's collectives.
        st = refuse(Status::InvalidArgument("tokens = " + std::to_string(d.tokens) +
                                            " is out of range: a request carries 0 to 2^30 / k = " +
                                            std::to_string((int64_t{1} << 30) / spec.k) + " tokens; split it"));
      } else if (!backward) {
        st = check_ranges(*mem, d, d.tokens * M * 4, d.tokens * O * 4, "x", "y");
        // Without noise: a training forward of a layer without gate noise is one already.
        if (st.ok() && (d.flags & ipc::kFlagWithoutNoise) != 0 && spec.gate_noise > 0)
          st = Status::InvalidArgument("layer '" + layer.name() + "' draws gate noise (gate_noise = " +
                                       std::to_string(spec.gate_noise) +
                                       ") in its training forwards: a training forward without it is not "
                                       "supported; run an inference, or train with the noise");
        if (st.ok() && (d.flags & kForwardOnly) == kForwardOnly)
          st = Status::InvalidArgument("a forward without gate noise (flag 8) takes no noise key (flag 16); "
                                       "clear one of them");
        if (!st.ok()) st = refuse(std::move(st));
        if (st.ok()) {
          const bool training = (d.flags & ipc::kFlagTraining) != 0;
          const std::optional<uint64_t> noise_key =
              (d.flags & ipc::kFlagNoiseKey) != 0 ? std::optional<uint64_t>(d.noise_key) : std::nullopt;
          auto run = [&] {
            return guarded([&] {
              return layer.forward(reinterpret_cast<const float*>(mem->base + d.input_offset), d.tokens,
                                   reinterpret_cast<float*>(mem->base + d.output_offset), training, s->id,
                                   d.sequence, mem->kind, noise_key);
            });
          };
          auto out = run();
          // Refused for the tenant's quota (which leaves nothing behind): plans the tenant's layers
          // keep for later requests must not crowd out a forward, so they go and it runs once more.
          // Never a group layer's: its forward is a collective, which one rank cannot repeat alone.
          if (!layer.definition().group && !out.ok() &&
              out.status().code() == StatusCode::kResourceExhausted && registry_->trim_idle_plans(s->tenant) > 0)
            out = run();
          if (out.ok()) {
            c.l_aux = out->stats.l_aux;
            c.capacity = out->stats.capacity;
            c.dropped = out->stats.dropped;
            tokens = d.tokens;
            dropped = out->stats.dropped;
            // An empty batch on a layer without [group] has no capacity to show (a group layer's
            // is the group's).
            if ((d.tokens > 0 || layer.definition().group) && !layer.destroyed())
              metrics_.set_capacity(s->tenant, layer_name, out->stats.capacity);
          } else {
            st = out.status();
          }
        }
      } else {
        st = check_ranges(*mem, d, d.tokens * O * 4, d.tokens * M * 4, "dy", "dx");
        if (!st.ok()) st = refuse(std::move(st));
        if (st.ok())
          st = guarded([&] {
            return layer.backward(reinterpret_cast<const float*>(mem->base + d.input_offset), d.tokens, d.dl_aux,
                                  reinterpret_cast<float*>(mem->base + d.output_offset), s->id, d.sequence,
                                  mem->kind, (d.flags & ipc::kFlagKeepParamGrads) != 0);
          });
      }
      registry_->end_request(s->tenant);
      if (layer.definition().group && !layer.destroyed())
        metrics_.set_peer_state(s->tenant + "/" + layer_name, layer.group_error().empty());
      // Destroyed while this request ran: its series went with it, and it is counted as a request
      // of no layer rather than bring them back.
      if (layer.destroyed()) layer_name.clear();
    }
    if (!st.ok()) set_message(c, st);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    metrics_.record_request(s->tenant, layer_name, op_name, st.ok(), secs, tokens, dropped);
    // The client keeps at most kRingSlots requests outstanding, so the completion ring has
    // room; a client that breaks that rule (or corrupts the ring's indices, which reads as full)
    // waits here until it reads or goes away. Asleep: the client does not wake a producer, and
    // spinning would burn a core per such session.
    for (auto nap = std::chrono::microseconds(50); !s->completions.try_push(c);
         nap = std::min(2 * nap, std::chrono::microseconds(2000))) {
      if (stopped()) return;
      std::this_thread::sleep_for(nap);
    }
  }
}

}  // namespace tutel::daemon
