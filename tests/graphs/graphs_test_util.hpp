// Shared by the graphs tests: layer cases, a Backend wrapper that counts allocations, and the
// eager-vs-plan comparison (bit for bit: a plan runs the very ops layer_forward runs).
#pragma once

#include <gtest/gtest.h>

#include <cstring>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "layer_cases.hpp"
#include "layer_test_util.hpp"
#include "tutel/graphs/plan.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/forwarding_backend.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::graphs::testing {

using ::tutel::testing::base_spec;
using ::tutel::testing::DeviceLayer;
using ::tutel::testing::DeviceTensor;
using ::tutel::testing::randn;
using ::tutel::testing::random_params;
using ::tutel::testing::to_f32;

// Forwards every op to another backend and counts allocate() calls: a replay must make none.
class CountingBackend final : public ForwardingBackend {
 public:
  explicit CountingBackend(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  int64_t allocations() const { return allocations_; }

  Result<DeviceBuffer> allocate(size_t bytes) override {
    ++allocations_;
    return ForwardingBackend::allocate(bytes);  // the inner backend owns and frees the buffer
  }

 private:
  int64_t allocations_ = 0;
};

struct PlanCase {
  std::string name;
  LayerSpec spec;
};

inline void PrintTo(const PlanCase& c, std::ostream* os) { *os << c.name; }

// Every option a plan must replay exactly as layer_forward runs it.
inline std::vector<PlanCase> plan_cases() {
  std::vector<PlanCase> cases;
  auto add = [&](std::string name, LayerSpec s) { cases.push_back({std::move(name), s}); };
  add("Basic", base_spec(4, 32, 48, 2, 1.0));
  add("CapacityOverflow", base_spec(4, 32, 32, 2, 0.5));
  add("TokensNotDivisibleByExperts", base_spec(5, 24, 40, 2, 1.25));
  add("Dropless", base_spec(6, 24, 32, 2, 0.0));
  add("DroplessCapped", base_spec(6, 24, 32, 2, -0.6));
  add("TinyCapacityFactorGivesZeroCapacity", base_spec(4, 16, 16, 1, 0.1));
  {
    auto s = base_spec(4, 32, 32, 2, 0.5);
    s.batch_prioritized = true;
    add("BatchPrioritized", s);
  }
  {
    auto s = base_spec(4, 32, 32, 2, 0.0);
    s.batch_prioritized = true;
    add("BatchPrioritizedDropless", s);
  }
  {
    auto s = base_spec(4, 32, 40, 2, 1.0);
    s.activation = Activation::kGelu;
    add("Gelu", s);
  }
  {
    auto s = base_spec(4, 32, 40, 2, 1.0);
    s.activation = Activation::kSilu;
    add("Silu", s);
  }
  {
    auto s = base_spec(4, 32, 48, 2, 1.0);
    s.matmul_dtype = DType::kBF16;
    add("Bf16Matmul", s);
  }
  {
    auto s = base_spec(4, 32, 48, 2, 0.0);
    s.matmul_dtype = DType::kBF16;
    s.activation = Activation::kGelu;
    add("Bf16GeluDropless", s);
  }
  {
    auto s = base_spec(4, 24, 32, 2, 1.0);
    s.is_postscore = false;
    add("PreScore", s);
  }
  {
    auto s = base_spec(4, 24, 32, 2, 1.0);
    s.has_fc1_bias = false;
    s.has_fc2_bias = false;
    add("NoBiases", s);
  }
  {
    auto s = base_spec(4, 24, 32, 2, 1.0);
    s.output_dim = 40;
    add("OutputDimDiffers", s);
  }
  {
    auto s = base_spec(4, 24, 32, 2, 1.0);
    s.normalize_gate = false;
    add("UnnormalizedGates", s);
  }
  add("Top1", base_spec(4, 24, 32, 1, 1.0));
  {
    auto s = base_spec(4, 24, 32, 2, 1.0);
    s.gate_noise = 1.0;
    s.noise_seed = 1234;
    add("GateNoise", s);
  }
  {
    auto s = base_spec(4, 24, 32, 2, 0.0);
    s.alignment = 8;
    add("AlignedDropless", s);
  }
  return cases;
}

inline PlanCase find_case(const std::string& name) {
  for (auto& c : plan_cases())
    if (c.name == name) return c;
  ADD_FAILURE() << "no plan case " << name;
  return {};
}

// Host copies compared bit for bit; reports the first differing element.
template <typename T>
::testing::AssertionResult bits_equal(const std::string& what, const std::vector<T>& got,
                                      const std::vector<T>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": size " << got.size() << " != " << want.size();
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], sizeof(T)) != 0)
      return ::testing::AssertionFailure()
             << what << "[" << i << "] = " << got[i] << ", eager " << want[i];
  return ::testing::AssertionSuccess();
}

template <typename T>
std::vector<T> download(Backend& b, const TensorView& t) {
  std::vector<T> host(static_cast<size_t>(t.numel()));
  EXPECT_TRUE(b.copy(host.data(), t.data(), host.size() * sizeof(T), CopyKind::kDeviceToHost).ok());
  return host;
}

// One layer on a backend with two gradient sets (eager's and the plan's), and its eager
// workspace.
struct TwinLayer {
  LayerSpec spec;
  DeviceLayer params, eager_grads, plan_grads;
  LayerWorkspace ws;

  TwinLayer(Backend& b, const LayerSpec& s, std::mt19937_64& rng)
      : spec(s), params(b, s), eager_grads(b, s), plan_grads(b, s) {
    params.upload(random_params(rng, s));
  }
  PlanTarget target() const { return PlanTarget{spec, params.weights(), plan_grads.weights()}; }
};

inline void expect_grads_equal(const TwinLayer& l) {
  EXPECT_TRUE(bits_equal("d_wg", l.plan_grads.wg.download(), l.eager_grads.wg.download()));
  EXPECT_TRUE(bits_equal("d_fc1_w", l.plan_grads.fc1_w.download(), l.eager_grads.fc1_w.download()));
  EXPECT_TRUE(bits_equal("d_fc2_w", l.plan_grads.fc2_w.download(), l.eager_grads.fc2_w.download()));
  if (l.spec.has_fc1_bias) {
    EXPECT_TRUE(
        bits_equal("d_fc1_b", l.plan_grads.fc1_b.download(), l.eager_grads.fc1_b.download()));
  }
  if (l.spec.has_fc2_bias) {
    EXPECT_TRUE(
        bits_equal("d_fc2_b", l.plan_grads.fc2_b.download(), l.eager_grads.fc2_b.download()));
  }
}

// One step of S tokens through eager layer_forward(/backward) and through `plan`, on fresh
// random inputs; everything both produce must be identical bits. Gradients accumulate across
// steps on both sides and are compared after each step.
inline void expect_step_matches_eager(Backend& b, TwinLayer& layer, Plan& plan, int64_t S,
                                      uint64_t noise_counter, std::mt19937_64& rng,
                                      bool backward = true) {
  SCOPED_TRACE("S = " + std::to_string(S) + ", plan " + plan.key().to_string());
  const LayerSpec& spec = layer.spec;
  const int64_t M = spec.model_dim, O = spec.out_dim();
  const bool training = plan.key().training;
  DeviceTensor x(b, DType::kF32, {S, M}), dy(b, DType::kF32, {S, O});
  DeviceTensor y_eager(b, DType::kF32, {S, O}), y_plan(b, DType::kF32, {S, O});
  DeviceTensor dx_eager(b, DType::kF32, {S, M}), dx_plan(b, DType::kF32, {S, M});
  x.upload(to_f32(randn(rng, S * M, 1.0)));
  dy.upload(to_f32(randn(rng, S * O, 1.0)));
  const float dl_aux = 0.01f;

  RoutingStats want;
  ASSERT_TRUE(layer_forward(b, spec, layer.params.weights(), x.view(), noise_counter, training,
                            layer.ws, y_eager.view(), &want)
                  .ok());
  auto got = plan.forward(x.view(), noise_counter, y_plan.view());
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ(got->capacity, want.capacity);
  EXPECT_EQ(got->dropped, want.dropped);
  EXPECT_TRUE(bits_equal("l_aux", std::vector<float>{got->l_aux}, std::vector<float>{want.l_aux}));
  EXPECT_EQ(plan.tokens(), S);
  EXPECT_EQ(plan.capacity(), want.capacity);
  EXPECT_TRUE(bits_equal("y", y_plan.download(), y_eager.download()));
  const Device dev = b.device();
  EXPECT_TRUE(bits_equal("expert_index", download<int32_t>(b, plan.expert_index()),
                         download<int32_t>(b, layer.ws.expert_index(dev))));
  EXPECT_TRUE(bits_equal("location", download<int32_t>(b, plan.location()),
                         download<int32_t>(b, layer.ws.location(dev))));
  EXPECT_TRUE(bits_equal("gates", download<float>(b, plan.gates()),
                         download<float>(b, layer.ws.gates(dev))));
  if (!training || !backward) return;

  ASSERT_TRUE(layer_backward(b, spec, layer.params.weights(), x.view(), layer.ws, dy.view(), dl_aux,
                             dx_eager.view(), layer.eager_grads.weights())
                  .ok());
  Status s = plan.backward(x.view(), dy.view(), dl_aux, dx_plan.view());
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(bits_equal("dx", dx_plan.download(), dx_eager.download()));
  expect_grads_equal(layer);
}

// A plan whose target carries the expert weights' bf16 copies (a bf16 spec) against eager steps
// that convert the weights on the fly: bit for bit, also after SGD steps that update the weights
// and refresh their copies in place (param_bf16), as a trainer does between steps; a plan (a
// CUDA graph too) must read the copies' new values. Its workspace is sized for the copies.
inline void expect_bf16_copies_match_eager(Backend& b, const LayerSpec& spec, const PlanKey& key,
                                           PlanKind kind, std::mt19937_64& rng,
                                           const std::vector<int64_t>& token_counts) {
  ASSERT_EQ(spec.matmul_dtype, DType::kBF16);
  TwinLayer layer(b, spec, rng);
  ::tutel::testing::Bf16Copies copies(b, spec);
  const Status filled = copies.fill(b, layer.params);
  ASSERT_TRUE(filled.ok()) << filled;
  PlanTarget target = layer.target();
  target.weights = copies.attach(target.weights);
  auto plan = build_plan(b, target, key, kind);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ((*plan)->bytes(), plan_bytes(b, spec, key, kind, /*weights_bf16=*/true));
  EXPECT_LE((*plan)->bytes(), plan_bytes(b, spec, key, kind));
  uint64_t counter = 1;
  for (int round = 0; round < 2; ++round) {
    for (int64_t S : token_counts) {
      expect_step_matches_eager(b, layer, **plan, S, counter++, rng);
      if (::testing::Test::HasFatalFailure()) return;
    }
    // The optimizer's step: the accumulated gradients move both weights, and their copies with
    // them.
    for (auto [param, grad, copy] :
         {std::tuple{&layer.params.fc1_w, &layer.eager_grads.fc1_w, &copies.fc1},
          std::tuple{&layer.params.fc2_w, &layer.eager_grads.fc2_w, &copies.fc2}}) {
      SgdArgs step{param->view(), grad->view(), {}, 0.05f};
      step.param_bf16 = copy->view();
      const Status s = b.sgd_step(step);
      ASSERT_TRUE(s.ok()) << s;
    }
  }
}

}  // namespace tutel::graphs::testing
