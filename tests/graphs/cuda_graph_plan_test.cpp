// Cuda-graph plans against eager execution on the same CUDA backend, bit for bit (the CUDA
// backend is deterministic run to run). Skipped where no GPU is present; the registry's answer
// without one is checked everywhere.
#include <gtest/gtest.h>

#include <initializer_list>
#include <memory>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "graphs_test_util.hpp"
#include "tutel/graphs/plan_cache.hpp"
#include "tutel/kernels/cuda_devices.hpp"

namespace tutel::graphs::testing {
namespace {

TEST(CudaGraphPlan, NeedsTheCudaBackend) {
  auto cpu = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(resolve_plan_kind(**cpu, PlanKind::kAuto), PlanKind::kHost);
  const LayerSpec spec = base_spec(4, 16, 16, 2, 1.0);
  DeviceLayer params(**cpu, spec);
  auto plan = build_plan(**cpu, {spec, params.weights(), {}},
                         PlanKey{1, 1, AllToAll::kLinear, 64, 32, false}, PlanKind::kCudaGraph);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kUnavailable);
  EXPECT_NE(plan.status().message().find("cuda-graph plan needs the cuda backend"),
            std::string::npos)
      << plan.status();
}

// A layer case, and whether the plan is a training one (forward keeps what backward needs;
// backward runs too) or an inference one (the daemon's path for inference requests: on a GPU the
// bf16 ReLU forward writes its second GEMM's operand from the first GEMM's epilogue).
struct GraphCase {
  PlanCase layer;
  bool training;
};

void PrintTo(const GraphCase& c, std::ostream* os) {
  *os << c.layer.name << (c.training ? ", training" : ", inference");
}

std::vector<GraphCase> graph_cases() {
  std::vector<GraphCase> out;
  for (const char* name : {"Basic", "Dropless", "DroplessCapped", "BatchPrioritized", "Bf16Matmul",
                           "Bf16GeluDropless", "GateNoise", "PreScore"})
    for (bool training : {true, false}) out.push_back({find_case(name), training});
  return out;
}

class CudaGraphPlanTest : public ::testing::TestWithParam<GraphCase> {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0)
      GTEST_SKIP() << "no CUDA device: the cuda-graph plan is compiled, not run";
    auto b = make_backend("cuda", {});
    ASSERT_TRUE(b.ok()) << b.status();
    backend_ = std::move(b).value();
    SCOPED_TRACE("seed " + std::to_string(seed_));
    layer_ = std::make_unique<TwinLayer>(*backend_, GetParam().layer.spec, rng_);
    auto plan = build_plan(*backend_, layer_->target(),
                           PlanKey{1, 1, AllToAll::kLinear, 128, capacity_bound(layer_->spec, 128),
                                   GetParam().training},
                           PlanKind::kAuto);
    ASSERT_TRUE(plan.ok()) << plan.status();
    ASSERT_EQ((*plan)->kind(), PlanKind::kCudaGraph);
    plan_ = std::move(plan).value();
  }
  // Runs steps of these token counts through the plan (bucket 128), each checked against eager
  // execution (the forward, and with a training plan the backward).
  void expect_steps_match_eager(std::initializer_list<int64_t> tokens) {
    SCOPED_TRACE("seed " + std::to_string(seed_));
    for (int64_t S : tokens) {
      SCOPED_TRACE("step " + std::to_string(counter_) + ", S = " + std::to_string(S));
      expect_step_matches_eager(*backend_, *layer_, *plan_, S, counter_++, rng_);
      if (HasFatalFailure()) return;
    }
  }
  const uint64_t seed_ = std::random_device{}();
  std::mt19937_64 rng_{seed_};
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<TwinLayer> layer_;
  std::unique_ptr<Plan> plan_;
  uint64_t counter_ = 1;
};

// Each shape runs op by op the first time, is captured the second and launched after that;
// every one of those steps must equal eager execution.
TEST_P(CudaGraphPlanTest, StepsMatchEagerBitForBit) {
  expect_steps_match_eager({128, 128, 128, 128, 77, 77, 77, 128});
  if (HasFatalFailure()) return;
  const PlanStats& st = plan_->stats();
  EXPECT_GT(st.eager_phases, 0u);
  EXPECT_GT(st.captures, 0u);
  // A failed capture falls back to eager steps with the same bits: only this says it did not.
  EXPECT_EQ(st.capture_failures, 0u);
  EXPECT_GT(st.graph_launches, 0u);
}

// More shapes than a phase keeps executables (4): later captures are applied to the least
// recently used executable with cudaGraphExecUpdate (or instantiated anew where the topology
// changed), and every step, through either, must still equal eager execution.
TEST_P(CudaGraphPlanTest, ShapesBeyondTheExecutablesUpdateThemAndStillMatchEager) {
  for (int round = 0; round < 3 && !HasFatalFailure(); ++round)
    expect_steps_match_eager({128, 120, 112, 104, 96, 88});
  if (HasFatalFailure()) return;
  const PlanStats& st = plan_->stats();
  EXPECT_EQ(st.capture_failures, 0u);
  EXPECT_EQ(st.graph_updates + st.instantiations, st.captures);
  EXPECT_GT(st.captures, 4u);
}

INSTANTIATE_TEST_SUITE_P(Cases, CudaGraphPlanTest, ::testing::ValuesIn(graph_cases()),
                         [](const auto& info) {
                           return info.param.layer.name + (info.param.training ? "Training" : "Inference");
                         });

// The copies' addresses are baked into the graphs: refreshed in place by the optimizer, they
// must be read anew by every replay.
TEST(CudaGraphPlanBf16Copies, MatchEagerOnTheFlyBitForBitAcrossOptimizerSteps) {
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: the cuda-graph plan is compiled, not run";
  auto backend = make_backend("cuda", {});
  ASSERT_TRUE(backend.ok()) << backend.status();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const LayerSpec spec = find_case("Bf16GeluDropless").spec;
  const PlanKey key{1, 1, AllToAll::kLinear, 128, capacity_bound(spec, 128), true};
  expect_bf16_copies_match_eager(**backend, spec, key, PlanKind::kCudaGraph, rng,
                                 {128, 128, 128, 77, 77, 77});
}

TEST(CudaGraphPlanHostIo, TakesHostTensorsAndThePlansOwnBuffers) {
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: the cuda-graph plan is compiled, not run";
  auto backend = make_backend("cuda", {});
  ASSERT_TRUE(backend.ok()) << backend.status();
  Backend& b = **backend;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  TwinLayer layer(b, base_spec(4, 32, 48, 2, 0.0), rng);
  const int64_t S = 50, M = 32, O = 32;
  auto plan = build_plan(b, layer.target(), PlanKey{1, 1, AllToAll::kLinear, 64, 64, true});
  ASSERT_TRUE(plan.ok()) << plan.status();
  std::vector<float> x_host = to_f32(randn(rng, S * M, 1.0)), y_host(S * O);
  DeviceTensor x(b, DType::kF32, {S, M}), y_eager(b, DType::kF32, {S, O});
  x.upload(x_host);
  RoutingStats want;
  ASSERT_TRUE(layer_forward(b, layer.spec, layer.params.weights(), x.view(), 0, true, layer.ws,
                            y_eager.view(), &want)
                  .ok());
  for (int i = 0; i < 3; ++i) {
    auto got = (*plan)->forward(TensorView(x_host.data(), DType::kF32, {S, M}), 0,
                                TensorView(y_host.data(), DType::kF32, {S, O}));
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->capacity, want.capacity);
    EXPECT_TRUE(bits_equal("y from host io", y_host, y_eager.download()));
  }
  // Zero copy: the request written into the plan's own input rows.
  ASSERT_TRUE(
      b.copy((*plan)->input(S).data(), x_host.data(), x_host.size() * 4, CopyKind::kHostToDevice)
          .ok());
  auto got = (*plan)->forward((*plan)->input(S), 0, (*plan)->output(S));
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_TRUE(bits_equal("y in the plan's buffer", download<float>(b, (*plan)->output(S)),
                         y_eager.download()));
}

TEST(CudaGraphPlanCache, ACachedStepAllocatesNothing) {
  if (cuda_device_count() == 0)
    GTEST_SKIP() << "no CUDA device: the cuda-graph plan is compiled, not run";
  auto inner = make_backend("cuda", {});
  ASSERT_TRUE(inner.ok()) << inner.status();
  CountingBackend b(std::move(inner).value());
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const LayerSpec spec = base_spec(4, 32, 48, 2, 1.0);
  DeviceLayer params(b, spec), grads(b, spec);
  params.upload(random_params(rng, spec));
  PlanCache cache(b, {});
  ASSERT_TRUE(cache.add_layer(1, {spec, params.weights(), grads.weights()}).ok());
  DeviceTensor x(b, DType::kF32, {40, 32}), y(b, DType::kF32, {40, 32}),
      dy(b, DType::kF32, {40, 32}), dx(b, DType::kF32, {40, 32});
  x.upload(to_f32(randn(rng, 40 * 32, 1.0)));
  // Two warm steps: the first runs op by op (growing the backend's scratch), the second captures.
  for (int i = 0; i < 2; ++i) {
    auto warm = cache.forward(1, {}, x.view(), 0, true, y.view());
    ASSERT_TRUE(warm.ok()) << warm.status();
    ASSERT_TRUE(warm->plan->backward(x.view(), dy.view(), 1.f, dx.view()).ok());
  }
  const int64_t before = b.allocations();
  for (int i = 0; i < 3; ++i) {
    auto step = cache.forward(1, {}, x.view(), 0, true, y.view());
    ASSERT_TRUE(step.ok()) << step.status();
    ASSERT_TRUE(step->plan->backward(x.view(), dy.view(), 1.f, dx.view()).ok());
    EXPECT_GT(step->plan->stats().graph_launches, 0u);
  }
  EXPECT_EQ(b.allocations(), before);
}

}  // namespace
}  // namespace tutel::graphs::testing
