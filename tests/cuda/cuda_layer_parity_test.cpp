// The whole layer, forward and backward, on the CUDA backend against the float64 reference and
// against the CPU backend, on fresh random inputs over the shapes and options of
// cpu_layer_test (plus a few that exercise the GPU's own boundaries: more than 32 experts,
// several location chunks).
//
// Tolerances (|got − want| <= atol·max|want| + rtol·|want|), as cpu_layer_test:
//   f32 forward:   rtol 1e-4, atol 1e-5
//   f32 gradients: rtol 1e-3, atol 1e-4
//   bf16 matmuls:  rtol 3e-2, atol 3e-2
// Routing (indices, locations, capacity, dropped) must match the reference and the CPU exactly;
// inputs are redrawn until no routing decision is within 1e-6 of a tie.
#include <gtest/gtest.h>

#include <optional>
#include <random>

#include "cuda_test_util.hpp"
#include "layer_cases.hpp"

namespace tutel::testing {
namespace {

// Everything a training step of one layer produces, read back to the host.
struct Outputs {
  RoutingStats stats;
  std::vector<int32_t> idx, loc;
  std::vector<float> gates, y, dx, d_wg, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b;
};

void run_layer(Backend& b, const LayerSpec& spec, int64_t S, const Inputs& in, Outputs* out) {
  const int64_t M = spec.model_dim, O = spec.out_dim(), k = spec.k;
  DeviceLayer layer(b, spec), grads(b, spec);
  layer.upload(in.params);
  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O}), dy(b, DType::kF32, {S, O}),
      dx(b, DType::kF32, {S, M});
  x.upload(to_f32(in.x));
  dy.upload(to_f32(in.dy));
  LayerWorkspace ws;
  Status s = layer_forward(b, spec, layer.weights(), x.view(), kNoiseCounter, /*training=*/true, ws, y.view(),
                           &out->stats);
  ASSERT_TRUE(s.ok()) << b.name() << " forward: " << s;
  out->idx.resize(S * k);
  out->loc.resize(S * k);
  out->gates.resize(S * k);
  ASSERT_TRUE(b.copy(out->idx.data(), ws.expert_index(b.device()).data(), S * k * 4, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(b.copy(out->loc.data(), ws.location(b.device()).data(), S * k * 4, CopyKind::kDeviceToHost).ok());
  ASSERT_TRUE(b.copy(out->gates.data(), ws.gates(b.device()).data(), S * k * 4, CopyKind::kDeviceToHost).ok());
  out->y = y.download();
  s = layer_backward(b, spec, layer.weights(), x.view(), ws, dy.view(), static_cast<float>(in.dl_aux), dx.view(),
                     grads.weights());
  ASSERT_TRUE(s.ok()) << b.name() << " backward: " << s;
  out->dx = dx.download();
  out->d_wg = grads.wg.download();
  out->d_fc1_w = grads.fc1_w.download();
  out->d_fc2_w = grads.fc2_w.download();
  if (spec.has_fc1_bias) out->d_fc1_b = grads.fc1_b.download();
  if (spec.has_fc2_bias) out->d_fc2_b = grads.fc2_b.download();
}

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// cpu_layer_test's cases and the GPU-only ones.
std::vector<LayerCase> cuda_cases() {
  std::vector<LayerCase> cases = all_cases();
  for (LayerCase& c : gpu_boundary_cases()) cases.push_back(std::move(c));
  return cases;
}

class CudaLayerParity : public ::testing::TestWithParam<LayerCase> {
 protected:
  void SetUp() override { TUTEL_REQUIRE_CUDA_DEVICE(); }
};

void run_case(const LayerCase& case_in, DType matmul_dtype, double fwd_rtol, double fwd_atol, double grad_rtol,
              double grad_atol) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  LayerCase c = case_in;
  c.spec.matmul_dtype = matmul_dtype;
  const LayerSpec& spec = c.spec;
  const int64_t S = c.tokens;
  std::optional<Inputs> drawn = draw(rng, c);
  ASSERT_TRUE(drawn.has_value()) << "could not draw inputs without near-ties";
  const Inputs& in = *drawn;

  auto cpu = make_backend("cpu", {.threads = 2});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  auto gpu = make_backend("cuda", {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  Outputs want_cpu, got;
  run_layer(**cpu, spec, S, in, &want_cpu);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  run_layer(**gpu, spec, S, in, &got);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());

  const ref::Forward& want = in.want;
  EXPECT_EQ(got.stats.capacity, want.capacity);
  EXPECT_EQ(got.stats.dropped, want.dropped);
  EXPECT_EQ(got.stats.capacity, want_cpu.stats.capacity);
  EXPECT_EQ(got.stats.dropped, want_cpu.stats.dropped);
  EXPECT_NEAR(got.stats.l_aux, want.l_aux, 1e-5 * std::max(1.0, std::abs(want.l_aux)));
  for (int64_t i = 0; i < S * spec.k; ++i) {
    ASSERT_EQ(got.idx[i], want.idx[i]) << "expert index of assignment " << i;
    ASSERT_EQ(got.loc[i], want.loc[i]) << "location of assignment " << i;
  }
  EXPECT_EQ(got.idx, want_cpu.idx);
  EXPECT_EQ(got.loc, want_cpu.loc);
  EXPECT_TRUE(all_close("gates", got.gates, want.gates, 1e-5, 1e-6));
  EXPECT_TRUE(all_close("y", got.y, want.y, fwd_rtol, fwd_atol));
  EXPECT_TRUE(all_close("y vs cpu", got.y, widen(want_cpu.y), fwd_rtol, fwd_atol));

  const ref::Grads g =
      ref::backward(to_ref(spec, S), in.params, in.x, c.noise ? &in.noise : nullptr, in.dy, in.dl_aux);
  struct Grad {
    const char* name;
    const std::vector<float>& got;
    const std::vector<double>& ref;
    const std::vector<float>& cpu;
  };
  std::vector<Grad> all = {{"dx", got.dx, g.dx, want_cpu.dx},
                           {"d_wg", got.d_wg, g.d_wg, want_cpu.d_wg},
                           {"d_fc1_w", got.d_fc1_w, g.d_fc1_w, want_cpu.d_fc1_w},
                           {"d_fc2_w", got.d_fc2_w, g.d_fc2_w, want_cpu.d_fc2_w}};
  if (spec.has_fc1_bias) all.push_back({"d_fc1_b", got.d_fc1_b, g.d_fc1_b, want_cpu.d_fc1_b});
  if (spec.has_fc2_bias) all.push_back({"d_fc2_b", got.d_fc2_b, g.d_fc2_b, want_cpu.d_fc2_b});
  for (const Grad& gr : all) {
    EXPECT_TRUE(all_close(gr.name, gr.got, gr.ref, grad_rtol, grad_atol));
    EXPECT_TRUE(all_close(std::string(gr.name) + " vs cpu", gr.got, widen(gr.cpu), grad_rtol, grad_atol));
  }
}

TEST_P(CudaLayerParity, MatchesReferenceAndCpuF32) { run_case(GetParam(), DType::kF32, 1e-4, 1e-5, 1e-3, 1e-4); }

TEST_P(CudaLayerParity, MatchesReferenceAndCpuBf16Matmul) {
  // As cpu_layer_test: bf16 moves pre-activations by ~1e-2, so relu's kink would dominate.
  LayerCase c = GetParam();
  if (c.spec.activation == Activation::kRelu) c.spec.activation = Activation::kGelu;
  run_case(c, DType::kBF16, 3e-2, 3e-2, 3e-2, 3e-2);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaLayerParity, ::testing::ValuesIn(cuda_cases()),
                         [](const ::testing::TestParamInfo<LayerCase>& info) { return info.param.name; });

// Two runs of the same step on the GPU are bit-identical (fixed-order reductions, no atomics on
// floats); a workspace reused across batch sizes gives a fresh one's answer.
TEST(CudaLayerDeterminism, RepeatsBitForBitAndReusesWorkspaces) {
  TUTEL_REQUIRE_CUDA_DEVICE();
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  LayerSpec spec = base_spec(8, 64, 128, 2, 1.0);
  spec.batch_prioritized = true;
  const int64_t S = 600;
  Inputs in;
  in.params = random_params(rng, spec);
  in.x = randn(rng, S * spec.model_dim, 1.0);
  in.dy = randn(rng, S * spec.out_dim(), 1.0);
  in.dl_aux = 0.5;
  auto gpu = make_backend("cuda", {});
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  Outputs first, second;
  run_layer(**gpu, spec, S, in, &first);
  run_layer(**gpu, spec, S, in, &second);
  ASSERT_FALSE(::testing::Test::HasFatalFailure());
  EXPECT_EQ(first.idx, second.idx);
  EXPECT_EQ(first.loc, second.loc);
  EXPECT_EQ(first.stats.l_aux, second.stats.l_aux);
  EXPECT_EQ(first.y, second.y);
  EXPECT_EQ(first.dx, second.dx);
  EXPECT_EQ(first.d_wg, second.d_wg);
  EXPECT_EQ(first.d_fc1_w, second.d_fc1_w);
  EXPECT_EQ(first.d_fc1_b, second.d_fc1_b);
  EXPECT_EQ(first.d_fc2_w, second.d_fc2_w);
  EXPECT_EQ(first.d_fc2_b, second.d_fc2_b);

  Backend& b = **gpu;
  LayerSpec dropless = base_spec(4, 32, 48, 2, 0.0);
  DeviceLayer layer(b, dropless);
  layer.upload(random_params(rng, dropless));
  LayerWorkspace reused;
  for (int64_t tokens : {16, 200, 50}) {
    DeviceTensor x(b, DType::kF32, {tokens, 32}), y1(b, DType::kF32, {tokens, 32}), y2(b, DType::kF32, {tokens, 32});
    x.upload(to_f32(randn(rng, tokens * 32, 1.0)));
    LayerWorkspace fresh;
    ASSERT_TRUE(layer_forward(b, dropless, layer.weights(), x.view(), 0, false, reused, y1.view(), nullptr).ok());
    ASSERT_TRUE(layer_forward(b, dropless, layer.weights(), x.view(), 0, false, fresh, y2.view(), nullptr).ok());
    EXPECT_EQ(y1.download(), y2.download()) << "S = " << tokens;
  }
}

}  // namespace
}  // namespace tutel::testing
