// Tests of the float64 MoE reference itself: finite differences against its backward, and small
// hand-computed cases for the discrete parts (routing, locations, capacity, dropping, l_aux).
#include "reference_moe.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace tutel::ref {
namespace {

// ---------------------------------------------------------------------------------------------
// Helpers

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// Seed for the random tests: TUTEL_REF_SEED reproduces a failing run, otherwise fresh entropy.
uint64_t test_seed() {
  if (const char* env = std::getenv("TUTEL_REF_SEED")) return std::strtoull(env, nullptr, 10);
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

std::vector<double> randn(std::mt19937_64& rng, int64_t n, double scale) {
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  for (auto& e : v) e = dist(rng);
  return v;
}

Params random_params(const Config& c, std::mt19937_64& rng) {
  Params p;
  p.wg = randn(rng, c.E * c.M, 1.0);
  p.fc1_w = randn(rng, c.E * c.H * c.M, 1.0 / std::sqrt(static_cast<double>(c.M)));
  if (c.has_fc1_bias) p.fc1_b = randn(rng, c.E * c.H, 0.5);
  p.fc2_w = randn(rng, c.E * c.H * c.O, 1.0 / std::sqrt(static_cast<double>(c.H)));
  if (c.has_fc2_bias) p.fc2_b = randn(rng, c.E * c.O, 0.5);
  return p;
}

double loss(const Forward& f, const std::vector<double>& dy, double dl_aux) {
  double l = dl_aux * f.l_aux;
  for (size_t i = 0; i < dy.size(); ++i) l += dy[i] * f.y[i];
  return l;
}

bool same_routing(const Forward& a, const Forward& b) {
  return a.idx == b.idx && a.loc == b.loc && a.capacity == b.capacity;
}

// ---------------------------------------------------------------------------------------------
// Finite-difference checks of backward()

struct FdCase {
  std::string name;
  Config cfg;
  bool use_noise = false;
  bool zero_dy = false;  // isolates the l_aux path
  double dl_aux = 0.7;
  int expect_drops = -1;  // 1: must drop something, 0: must drop nothing, -1: either
};

Config base_config() {
  Config c{};
  c.S = 8;
  c.M = 6;
  c.H = 5;
  c.O = 4;
  c.E = 4;
  c.k = 2;
  c.capacity_factor = 1.0;
  c.activation = Activation::kGelu;
  return c;
}

std::vector<FdCase> fd_cases() {
  std::vector<FdCase> cases;
  {  // f > 0 small enough that drops are certain: C = 2*floor(0.5*2) = 2 per expert, 16
     // assignments.
    FdCase c{"gelu_k2_norm_post_drops", base_config()};
    c.cfg.capacity_factor = 0.5;
    c.expect_drops = 1;
    cases.push_back(c);
  }
  {  // k == 1: gate is the raw score even with normalize_gate.
    FdCase c{"silu_k1_post_f1", base_config()};
    c.cfg.activation = Activation::kSilu;
    c.cfg.k = 1;
    cases.push_back(c);
  }
  {  // k == E, pre-score (gate applied before the experts), f == 0: nothing dropped.
    FdCase c{"gelu_kE_prescore_f0", base_config()};
    c.cfg.k = c.cfg.E;
    c.cfg.is_postscore = false;
    c.cfg.capacity_factor = 0.0;
    c.expect_drops = 0;
    cases.push_back(c);
  }
  {  // no normalisation, pre-score, f < 0, batch-prioritized.
    FdCase c{"silu_k2_nonorm_prescore_fneg_bp", base_config()};
    c.cfg.activation = Activation::kSilu;
    c.cfg.normalize_gate = false;
    c.cfg.is_postscore = false;
    c.cfg.capacity_factor = -0.5;
    c.cfg.batch_prioritized = true;
    cases.push_back(c);
  }
  {  // relu (inputs regenerated until every occupied |pre| >= 1e-4), noise, bp, alignment.
    FdCase c{"relu_k2_noise_bp_align3", base_config()};
    c.cfg.activation = Activation::kRelu;
    c.cfg.batch_prioritized = true;
    c.cfg.alignment = 3;
    c.use_noise = true;
    cases.push_back(c);
  }
  {  // no biases, k = 3 of 4, f < 0 that is bounded by the counts.
    FdCase c{"gelu_k3_nobias_fneg", base_config()};
    c.cfg.k = 3;
    c.cfg.has_fc1_bias = false;
    c.cfg.has_fc2_bias = false;
    c.cfg.capacity_factor = -2.0;
    cases.push_back(c);
  }
  {  // only the l_aux term contributes to the loss.
    FdCase c{"aux_only_gelu_k2", base_config()};
    c.zero_dy = true;
    c.dl_aux = 1.3;
    cases.push_back(c);
  }
  {  // k == 1 with normalize off and pre-score, drops from f = 0.5.
    FdCase c{"relu_k1_prescore_drops", base_config()};
    c.cfg.activation = Activation::kRelu;
    c.cfg.k = 1;
    c.cfg.normalize_gate = false;
    c.cfg.is_postscore = false;
    c.cfg.capacity_factor = 0.5;
    c.cfg.has_fc2_bias = false;
    cases.push_back(c);
  }
  {  // larger, unbalanced shape with silu and k = 2 of 5, noise.
    FdCase c{"silu_k2_E5_noise", base_config()};
    c.cfg.activation = Activation::kSilu;
    c.cfg.S = 11;
    c.cfg.E = 5;
    c.cfg.M = 3;
    c.cfg.H = 7;
    c.cfg.O = 2;
    c.use_noise = true;
    cases.push_back(c);
  }
  return cases;
}

class ReferenceFd : public ::testing::TestWithParam<FdCase> {};

TEST_P(ReferenceFd, BackwardMatchesCentralDifferences) {
  const FdCase& tc = GetParam();
  const Config& cfg = tc.cfg;
  const uint64_t seed = test_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed) +
               " (rerun with TUTEL_REF_SEED=" + std::to_string(seed) + ")");
  std::mt19937_64 rng(seed);

  // Draw inputs until the routing is safely away from its discontinuities (top-k ties, priority
  // ties) and, for relu, every occupied pre-activation is away from the kink, so that perturbing
  // by h cannot change anything discrete. Perturbations are still re-checked one by one below.
  constexpr double kMargin = 1e-4;
  Params p;
  std::vector<double> x, noise, dy;
  Forward base;
  bool found = false;
  for (int attempt = 0; attempt < 200 && !found; ++attempt) {
    p = random_params(cfg, rng);
    x = randn(rng, cfg.S * cfg.M, 1.0);
    noise = tc.use_noise ? randn(rng, cfg.S * cfg.E, 0.3) : std::vector<double>{};
    dy = tc.zero_dy ? std::vector<double>(cfg.S * cfg.O, 0.0) : randn(rng, cfg.S * cfg.O, 1.0);
    base = forward(cfg, p, x, tc.use_noise ? &noise : nullptr);
    found = base.min_topk_margin > kMargin && base.min_priority_margin > kMargin &&
            (cfg.activation != Activation::kRelu || base.min_abs_pre > kMargin);
  }
  ASSERT_TRUE(found) << "could not draw inputs away from routing/kink discontinuities";
  if (tc.expect_drops == 1) {
    ASSERT_GT(base.dropped, 0);
  }
  if (tc.expect_drops == 0) {
    ASSERT_EQ(base.dropped, 0);
  }

  const std::vector<double>* noise_ptr = tc.use_noise ? &noise : nullptr;
  const Grads g = backward(cfg, p, x, noise_ptr, dy, tc.dl_aux);
  ASSERT_EQ(g.dx.size(), x.size());
  ASSERT_EQ(g.d_wg.size(), p.wg.size());
  ASSERT_EQ(g.d_fc1_w.size(), p.fc1_w.size());
  ASSERT_EQ(g.d_fc1_b.size(), p.fc1_b.size());
  ASSERT_EQ(g.d_fc2_w.size(), p.fc2_w.size());
  ASSERT_EQ(g.d_fc2_b.size(), p.fc2_b.size());

  // Central differences with h = 1e-6: truncation error ~h^2 * L''' ~ 1e-12 and rounding error
  // ~ eps * |terms of L| / h ~ 1e-9 for these sizes, so we require
  //   |analytic - fd| <= 1e-6 * max(|analytic|, |fd|) + 1e-8   (relative 1e-6, absolute floor
  //   1e-8).
  constexpr double kH = 1e-6;
  constexpr double kRel = 1e-6;
  constexpr double kAbs = 1e-8;
  constexpr size_t kMaxCoords = 40;

  struct Target {
    const char* name;
    std::vector<double>* value;       // perturbed in place (x or a member of p)
    const std::vector<double>* grad;  // analytic gradient
  };
  std::vector<Target> targets = {
      {"dx", &x, &g.dx},
      {"d_wg", &p.wg, &g.d_wg},
      {"d_fc1_w", &p.fc1_w, &g.d_fc1_w},
      {"d_fc1_b", &p.fc1_b, &g.d_fc1_b},
      {"d_fc2_w", &p.fc2_w, &g.d_fc2_w},
      {"d_fc2_b", &p.fc2_b, &g.d_fc2_b},
  };

  size_t attempted = 0, checked = 0, skipped = 0;
  for (const Target& tg : targets) {
    std::vector<double>& v = *tg.value;
    if (v.empty()) continue;  // absent bias
    std::vector<size_t> coords(v.size());
    std::iota(coords.begin(), coords.end(), size_t{0});
    std::shuffle(coords.begin(), coords.end(), rng);
    if (coords.size() > kMaxCoords) coords.resize(kMaxCoords);
    size_t checked_here = 0;
    for (size_t i : coords) {
      ++attempted;
      const double orig = v[i];
      v[i] = orig + kH;
      const Forward fp = forward(cfg, p, x, noise_ptr);
      v[i] = orig - kH;
      const Forward fm = forward(cfg, p, x, noise_ptr);
      v[i] = orig;
      // Routing is held fixed by the backward; a perturbation that changes it measures a jump,
      // not a derivative, so that coordinate is skipped (and counted).
      if (!same_routing(fp, base) || !same_routing(fm, base)) {
        ++skipped;
        continue;
      }
      if (cfg.activation == Activation::kRelu &&
          (fp.min_abs_pre < kMargin / 2 || fm.min_abs_pre < kMargin / 2)) {
        ++skipped;
        continue;
      }
      const double fd = (loss(fp, dy, tc.dl_aux) - loss(fm, dy, tc.dl_aux)) / (2 * kH);
      const double an = (*tg.grad)[i];
      const double tol = kRel * std::max(std::abs(an), std::abs(fd)) + kAbs;
      EXPECT_NEAR(an, fd, tol) << tc.name << " " << tg.name << "[" << i << "]";
      ++checked;
      ++checked_here;
    }
    EXPECT_GT(checked_here, 0u) << tg.name << ": every coordinate was skipped";
  }
  // With the margins enforced above, skips should be rare; most coordinates must be checked.
  EXPECT_GE(checked * 10, attempted * 9)
      << "checked " << checked << " of " << attempted << " (skipped " << skipped << ")";
}

INSTANTIATE_TEST_SUITE_P(Configs, ReferenceFd, ::testing::ValuesIn(fd_cases()),
                         [](const ::testing::TestParamInfo<FdCase>& info) {
                           return info.param.name;
                         });

// Aux-only loss must leave the experts untouched and still move the gate.
TEST(ReferenceGrad, AuxOnlyTouchesOnlyGate) {
  const uint64_t seed = test_seed();
  SCOPED_TRACE("seed=" + std::to_string(seed));
  std::mt19937_64 rng(seed);
  Config c = base_config();
  // If every expert is top-1 for equally many tokens, ce is uniform and the l_aux gradient
  // vanishes exactly (softmax is shift-invariant), so draw until the top-1 counts differ.
  Params p;
  std::vector<double> x;
  for (bool uniform = true; uniform;) {
    p = random_params(c, rng);
    x = randn(rng, c.S * c.M, 1.0);
    const Forward f = forward(c, p, x, nullptr);
    std::vector<int64_t> top1(c.E, 0);
    for (int64_t s = 0; s < c.S; ++s) top1[f.idx[s * c.k]] += 1;
    uniform = std::all_of(top1.begin(), top1.end(), [&](int64_t n) { return n == top1[0]; });
  }
  std::vector<double> dy(c.S * c.O, 0.0);
  Grads g = backward(c, p, x, nullptr, dy, 1.0);
  for (double v : g.d_fc1_w) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc1_b) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc2_w) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc2_b) EXPECT_EQ(v, 0.0);
  double norm = 0.0;
  for (double v : g.d_wg) norm += v * v;
  EXPECT_GT(norm, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Hand-checked discrete cases.
//
// 4 tokens, 2 experts, k = 2, M = 2, wg = identity, so each token's x row *is* its logits.
//   s0 = (2, 0)   s1 = (0, 1)   s2 = (1.5, 0)   s3 = (3, 0)
// softmax of (a, b) puts sigmoid(a - b) on expert 0, so:
//   idx: s0 (0,1)  s1 (1,0)  s2 (0,1)  s3 (0,1)
// Experts: fc1 = identity (H = M = 2), fc2 = (e+1) * identity (O = 2), no biases, relu.
// So expert e maps a row r to (e+1) * relu(r).

Config hand_config() {
  Config c{};
  c.S = 4;
  c.M = 2;
  c.H = 2;
  c.O = 2;
  c.E = 2;
  c.k = 2;
  c.capacity_factor = 1.0;
  c.activation = Activation::kRelu;
  c.has_fc1_bias = false;
  c.has_fc2_bias = false;
  return c;
}

Params hand_params(const Config& c) {
  Params p;
  p.wg.assign(c.E * c.M, 0.0);
  for (int64_t e = 0; e < c.E; ++e) p.wg[e * c.M + e] = 1.0;
  p.fc1_w.assign(c.E * c.H * c.M, 0.0);
  p.fc2_w.assign(c.E * c.H * c.O, 0.0);
  for (int64_t e = 0; e < c.E; ++e)
    for (int64_t h = 0; h < c.H; ++h) {
      p.fc1_w[(e * c.H + h) * c.M + h] = 1.0;
      p.fc2_w[(e * c.H + h) * c.O + h] = static_cast<double>(e + 1);
    }
  return p;
}

const std::vector<double> kHandX = {2, 0, 0, 1, 1.5, 0, 3, 0};

TEST(ReferenceHand, IndicesAndLocations) {
  Config c = hand_config();
  Forward f = forward(c, hand_params(c), kHandX, nullptr);
  EXPECT_EQ(f.idx, (std::vector<int64_t>{0, 1, 1, 0, 0, 1, 0, 1}));
  // choice 0 in token order: e0 <- s0:0, e1 <- s1:0, e0 <- s2:1, e0 <- s3:2   (counts e0=3, e1=1)
  // choice 1 continues:      e1 <- s0:1, e0 <- s1:3, e1 <- s2:2, e1 <- s3:3
  EXPECT_EQ(f.loc, (std::vector<int64_t>{0, 1, 0, 3, 1, 2, 2, 3}));
  EXPECT_EQ(f.capacity, 4);  // f = 1: 2 * floor(1 * ceil(4/2)) = 4
  EXPECT_EQ(f.dropped, 0);
  // k == E: normalised gates of each token sum to 1 and equal the softmax itself.
  EXPECT_NEAR(f.gates[0], sigmoid(2), 1e-15);
  EXPECT_NEAR(f.gates[1], sigmoid(-2), 1e-15);
  EXPECT_NEAR(f.gates[2], sigmoid(1), 1e-15);
  EXPECT_NEAR(f.gates[3], sigmoid(-1), 1e-15);
  EXPECT_EQ(f.min_topk_margin, std::numeric_limits<double>::infinity());      // k == E
  EXPECT_EQ(f.min_priority_margin, std::numeric_limits<double>::infinity());  // not bp
}

TEST(ReferenceHand, CapacityModes) {
  Config c = hand_config();
  const Params p = hand_params(c);
  struct Row {
    double f;
    int64_t align;
    int64_t C;
    int64_t dropped;
  };
  // counts are 4 and 4 (k == E puts every token on both experts); spe = ceil(4/2) = 2.
  const Row rows[] = {
      {1.0, 1, 4, 0},      // 2*floor(2) = 4
      {0.5, 1, 2, 4},      // 2*floor(1) = 2: drop loc >= 2, i.e. s1c1, s2c1, s3c0, s3c1
      {0.75, 1, 2, 4},     // 2*floor(1.5) = 2
      {0.0, 1, 4, 0},      // max count = 4
      {-0.5, 1, 2, 4},     // min(4, 2*floor(1)) = 2
      {-3.0, 1, 4, 0},     // min(4, 2*floor(6)) = 4: bounded by the counts
      {-0.5, 4, 4, 0},     // 2 rounded up to a multiple of 4
      {1.0, 3, 6, 0},      // 4 rounded up to a multiple of 3
      {1.0, 256, 256, 0},  // 256 is not > 256: used as is
      {1.0, 257, 384, 0},  // 257 -> 384 (multiple of 128), then 4 -> 384
      {1.0, 300, 384, 0},  // 300 -> 384
      {0.5, 384, 384, 0}, {0.25, 4, 0, 8},  // 2*floor(0.5) = 0; 0 % 4 == 0 so it stays 0
  };
  for (const Row& r : rows) {
    SCOPED_TRACE("f=" + std::to_string(r.f) + " alignment=" + std::to_string(r.align));
    c.capacity_factor = r.f;
    c.alignment = r.align;
    Forward f = forward(c, p, kHandX, nullptr);
    EXPECT_EQ(f.capacity, r.C);
    EXPECT_EQ(f.dropped, r.dropped);
  }
}

TEST(ReferenceHand, CapacityForDirect) {
  Config c{};
  c.S = 10;
  c.E = 4;  // spe = ceil(10/4) = 3
  c.k = 2;
  const std::vector<int64_t> counts = {5, 2, 7, 1};
  auto cap = [&](double f, int64_t a) {
    c.capacity_factor = f;
    c.alignment = a;
    return capacity_for(c, counts);
  };
  EXPECT_EQ(cap(1.5, 1), 8);   // 2*floor(4.5)
  EXPECT_EQ(cap(0.0, 1), 7);   // max count
  EXPECT_EQ(cap(-1.0, 1), 6);  // min(7, 2*3)
  EXPECT_EQ(cap(-3.0, 1), 7);  // min(7, 18)
  EXPECT_EQ(cap(0.0, 4), 8);   // 7 -> 8
  EXPECT_EQ(cap(0.0, 129), 129);
  EXPECT_EQ(cap(0.0, 300), 384);
  EXPECT_EQ(cap(0.0, 512), 512);
  EXPECT_EQ(cap(0.0, 513), 640);
  EXPECT_EQ(cap(0.1, 1), 0);  // 2*floor(0.3)
  // f * spe is evaluated in double: 0.29 * 100 = 28.999999999999996, floor 28 (not 29).
  c.S = 400;
  c.k = 1;
  EXPECT_EQ(cap(0.29, 1), 28);
}

TEST(ReferenceHand, DroppingAndDecode) {
  Config c = hand_config();
  c.capacity_factor = 0.5;  // C = 2
  Forward f = forward(c, hand_params(c), kHandX, nullptr);
  ASSERT_EQ(f.capacity, 2);
  EXPECT_EQ(f.dropped, 4);
  // Kept: s0c0 (e0,0), s0c1 (e1,1), s1c0 (e1,0), s2c0 (e0,1). s3 loses both choices.
  const double y0 = 2 * sigmoid(2) * 1 + 2 * sigmoid(-2) * 2;  // both experts see relu(2,0)
  EXPECT_NEAR(f.y[0], y0, 1e-14);
  EXPECT_EQ(f.y[1], 0.0);
  EXPECT_EQ(f.y[2], 0.0);
  EXPECT_NEAR(f.y[3], sigmoid(1) * 2 * 1, 1e-14);  // s1 on expert 1 only
  EXPECT_NEAR(f.y[4], sigmoid(1.5) * 1 * 1.5, 1e-14);
  EXPECT_EQ(f.y[5], 0.0);
  EXPECT_EQ(f.y[6], 0.0);  // s3 fully dropped
  EXPECT_EQ(f.y[7], 0.0);

  // relu is positively homogeneous and there are no biases, so scaling before the experts
  // (pre-score) must give the same y as scaling after (post-score).
  c.is_postscore = false;
  Forward g = forward(c, hand_params(c), kHandX, nullptr);
  for (size_t i = 0; i < f.y.size(); ++i) EXPECT_NEAR(g.y[i], f.y[i], 1e-14) << i;
}

TEST(ReferenceHand, BatchPrioritizedChangesWhoIsDropped) {
  Config c = hand_config();
  c.capacity_factor = 0.5;  // C = 2
  c.batch_prioritized = true;
  Forward f = forward(c, hand_params(c), kHandX, nullptr);
  // Max scores: s3 sig(3) > s0 sig(2) > s2 sig(1.5) > s1 sig(1) -> order s3, s0, s2, s1.
  // choice 0: e0 <- s3:0, s0:1, s2:2; e1 <- s1:0.  choice 1: e1 <- s3:1, s0:2, s2:3; e0 <- s1:3.
  EXPECT_EQ(f.loc, (std::vector<int64_t>{1, 2, 0, 3, 2, 3, 0, 1}));
  EXPECT_EQ(f.dropped, 4);
  // Now s3 is kept on both experts and s2 is the one that loses everything.
  EXPECT_NEAR(f.y[6], 3 * sigmoid(3) * 1 + 3 * sigmoid(-3) * 2, 1e-14);
  EXPECT_EQ(f.y[4], 0.0);
  EXPECT_EQ(f.y[5], 0.0);
  EXPECT_NEAR(f.y[0], 2 * sigmoid(2), 1e-14);  // s0 keeps only choice 0 (loc 1); choice 1 loc 2
  EXPECT_NEAR(f.y[3], sigmoid(1) * 2, 1e-14);  // s1 choice 0 (e1, loc 0)
  const double m =
      std::min({sigmoid(3) - sigmoid(2), sigmoid(2) - sigmoid(1.5), sigmoid(1.5) - sigmoid(1)});
  EXPECT_NEAR(f.min_priority_margin, m, 1e-15);
}

TEST(ReferenceHand, PriorityTiesKeepTokenOrder) {
  Config c = hand_config();
  c.S = 3;
  c.k = 1;
  c.batch_prioritized = true;
  // Max scores: s0 = s1 = sig(1) < s2 = sig(2). Stable order: s2, s0, s1.
  Forward f = forward(c, hand_params(c), {1, 0, 1, 0, 2, 0}, nullptr);
  EXPECT_EQ(f.idx, (std::vector<int64_t>{0, 0, 0}));
  EXPECT_EQ(f.loc, (std::vector<int64_t>{1, 2, 0}));
  EXPECT_EQ(f.min_priority_margin, 0.0);
}

TEST(ReferenceHand, EqualScoresPickLowerExpert) {
  Config c = hand_config();
  c.S = 3;
  c.E = 3;
  c.M = 3;
  c.H = 3;
  c.O = 3;
  const std::vector<double> x = {1, 1, 1,   // all equal
                                 0, 2, 2,   // tie between experts 1 and 2
                                 2, 0, 2};  // tie between experts 0 and 2
  c.k = 2;
  Forward f2 = forward(c, hand_params(c), x, nullptr);
  EXPECT_EQ(f2.idx, (std::vector<int64_t>{0, 1, 1, 2, 0, 2}));
  EXPECT_EQ(f2.min_topk_margin, 0.0);  // s0: 2nd and 3rd best are equal
  c.k = 1;
  Forward f1 = forward(c, hand_params(c), x, nullptr);
  EXPECT_EQ(f1.idx, (std::vector<int64_t>{0, 1, 0}));
  EXPECT_EQ(f1.min_topk_margin, 0.0);
}

TEST(ReferenceHand, GateNormalisation) {
  Config c = hand_config();
  c.S = 1;
  c.E = 3;
  c.M = 3;
  c.H = 3;
  c.O = 3;
  const std::vector<double> x = {2, 1, 0};
  const double z = std::exp(2) + std::exp(1) + std::exp(0);
  const double p0 = std::exp(2) / z, p1 = std::exp(1) / z;
  // k == 1 is never normalised, even with normalize_gate.
  c.k = 1;
  Forward f = forward(c, hand_params(c), x, nullptr);
  EXPECT_NEAR(f.gates[0], p0, 1e-15);
  // k == 2 normalised: p / (p0 + p1).
  c.k = 2;
  f = forward(c, hand_params(c), x, nullptr);
  EXPECT_NEAR(f.gates[0], p0 / (p0 + p1), 1e-15);
  EXPECT_NEAR(f.gates[1], p1 / (p0 + p1), 1e-15);
  EXPECT_NEAR(f.min_topk_margin, p1 - (1.0 / z), 1e-15);
  // k == 2 without normalisation: raw softmax values.
  c.normalize_gate = false;
  f = forward(c, hand_params(c), x, nullptr);
  EXPECT_NEAR(f.gates[0], p0, 1e-15);
  EXPECT_NEAR(f.gates[1], p1, 1e-15);
}

TEST(ReferenceHand, AuxLoss) {
  Config c = hand_config();
  c.S = 2;
  c.k = 1;
  const Params p = hand_params(c);
  // s0 = (0,0): scores (1/2, 1/2), top-1 is expert 0 by the tie rule.
  // s1 = (ln 3, 0): scores (3/4, 1/4), top-1 expert 0.
  // me = (5/8, 3/8), ce = (1, 0): l_aux = 2 * 5/8 = 1.25.
  Forward f = forward(c, p, {0, 0, std::log(3.0), 0}, nullptr);
  EXPECT_NEAR(f.l_aux, 1.25, 1e-15);
  // s1 = (0, ln 3): scores (1/4, 3/4), top-1 expert 1.
  // me = (3/8, 5/8), ce = (1/2, 1/2): l_aux = 2 * (3/16 + 5/16) = 1.
  f = forward(c, p, {0, 0, 0, std::log(3.0)}, nullptr);
  EXPECT_NEAR(f.l_aux, 1.0, 1e-15);

  // The 4-token case: ce = (3/4, 1/4) from choice 0 only (k = 2 does not count choice 1).
  Config h = hand_config();
  f = forward(h, hand_params(h), kHandX, nullptr);
  const double me0 = (sigmoid(2) + sigmoid(-1) + sigmoid(1.5) + sigmoid(3)) / 4;
  EXPECT_NEAR(f.l_aux, 2 * (me0 * 0.75 + (1 - me0) * 0.25), 1e-15);
}

TEST(ReferenceHand, NoiseShiftsLogits) {
  Config c = hand_config();
  c.k = 1;
  // Noise (-3, 0) on s3 = (3, 0) makes its logits (0, 0): tie -> expert 0, scores 1/2.
  // Noise (0, 2.5) on s2 = (1.5, 0) makes it (1.5, 2.5): expert 1, score sigmoid(1).
  const std::vector<double> noise = {0, 0, 0, 0, 0, 2.5, -3, 0};
  Forward f = forward(c, hand_params(c), kHandX, &noise);
  EXPECT_EQ(f.idx, (std::vector<int64_t>{0, 1, 1, 0}));
  EXPECT_NEAR(f.gates[2], sigmoid(1), 1e-15);
  EXPECT_NEAR(f.gates[3], 0.5, 1e-15);
}

TEST(ReferenceHand, ZeroCapacityDropsEverything) {
  Config c = hand_config();
  c.capacity_factor = 0.1;  // 2 * floor(0.1 * 2) = 0
  c.activation = Activation::kGelu;
  c.has_fc1_bias = true;
  c.has_fc2_bias = true;
  Params p = hand_params(c);
  p.fc1_b = {0.3, -0.2, 0.1, 0.4};
  p.fc2_b = {0.5, 0.6, -0.7, 0.8};  // nonzero biases must not leak into y
  Forward f = forward(c, p, kHandX, nullptr);
  EXPECT_EQ(f.capacity, 0);
  EXPECT_EQ(f.dropped, c.S * c.k);
  for (double v : f.y) EXPECT_EQ(v, 0.0);
  EXPECT_EQ(f.min_abs_pre, std::numeric_limits<double>::infinity());

  const std::vector<double> dy = {1, -2, 3, 0.5, -1, 2, 0.25, 4};
  Grads g = backward(c, p, kHandX, nullptr, dy, 0.0);
  for (double v : g.dx) EXPECT_EQ(v, 0.0);
  for (double v : g.d_wg) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc1_w) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc1_b) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc2_w) EXPECT_EQ(v, 0.0);
  for (double v : g.d_fc2_b) EXPECT_EQ(v, 0.0);
}

TEST(ReferenceHand, RejectsBadShapes) {
  Config c = hand_config();
  Params p = hand_params(c);
  EXPECT_THROW(forward(c, p, {1, 2, 3}, nullptr), std::invalid_argument);
  c.k = 3;  // k > E
  EXPECT_THROW(forward(c, p, kHandX, nullptr), std::invalid_argument);
  c = hand_config();
  c.has_fc1_bias = true;  // but fc1_b is empty
  EXPECT_THROW(forward(c, p, kHandX, nullptr), std::invalid_argument);
}

}  // namespace
}  // namespace tutel::ref
