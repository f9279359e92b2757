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
//   train_toy [--socket PATH] [--steps N] [--print-every N] [--layer-name NAME] [--seed N]
//
// Prints the held-out loss before and after training and exits 1 unless it fell below half.
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

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
constexpr float kAuxWeight = 0.01f;  // total loss = MSE + kAuxWeight * l_aux
constexpr float kLr = 3e-3f;

struct Options {
  std::string socket;
  int steps = 300;
  int print_every = 25;
  std::string layer_name = "toy_moe";
  uint64_t seed = 1;
};

[[noreturn]] void usage(const char* why) {
  std::fprintf(
      stderr,
      "train_toy: %s\n"
      "usage: train_toy [--socket PATH] [--steps N] [--print-every N] [--layer-name NAME] [--seed "
      "N]\n"
      "  --socket      tuteld's client socket ($TUTELD_SOCKET, else ./run/client.sock)\n"
      "  --steps       training steps (300)\n"
      "  --print-every print the training loss every N steps (25)\n"
      "  --layer-name  the MoE layer's name in the daemon (toy_moe); an existing one is replaced\n"
      "  --seed        seed of the data, the in-process weights and the layer's init (1)\n",
      why);
  std::exit(2);
}

long long parse_int(const char* flag, const char* value, long long min) {
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value, &end, 10);
  if (errno != 0 || end == value || *end != '\0' || v < min) {
    std::fprintf(stderr, "train_toy: %s needs an integer >= %lld, got '%s'\n", flag, min, value);
    std::exit(2);
  }
  return v;
}

Options parse_options(int argc, char** argv) {
  Options o;
  const char* env = std::getenv("TUTELD_SOCKET");
  o.socket = env != nullptr && *env != '\0' ? env : "./run/client.sock";
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "-h" || flag == "--help")
      usage("train an MoE layer served by tuteld on a synthetic task");
    if (i + 1 >= argc) usage(("missing a value after " + flag).c_str());
    const char* value = argv[++i];
    if (flag == "--socket")
      o.socket = value;
    else if (flag == "--steps")
      o.steps = static_cast<int>(parse_int("--steps", value, 1));
    else if (flag == "--print-every")
      o.print_every = static_cast<int>(parse_int("--print-every", value, 1));
    else if (flag == "--layer-name")
      o.layer_name = value;
    else if (flag == "--seed")
      o.seed = static_cast<uint64_t>(parse_int("--seed", value, 0));
    else
      usage(("unknown option " + flag).c_str());
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
  std::fprintf(stderr, "train_toy: %s failed (%d): %s\n", what, rc, tutel_last_error());
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

float mse(const std::vector<float>& p, const std::vector<float>& t) {
  double sum = 0;
  for (size_t i = 0; i < p.size(); ++i) sum += double(p[i] - t[i]) * (p[i] - t[i]);
  return float(sum / double(p.size()));
}

float eval_loss(Model& model, const std::vector<float>& u, const std::vector<float>& t) {
  Activations a;
  forward(model, u, kEvalTokens, false, a);
  return mse(a.p, t);
}

std::string layer_spec(const Options& o) {
  char buf[512];
  std::snprintf(buf, sizeof buf,
                "name = \"%s\"\n"
                "experts = %d\n"
                "model_dim = %d\n"
                "hidden = %d\n"
                "k = 2\n"
                "capacity_factor = 1.5\n"
                "activation = \"relu\"\n"
                "init_seed = %llu\n"
                "\n"
                "[optimizer]\n"
                "kind = \"adamw\"\n"
                "lr = %g\n",
                o.layer_name.c_str(), kExperts, kModel, kHidden,
                static_cast<unsigned long long>(o.seed), kLr);
  return buf;
}

tutel_layer* create_layer(tutel_client* client, const Options& o) {
  const std::string spec = layer_spec(o);
  tutel_layer* layer = nullptr;
  int rc = tutel_layer_create(client, spec.c_str(), &layer);
  if (rc == TUTEL_E_ALREADY_EXISTS) {
    // A layer of that name from an earlier run: start from scratch so the loss curve means
    // something.
    std::printf("layer '%s' exists already; replacing it\n", o.layer_name.c_str());
    CHECK_TUTEL(tutel_layer_attach(client, o.layer_name.c_str(), &layer));
    CHECK_TUTEL(tutel_layer_destroy(layer));
    tutel_layer_release(layer);
    layer = nullptr;
    rc = tutel_layer_create(client, spec.c_str(), &layer);
  }
  if (rc != TUTEL_OK) fail("tutel_layer_create", rc);
  return layer;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse_options(argc, argv);
  std::mt19937_64 rng(o.seed);
  const Task task(rng);
  Model model(rng);
  std::vector<float> eval_u, eval_t;
  {
    std::mt19937_64 eval_rng(o.seed ^ 0x9E3779B97F4A7C15ull);
    task.sample(eval_rng, kEvalTokens, eval_u, eval_t);
  }

  tutel_client* client = tutel_connect(o.socket.c_str());
  if (client == nullptr) {
    std::fprintf(stderr, "train_toy: %s\n", tutel_last_error());
    return 1;
  }
  const char* tenant = "";
  uint64_t data_bytes = 0;
  CHECK_TUTEL(tutel_client_info(client, &tenant, &data_bytes));
  model.moe = create_layer(client, o);
  int64_t model_dim = 0, output_dim = 0, experts = 0;
  CHECK_TUTEL(tutel_layer_dims(model.moe, &model_dim, &output_dim, &experts));
  std::printf(
      "connected to %s as tenant '%s'; layer '%s': %lld experts, model_dim %lld, hidden %d, k 2\n",
      o.socket.c_str(), tenant, o.layer_name.c_str(), (long long)experts, (long long)model_dim,
      kHidden);

  const float initial = eval_loss(model, eval_u, eval_t);
  std::printf("initial held-out loss %.4f\n", initial);

  Adam adam;
  Activations a;
  std::vector<float> u, t, dp, dh, dx, de;
  for (int step = 1; step <= o.steps; ++step) {
    task.sample(rng, kBatch, u, t);
    forward(model, u, kBatch, true, a);
    const float loss = mse(a.p, t);

    dp.resize(a.p.size());
    const float scale = 2.f / float(a.p.size());
    for (size_t i = 0; i < dp.size(); ++i) dp[i] = scale * (a.p[i] - t[i]);
    linear_backward(a.h, dp, kBatch, kModel, kOut, model.head_w, model.head_b, &dh);
    dx.resize(dh.size());
    CHECK_TUTEL(tutel_backward(model.moe, dh.data(), kAuxWeight, dx.data()));
    de.resize(dh.size());
    for (size_t i = 0; i < de.size(); ++i) de[i] = dh[i] + dx[i];  // both paths of the residual
    linear_backward(u, de, kBatch, kIn, kModel, model.embed_w, model.embed_b, nullptr);

    CHECK_TUTEL(tutel_step(model.moe));
    CHECK_TUTEL(tutel_zero_grad(model.moe));
    adam.step({&model.embed_w, &model.embed_b, &model.head_w, &model.head_b});

    if (step % o.print_every == 0 || step == 1 || step == o.steps) {
      int64_t capacity = 0, dropped = 0;
      CHECK_TUTEL(tutel_forward_stats(model.moe, &capacity, &dropped));
      std::printf("step %4d  loss %.4f  l_aux %.4f  capacity %lld  dropped %lld/%d\n", step, loss,
                  a.l_aux, (long long)capacity, (long long)dropped, kBatch * 2);
    }
  }

  const float final_loss = eval_loss(model, eval_u, eval_t);
  std::printf("held-out loss: initial %.4f, final %.4f (%.1f%% of initial)\n", initial, final_loss,
              100.0 * final_loss / initial);
  tutel_layer_release(model.moe);
  tutel_close(client);
  if (!(final_loss < 0.5f * initial)) {
    std::fprintf(stderr, "train_toy: the loss did not fall below half of its initial value\n");
    return 1;
  }
  return 0;
}
