// PlanCache: hits and misses, LRU eviction by bytes, plans in use, token buckets, capacity
// moves for dynamic capacity, prebuilding, and that a cached step allocates nothing.
#include "tutel/graphs/plan_cache.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <random>
#include <string>

#include "graphs_test_util.hpp"

namespace tutel::graphs::testing {
namespace {

std::unique_ptr<Backend> cpu_backend() {
  auto b = make_backend("cpu", {.threads = 2});
  EXPECT_TRUE(b.ok()) << b.status();
  return std::move(b).value();
}

PlanKey key_of(const LayerSpec& spec, int64_t tokens, bool training) {
  return PlanKey{1, 1, AllToAll::kLinear, tokens, capacity_bound(spec, tokens), training};
}

// Tokens that all route to expert 0 (k = 1): the gate row of expert 0 points along the
// all-positive inputs, so dropless capacity is S rather than the balanced S/E.
void skew_to_expert0(TwinLayer& layer, std::vector<float>& x) {
  std::vector<float> wg = layer.params.wg.download();
  for (int64_t m = 0; m < layer.spec.model_dim; ++m) wg[m] = 4.f;
  layer.params.wg.upload(wg);
  for (float& v : x) v = std::abs(v) + 0.1f;
}

TEST(PlanCache, HitsMissesBuildsAndBytes) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 1.0), rng);
  PlanCache cache(*backend, {.max_bytes = size_t{64} << 20});
  ASSERT_TRUE(cache.add_layer(7, layer.target()).ok());
  EXPECT_EQ(cache.add_layer(7, layer.target()).code(), StatusCode::kAlreadyExists);

  const PlanKey key = key_of(layer.spec, 64, true);
  auto first = cache.get(7, key);
  ASSERT_TRUE(first.ok()) << first.status();
  auto second = cache.get(7, key);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(first->get(), second->get());
  const PlanCacheStats& s = cache.stats();
  EXPECT_EQ(s.misses, 1u);
  EXPECT_EQ(s.hits, 1u);
  EXPECT_EQ(s.builds, 1u);
  EXPECT_EQ(s.plans, 1u);
  EXPECT_EQ(s.bytes, (*first)->bytes());
  EXPECT_EQ(s.bytes, plan_bytes(*backend, layer.spec, key, PlanKind::kAuto));
  EXPECT_EQ(s.max_bytes, size_t{64} << 20);

  auto unknown = cache.get(8, key);
  EXPECT_EQ(unknown.status().code(), StatusCode::kNotFound);
  cache.remove_layer(7);
  EXPECT_EQ(cache.stats().plans, 0u);
  EXPECT_EQ(cache.stats().bytes, 0u);
  EXPECT_FALSE(cache.has_layer(7));
  // A plan a caller still holds outlives its removal from the cache.
  DeviceTensor x(*backend, DType::kF32, {8, 32}), y(*backend, DType::kF32, {8, 32});
  EXPECT_TRUE((*first)->forward(x.view(), 0, y.view()).ok());
}

TEST(PlanCache, EvictsLeastRecentlyUsedByBytes) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 1.0), rng);
  const PlanKey k64 = key_of(layer.spec, 64, true), k128 = key_of(layer.spec, 128, true),
                k256 = key_of(layer.spec, 256, true);
  const size_t b64 = plan_bytes(*backend, layer.spec, k64, PlanKind::kAuto);
  const size_t b128 = plan_bytes(*backend, layer.spec, k128, PlanKind::kAuto);
  const size_t b256 = plan_bytes(*backend, layer.spec, k256, PlanKind::kAuto);
  // Room for any two of them with the 256 one, not for all three.
  PlanCache cache(*backend, {.max_bytes = b128 + b256});
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());
  ASSERT_TRUE(cache.get(1, k64).ok());
  ASSERT_TRUE(cache.get(1, k128).ok());
  ASSERT_TRUE(cache.get(1, k64).ok());  // touch: now 128 is the least recent
  ASSERT_TRUE(cache.get(1, k256).ok());
  EXPECT_EQ(cache.stats().evictions, 1u);
  EXPECT_TRUE(cache.contains(1, k64));
  EXPECT_FALSE(cache.contains(1, k128));
  EXPECT_TRUE(cache.contains(1, k256));
  EXPECT_EQ(cache.stats().bytes, b64 + b256);
  EXPECT_LE(cache.stats().bytes, cache.stats().max_bytes);
  EXPECT_EQ(cache.stats().builds, 3u);
  EXPECT_EQ(cache.stats().hits, 1u);
  EXPECT_EQ(cache.stats().misses, 3u);
}

TEST(PlanCache, NeverEvictsAPlanInUse) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 1.0), rng);
  const PlanKey k64 = key_of(layer.spec, 64, true), k128 = key_of(layer.spec, 128, true);
  const size_t b128 = plan_bytes(*backend, layer.spec, k128, PlanKind::kAuto);
  PlanCache cache(*backend, {.max_bytes = b128});
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());
  auto held = cache.get(1, k64);
  ASSERT_TRUE(held.ok());
  auto refused = cache.get(1, k128);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("plans in use"), std::string::npos) << refused.status();
  EXPECT_TRUE(cache.contains(1, k64));
  EXPECT_EQ(cache.stats().build_failures, 1u);
  held->reset();  // the step is done: now it may go
  ASSERT_TRUE(cache.get(1, k128).ok());
  EXPECT_FALSE(cache.contains(1, k64));
  EXPECT_EQ(cache.stats().evictions, 1u);

  auto too_big = cache.get(1, key_of(layer.spec, 1024, true));
  ASSERT_FALSE(too_big.ok());
  EXPECT_NE(too_big.status().message().find("more than the whole plan cache"), std::string::npos);
}

TEST(PlanCache, RefusesKeysItCannotBuild) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 1.0), rng);
  PlanCache cache(*backend, {});
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());
  PlanKey key = key_of(layer.spec, 64, true);
  key.r = 2;
  auto plan = cache.get(1, key);
  ASSERT_FALSE(plan.ok());
  EXPECT_EQ(plan.status().code(), StatusCode::kUnimplemented);
  EXPECT_NE(plan.status().message().find("r = 2"), std::string::npos) << plan.status();
  ParallelConfig two_dh{1, 1, AllToAll::k2DH};
  DeviceTensor x(*backend, DType::kF32, {8, 32}), y(*backend, DType::kF32, {8, 32});
  auto step = cache.forward(1, two_dh, x.view(), 0, false, y.view());
  ASSERT_FALSE(step.ok());
  EXPECT_NE(step.status().message().find("a = 2dh"), std::string::npos) << step.status();
  EXPECT_EQ(cache.stats().build_failures, 2u);
  EXPECT_EQ(cache.stats().plans, 0u);
}

// A backend whose memory is full: every plan build fails at its first buffer.
class FullBackend final : public ForwardingBackend {
 public:
  explicit FullBackend(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  Result<DeviceBuffer> allocate(size_t bytes) override {
    return Status::ResourceExhausted("no room for " + std::to_string(bytes) + " bytes");
  }
};

TEST(PlanCache, BuildErrorsNameTheLayerAsItsOwnerAsks) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 1.0), rng);
  FullBackend full(cpu_backend());
  const PlanKey key = key_of(layer.spec, 64, false);
  auto message_of = [&](std::optional<std::string> context) {
    PlanCache cache(full, {});
    PlanTarget target = layer.target();
    target.error_context = std::move(context);
    EXPECT_TRUE(cache.add_layer(3, target).ok());
    auto plan = cache.get(3, key);
    EXPECT_FALSE(plan.ok());
    EXPECT_EQ(plan.status().code(), StatusCode::kResourceExhausted) << plan.status();
    EXPECT_EQ(cache.stats().build_failures, 1u);
    return std::string(plan.status().message());
  };
  const std::string by_id = message_of(std::nullopt);
  EXPECT_EQ(by_id.rfind("layer 3: ", 0), 0u) << by_id;
  const std::string named = message_of("layer 'moe0'");
  EXPECT_EQ(named.rfind("layer 'moe0': ", 0), 0u) << named;
  // A caller that names the layer itself gets the build's own message, with no "layer 3".
  const std::string bare = message_of("");
  EXPECT_EQ(bare.find("layer 3"), std::string::npos) << bare;
  EXPECT_NE(bare.find("no room for"), std::string::npos) << bare;
}

TEST(PlanCache, BiggerRequestsMoveToBiggerTokenBuckets) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, base_spec(4, 32, 48, 2, 1.0), rng);
  PlanCache cache(b, {});
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());
  const ParallelConfig config;
  std::vector<std::pair<int64_t, int64_t>> seen;  // (S, token bucket)
  for (int64_t S : {50, 64, 100, 60, 1}) {
    auto step_x = randn(rng, S * 32, 1.0);
    DeviceTensor x(b, DType::kF32, {S, 32}), y(b, DType::kF32, {S, 32}),
        y_eager(b, DType::kF32, {S, 32});
    x.upload(to_f32(step_x));
    auto step = cache.forward(1, config, x.view(), 0, true, y.view());
    ASSERT_TRUE(step.ok()) << step.status();
    seen.emplace_back(S, step->plan->key().token_bucket);
    RoutingStats want;
    ASSERT_TRUE(layer_forward(b, layer.spec, layer.params.weights(), x.view(), 0, true, layer.ws,
                              y_eager.view(), &want)
                    .ok());
    EXPECT_EQ(step->stats.capacity, want.capacity);
    EXPECT_TRUE(bits_equal("y", y.download(), y_eager.download()));
  }
  EXPECT_EQ(seen, (std::vector<std::pair<int64_t, int64_t>>{
                      {50, 64}, {64, 64}, {100, 128}, {60, 64}, {1, 64}}));
  EXPECT_EQ(cache.stats().misses, 2u);
  EXPECT_EQ(cache.stats().hits, 3u);
  EXPECT_EQ(cache.stats().capacity_moves, 0u);  // f > 0: capacity follows the token bucket
}

TEST(PlanCache, DynamicCapacityMovesToTheBucketThatHoldsIt) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, base_spec(4, 16, 24, 1, 0.0), rng);
  const int64_t S = 60, M = 16, O = 16;
  std::vector<float> host_x = to_f32(randn(rng, S * M, 1.0));
  skew_to_expert0(layer, host_x);
  PlanCacheOptions options;
  options.buckets.capacity = BucketPolicy::powers_of_two(4);
  PlanCache cache(b, options);
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());

  auto first_key = cache.key_for(1, {}, S, true);
  ASSERT_TRUE(first_key.ok());
  EXPECT_EQ(first_key->capacity_bucket, 16);  // the balanced guess: ceil(60/4) = 15 → 16

  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O}),
      y_eager(b, DType::kF32, {S, O}), dy(b, DType::kF32, {S, O}), dx(b, DType::kF32, {S, M}),
      dx_eager(b, DType::kF32, {S, M});
  x.upload(host_x);
  dy.upload(to_f32(randn(rng, S * O, 1.0)));
  auto step = cache.forward(1, {}, x.view(), 0, true, y.view());
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->stats.capacity, S);  // every token on expert 0
  EXPECT_EQ(step->plan->key().capacity_bucket, 64);
  EXPECT_EQ(cache.stats().capacity_moves, 1u);
  EXPECT_EQ(cache.stats().builds, 2u);

  RoutingStats want;
  ASSERT_TRUE(layer_forward(b, layer.spec, layer.params.weights(), x.view(), 0, true, layer.ws,
                            y_eager.view(), &want)
                  .ok());
  EXPECT_EQ(want.capacity, step->stats.capacity);
  EXPECT_TRUE(bits_equal("y", y.download(), y_eager.download()));
  ASSERT_TRUE(step->plan->backward(x.view(), dy.view(), 0.1f, dx.view()).ok());
  ASSERT_TRUE(layer_backward(b, layer.spec, layer.params.weights(), x.view(), layer.ws, dy.view(),
                             0.1f, dx_eager.view(), layer.eager_grads.weights())
                  .ok());
  EXPECT_TRUE(bits_equal("dx", dx.download(), dx_eager.download()));
  expect_grads_equal(layer);

  // The bucket is remembered: the next request of the token bucket starts on it.
  auto next_key = cache.key_for(1, {}, S, true);
  ASSERT_TRUE(next_key.ok());
  EXPECT_EQ(next_key->capacity_bucket, 64);
  const Plan* first_plan = step->plan.get();
  step->plan.reset();  // its backward has run: the plan is free for the next step
  auto again = cache.forward(1, {}, x.view(), 1, true, y.view());
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->plan.get(), first_plan);
  EXPECT_EQ(cache.stats().capacity_moves, 1u);
  EXPECT_EQ(cache.stats().builds, 2u);
}

TEST(PlanCache, PrebuildsTheConfiguredBuckets) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  TwinLayer layer(*backend, base_spec(4, 32, 48, 2, 0.0), rng);
  PlanCacheOptions options;
  options.buckets.tokens = BucketPolicy::from_list({32, 96}).value();
  PlanCache cache(*backend, options);
  ASSERT_TRUE(cache.add_layer(3, layer.target()).ok());
  auto keys = cache.configured_keys(3, {}, true);
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->size(), 2u);
  EXPECT_EQ((*keys)[0].token_bucket, 32);
  EXPECT_EQ((*keys)[1].token_bucket, 96);
  EXPECT_EQ((*keys)[1].capacity_bucket, 64);  // balanced 96·2/4 = 48 → 64
  ASSERT_TRUE(cache.prebuild(3, *keys).ok());
  ASSERT_TRUE(cache.prebuild(3, *keys).ok());  // already there: nothing to do
  EXPECT_EQ(cache.stats().builds, 2u);
  EXPECT_EQ(cache.stats().misses, 0u);
  EXPECT_EQ(cache.stats().plans, 2u);
  for (const PlanKey& k : *keys) EXPECT_TRUE(cache.contains(3, k));
  // A first request smaller than its bucket runs on the plan prebuilt for the bucket (f <= 0:
  // both take the balanced capacity of the whole bucket), not on a new one.
  DeviceTensor x(*backend, DType::kF32, {40, 32}), y(*backend, DType::kF32, {40, 32});
  x.upload(to_f32(randn(rng, 40 * 32, 1.0)));
  auto step = cache.forward(3, {}, x.view(), 0, /*training=*/true, y.view());
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(step->plan->key(), (*keys)[1]) << "40 tokens should run on the bucket-96 plan";
  EXPECT_EQ(cache.stats().builds, 2u);
  EXPECT_EQ(cache.stats().misses, 0u);
}

TEST(PlanCache, ACachedStepAllocatesNothing) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  CountingBackend b(cpu_backend());
  const LayerSpec spec = base_spec(4, 32, 48, 2, 0.0);
  DeviceLayer params(b, spec), grads(b, spec);
  params.upload(random_params(rng, spec));
  PlanCache cache(b, {});
  ASSERT_TRUE(cache.add_layer(1, {spec, params.weights(), grads.weights()}).ok());
  DeviceTensor x(b, DType::kF32, {40, 32}), y(b, DType::kF32, {40, 32}),
      dy(b, DType::kF32, {40, 32}), dx(b, DType::kF32, {40, 32});
  x.upload(to_f32(randn(rng, 40 * 32, 1.0)));
  auto warm = cache.forward(1, {}, x.view(), 0, true, y.view());
  ASSERT_TRUE(warm.ok()) << warm.status();
  warm->plan.reset();
  const int64_t before = b.allocations();
  for (int i = 0; i < 3; ++i) {
    auto step = cache.forward(1, {}, x.view(), 0, true, y.view());
    ASSERT_TRUE(step.ok()) << step.status();
    ASSERT_TRUE(step->plan->backward(x.view(), dy.view(), 1.f, dx.view()).ok());
  }
  EXPECT_EQ(b.allocations(), before);
  EXPECT_EQ(cache.stats().hits, 3u);
}

// Pipelined micro-batches: training forwards of one bucket wait for their backwards at once.
// Each gets an instance of its own, the backwards (in reverse order) equal the eager runs, a
// released instance serves the next step, trim_extra_instances() drops the idle copies of a
// key, and trim() every idle plan.
TEST(PlanCache, StepsInFlightEachGetTheirOwnInstance) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = cpu_backend();
  Backend& b = *backend;
  TwinLayer layer(b, base_spec(4, 32, 48, 2, 1.0), rng);
  PlanCache cache(b, {});
  ASSERT_TRUE(cache.add_layer(1, layer.target()).ok());
  constexpr int kInFlight = 3;
  const int64_t M = 32, O = 32;
  const int64_t tokens[kInFlight] = {40, 64, 33};  // one token bucket (64)
  std::vector<std::unique_ptr<DeviceTensor>> xs, ys, dys, dxs, dxs_eager;
  std::vector<PlanStep> steps;
  for (int i = 0; i < kInFlight; ++i) {
    const int64_t S = tokens[i];
    xs.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, M}));
    ys.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, O}));
    dys.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, O}));
    dxs.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, M}));
    dxs_eager.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, M}));
    xs[i]->upload(to_f32(randn(rng, S * M, 1.0)));
    dys[i]->upload(to_f32(randn(rng, S * O, 1.0)));
    auto step = cache.forward(1, {}, xs[i]->view(), 0, true, ys[i]->view());
    ASSERT_TRUE(step.ok()) << step.status();
    for (const PlanStep& other : steps) EXPECT_NE(other.plan.get(), step->plan.get());
    steps.push_back(std::move(step).value());
  }
  const PlanKey key = steps[0].plan->key();
  EXPECT_EQ(cache.instances(1, key), size_t{kInFlight});
  EXPECT_EQ(cache.refresh_stats().held, size_t{kInFlight});
  EXPECT_EQ(cache.stats().misses, uint64_t{kInFlight});

  // The eager reference runs each micro-batch's forward right before its backward.
  for (int i = kInFlight - 1; i >= 0; --i) {
    const int64_t S = tokens[i];
    DeviceTensor y_eager(b, DType::kF32, {S, O});
    ASSERT_TRUE(layer_forward(b, layer.spec, layer.params.weights(), xs[i]->view(), 0, true,
                              layer.ws, y_eager.view(), nullptr)
                    .ok());
    EXPECT_TRUE(bits_equal("y", ys[i]->download(), y_eager.download()));
    ASSERT_TRUE(steps[i].plan->backward(xs[i]->view(), dys[i]->view(), 0.5f, dxs[i]->view()).ok());
    ASSERT_TRUE(layer_backward(b, layer.spec, layer.params.weights(), xs[i]->view(), layer.ws,
                               dys[i]->view(), 0.5f, dxs_eager[i]->view(),
                               layer.eager_grads.weights())
                    .ok());
    EXPECT_TRUE(bits_equal("dx", dxs[i]->download(), dxs_eager[i]->download()));
    steps[i].plan.reset();
  }
  expect_grads_equal(layer);
  EXPECT_EQ(cache.refresh_stats().held, 0u);

  // Idle instances serve the next steps without building.
  auto next = cache.forward(1, {}, xs[0]->view(), 0, true, ys[0]->view());
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(cache.stats().builds, uint64_t{kInFlight});
  const size_t per_plan = next->plan->bytes();
  // trim_extra_instances() keeps the held instance and one idle one, and gives back the other
  // idle ones; trim() keeps the held one and gives back the rest.
  EXPECT_EQ(cache.trim_extra_instances(), per_plan * (kInFlight - 2));
  EXPECT_EQ(cache.instances(1, key), 2u);
  EXPECT_EQ(cache.trim_extra_instances(), 0u);
  EXPECT_EQ(cache.trim(), per_plan);
  EXPECT_EQ(cache.instances(1, key), 1u);
  EXPECT_EQ(cache.stats().bytes, per_plan);
  next->plan.reset();
  EXPECT_EQ(cache.trim(), per_plan);
  EXPECT_EQ(cache.stats().plans, 0u);
  EXPECT_FALSE(cache.contains(1, key));
}

}  // namespace
}  // namespace tutel::graphs::testing
