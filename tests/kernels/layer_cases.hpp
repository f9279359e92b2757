// The layer test cases shared by cpu_layer_test and the CUDA layer parity test: shapes and
// options, and random inputs for them whose routing has no near-ties.
//
// Inputs are redrawn until no routing decision (top-k choice, batch-priority order, relu sign)
// is within 1e-6 of a tie, where f32 and f64 may legitimately disagree.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "layer_test_util.hpp"
#include "tutel/kernels/gate_noise.hpp"

namespace tutel::testing {

// The noise counter the layer tests pass to layer_forward; draw() computes the reference noise
// with it.
inline constexpr uint64_t kNoiseCounter = 7;

struct LayerCase {
  std::string name;
  LayerSpec spec;
  int64_t tokens;
  bool one_hot_routing = false;  // every token's top-1 is expert 0
  bool noise = false;
};

// Names the case in test listings (ctest names come from them) instead of a byte dump.
inline void PrintTo(const LayerCase& c, std::ostream* os) { *os << c.name; }

inline LayerSpec base_spec(int64_t E, int64_t M, int64_t H, int k, double f) {
  LayerSpec s;
  s.experts = E;
  s.model_dim = M;
  s.hidden = H;
  s.k = k;
  s.capacity_factor = f;
  return s;
}

// The cases every backend runs: small enough for the CPU suite.
inline std::vector<LayerCase> all_cases() {
  std::vector<LayerCase> cases;
  auto add = [&](std::string name, LayerSpec s, int64_t S) { cases.push_back({std::move(name), s, S}); };
  add("Basic", base_spec(4, 32, 48, 2, 1.0), 64);
  add("TokensNotDivisibleByExperts", base_spec(5, 24, 40, 2, 1.25), 37);
  add("KEqualsE", base_spec(3, 16, 24, 3, 1.0), 20);
  add("OneExpert", base_spec(1, 16, 32, 1, 1.0), 19);
  add("OneToken", base_spec(4, 16, 24, 2, 1.0), 1);
  add("FewTokensManyExperts", base_spec(16, 16, 24, 2, 1.0), 3);  // most experts get no token
  add("CapacityOverflow", base_spec(4, 32, 32, 2, 0.5), 96);
  add("Dropless", base_spec(6, 24, 32, 2, 0.0), 70);
  add("DroplessCapped", base_spec(6, 24, 32, 2, -0.6), 70);
  add("TinyCapacityFactorGivesZeroCapacity", base_spec(4, 16, 16, 1, 0.1), 8);
  {
    auto s = base_spec(4, 32, 32, 2, 0.5);
    s.batch_prioritized = true;
    add("BatchPrioritized", s, 96);
  }
  {
    auto s = base_spec(4, 32, 32, 2, 0.0);
    s.batch_prioritized = true;
    add("BatchPrioritizedDropless", s, 50);
  }
  {
    auto s = base_spec(4, 32, 40, 2, 1.0);
    s.activation = Activation::kGelu;
    add("Gelu", s, 48);
  }
  {
    auto s = base_spec(4, 32, 40, 2, 1.0);
    s.activation = Activation::kSilu;
    add("Silu", s, 48);
  }
  {
    auto s = base_spec(4, 32, 32, 2, 1.0);
    s.normalize_gate = false;
    add("NoGateNormalization", s, 40);
  }
  add("Top1IsNeverNormalized", base_spec(4, 32, 32, 1, 1.0), 40);
  {
    auto s = base_spec(4, 32, 32, 2, 0.75);
    s.is_postscore = false;
    add("PreScore", s, 40);
  }
  {
    auto s = base_spec(4, 32, 32, 2, 1.0);
    s.has_fc1_bias = s.has_fc2_bias = false;
    add("NoBiases", s, 40);
  }
  {
    auto s = base_spec(4, 32, 32, 2, 1.0);
    s.output_dim = 20;
    add("OutputDimDiffers", s, 40);
  }
  {
    auto s = base_spec(4, 16, 16, 2, 1.0);
    s.alignment = 8;
    add("Alignment8", s, 30);
  }
  {
    auto s = base_spec(2, 16, 16, 2, 1.0);
    s.alignment = 300;  // > 256: rounded up to 384 first
    add("Alignment300", s, 10);
  }
  {
    auto s = base_spec(8, 64, 96, 2, 1.0);
    s.activation = Activation::kGelu;
    add("Larger", s, 333);
  }
  {
    LayerCase c{"AllTokensToOneExpert", base_spec(4, 16, 24, 2, 1.0), 32};
    c.one_hot_routing = true;
    cases.push_back(c);
  }
  {
    LayerCase c{"GateNoise", base_spec(4, 32, 32, 2, 1.0), 48};
    c.spec.gate_noise = 1.0;
    c.spec.noise_seed = 1234;
    c.noise = true;
    cases.push_back(c);
  }
  return cases;
}

// Cases for the GPU's own boundaries (scalar row kernels, more than 32 experts, several location
// chunks); the large ones would slow the CPU suite for no CPU coverage.
inline std::vector<LayerCase> gpu_boundary_cases() {
  std::vector<LayerCase> cases;
  auto add = [&](std::string name, LayerSpec s, int64_t S) { cases.push_back({std::move(name), s, S}); };
  add("OddModelDim", base_spec(4, 13, 24, 2, 1.0), 40);  // the scalar (non-float4) row kernels
  add("ManyExpertsManyChunks", base_spec(40, 32, 32, 2, 1.0), 1500);
  {
    auto s = base_spec(8, 16, 16, 2, 0.5);
    s.batch_prioritized = true;
    add("BatchPrioritizedManyChunks", s, 700);
  }
  return cases;
}

struct Inputs {
  ref::Params params;
  std::vector<double> x, dy, noise;
  double dl_aux;
  ref::Forward want;
};

// Draws inputs whose routing has no near-ties (see the file comment); nullopt after 200 tries.
inline std::optional<Inputs> draw(std::mt19937_64& rng, const LayerCase& c) {
  const LayerSpec& s = c.spec;
  const ref::Config cfg = to_ref(s, c.tokens);
  for (int attempt = 0; attempt < 200; ++attempt) {
    Inputs in;
    in.params = random_params(rng, s);
    in.x = round_f32(randn(rng, c.tokens * s.model_dim, 1.0));
    if (c.one_hot_routing) {
      // Positive tokens and a gate row that likes positive tokens: expert 0 wins everywhere.
      for (auto& v : in.x) v = static_cast<float>(std::abs(v) + 0.5);
      // (Strong enough to win, mild enough that the other scores keep distinct top-k margins.)
      for (int64_t m = 0; m < s.model_dim; ++m) in.params.wg[m] = 0.4;
    }
    if (c.noise) {
      in.noise.resize(c.tokens * s.experts);
      const float scale = static_cast<float>(s.gate_noise / s.experts);
      for (size_t i = 0; i < in.noise.size(); ++i) in.noise[i] = scale * gate_noise_at(s.noise_seed, kNoiseCounter, i);
    }
    in.dy = round_f32(randn(rng, c.tokens * s.out_dim(), 1.0));
    in.dl_aux = static_cast<float>(std::uniform_real_distribution<double>(0.1, 2.0)(rng));
    in.want = ref::forward(cfg, in.params, in.x, c.noise ? &in.noise : nullptr);
    const bool ties = in.want.min_order_margin < 1e-6 ||
                      (s.batch_prioritized && in.want.min_priority_margin < 1e-6) ||
                      (s.activation == Activation::kRelu && in.want.min_abs_pre < 1e-6);
    bool all_to_zero = true;
    for (int64_t t = 0; t < c.tokens; ++t) all_to_zero &= in.want.idx[t * s.k] == 0;
    if (!ties && (all_to_zero || !c.one_hot_routing)) return in;
  }
  return std::nullopt;
}

}  // namespace tutel::testing
