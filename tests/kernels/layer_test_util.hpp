// Shared by the layer tests: random layers, device copies of them, and tolerance checks
// against the float64 reference (reference_moe.hpp).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "reference_moe.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::testing {

inline ref::Activation to_ref(Activation a) {
  switch (a) {
    case Activation::kRelu: return ref::Activation::kRelu;
    case Activation::kGelu: return ref::Activation::kGelu;
    case Activation::kSilu: return ref::Activation::kSilu;
  }
  return ref::Activation::kRelu;
}

inline ref::Config to_ref(const LayerSpec& s, int64_t tokens) {
  ref::Config c{tokens, s.model_dim, s.hidden, s.out_dim(), s.experts, s.k};
  c.capacity_factor = s.capacity_factor;
  c.activation = to_ref(s.activation);
  c.normalize_gate = s.normalize_gate;
  c.batch_prioritized = s.batch_prioritized;
  c.is_postscore = s.is_postscore;
  c.has_fc1_bias = s.has_fc1_bias;
  c.has_fc2_bias = s.has_fc2_bias;
  c.alignment = s.alignment;
  return c;
}

inline std::vector<double> randn(std::mt19937_64& rng, size_t n, double scale) {
  std::normal_distribution<double> d(0.0, scale);
  std::vector<double> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// The values the f32 implementation sees: every reference input rounded to f32 first, so the
// reference and the kernel start from identical numbers.
inline std::vector<double> round_f32(std::vector<double> v) {
  for (auto& x : v) x = static_cast<double>(static_cast<float>(x));
  return v;
}

inline std::vector<float> to_f32(const std::vector<double>& v) {
  return std::vector<float>(v.begin(), v.end());
}

inline ref::Params random_params(std::mt19937_64& rng, const LayerSpec& s) {
  const size_t E = s.experts, M = s.model_dim, H = s.hidden, O = s.out_dim();
  ref::Params p;
  p.wg = round_f32(randn(rng, E * M, 1.0 / std::sqrt(double(M))));
  p.fc1_w = round_f32(randn(rng, E * H * M, 1.0 / std::sqrt(double(M))));
  p.fc2_w = round_f32(randn(rng, E * H * O, 1.0 / std::sqrt(double(H))));
  if (s.has_fc1_bias) p.fc1_b = round_f32(randn(rng, E * H, 0.1));
  if (s.has_fc2_bias) p.fc2_b = round_f32(randn(rng, E * O, 0.1));
  return p;
}

// A tensor on the backend's device, filled from and read back to host vectors.
class DeviceTensor {
 public:
  DeviceTensor(Backend& b, DType dtype, Shape shape) : backend_(&b), dtype_(dtype), shape_(shape) {
    auto buf = b.allocate(std::max<size_t>(1, shape.numel() * dtype_size(dtype)));
    EXPECT_TRUE(buf.ok()) << buf.status();
    buffer_ = std::move(buf).value();
    EXPECT_TRUE(b.fill_zero(view()).ok());
  }
  TensorView view() const { return TensorView(buffer_.data(), dtype_, shape_, backend_->device()); }
  void upload(const std::vector<float>& host) {
    ASSERT_EQ(static_cast<int64_t>(host.size()), shape_.numel());
    ASSERT_TRUE(backend_->copy(buffer_.data(), host.data(), host.size() * 4, CopyKind::kHostToDevice).ok());
  }
  template <typename T>
  void upload_as(const std::vector<T>& host) {
    ASSERT_EQ(static_cast<int64_t>(host.size() * sizeof(T)), shape_.numel() * static_cast<int64_t>(dtype_size(dtype_)));
    ASSERT_TRUE(backend_->copy(buffer_.data(), host.data(), host.size() * sizeof(T), CopyKind::kHostToDevice).ok());
  }
  std::vector<float> download() const {
    std::vector<float> host(shape_.numel());
    EXPECT_TRUE(backend_->copy(host.data(), buffer_.data(), host.size() * 4, CopyKind::kDeviceToHost).ok());
    return host;
  }
  template <typename T>
  std::vector<T> download_as() const {
    std::vector<T> host(shape_.numel());
    EXPECT_TRUE(backend_->copy(host.data(), buffer_.data(), host.size() * sizeof(T), CopyKind::kDeviceToHost).ok());
    return host;
  }

 private:
  Backend* backend_;
  DType dtype_;
  Shape shape_;
  DeviceBuffer buffer_;
};

// An f32 tensor of `shape` on b's device, filled with N(0, scale²) draws.
inline DeviceTensor random_tensor(Backend& b, std::mt19937_64& rng, Shape shape, double scale) {
  DeviceTensor t(b, DType::kF32, shape);
  t.upload(to_f32(randn(rng, shape.numel(), scale)));
  return t;
}

// Parameters (or gradients) of one layer on a device.
struct DeviceLayer {
  DeviceTensor wg, fc1_w, fc1_b, fc2_w, fc2_b;
  bool has_b1, has_b2;

  DeviceLayer(Backend& b, const LayerSpec& s)
      : wg(b, DType::kF32, {s.experts, s.model_dim}),
        fc1_w(b, DType::kF32, {s.experts, s.hidden, s.model_dim}),
        fc1_b(b, DType::kF32, {s.experts, s.hidden}),
        fc2_w(b, DType::kF32, {s.experts, s.hidden, s.out_dim()}),
        fc2_b(b, DType::kF32, {s.experts, s.out_dim()}),
        has_b1(s.has_fc1_bias),
        has_b2(s.has_fc2_bias) {}

  void upload(const ref::Params& p) {
    wg.upload(to_f32(p.wg));
    fc1_w.upload(to_f32(p.fc1_w));
    fc2_w.upload(to_f32(p.fc2_w));
    if (has_b1) fc1_b.upload(to_f32(p.fc1_b));
    if (has_b2) fc2_b.upload(to_f32(p.fc2_b));
  }
  LayerWeights weights() const {
    LayerWeights w;
    w.gate_weight = wg.view();
    w.experts.fc1_weight = fc1_w.view();
    w.experts.fc2_weight = fc2_w.view();
    if (has_b1) w.experts.fc1_bias = fc1_b.view();
    if (has_b2) w.experts.fc2_bias = fc2_b.view();
    return w;
  }
};

// |got - want| <= atol_frac·max(max|want|, 1e-2) + rtol·|want| elementwise; reports the worst
// element. The 1e-2 floor covers tensors that are exactly zero in float64 but are f32 sums of
// O(1) terms that cancel (e.g. the aux-loss gradient when every expert has the same top-1 count).
inline ::testing::AssertionResult all_close(const std::string& what, const std::vector<float>& got,
                                            const std::vector<double>& want, double rtol,
                                            double atol_frac) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << what << ": size " << got.size() << " != " << want.size();
  double scale = 0.0;
  // A reference that is not finite would pass anything: a NaN makes every ratio NaN (never above
  // the worst), an infinity makes the tolerance infinite.
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(want[i]))
      return ::testing::AssertionFailure() << what << ": the reference at [" << i << "] is " << want[i];
    scale = std::max(scale, std::abs(want[i]));
  }
  const double atol = atol_frac * std::max(scale, 1e-2);
  double worst = 0.0;
  size_t worst_i = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (!std::isfinite(got[i])) return ::testing::AssertionFailure() << what << "[" << i << "] is " << got[i];
    const double ratio = std::abs(got[i] - want[i]) / (atol + rtol * std::abs(want[i]));
    if (ratio > worst) worst = ratio, worst_i = i;
  }
  if (worst <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << "[" << worst_i << "] = " << got[worst_i] << ", reference "
                                       << want[worst_i] << " (error " << worst << "x the tolerance, max|ref| "
                                       << scale << ")";
}

}  // namespace tutel::testing
