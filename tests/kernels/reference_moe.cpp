// Plain-loop float64 reference of Tutel's moe_layer. See reference_moe.hpp.
// Every step below is numbered like the specification it follows (forward steps 1-9, then the
// backward in reverse order). No step is fused or reordered, so each can be read against the math.
#include "reference_moe.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <numeric>
#include <stdexcept>
#include <string>

namespace tutel::ref {
namespace {

// float32 epsilon: Tutel clamps the gate normaliser with torch.finfo(float32).eps.
constexpr double kNormEps = 1.1920928955078125e-07;
constexpr double kInf = std::numeric_limits<double>::infinity();

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("tutel::ref: " + what);
}

double act(Activation a, double v) {
  switch (a) {
    case Activation::kRelu:
      return v > 0.0 ? v : 0.0;
    case Activation::kGelu:
      return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)));
    case Activation::kSilu:
      return v / (1.0 + std::exp(-v));
  }
  return 0.0;
}

double act_grad(Activation a, double v) {
  switch (a) {
    case Activation::kRelu:
      return v > 0.0 ? 1.0 : 0.0;
    case Activation::kGelu: {
      // d/dx [x * Phi(x)] = Phi(x) + x * phi(x)
      const double cdf = 0.5 * (1.0 + std::erf(v / std::sqrt(2.0)));
      const double pdf = std::exp(-0.5 * v * v) / std::sqrt(2.0 * std::numbers::pi);
      return cdf + v * pdf;
    }
    case Activation::kSilu: {
      // d/dx [x * sig(x)] = sig(x) * (1 + x * (1 - sig(x)))
      const double sig = 1.0 / (1.0 + std::exp(-v));
      return sig * (1.0 + v * (1.0 - sig));
    }
  }
  return 0.0;
}

// Everything the forward computes, kept so the backward can reuse it without re-deriving.
struct Trace {
  std::vector<double> scores;  // [S,E] softmax probabilities
  std::vector<int64_t> idx;    // [S,k]
  std::vector<int64_t> loc;    // [S,k]
  std::vector<double> g_raw;   // [S,k] scores at the chosen experts
  std::vector<double> g;       // [S,k] gates actually used (normalised or not)
  bool normalized = false;     // whether the normalisation was applied at all
  std::vector<double> gsum;    // [S] sum of g_raw (only meaningful when normalized)
  std::vector<double> denom;   // [S] max(gsum, eps)
  std::vector<double> ce;      // [E]
  double l_aux = 0.0;
  int64_t C = 0;
  std::vector<bool> kept;  // [S,k]
  int64_t dropped = 0;
  std::vector<double> disp;  // [E,C,M]
  std::vector<double> pre;   // [E,C,H]
  std::vector<double> a;     // [E,C,H]
  std::vector<double> yexp;  // [E,C,O]
  std::vector<double> y;     // [S,O]
  double min_topk_margin = kInf;
  double min_order_margin = kInf;
  double min_priority_margin = kInf;
  double min_abs_pre = kInf;
};

void check_inputs(const Config& c, const Params& p, const std::vector<double>& x,
                  const std::vector<double>* noise) {
  // S = 0: an empty batch (an expert-parallel rank's), whose l_aux is 0 and gradients nothing.
  require(c.S >= 0 && c.M >= 1 && c.H >= 1 && c.O >= 1 && c.E >= 1, "need S >= 0 and other dims >= 1");
  require(c.k >= 1 && c.k <= c.E, "need 1 <= k <= E");
  require(c.alignment >= 1, "alignment must be >= 1");
  require(static_cast<int64_t>(x.size()) == c.S * c.M, "x must be [S,M]");
  require(static_cast<int64_t>(p.wg.size()) == c.E * c.M, "wg must be [E,M]");
  require(static_cast<int64_t>(p.fc1_w.size()) == c.E * c.H * c.M, "fc1_w must be [E,H,M]");
  require(static_cast<int64_t>(p.fc2_w.size()) == c.E * c.H * c.O, "fc2_w must be [E,H,O]");
  require(static_cast<int64_t>(p.fc1_b.size()) == (c.has_fc1_bias ? c.E * c.H : 0),
          "fc1_b must be [E,H] when present, empty otherwise");
  require(static_cast<int64_t>(p.fc2_b.size()) == (c.has_fc2_bias ? c.E * c.O : 0),
          "fc2_b must be [E,O] when present, empty otherwise");
  require(noise == nullptr || static_cast<int64_t>(noise->size()) == c.S * c.E,
          "noise must be [S,E]");
}

Trace run_forward(const Config& c, const Params& p, const std::vector<double>& x,
                  const std::vector<double>* noise) {
  check_inputs(c, p, x, noise);
  const int64_t S = c.S, M = c.M, H = c.H, O = c.O, E = c.E, K = c.k;
  Trace t;

  // 1. logits = x . wg^T (+ noise, already scaled by the caller).
  std::vector<double> logits(S * E, 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t e = 0; e < E; ++e) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += x[s * M + m] * p.wg[e * M + m];
      if (noise != nullptr) acc += (*noise)[s * E + e];
      logits[s * E + e] = acc;
    }

  // 2. scores = softmax over experts, shifted by the row max for stability.
  t.scores.assign(S * E, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    double mx = logits[s * E];
    for (int64_t e = 1; e < E; ++e) mx = std::max(mx, logits[s * E + e]);
    double z = 0.0;
    for (int64_t e = 0; e < E; ++e) z += std::exp(logits[s * E + e] - mx);
    for (int64_t e = 0; e < E; ++e) t.scores[s * E + e] = std::exp(logits[s * E + e] - mx) / z;
  }

  // 3. top-k: descending score, equal scores ordered by lower expert index.
  t.idx.assign(S * K, 0);
  t.g_raw.assign(S * K, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      const double sa = t.scores[s * E + a], sb = t.scores[s * E + b];
      if (sa != sb) return sa > sb;
      return a < b;
    });
    for (int64_t j = 0; j < K; ++j) {
      t.idx[s * K + j] = order[j];
      t.g_raw[s * K + j] = t.scores[s * E + order[j]];
    }
    if (K < E) {
      const double margin = t.scores[s * E + order[K - 1]] - t.scores[s * E + order[K]];
      t.min_topk_margin = std::min(t.min_topk_margin, margin);
    }
    for (int64_t j = 0; j + 1 < std::min(K + 1, E); ++j)
      t.min_order_margin = std::min(t.min_order_margin, t.scores[s * E + order[j]] - t.scores[s * E + order[j + 1]]);
  }

  // 3b. gate normalisation: only for k > 1 (Tutel never normalises top-1).
  t.normalized = K > 1 && c.normalize_gate;
  t.g = t.g_raw;
  t.gsum.assign(S, 0.0);
  t.denom.assign(S, 1.0);
  if (t.normalized) {
    for (int64_t s = 0; s < S; ++s) {
      double sum = 0.0;
      for (int64_t j = 0; j < K; ++j) sum += t.g_raw[s * K + j];
      t.gsum[s] = sum;
      t.denom[s] = std::max(sum, kNormEps);
      for (int64_t j = 0; j < K; ++j) t.g[s * K + j] = t.g_raw[s * K + j] / t.denom[s];
    }
  }

  // 4. l_aux (GShard): E * sum_e me[e] * ce[e], ce from the top-1 choice only.
  std::vector<double> me(E, 0.0);
  t.ce.assign(E, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t e = 0; e < E; ++e) me[e] += t.scores[s * E + e] / static_cast<double>(S);
    t.ce[t.idx[s * K + 0]] += 1.0 / static_cast<double>(S);
  }
  t.l_aux = 0.0;
  for (int64_t e = 0; e < E; ++e) t.l_aux += me[e] * t.ce[e];
  t.l_aux *= static_cast<double>(E);

  // 5. Locations. Token order: natural, or by decreasing max score (stable, so ties keep the
  // lower token index first) when batch_prioritized. Counts carry across choices, so every
  // choice-0 assignment is numbered before any choice-1 assignment.
  std::vector<int64_t> token_order(S);
  std::iota(token_order.begin(), token_order.end(), 0);
  if (c.batch_prioritized) {
    std::vector<double> max_score(S);
    for (int64_t s = 0; s < S; ++s) {
      // The largest score that is a number; a token of NaN scores ranks last (as the backends).
      double mx = -std::numeric_limits<double>::infinity();
      for (int64_t e = 0; e < E; ++e)
        if (t.scores[s * E + e] > mx) mx = t.scores[s * E + e];
      max_score[s] = mx;
    }
    std::stable_sort(token_order.begin(), token_order.end(),
                     [&](int64_t a, int64_t b) { return max_score[a] > max_score[b]; });
    for (int64_t i = 0; i + 1 < S; ++i) {
      const double gap = max_score[token_order[i]] - max_score[token_order[i + 1]];
      t.min_priority_margin = std::min(t.min_priority_margin, gap);
    }
  }
  t.loc.assign(S * K, 0);
  std::vector<int64_t> counts(E, 0);
  for (int64_t j = 0; j < K; ++j)
    for (int64_t i = 0; i < S; ++i) {
      const int64_t s = token_order[i];
      const int64_t e = t.idx[s * K + j];
      t.loc[s * K + j] = counts[e];
      counts[e] += 1;
    }

  // 6. Capacity and which assignments survive it.
  t.C = c.capacity_override >= 0 ? c.capacity_override : capacity_for(c, counts);
  const int64_t C = t.C;
  t.kept.assign(S * K, false);
  t.dropped = 0;
  for (int64_t i = 0; i < S * K; ++i) {
    t.kept[i] = t.loc[i] < C;
    if (!t.kept[i]) t.dropped += 1;
  }

  // 7. Encode: scatter kept tokens into [E,C,M]; pre-scored (is_postscore false) multiplies by
  // the gate here instead of in the decode.
  t.disp.assign(E * C * M, 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < K; ++j) {
      if (!t.kept[s * K + j]) continue;
      const int64_t e = t.idx[s * K + j], slot = t.loc[s * K + j];
      const double w = c.is_postscore ? 1.0 : t.g[s * K + j];
      for (int64_t m = 0; m < M; ++m) t.disp[(e * C + slot) * M + m] = w * x[s * M + m];
    }

  // 8. Experts, over every slot (empty slots hold zeros, so pre = bias there).
  t.pre.assign(E * C * H, 0.0);
  t.a.assign(E * C * H, 0.0);
  t.yexp.assign(E * C * O, 0.0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t slot = 0; slot < C; ++slot) {
      for (int64_t h = 0; h < H; ++h) {
        double acc = c.has_fc1_bias ? p.fc1_b[e * H + h] : 0.0;
        for (int64_t m = 0; m < M; ++m)
          acc += t.disp[(e * C + slot) * M + m] * p.fc1_w[(e * H + h) * M + m];
        t.pre[(e * C + slot) * H + h] = acc;
        t.a[(e * C + slot) * H + h] = act(c.activation, acc);
      }
      for (int64_t o = 0; o < O; ++o) {
        double acc = c.has_fc2_bias ? p.fc2_b[e * O + o] : 0.0;
        for (int64_t h = 0; h < H; ++h)
          acc += t.a[(e * C + slot) * H + h] * p.fc2_w[(e * H + h) * O + o];
        t.yexp[(e * C + slot) * O + o] = acc;
      }
    }

  // Distance to relu's kink, over occupied slots only (empty slots never reach y).
  for (int64_t i = 0; i < S * K; ++i) {
    if (!t.kept[i]) continue;
    const int64_t e = t.idx[i], slot = t.loc[i];
    for (int64_t h = 0; h < H; ++h)
      t.min_abs_pre = std::min(t.min_abs_pre, std::abs(t.pre[(e * C + slot) * H + h]));
  }

  // 9. Decode: gather back, choices summed in increasing j.
  t.y.assign(S * O, 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < K; ++j) {
      if (!t.kept[s * K + j]) continue;
      const int64_t e = t.idx[s * K + j], slot = t.loc[s * K + j];
      const double w = c.is_postscore ? t.g[s * K + j] : 1.0;
      for (int64_t o = 0; o < O; ++o) t.y[s * O + o] += w * t.yexp[(e * C + slot) * O + o];
    }
  return t;
}

}  // namespace

int64_t capacity_for(const Config& c, const std::vector<int64_t>& counts) {
  require(c.E >= 1 && static_cast<int64_t>(counts.size()) == c.E, "counts must be [E]");
  require(c.alignment >= 1, "alignment must be >= 1");
  const int64_t spe = (c.S + c.E - 1) / c.E;  // ceil(S/E)
  const int64_t max_count = *std::max_element(counts.begin(), counts.end());
  const double f = c.capacity_factor;
  int64_t C = 0;
  if (f > 0) {
    C = c.k * static_cast<int64_t>(std::floor(f * static_cast<double>(spe)));
  } else if (f == 0) {
    C = max_count;
  } else {
    C = std::min(max_count, c.k * static_cast<int64_t>(std::floor(-f * static_cast<double>(spe))));
  }
  // Alignment: values above 256 are first rounded up to a multiple of 128.
  int64_t a = c.alignment;
  if (a > 256) a = (a + 127) / 128 * 128;
  if (C % a != 0) C += a - C % a;
  return C;
}

Forward forward(const Config& c, const Params& p, const std::vector<double>& x,
                const std::vector<double>* noise) {
  Trace t = run_forward(c, p, x, noise);
  Forward f;
  f.y = t.y;
  f.l_aux = t.l_aux;
  f.idx = t.idx;
  f.loc = t.loc;
  f.gates = t.g;
  f.capacity = t.C;
  f.dropped = t.dropped;
  f.min_topk_margin = t.min_topk_margin;
  f.min_order_margin = t.min_order_margin;
  f.min_priority_margin = t.min_priority_margin;
  f.min_abs_pre = t.min_abs_pre;
  return f;
}

Grads backward(const Config& c, const Params& p, const std::vector<double>& x,
               const std::vector<double>* noise, const std::vector<double>& dy, double dl_aux) {
  const Trace t = run_forward(c, p, x, noise);
  const int64_t S = c.S, M = c.M, H = c.H, O = c.O, E = c.E, K = c.k, C = t.C;
  require(static_cast<int64_t>(dy.size()) == S * O, "dy must be [S,O]");

  Grads gr;
  gr.dx.assign(S * M, 0.0);
  gr.d_wg.assign(E * M, 0.0);
  gr.d_fc1_w.assign(E * H * M, 0.0);
  if (c.has_fc1_bias) gr.d_fc1_b.assign(E * H, 0.0);
  gr.d_fc2_w.assign(E * H * O, 0.0);
  if (c.has_fc2_bias) gr.d_fc2_b.assign(E * O, 0.0);

  // 9'. Decode. Each (e, slot) holds at most one assignment (loc is unique per expert), so
  // plain assignment-by-accumulation is exact. Dropped choices get no gradient at all.
  std::vector<double> d_yexp(E * C * O, 0.0);
  std::vector<double> d_g(S * K, 0.0);
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < K; ++j) {
      if (!t.kept[s * K + j]) continue;
      const int64_t e = t.idx[s * K + j], slot = t.loc[s * K + j];
      const double w = c.is_postscore ? t.g[s * K + j] : 1.0;
      for (int64_t o = 0; o < O; ++o) d_yexp[(e * C + slot) * O + o] += w * dy[s * O + o];
      if (c.is_postscore) {
        double dot = 0.0;
        for (int64_t o = 0; o < O; ++o) dot += t.yexp[(e * C + slot) * O + o] * dy[s * O + o];
        d_g[s * K + j] += dot;
      }
    }

  // 8'. Experts.
  std::vector<double> d_disp(E * C * M, 0.0);
  for (int64_t e = 0; e < E; ++e)
    for (int64_t slot = 0; slot < C; ++slot) {
      const double* dye = &d_yexp[(e * C + slot) * O];
      // fc2
      for (int64_t o = 0; o < O; ++o) {
        if (c.has_fc2_bias) gr.d_fc2_b[e * O + o] += dye[o];
        for (int64_t h = 0; h < H; ++h)
          gr.d_fc2_w[(e * H + h) * O + o] += t.a[(e * C + slot) * H + h] * dye[o];
      }
      // activation
      std::vector<double> dpre(H, 0.0);
      for (int64_t h = 0; h < H; ++h) {
        double da = 0.0;
        for (int64_t o = 0; o < O; ++o) da += dye[o] * p.fc2_w[(e * H + h) * O + o];
        dpre[h] = da * act_grad(c.activation, t.pre[(e * C + slot) * H + h]);
      }
      // fc1
      for (int64_t h = 0; h < H; ++h) {
        if (c.has_fc1_bias) gr.d_fc1_b[e * H + h] += dpre[h];
        for (int64_t m = 0; m < M; ++m)
          gr.d_fc1_w[(e * H + h) * M + m] += dpre[h] * t.disp[(e * C + slot) * M + m];
      }
      for (int64_t m = 0; m < M; ++m) {
        double acc = 0.0;
        for (int64_t h = 0; h < H; ++h) acc += dpre[h] * p.fc1_w[(e * H + h) * M + m];
        d_disp[(e * C + slot) * M + m] = acc;
      }
    }

  // 7'. Encode.
  for (int64_t s = 0; s < S; ++s)
    for (int64_t j = 0; j < K; ++j) {
      if (!t.kept[s * K + j]) continue;
      const int64_t e = t.idx[s * K + j], slot = t.loc[s * K + j];
      const double w = c.is_postscore ? 1.0 : t.g[s * K + j];
      for (int64_t m = 0; m < M; ++m) gr.dx[s * M + m] += w * d_disp[(e * C + slot) * M + m];
      if (!c.is_postscore) {
        double dot = 0.0;
        for (int64_t m = 0; m < M; ++m) dot += x[s * M + m] * d_disp[(e * C + slot) * M + m];
        d_g[s * K + j] += dot;
      }
    }

  // 3b'. Normalisation g = g_raw / max(sum g_raw, eps). With the clamp active the denominator
  // is a constant, so only the direct 1/denom term remains.
  std::vector<double> d_graw = d_g;
  if (t.normalized) {
    for (int64_t s = 0; s < S; ++s) {
      const double den = t.denom[s];
      if (t.gsum[s] >= kNormEps) {
        double cross = 0.0;
        for (int64_t i = 0; i < K; ++i) cross += d_g[s * K + i] * t.g_raw[s * K + i];
        for (int64_t j = 0; j < K; ++j)
          d_graw[s * K + j] = d_g[s * K + j] / den - cross / (den * den);
      } else {
        for (int64_t j = 0; j < K; ++j) d_graw[s * K + j] = d_g[s * K + j] / den;
      }
    }
  }

  // 3' and 4'. Scores receive the gate gradient at the chosen experts, plus the l_aux term
  // (l_aux = E * sum_e ce[e] * (1/S) sum_s scores[s,e], ce constant).
  std::vector<double> d_scores(S * E, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    for (int64_t j = 0; j < K; ++j) d_scores[s * E + t.idx[s * K + j]] += d_graw[s * K + j];
    for (int64_t e = 0; e < E; ++e)
      d_scores[s * E + e] += dl_aux * static_cast<double>(E) * t.ce[e] / static_cast<double>(S);
  }

  // 2'. Softmax: d_logits = scores * (d_scores - sum_e d_scores * scores).
  std::vector<double> d_logits(S * E, 0.0);
  for (int64_t s = 0; s < S; ++s) {
    double dot = 0.0;
    for (int64_t e = 0; e < E; ++e) dot += d_scores[s * E + e] * t.scores[s * E + e];
    for (int64_t e = 0; e < E; ++e)
      d_logits[s * E + e] = t.scores[s * E + e] * (d_scores[s * E + e] - dot);
  }

  // 1'. Gate matmul (noise is additive, so it changes nothing here).
  for (int64_t e = 0; e < E; ++e)
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int64_t s = 0; s < S; ++s) acc += d_logits[s * E + e] * x[s * M + m];
      gr.d_wg[e * M + m] = acc;
    }
  for (int64_t s = 0; s < S; ++s)
    for (int64_t m = 0; m < M; ++m) {
      double acc = 0.0;
      for (int64_t e = 0; e < E; ++e) acc += d_logits[s * E + e] * p.wg[e * M + m];
      gr.dx[s * M + m] += acc;
    }
  return gr;
}

}  // namespace tutel::ref
