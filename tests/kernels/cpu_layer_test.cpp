// The CPU backend's whole layer, forward and backward, against the float64 reference on fresh
// random inputs over many shapes and options.
//
// Tolerances (|got − ref| <= atol·max|ref| + rtol·|ref|):
//   f32 forward:   rtol 1e-4, atol 1e-5   (f32 sums of at most a few hundred products)
//   f32 gradients: rtol 1e-3, atol 1e-4   (sums over every token, with cancellation)
//   bf16 matmuls:  rtol 3e-2, atol 3e-2   (8-bit mantissas on the expert GEMM inputs)
// Routing (indices, locations, capacity, dropped) must match exactly. Inputs are redrawn until
// no routing decision is within 1e-6 of a tie, where f32 and f64 may legitimately disagree.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "layer_cases.hpp"
#include "layer_test_util.hpp"

namespace tutel::testing {
namespace {

class CpuLayerTest : public ::testing::TestWithParam<LayerCase> {};

void run_case(const LayerCase& case_in, DType matmul_dtype, double fwd_rtol, double fwd_atol, double grad_rtol,
              double grad_atol) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  LayerCase c = case_in;
  c.spec.matmul_dtype = matmul_dtype;
  const LayerSpec& spec = c.spec;
  const int64_t S = c.tokens, M = spec.model_dim, O = spec.out_dim(), k = spec.k;
  std::optional<Inputs> drawn = draw(rng, c);
  ASSERT_TRUE(drawn.has_value()) << "could not draw inputs without near-ties";
  const Inputs& in = *drawn;
  const ref::Config cfg = to_ref(spec, S);

  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok()) << backend.status();
  Backend& b = **backend;
  DeviceLayer layer(b, spec), grads(b, spec);
  layer.upload(in.params);
  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O}), dy(b, DType::kF32, {S, O}),
      dx(b, DType::kF32, {S, M});
  x.upload(to_f32(in.x));
  dy.upload(to_f32(in.dy));

  LayerWorkspace ws;
  RoutingStats stats;
  ASSERT_TRUE(
      layer_forward(b, spec, layer.weights(), x.view(), kNoiseCounter, /*training=*/true, ws, y.view(), &stats).ok());

  const ref::Forward& want = in.want;
  EXPECT_EQ(stats.capacity, want.capacity);
  EXPECT_EQ(stats.dropped, want.dropped);
  EXPECT_NEAR(stats.l_aux, want.l_aux, 1e-5 * std::max(1.0, std::abs(want.l_aux)));
  std::vector<int32_t> idx(S * k), loc(S * k);
  std::vector<float> gates(S * k);
  ASSERT_TRUE(b.copy(idx.data(), ws.expert_index(b.device()).data(), idx.size() * 4, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(b.copy(loc.data(), ws.location(b.device()).data(), loc.size() * 4, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(b.copy(gates.data(), ws.gates(b.device()).data(), gates.size() * 4, CopyKind::kDeviceToHost).ok());
  for (int64_t i = 0; i < S * k; ++i) {
    ASSERT_EQ(idx[i], want.idx[i]) << "expert index of assignment " << i;
    ASSERT_EQ(loc[i], want.loc[i]) << "location of assignment " << i;
  }
  EXPECT_TRUE(all_close("gates", gates, want.gates, 1e-5, 1e-6));
  EXPECT_TRUE(all_close("y", y.download(), want.y, fwd_rtol, fwd_atol));

  // The inference forward, which skips the experts no token reached (in the cases without gate
  // noise: an inference draws none, and the reference's y has the case's noise in it).
  if (!c.noise) {
    LayerWorkspace inference_ws;
    DeviceTensor y_inference(b, DType::kF32, {S, O});
    ASSERT_TRUE(layer_forward(b, spec, layer.weights(), x.view(), kNoiseCounter, /*training=*/false, inference_ws,
                              y_inference.view(), nullptr)
                    .ok());
    EXPECT_TRUE(all_close("inference y", y_inference.download(), want.y, fwd_rtol, fwd_atol));
  }

  ASSERT_TRUE(layer_backward(b, spec, layer.weights(), x.view(), ws, dy.view(), static_cast<float>(in.dl_aux),
                             dx.view(), grads.weights()).ok());
  const ref::Grads g = ref::backward(cfg, in.params, in.x, c.noise ? &in.noise : nullptr, in.dy, in.dl_aux);
  EXPECT_TRUE(all_close("dx", dx.download(), g.dx, grad_rtol, grad_atol));
  EXPECT_TRUE(all_close("d_wg", grads.wg.download(), g.d_wg, grad_rtol, grad_atol));
  EXPECT_TRUE(all_close("d_fc1_w", grads.fc1_w.download(), g.d_fc1_w, grad_rtol, grad_atol));
  EXPECT_TRUE(all_close("d_fc2_w", grads.fc2_w.download(), g.d_fc2_w, grad_rtol, grad_atol));
  if (spec.has_fc1_bias) {
    EXPECT_TRUE(all_close("d_fc1_b", grads.fc1_b.download(), g.d_fc1_b, grad_rtol, grad_atol));
  }
  if (spec.has_fc2_bias) {
    EXPECT_TRUE(all_close("d_fc2_b", grads.fc2_b.download(), g.d_fc2_b, grad_rtol, grad_atol));
  }
}

TEST_P(CpuLayerTest, MatchesFloat64ReferenceF32) { run_case(GetParam(), DType::kF32, 1e-4, 1e-5, 1e-3, 1e-4); }

TEST_P(CpuLayerTest, MatchesFloat64ReferenceBf16Matmul) {
  // bf16 moves pre-activations by ~1e-2, so relu's derivative flips on elements near zero and
  // the comparison would measure the kink, not the kernel: run these cases with gelu.
  LayerCase c = GetParam();
  if (c.spec.activation == Activation::kRelu) c.spec.activation = Activation::kGelu;
  run_case(c, DType::kBF16, 3e-2, 3e-2, 3e-2, 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CpuLayerTest, ::testing::ValuesIn(all_cases()),
                         [](const ::testing::TestParamInfo<LayerCase>& info) { return info.param.name; });

// Batch-prioritized routing ranks a token whose scores are NaN (its input was) last, and keeps
// the valid tokens in their order: the comparison used to be no ordering at all with a NaN in it,
// and put the 0.6 token before the 0.8 one here. The reference ranks it the same way.
TEST(CpuLayerRouting, ATokenWithNaNScoresRanksLastUnderBatchPrioritizedRouting) {
  auto backend = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> scores = {0.6f, 0.4f, nan, nan, 0.8f, 0.2f, 0.7f, 0.3f};
  std::vector<int32_t> idx = {0, 0, 0, 0}, loc(4, -5), count(2, -5);
  const Device d = b.device();
  ASSERT_TRUE(b.locations({TensorView(scores.data(), DType::kF32, {4, 2}, d),
                           TensorView(idx.data(), DType::kI32, {4, 1}, d), /*batch_prioritized=*/true,
                           TensorView(loc.data(), DType::kI32, {4, 1}, d), TensorView(count.data(), DType::kI32, {2}, d)})
                  .ok());
  // Order 0.8 (token 2), 0.7 (token 3), 0.6 (token 0), then the NaN token.
  EXPECT_EQ(loc, (std::vector<int32_t>{2, 3, 0, 1}));
  EXPECT_EQ(count, (std::vector<int32_t>{4, 0}));
}

// Top-k over many experts (k up to E, which the spec allows) takes the highest scores first and
// the lower index on ties, and an all-NaN row (its input was NaN) experts 0..k-1: checked
// against a stable sort of the scores the backend returns. (The first CPU top-k took O(k²·E) per
// token: at k = E = 4096 a forward of a few tokens held its rank for minutes.)
TEST(CpuLayerRouting, TopKOfManyExpertsKeepsScoreOrderAndTheLowerIndexOnTies) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  const Device d = b.device();
  const int64_t M = 4, S = 4;
  for (const auto& [E, k] : {std::pair<int64_t, int64_t>{4096, 4096}, {1024, 7}, {64, 64}, {5, 2}}) {
    SCOPED_TRACE("E " + std::to_string(E) + ", k " + std::to_string(k));
    // The gate's rows are equal in pairs, so every token's scores tie in pairs. Tokens: two
    // random, all zeros (every score tied), NaN.
    std::vector<float> x(S * M), wg(E * M), scores(S * E), gates(S * k), l_aux(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    for (int64_t e = 0; e < E; ++e)
      for (int64_t m = 0; m < M; ++m) wg[e * M + m] = e % 2 == 1 ? wg[(e - 1) * M + m] : normal(rng);
    for (int64_t m = 0; m < M; ++m) {
      x[0 * M + m] = normal(rng);
      x[1 * M + m] = normal(rng);
      x[2 * M + m] = 0.f;
      x[3 * M + m] = std::numeric_limits<float>::quiet_NaN();
    }
    std::vector<int32_t> idx(S * k, -1);
    ASSERT_TRUE(b.gate_forward({TensorView(x.data(), DType::kF32, {S, M}, d), TensorView(wg.data(), DType::kF32, {E, M}, d),
                                {}, static_cast<int>(k), /*normalize=*/true, TensorView(scores.data(), DType::kF32, {S, E}, d),
                                TensorView(idx.data(), DType::kI32, {S, k}, d), TensorView(gates.data(), DType::kF32, {S, k}, d),
                                TensorView(l_aux.data(), DType::kF32, {1}, d)})
                    .ok());
    for (int64_t s = 0; s < S; ++s) {
      SCOPED_TRACE("token " + std::to_string(s));
      std::vector<int32_t> order(E);
      for (int64_t e = 0; e < E; ++e) order[e] = static_cast<int32_t>(e);
      const float* row = scores.data() + s * E;
      std::stable_sort(order.begin(), order.end(), [row](int32_t a, int32_t c) { return row[a] > row[c]; });
      for (int64_t j = 0; j < k; ++j) ASSERT_EQ(idx[s * k + j], order[j]) << "choice " << j;
    }
  }
}

// layer_backward reads the buffers its forward laid out: a spec of other shapes (k, E, H) would
// read past them, and is refused naming both; one of the same shapes but another capacity
// factor or gate normalisation would compute a wrong gradient, and is refused too.
TEST(CpuLayerApi, ABackwardWithAnotherSpecThanItsForwardIsRefused) {
  auto backend = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  std::mt19937_64 rng(std::random_device{}());
  LayerSpec spec;
  spec.experts = 4;
  spec.model_dim = 8;
  spec.hidden = 8;
  spec.k = 1;
  const int64_t S = 6, M = 8;
  DeviceLayer layer(b, spec), grads(b, spec);
  layer.upload(random_params(rng, spec));
  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, M}), dy(b, DType::kF32, {S, M}),
      dx(b, DType::kF32, {S, M});
  x.upload(to_f32(randn(rng, S * M, 1.0)));
  dy.upload(to_f32(randn(rng, S * M, 1.0)));
  LayerWorkspace ws;
  ASSERT_TRUE(layer_forward(b, spec, layer.weights(), x.view(), 0, true, ws, y.view(), nullptr).ok());
  for (int variant = 0; variant < 5; ++variant) {
    LayerSpec other = spec;
    if (variant == 0) other.k = 2;
    if (variant == 1) other.experts = 8;
    if (variant == 2) other.hidden = 16;
    // Shapes alike, the gradient's formula not: refused too.
    if (variant == 3) other.capacity_factor = spec.capacity_factor + 1.0;
    if (variant == 4) other.normalize_gate = !spec.normalize_gate;
    DeviceLayer other_layer(b, other), other_grads(b, other);
    other_layer.upload(random_params(rng, other));
    const Status st = layer_backward(b, other, other_layer.weights(), x.view(), ws, dy.view(), 0.f, dx.view(),
                                     other_grads.weights());
    EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << "variant " << variant << ": " << st;
    EXPECT_NE(st.message().find("differs from its forward's"), std::string_view::npos) << st;
  }
  // The forward's own spec still runs its backward.
  EXPECT_TRUE(layer_backward(b, spec, layer.weights(), x.view(), ws, dy.view(), 0.f, dx.view(), grads.weights()).ok());
}

TEST(CpuLayerApi, AnAllocationNearTheAddressSpaceIsRefusedNotWrapped) {
  auto backend = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(backend.ok());
  for (size_t bytes : {std::numeric_limits<size_t>::max() - 10, std::numeric_limits<size_t>::max()}) {
    auto buf = (*backend)->allocate(bytes);
    EXPECT_EQ(buf.status().code(), StatusCode::kResourceExhausted) << bytes;
  }
}

// An inference skips an expert no token reached: its rows of hidden stay as they were (computing
// them read that expert's weights for nothing), its output rows are zeros (the expert-parallel
// layer sends them back to the tokens' ranks: not what the buffer held). The experts in use get what a
// forward without counts gives: the same bits with biases (one matmul per expert either way);
// without, oneDNN's kernel for a batch of matrices and its kernel for one add in other orders:
// within 1e-5 (relative past 1) under f32 matmuls, and within this file's bf16 tolerance under
// bf16 ones, where an f32 hidden a few ULPs apart can round to the neighbouring bf16 value before
// the second GEMM (1.6e-3 of 0.155 seen, one run in many). A training forward (which keeps
// `hidden` for its backward) computes every expert whatever the counts say.
TEST(CpuExpertForward, AnInferenceSkipsTheExpertsNoTokenReached) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  for (bool biases : {true, false}) {
    for (DType matmul_dtype : {DType::kF32, DType::kBF16}) {
      SCOPED_TRACE(::testing::Message() << "biases " << biases << ", matmul " << dtype_name(matmul_dtype));
      LayerSpec spec = base_spec(6, 32, 48, 2, 1.0);
      spec.has_fc1_bias = spec.has_fc2_bias = biases;
      const int64_t E = 6, C = 4, M = 32, H = 48, O = 32;
      DeviceLayer layer(b, spec);
      layer.upload(random_params(rng, spec));
      const ExpertWeights weights = layer.weights().experts;
      const DeviceTensor dispatched = random_tensor(b, rng, {E, C, M}, 1.0);
      DeviceTensor count(b, DType::kI32, {E});
      const std::vector<int32_t> counts = {3, 0, 1, 0, 0, 7};  // 7 > C: dropped tokens, still in use
      count.upload_as(counts);
      DeviceBuffer workspace = std::move(b.allocate(b.expert_workspace_bytes({E, C, M, H, O}, matmul_dtype))).value();
      const TensorView ws(workspace.data(), DType::kU8, {static_cast<int64_t>(workspace.bytes())}, b.device());
      const float sentinel = -12345.f;
      auto run = [&](bool keep_hidden, bool with_count) {
        DeviceTensor hidden(b, DType::kF32, {E, C, H}), out(b, DType::kF32, {E, C, O});
        hidden.upload(std::vector<float>(E * C * H, sentinel));
        out.upload(std::vector<float>(E * C * O, sentinel));
        const Status st = b.expert_forward({dispatched.view(), weights, Activation::kRelu, matmul_dtype, {},
                                            hidden.view(), out.view(), ws, keep_hidden,
                                            with_count ? count.view() : TensorView()});
        EXPECT_TRUE(st.ok()) << st;
        return std::pair(hidden.download(), out.download());
      };
      const auto [full_hidden, full_out] = run(/*keep_hidden=*/false, /*with_count=*/false);
      const auto [hidden, out] = run(/*keep_hidden=*/false, /*with_count=*/true);
      float max_out = 0.f;
      for (int64_t e = 0; e < E; ++e)
        if (counts[e] > 0)
          for (int64_t i = e * C * O; i < (e + 1) * C * O; ++i) max_out = std::max(max_out, std::abs(full_out[i]));
      const auto tolerance = [&](float want) {
        return matmul_dtype == DType::kBF16 ? 3e-2f * max_out + 3e-2f * std::abs(want)
                                            : 1e-5f * std::max(1.f, std::abs(want));
      };
      for (int64_t e = 0; e < E; ++e) {
        const bool used = counts[e] > 0;
        for (int64_t i = e * C * O; i < (e + 1) * C * O; ++i) {
          ASSERT_NE(full_out[i], sentinel);
          if (!used) {
            ASSERT_EQ(out[i], 0.f) << "expert " << e << ", output element " << i;
          } else if (biases) {
            ASSERT_EQ(out[i], full_out[i]) << "expert " << e << ", output element " << i;
          } else {
            ASSERT_NEAR(out[i], full_out[i], tolerance(full_out[i]))
                << "expert " << e << ", output element " << i;
          }
        }
        if (!used) {
          for (int64_t i = e * C * H; i < (e + 1) * C * H; ++i) ASSERT_EQ(hidden[i], sentinel) << "expert " << e;
        }
      }
      const auto [trained_hidden, trained_out] = run(/*keep_hidden=*/true, /*with_count=*/true);
      EXPECT_EQ(trained_out, full_out) << "a training forward computes every expert";
      EXPECT_EQ(trained_hidden, full_hidden);
    }
  }
}

// Every output of one step: y, dx and the gradients.
std::vector<std::vector<float>> one_step(const LayerSpec& spec, const ref::Params& p, int64_t S,
                                         const std::vector<float>& x_host, const std::vector<float>& dy_host,
                                         int threads) {
  auto backend = make_backend("cpu", {.threads = threads});
  EXPECT_TRUE(backend.ok());
  if (!backend.ok()) return {};
  Backend& b = **backend;
  const int64_t M = spec.model_dim, O = spec.out_dim();
  DeviceLayer layer(b, spec), grads(b, spec);
  layer.upload(p);
  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O}), dy(b, DType::kF32, {S, O}),
      dx(b, DType::kF32, {S, M});
  x.upload(x_host);
  dy.upload(dy_host);
  LayerWorkspace ws;
  EXPECT_TRUE(layer_forward(b, spec, layer.weights(), x.view(), 0, true, ws, y.view(), nullptr).ok());
  EXPECT_TRUE(layer_backward(b, spec, layer.weights(), x.view(), ws, dy.view(), 0.5f, dx.view(), grads.weights()).ok());
  return {y.download(), dx.download(), grads.wg.download(), grads.fc1_w.download(),
          grads.fc1_b.download(), grads.fc2_w.download(), grads.fc2_b.download()};
}

// One step each with `threads_a` and `threads_b` threads on the same fresh inputs of S tokens:
// every output must be the same bits.
void expect_identical_steps(int64_t S, int threads_a, int threads_b) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const LayerSpec spec = base_spec(8, 64, 128, 2, 1.0);
  const ref::Params p = random_params(rng, spec);
  const std::vector<float> x = to_f32(randn(rng, S * spec.model_dim, 1.0)),
                           dy = to_f32(randn(rng, S * spec.out_dim(), 1.0));
  const auto a = one_step(spec, p, S, x, dy, threads_a), b = one_step(spec, p, S, x, dy, threads_b);
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "output " << i;
}

// The same inputs give bit-identical results with 1 and 2 threads: the reductions the backend
// writes (the loss, bias gradients) sum fixed blocks, and at this size oneDNN does not split a
// GEMM's summed dimension over threads.
TEST(CpuLayerDeterminism, IndependentOfThreadCount) { expect_identical_steps(600, 1, 2); }

// Longer reductions (weight gradients over 2048 tokens and more) may be split by oneDNN over the
// threads, so their last bits depend on the thread count (decisions.md, "Determinism"); at one
// thread count a step is still repeatable bit for bit.
TEST(CpuLayerDeterminism, RepeatableAtOneThreadCountForLongReductions) { expect_identical_steps(4096, 2, 2); }

// A workspace reused for a second, larger batch gives the same answer as a fresh one.
TEST(CpuLayerWorkspace, ReuseAcrossBatchSizes) {
  std::mt19937_64 rng(std::random_device{}());
  LayerSpec spec = base_spec(4, 32, 48, 2, 0.0);
  const ref::Params p = random_params(rng, spec);
  auto backend = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  DeviceLayer layer(b, spec);
  layer.upload(p);
  LayerWorkspace reused;
  for (int64_t S : {16, 200, 50}) {
    DeviceTensor x(b, DType::kF32, {S, 32}), y1(b, DType::kF32, {S, 32}), y2(b, DType::kF32, {S, 32});
    x.upload(to_f32(randn(rng, S * 32, 1.0)));
    LayerWorkspace fresh;
    ASSERT_TRUE(layer_forward(b, spec, layer.weights(), x.view(), 0, false, reused, y1.view(), nullptr).ok());
    ASSERT_TRUE(layer_forward(b, spec, layer.weights(), x.view(), 0, false, fresh, y2.view(), nullptr).ok());
    EXPECT_EQ(y1.download(), y2.download()) << "S = " << S;
  }
}

TEST(CpuLayerErrors, RefusesBadShapesAndSpecs) {
  auto backend = make_backend("cpu", {});
  ASSERT_TRUE(backend.ok());
  Backend& b = **backend;
  LayerSpec spec = base_spec(4, 16, 16, 2, 1.0);
  DeviceLayer layer(b, spec);
  DeviceTensor x(b, DType::kF32, {8, 16}), y(b, DType::kF32, {8, 16}), wrong(b, DType::kF32, {8, 15});
  LayerWorkspace ws;
  Status s = layer_forward(b, spec, layer.weights(), wrong.view(), 0, false, ws, y.view(), nullptr);
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("x has shape [8, 15]"), std::string_view::npos) << s;

  LayerSpec bad_k = spec;
  bad_k.k = 5;
  s = layer_forward(b, bad_k, layer.weights(), x.view(), 0, false, ws, y.view(), nullptr);
  EXPECT_NE(s.message().find("k = 5"), std::string_view::npos) << s;

  LayerSpec other_hidden = spec;
  other_hidden.hidden = 17;
  s = layer_forward(b, other_hidden, layer.weights(), x.view(), 0, false, ws, y.view(), nullptr);
  EXPECT_NE(s.message().find(kFc1WeightName), std::string_view::npos) << s;

  DeviceTensor dy(b, DType::kF32, {8, 16}), dx(b, DType::kF32, {8, 16});
  DeviceLayer grads(b, spec);
  s = layer_backward(b, spec, layer.weights(), x.view(), ws, dy.view(), 0.f, dx.view(), grads.weights());
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << "backward without a training forward";

  EXPECT_FALSE(make_backend("tpu", {}).ok());
}

}  // namespace
}  // namespace tutel::testing
