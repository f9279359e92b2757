// SGD (with momentum, Nesterov, weight decay) and AdamW against float64 transcriptions of
// PyTorch's update rules, over several steps on fresh random tensors. Tolerance: relative 1e-5
// (a handful of f32 roundings per step, compounded over 5 steps).
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "layer_test_util.hpp"

namespace tutel::testing {
namespace {

constexpr int kSteps = 5;
constexpr int64_t kSize = 1000;

struct Tensors {
  std::vector<double> param;
  std::vector<std::vector<double>> grads;  // one per step
};

Tensors draw(uint64_t seed) {
  std::mt19937_64 rng(seed);
  Tensors t{round_f32(randn(rng, kSize, 1.0)), {}};
  for (int s = 0; s < kSteps; ++s) t.grads.push_back(round_f32(randn(rng, kSize, 0.5)));
  return t;
}

struct SgdCase {
  float lr, momentum, weight_decay;
  bool nesterov;
};

class SgdTest : public ::testing::TestWithParam<SgdCase> {};

TEST_P(SgdTest, MatchesPyTorchRule) {
  const SgdCase c = GetParam();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Tensors t = draw(seed);
  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  DeviceTensor param(b, DType::kF32, {kSize}), grad(b, DType::kF32, {kSize}), buf(b, DType::kF32, {kSize});
  param.upload(to_f32(t.param));

  std::vector<double> p = t.param, m(kSize, 0.0);
  for (int s = 0; s < kSteps; ++s) {
    grad.upload(to_f32(t.grads[s]));
    SgdArgs a{param.view(), grad.view(), c.momentum != 0.f ? buf.view() : TensorView()};
    a.lr = c.lr;
    a.momentum = c.momentum;
    a.weight_decay = c.weight_decay;
    a.nesterov = c.nesterov;
    a.first_step = s == 0;
    ASSERT_TRUE(b.sgd_step(a).ok());
    for (int64_t i = 0; i < kSize; ++i) {
      double d = t.grads[s][i] + double(c.weight_decay) * p[i];
      if (c.momentum != 0.f) {
        m[i] = s == 0 ? d : double(c.momentum) * m[i] + d;
        d = c.nesterov ? d + double(c.momentum) * m[i] : m[i];
      }
      p[i] -= double(c.lr) * d;
    }
  }
  EXPECT_TRUE(all_close("param", param.download(), p, 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Variants, SgdTest,
                         ::testing::Values(SgdCase{0.1f, 0.f, 0.f, false}, SgdCase{0.05f, 0.9f, 0.f, false},
                                           SgdCase{0.05f, 0.9f, 1e-2f, false}, SgdCase{0.05f, 0.9f, 1e-2f, true}));

// PyTorch keeps the betas as Python floats (double): the default beta2 = 0.999 and 0.9999 are
// where an f32 beta's 1 − beta goes wrong (1.3e-5 and 1.7e-4 relative in the second moment).
class AdamWTest : public ::testing::TestWithParam<double> {};

TEST_P(AdamWTest, MatchesPyTorchRule) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const Tensors t = draw(seed);
  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  DeviceTensor param(b, DType::kF32, {kSize}), grad(b, DType::kF32, {kSize}), m1(b, DType::kF32, {kSize}),
      m2(b, DType::kF32, {kSize});
  param.upload(to_f32(t.param));
  const double lr = 1e-2, beta1 = 0.9, beta2 = GetParam(), eps = 1e-8, wd = 0.05;
  std::vector<double> p = t.param, m(kSize, 0.0), v(kSize, 0.0);
  for (int s = 1; s <= kSteps; ++s) {
    grad.upload(to_f32(t.grads[s - 1]));
    AdamWArgs a{param.view(), grad.view(), m1.view(), m2.view()};
    a.lr = float(lr);
    a.beta1 = beta1;
    a.beta2 = beta2;
    a.eps = float(eps);
    a.weight_decay = float(wd);
    a.step = s;
    ASSERT_TRUE(b.adamw_step(a).ok());
    for (int64_t i = 0; i < kSize; ++i) {
      const double g = t.grads[s - 1][i];
      p[i] *= 1.0 - lr * wd;
      m[i] = beta1 * m[i] + (1 - beta1) * g;
      v[i] = beta2 * v[i] + (1 - beta2) * g * g;
      const double m_hat = m[i] / (1 - std::pow(beta1, s)), v_hat = v[i] / (1 - std::pow(beta2, s));
      p[i] -= lr * m_hat / (std::sqrt(v_hat) + eps);
    }
  }
  EXPECT_TRUE(all_close("param", param.download(), p, 1e-5, 1e-6));
  EXPECT_TRUE(all_close("exp_avg", m1.download(), m, 1e-5, 1e-6));
  EXPECT_TRUE(all_close("exp_avg_sq", m2.download(), v, 1e-5, 1e-6));
}

INSTANTIATE_TEST_SUITE_P(Beta2, AdamWTest, ::testing::Values(0.98, 0.999, 0.9999));

TEST(OptimizerErrors, RefuseMissingStateAndBadStep) {
  auto backend = make_backend("cpu", {});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  DeviceTensor p(b, DType::kF32, {4}), g(b, DType::kF32, {4}), m(b, DType::kF32, {4}), v(b, DType::kF32, {4});
  SgdArgs sgd{p.view(), g.view(), TensorView()};
  sgd.momentum = 0.9f;
  EXPECT_EQ(b.sgd_step(sgd).code(), StatusCode::kInvalidArgument);
  AdamWArgs adam{p.view(), g.view(), m.view(), v.view()};
  adam.step = 0;
  EXPECT_EQ(b.adamw_step(adam).code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tutel::testing
