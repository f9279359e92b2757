// Independent float64 reference of Tutel's MoE layer (forward and backward), written with plain
// loops that mirror the math one step at a time. It exists only to check the production kernels;
// it is deliberately slow and has no dependency on the project's libraries.
//
// All tensors are row-major std::vector<double>. Shapes are noted next to each field.
#pragma once

#include <cstdint>
#include <vector>

namespace tutel::ref {

// gelu is the exact erf form 0.5*x*(1+erf(x/sqrt(2))); silu is x*sigmoid(x).
enum class Activation { kRelu, kGelu, kSilu };

struct Config {
  int64_t S, M, H, O, E, k;      // tokens, model dim, hidden per expert, output dim, experts, top-k
  double capacity_factor = 1.0;  // f
  Activation activation = Activation::kRelu;
  bool normalize_gate = true;  // only applies when k > 1
  bool batch_prioritized = false;
  bool is_postscore = true;
  bool has_fc1_bias = true, has_fc2_bias = true;
  int64_t alignment = 1;  // s*d before the 256/128 rule
  // When >= 0, the capacity C to use instead of computing it: an expert-parallel group agrees
  // on one C (from its largest rank), which a single rank's tokens alone do not determine.
  int64_t capacity_override = -1;
};

// An absent bias is an empty vector.
struct Params {
  std::vector<double> wg;     // [E,M]
  std::vector<double> fc1_w;  // [E,H,M]
  std::vector<double> fc1_b;  // [E,H]
  std::vector<double> fc2_w;  // [E,H,O]
  std::vector<double> fc2_b;  // [E,O]
};

struct Forward {
  std::vector<double> y;  // [S,O]
  double l_aux;
  std::vector<int64_t> idx, loc;  // [S,k] expert index and slot of each (token, choice)
  std::vector<double> gates;      // [S,k] gate values after normalisation
  int64_t capacity;               // C
  int64_t dropped;                // number of (token, choice) assignments with loc >= C
  double min_topk_margin;         // min over tokens of score[k-th best] - score[(k+1)-th best]
                                  // (inf if k == E)
  // min over tokens of the gaps between adjacent scores among the k+1 best (all E when k = E):
  // besides which experts are chosen, the order among them (choice 0 first) decides the
  // locations and l_aux's top-1, and a near-tie there is rounding's to decide.
  double min_order_margin;
  double min_priority_margin;     // batch_prioritized only: min gap between adjacent sorted
                                  // per-token max scores (inf otherwise or S == 1)
  // Addition beyond the requested API (tests use it to stay away from relu's kink):
  // min over every occupied expert slot (one holding a kept assignment) and every h of
  // |pre[e,c,h]| (inf if nothing is kept).
  double min_abs_pre;
};

// Throws std::invalid_argument when a shape or the config is inconsistent.
Forward forward(const Config&, const Params&, const std::vector<double>& x /*[S,M]*/,
                const std::vector<double>* noise /*[S,E] or nullptr*/);

// Shapes as the corresponding inputs; bias grads are empty when that bias is absent.
struct Grads {
  std::vector<double> dx, d_wg, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b;
};

// Gradient of L = sum(dy * y) + dl_aux * l_aux with routing (idx, loc, kept, C) held fixed.
// Recomputes the forward itself.
Grads backward(const Config&, const Params&, const std::vector<double>& x,
               const std::vector<double>* noise, const std::vector<double>& dy /*[S,O]*/,
               double dl_aux);

// Capacity C from the config and the per-expert assignment counts (all k choices together, [E]).
int64_t capacity_for(const Config&, const std::vector<int64_t>& counts_per_expert);

}  // namespace tutel::ref
