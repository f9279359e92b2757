// The buffer layout of a plan: every tensor of the step at its bucket's size, in one allocation.
#include <algorithm>

#include "plan_base.hpp"

namespace tutel::graphs::detail {
namespace {

// Each tensor starts on its own 256-byte boundary: what cuBLAS and vector loads like best, and a
// multiple of the 64 bytes every backend allocation guarantees.
constexpr size_t kSlotAlign = 256;

}  // namespace

PlanLayout::PlanLayout(const Backend& backend, const LayerSpec& spec, const PlanKey& key,
                       bool io_buffers, bool weights_bf16) {
  const size_t T = static_cast<size_t>(key.token_bucket),
               C = static_cast<size_t>(key.capacity_bucket);
  const size_t E = spec.experts, k = spec.k, M = spec.model_dim, H = spec.hidden,
               O = spec.out_dim();
  const bool training = key.training;
  // A present slot is never 0 bytes, so its address is never null even when C = 0 (absent
  // slots have no address, and their views are empty, as layer_forward's absent buffers).
  auto set = [&](Slot s, size_t bytes) {
    bytes_[static_cast<size_t>(s)] = std::max<size_t>(bytes, 1);
  };

  if (training && spec.gate_noise > 0) set(Slot::kNoise, T * E * 4);
  set(Slot::kScores, T * E * 4);
  set(Slot::kExpertIndex, T * k * 4);
  set(Slot::kGates, T * k * 4);
  set(Slot::kLocation, T * k * 4);
  set(Slot::kLAux, 4);
  set(Slot::kExpertCount, E * 4);

  set(Slot::kSlotAssignment, E * C * 4);
  set(Slot::kDispatched, E * C * M * dtype_size(spec.dispatch_dtype()));
  // relu's derivative is read off its output; gelu and silu need the pre-activation.
  if (training && spec.activation != Activation::kRelu) set(Slot::kPreActivation, E * C * H * 4);
  set(Slot::kHidden, E * C * H * 4);
  set(Slot::kExpertOut, E * C * O * 4);
  // The workspace need grows with C, so the bucket's size serves every C <= it. At least 64
  // bytes, as layer_forward's workspace, so the view handed to the ops is never empty.
  ExpertShape shape{spec.experts, key.capacity_bucket, spec.model_dim, spec.hidden, spec.out_dim()};
  shape.weights_bf16 = weights_bf16;
  set(Slot::kWorkspace,
      std::max<size_t>(backend.expert_workspace_bytes(shape, spec.matmul_dtype), 64));

  if (training) {
    set(Slot::kDGates, T * k * 4);
    set(Slot::kDLogits, T * E * 4);
    set(Slot::kDExpertOut, E * C * O * 4);
    set(Slot::kDHidden, E * C * H * 4);
    set(Slot::kDDispatched, E * C * M * 4);
  }
  if (io_buffers) {
    set(Slot::kX, T * M * 4);
    set(Slot::kY, T * O * 4);
    if (training) {
      set(Slot::kDy, T * O * 4);
      set(Slot::kDx, T * M * 4);
    }
  }

  size_t at = 0;
  for (size_t i = 0; i < bytes_.size(); ++i) {
    offset_[i] = at;
    at += (bytes_[i] + kSlotAlign - 1) / kSlotAlign * kSlotAlign;
  }
  total_ = std::max<size_t>(at, kSlotAlign);
}

}  // namespace tutel::graphs::detail
