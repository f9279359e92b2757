// Host plans on the CPU backend: a replay equals kernels' eager layer_forward/layer_backward bit
// for bit, for every option, for several token counts within one bucket, and allocates nothing.
#include <gtest/gtest.h>

#include <random>

#include "graphs_test_util.hpp"
#include "tutel/graphs/plan.hpp"

namespace tutel::graphs::testing {
namespace {

constexpr int64_t kBucket = 64;

std::unique_ptr<Backend> cpu_backend() {
  auto b = make_backend("cpu", {.threads = 2});
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(b).value();
}

// A key whose capacity bucket holds every request of the token bucket (capacity moves are the
// cache's business, tested there).
PlanKey full_key(const LayerSpec& spec, int64_t token_bucket, bool training) {
  return PlanKey{1,       1, AllToAll::kLinear, token_bucket, capacity_bound(spec, token_bucket),
                 training};
}

class HostPlanReplay : public ::testing::TestWithParam<PlanCase> {};

TEST_P(HostPlanReplay, TrainingStepsMatchEagerBitForBit) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, GetParam().spec, rng);
  auto plan = build_plan(b, layer.target(), full_key(layer.spec, kBucket, true), PlanKind::kHost);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ((*plan)->kind(), PlanKind::kHost);
  // The full bucket, a ragged count, a small one, one token, and the full bucket again: one
  // plan, pointer-stable buffers, the real S every time.
  const int64_t counts[] = {kBucket, kBucket - 7, 13, 1, kBucket};
  uint64_t counter = 3;
  for (int64_t S : counts) {
    expect_step_matches_eager(b, layer, **plan, S, counter++, rng);
    if (HasFatalFailure()) return;
  }
  EXPECT_EQ((*plan)->stats().forwards, 5u);
  EXPECT_EQ((*plan)->stats().backwards, 5u);
}

TEST_P(HostPlanReplay, InferenceStepsMatchEagerBitForBit) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, GetParam().spec, rng);
  PlanTarget target = layer.target();
  target.grads = {};  // an inference plan needs no gradients
  auto plan = build_plan(b, target, full_key(layer.spec, 128, false), PlanKind::kHost);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (int64_t S : {128, 100, 65}) {
    expect_step_matches_eager(b, layer, **plan, S, 0, rng);
    if (HasFatalFailure()) return;
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, HostPlanReplay, ::testing::ValuesIn(plan_cases()),
                         [](const auto& info) { return info.param.name; });

TEST(HostPlan, ReplayAllocatesNothing) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  CountingBackend b(cpu_backend());
  for (const char* name : {"Dropless", "Gelu", "Bf16Matmul", "GateNoise", "BatchPrioritized"}) {
    SCOPED_TRACE(name);
    const LayerSpec spec = find_case(name).spec;
    DeviceLayer params(b, spec), grads(b, spec);
    params.upload(random_params(rng, spec));
    const int64_t M = spec.model_dim, O = spec.out_dim();
    DeviceTensor x(b, DType::kF32, {kBucket, M}), y(b, DType::kF32, {kBucket, O}),
        dy(b, DType::kF32, {kBucket, O}), dx(b, DType::kF32, {kBucket, M});
    x.upload(to_f32(randn(rng, kBucket * M, 1.0)));
    dy.upload(to_f32(randn(rng, kBucket * O, 1.0)));
    auto plan = build_plan(b, {spec, params.weights(), grads.weights()},
                           full_key(spec, kBucket, true), PlanKind::kHost);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int64_t before = b.allocations();
    for (int64_t S : {kBucket, int64_t{40}, int64_t{1}, kBucket}) {
      auto rows = [S](const DeviceTensor& t, int64_t cols) {
        return TensorView(t.view().data(), DType::kF32, {S, cols}, t.view().device());
      };
      auto stats = (*plan)->forward(rows(x, M), static_cast<uint64_t>(S), rows(y, O));
      ASSERT_TRUE(stats.ok()) << stats.status();
      ASSERT_TRUE((*plan)->backward(rows(x, M), rows(dy, O), 0.5f, rows(dx, M)).ok());
    }
    EXPECT_EQ(b.allocations(), before) << "a replay allocated device memory";
  }
}

TEST(HostPlan, Bf16WeightCopiesMatchEagerOnTheFlyBitForBit) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  for (const char* name : {"Bf16Matmul", "Bf16GeluDropless"}) {
    SCOPED_TRACE(name);
    const LayerSpec spec = find_case(name).spec;
    expect_bf16_copies_match_eager(*backend, spec, full_key(spec, kBucket, true), PlanKind::kHost,
                                   rng, {kBucket, 13, 1});
    if (HasFatalFailure()) return;
  }
  // A decode-sized bucket: the converted weights would dwarf every activation.
  const LayerSpec spec = find_case("Bf16Matmul").spec;
  const PlanKey decode = full_key(spec, 4, false);
  EXPECT_LT(plan_bytes(*backend, spec, decode, PlanKind::kHost, /*weights_bf16=*/true),
            plan_bytes(*backend, spec, decode, PlanKind::kHost) / 2);
}

TEST(HostPlan, BuffersAreOneAllocationOfTheReportedSize) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  CountingBackend b(cpu_backend());
  const LayerSpec spec = find_case("Gelu").spec;
  DeviceLayer params(b, spec), grads(b, spec);
  const PlanKey key = full_key(spec, 256, true);
  const int64_t before = b.allocations();
  auto plan = build_plan(b, {spec, params.weights(), grads.weights()}, key, PlanKind::kHost);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(b.allocations(), before + 1);
  EXPECT_EQ((*plan)->bytes(), plan_bytes(b, spec, key, PlanKind::kHost));
  // Bigger buckets hold more; a training key holds the backward buffers too.
  EXPECT_GT(plan_bytes(b, spec, full_key(spec, 512, true), PlanKind::kHost), (*plan)->bytes());
  EXPECT_LT(plan_bytes(b, spec, full_key(spec, 256, false), PlanKind::kHost), (*plan)->bytes());
}

TEST(HostPlan, CapacityAboveTheBucketIsRefusedAndLeavesOutputAlone) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, find_case("Dropless").spec, rng);
  PlanKey key = full_key(layer.spec, kBucket, true);
  key.capacity_bucket = 2;
  auto plan = build_plan(b, layer.target(), key, PlanKind::kHost);
  ASSERT_TRUE(plan.ok()) << plan.status();

  const int64_t M = layer.spec.model_dim, O = layer.spec.out_dim();
  DeviceTensor x(b, DType::kF32, {kBucket, M}), y(b, DType::kF32, {kBucket, O}),
      y_eager(b, DType::kF32, {kBucket, O});
  x.upload(to_f32(randn(rng, kBucket * M, 1.0)));
  const std::vector<float> marker(kBucket * O, 42.f);
  y.upload(marker);
  RoutingStats want;
  ASSERT_TRUE(layer_forward(b, layer.spec, layer.params.weights(), x.view(), 0, true, layer.ws,
                            y_eager.view(), &want)
                  .ok());
  ASSERT_GT(want.capacity, 2);

  auto got = (*plan)->forward(x.view(), 0, y.view());
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), StatusCode::kOutOfRange);
  EXPECT_NE(got.status().message().find("needs capacity " + std::to_string(want.capacity)),
            std::string::npos)
      << got.status();
  EXPECT_EQ((*plan)->required_capacity(), want.capacity);
  EXPECT_EQ((*plan)->stats().capacity_misses, 1u);
  EXPECT_FALSE((*plan)->has_forward());
  EXPECT_TRUE(bits_equal("y (untouched)", y.download(), marker));
  DeviceTensor dy(b, DType::kF32, {kBucket, O}), dx(b, DType::kF32, {kBucket, M});
  EXPECT_EQ((*plan)->backward(x.view(), dy.view(), 0.f, dx.view()).code(),
            StatusCode::kInvalidArgument);
}

TEST(HostPlan, RefusesWhatItCannotRun) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, find_case("Basic").spec, rng);
  const PlanKey good = full_key(layer.spec, kBucket, true);

  auto refused = [&](PlanKey key, PlanTarget target, StatusCode code, const std::string& words) {
    auto plan = build_plan(b, target, key, PlanKind::kHost);
    ASSERT_FALSE(plan.ok()) << key.to_string();
    EXPECT_EQ(plan.status().code(), code) << plan.status();
    EXPECT_NE(plan.status().message().find(words), std::string::npos) << plan.status();
  };
  PlanKey k = good;
  k.r = 2;
  refused(k, layer.target(), StatusCode::kUnimplemented, "r = 2");
  k = good;
  k.d = 4;
  refused(k, layer.target(), StatusCode::kUnimplemented, "d = 4");
  k = good;
  k.a = AllToAll::k2DH;
  refused(k, layer.target(), StatusCode::kUnimplemented, "a = 2dh");
  k = good;
  k.token_bucket = 0;
  refused(k, layer.target(), StatusCode::kInvalidArgument, "token_bucket = 0");
  k = good;
  k.capacity_bucket -= 1;  // f > 0: the static capacity of a full bucket must fit
  refused(k, layer.target(), StatusCode::kInvalidArgument, "is below the capacity");
  PlanTarget no_grads = layer.target();
  no_grads.grads = {};
  refused(good, no_grads, StatusCode::kInvalidArgument, "no gradient buffers");
  EXPECT_TRUE(build_plan(b, layer.target(), good, PlanKind::kHost).ok());
}

TEST(HostPlan, RefusesBadRequests) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, find_case("Basic").spec, rng);
  const int64_t M = layer.spec.model_dim, O = layer.spec.out_dim();
  PlanTarget inference_target = layer.target();
  inference_target.grads = {};
  auto inference =
      build_plan(b, inference_target, full_key(layer.spec, kBucket, false), PlanKind::kHost);
  auto training =
      build_plan(b, layer.target(), full_key(layer.spec, kBucket, true), PlanKind::kHost);
  ASSERT_TRUE(inference.ok() && training.ok());

  DeviceTensor big_x(b, DType::kF32, {kBucket + 1, M}), big_y(b, DType::kF32, {kBucket + 1, O});
  auto over = (*training)->forward(big_x.view(), 0, big_y.view());
  ASSERT_FALSE(over.ok());
  EXPECT_NE(over.status().message().find("expected [1..64"), std::string::npos) << over.status();

  DeviceTensor x(b, DType::kF32, {8, M}), y(b, DType::kF32, {8, O}), dy(b, DType::kF32, {8, O}),
      dx(b, DType::kF32, {8, M}), wrong_y(b, DType::kF32, {8, O + 1});
  EXPECT_EQ((*training)->forward(x.view(), 0, wrong_y.view()).status().code(),
            StatusCode::kInvalidArgument);
  Status early = (*training)->backward(x.view(), dy.view(), 0.f, dx.view());
  EXPECT_NE(early.message().find("training forward"), std::string::npos) << early;
  ASSERT_TRUE((*inference)->forward(x.view(), 0, y.view()).ok());
  Status no_backward = (*inference)->backward(x.view(), dy.view(), 0.f, dx.view());
  EXPECT_NE(no_backward.message().find("inference plan"), std::string::npos) << no_backward;
  EXPECT_FALSE(
      build_plan(b, layer.target(), full_key(layer.spec, kBucket, true), PlanKind::kCudaGraph)
          .ok());
}

}  // namespace
}  // namespace tutel::graphs::testing
