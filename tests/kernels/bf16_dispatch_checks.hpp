// The contract of bf16 dispatched tokens (LayerSpec::dispatch_dtype): under bf16 matmuls encode
// writes the dispatched rows in bf16, the exchange carries them so, and the expert ops read them
// as they are. Checks that run on any backend (the CPU suite, bf16_dispatch_test.cpp, and the
// CUDA one): bf16 encode gives the bits of encoding in f32 and converting after, and the expert
// ops given bf16 rows give the bits of the same ops given the f32 rows.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "layer_test_util.hpp"

namespace tutel::testing {

// encode into bf16 equals convert(encode into f32), bit for bit, NaN payloads included (both go
// through the backend's one rounding), with and without the gate scaling (prescore), over rows
// of specials and rounding ties. M = 8 and 7 take a 16-byte path and a scalar one on backends
// that have both; the bf16 output starts poisoned, so an empty slot must be written as zeros.
inline void check_encode_to_bf16(Backend& b, std::mt19937_64& rng) {
  const std::vector<float> specials = conversion_inputs(rng);
  for (const int64_t M : {int64_t{8}, int64_t{7}, int64_t{64}}) {
    for (const bool postscore : {true, false}) {
      const int64_t S = 37, k = 2, E = 5, C = 12;
      SCOPED_TRACE("M " + std::to_string(M) + (postscore ? " postscore" : " prescore"));
      std::vector<float> x(S * M);
      std::uniform_int_distribution<size_t> pick(0, specials.size() - 1);
      for (float& v : x) v = specials[pick(rng)];
      std::vector<float> gates = to_f32(randn(rng, S * k, 1.0));
      gates[0] = 0.f;  // 0·Inf is NaN: the same NaN both ways
      // Slots: a random injection of assignments, some slots left empty (-1).
      std::vector<int32_t> slots(E * C, -1);
      std::vector<int32_t> assignments(S * k);
      for (int32_t a = 0; a < S * k; ++a) assignments[a] = a;
      std::shuffle(assignments.begin(), assignments.end(), rng);
      std::uniform_int_distribution<int> keep(0, 3);
      size_t next = 0;
      for (int32_t& s : slots)
        if (keep(rng) != 0 && next < assignments.size()) s = assignments[next++];

      DeviceTensor xd(b, DType::kF32, {S, M}), g(b, DType::kF32, {S, k}),
          sl(b, DType::kI32, {E, C}), f32_rows(b, DType::kF32, {E, C, M}),
          converted(b, DType::kBF16, {E, C, M}), bf16_rows(b, DType::kBF16, {E, C, M});
      xd.upload(x);
      g.upload(gates);
      sl.upload_as(slots);
      bf16_rows.upload_as(std::vector<uint16_t>(E * C * M, 0x7fa5u));  // poison: a NaN pattern
      Status s = b.encode({xd.view(), g.view(), sl.view(), postscore, f32_rows.view()});
      ASSERT_TRUE(s.ok()) << s;
      s = b.convert(f32_rows.view(), converted.view());
      ASSERT_TRUE(s.ok()) << s;
      s = b.encode({xd.view(), g.view(), sl.view(), postscore, bf16_rows.view()});
      ASSERT_TRUE(s.ok()) << s;
      const std::vector<uint16_t> got = bf16_rows.download_as<uint16_t>(),
                                  want = converted.download_as<uint16_t>();
      int64_t wrong = 0, empty_rows = 0;
      for (int64_t i = 0; i < E * C * M; ++i) {
        if (got[i] == want[i]) continue;
        if (++wrong <= 5)
          ADD_FAILURE() << "dispatched[" << i << "] = 0x" << std::hex << got[i]
                        << ", convert(f32 encode) = 0x" << want[i] << std::dec;
      }
      EXPECT_EQ(wrong, 0) << "elements differ";
      for (int64_t r = 0; r < E * C; ++r)
        if (slots[r] < 0) {
          ++empty_rows;
          for (int64_t m = 0; m < M; ++m) ASSERT_EQ(got[r * M + m], 0u) << "empty slot " << r;
        }
      EXPECT_GT(empty_rows, 0) << "the case has no empty slot to check";
    }
  }
}

// expert_forward (training and inference) and expert_backward under bf16 matmuls give the same
// bits given the dispatched rows in bf16 as given them in f32, with and without the weights'
// bf16 copies.
inline void check_expert_ops_read_bf16_dispatched(Backend& b, std::mt19937_64& rng) {
  struct Dims {
    int64_t E, C, M, H, O;
  };
  for (const Dims& d : {Dims{3, 5, 12, 20, 7}, Dims{2, 64, 40, 24, 16}, Dims{1, 1, 3, 5, 2}}) {
    for (const Activation act : {Activation::kRelu, Activation::kGelu}) {
      for (const bool copies : {false, true}) {
        const int64_t E = d.E, C = d.C, M = d.M, H = d.H, O = d.O;
        SCOPED_TRACE("E " + std::to_string(E) + " C " + std::to_string(C) + " M " +
                     std::to_string(M) + " H " + std::to_string(H) + " O " + std::to_string(O) +
                     " " + std::string(activation_name(act)) +
                     (copies ? " with weight copies" : " converting the weights"));
        auto random = [&](Shape s, double scale) { return random_tensor(b, rng, s, scale); };
        const DeviceTensor disp = random({E, C, M}, 1.0), fc1 = random({E, H, M}, 0.3),
                           fc2 = random({E, H, O}, 0.3), b1 = random({E, H}, 0.1),
                           b2 = random({E, O}, 0.1), d_out = random({E, C, O}, 1.0);
        DeviceTensor disp_bf16(b, DType::kBF16, {E, C, M}), fc1_copy(b, DType::kBF16, {E, H, M}),
            fc2_copy(b, DType::kBF16, {E, H, O});
        ASSERT_TRUE(b.convert(disp.view(), disp_bf16.view()).ok());
        ASSERT_TRUE(b.convert(fc1.view(), fc1_copy.view()).ok());
        ASSERT_TRUE(b.convert(fc2.view(), fc2_copy.view()).ok());
        ExpertWeights w{fc1.view(), b1.view(), fc2.view(), b2.view()};
        if (copies) {
          w.fc1_weight_bf16 = fc1_copy.view();
          w.fc2_weight_bf16 = fc2_copy.view();
        }
        ExpertShape shape{E, C, M, H, O};
        shape.weights_bf16 = copies;
        const auto ws_bytes = static_cast<int64_t>(b.expert_workspace_bytes(shape, DType::kBF16));

        std::vector<std::vector<float>> results[2];
        for (const int bf16_rows : {0, 1}) {
          const TensorView rows = bf16_rows ? disp_bf16.view() : disp.view();
          DeviceTensor ws(b, DType::kU8, {ws_bytes}), pre(b, DType::kF32, {E, C, H}),
              hidden(b, DType::kF32, {E, C, H}), out(b, DType::kF32, {E, C, O}),
              infer_hidden(b, DType::kF32, {E, C, H}), infer_out(b, DType::kF32, {E, C, O}),
              d_hidden(b, DType::kF32, {E, C, H}), d_disp(b, DType::kF32, {E, C, M}),
              g_fc1(b, DType::kF32, {E, H, M}), g_fc2(b, DType::kF32, {E, H, O}),
              g_b1(b, DType::kF32, {E, H}), g_b2(b, DType::kF32, {E, O});
          const bool keep_pre = act != Activation::kRelu;
          Status s = b.expert_forward({rows, w, act, DType::kBF16, keep_pre ? pre.view() : TensorView(),
                                       hidden.view(), out.view(), ws.view(), /*keep_hidden=*/true});
          ASSERT_TRUE(s.ok()) << s;
          s = b.expert_backward({rows, keep_pre ? pre.view() : TensorView(), hidden.view(), w, act,
                                 DType::kBF16, d_out.view(), d_hidden.view(), d_disp.view(),
                                 ExpertWeights{g_fc1.view(), g_b1.view(), g_fc2.view(), g_b2.view()},
                                 ws.view()});
          ASSERT_TRUE(s.ok()) << s;
          s = b.expert_forward({rows, w, act, DType::kBF16, {}, infer_hidden.view(), infer_out.view(),
                                ws.view(), /*keep_hidden=*/false});
          ASSERT_TRUE(s.ok()) << s;
          results[bf16_rows] = {out.download(),   hidden.download(), infer_out.download(),
                                d_disp.download(), g_fc1.download(), g_fc2.download(),
                                g_b1.download(),   g_b2.download()};
        }
        const char* names[] = {"expert_out", "hidden",  "expert_out (inference)", "d_dispatched",
                               "d_fc1_w",    "d_fc2_w", "d_fc1_b",                "d_fc2_b"};
        for (size_t i = 0; i < std::size(names); ++i)
          EXPECT_TRUE(same_bits(names[i], results[1][i], results[0][i]));
      }
    }
  }
}

// bf16 rows under f32 matmuls (which have no bf16 input), and an encode into a dtype that is
// neither f32 nor bf16, are refused with a message that says what to give.
inline void check_bf16_dispatched_misuse_refused(Backend& b) {
  using L = std::initializer_list<const char*>;
  const int64_t E = 2, C = 3, M = 8, H = 16, O = 8, S = 4, k = 1;
  DeviceTensor disp(b, DType::kBF16, {E, C, M}), fc1(b, DType::kF32, {E, H, M}),
      fc2(b, DType::kF32, {E, H, O}), hidden(b, DType::kF32, {E, C, H}),
      out(b, DType::kF32, {E, C, O}), d_out(b, DType::kF32, {E, C, O}),
      d_hidden(b, DType::kF32, {E, C, H}), d_disp(b, DType::kF32, {E, C, M}),
      g_fc1(b, DType::kF32, {E, H, M}), g_fc2(b, DType::kF32, {E, H, O}), ws(b, DType::kU8, {64});
  const ExpertWeights w{fc1.view(), {}, fc2.view(), {}};
  EXPECT_TRUE(refused(b.expert_forward({disp.view(), w, Activation::kRelu, DType::kF32, {},
                                        hidden.view(), out.view(), ws.view()}),
                      L{"expert_forward", "dtype bf16", "f32 matmuls", "dispatch_dtype"}));
  EXPECT_TRUE(refused(b.expert_backward({disp.view(), {}, hidden.view(), w, Activation::kRelu,
                                         DType::kF32, d_out.view(), d_hidden.view(), d_disp.view(),
                                         ExpertWeights{g_fc1.view(), {}, g_fc2.view(), {}},
                                         ws.view()}),
                      L{"expert_backward", "dtype bf16"}));
  DeviceTensor x(b, DType::kF32, {S, M}), g(b, DType::kF32, {S, k}), sl(b, DType::kI32, {E, C}),
      wrong(b, DType::kI32, {E, C, M});
  EXPECT_TRUE(refused(b.encode({x.view(), g.view(), sl.view(), true, wrong.view()}),
                      L{"encode", "dtype i32", "f32 or bf16"}));
}

}  // namespace tutel::testing
