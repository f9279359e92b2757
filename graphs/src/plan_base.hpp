// The half of a plan every kind shares: the buffer layout, the recorded op program, and the
// step algorithm (phases, capacity, stats). A kind decides only how a phase runs (in order, or
// as a CUDA graph) and where the step's inputs and outputs live.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <vector>

#include "tutel/graphs/plan.hpp"

namespace tutel::graphs::detail {

// Every buffer of a plan, carved from one allocation.
enum class Slot : uint8_t {
  // routing, sized by the token bucket T
  kNoise,
  kScores,
  kExpertIndex,
  kGates,
  kLocation,
  kLAux,
  kExpertCount,
  // experts, sized by the capacity bucket
  kSlotAssignment,
  kDispatched,
  kPreActivation,
  kHidden,
  kExpertOut,
  kWorkspace,
  // backward (training keys)
  kDGates,
  kDLogits,
  kDExpertOut,
  kDHidden,
  kDDispatched,
  // the step's own inputs and outputs (kinds whose ops must see fixed addresses)
  kX,
  kY,
  kDy,
  kDx,
  kCount,
};

class PlanLayout {
 public:
  // weights_bf16: the target's expert weights come with both bf16 copies (smaller workspace).
  PlanLayout(const Backend& backend, const LayerSpec& spec, const PlanKey& key, bool io_buffers,
             bool weights_bf16);
  size_t offset(Slot s) const { return offset_[static_cast<size_t>(s)]; }
  size_t bytes(Slot s) const { return bytes_[static_cast<size_t>(s)]; }
  size_t total() const { return total_; }

 private:
  std::array<size_t, static_cast<size_t>(Slot::kCount)> offset_{}, bytes_{};
  size_t total_ = 0;
};

// The per-step values the recorded ops read: everything that may differ between replays.
struct StepState {
  int64_t tokens = 0;    // S
  int64_t capacity = 0;  // C
  uint64_t noise_counter = 0;
  float dl_aux = 0.f;
  TensorView x, y, dy, dx;
};

// The phases of a step. Noise runs outside any graph (its counter changes every step); route
// ends with the host read of the expert counts and l_aux; experts needs the capacity.
enum class Phase : uint8_t { kNoise, kRoute, kExperts, kBackward, kCount };

using Op = std::function<Status(const StepState&)>;

class PlanBase : public Plan {
 public:
  const PlanKey& key() const override { return key_; }
  const LayerSpec& spec() const override { return target_.spec; }
  size_t bytes() const override { return arena_.bytes(); }
  Result<RoutingStats> forward(TensorView x, uint64_t noise_counter, TensorView y) override;
  Status backward(TensorView x, TensorView dy, float dl_aux, TensorView dx) override;
  int64_t required_capacity() const override { return required_capacity_; }
  int64_t tokens() const override { return tokens_; }
  int64_t capacity() const override { return capacity_; }
  bool has_forward() const override { return has_forward_; }
  TensorView expert_index() const override;
  TensorView location() const override;
  TensorView gates() const override;
  TensorView input(int64_t tokens) const override;
  TensorView output(int64_t tokens) const override;
  const PlanStats& stats() const override { return stats_; }

 protected:
  PlanBase(Backend& backend, const PlanTarget& target, const PlanKey& key, bool io_buffers);

  // Allocates the buffers and records the program; `counts_host`/`l_aux_host` receive the
  // route phase's host read (E i32 and one f32).
  Status init(int32_t* counts_host, float* l_aux_host);

  // Runs the ops of `phases` (in order) for one step.
  virtual Status run(std::initializer_list<Phase> phases, const StepState& st) = 0;
  // Issues a device-to-host read of `bytes` as an op of its phase; the data must be on the host
  // once run() of that phase has returned and the backend has synchronized. `after_forked_work`:
  // the data is written by work the backend may have forked off the captured step's critical
  // path (l_aux, Backend::join_forked_work), so the read waits for it.
  virtual Status read_to_host(void* host, const void* device, size_t bytes,
                              bool after_forked_work) = 0;
  // Point the step at its tensors (host: the caller's; fixed buffers: copy in) and back out.
  virtual Status bind_forward(TensorView x, TensorView y, StepState& st) = 0;
  virtual Status finish_forward(TensorView y, const StepState& st) = 0;
  virtual Status bind_backward(TensorView x, TensorView dy, TensorView dx, StepState& st) = 0;
  virtual Status finish_backward(TensorView dx, const StepState& st) = 0;

  // Runs one phase's recorded ops in order.
  Status run_ops(Phase phase, const StepState& st) const;
  TensorView view(Slot slot, DType dtype, Shape shape) const;
  void* slot_data(Slot slot) const;
  bool has_io_buffers() const { return io_buffers_; }

  Backend& backend_;
  PlanTarget target_;
  PlanKey key_;
  PlanStats stats_;

 private:
  void record();

  bool io_buffers_;
  PlanLayout layout_;
  DeviceBuffer arena_;
  std::array<std::vector<Op>, static_cast<size_t>(Phase::kCount)> program_;
  bool static_capacity_;  // f > 0: C depends on S only, so route and experts run as one phase set
  int32_t* counts_host_ = nullptr;
  float* l_aux_host_ = nullptr;
  int64_t tokens_ = 0, capacity_ = 0, required_capacity_ = 0;
  bool has_forward_ = false;
};

// Kinds (the registry in plan.cpp picks one).
Result<std::unique_ptr<Plan>> make_host_plan(Backend& backend, const PlanTarget& target,
                                             const PlanKey& key);
#if defined(TUTEL_HAVE_CUDA)
Result<std::unique_ptr<Plan>> make_cuda_graph_plan(Backend& backend, const PlanTarget& target,
                                                   const PlanKey& key);
#endif

}  // namespace tutel::graphs::detail
