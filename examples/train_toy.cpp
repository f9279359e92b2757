// train_toy: a small model whose MoE layer lives in tuteld, trained through libtutel_client's
// C ABI (tutel/client.h) — the same calls any language's FFI would make.
//
//   u --embedding (here)--> e --MoE (tuteld)--> m ;  h = e + m --head (here)--> p ;  MSE(p, t)
//
// The task: inputs come from a few clusters and each cluster's target is a different nonlinear
// function of the input (tanh of a cluster-specific linear map, plus an offset), so the experts
// can specialise by cluster. The in-process parts are backpropagated by hand; the MoE's backward
// runs in the daemon (tutel_backward with dl_aux for the load-balancing loss), and both sides
// take an optimizer step (AdamW in the daemon, Adam here).
//
//   train_toy [--world W] [--socket PATH]... [--steps N] [--print-every N] [--aux-weight X]
//             [--layer-name NAME] [--seed N]
//
// With --world W > 1 it is its own launcher: it forks W rank processes, and the MoE layer is one
// expert-parallel group layer (docs/config.md, "group") spread over the daemons named by the
// --socket flags (rank r uses socket r % count). Every rank draws the same global data and takes
// a contiguous 1/W slice of each batch, so the ranks together see exactly the batches of the
// single-process run; the dense parts are data parallel (their gradients are summed over the
// ranks before each Adam step). With --aux-weight 0 the loss curve equals the single-process one
// up to float summation order.
//
// Prints the held-out loss before and after training and exits 1 unless it fell below half.

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "toy_ranks.hpp"
#include "tutel/client.h"

namespace {

constexpr int kClusters = 4;
constexpr int kIn = 16;     // input features
constexpr int kOut = 8;     // targets
constexpr int kModel = 32;  // the MoE's model_dim
constexpr int kHidden = 64;
constexpr int kExperts = 4;
constexpr int kBatch = 256;
constexpr int kEvalTokens = 1024;
constexpr float kAuxWeight = 0.01f;  // default of --aux-weight: loss = MSE + aux_weight * l_aux
constexpr float kLr = 3e-3f;
// A group layer's create waits for every rank, and each collective for the slowest rank; on a
// loaded machine with several ranks per core the daemon's defaults (10 s, 5 s) are too tight.
constexpr int kGroupTimeoutMs = 30000;

// Who speaks in messages: "train_toy", or "train_toy rank R" in a forked rank.
// How error messages name this process ("train_toy rank 2"); set once per process.
std::string g_who = "train_toy";
using toy::RankGroup;

struct Options {
  std::vector<std::string> sockets;
  int world = 1;
  int steps = 300;
  int print_every = 25;
  float aux_weight = kAuxWeight;
  std::string layer_name = "toy_moe";
  uint64_t seed = 1;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(
      stderr,
      "train_toy: %s\n"
      "usage: train_toy [--world W] [--socket PATH]... [--steps N] [--print-every N]\n"
      "                 [--aux-weight X] [--layer-name NAME] [--seed N]\n"
      "  --world       ranks (1); W > 1 forks W processes training one expert-parallel layer,\n"
      "                each on a 1/W slice of every batch; W must divide the batch (%d)\n"
      "  --socket      tuteld's client socket ($TUTELD_SOCKET, else ./run/client.sock); give it\n"
      "                once per daemon: rank r connects to the (r %% count)-th\n"
      "  --steps       training steps (300)\n"
      "  --print-every print the training loss every N steps (25); 1 prints every step\n"
      "  --aux-weight  weight of the load-balancing loss l_aux in the total loss (%g)\n"
      "  --layer-name  the MoE layer's name in the daemon (toy_moe; rank r of a group uses\n"
      "                NAME_rR); an existing one is replaced\n"
      "  --seed        seed of the data, the in-process weights and the layer's init (1)\n",
      why, kBatch, double(kAuxWeight));
  std::exit(2);
}

// An integer in [min, max]; the options stored in an int pass max = INT_MAX, so that a value
// past it is refused instead of wrapping (--world 4294967296 became 0, a division by zero).
long long parse_int(const char* flag, const char* value, long long min, long long max = LLONG_MAX) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value, &end, 10);
  if (errno != 0 || end == value || *end != '\0' || v < min || v > max) {
    std::fprintf(stderr, "train_toy: %s needs an integer in [%lld, %lld], got '%s'\n", flag, min, max, value);
    std::exit(2);
  }
  return v;
}

float parse_weight(const char* flag, const char* value) {
  char* end = nullptr;
  errno = 0;
  const float v = std::strtof(value, &end);
  if (errno != 0 || end == value || *end != '\0' || !std::isfinite(v) || v < 0.f) {
    std::fprintf(stderr, "train_toy: %s needs a finite number >= 0, got '%s'\n", flag, value);
    std::exit(2);
  }
  return v;
}

Options parse_options(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help")
      usage("train an MoE layer served by tuteld on a synthetic task");
    if (i + 1 >= argc) usage(("missing a value after " + flag).c_str());
    const char* value = argv[++i];
    if (flag == "--socket")
      o.sockets.push_back(value);
    else if (flag == "--world")
      o.world = static_cast<int>(parse_int("--world", value, 1, INT_MAX));
    else if (flag == "--steps")
      o.steps = static_cast<int>(parse_int("--steps", value, 1, INT_MAX));
    else if (flag == "--print-every")
      o.print_every = static_cast<int>(parse_int("--print-every", value, 1, INT_MAX));
    else if (flag == "--aux-weight")
      o.aux_weight = parse_weight("--aux-weight", value);
    else if (flag == "--layer-name")
      o.layer_name = value;
    else if (flag == "--seed")
      o.seed = static_cast<uint64_t>(parse_int("--seed", value, 0));
    else
      usage(("unknown option " + flag).c_str());
  }
  if (o.sockets.empty()) {
    const char* env = std::getenv("TUTELD_SOCKET");
    o.sockets.push_back(env != nullptr && *env != '\0' ? env : "./run/client.sock");
  }
  if (kBatch % o.world != 0) {
    std::fprintf(stderr,
                 "train_toy: --world %d does not divide the batch of %d tokens, so the ranks "
                 "cannot share it evenly; use a world size that divides %d (1, 2, 4, 8, ...)\n",
                 o.world, kBatch, kBatch);
    std::exit(2);
  }
  return o;
}

// ---- The synthetic task ----------------------------------------------------------------------

struct Task {
  float center[kClusters][kIn];
  float map[kClusters][kOut][kIn];
  float offset[kClusters][kOut];

  explicit Task(std::mt19937_64& rng) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (auto& c : center)
      for (float& v : c) v = 1.5f * n(rng);
    for (auto& m : map)
      for (auto& row : m)
        for (float& v : row) v = 2.f / std::sqrt(float(kIn)) * n(rng);
    for (auto& o : offset)
      for (float& v : o) v = 0.5f * n(rng);
  }

  // u [tokens, kIn], t [tokens, kOut].
  void sample(std::mt19937_64& rng, int tokens, std::vector<float>& u,
              std::vector<float>& t) const {
    std::normal_distribution<float> n(0.f, 1.f);
    std::uniform_int_distribution<int> pick(0, kClusters - 1);
    u.resize(size_t(tokens) * kIn);
    t.resize(size_t(tokens) * kOut);
    for (int s = 0; s < tokens; ++s) {
      const int c = pick(rng);
      float noise[kIn];
      for (int i = 0; i < kIn; ++i) {
        noise[i] = n(rng);
        u[size_t(s) * kIn + i] = center[c][i] + noise[i];
      }
      for (int o = 0; o < kOut; ++o) {
        float z = 0.f;
        for (int i = 0; i < kIn; ++i) z += map[c][o][i] * noise[i];
        t[size_t(s) * kOut + o] = std::tanh(z) + offset[c][o];
      }
    }
  }
};

// ---- The in-process parts: dense layers with Adam -------------------------------------------

struct Param {
  std::vector<float> value, grad, m, v;
  explicit Param(size_t n) : value(n), grad(n), m(n), v(n) {}
};

struct Adam {
  float lr = kLr, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-8f;
  int t = 0;
  void step(std::vector<Param*> params) {
    ++t;
    const float c1 = 1.f - std::pow(beta1, float(t)), c2 = 1.f - std::pow(beta2, float(t));
    for (Param* p : params) {
      for (size_t i = 0; i < p->value.size(); ++i) {
        const float g = p->grad[i];
        p->m[i] = beta1 * p->m[i] + (1 - beta1) * g;
        p->v[i] = beta2 * p->v[i] + (1 - beta2) * g * g;
        p->value[i] -= lr * (p->m[i] / c1) / (std::sqrt(p->v[i] / c2) + eps);
        p->grad[i] = 0.f;
      }
    }
  }
};

// y [S, out] = x [S, in] · Wᵀ + b, W [out, in].
void linear(const std::vector<float>& x, int tokens, int in, const Param& w, const Param& b,
            int out, std::vector<float>& y) {
  y.assign(size_t(tokens) * out, 0.f);
  for (int s = 0; s < tokens; ++s)
    for (int o = 0; o < out; ++o) {
      float acc = b.value[o];
      for (int i = 0; i < in; ++i) acc += x[size_t(s) * in + i] * w.value[size_t(o) * in + i];
      y[size_t(s) * out + o] = acc;
    }
}

// Accumulates dW += dyᵀ·x, db += Σ dy; returns dx = dy · W when asked.
void linear_backward(const std::vector<float>& x, const std::vector<float>& dy, int tokens, int in,
                     int out, Param& w, Param& b, std::vector<float>* dx) {
  if (dx != nullptr) dx->assign(size_t(tokens) * in, 0.f);
  for (int s = 0; s < tokens; ++s)
    for (int o = 0; o < out; ++o) {
      const float g = dy[size_t(s) * out + o];
      b.grad[o] += g;
      for (int i = 0; i < in; ++i) {
        w.grad[size_t(o) * in + i] += g * x[size_t(s) * in + i];
        if (dx != nullptr) (*dx)[size_t(s) * in + i] += g * w.value[size_t(o) * in + i];
      }
    }
}

struct Model {
  Param embed_w{size_t(kModel) * kIn}, embed_b{kModel};
  Param head_w{size_t(kOut) * kModel}, head_b{kOut};
  tutel_layer* moe = nullptr;

  explicit Model(std::mt19937_64& rng) {
    std::normal_distribution<float> n(0.f, 1.f);
    for (float& v : embed_w.value) v = n(rng) / std::sqrt(3.f * kIn);
    for (float& v : head_w.value) v = 0.5f * n(rng) / std::sqrt(float(kModel));
  }
};

struct Activations {
  std::vector<float> e, m, h, p;
  float l_aux = 0.f;
};

void fail(const char* what, int rc) {
  std::fprintf(stderr, "%s: %s failed (%d): %s\n", g_who.c_str(), what, rc, tutel_last_error());
  std::exit(1);
}

#define CHECK_TUTEL(call)                  \
  do {                                     \
    const int rc_ = (call);                \
    if (rc_ != TUTEL_OK) fail(#call, rc_); \
  } while (0)

void forward(Model& model, const std::vector<float>& u, int tokens, bool training, Activations& a) {
  linear(u, tokens, kIn, model.embed_w, model.embed_b, kModel, a.e);
  a.m.resize(a.e.size());
  if (training)
    CHECK_TUTEL(tutel_forward(model.moe, a.e.data(), tokens, a.m.data(), &a.l_aux));
  else
    CHECK_TUTEL(tutel_infer(model.moe, a.e.data(), tokens, a.m.data(), &a.l_aux));
  a.h.resize(a.e.size());
  for (size_t i = 0; i < a.e.size(); ++i) a.h[i] = a.e[i] + a.m[i];  // residual around the MoE
  linear(a.h, tokens, kModel, model.head_w, model.head_b, kOut, a.p);
}

double squared_error(const std::vector<float>& p, const std::vector<float>& t) {
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += double(p[i] - t[i]) * (p[i] - t[i]);
  return sum;
}

// This rank's contiguous share of a [tokens, width] row-major matrix.
std::vector<float> my_rows(const std::vector<float>& m, int tokens, int width,
                           const RankGroup& group) {
  const size_t rows = size_t(tokens / group.world()), begin = rows * size_t(group.rank());
  return std::vector<float>(m.begin() + long(begin * width),
                            m.begin() + long((begin + rows) * width));
}

// The held-out MSE of the whole evaluation set, every rank inferring its share.
float eval_loss(Model& model, const std::vector<float>& u, const std::vector<float>& t,
                RankGroup& group) {
  Activations a;
  forward(model, my_rows(u, kEvalTokens, kIn, group), kEvalTokens / group.world(), false, a);
  std::vector<double> sse = {squared_error(a.p, my_rows(t, kEvalTokens, kOut, group))};
  group.sum(sse);
  return float(sse[0] / (double(kEvalTokens) * kOut));
}

std::string layer_name(const Options& o, const RankGroup& group) {
  // Two ranks may share a daemon (and a tenant), where layer names must differ.
  return group.world() == 1 ? o.layer_name : o.layer_name + "_r" + std::to_string(group.rank());
}

std::string layer_spec(const Options& o, const RankGroup& group) {
  // Dropless (capacity_factor = 0): with a capacity factor, each rank's capacity comes from its
  // own slice of the batch, so an expert-parallel run would drop other tokens than the single
  // run and the two could not be compared.
  char buf[768];
  int n = std::snprintf(buf, sizeof buf,
                        "name = \"%s\"\n"
                        "experts = %d\n"
                        "model_dim = %d\n"
                        "hidden = %d\n"
                        "k = 2\n"
                        "capacity_factor = 0\n"
                        "activation = \"relu\"\n"
                        "init_seed = %llu\n"
                        "\n"
                        "[optimizer]\n"
                        "kind = \"adamw\"\n"
                        "lr = %g\n",
                        layer_name(o, group).c_str(), kExperts, kModel, kHidden,
                        static_cast<unsigned long long>(o.seed), kLr);
  if (group.world() > 1)
    std::snprintf(buf + n, sizeof buf - size_t(n),
                  "\n[group]\n"
                  "coordinator = \"127.0.0.1:%u\"\n"
                  "size = %d\n"
                  "rank = %d\n"
                  "bootstrap_timeout_ms = %d\n"
                  "collective_timeout_ms = %d\n",
                  unsigned(group.coordinator_port()), group.world(), group.rank(), kGroupTimeoutMs,
                  kGroupTimeoutMs);
  return buf;
}

tutel_layer* create_layer(tutel_client* client, const Options& o, const RankGroup& group) {
  const std::string spec = layer_spec(o, group), name = layer_name(o, group);
  tutel_layer* layer = nullptr;
  int rc = tutel_layer_create(client, spec.c_str(), &layer);
  if (rc == TUTEL_E_ALREADY_EXISTS) {
    // A layer of that name from an earlier run: start from scratch so the loss curve means
    // something.
    if (group.rank() == 0) std::printf("layer '%s' exists already; replacing it\n", name.c_str());
    CHECK_TUTEL(tutel_layer_attach(client, name.c_str(), &layer));
    CHECK_TUTEL(tutel_layer_destroy(layer));
    tutel_layer_release(layer);
    layer = nullptr;
    rc = tutel_layer_create(client, spec.c_str(), &layer);
  }
  if (rc != TUTEL_OK) fail("tutel_layer_create", rc);
  return layer;
}

void print_connected(const Options& o, tutel_client* client, const RankGroup& group,
                     const std::string& socket, tutel_layer* layer) {
  const char* tenant = "";
  CHECK_TUTEL(tutel_client_info(client, &tenant, nullptr));
  int64_t model_dim = 0, output_dim = 0, experts = 0;
  CHECK_TUTEL(tutel_layer_dims(layer, &model_dim, &output_dim, &experts));
  if (group.rank() != 0) return;
  if (group.world() > 1)
    std::printf("expert-parallel over %d ranks on %zu daemon socket(s), coordinator 127.0.0.1:%u\n",
                group.world(), o.sockets.size(), unsigned(group.coordinator_port()));
  std::printf(
      "connected to %s as tenant '%s'; layer '%s': %lld experts, model_dim %lld, hidden %d, k 2\n",
      socket.c_str(), tenant, layer_name(o, group).c_str(), (long long)experts,
      (long long)model_dim, kHidden);
}

// What one step adds up over the ranks besides the gradients.
struct StepStats {
  double squared_error = 0, l_aux = 0, dropped = 0;
};

// Sums the dense gradients and the step's statistics over the ranks in one exchange (doubles, so
// the sum adds no rounding of its own beyond the final conversion back to float).
void sum_over_ranks(RankGroup& group, const std::vector<Param*>& params, StepStats& stats) {
  if (group.world() == 1) return;
  std::vector<double> v;
  for (const Param* p : params) v.insert(v.end(), p->grad.begin(), p->grad.end());
  v.insert(v.end(), {stats.squared_error, stats.l_aux, stats.dropped});
  group.sum(v);
  size_t at = 0;
  for (Param* p : params)
    for (float& g : p->grad) g = float(v[at++]);
  stats = {v[at], v[at + 1], v[at + 2]};
}

// One training step on this rank's slice of the global batch (u, t); returns the group's stats.
StepStats train_step(const Options& o, Model& model, Adam& adam, RankGroup& group,
                     const std::vector<float>& u_all, const std::vector<float>& t_all) {
  const int tokens = kBatch / group.world();
  const std::vector<float> u = my_rows(u_all, kBatch, kIn, group);
  const std::vector<float> t = my_rows(t_all, kBatch, kOut, group);
  Activations a;
  forward(model, u, tokens, true, a);

  // The gradient of the GLOBAL mean, so that the gradients summed over the ranks are the
  // single run's.
  std::vector<float> dp(a.p.size()), dh, dx(size_t(tokens) * kModel), de(dx.size());
  const float scale = 2.f / float(size_t(kBatch) * kOut);
  for (size_t i = 0; i < dp.size(); ++i) dp[i] = scale * (a.p[i] - t[i]);
  linear_backward(a.h, dp, tokens, kModel, kOut, model.head_w, model.head_b, &dh);
  // The group's loss takes the mean over ranks of each rank's l_aux, hence aux_weight / W. The
  // l_aux of a slice is not the l_aux of the whole batch (it multiplies two means over tokens),
  // so with aux_weight > 0 the curve differs slightly from the single run's; with 0 it matches.
  const float dl_aux = o.aux_weight / float(group.world());
  CHECK_TUTEL(tutel_backward(model.moe, dh.data(), dl_aux, dx.data()));
  for (size_t i = 0; i < de.size(); ++i) de[i] = dh[i] + dx[i];  // both paths of the residual
  linear_backward(u, de, tokens, kIn, kModel, model.embed_w, model.embed_b, nullptr);

  // The daemon sums the gate's gradient over the group, and each expert's gradient holds every
  // rank's tokens already; the dense gradients are summed here.
  CHECK_TUTEL(tutel_step(model.moe));
  CHECK_TUTEL(tutel_zero_grad(model.moe));
  int64_t dropped = 0;
  CHECK_TUTEL(tutel_forward_stats(model.moe, nullptr, &dropped));
  StepStats stats{squared_error(a.p, t), a.l_aux, double(dropped)};
  const std::vector<Param*> params = {&model.embed_w, &model.embed_b, &model.head_w, &model.head_b};
  sum_over_ranks(group, params, stats);
  adam.step(params);
  return stats;
}

// Trains as rank group.rank() of group.world(); returns the exit code.
int train(const Options& o, RankGroup& group) {
  g_who = group.who();
  // Every rank draws the same task, weights and batches from the seed, and takes its share.
  std::mt19937_64 rng(o.seed);
  const Task task(rng);
  Model model(rng);
  std::vector<float> eval_u, eval_t;
  {
    std::mt19937_64 eval_rng(o.seed ^ 0x9E3779B97F4A7C15ull);
    task.sample(eval_rng, kEvalTokens, eval_u, eval_t);
  }

  const std::string& socket = o.sockets[size_t(group.rank()) % o.sockets.size()];
  tutel_client* client = tutel_connect(socket.c_str());
  if (client == nullptr) {
    std::fprintf(stderr, "%s: %s\n", g_who.c_str(), tutel_last_error());
    return 1;
  }
  model.moe = create_layer(client, o, group);
  print_connected(o, client, group, socket, model.moe);
  const bool speaker = group.rank() == 0;

  const float initial = eval_loss(model, eval_u, eval_t, group);
  if (speaker) std::printf("initial held-out loss %.4f\n", initial);

  Adam adam;
  std::vector<float> u, t;
  for (int step = 1; step <= o.steps; ++step) {
    task.sample(rng, kBatch, u, t);
    const StepStats s = train_step(o, model, adam, group, u, t);
    if (speaker && (step % o.print_every == 0 || step == 1 || step == o.steps)) {
      int64_t capacity = 0;
      CHECK_TUTEL(tutel_forward_stats(model.moe, &capacity, nullptr));
      // %.7g: tests compare these losses across world sizes to ~1e-5.
      std::printf("step %4d  loss %.7g  l_aux %.4f  capacity %lld  dropped %lld/%d\n", step,
                  s.squared_error / (double(kBatch) * kOut), s.l_aux / group.world(),
                  (long long)capacity, (long long)s.dropped, kBatch * 2);
    }
  }

  const float final_loss = eval_loss(model, eval_u, eval_t, group);
  tutel_layer_release(model.moe);
  tutel_close(client);
  if (speaker)
    std::printf("held-out loss: initial %.4f, final %.4f (%.1f%% of initial)\n", initial,
                final_loss, 100.0 * final_loss / initial);
  if (!(final_loss < 0.5f * initial)) {
    // The verdict is rank 0's (every rank has the same reduced loss): another rank failing first
    // would have the launcher stop rank 0 before it said why.
    if (!speaker) return 0;
    std::fprintf(stderr, "train_toy: the loss did not fall below half of its initial value\n");
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_options(argc, argv);
  if (o.world == 1) {
    RankGroup single;
    return train(o, single);
  }
  return toy::launch_ranks(o.world, [&o](toy::RankGroup& group) { return train(o, group); });
}
