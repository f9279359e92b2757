// The contract of bf16 weight copies (ExpertWeights::fc1_weight_bf16/fc2_weight_bf16,
// Backend::convert, the optimizers' param_bf16), as checks that run on any backend: the CPU
// suite (bf16_weights_test.cpp) and the CUDA one (tests/cuda) hold both backends to the same
// rules. The central one: a bf16 matmul given the copies returns the bits of the same matmul
// converting the f32 weights itself.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <ios>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "layer_cases.hpp"
#include "layer_test_util.hpp"
#include "tutel/core/dtype.hpp"

namespace tutel::testing {

// bf16 of a non-NaN float by the textbook rule, written apart from f32_to_bf16: keep the top 16
// bits and round by the dropped 16, to nearest, ties to an even kept half (overflow reaches Inf
// through the carry into the exponent).
inline uint16_t reference_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint32_t kept = bits >> 16;
  const uint32_t dropped = bits & 0xffffu;
  if (dropped > 0x8000u || (dropped == 0x8000u && (kept & 1u))) ++kept;
  return static_cast<uint16_t>(kept);
}

inline bool bf16_is_nan(uint16_t h) { return (h & 0x7fffu) > 0x7f80u; }

inline float float_of_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Bit-for-bit equality of two float tensors, naming the first difference.
inline ::testing::AssertionResult same_bits(const std::string& what, const std::vector<float>& got,
                                            const std::vector<float>& want) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure()
           << what << ": " << got.size() << " vs " << want.size() << " elements";
  for (size_t i = 0; i < got.size(); ++i)
    if (std::memcmp(&got[i], &want[i], 4) != 0)
      return ::testing::AssertionFailure()
             << what << "[" << i << "] = " << got[i] << ", expected the bits of " << want[i];
  return ::testing::AssertionSuccess();
}

// Inputs for convert(): every special (±0, ±Inf, NaNs with payloads, subnormals, the largest
// finite, values that round up to Inf), exact ties both ways, and random bit patterns (all
// exponents).
inline std::vector<float> conversion_inputs(std::mt19937_64& rng) {
  using L = std::numeric_limits<float>;
  std::vector<float> v = {0.f,
                          -0.f,
                          1.f,
                          -1.f,
                          3.140625f,
                          L::infinity(),
                          -L::infinity(),
                          L::quiet_NaN(),
                          -L::quiet_NaN(),
                          L::max(),
                          -L::max(),
                          L::denorm_min(),
                          L::min()};
  for (uint32_t bits :
       {0x7f800001u, 0xff800001u, 0x7fbfffffu, 0x7f7f8000u, 0x7f7f7fffu, 0x00008000u, 0x00018000u,
        0x80018000u, 0x3f808000u, 0x3f818000u, 0x3f808001u, 0x3f807fffu})
    v.push_back(float_of_bits(bits));
  std::uniform_int_distribution<uint32_t> any;
  for (int i = 0; i < 4096; ++i)
    v.push_back(float_of_bits((any(rng) & 0xffff0000u) | 0x8000u));  // ties
  for (int i = 0; i < 60000; ++i) v.push_back(float_of_bits(any(rng)));
  while (v.size() % 4 != 0) v.push_back(float_of_bits(any(rng)));  // whole 16-byte groups
  return v;
}

// Every element of `out` (bf16 bits) is reference_bf16 of `in`, NaN kept a NaN; with
// `same_as_host`, NaN payloads included, also f32_to_bf16, the on-the-fly conversion.
inline ::testing::AssertionResult rounded_as_reference(const std::vector<float>& in,
                                                       const std::vector<uint16_t>& out,
                                                       bool same_as_host = false) {
  if (in.size() != out.size())
    return ::testing::AssertionFailure() << in.size() << " inputs, " << out.size() << " outputs";
  int64_t wrong = 0;
  ::testing::AssertionResult result = ::testing::AssertionSuccess();
  for (size_t i = 0; i < in.size(); ++i) {
    const bool ok = (std::isnan(in[i]) ? bf16_is_nan(out[i]) : out[i] == reference_bf16(in[i])) &&
                    (!same_as_host || out[i] == f32_to_bf16(in[i]));
    if (ok || ++wrong > 10) continue;
    uint32_t bits;
    std::memcpy(&bits, &in[i], 4);
    result = ::testing::AssertionFailure();
    result << std::hex << "[" << std::dec << i << std::hex << "] input 0x" << bits << " gave 0x"
           << out[i] << ", reference 0x" << reference_bf16(in[i]) << ", f32_to_bf16 0x"
           << f32_to_bf16(in[i]) << "; ";
  }
  if (wrong != 0) result << std::dec << wrong << " wrong of " << in.size();
  return result;
}

// convert() rounds as reference_bf16 and keeps NaN a NaN. `same_as_host` (the CPU backend):
// every output, NaN payloads included, also equals f32_to_bf16, the on-the-fly conversion.
// Three views of the inputs, for backends with a 16-byte path: the whole (a multiple of 4
// elements, aligned), one element short (a tail), and from the second element (unaligned).
inline void check_convert(Backend& b, std::mt19937_64& rng, bool same_as_host) {
  const std::vector<float> in = conversion_inputs(rng);
  const int64_t n = static_cast<int64_t>(in.size());
  ASSERT_EQ(n % 4, 0);
  DeviceTensor src(b, DType::kF32, {n});
  src.upload(in);
  struct Part {
    int64_t first, count;
  };
  for (const Part& part : {Part{0, n}, Part{0, n - 1}, Part{1, n - 1}}) {
    SCOPED_TRACE("elements [" + std::to_string(part.first) + ", " +
                 std::to_string(part.first + part.count) + ")");
    DeviceTensor dst(b, DType::kBF16, {part.count});
    const TensorView from(static_cast<float*>(src.view().data()) + part.first, DType::kF32,
                          {part.count}, src.view().device());
    const Status s = b.convert(from, dst.view());
    ASSERT_TRUE(s.ok()) << s;
    const std::vector<float> want(in.begin() + part.first, in.begin() + part.first + part.count);
    EXPECT_TRUE(rounded_as_reference(want, dst.download_as<uint16_t>(), same_as_host));
  }
}

// bf16 copies of a DeviceLayer's two expert weights, filled by Backend::convert.
struct Bf16Copies {
  DeviceTensor fc1, fc2;

  Bf16Copies(Backend& b, const LayerSpec& s)
      : fc1(b, DType::kBF16, {s.experts, s.hidden, s.model_dim}),
        fc2(b, DType::kBF16, {s.experts, s.hidden, s.out_dim()}) {}
  Status fill(Backend& b, const DeviceLayer& layer) {
    TUTEL_RETURN_IF_ERROR(b.convert(layer.fc1_w.view(), fc1.view()));
    return b.convert(layer.fc2_w.view(), fc2.view());
  }
  LayerWeights attach(LayerWeights w) const {
    w.experts.fc1_weight_bf16 = fc1.view();
    w.experts.fc2_weight_bf16 = fc2.view();
    return w;
  }
};

// layer_forward and layer_backward (bf16 matmuls) give the same bits with the weights' copies as
// without, on fresh random inputs.
inline void check_layer_with_copies(Backend& b, LayerSpec spec, int64_t S, uint64_t seed) {
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  spec.matmul_dtype = DType::kBF16;
  const int64_t M = spec.model_dim, O = spec.out_dim();
  DeviceLayer layer(b, spec);
  layer.upload(random_params(rng, spec));
  Bf16Copies copies(b, spec);
  const Status filled = copies.fill(b, layer);
  ASSERT_TRUE(filled.ok()) << filled;
  DeviceTensor x(b, DType::kF32, {S, M}), dy(b, DType::kF32, {S, O});
  x.upload(to_f32(randn(rng, S * M, 1.0)));
  dy.upload(to_f32(randn(rng, S * O, 1.0)));

  std::vector<std::vector<float>> results[2];
  for (int with_copies : {0, 1}) {
    DeviceLayer grads(b, spec);  // zeroed
    DeviceTensor y(b, DType::kF32, {S, O}), dx(b, DType::kF32, {S, M});
    const LayerWeights w = with_copies ? copies.attach(layer.weights()) : layer.weights();
    LayerWorkspace ws;
    Status s = layer_forward(b, spec, w, x.view(), 7, /*training=*/true, ws, y.view(), nullptr);
    ASSERT_TRUE(s.ok()) << s;
    s = layer_backward(b, spec, w, x.view(), ws, dy.view(), 0.5f, dx.view(), grads.weights());
    ASSERT_TRUE(s.ok()) << s;
    results[with_copies] = {y.download(),           dx.download(),          grads.wg.download(),
                            grads.fc1_w.download(), grads.fc1_b.download(), grads.fc2_w.download(),
                            grads.fc2_b.download()};
  }
  const char* names[] = {"y", "dx", "d_wg", "d_fc1_w", "d_fc1_b", "d_fc2_w", "d_fc2_b"};
  for (size_t i = 0; i < results[0].size(); ++i)
    EXPECT_TRUE(same_bits(names[i], results[1][i], results[0][i]));
}

// expert_forward and expert_backward, op by op: the copies give the on-the-fly bits, with a
// workspace sized for weights that come in bf16 (never larger, and smaller where the weights
// are the largest operands).
inline void check_expert_ops_with_copies(Backend& b, std::mt19937_64& rng) {
  struct Dims {
    int64_t E, C, M, H, O;
  };
  for (const Dims& d : {Dims{3, 5, 12, 20, 7}, Dims{2, 64, 40, 24, 16}, Dims{1, 1, 3, 5, 2},
                        Dims{2, 4, 16, 32, 16}}) {
    for (Activation act : {Activation::kRelu, Activation::kGelu, Activation::kSilu}) {
      for (bool biases : {true, false}) {
        const int64_t E = d.E, C = d.C, M = d.M, H = d.H, O = d.O;
        SCOPED_TRACE("E " + std::to_string(E) + " C " + std::to_string(C) + " M " +
                     std::to_string(M) + " H " + std::to_string(H) + " O " + std::to_string(O) +
                     " " + std::string(activation_name(act)) + (biases ? " biases" : " no biases"));
        ExpertShape shape{E, C, M, H, O};
        const auto full_bytes = static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16));
        shape.weights_bf16 = true;
        const auto copy_bytes = static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16));
        EXPECT_LE(copy_bytes, full_bytes);
        // Smaller where the weights are the largest operands by more than a backend's rounding:
        // the CUDA backend starts each bf16 operand on a 256-byte boundary (kBf16Align = 128
        // elements in kernels/cuda/cuda_backend.cpp), which hides the saving at E 1 C 1 M 3 H 5
        // O 2 (seen on an H200).
        const int64_t saved_per_operand = E * (std::max(H * M, H * O) - C * std::max({M, H, O}));
        if (saved_per_operand >= 128) {
          EXPECT_LT(copy_bytes, full_bytes) << "the weights are the largest operands here";
        }
        auto random = [&](Shape s, double scale) { return random_tensor(b, rng, s, scale); };
        const DeviceTensor disp = random({E, C, M}, 1.0), fc1 = random({E, H, M}, 0.3),
                           fc2 = random({E, H, O}, 0.3), b1 = random({E, H}, 0.1),
                           b2 = random({E, O}, 0.1), d_out = random({E, C, O}, 1.0);
        const std::vector<float> grad_start = to_f32(randn(rng, E * H * std::max(M, O), 1.0));
        DeviceTensor fc1_copy(b, DType::kBF16, {E, H, M}), fc2_copy(b, DType::kBF16, {E, H, O});
        ASSERT_TRUE(b.convert(fc1.view(), fc1_copy.view()).ok());
        ASSERT_TRUE(b.convert(fc2.view(), fc2_copy.view()).ok());

        std::vector<std::vector<float>> results[2];
        for (int with_copies : {0, 1}) {
          ExpertWeights w{fc1.view(), biases ? b1.view() : TensorView(), fc2.view(),
                          biases ? b2.view() : TensorView()};
          if (with_copies) {
            w.fc1_weight_bf16 = fc1_copy.view();
            w.fc2_weight_bf16 = fc2_copy.view();
          }
          const int64_t ws_bytes = with_copies ? copy_bytes : full_bytes;
          DeviceTensor ws(b, DType::kU8, {ws_bytes}), pre(b, DType::kF32, {E, C, H}),
              hidden(b, DType::kF32, {E, C, H}), out(b, DType::kF32, {E, C, O}),
              d_hidden(b, DType::kF32, {E, C, H}), d_disp(b, DType::kF32, {E, C, M}),
              g_fc1(b, DType::kF32, {E, H, M}), g_fc2(b, DType::kF32, {E, H, O}),
              g_b1(b, DType::kF32, {E, H}), g_b2(b, DType::kF32, {E, O});
          // Gradients accumulate onto what is there.
          g_fc1.upload(std::vector<float>(grad_start.begin(), grad_start.begin() + E * H * M));
          g_fc2.upload(std::vector<float>(grad_start.begin(), grad_start.begin() + E * H * O));
          Status s = b.expert_forward({disp.view(), w, act, DType::kBF16, pre.view(), hidden.view(),
                                       out.view(), ws.view()});
          ASSERT_TRUE(s.ok()) << s;
          const ExpertWeights grads{g_fc1.view(), biases ? g_b1.view() : TensorView(), g_fc2.view(),
                                    biases ? g_b2.view() : TensorView()};
          s = b.expert_backward({disp.view(), pre.view(), hidden.view(), w, act, DType::kBF16,
                                 d_out.view(), d_hidden.view(), d_disp.view(), grads, ws.view()});
          ASSERT_TRUE(s.ok()) << s;
          results[with_copies] = {pre.download(),      hidden.download(), out.download(),
                                  d_hidden.download(), d_disp.download(), g_fc1.download(),
                                  g_fc2.download(),    g_b1.download(),   g_b2.download()};
        }
        const char* names[] = {"pre_activation", "hidden",  "expert_out", "d_pre",  "d_dispatched",
                               "d_fc1_w",        "d_fc2_w", "d_fc1_b",    "d_fc2_b"};
        for (size_t i = 0; i < results[0].size(); ++i)
          EXPECT_TRUE(same_bits(names[i], results[1][i], results[0][i]));
      }
    }
  }
}

// The copies are what the bf16 matmuls read: zero copies of random weights zero the products
// that use them (forward fc2, backward d_dispatched = d_pre·fc1), with no bias to hide it.
inline void check_copies_are_read(Backend& b, std::mt19937_64& rng) {
  const int64_t E = 2, C = 6, M = 8, H = 16, O = 8;
  auto random = [&](Shape s) { return random_tensor(b, rng, s, 1.0); };
  const DeviceTensor disp = random({E, C, M}), fc1 = random({E, H, M}), fc2 = random({E, H, O}),
                     d_out = random({E, C, O});
  // A DeviceTensor starts zero-filled: the copies are bf16 zeros.
  DeviceTensor zero_fc1(b, DType::kBF16, {E, H, M}), zero_fc2(b, DType::kBF16, {E, H, O}),
      pre(b, DType::kF32, {E, C, H}), hidden(b, DType::kF32, {E, C, H}),
      out(b, DType::kF32, {E, C, O}), d_hidden(b, DType::kF32, {E, C, H}),
      d_disp(b, DType::kF32, {E, C, M}), g_fc1(b, DType::kF32, {E, H, M}),
      g_fc2(b, DType::kF32, {E, H, O});
  ExpertShape shape{E, C, M, H, O};
  shape.weights_bf16 = true;
  DeviceTensor ws(b, DType::kU8,
                  {static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16))});
  ExpertWeights w{fc1.view(), {}, fc2.view(), {}};
  w.fc1_weight_bf16 = zero_fc1.view();
  w.fc2_weight_bf16 = zero_fc2.view();
  Status s = b.expert_forward({disp.view(), w, Activation::kGelu, DType::kBF16, pre.view(),
                               hidden.view(), out.view(), ws.view()});
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(same_bits("expert_out", out.download(), std::vector<float>(E * C * O, 0.f)));
  s = b.expert_backward({disp.view(), pre.view(), hidden.view(), w, Activation::kGelu, DType::kBF16,
                         d_out.view(), d_hidden.view(), d_disp.view(),
                         ExpertWeights{g_fc1.view(), {}, g_fc2.view(), {}}, ws.view()});
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_TRUE(same_bits("d_dispatched", d_disp.download(), std::vector<float>(E * C * M, 0.f)));
}

// Steps with param_bf16 write f32_to_bf16 of the param they wrote, and leave the param's bits
// as a step without the copy does.
inline void check_optimizers_refresh_copies(Backend& b, std::mt19937_64& rng) {
  const int64_t n = 10007;
  const std::vector<float> start = to_f32(randn(rng, n, 1.0));
  auto check_copy = [&](const DeviceTensor& param, const DeviceTensor& copy,
                        const std::string& what) {
    const std::vector<float> p = param.download();
    const std::vector<uint16_t> c = copy.download_as<uint16_t>();
    for (int64_t i = 0; i < n; ++i)
      ASSERT_EQ(c[i], f32_to_bf16(p[i])) << what << "[" << i << "] of param " << p[i];
  };
  for (bool adamw : {false, true}) {
    SCOPED_TRACE(adamw ? "adamw" : "sgd (momentum, nesterov, weight decay)");
    DeviceTensor p_copy(b, DType::kF32, {n}), p_plain(b, DType::kF32, {n}),
        copy(b, DType::kBF16, {n}), grad(b, DType::kF32, {n}), s0_copy(b, DType::kF32, {n}),
        s1_copy(b, DType::kF32, {n}), s0_plain(b, DType::kF32, {n}), s1_plain(b, DType::kF32, {n});
    p_copy.upload(start);
    p_plain.upload(start);
    for (int64_t step = 1; step <= 3; ++step) {
      grad.upload(to_f32(randn(rng, n, 0.5)));
      for (bool with_copy : {true, false}) {
        const TensorView p = with_copy ? p_copy.view() : p_plain.view();
        const TensorView s0 = with_copy ? s0_copy.view() : s0_plain.view();
        const TensorView s1 = with_copy ? s1_copy.view() : s1_plain.view();
        const TensorView out = with_copy ? copy.view() : TensorView();
        Status s;
        if (adamw) {
          AdamWArgs a{p, grad.view(), s0, s1, 1e-2f, 0.9f, 0.98f, 1e-8f, 0.05f, step};
          a.param_bf16 = out;
          s = b.adamw_step(a);
        } else {
          SgdArgs a{p, grad.view(), s0, 0.05f, 0.9f, 1e-2f, /*nesterov=*/true, step == 1};
          a.param_bf16 = out;
          s = b.sgd_step(a);
        }
        ASSERT_TRUE(s.ok()) << s;
      }
      check_copy(p_copy, copy, "param_bf16");
      EXPECT_TRUE(same_bits("param", p_copy.download(), p_plain.download()));
    }
  }
}

template <typename T>
::testing::AssertionResult refused(const Status& s, std::initializer_list<T> fragments) {
  if (s.code() != StatusCode::kInvalidArgument)
    return ::testing::AssertionFailure() << "expected InvalidArgument, got " << s;
  for (const T& f : fragments)
    if (s.message().find(f) == std::string_view::npos)
      return ::testing::AssertionFailure() << "message lacks \"" << f << "\": " << s;
  return ::testing::AssertionSuccess();
}

// Copies of the wrong dtype or shape are refused with a message naming them, wherever they come
// in: LayerWeights::validate, layer_forward, the expert ops, convert, the optimizers.
inline void check_malformed_copies_refused(Backend& b) {
  using L = std::initializer_list<const char*>;
  LayerSpec spec = base_spec(2, 8, 16, 1, 1.0);
  spec.matmul_dtype = DType::kBF16;
  const int64_t E = 2, M = 8, H = 16, O = 8, S = 4, C = 4;
  DeviceLayer layer(b, spec);
  DeviceTensor f32_copy(b, DType::kF32, {E, H, M}), short_copy(b, DType::kBF16, {E, H, O - 1}),
      good_fc1(b, DType::kBF16, {E, H, M});

  LayerWeights w = layer.weights();
  w.experts.fc1_weight_bf16 = f32_copy.view();
  EXPECT_TRUE(refused(w.validate(spec, "weights"),
                      L{"weights fc1_weight_bf16", "dtype f32", "Backend::convert"}));
  w.experts.fc1_weight_bf16 = good_fc1.view();
  w.experts.fc2_weight_bf16 = short_copy.view();
  EXPECT_TRUE(
      refused(w.validate(spec, "weights"), L{"fc2_weight_bf16", "shape [2, 16, 7]", "[2, 16, 8]"}));
  DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O});
  LayerWorkspace ws;
  EXPECT_TRUE(refused(layer_forward(b, spec, w, x.view(), 0, false, ws, y.view(), nullptr),
                      L{"fc2_weight_bf16"}));

  DeviceTensor disp(b, DType::kF32, {E, C, M}), hidden(b, DType::kF32, {E, C, H}),
      out(b, DType::kF32, {E, C, O});
  ExpertShape shape{E, C, M, H, O};
  DeviceTensor full_ws(b, DType::kU8,
                       {static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16))});
  ExpertWeights bad = layer.weights().experts;
  bad.fc1_weight_bf16 = f32_copy.view();
  EXPECT_TRUE(refused(b.expert_forward({disp.view(),
                                        bad,
                                        Activation::kRelu,
                                        DType::kBF16,
                                        {},
                                        hidden.view(),
                                        out.view(),
                                        full_ws.view()}),
                      L{"fc1_weight_bf16", "dtype f32"}));
  // A workspace sized for weights in bf16, given weights without copies.
  shape.weights_bf16 = true;
  DeviceTensor small_ws(b, DType::kU8,
                        {static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16))});
  EXPECT_TRUE(refused(b.expert_forward({disp.view(),
                                        layer.weights().experts,
                                        Activation::kRelu,
                                        DType::kBF16,
                                        {},
                                        hidden.view(),
                                        out.view(),
                                        small_ws.view()}),
                      L{"expert_workspace_bytes", "weights_bf16"}));

  DeviceTensor src(b, DType::kF32, {E, H, M});
  EXPECT_TRUE(refused(b.convert(src.view(), f32_copy.view()), L{"dtype f32", "expected bf16"}));
  EXPECT_TRUE(refused(b.convert(src.view(), short_copy.view()), L{"shape"}));
  EXPECT_TRUE(refused(b.convert(good_fc1.view(), good_fc1.view()), L{"only f32"}));

  DeviceTensor p(b, DType::kF32, {10}), g(b, DType::kF32, {10}), m(b, DType::kF32, {10}),
      v(b, DType::kF32, {10}), p_f32(b, DType::kF32, {10}), p_short(b, DType::kBF16, {9});
  SgdArgs sgd{p.view(), g.view(), {}};
  sgd.param_bf16 = p_f32.view();
  EXPECT_TRUE(refused(b.sgd_step(sgd), L{"sgd param_bf16", "dtype f32"}));
  AdamWArgs adamw{p.view(), g.view(), m.view(), v.view()};
  adamw.param_bf16 = p_short.view();
  EXPECT_TRUE(refused(b.adamw_step(adamw), L{"adamw param_bf16", "shape [9]"}));
}

}  // namespace tutel::testing
