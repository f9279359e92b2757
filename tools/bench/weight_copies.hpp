// What `tutel-bench layer` needs to run bf16 matmuls as a trainer would with
// --weights-bf16 on: the expert weights' bf16 copies, made once at setup and kept current by the
// optimizer step (param_bf16), instead of converting the f32 weights on every matmul.
#pragma once

#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::bench {

// The bf16 copies of one layer's two expert weights, owned here as the daemon owns its layers'.
class WeightCopies {
 public:
  // Allocates and fills the copies of w's fc1 and fc2 weights, and points w at them.
  Status attach(Backend& b, ExpertWeights& w) {
    TUTEL_ASSIGN_OR_RETURN(fc1_, b.allocate(w.fc1_weight.numel() * sizeof(uint16_t)));
    TUTEL_ASSIGN_OR_RETURN(fc2_, b.allocate(w.fc2_weight.numel() * sizeof(uint16_t)));
    w.fc1_weight_bf16 = TensorView(fc1_.data(), DType::kBF16, w.fc1_weight.shape(), b.device());
    w.fc2_weight_bf16 = TensorView(fc2_.data(), DType::kBF16, w.fc2_weight.shape(), b.device());
    TUTEL_RETURN_IF_ERROR(b.convert(w.fc1_weight, w.fc1_weight_bf16));
    return b.convert(w.fc2_weight, w.fc2_weight_bf16);
  }

 private:
  DeviceBuffer fc1_, fc2_;
};

// The bench's optimizer step: plain SGD over every parameter of the layer, with a learning rate
// small enough to leave the routing as it was. Expert weights that have bf16 copies get them
// rewritten in the same pass.
inline Status sgd_step_all(Backend& b, const LayerWeights& w, const LayerWeights& g) {
  constexpr float kLr = 1e-6f;
  const struct {
    TensorView param, grad, copy;
  } tensors[] = {{w.gate_weight, g.gate_weight, {}},
                 {w.experts.fc1_weight, g.experts.fc1_weight, w.experts.fc1_weight_bf16},
                 {w.experts.fc1_bias, g.experts.fc1_bias, {}},
                 {w.experts.fc2_weight, g.experts.fc2_weight, w.experts.fc2_weight_bf16},
                 {w.experts.fc2_bias, g.experts.fc2_bias, {}}};
  for (const auto& t : tensors) {
    if (t.param.empty()) continue;
    SgdArgs step{t.param, t.grad, {}, kLr};
    step.param_bf16 = t.copy;
    TUTEL_RETURN_IF_ERROR(b.sgd_step(step));
  }
  return Status::OK();
}

}  // namespace tutel::bench
