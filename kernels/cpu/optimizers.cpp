#include "cpu/optimizers.hpp"

#include "cpu/parallel_work.hpp"

#include <algorithm>
#include <cmath>

namespace tutel::cpu {
namespace {

// Runs update(begin, end) over [0, n) in blocks that stay in L1, each followed by the bf16 copy
// of its stretch of `param` when `copy` is given: one pass over memory, and inner loops without
// a branch on the copy, which the compiler can vectorize.
template <typename Update>
void step_in_blocks(int64_t n, const float* param, uint16_t* copy, const Update& update) {
  constexpr int64_t kBlock = 2048;
#pragma omp parallel for schedule(static) if (parallel: worth_a_team(4 * n))  // a few flops per element
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    const int64_t end = std::min(n, begin + kBlock);
    update(begin, end);
    if (!copy) continue;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) copy[i] = f32_to_bf16(param[i]);
  }
}

}  // namespace

Status sgd_step(const SgdArgs& a) {
  const int64_t n = a.param.numel();
  float* p = a.param.data_as<float>();
  const float* g = a.grad.data_as<float>();
  float* buf = a.momentum_buffer.empty() ? nullptr : a.momentum_buffer.data_as<float>();
  if (a.momentum != 0.f && !buf)
    return Status::InvalidArgument("sgd with momentum needs a momentum buffer");
  if (!a.param_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(a.param, a.param_bf16, "sgd param_bf16"));
  uint16_t* copy = a.param_bf16.empty() ? nullptr : a.param_bf16.data_as<uint16_t>();
  // PyTorch's SGD (dampening 0): the first step initialises the buffer with the gradient.
  step_in_blocks(n, p, copy, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float d = g[i] + a.weight_decay * p[i];
      if (buf) {
        buf[i] = a.first_step ? d : a.momentum * buf[i] + d;
        d = a.nesterov ? d + a.momentum * buf[i] : buf[i];
      }
      p[i] -= a.lr * d;
    }
  });
  return Status::OK();
}

Status adamw_step(const AdamWArgs& a) {
  if (a.step < 1) return Status::InvalidArgument("adamw step count must be >= 1");
  const int64_t n = a.param.numel();
  float* p = a.param.data_as<float>();
  const float* g = a.grad.data_as<float>();
  float* m = a.exp_avg.data_as<float>();
  float* v = a.exp_avg_sq.data_as<float>();
  if (!a.param_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(a.param, a.param_bf16, "adamw param_bf16"));
  uint16_t* copy = a.param_bf16.empty() ? nullptr : a.param_bf16.data_as<uint16_t>();
  // PyTorch's AdamW: decoupled decay, bias corrections folded into the step size.
  const double bc1 = 1.0 - std::pow(a.beta1, double(a.step));
  const double bc2 = 1.0 - std::pow(a.beta2, double(a.step));
  const float step_size = static_cast<float>(a.lr / bc1);
  const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  const float decay = 1.f - a.lr * a.weight_decay;
  const float beta1 = static_cast<float>(a.beta1), one_minus_beta1 = static_cast<float>(1.0 - a.beta1);
  const float beta2 = static_cast<float>(a.beta2), one_minus_beta2 = static_cast<float>(1.0 - a.beta2);
  step_in_blocks(n, p, copy, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      p[i] *= decay;
      m[i] = beta1 * m[i] + one_minus_beta1 * g[i];
      v[i] = beta2 * v[i] + one_minus_beta2 * g[i] * g[i];
      p[i] -= step_size * m[i] / (std::sqrt(v[i]) / bc2_sqrt + a.eps);
    }
  });
  return Status::OK();
}

}  // namespace tutel::cpu
