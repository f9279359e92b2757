// Plan: one layer step for one PlanKey, built once over preallocated buffers and replayed for
// every request of that key (DESIGN §3 "Plans and graphs").
//
// Building records the op sequence of the step (gate → locations → capacity → slot map →
// encode → experts → decode, and its backward mirror) over buffers sized for the key's token and
// capacity buckets. A replay runs those ops on views of the first S rows and the real capacity C,
// so routing, capacity and l_aux come from the request's own tokens, never from padding, and
// the results equal kernels' eager layer_forward/layer_backward bit for bit (on the backend that
// ran the ops). Two kinds:
//   host:       the recorded ops replayed in order (any backend; the CPU executor's plan);
//   cuda-graph: the same ops captured as CUDA graphs on the backend's stream and launched.
// A replay allocates no device memory.
//
// A plan holds the state of one micro-batch: backward uses what the last training forward on
// the same plan left. Parameters and gradient accumulators are the caller's and are bound at
// build (a CUDA graph bakes their addresses): they must stay in place for the plan's life. So
// must the expert weights' bf16 copies when the target has them (ExpertWeights): the caller
// refreshes them in place after each optimizer step (param_bf16), and replays read the new
// values. With both copies a bf16 plan's workspace holds activations only (for a decode-sized
// bucket, a small fraction of one holding the converted weights).
// Thread-safety: a Plan is used by one thread at a time, like its Backend.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "tutel/core/status.hpp"
#include "tutel/core/tensor.hpp"
#include "tutel/graphs/plan_key.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::graphs {

// What a plan computes on. `grads` (accumulated by backward) is needed for training keys only.
struct PlanTarget {
  LayerSpec spec;
  LayerWeights weights;
  LayerWeights grads;
  // Prefixes the errors of building this layer's plans: "layer <id>" when unset; nothing when
  // empty, for a caller that names the layer in its own messages (the daemon).
  std::optional<std::string> error_context;
};

enum class PlanKind : uint8_t {
  kAuto,       // cuda-graph where the backend has a native stream and CUDA is built, else host
  kHost,       // recorded ops replayed in order
  kCudaGraph,  // CUDA graphs on the backend's stream
};
std::string_view plan_kind_name(PlanKind kind);

// Counters of one plan (how its steps ran).
struct PlanStats {
  uint64_t forwards = 0;         // completed forward steps
  uint64_t backwards = 0;        // completed backward steps
  uint64_t capacity_misses = 0;  // forwards refused: the routing needed a bigger capacity bucket
  // cuda-graph plans: a step shape (S, C, ...) runs op by op the first time it is seen (that
  // also warms the backend's scratch), and is captured the second time and launched from then.
  uint64_t eager_phases = 0;
  uint64_t graph_launches = 0;
  uint64_t captures = 0;
  uint64_t graph_updates = 0;   // captures applied to an existing executable (cudaGraphExecUpdate)
  uint64_t instantiations = 0;  // captures that needed a new executable
  uint64_t capture_failures = 0;  // shapes whose capture (or instantiation) failed: op by op from then on
};

class Plan {
 public:
  virtual ~Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  virtual const PlanKey& key() const = 0;
  virtual const LayerSpec& spec() const = 0;
  virtual PlanKind kind() const = 0;
  // Device memory the plan holds (its buffers).
  virtual size_t bytes() const = 0;

  // Forward of S = x.dim(0) tokens, 1 <= S <= key().token_bucket: x [S, M] f32, y [S, O] f32 on
  // the backend's device (a cuda-graph plan also takes host memory, and copies). noise_counter
  // selects the gate-noise draw (training with gate_noise > 0), as in layer_forward.
  // OutOfRange when the routing needs a capacity above key().capacity_bucket (dynamic capacity,
  // f <= 0): required_capacity() says how much; y is untouched; run the request on a plan whose
  // bucket holds it (PlanCache::forward does).
  virtual Result<RoutingStats> forward(TensorView x, uint64_t noise_counter, TensorView y) = 0;
  // Backward of the last training forward on this plan, for the same x: dx [S, M] is
  // overwritten, the target's gradients are accumulated.
  virtual Status backward(TensorView x, TensorView dy, float dl_aux, TensorView dx) = 0;

  // The capacity the last forward needed (also when it was refused).
  virtual int64_t required_capacity() const = 0;
  // Tokens and capacity of the last completed forward.
  virtual int64_t tokens() const = 0;
  virtual int64_t capacity() const = 0;
  virtual bool has_forward() const = 0;
  // Routing of the last forward on the backend's device: [S, k] i32, i32, f32.
  virtual TensorView expert_index() const = 0;
  virtual TensorView location() const = 0;
  virtual TensorView gates() const = 0;
  // The plan's own input and output rows for `tokens` tokens where it has them (cuda-graph): a
  // caller that writes x there and passes these views saves the copies. Empty for host plans,
  // which run on the caller's tensors directly.
  virtual TensorView input(int64_t tokens) const = 0;
  virtual TensorView output(int64_t tokens) const = 0;

  virtual const PlanStats& stats() const = 0;

 protected:
  Plan() = default;
};

// The kind kAuto resolves to on this backend.
PlanKind resolve_plan_kind(const Backend& backend, PlanKind kind);

// Device bytes a plan of this key and kind holds (what the cache budgets before building).
// weights_bf16: the target's expert weights come with both bf16 copies
// (ExpertWeights::has_bf16_copies()).
size_t plan_bytes(const Backend& backend, const LayerSpec& spec, const PlanKey& key, PlanKind kind,
                  bool weights_bf16 = false);

// Builds the plan: checks the key (check_buildable), the target's shapes, allocates the buffers
// and records the ops. kCudaGraph is Unavailable in a build without CUDA or on a backend without
// a native stream.
Result<std::unique_ptr<Plan>> build_plan(Backend& backend, const PlanTarget& target,
                                         const PlanKey& key, PlanKind kind = PlanKind::kAuto);

}  // namespace tutel::graphs
