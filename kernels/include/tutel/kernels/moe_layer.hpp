// The MoE layer of DESIGN §2 on one rank (W = 1), composed from Backend ops.
//
// Every backend runs this same sequence: gate → locations → capacity → slot map → encode →
// experts → decode, and its mirror for backward. Distributed execution (comm/, graphs/) inserts
// the exchanges between encode/experts/decode and reuses the pieces here.
// Thread-safety: functions are reentrant; a LayerWorkspace belongs to one micro-batch at a time.
#pragma once

#include <cstdint>
#include <string>

#include "tutel/core/status.hpp"
#include "tutel/core/tensor.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel {

// Tutel's parameter names, so a Tutel moe_layer state dict loads unchanged.
inline constexpr const char* kGateWeightName = "gates.0.wg.weight";
inline constexpr const char* kFc1WeightName = "experts.batched_fc1_w";
inline constexpr const char* kFc1BiasName = "experts.batched_fc1_bias";
inline constexpr const char* kFc2WeightName = "experts.batched_fc2_w";
inline constexpr const char* kFc2BiasName = "experts.batched_fc2_bias";

struct LayerSpec {
  int64_t experts = 0;     // E
  int64_t model_dim = 0;   // M
  int64_t hidden = 0;      // H per expert
  int64_t output_dim = 0;  // O (0 means M)
  int k = 2;
  double capacity_factor = 1.0;  // f > 0, 0 (dropless) or < 0 (dropless up to a limit)
  Activation activation = Activation::kRelu;
  bool normalize_gate = true;
  bool batch_prioritized = false;
  bool is_postscore = true;
  bool has_fc1_bias = true;
  bool has_fc2_bias = true;
  double gate_noise = 0.0;          // training only: logits += gate_noise·randn/E
  uint64_t noise_seed = 0;          // seed of the gate-noise generator
  DType matmul_dtype = DType::kF32; // expert GEMM inputs (f32, or bf16 with f32 accumulation)
  int64_t alignment = 1;            // s·d; capacity is rounded up to it (Tutel's rule)

  int64_t out_dim() const { return output_dim > 0 ? output_dim : model_dim; }
  // The dtype encode writes the dispatched tokens in, which the exchange carries and the expert
  // GEMMs read (forward, and the weight gradient's GEMM in backward): bf16 under bf16 matmuls,
  // whose GEMMs read only the rounding anyway, so nothing changes but half the bytes.
  DType dispatch_dtype() const { return matmul_dtype == DType::kBF16 ? DType::kBF16 : DType::kF32; }
  // Explains the first invalid field, e.g. "k = 3 exceeds experts = 2".
  Status validate() const;
};

// Capacity for S tokens (S already the group maximum with inequivalent tokens) and the largest
// expert count (group maximum), with the alignment rule. Pure: shared by every backend and rank.
int64_t layer_capacity(const LayerSpec& spec, int64_t tokens, int64_t max_expert_count);

// Device views of the parameters (or of their gradients), Tutel layouts, f32; the expert
// weights may come with bf16 copies (ExpertWeights), read when spec.matmul_dtype is bf16.
struct LayerWeights {
  TensorView gate_weight;  // [E, M]
  ExpertWeights experts;   // fc1 [E, H, M], b1 [E, H], fc2 [E, H, O], b2 [E, O]
  // Checks every shape and dtype against the spec; `what` prefixes messages ("weights").
  Status validate(const LayerSpec& spec, std::string_view what) const;
};

struct RoutingStats {
  int64_t capacity = 0;
  int64_t dropped = 0;  // (token, choice) assignments that did not fit in capacity
  float l_aux = 0.f;
};

// Buffers for one micro-batch: sized on first use, grown when tokens or capacity grow, reused
// otherwise. forward() leaves in it what backward() needs.
class LayerWorkspace {
 public:
  LayerWorkspace() = default;
  LayerWorkspace(LayerWorkspace&&) = default;
  LayerWorkspace& operator=(LayerWorkspace&&) = default;

  int64_t tokens() const { return tokens_; }
  int64_t capacity() const { return capacity_; }
  bool has_forward() const { return has_forward_; }
  const RoutingStats& stats() const { return stats_; }
  // Routing of the last forward, on the backend's device: [S, k] i32, i32 and f32.
  TensorView expert_index(Device d) const;
  TensorView location(Device d) const;
  TensorView gates(Device d) const;

 private:
  friend Status layer_forward(Backend&, const LayerSpec&, const LayerWeights&, TensorView,
                              uint64_t, bool, LayerWorkspace&, TensorView, RoutingStats*);
  friend Status layer_backward(Backend&, const LayerSpec&, const LayerWeights&, TensorView,
                               LayerWorkspace&, TensorView, float, TensorView,
                               const LayerWeights&);

  Status reserve_routing(Backend& b, const LayerSpec& spec, int64_t tokens);
  Status reserve_experts(Backend& b, const LayerSpec& spec, int64_t capacity, bool training,
                         const ExpertWeights& weights);
  // Sized for these weights: smaller when both come with bf16 copies.
  Status reserve_expert_workspace(Backend& b, const LayerSpec& spec, int64_t capacity,
                                  const ExpertWeights& weights);

  int64_t tokens_ = 0, capacity_ = 0;
  // The spec the last forward's buffers were laid out for: a backward must have its shapes.
  LayerSpec spec_;
  bool has_forward_ = false, trained_ = false;
  RoutingStats stats_;
  // Routing, sized by tokens.
  DeviceBuffer noise_, scores_, expert_index_, gates_, location_, l_aux_, d_gates_, d_logits_;
  // Experts, sized by capacity.
  DeviceBuffer expert_count_, slot_assignment_, dispatched_, pre_activation_, hidden_,
      expert_out_, workspace_;
  DeviceBuffer d_expert_out_, d_hidden_, d_dispatched_;
};

// Forward of the whole layer. `noise_counter` selects the gate-noise draw when training with
// gate_noise > 0 (the seed is the spec's). `training` keeps what backward needs.
Status layer_forward(Backend& backend, const LayerSpec& spec, const LayerWeights& weights,
                     TensorView x, uint64_t noise_counter, bool training, LayerWorkspace& ws,
                     TensorView y, RoutingStats* stats);

// Backward from the workspace of a training forward on the same x. dx is overwritten; the
// parameter gradients in `grads` are accumulated (zero them to start).
Status layer_backward(Backend& backend, const LayerSpec& spec, const LayerWeights& weights,
                      TensorView x, LayerWorkspace& ws, TensorView dy, float dl_aux,
                      TensorView dx, const LayerWeights& grads);

}  // namespace tutel
