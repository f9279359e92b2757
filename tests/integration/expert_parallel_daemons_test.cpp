// Expert parallelism across real daemons: D tuteld processes serving R ranks of the group each
// (W = D·R; group rank r on daemon r / R, node by node, so the group's local_size is R), each
// rank fed by its own client session, the group meeting over UCX on loopback with the linear or
// the 2DH all-to-all. Every rank's output, l_aux, capacity, dropped count and input gradient
// equal the float64 reference of one process holding all experts (with the group's capacity),
// and one SGD step moves every rank's parameters by the gradient summed over the group (the
// gate's all-reduced). With several training forwards in flight per rank (pipelined
// micro-batches, backwards in reverse order), the step moves them by the gradient summed over
// the group and the micro-batches. Fresh random weights (init_seed) and inputs each run; the
// seed is in the failure message. Tolerances as the CPU layer test: forward rtol 1e-4 / atol
// 1e-5, dx rtol 1e-3 / atol 1e-4, applied steps rtol 2e-3 / atol 2e-4 (atol of max|ref|);
// every rank's gradient norm (Layer::grad_norm, before the gradients are scaled for the step)
// is the whole layer's reference norm within rtol 1e-4.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include "../common/loopback.hpp"
#include "../graphs/expert_parallel_test_util.hpp"
#include "../kernels/layer_test_util.hpp"
#include "daemon_fixture.hpp"
#include "raw_session.hpp"
#include "tutel/client.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/graphs/expert_parallel.hpp"

namespace tutel::testing {
namespace {

struct GroupCase {
  std::string name;
  int daemons;           // D
  int ranks_per_daemon;  // R: group rank r is served by daemon r / R; the group's local_size
  int64_t experts;       // E
  int k;
  double f;                     // capacity factor
  std::vector<int64_t> tokens;  // per group rank: D·R of them
  std::string all_to_all = "linear";
  std::string more_group_keys;  // e.g. "r = 2\n"
};
void PrintTo(const GroupCase& c, std::ostream* os) { *os << c.name; }

// Every D in {1, 2, 4} with every R in {1, 2}; across the cases E ≥ W and E < W (experts
// sharded along H), k = 1 and 2, f > 0, f = 0 (dropless) and f < 0 (capped dropless), unequal
// token counts, and the 2DH all-to-all on two and on four nodes of two ranks.
std::vector<GroupCase> group_cases() {
  return {
      {"OneDaemonOneRank", 1, 1, 4, 2, 1.0, {40}},
      {"OneDaemonTwoRanksCappedDropless", 1, 2, 4, 1, -0.8, {24, 37}},
      {"TwoDaemonsOneRankEachOverflow", 2, 1, 4, 2, 0.5, {24, 40}},
      {"TwoDaemonsTwoRanksEachShardedDropless", 2, 2, 2, 2, 0.0, {16, 20, 24, 12}},
      {"TwoDaemonsTwoRanksEach2dh", 2, 2, 8, 1, 1.0, {30, 18, 26, 35}, "2dh"},
      {"FourDaemonsOneRankEachShardedCapped", 4, 1, 2, 1, -1.0, {20, 28, 14, 31}},
      {"FourDaemonsTwoRanksEachOneExpertEach", 4, 2, 8, 1, 1.5, {21, 14, 30, 18, 26, 11, 23, 28}},
      {"FourDaemonsTwoRanksEach2dhShardedDropless", 4, 2, 4, 2, 0.0, {12, 20, 17, 25, 9, 22, 15, 19}, "2dh"},
      // Sharded experts under r = s (each shard its H-slice over all of its expert's slots) and
      // 1 < r < s (pairs of shards gathered); the cases above run r = 1 (each gathered whole).
      {"FourDaemonsOneRankEachShardedModelParallel", 4, 1, 2, 1, -1.0, {20, 28, 14, 31}, "linear", "r = 2\n"},
      {"TwoDaemonsTwoRanksEachOneExpertInTwoParts", 2, 2, 1, 1, 1.0, {16, 20, 24, 12}, "linear", "r = 2\n"},
      // Ranks with an empty batch (0 tokens) call as their peers do: their experts serve the
      // peers' tokens, and they add nothing to any gradient.
      {"TwoDaemonsOneRankEachOneWithoutTokens", 2, 1, 4, 2, 1.0, {24, 0}},
      {"TwoDaemonsTwoRanksEachShardedDroplessTwoWithoutTokens", 2, 2, 2, 2, 0.0, {16, 0, 0, 12}, "2dh"},
  };
}

class ExpertParallelDaemons : public ::testing::TestWithParam<GroupCase> {};

std::vector<float> read_tensor(const SafetensorsFile& f, const char* name) {
  const SafetensorsTensor* t = f.find(name);
  if (!t) return {};
  const float* p = static_cast<const float*>(t->data);
  return std::vector<float>(p, p + t->shape.numel());
}

std::vector<double> widen(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }

// The layer-spec keys every test layer shares: the whole layer (on one daemon) and each group rank.
std::string layer_body(const LayerSpec& spec, uint64_t init_seed) {
  return "experts = " + std::to_string(spec.experts) + "\nmodel_dim = " + std::to_string(spec.model_dim) +
         "\nhidden = " + std::to_string(spec.hidden) + "\nk = " + std::to_string(spec.k) +
         "\ncapacity_factor = " + std::to_string(spec.capacity_factor) + "\ninit_seed = " +
         std::to_string(init_seed) + "\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n";
}
constexpr float kLr = 0.1f;

// Group rank r's layer: `body` plus its [group] table, with `more` keys in it.
std::string group_layer_spec(const std::string& body, uint16_t port, int W, int r, int local_size,
                             const std::string& all_to_all, const std::string& more = "") {
  return "name = \"moe_r" + std::to_string(r) + "\"\n" + body +
         "\n[group]\ncoordinator = \"127.0.0.1:" + std::to_string(port) +
         "\"\nsize = " + std::to_string(W) + "\nrank = " + std::to_string(r) +
         "\nlocal_size = " + std::to_string(local_size) + "\nall_to_all = \"" + all_to_all +
         "\"\nbootstrap_timeout_ms = 20000\ncollective_timeout_ms = 20000\n" + more;
}

// The whole layer `body`'s init_seed gives: a single-daemon layer with the same init, saved on
// `d` and read back.
::testing::AssertionResult whole_layer(DaemonProcess& d, const std::string& body, ref::Params* whole) {
  {
    auto client = client::Client::connect(d.client_socket());
    if (!client.ok()) return ::testing::AssertionFailure() << client.status();
    auto layer = client->create_layer("name = \"whole\"\n" + body);
    if (!layer.ok()) return ::testing::AssertionFailure() << layer.status();
    auto saved = layer->save("whole.safetensors");
    if (!saved.ok()) return ::testing::AssertionFailure() << saved.status();
  }
  auto file = SafetensorsFile::open(d.dir() + "/state/default/checkpoints/whole.safetensors");
  if (!file.ok()) return ::testing::AssertionFailure() << file.status();
  for (auto [name, dst] : {std::pair{kGateWeightName, &whole->wg}, std::pair{kFc1WeightName, &whole->fc1_w},
                           std::pair{kFc1BiasName, &whole->fc1_b}, std::pair{kFc2WeightName, &whole->fc2_w},
                           std::pair{kFc2BiasName, &whole->fc2_b}}) {
    const std::vector<float> v = read_tensor(*file, name);
    dst->assign(v.begin(), v.end());
  }
  return ::testing::AssertionSuccess();
}

// One micro-batch of the whole group, and what the reference says of it.
struct MicroBatch {
  std::vector<std::vector<double>> xs, dys;  // [group rank]
  float dl_aux = 0.f;
  int64_t capacity = 0;  // the group's
  std::vector<ref::Forward> want;
  std::vector<ref::Grads> grads;
};

// Inputs away from near-ties (top-k, relu's kink), the group's capacity from the reference's
// routing, and the reference run with that capacity.
::testing::AssertionResult draw_micro_batch(std::mt19937_64& rng, const LayerSpec& spec, const ref::Params& whole,
                                            const std::vector<int64_t>& tokens, float dl_aux, MicroBatch* out) {
  const int W = static_cast<int>(tokens.size());
  const int64_t M = spec.model_dim, O = spec.out_dim(), E = spec.experts;
  auto shard0 = graphs::expert_shard(spec, W, 0);
  if (!shard0.ok()) return ::testing::AssertionFailure() << shard0.status();
  LayerSpec aligned = spec;
  aligned.alignment = shard0->shards;
  MicroBatch& mb = *out;
  mb.xs.assign(W, {});
  mb.dys.assign(W, {});
  mb.want.assign(W, {});
  mb.grads.assign(W, {});
  mb.dl_aux = dl_aux;
  for (int attempt = 0;; ++attempt) {
    if (attempt == 100) return ::testing::AssertionFailure() << "could not draw inputs without near-ties";
    int64_t max_tokens = 0, max_count = 0;
    for (int r = 0; r < W; ++r) {
      const int64_t S = tokens[r];
      mb.xs[r] = round_f32(randn(rng, S * M, 1.0));
      mb.dys[r] = round_f32(randn(rng, S * O, 1.0));
      const ref::Forward f = ref::forward(to_ref(spec, S), whole, mb.xs[r], nullptr);
      std::vector<int64_t> counts(E, 0);
      for (int64_t i : f.idx) ++counts[i];
      max_tokens = std::max(max_tokens, S);
      max_count = std::max(max_count, *std::max_element(counts.begin(), counts.end()));
    }
    mb.capacity = layer_capacity(aligned, max_tokens, max_count);
    bool ties = false;
    for (int r = 0; r < W; ++r) {
      ref::Config cfg = to_ref(spec, tokens[r]);
      cfg.capacity_override = mb.capacity;
      mb.want[r] = ref::forward(cfg, whole, mb.xs[r], nullptr);
      ties |= mb.want[r].min_order_margin < 1e-6 ||
              (spec.activation == Activation::kRelu && mb.want[r].min_abs_pre < 1e-6);
    }
    if (!ties) break;
  }
  for (int r = 0; r < W; ++r) {
    ref::Config cfg = to_ref(spec, tokens[r]);
    cfg.capacity_override = mb.capacity;
    mb.grads[r] = ref::backward(cfg, whole, mb.xs[r], nullptr, mb.dys[r], mb.dl_aux);
  }
  return ::testing::AssertionSuccess();
}

// The whole layer's gradient summed over the group's ranks and the micro-batches.
graphs::HostLayerParams summed_grads(const std::vector<MicroBatch>& batches) {
  auto summed = [&](auto member) {
    std::vector<double> acc((batches[0].grads[0].*member).size(), 0.0);
    for (const MicroBatch& mb : batches)
      for (const ref::Grads& g : mb.grads)
        for (size_t i = 0; i < acc.size(); ++i) acc[i] += (g.*member)[i];
    return std::vector<float>(acc.begin(), acc.end());
  };
  return {summed(&ref::Grads::d_wg), summed(&ref::Grads::d_fc1_w), summed(&ref::Grads::d_fc1_b),
          summed(&ref::Grads::d_fc2_w), summed(&ref::Grads::d_fc2_b)};
}

// After one SGD step from the whole layer's slice, (before − after) / lr is the gradient group
// rank r applied: grad_sum's slice for r (the gate's whole, all-reduced).
void expect_applied_step(const std::string& saved_path, const LayerSpec& spec, int W, int r,
                         const graphs::HostLayerParams& whole_host, const graphs::HostLayerParams& grad_sum) {
  auto shard = graphs::expert_shard(spec, W, r);
  ASSERT_TRUE(shard.ok()) << shard.status();
  const graphs::HostLayerParams before = graphs::slice_for_rank(spec, *shard, whole_host);
  const graphs::HostLayerParams want = graphs::slice_for_rank(spec, *shard, grad_sum);
  auto saved = SafetensorsFile::open(saved_path);
  ASSERT_TRUE(saved.ok()) << saved.status();
  auto applied = [&](const char* name, const std::vector<float>& w0) {
    const std::vector<float> w1 = read_tensor(*saved, name);
    std::vector<float> g(w1.size());
    for (size_t i = 0; i < g.size() && i < w0.size(); ++i) g[i] = (w0[i] - w1[i]) / kLr;
    return g;
  };
  EXPECT_TRUE(all_close("gate step", applied(kGateWeightName, before.gate), widen(want.gate), 2e-3, 2e-4));
  EXPECT_TRUE(all_close("fc1 step", applied(kFc1WeightName, before.fc1), widen(want.fc1), 2e-3, 2e-4));
  EXPECT_TRUE(all_close("fc2 step", applied(kFc2WeightName, before.fc2), widen(want.fc2), 2e-3, 2e-4));
  EXPECT_TRUE(all_close("fc1 bias step", applied(kFc1BiasName, before.fc1_bias), widen(want.fc1_bias), 2e-3, 2e-4));
  EXPECT_TRUE(all_close("fc2 bias step", applied(kFc2BiasName, before.fc2_bias), widen(want.fc2_bias), 2e-3, 2e-4));
}

// D daemons, stopped by PID when the test ends, passed or not (DaemonProcess's destructor).
::testing::AssertionResult start_daemons(int D, std::vector<std::unique_ptr<DaemonProcess>>& daemons) {
  for (int d = 0; d < D; ++d) {
    daemons.push_back(std::make_unique<DaemonProcess>(DaemonOptions{}));
    if (auto started = daemons.back()->start(); !started) return started;
  }
  return ::testing::AssertionSuccess();
}

std::string all_logs(const std::vector<std::unique_ptr<DaemonProcess>>& daemons) {
  std::string all;
  for (size_t d = 0; d < daemons.size(); ++d)
    all += "--- daemon " + std::to_string(d) + " ---\n" + daemons[d]->log();
  return all;
}

// The layer shape of these tests: M = 16, H = 32.
LayerSpec small_spec(int64_t experts, int k, double f) {
  LayerSpec spec;
  spec.experts = experts;
  spec.model_dim = 16;
  spec.hidden = 32;
  spec.k = k;
  spec.capacity_factor = f;
  return spec;
}

// The gradients are scaled by this before the step (a power of two: exact), so the applied step
// is kGradScale times the reference gradient.
constexpr float kGradScale = 0.5f;

// The L2 norm of a whole layer's parameters (or gradients), in double.
double l2_norm(const graphs::HostLayerParams& p) {
  double squares = 0;
  for (const std::vector<float>* t : {&p.gate, &p.fc1, &p.fc1_bias, &p.fc2, &p.fc2_bias})
    for (float v : *t) squares += double(v) * double(v);
  return std::sqrt(squares);
}

graphs::HostLayerParams scaled(graphs::HostLayerParams p, float factor) {
  for (std::vector<float>* t : {&p.gate, &p.fc1, &p.fc1_bias, &p.fc2, &p.fc2_bias})
    for (float& v : *t) v *= factor;
  return p;
}

// Group rank r's last part of a test: a training forward of x [S, M] into y, its backward into
// dx, the gradient norm (*norm), the gradients scaled by kGradScale, an optimizer step, and a
// checkpoint "after_r<r>.safetensors" for expect_applied_step.
Status forward_backward_step_save(client::Layer& layer, int r, const MicroBatch& mb, int64_t M,
                                  int64_t O, std::vector<float>& y, std::vector<float>& dx,
                                  client::ForwardInfo* info, double* norm) {
  const int64_t S = static_cast<int64_t>(mb.xs[r].size()) / M;
  std::vector<float> x = to_f32(mb.xs[r]), dy = to_f32(mb.dys[r]);
  y.resize(S * O);
  dx.resize(S * M);
  Status st = layer.forward(x.data(), S, y.data(), info);
  if (st.ok()) st = layer.backward(dy.data(), mb.dl_aux, dx.data());
  if (st.ok()) {
    Result<double> got = layer.grad_norm();
    st = got.status();
    if (got.ok()) *norm = *got;
  }
  if (st.ok()) st = layer.scale_grads(kGradScale);
  if (st.ok()) st = layer.step().status();
  if (st.ok()) st = layer.save("after_r" + std::to_string(r) + ".safetensors").status();
  return st;
}

TEST_P(ExpertParallelDaemons, EveryRankMatchesTheSingleProcessLayer) {
  const GroupCase& c = GetParam();
  const int D = c.daemons, R = c.ranks_per_daemon, W = D * R;
  ASSERT_EQ(static_cast<int>(c.tokens.size()), W) << "one token count per group rank";
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint64_t init_seed = 1 + rng() % 1'000'000;

  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  ASSERT_TRUE(start_daemons(D, daemons));
  auto logs = [&] { return all_logs(daemons); };

  const LayerSpec spec = small_spec(c.experts, c.k, c.f);
  const int64_t M = spec.model_dim, O = spec.out_dim();
  const std::string body = layer_body(spec, init_seed);
  ref::Params whole;
  ASSERT_TRUE(whole_layer(*daemons[0], body, &whole));
  MicroBatch mb;
  ASSERT_TRUE(draw_micro_batch(rng, spec, whole, c.tokens, /*dl_aux=*/0.2f, &mb));

  // One thread per group rank, each with its own client session on its rank's daemon.
  const uint16_t port = free_port();
  struct RankOut {
    Status status;
    std::vector<float> y, dx;
    client::ForwardInfo info;
    double grad_norm = -1;
    std::string exported;  // the rank's state after the step, through ExportState
  };
  std::vector<RankOut> out(W);
  std::vector<std::thread> threads;
  const std::string whole_file = daemons[0]->dir() + "/state/default/checkpoints/whole.safetensors";
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankOut& o = out[r];
      auto client = client::Client::connect(daemons[r / R]->client_socket());
      if (!client.ok()) return void(o.status = client.status());
      auto layer = client->create_layer(group_layer_spec(body, port, W, r, R, c.all_to_all, c.more_group_keys));
      if (!layer.ok()) return void(o.status = layer.status());
      o.status = forward_backward_step_save(*layer, r, mb, M, O, o.y, o.dx, &o.info, &o.grad_norm);
      if (!o.status.ok()) return;
      // Each rank's state out (its slice), and the whole layer's file in (each takes its slice).
      Result<client::ExportedState> state = layer->export_state();
      if (!state.ok()) return void(o.status = state.status());
      o.exported.assign(reinterpret_cast<const char*>(state->data()), state->size());
      const int whole_fd = ::open(whole_file.c_str(), O_RDONLY | O_CLOEXEC);
      o.status = layer->import_state(whole_fd);
      ::close(whole_fd);
      if (o.status.ok()) o.status = layer->save("imported_r" + std::to_string(r) + ".safetensors").status();
    });
  }
  for (auto& t : threads) t.join();

  const graphs::HostLayerParams grad_sum = summed_grads({mb}), whole_host = to_host(whole);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " on daemon " + std::to_string(r / R));
    ASSERT_TRUE(out[r].status.ok()) << out[r].status << "\n" << logs();
    EXPECT_EQ(out[r].info.capacity, mb.capacity);
    EXPECT_EQ(out[r].info.dropped, mb.want[r].dropped);
    EXPECT_NEAR(out[r].info.l_aux, mb.want[r].l_aux, 1e-5);
    EXPECT_TRUE(all_close("y", out[r].y, mb.want[r].y, 1e-4, 1e-5));
    EXPECT_TRUE(all_close("dx", out[r].dx, mb.grads[r].dx, 1e-3, 1e-4));
    // The whole layer's gradient norm on every rank (the gate's summed over the group).
    EXPECT_NEAR(out[r].grad_norm, l2_norm(grad_sum), 1e-4 * l2_norm(grad_sum));
    const std::string checkpoints = daemons[r / R]->dir() + "/state/default/checkpoints/";
    expect_applied_step(checkpoints + "after_r" + std::to_string(r) + ".safetensors", spec, W, r, whole_host,
                        scaled(grad_sum, kGradScale));
    std::ifstream saved(checkpoints + "after_r" + std::to_string(r) + ".safetensors", std::ios::binary);
    EXPECT_TRUE(out[r].exported == std::string(std::istreambuf_iterator<char>(saved), std::istreambuf_iterator<char>()))
        << "the rank's exported state is not its saved file";
    // The whole layer's file imported: this rank's slice of it, exactly.
    auto shard = graphs::expert_shard(spec, W, r);
    ASSERT_TRUE(shard.ok()) << shard.status();
    const graphs::HostLayerParams slice = graphs::slice_for_rank(spec, *shard, whole_host);
    auto imported = SafetensorsFile::open(checkpoints + "imported_r" + std::to_string(r) + ".safetensors");
    ASSERT_TRUE(imported.ok()) << imported.status();
    for (auto [name, want] : {std::pair{kGateWeightName, &slice.gate}, std::pair{kFc1WeightName, &slice.fc1},
                              std::pair{kFc1BiasName, &slice.fc1_bias}, std::pair{kFc2WeightName, &slice.fc2},
                              std::pair{kFc2BiasName, &slice.fc2_bias}})
      EXPECT_EQ(read_tensor(*imported, name), *want) << name << " after importing the whole layer";
    EXPECT_EQ(imported->metadata().at("tuteld.step"), "0");
  }
  for (int d = 0; d < D; ++d) EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << daemons[d]->log();
}

INSTANTIATE_TEST_SUITE_P(Groups, ExpertParallelDaemons, ::testing::ValuesIn(group_cases()),
                         [](const ::testing::TestParamInfo<GroupCase>& info) { return info.param.name; });

// This daemon's layers as tutelctl lists them.
nlohmann::json admin_layers(const DaemonProcess& d) {
  const std::string text =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json layers", false).second;
  return nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
}

int64_t pending_backwards(const DaemonProcess& d, const std::string& layer) {
  const nlohmann::json j = admin_layers(d);
  if (j.is_object() && j.contains("layers"))
    for (const auto& l : j["layers"])
      if (l.value("name", "") == layer) return l.value("pending_backwards", int64_t{-1});
  return -1;
}

// Pipelined micro-batches on a group layer: each rank's client submits three training forwards
// (token counts unequal across ranks and micro-batches, so each agrees on its own capacity),
// waits for them (the daemon then holds three forwards per rank, tutelctl says so), submits the
// three backwards in reverse order, and steps. Every micro-batch's y, capacity, dropped count,
// l_aux and dx match the reference, and the step applies the gradient summed over the group and
// the micro-batches.
struct InFlightCase {
  std::string name;
  int daemons, ranks_per_daemon;
  int64_t experts;
  int k;
  double f;
  std::vector<std::vector<int64_t>> tokens;  // [micro-batch][group rank]
  std::string all_to_all = "linear";
  std::string more_group_keys;  // e.g. "pipeline = 3"
};
void PrintTo(const InFlightCase& c, std::ostream* os) { *os << c.name; }

class ExpertParallelDaemonsInFlight : public ::testing::TestWithParam<InFlightCase> {};

TEST_P(ExpertParallelDaemonsInFlight, BackwardsInReverseOrderThenStepMatchTheReference) {
  const InFlightCase& c = GetParam();
  constexpr int kMicroBatches = 3;
  const int D = c.daemons, R = c.ranks_per_daemon, W = D * R;
  ASSERT_EQ(static_cast<int>(c.tokens.size()), kMicroBatches);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint64_t init_seed = 1 + rng() % 1'000'000;

  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  ASSERT_TRUE(start_daemons(D, daemons));
  auto logs = [&] { return all_logs(daemons); };

  const LayerSpec spec = small_spec(c.experts, c.k, c.f);
  const int64_t M = spec.model_dim, O = spec.out_dim();
  const std::string body = layer_body(spec, init_seed);
  ref::Params whole;
  ASSERT_TRUE(whole_layer(*daemons[0], body, &whole));
  const float dl_aux[kMicroBatches] = {0.2f, -0.1f, 0.3f};
  std::vector<MicroBatch> batches(kMicroBatches);
  for (int m = 0; m < kMicroBatches; ++m) {
    ASSERT_EQ(static_cast<int>(c.tokens[m].size()), W) << "one token count per group rank";
    ASSERT_TRUE(draw_micro_batch(rng, spec, whole, c.tokens[m], dl_aux[m], &batches[m]));
  }

  const uint16_t port = free_port();
  struct RankOut {
    Status status;
    std::vector<std::vector<float>> y, dx;  // [micro-batch]
    std::vector<client::ForwardInfo> info;
    int64_t pending_after_forwards = -1, pending_after_backwards = -1;  // as tutelctl lists them
  };
  std::vector<RankOut> out(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankOut& o = out[r];
      const DaemonProcess& daemon = *daemons[r / R];
      auto client = client::Client::connect(daemon.client_socket());
      if (!client.ok()) return void(o.status = client.status());
      auto layer = client->create_layer(
          group_layer_spec(body, port, W, r, R, c.all_to_all, c.more_group_keys));
      if (!layer.ok()) return void(o.status = layer.status());
      std::vector<std::vector<float>> x(kMicroBatches), dy(kMicroBatches);
      o.y.resize(kMicroBatches);
      o.dx.resize(kMicroBatches);
      o.info.resize(kMicroBatches);
      std::vector<client::Ticket> forwards;
      for (int m = 0; m < kMicroBatches; ++m) {
        const int64_t S = c.tokens[m][r];
        x[m] = to_f32(batches[m].xs[r]);
        dy[m] = to_f32(batches[m].dys[r]);
        o.y[m].resize(S * O);
        o.dx[m].resize(S * M);
        auto t = layer->submit_forward(x[m].data(), S, o.y[m].data());
        if (!t.ok()) return void(o.status = t.status());
        forwards.push_back(*t);
      }
      for (int m = 0; m < kMicroBatches; ++m) {
        auto info = client->wait(forwards[m]);
        if (!info.ok()) return void(o.status = info.status());
        o.info[m] = *info;
      }
      o.pending_after_forwards = pending_backwards(daemon, "moe_r" + std::to_string(r));
      std::vector<client::Ticket> backwards;
      for (int m = kMicroBatches - 1; m >= 0; --m) {
        auto t = layer->submit_backward(forwards[m].sequence, dy[m].data(), batches[m].dl_aux, o.dx[m].data());
        if (!t.ok()) return void(o.status = t.status());
        backwards.push_back(*t);
      }
      for (const client::Ticket& t : backwards)
        if (auto done = client->wait(t); !done.ok()) return void(o.status = done.status());
      o.pending_after_backwards = pending_backwards(daemon, "moe_r" + std::to_string(r));
      Status st = layer->step().status();
      if (st.ok()) st = layer->save("after_r" + std::to_string(r) + ".safetensors").status();
      o.status = st;
    });
  }
  for (auto& t : threads) t.join();

  const graphs::HostLayerParams grad_sum = summed_grads(batches), whole_host = to_host(whole);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " on daemon " + std::to_string(r / R));
    ASSERT_TRUE(out[r].status.ok()) << out[r].status << "\n" << logs();
    EXPECT_EQ(out[r].pending_after_forwards, kMicroBatches);
    EXPECT_EQ(out[r].pending_after_backwards, 0);
    for (int m = 0; m < kMicroBatches; ++m) {
      SCOPED_TRACE("micro-batch " + std::to_string(m));
      const MicroBatch& mb = batches[m];
      EXPECT_EQ(out[r].info[m].capacity, mb.capacity);
      EXPECT_EQ(out[r].info[m].dropped, mb.want[r].dropped);
      EXPECT_NEAR(out[r].info[m].l_aux, mb.want[r].l_aux, 1e-5);
      EXPECT_TRUE(all_close("y", out[r].y[m], mb.want[r].y, 1e-4, 1e-5));
      EXPECT_TRUE(all_close("dx", out[r].dx[m], mb.grads[r].dx, 1e-3, 1e-4));
    }
    expect_applied_step(daemons[r / R]->dir() + "/state/default/checkpoints/after_r" + std::to_string(r) +
                            ".safetensors",
                        spec, W, r, whole_host, grad_sum);
  }
  for (int d = 0; d < D; ++d) EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << daemons[d]->log();
}

// Two daemons: one rank each (E ≥ W), and two ranks each with experts sharded along H over the
// 2DH all-to-all.
INSTANTIATE_TEST_SUITE_P(
    Groups, ExpertParallelDaemonsInFlight,
    ::testing::Values(
        InFlightCase{"TwoDaemonsOneRankEach", 2, 1, 4, 2, 1.0, {{40, 27}, {18, 45}, {31, 22}}},
        // Empty batches on one rank, then on every rank (the group's capacity 0).
        InFlightCase{"TwoDaemonsOneRankEachEmptyBatches", 2, 1, 4, 2, 1.0, {{40, 0}, {0, 45}, {0, 0}}},
        InFlightCase{"TwoDaemonsTwoRanksEach2dhShardedDropless",
                     2,
                     2,
                     2,
                     1,
                     0.0,
                     {{16, 25, 12, 30}, {28, 9, 21, 17}, {11, 19, 26, 14}},
                     "2dh"},
        // The expert phase in three chunks, exchanged on each layer's worker thread.
        InFlightCase{"TwoDaemonsTwoRanksEachPipelined",
                     2,
                     2,
                     4,
                     2,
                     1.0,
                     {{16, 25, 12, 30}, {28, 9, 21, 17}, {11, 19, 26, 14}},
                     "linear",
                     "pipeline = 3\n"}),
    [](const ::testing::TestParamInfo<InFlightCase>& info) { return info.param.name; });

// This daemon's groups as `tutelctl peers --json` lists them.
nlohmann::json admin_groups(const DaemonProcess& d) {
  const std::string text =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json peers",
                  false)
          .second;
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  return j.is_object() ? j.value("groups", nlohmann::json::array()) : nlohmann::json::array();
}

// Creates rank r's layer, spec_of(r), on daemons[r], all at once (a group's creates meet); each
// create's status.
std::vector<Status> create_on_each(const std::vector<std::unique_ptr<DaemonProcess>>& daemons,
                                   const std::function<std::string(int)>& spec_of) {
  std::vector<Status> created(daemons.size());
  std::vector<std::thread> threads;
  for (int r = 0; r < static_cast<int>(daemons.size()); ++r)
    threads.emplace_back([&, r] {
      auto client = client::Client::connect(daemons[r]->client_socket());
      if (!client.ok()) return void(created[r] = client.status());
      created[r] = client->create_layer(spec_of(r)).status();
    });
  for (auto& t : threads) t.join();
  return created;
}

// Two daemons whose layer specs for one group differ (rank 1 pipelines its expert phase, rank 0
// does not): both creates fail with the reason, naming rank 1, and both daemons keep serving (a
// matching group is created next on the same daemons).
TEST(ExpertParallelDaemonsConfig, RanksGivenDifferentLayersAreRefusedOnEveryDaemon) {
  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  ASSERT_TRUE(start_daemons(2, daemons));
  const std::string body = layer_body(small_spec(4, 2, 1.0), 7);
  for (const bool differ : {true, false}) {
    SCOPED_TRACE(differ ? "rank 1 pipelines" : "the same layers");
    const uint16_t port = free_port();
    const std::vector<Status> created = create_on_each(daemons, [&](int r) {
      const std::string more = differ && r == 1 ? "pipeline = 2\n" : "";
      return group_layer_spec(body, port, 2, r, 1, "linear", more);
    });
    for (int r = 0; r < 2; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      if (!differ) {
        EXPECT_TRUE(created[r].ok()) << created[r] << "\n" << all_logs(daemons);
        continue;
      }
      EXPECT_EQ(created[r].code(), StatusCode::kInvalidArgument) << created[r];
      EXPECT_NE(created[r].message().find("no rank of this expert-parallel group creates the layer"),
                std::string_view::npos)
          << created[r];
      EXPECT_NE(created[r].message().find("rank(s) 1 differ in how it runs"), std::string_view::npos) << created[r];
    }
  }
  for (int d = 0; d < 2; ++d) EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << daemons[d]->log();
}

// What fails on one rank after the group met (its weights file is missing there, or it starts
// from another gate: an init_seed of its own) fails the create on every rank, so no daemon keeps
// a layer whose first step would wait for a missing peer, or route with another gate. Then the
// same layers are created on both.
TEST(ExpertParallelDaemonsConfig, ARankThatFailsOrHoldsAnotherGateAfterMeetingFailsEveryRank) {
  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  ASSERT_TRUE(start_daemons(2, daemons));
  const std::string body = layer_body(small_spec(4, 2, 1.0), 7);
  const std::string other_seed = layer_body(small_spec(4, 2, 1.0), 8);
  std::string no_file = body;
  no_file.replace(no_file.find("init_seed = 7"), 13, "weights = \"missing.safetensors\"");
  enum Case { kOtherGate, kNoFile, kSame };
  for (const Case c : {kOtherGate, kNoFile, kSame}) {
    SCOPED_TRACE(c == kOtherGate ? "rank 1: another init_seed" : c == kNoFile ? "rank 1: no weights file" : "same");
    const uint16_t port = free_port();
    const std::vector<Status> created = create_on_each(daemons, [&](int r) {
      const std::string& mine = r == 0 || c == kSame ? body : c == kOtherGate ? other_seed : no_file;
      return group_layer_spec(mine, port, 2, r, 1, "linear");
    });
    for (int r = 0; r < 2; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      if (c == kSame) {
        EXPECT_TRUE(created[r].ok()) << created[r] << "\n" << all_logs(daemons);
        continue;
      }
      ASSERT_FALSE(created[r].ok());
      const std::string why(created[r].message());
      if (c == kOtherGate) {
        EXPECT_EQ(created[r].code(), StatusCode::kInvalidArgument) << created[r];
        EXPECT_NE(why.find("rank(s) 1 hold another gate"), std::string::npos) << why;
      } else if (r == 0) {
        EXPECT_NE(why.find("rank(s) 1 could not allocate or load their part"), std::string::npos) << why;
      } else {
        EXPECT_NE(why.find("missing.safetensors"), std::string::npos) << why;
      }
    }
  }
  for (int d = 0; d < 2; ++d) EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << daemons[d]->log();
}

// r = "auto", all_to_all = "auto", pipeline = "auto" on two daemons of two ranks each (two nodes
// of two: r = 0, and r = 1 with both all-to-alls and d = 1, 2, 4 are candidates). Each rank's
// client runs the same micro-batch as inference forwards, enough for the tuner to measure every
// candidate once (tune_warmups = 0, tune_trials = 1) and then run its choice, then a training
// forward, backward and step. Every output matches the reference whichever candidate ran it; every
// rank's tuner (tutelctl peers) holds one decided bucket with the same choice and the same agreed
// times; tutelctl prints them. Restarted daemons resume the layer with its decision (below).
TEST(ExpertParallelDaemonsTuner, AutoDecidesTheSameOnEveryRankAndKeepsTheResults) {
  const int D = 2, R = 2, W = D * R;
  const std::vector<int64_t> tokens{16, 25, 12, 30};
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const uint64_t init_seed = 1 + rng() % 1'000'000;
  std::vector<std::unique_ptr<DaemonProcess>> daemons;
  ASSERT_TRUE(start_daemons(D, daemons));
  auto logs = [&] { return all_logs(daemons); };

  const LayerSpec spec = small_spec(4, 2, 1.0);
  const int64_t M = spec.model_dim, O = spec.out_dim();
  const std::string body = layer_body(spec, init_seed);
  ref::Params whole;
  ASSERT_TRUE(whole_layer(*daemons[0], body, &whole));
  MicroBatch mb;
  ASSERT_TRUE(draw_micro_batch(rng, spec, whole, tokens, /*dl_aux=*/0.2f, &mb));

  constexpr int kCandidates = 7, kInferences = kCandidates + 2;
  const uint16_t port = free_port();
  struct RankOut {
    Status status;
    std::vector<std::vector<float>> y_infer;
    std::vector<float> y, dx;
    std::vector<client::ForwardInfo> info;
    double grad_norm = -1;
    std::vector<float> y_stepped;  // an inference after the step
  };
  std::vector<RankOut> out(W);
  std::vector<std::thread> threads;
  auto spec_of = [&](int r) {
    return group_layer_spec(body, port, W, r, R, "auto",
                            "r = \"auto\"\npipeline = \"auto\"\ntune_warmups = 0\ntune_trials = 1\n");
  };
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankOut& o = out[r];
      auto client = client::Client::connect(daemons[r / R]->client_socket());
      if (!client.ok()) return void(o.status = client.status());
      auto layer = client->create_layer(spec_of(r));
      if (!layer.ok()) return void(o.status = layer.status());
      const int64_t S = tokens[r];
      std::vector<float> x = to_f32(mb.xs[r]);
      o.y_infer.assign(kInferences, std::vector<float>(S * O));
      o.info.resize(kInferences + 1);
      for (int i = 0; i < kInferences; ++i)
        if (Status st = layer->infer(x.data(), S, o.y_infer[i].data(), &o.info[i]); !st.ok())
          return void(o.status = st);
      o.status = forward_backward_step_save(*layer, r, mb, M, O, o.y, o.dx, &o.info[kInferences], &o.grad_norm);
      if (!o.status.ok()) return;
      o.y_stepped.resize(S * O);
      o.status = layer->infer(x.data(), S, o.y_stepped.data());
    });
  }
  for (auto& t : threads) t.join();

  const graphs::HostLayerParams grad_sum = summed_grads({mb}), whole_host = to_host(whole);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r) + " on daemon " + std::to_string(r / R));
    ASSERT_TRUE(out[r].status.ok()) << out[r].status << "\n" << logs();
    for (int i = 0; i <= kInferences; ++i) {
      SCOPED_TRACE("forward " + std::to_string(i));
      EXPECT_EQ(out[r].info[i].capacity, mb.capacity);
      EXPECT_EQ(out[r].info[i].dropped, mb.want[r].dropped);
      EXPECT_TRUE(
          all_close("y", i < kInferences ? out[r].y_infer[i] : out[r].y, mb.want[r].y, 1e-4, 1e-5));
    }
    EXPECT_TRUE(all_close("dx", out[r].dx, mb.grads[r].dx, 1e-3, 1e-4));
    EXPECT_NEAR(out[r].grad_norm, l2_norm(grad_sum), 1e-4 * l2_norm(grad_sum));
    expect_applied_step(daemons[r / R]->dir() + "/state/default/checkpoints/after_r" +
                            std::to_string(r) + ".safetensors",
                        spec, W, r, whole_host, scaled(grad_sum, kGradScale));
  }

  // Every rank's dictionary, as the admin API reports it.
  std::vector<nlohmann::json> tuner_of(W);
  for (int d = 0; d < D; ++d)
    for (const nlohmann::json& g : admin_groups(*daemons[d])) {
      const int rank = g.value("rank", -1);
      ASSERT_TRUE(rank >= 0 && rank < W) << g.dump();
      EXPECT_EQ(g.value("r", nlohmann::json()), "auto");
      EXPECT_EQ(g.value("all_to_all", ""), "auto");
      EXPECT_EQ(g.value("pipeline", nlohmann::json()), "auto");
      EXPECT_EQ(g.value("tuner_candidates", nlohmann::json::array()).size(), size_t{kCandidates})
          << g.dump();
      tuner_of[rank] = g.value("tuner", nlohmann::json());
    }
  const int64_t bucket = graphs::ExchangeTuner::bucket_for(mb.capacity);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(tuner_of[r].is_array() && tuner_of[r].size() == 1) << tuner_of[r].dump();
    const nlohmann::json& e = tuner_of[r][0];
    EXPECT_EQ(e.value("capacity_bucket", int64_t{0}), bucket);
    EXPECT_EQ(e.value("state", ""), "decided") << e.dump();
    EXPECT_EQ(e.value("total_ns", nlohmann::json()).size(), size_t{kCandidates}) << e.dump();
    // Every candidate was run and timed (the group's slowest rank).
    for (const nlohmann::json& t : e.value("total_ns", nlohmann::json::array()))
      EXPECT_TRUE(t.is_number_integer() && t.get<int64_t>() > 0) << e.dump();
    EXPECT_EQ(e, tuner_of[0][0]) << "rank " << r << " decided otherwise than rank 0";
  }
  // tutelctl's table names the choice.
  const auto [rc, text] =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[0]->admin_socket() + " peers");
  EXPECT_EQ(rc, 0) << text;
  EXPECT_NE(text.find("tuner (capacity bucket -> parallelism, all-to-all and pipeline)"),
            std::string::npos)
      << text;
  EXPECT_NE(text.find("decided"), std::string::npos) << text;
  const nlohmann::json& chosen = tuner_of[0][0];
  const std::string chosen_name = chosen.value("r", -1) == 0
                                      ? std::string("r=0")
                                      : "r=" + std::to_string(chosen.value("r", -1)) +
                                            " a=" + chosen.value("all_to_all", std::string("?")) +
                                            " d=" + std::to_string(chosen.value("pipeline", 0));
  EXPECT_NE(text.find("decided  " + chosen_name), std::string::npos) << text;
  // The metrics name the choice too, per layer and bucket.
  const auto [mrc, metrics] = run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[0]->admin_socket() + " metrics");
  EXPECT_EQ(mrc, 0) << metrics;
  const std::string series = "tuteld_group_tuner_decision{layer=\"default/moe_r0\",capacity_bucket=\"" +
                             std::to_string(bucket) + "\",r=\"" + std::to_string(chosen.value("r", -1)) +
                             "\",all_to_all=\"" + chosen.value("all_to_all", std::string("?")) + "\",pipeline=\"" +
                             std::to_string(chosen.value("pipeline", 0)) + "\"} 1";
  EXPECT_NE(metrics.find(series), std::string::npos) << series << "\n" << metrics;
  for (int d = 0; d < D; ++d)
    EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << daemons[d]->log();

  // The daemons restart, and the trainers create the layer again with the same spec: every rank
  // resumes from its checkpoint, tuner decision included, so the bucket is decided before any
  // forward, and a forward runs the choice untimed (the restored totals stand) and gives what
  // the layer gave before the restart. Then, from the same checkpoints, rank 1's record is lost
  // (a checkpoint of before the decision, say), unreadable, or measured on another machine:
  // rank 1 restores none, every rank forgets its own and measures again, each saying why.
  const nlohmann::json decided = tuner_of[0][0];
  auto checkpoint_of = [&](int r) { return daemons[r / R]->dir() + "/state/default/moe_r" + std::to_string(r) + ".safetensors"; };
  enum Rank1 { kRestores, kLost, kUnreadable, kElsewhere };
  for (const Rank1 rank1 : {kRestores, kLost, kUnreadable, kElsewhere}) {
    const bool rank1_restores = rank1 == kRestores;
    SCOPED_TRACE(rank1 == kRestores ? "every rank restores the decision" : rank1 == kLost ? "rank 1's record lost"
                 : rank1 == kUnreadable ? "rank 1's record unreadable" : "rank 1's record measured elsewhere");
    for (int r = 0; r < W; ++r) {
      std::error_code ec;
      // The checkpoints of the first restart's exit (restored decisions are written again) are
      // kept, and each later case starts from them.
      if (rank1 == kRestores)
        std::filesystem::copy_file(checkpoint_of(r), checkpoint_of(r) + ".kept", std::filesystem::copy_options::overwrite_existing, ec);
      else
        std::filesystem::copy_file(checkpoint_of(r) + ".kept", checkpoint_of(r), std::filesystem::copy_options::overwrite_existing, ec);
      ASSERT_FALSE(ec) << ec.message();
    }
    if (rank1 != kRestores) {
      const std::string path = checkpoint_of(1);
      auto file = SafetensorsFile::open(path);
      ASSERT_TRUE(file.ok()) << file.status();
      std::map<std::string, std::string> metadata = file->metadata();
      ASSERT_EQ(metadata.count("tuteld.tuning"), 1u) << "the checkpoint carries the decision";
      if (rank1 == kLost) metadata.erase("tuteld.tuning");
      if (rank1 == kUnreadable) metadata["tuteld.tuning"] = "{\"version\": 1, \"measured_on\"";
      if (rank1 == kElsewhere) {
        nlohmann::json record = nlohmann::json::parse(metadata["tuteld.tuning"]);
        record["measured_on"] = "cpu: 64 threads, Another Processor";
        metadata["tuteld.tuning"] = record.dump();
      }
      std::vector<SafetensorsEntry> entries;
      for (const SafetensorsTensor& t : file->tensors()) entries.push_back({t.name, t.dtype, t.shape, t.data});
      ASSERT_TRUE(write_safetensors(path, entries, metadata).ok());
    }
    std::vector<size_t> log_start(D);  // each restart appends to the daemon's log
    for (int d = 0; d < D; ++d) {
      log_start[d] = daemons[d]->log().size();
      ASSERT_TRUE(daemons[d]->start());
    }
    std::vector<Status> resumed(W);
    std::vector<std::vector<float>> y(W);
    std::vector<client::ForwardInfo> info(W);
    std::vector<nlohmann::json> before_forward(W);
    std::atomic<int> created{0};
    threads.clear();
    for (int r = 0; r < W; ++r)
      threads.emplace_back([&, r] {
        auto client = client::Client::connect(daemons[r / R]->client_socket());
        if (!client.ok()) return void(resumed[r] = client.status());
        auto layer = client->create_layer(spec_of(r));
        if (!layer.ok()) return void(resumed[r] = layer.status());
        if (layer->info().step != 1) return void(resumed[r] = Status::Internal("not resumed: step " + std::to_string(layer->info().step)));
        // The dictionary before any forward: the ranks read their own daemon's once all exist.
        ++created;
        while (created.load() < W) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        if (r % R == 0)
          for (const nlohmann::json& g : admin_groups(*daemons[r / R]))
            before_forward[g.value("rank", 0)] = g.value("tuner", nlohmann::json());
        if (r % R == 0) created += 1;  // this daemon's read done: W + D once both are
        while (created.load() < W + D) std::this_thread::sleep_for(std::chrono::milliseconds(1));
        y[r].resize(tokens[r] * O);
        std::vector<float> x = to_f32(mb.xs[r]);
        resumed[r] = layer->infer(x.data(), tokens[r], y[r].data(), &info[r]);
      });
    for (auto& t : threads) t.join();
    std::vector<nlohmann::json> after_forward(W);
    for (int d = 0; d < D; ++d)
      for (const nlohmann::json& g : admin_groups(*daemons[d])) after_forward[g.value("rank", 0)] = g.value("tuner", nlohmann::json());
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_TRUE(resumed[r].ok()) << resumed[r] << "\n" << logs();
      EXPECT_EQ(info[r].capacity, mb.capacity);
      EXPECT_TRUE(all_close("y after the restart", y[r], std::vector<double>(out[r].y_stepped.begin(), out[r].y_stepped.end()), 1e-4, 1e-5));
      ASSERT_TRUE(after_forward[r].is_array() && after_forward[r].size() == 1) << after_forward[r].dump();
      const nlohmann::json& e = after_forward[r][0];
      if (rank1_restores) {
        ASSERT_TRUE(before_forward[r].is_array() && before_forward[r].size() == 1) << before_forward[r].dump();
        // The same decision, marked restored (and no rounds run in this process).
        nlohmann::json restored = decided;
        restored["restored"] = true;
        restored["rounds_done"] = 0;
        EXPECT_EQ(before_forward[r][0], restored);
        EXPECT_EQ(e, restored) << "the forward ran the restored choice, untimed";
      } else {
        EXPECT_TRUE(before_forward[r].is_array() && before_forward[r].empty()) << before_forward[r].dump();
        EXPECT_EQ(e.value("state", ""), "measuring") << e.dump();
        EXPECT_FALSE(e.value("restored", true)) << e.dump();
      }
    }
    if (rank1_restores) {
      const auto [rc, table] =
          run_command(std::string(TUTELCTL_BIN) + " --socket " + daemons[0]->admin_socket() + " peers");
      EXPECT_EQ(rc, 0) << table;
      EXPECT_NE(table.find("restored  " + chosen_name), std::string::npos) << table;
    }
    for (int d = 0; d < D; ++d) {
      const std::string log = daemons[d]->log().substr(log_start[d]);
      EXPECT_EQ(log.find("restored 1 tuner decision(s) from its checkpoint") != std::string::npos, rank1_restores) << log;
      if (!rank1_restores) {
        EXPECT_NE(log.find("its checkpoint's tuner decisions are not restored: compared with rank 0, rank(s) 1 "
                           "restored other tuner decisions"),
                  std::string::npos)
            << log;
      }
      // Rank 1 (on daemon 0) says why it restored none.
      const std::string why = rank1 == kUnreadable ? "metadata 'tuteld.tuning' is not JSON"
                              : rank1 == kElsewhere
                                  ? "they were measured on \"cpu: 64 threads, Another Processor\", this rank runs on"
                                  : "";
      if (d == 0 && !why.empty()) {
        EXPECT_NE(log.find("the tuner decisions in " + checkpoint_of(1) + " are not restored ("), std::string::npos) << log;
        EXPECT_NE(log.find(why), std::string::npos) << why << "\n" << log;
      }
      EXPECT_EQ(daemons[d]->stop(), 0) << "daemon " << d << ":\n" << log;
    }
  }
}

}  // namespace
}  // namespace tutel::testing

namespace tutel::testing {
namespace {

std::string group_spec(const std::string& name, uint16_t port, int rank, int timeout_ms) {
  return "name = \"" + name + "\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 3\n"
         "[optimizer]\nkind = \"sgd\"\nlr = 0.01\n[group]\ncoordinator = \"127.0.0.1:" + std::to_string(port) +
         "\"\nsize = 2\nrank = " + std::to_string(rank) + "\nbootstrap_timeout_ms = 20000\ncollective_timeout_ms = " +
         std::to_string(timeout_ms) + "\n";
}

// Two groups (two jobs) on the same two daemons, their clients submitting in opposite orders:
// each group's collectives run on its own communicator in its own order, so neither waits for
// the other.
TEST(ExpertParallelGroups, TwoGroupsInOppositeOrdersDoNotDeadlock) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port_a = free_port(), port_b = free_port();
  constexpr int kSteps = 6;
  std::vector<Status> results(4);
  std::vector<std::thread> threads;
  // (group, rank, daemon, start delay): on daemon 0 group A goes first, on daemon 1 group B.
  const struct { char group; int rank; DaemonProcess* daemon; int delay_ms; } clients[] = {
      {'a', 0, &d0, 0}, {'b', 0, &d0, 150}, {'b', 1, &d1, 0}, {'a', 1, &d1, 150}};
  for (int i = 0; i < 4; ++i) {
    threads.emplace_back([&, i] {
      const auto& c = clients[i];
      std::this_thread::sleep_for(std::chrono::milliseconds(c.delay_ms));
      auto client = client::Client::connect(c.daemon->client_socket());
      if (!client.ok()) return void(results[i] = client.status());
      auto layer = client->create_layer(group_spec(std::string("job_") + c.group + std::to_string(c.rank),
                                                   c.group == 'a' ? port_a : port_b, c.rank, 20000));
      if (!layer.ok()) return void(results[i] = layer.status());
      std::vector<float> x(24 * 16, 0.1f * (i + 1)), y(24 * 16), dx(24 * 16);
      for (int step = 0; step < kSteps; ++step) {
        Status st = layer->forward(x.data(), 24, y.data());
        if (st.ok()) st = layer->backward(y.data(), 0.f, dx.data());
        if (st.ok()) st = layer->step().status();
        if (!st.ok()) return void(results[i] = st);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int i = 0; i < 4; ++i) EXPECT_TRUE(results[i].ok()) << "client " << i << ": " << results[i];
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// The "default" tenant of a daemon, from tutelctl --json tenants.
nlohmann::json default_tenant_of(const DaemonProcess& d) {
  auto [code, out] =
      run_command(std::string(TUTELCTL_BIN) + " --socket " + d.admin_socket() + " --json tenants", false);
  EXPECT_EQ(code, 0) << out;
  const nlohmann::json reply = nlohmann::json::parse(out, nullptr, false);
  for (const auto& t : reply["tenants"])
    if (t["name"] == "default") return t;
  ADD_FAILURE() << "no tenant 'default' in " << out;
  return nlohmann::json::object();
}

// A group's rank on a daemon whose tenant is out of quota: the training forward that would pass
// it is refused on every rank (the others say another rank could not allocate), promptly and not
// as a timeout, and the group's later steps run.
TEST(ExpertParallelGroups, ATenantOutOfQuotaOnOneDaemonRefusesTheStepOnEveryRank) {
  // What a rank's layer and one small training forward hold, measured on a pair of daemons.
  uint64_t parameters = 0, entry = 0;
  {
    DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
    ASSERT_TRUE(d0.start());
    ASSERT_TRUE(d1.start());
    const uint16_t port = free_port();
    std::vector<Status> results(2);
    std::vector<std::thread> threads;
    for (int r = 0; r < 2; ++r)
      threads.emplace_back([&, r] {
        auto client = client::Client::connect((r == 0 ? d0 : d1).client_socket());
        if (!client.ok()) return void(results[r] = client.status());
        auto layer = client->create_layer(group_spec("quota", port, r, 20000));
        if (!layer.ok()) return void(results[r] = layer.status());
        std::vector<float> x(8 * 16, 0.5f), y(8 * 16);
        client::ForwardInfo info;
        results[r] = layer->forward(x.data(), 8, y.data(), &info);
        if (r == 1 && results[r].ok()) {
          const nlohmann::json t = default_tenant_of(d1);
          parameters = t["memory_bytes"].get<uint64_t>();
          entry = t["pending_bytes"].get<uint64_t>();
        }
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < 2; ++r) ASSERT_TRUE(results[r].ok()) << "rank " << r << ": " << results[r];
    ASSERT_GT(entry, 0u);
    EXPECT_EQ(d0.stop(), 0) << d0.log();
    EXPECT_EQ(d1.stop(), 0) << d1.log();
  }
  DaemonOptions tight;
  tight.default_max_memory_bytes = parameters + 3 * entry;  // small steps fit, a big one does not
  DaemonProcess d0(DaemonOptions{}), d1(tight);
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  std::vector<std::vector<Status>> steps(2);
  std::vector<Status> setup(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      auto client = client::Client::connect((r == 0 ? d0 : d1).client_socket());
      if (!client.ok()) return void(setup[r] = client.status());
      auto layer = client->create_layer(group_spec("quota", port, r, 20000));
      if (!layer.ok()) return void(setup[r] = layer.status());
      auto train = [&](int64_t tokens) {
        std::vector<float> x(tokens * 16, 0.25f * (r + 1)), y(tokens * 16), dx(tokens * 16);
        client::ForwardInfo info;
        Status st = layer->forward(x.data(), tokens, y.data(), &info);
        steps[r].push_back(st);
        if (st.ok()) steps[r].push_back(layer->backward(info.sequence, y.data(), 0.f, dx.data()));
      };
      train(8);    // forward, backward
      train(512);  // refused
      train(8);    // forward, backward
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 5u);
    for (size_t i : {0, 1, 3, 4}) EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    EXPECT_EQ(steps[r][2].code(), StatusCode::kResourceExhausted) << steps[r][2];
    const std::string why(steps[r][2].message());
    EXPECT_NE(why.find(r == 0 ? "another rank of the expert-parallel group could not allocate"
                              : "over its max_memory_bytes"),
              std::string::npos)
        << why;
  }
  EXPECT_EQ(default_tenant_of(d1)["pending_bytes"].get<uint64_t>(), 0u);
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A rank spoken by hand: its hello, the group layer `spec` created, and x (S rows of M) at the
// data region's start; the layer's handle.
Result<uint64_t> open_raw_rank(RawSession& raw, const std::string& spec, int64_t S, int64_t M) {
  TUTEL_RETURN_IF_ERROR(raw.hello());
  TUTEL_ASSIGN_OR_RETURN(uint64_t handle, raw.create_layer(spec, 60s));
  auto* x = reinterpret_cast<float*>(raw.arena().base() + raw.arena().layout().data_offset);
  for (int64_t i = 0; i < S * M; ++i) x[i] = 0.01f * static_cast<float>(i % 37) - 0.2f;
  return handle;
}

// Requests a rank's daemon refuses before its layer runs them (a malformed descriptor from a
// client the library does not check: a dx range past the arena, negative tokens, an unknown flag; a
// backward naming no forward) are refused on every rank through the step's agreement, at once
// rather than after the collective timeout; a refused backward consumes the forward it names on
// every rank; and the group's next steps run. Rank 1 speaks the protocol by hand.
TEST(ExpertParallelGroups, ARequestOneDaemonRefusesBeforeTheLayerIsRefusedOnEveryRank) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 8, M = 16;
  constexpr uint64_t kBytes = S * M * 4;
  std::vector<Status> rank0_steps;
  std::vector<ipc::CompletionDescriptor> rank1_steps;
  Status setup0, setup1;
  // Forwards waiting for their backwards, read while the sessions are open (a session's close
  // drops its own).
  int64_t pending0 = -1, pending1 = -1;
  std::thread rank1([&] {
    RawSession raw(d1.client_socket());
    auto handle = open_raw_rank(raw, group_spec("refused", port, 1, 20000), S, M);
    if (!handle.ok()) return void(setup1 = handle.status());
    const ipc::ArenaLayout& l = raw.arena().layout();
    auto step = [&](ipc::Op op, uint64_t sequence, int64_t tokens, uint64_t output_offset,
                    uint32_t extra_flags = 0) {
      ipc::RequestDescriptor d{};
      d.op = static_cast<uint32_t>(op);
      d.flags = (op == ipc::Op::kForward ? uint32_t{ipc::kFlagTraining} : uint32_t{0}) | extra_flags;
      d.layer_handle = *handle;
      d.tokens = tokens;
      d.sequence = sequence;
      d.input_offset = l.data_offset;
      d.input_bytes = kBytes;
      d.output_offset = output_offset;
      d.output_bytes = kBytes;
      const std::optional<ipc::CompletionDescriptor> c = raw.submit(d);
      if (!c) {
        ipc::CompletionDescriptor lost{};
        lost.status_code = -1;
        rank1_steps.push_back(lost);
      } else {
        rank1_steps.push_back(*c);
      }
    };
    const uint64_t out = l.data_offset + kBytes, past_the_arena = l.data_offset + l.data_bytes;
    step(ipc::Op::kForward, 1, S, out);              // 0
    step(ipc::Op::kBackward, 1, S, out);             // 1
    step(ipc::Op::kForward, 2, S, out);              // 2
    step(ipc::Op::kBackward, 2, S, past_the_arena);  // 3: dx past the arena
    step(ipc::Op::kForward, 3, -1, out);             // 4: negative tokens
    step(ipc::Op::kForward, 4, S, out);              // 5
    step(ipc::Op::kBackward, 99, S, out);            // 6: names no forward
    step(ipc::Op::kForward, 5, S, out);              // 7
    step(ipc::Op::kBackward, 5, S, out);             // 8
    step(ipc::Op::kForward, 6, S, out, 1u << 30);    // 9: a flag no daemon knows
    step(ipc::Op::kForward, 7, S, out);              // 10
    step(ipc::Op::kBackward, 7, S, out);             // 11
    pending1 = pending_backwards(d1, "refused");
  });
  {
    auto client = client::Client::connect(d0.client_socket());
    auto layer = client.ok() ? client->create_layer(group_spec("refused", port, 0, 20000))
                             : Result<client::Layer>(client.status());
    if (!layer.ok()) {
      setup0 = layer.status();
    } else {
      std::vector<float> x(S * M, 0.3f), y(S * M), dx(S * M);
      client::ForwardInfo info;
      auto forward = [&] {
        rank0_steps.push_back(layer->forward(x.data(), S, y.data(), &info));
      };
      auto backward = [&] { rank0_steps.push_back(layer->backward(info.sequence, y.data(), 0.f, dx.data())); };
      forward();   // 0
      backward();  // 1
      forward();   // 2
      backward();  // 3: refused by rank 1's daemon
      forward();   // 4: refused by rank 1's daemon
      forward();   // 5
      backward();  // 6: refused by rank 1's daemon (consumes 5)
      forward();   // 7
      backward();  // 8
      forward();   // 9: refused by rank 1's daemon
      forward();   // 10
      backward();  // 11
      pending0 = pending_backwards(d0, "refused");
    }
  }
  rank1.join();
  ASSERT_TRUE(setup0.ok()) << setup0;
  ASSERT_TRUE(setup1.ok()) << setup1;
  ASSERT_EQ(rank0_steps.size(), 12u);
  ASSERT_EQ(rank1_steps.size(), 12u);
  for (size_t i : {0, 1, 2, 5, 7, 8, 10, 11}) {
    EXPECT_TRUE(rank0_steps[i].ok()) << "rank 0 step " << i << ": " << rank0_steps[i];
    EXPECT_EQ(rank1_steps[i].status_code, 0) << "rank 1 step " << i << ": " << rank1_steps[i].message;
  }
  for (size_t i : {3, 4, 6, 9}) {
    SCOPED_TRACE("step " + std::to_string(i));
    // Not the collective timeout: the peer was told through the step.
    EXPECT_EQ(rank0_steps[i].code(), StatusCode::kResourceExhausted) << rank0_steps[i];
    EXPECT_NE(rank0_steps[i].message().find("refused its request before running it"), std::string_view::npos)
        << rank0_steps[i];
  }
  EXPECT_NE(rank1_steps[3].status_code, 0);
  EXPECT_NE(std::string(rank1_steps[3].message).find("dx"), std::string::npos) << rank1_steps[3].message;
  EXPECT_NE(std::string(rank1_steps[4].message).find("tokens = -1"), std::string::npos) << rank1_steps[4].message;
  EXPECT_EQ(rank1_steps[6].status_code, static_cast<int32_t>(StatusCode::kNotFound)) << rank1_steps[6].message;
  EXPECT_NE(std::string(rank1_steps[9].message).find("unknown request flags"), std::string::npos)
      << rank1_steps[9].message;
  // Every forward was backwarded or consumed by a refused backward: none is pending on daemon 0,
  // and on daemon 1 only sequence 4 (its backward named 99, so rank 1 consumed nothing there;
  // it is rank 1's client's to run or drop). Sequence 2 went with its refused backward.
  EXPECT_EQ(pending0, 0);
  EXPECT_EQ(pending1, 1);
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A discard is each rank's own, no collective: a forward discarded on both ranks is gone from
// both daemons, a discard on one rank alone (naming no forward there) changes nothing for the
// other, and the group's later steps run in step on both.
TEST(ExpertParallelGroups, ADiscardIsEachRanksOwnAndTheGroupStaysInStep) {
  DaemonOptions periodic;  // for the checkpoints at the end
  periodic.extra_server = "checkpoint_interval_s = 1\n";
  DaemonProcess d0(periodic), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 8, M = 16;
  std::vector<Status> rank0_steps;
  std::vector<ipc::CompletionDescriptor> rank1_steps;
  Status setup0, setup1;
  int64_t pending0 = -1, pending1 = -1;
  std::thread rank1([&] {
    RawSession raw(d1.client_socket());
    auto handle = open_raw_rank(raw, group_spec("discarded", port, 1, 20000), S, M);
    if (!handle.ok()) return void(setup1 = handle.status());
    const ipc::ArenaLayout& l = raw.arena().layout();
    auto step = [&](ipc::Op op, uint64_t sequence) {
      const std::optional<ipc::CompletionDescriptor> c = raw.submit(data_request(l, op, *handle, sequence, S, M));
      ipc::CompletionDescriptor lost{};
      lost.status_code = -1;
      rank1_steps.push_back(c ? *c : lost);
    };
    step(ipc::Op::kForward, 1);   // 0
    step(ipc::Op::kDiscard, 1);   // 1
    step(ipc::Op::kForward, 2);   // 2
    step(ipc::Op::kBackward, 2);  // 3
    step(ipc::Op::kDiscard, 77);  // 4: on this rank only, naming no forward
    step(ipc::Op::kForward, 3);   // 5
    step(ipc::Op::kBackward, 3);  // 6
    pending1 = pending_backwards(d1, "discarded");
  });
  {
    auto client = client::Client::connect(d0.client_socket());
    auto layer = client.ok() ? client->create_layer(group_spec("discarded", port, 0, 20000))
                             : Result<client::Layer>(client.status());
    if (!layer.ok()) {
      setup0 = layer.status();
    } else {
      std::vector<float> x(S * M, 0.3f), y(S * M), dx(S * M);
      client::ForwardInfo info;
      auto forward = [&] { rank0_steps.push_back(layer->forward(x.data(), S, y.data(), &info)); };
      auto discard = [&] { rank0_steps.push_back(layer->discard(info.sequence)); };
      auto backward = [&] { rank0_steps.push_back(layer->backward(info.sequence, y.data(), 0.f, dx.data())); };
      forward();  // 0
      const uint64_t discarded = info.sequence;
      discard();  // 1
      forward();  // 2
      backward(); // 3
      forward();  // 4 (rank 1's 5)
      backward(); // 5 (rank 1's 6)
      // The discarded forward can no longer be backwarded from this handle.
      EXPECT_EQ(layer->backward(discarded, y.data(), 0.f, dx.data()).code(), StatusCode::kInvalidArgument);
      pending0 = pending_backwards(d0, "discarded");
    }
  }
  rank1.join();
  ASSERT_TRUE(setup0.ok()) << setup0;
  ASSERT_TRUE(setup1.ok()) << setup1;
  ASSERT_EQ(rank0_steps.size(), 6u);
  ASSERT_EQ(rank1_steps.size(), 7u);
  for (size_t i = 0; i < 6; ++i) EXPECT_TRUE(rank0_steps[i].ok()) << "rank 0 step " << i << ": " << rank0_steps[i];
  for (size_t i = 0; i < 7; ++i)
    EXPECT_EQ(rank1_steps[i].status_code, 0) << "rank 1 step " << i << ": " << rank1_steps[i].message;
  EXPECT_EQ(pending0, 0);
  EXPECT_EQ(pending1, 0);

  // Periodic checkpoints leave a group layer out: each daemon's timer would write its rank at
  // another step than its peers', and a group cannot be created again from files that disagree.
  // A plain layer on the same daemon is written by a round; the group layer, as new (never
  // checkpointed, which a round writes), is not, until the exit.
  {
    auto client = client::Client::connect(d0.client_socket());
    ASSERT_TRUE(client.ok()) << client.status();
    auto plain = client->create_layer("name = \"plain\"\nexperts = 2\nmodel_dim = 16\nhidden = 8\nk = 1\ninit_seed = 3\n");
    ASSERT_TRUE(plain.ok()) << plain.status();
  }
  const std::string state = d0.dir() + "/state/default/";
  for (int i = 0; i < 100 && !std::filesystem::exists(state + "plain.safetensors"); ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(std::filesystem::exists(state + "plain.safetensors")) << d0.log();
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // a whole round more
  EXPECT_FALSE(std::filesystem::exists(state + "discarded.safetensors"));
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_TRUE(std::filesystem::exists(state + "discarded.safetensors")) << "the exit writes it";
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// The parameters a group rank saved as `name` on `d`: gate, fc1, fc1 bias, fc2, fc2 bias in
// one vector (empty when the file cannot be read).
std::vector<float> saved_parameters(const DaemonProcess& d, const std::string& name) {
  auto file = SafetensorsFile::open(d.dir() + "/state/default/checkpoints/" + name);
  if (!file.ok()) return {};
  std::vector<float> all;
  for (const char* tensor : {kGateWeightName, kFc1WeightName, kFc1BiasName, kFc2WeightName, kFc2BiasName}) {
    const std::vector<float> v = read_tensor(*file, tensor);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

// A backward for dx alone on a group layer, end to end: asked by one rank only, it is refused on
// both (InvalidArgument naming the disagreement) and consumes the forward; asked by both, it
// leaves every rank's gradients as they were, so an SGD step from zeroed gradients (kept as
// zeros, not set to none, so that the step runs) moves no parameter on either daemon, and its dx
// equals the plain backward's that follows; the plain backward's step then moves them. A step
// whose ranks pass different learning rates is refused on both, naming them; with the same
// one it runs.
TEST(ExpertParallelGroups, ABackwardForDxAloneIsTheWholeGroupsOrRefusedOnEveryRank) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 12, M = 16;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct RankOut {
    Status setup;
    std::vector<Status> steps;
    std::vector<float> dx_alone, dx_plain;
    size_t pending = 1;
  };
  RankOut out[2];
  auto rank = [&](int r, DaemonProcess& d) {
    RankOut& o = out[r];
    std::mt19937_64 rng(seed + r);
    std::normal_distribution<float> normal;
    std::vector<float> x(S * M), dy(S * M), y(S * M), dx(S * M);
    for (float& v : x) v = normal(rng);
    for (float& v : dy) v = normal(rng);
    auto client = client::Client::connect(d.client_socket());
    auto layer = client.ok() ? client->create_layer(group_spec("dx_alone", port, r, 20000))
                             : Result<client::Layer>(client.status());
    if (!layer.ok()) return void(o.setup = layer.status());
    auto note = [&](Status st) { o.steps.push_back(std::move(st)); };
    auto forward_backward = [&](client::Layer::ParamGrads grads) {
      client::ForwardInfo info;
      note(layer->forward(x.data(), S, y.data(), &info));
      note(layer->backward(info.sequence, dy.data(), 0.f, dx.data(), grads));
    };
    using client::Layer;
    if (Status zeros = layer->zero_grad(/*set_to_none=*/false); !zeros.ok()) return void(o.setup = zeros);
    note(layer->save("w0_r" + std::to_string(r)).status());                      // 0
    forward_backward(r == 0 ? Layer::ParamGrads::kKeep : Layer::ParamGrads::kAccumulate);  // 1, 2: refused
    forward_backward(Layer::ParamGrads::kKeep);                                  // 3, 4
    o.dx_alone = dx;
    note(layer->step().status());                                                // 5
    note(layer->save("w1_r" + std::to_string(r)).status());                      // 6
    forward_backward(Layer::ParamGrads::kAccumulate);                            // 7, 8
    o.dx_plain = dx;
    note(layer->step().status());                                                // 9
    note(layer->save("w2_r" + std::to_string(r)).status());                      // 10
    Layer::StepOptions own, same;
    own.lr = r == 0 ? 0.01 : 0.02;
    same.lr = 0.01;
    note(layer->step(own).status());                                             // 11: refused
    note(layer->step(same).status());                                            // 12
    o.pending = layer->pending_backwards();
  };
  std::thread rank1(rank, 1, std::ref(d1));
  rank(0, d0);
  rank1.join();
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    DaemonProcess& d = r == 0 ? d0 : d1;
    ASSERT_TRUE(out[r].setup.ok()) << out[r].setup;
    const std::vector<Status>& steps = out[r].steps;
    ASSERT_EQ(steps.size(), 13u);
    for (size_t i : {0, 1, 3, 4, 5, 6, 7, 8, 9, 10, 12})
      EXPECT_TRUE(steps[i].ok()) << "step " << i << ": " << steps[i] << "\n" << d.log();
    EXPECT_EQ(steps[11].code(), StatusCode::kInvalidArgument) << steps[11];
    EXPECT_NE(steps[11].message().find("stepped with different learning rates"), std::string_view::npos)
        << steps[11];
    EXPECT_EQ(steps[2].code(), StatusCode::kInvalidArgument) << steps[2];
    EXPECT_NE(steps[2].message().find("disagree on this backward"), std::string_view::npos) << steps[2];
    EXPECT_EQ(out[r].pending, 0u);
    EXPECT_EQ(pending_backwards(d, "dx_alone"), 0);
    EXPECT_TRUE(all_close("dx alone", out[r].dx_alone, widen(out[r].dx_plain), 1e-6, 1e-7));
    const std::string tag = "_r" + std::to_string(r);
    const std::vector<float> w0 = saved_parameters(d, "w0" + tag), w1 = saved_parameters(d, "w1" + tag),
                             w2 = saved_parameters(d, "w2" + tag);
    ASSERT_FALSE(w0.empty());
    EXPECT_EQ(w1, w0) << "a step after a backward for dx alone moved the parameters";
    EXPECT_NE(w2, w0) << "the plain backward's step moved nothing: the check above shows nothing";
  }
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A backward after a step (or a load on one rank only) runs with other parameters than its
// forward: refused on every rank (the one that loaded tells the other through the backward's
// agreement), its forward dropped on both, and the group trains on.
TEST(ExpertParallelGroups, ABackwardAfterTheParametersChangedIsRefusedOnEveryRank) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 12, M = 16;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct RankOut {
    Status setup;
    std::vector<Status> steps;
    size_t pending = 1;
  };
  RankOut out[2];
  auto rank = [&](int r, DaemonProcess& d) {
    RankOut& o = out[r];
    std::mt19937_64 rng(seed + r);
    std::normal_distribution<float> normal;
    std::vector<float> x(S * M), dy(S * M), y(S * M), dx(S * M);
    for (float& v : x) v = normal(rng);
    for (float& v : dy) v = normal(rng);
    auto client = client::Client::connect(d.client_socket());
    auto layer = client.ok() ? client->create_layer(group_spec("stale", port, r, 20000))
                             : Result<client::Layer>(client.status());
    if (!layer.ok()) return void(o.setup = layer.status());
    auto note = [&](Status st) { o.steps.push_back(std::move(st)); };
    client::ForwardInfo a, b;
    note(layer->forward(x.data(), S, y.data(), &a));                               // 0
    note(layer->forward(x.data(), S, y.data(), &b));                               // 1
    note(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()));                 // 2
    note(layer->save("stale_r" + std::to_string(r)).status());                     // 3
    note(layer->step().status());                                                  // 4
    note(layer->backward(b.sequence, dy.data(), 0.5f, dx.data()));                 // 5: refused
    note(layer->forward(x.data(), S, y.data(), &a));                               // 6
    note(r == 0 ? layer->load("stale_r0") : Status::OK());                         // 7: rank 0 only
    note(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()));                 // 8: refused
    note(r == 1 ? layer->load("stale_r1") : Status::OK());                         // 9: the steps agree again
    note(layer->forward(x.data(), S, y.data(), &a));                               // 10
    note(layer->backward(a.sequence, dy.data(), 0.5f, dx.data()));                 // 11
    note(layer->step().status());                                                  // 12
    o.pending = layer->pending_backwards();
  };
  std::thread rank1(rank, 1, std::ref(d1));
  rank(0, d0);
  rank1.join();
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    DaemonProcess& d = r == 0 ? d0 : d1;
    ASSERT_TRUE(out[r].setup.ok()) << out[r].setup;
    const std::vector<Status>& steps = out[r].steps;
    ASSERT_EQ(steps.size(), 13u);
    for (size_t i : {0, 1, 2, 3, 4, 6, 7, 9, 10, 11, 12})
      EXPECT_TRUE(steps[i].ok()) << "step " << i << ": " << steps[i] << "\n" << d.log();
    // The rank that refused says why; its peer, that a rank refused (rank 0 alone loaded at 7).
    EXPECT_EQ(steps[5].code(), StatusCode::kInvalidArgument) << steps[5];
    EXPECT_NE(steps[5].message().find("the parameters changed"), std::string_view::npos) << steps[5];
    EXPECT_NE(steps[8].message().find(r == 0 ? "the parameters changed" : "whose parameters changed there"),
              std::string_view::npos)
        << steps[8];
    EXPECT_EQ(out[r].pending, 0u);
  }
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A group layer's step leaves each rank's gradients its own share, as a local layer's leaves
// them: a second SGD step without zero_grad between (gradients that accumulate across steps)
// moves every parameter, the replicated gate too, exactly as far as the first, and the
// gradient norm is the same before and after a step. (The gate's gradient was summed over the
// group in place, so the second step moved the gate twice as far, every further one W times the
// last, and the norm after a step counted the gate's sum W times.)
TEST(ExpertParallelGroups, AStepLeavesEachRanksGradientsItsOwnShare) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 12, M = 16;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  struct RankOut {
    Status status;
    double norm_before = -1, norm_after = -2;
  };
  RankOut out[2];
  auto rank = [&](int r, DaemonProcess& d) {
    RankOut& o = out[r];
    std::mt19937_64 rng(seed + r);
    std::normal_distribution<float> normal;
    std::vector<float> x(S * M), dy(S * M), y(S * M), dx(S * M);
    for (float& v : x) v = normal(rng);
    for (float& v : dy) v = normal(rng);
    o.status = [&]() -> Status {
      TUTEL_ASSIGN_OR_RETURN(client::Client client, client::Client::connect(d.client_socket()));
      TUTEL_ASSIGN_OR_RETURN(client::Layer layer, client.create_layer(group_spec("steps", port, r, 20000)));
      const std::string tag = "_r" + std::to_string(r);
      TUTEL_RETURN_IF_ERROR(layer.save("w0" + tag).status());
      client::ForwardInfo info;
      TUTEL_RETURN_IF_ERROR(layer.forward(x.data(), S, y.data(), &info));
      TUTEL_RETURN_IF_ERROR(layer.backward(info.sequence, dy.data(), 0.5f, dx.data()));
      TUTEL_ASSIGN_OR_RETURN(o.norm_before, layer.grad_norm());
      TUTEL_RETURN_IF_ERROR(layer.step().status());
      TUTEL_RETURN_IF_ERROR(layer.save("w1" + tag).status());
      TUTEL_ASSIGN_OR_RETURN(o.norm_after, layer.grad_norm());
      TUTEL_RETURN_IF_ERROR(layer.step().status());  // no zero_grad: the same gradients again
      return layer.save("w2" + tag).status();
    }();
  };
  std::thread rank1(rank, 1, std::ref(d1));
  rank(0, d0);
  rank1.join();
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    DaemonProcess& d = r == 0 ? d0 : d1;
    ASSERT_TRUE(out[r].status.ok()) << out[r].status << "\n" << d.log();
    EXPECT_GT(out[r].norm_before, 0);
    EXPECT_NEAR(out[r].norm_after, out[r].norm_before, 1e-6 * out[r].norm_before) << "a step changed the gradients";
    const std::string tag = "_r" + std::to_string(r);
    const std::vector<float> w0 = saved_parameters(d, "w0" + tag), w1 = saved_parameters(d, "w1" + tag),
                             w2 = saved_parameters(d, "w2" + tag);
    ASSERT_EQ(w0.size(), w1.size());
    ASSERT_EQ(w0.size(), w2.size());
    ASSERT_FALSE(w0.empty());
    // SGD without momentum or weight decay: each step subtracts lr · gradient; the two gaps
    // differ by the values' f32 rounding alone (about 1e-7 against gaps up to about 1e-2).
    std::vector<float> first(w0.size()), second(w0.size());
    for (size_t i = 0; i < w0.size(); ++i) {
      first[i] = w1[i] - w0[i];
      second[i] = w2[i] - w1[i];
    }
    EXPECT_NE(first, std::vector<float>(first.size(), 0.f)) << "the first step moved nothing";
    EXPECT_TRUE(all_close("second step against the first", second, widen(first), 1e-3, 1e-3));
  }
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// Trainers out of step across daemons (rank 0 steps where rank 1 runs one more forward; then
// rank 1 asks for the gradient norm where rank 0 runs a forward; then two micro-batches
// backwarded in opposite orders) are told at once, not after the collective timeout: both
// ranks' calls are refused, naming both (the group's forwards by number), and the group goes
// on: the next forward, backward and step run on both, each rank's y equals its first
// forward's (no step ran in between), and no forward is left pending.
TEST(ExpertParallelGroups, CallsOutOfStepAcrossDaemonsAreRefusedOnBothAndTheGroupGoesOn) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  constexpr int64_t S = 12, M = 16;
  struct RankOut {
    Status setup;
    std::vector<Status> steps;
    std::vector<float> first_y, last_y;
  };
  RankOut out[2];
  auto rank = [&](int r, DaemonProcess& d) {
    RankOut& o = out[r];
    std::vector<float> x(S * M, 0.1f * static_cast<float>(r + 1)), y(S * M), dx(S * M);
    auto client = client::Client::connect(d.client_socket());
    auto layer = client.ok() ? client->create_layer(group_spec("out_of_step", port, r, 20000))
                             : Result<client::Layer>(client.status());
    if (!layer.ok()) return void(o.setup = layer.status());
    auto note = [&](Status st) { o.steps.push_back(std::move(st)); };
    client::ForwardInfo info;
    note(layer->forward(x.data(), S, y.data(), &info));                // 0
    o.first_y = y;
    note(layer->backward(info.sequence, y.data(), 0.f, dx.data()));    // 1
    if (r == 0) {
      note(layer->step().status());                                    // 2: out of step
      note(layer->forward(x.data(), S, y.data(), &info));              // 3: out of step
    } else {
      note(layer->forward(x.data(), S, y.data(), &info));              // 2: out of step
      note(layer->grad_norm().status());                               // 3: out of step
    }
    client::ForwardInfo a, b;
    note(layer->forward(x.data(), S, y.data(), &a));                   // 4: the group's forward 2
    note(layer->forward(x.data(), S, y.data(), &b));                   // 5: 3
    const uint64_t first = r == 0 ? a.sequence : b.sequence, second = r == 0 ? b.sequence : a.sequence;
    note(layer->backward(first, y.data(), 0.f, dx.data()));            // 6: out of step
    note(layer->backward(second, y.data(), 0.f, dx.data()));           // 7: out of step
    note(layer->forward(x.data(), S, y.data(), &info));                // 8
    o.last_y = y;
    note(layer->backward(info.sequence, y.data(), 0.f, dx.data()));    // 9
    note(layer->step().status());                                      // 10
  };
  std::thread rank1(rank, 1, std::ref(d1));
  rank(0, d0);
  rank1.join();
  const char* want[2][4] = {{"this rank step, another forward", "this rank forward, another grad_norm",
                             "this rank the group's forward 2, another forward 3",
                             "this rank the group's forward 3, another forward 2"},
                            {"this rank forward, another step", "this rank grad_norm, another forward",
                             "this rank the group's forward 3, another forward 2",
                             "this rank the group's forward 2, another forward 3"}};
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    DaemonProcess& d = r == 0 ? d0 : d1;
    ASSERT_TRUE(out[r].setup.ok()) << out[r].setup;
    const std::vector<Status>& steps = out[r].steps;
    ASSERT_EQ(steps.size(), 11u);
    for (size_t i : {0, 1, 4, 5, 8, 9, 10})
      EXPECT_TRUE(steps[i].ok()) << "step " << i << ": " << steps[i] << "\n" << d.log();
    const size_t refused[4] = {2, 3, 6, 7};
    for (size_t j = 0; j < 4; ++j) {
      EXPECT_EQ(steps[refused[j]].code(), StatusCode::kInvalidArgument) << steps[refused[j]];
      EXPECT_NE(steps[refused[j]].message().find(want[r][j]), std::string_view::npos) << steps[refused[j]];
    }
    EXPECT_EQ(out[r].last_y, out[r].first_y);
    EXPECT_EQ(pending_backwards(d, "out_of_step"), 0);
  }
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A whole-layer file (every expert, as a single-daemon layer or Tutel saves one) imported into a
// group layer whose optimizer keeps two states (AdamW), its one expert sharded over the two ranks
// along H: each rank takes its slice of the parameters and of both states (fc2's bias padded
// as the layer pads it), and the file's step. A file without optimizer state starts it afresh
// (zeros, step 0), and so does one with only some of it (one moment of one tensor here): the
// state is taken whole or not at all, as a load into a layer without [group] takes it.
TEST(ExpertParallelGroups, AWholeLayerFileGivesEachRankItsSliceOfTheOptimizerState) {
  DaemonProcess d(DaemonOptions{});
  ASSERT_TRUE(d.start());
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  const LayerSpec spec = small_spec(/*experts=*/1, /*k=*/1, 1.0);  // one expert, sharded along H
  const int W = 2;
  const int64_t E = spec.experts, M = spec.model_dim, H = spec.hidden, O = spec.out_dim();
  auto random_params = [&] {
    graphs::HostLayerParams p;
    for (auto [t, n] : {std::pair{&p.gate, E * M}, std::pair{&p.fc1, E * H * M}, std::pair{&p.fc1_bias, E * H},
                        std::pair{&p.fc2, E * H * O}, std::pair{&p.fc2_bias, E * O}}) {
      t->resize(static_cast<size_t>(n));
      for (float& v : *t) v = normal(rng);
    }
    return p;
  };
  const graphs::HostLayerParams values = random_params(), moment1 = random_params(), moment2 = random_params();
  auto entries = [&](const graphs::HostLayerParams& p, const std::string& prefix) {
    return std::vector<SafetensorsEntry>{{prefix + kGateWeightName, DType::kF32, {E, M}, p.gate.data()},
                                         {prefix + kFc1WeightName, DType::kF32, {E, H, M}, p.fc1.data()},
                                         {prefix + kFc1BiasName, DType::kF32, {E, H}, p.fc1_bias.data()},
                                         {prefix + kFc2WeightName, DType::kF32, {E, H, O}, p.fc2.data()},
                                         {prefix + kFc2BiasName, DType::kF32, {E, O}, p.fc2_bias.data()}};
  };
  const std::string dir = d.dir() + "/";
  std::vector<SafetensorsEntry> with_state = entries(values, "");
  for (const SafetensorsEntry& e : entries(moment1, "optimizer.state0.")) with_state.push_back(e);
  for (const SafetensorsEntry& e : entries(moment2, "optimizer.state1.")) with_state.push_back(e);
  ASSERT_TRUE(write_safetensors(dir + "with_state.safetensors", with_state, {{"tuteld.step", "5"}}).ok());
  ASSERT_TRUE(write_safetensors(dir + "weights_alone.safetensors", entries(values, "")).ok());
  std::vector<SafetensorsEntry> partial = entries(values, "");
  partial.push_back(entries(moment1, "optimizer.state0.")[1]);  // fc1's first moment alone
  ASSERT_TRUE(write_safetensors(dir + "partial.safetensors", partial, {{"tuteld.step", "3"}}).ok());
  std::vector<SafetensorsEntry> misshaped = entries(values, "");
  misshaped.push_back({std::string("optimizer.state1.") + kFc1WeightName, DType::kF32, {E, H, M - 1}, moment2.fc1.data()});
  ASSERT_TRUE(write_safetensors(dir + "misshaped.safetensors", misshaped).ok());

  const uint16_t port = free_port();
  const std::string body = "experts = 1\nmodel_dim = 16\nhidden = 32\nk = 1\ninit_seed = 9\n"
                           "[optimizer]\nkind = \"adamw\"\nlr = 0.01\n";
  std::optional<client::Client> clients[2];
  std::optional<client::Layer> layers[2];
  Status created[2];
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      auto client = client::Client::connect(d.client_socket());
      if (!client.ok()) return void(created[r] = client.status());
      auto layer = client->create_layer(group_layer_spec(body, port, W, r, /*local_size=*/2, "linear"));
      if (!layer.ok()) return void(created[r] = layer.status());
      clients[r].emplace(std::move(*client));
      layers[r].emplace(std::move(*layer));
    });
  for (auto& t : threads) t.join();
  auto import = [&](int r, const std::string& file) {
    const int fd = ::open((dir + file).c_str(), O_RDONLY | O_CLOEXEC);
    const Status st = layers[r]->import_state(fd);
    ::close(fd);
    return st;
  };
  auto state_of = [&](int r) {
    Result<client::ExportedState> state = layers[r]->export_state();
    EXPECT_TRUE(state.ok()) << state.status();
    const int fd = state.ok() ? state->dup_fd() : -1;
    Result<SafetensorsFile> file = SafetensorsFile::read(fd, "rank " + std::to_string(r), 1 << 24);
    ::close(fd);
    EXPECT_TRUE(file.ok()) << file.status();
    return std::move(file).value();
  };
  auto expect_slices = [&](int r, const SafetensorsFile& f, const graphs::HostLayerParams& want,
                           const std::string& prefix) {
    auto shard = graphs::expert_shard(spec, W, r);
    ASSERT_TRUE(shard.ok()) << shard.status();
    const graphs::HostLayerParams slice = graphs::slice_for_rank(spec, *shard, want);
    for (auto [name, v] : {std::pair{kGateWeightName, &slice.gate}, std::pair{kFc1WeightName, &slice.fc1},
                           std::pair{kFc1BiasName, &slice.fc1_bias}, std::pair{kFc2WeightName, &slice.fc2},
                           std::pair{kFc2BiasName, &slice.fc2_bias}})
      EXPECT_EQ(read_tensor(f, (prefix + name).c_str()), *v) << prefix << name;
  };
  const graphs::HostLayerParams zeros = scaled(moment1, 0.f);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(created[r].ok()) << created[r] << "\n" << d.log();
    auto shard = graphs::expert_shard(spec, W, r);
    ASSERT_TRUE(shard.ok());
    ASSERT_EQ(graphs::local_fc1_shape(spec, *shard), (Shape{1, H / 2, M})) << "the expert is not sharded";

    ASSERT_TRUE(import(r, "with_state.safetensors").ok());
    const SafetensorsFile taken = state_of(r);
    expect_slices(r, taken, values, "");
    expect_slices(r, taken, moment1, "optimizer.state0.");
    expect_slices(r, taken, moment2, "optimizer.state1.");
    EXPECT_EQ(taken.metadata().at("tuteld.step"), "5");

    const Status refused = import(r, "misshaped.safetensors");
    EXPECT_EQ(refused.code(), StatusCode::kInvalidArgument) << refused;
    EXPECT_NE(refused.message().find("optimizer.state1.experts.batched_fc1_w"), std::string_view::npos) << refused;
    const SafetensorsFile kept = state_of(r);
    expect_slices(r, kept, values, "");
    expect_slices(r, kept, moment2, "optimizer.state1.");
    EXPECT_EQ(kept.metadata().at("tuteld.step"), "5");

    ASSERT_TRUE(import(r, "partial.safetensors").ok());
    const SafetensorsFile part = state_of(r);
    expect_slices(r, part, values, "");
    expect_slices(r, part, zeros, "optimizer.state0.");
    expect_slices(r, part, zeros, "optimizer.state1.");
    EXPECT_EQ(part.metadata().at("tuteld.step"), "0");

    ASSERT_TRUE(import(r, "weights_alone.safetensors").ok());
    const SafetensorsFile fresh = state_of(r);
    expect_slices(r, fresh, values, "");
    expect_slices(r, fresh, zeros, "optimizer.state0.");
    expect_slices(r, fresh, zeros, "optimizer.state1.");
    EXPECT_EQ(fresh.metadata().at("tuteld.step"), "0");
  }
  layers[0].reset();
  layers[1].reset();
  EXPECT_EQ(d.stop(), 0) << d.log();
}

// A group step one rank's daemon refuses for its tenant's max_inflight is refused on every rank.
// Daemon 1 allows its tenant one request in flight; group H's rank 1 holds it (its forward waits
// for H's rank 0, which the test holds back); group G's forward on daemon 1 is then refused for
// the quota, and G's rank 0 is refused with it at once, not at the collective timeout. H's step
// then completes, and G's next step runs.
TEST(ExpertParallelGroups, AStepRefusedForMaxInflightOnOneDaemonIsRefusedOnEveryRank) {
  DaemonOptions one_in_flight;
  one_in_flight.default_max_inflight = 1;
  DaemonProcess d0(DaemonOptions{}), d1(one_in_flight);
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port_g = free_port(), port_h = free_port();
  std::atomic<bool> g_refused{false};
  Status h0, h1, g0_refused, g1_refused, g0_next, g1_next, setup;
  std::mutex setup_mutex;
  auto failed_setup = [&](const Status& st) {
    std::lock_guard lock(setup_mutex);
    if (setup.ok()) setup = st;
  };
  auto inflight_on_d1 = [&] { return default_tenant_of(d1)["inflight"].get<int64_t>(); };
  std::vector<float> x(8 * 16, 0.5f);
  auto run_rank = [&](DaemonProcess& d, const std::string& name, uint16_t port, int rank,
                      const std::function<void(client::Layer&)>& steps) {
    auto client = client::Client::connect(d.client_socket());
    if (!client.ok()) return failed_setup(client.status());
    auto layer = client->create_layer(group_spec(name, port, rank, 20000));
    if (!layer.ok()) return failed_setup(layer.status());
    steps(*layer);
  };
  auto forward = [&](client::Layer& layer) {
    std::vector<float> y(8 * 16);
    client::ForwardInfo info;
    return layer.infer(x.data(), 8, y.data(), &info);
  };
  // (An array, not a vector's emplace_back: GCC 12 warns of a bound inside <thread> there.)
  std::thread threads[4];
  threads[0] = std::thread([&] {  // H, rank 1: holds daemon 1's one slot until H's rank 0 comes
    run_rank(d1, "h_r1", port_h, 1, [&](client::Layer& l) { h1 = forward(l); });
  });
  threads[1] = std::thread([&] {  // H, rank 0: comes once G's step has been refused
    run_rank(d0, "h_r0", port_h, 0, [&](client::Layer& l) {
      while (!g_refused.load()) std::this_thread::sleep_for(std::chrono::milliseconds(5));
      h0 = forward(l);
    });
  });
  threads[2] = std::thread([&] {  // G, rank 1: submits while H's rank 1 holds the slot
    run_rank(d1, "g_r1", port_g, 1, [&](client::Layer& l) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
      while (inflight_on_d1() < 1 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      g1_refused = forward(l);
      g_refused = true;
      while (inflight_on_d1() != 0 && std::chrono::steady_clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      g1_next = forward(l);
    });
  });
  threads[3] = std::thread([&] {  // G, rank 0
    run_rank(d0, "g_r0", port_g, 0, [&](client::Layer& l) {
      g0_refused = forward(l);
      g0_next = forward(l);
    });
  });
  for (auto& t : threads) t.join();
  g_refused = true;
  ASSERT_TRUE(setup.ok()) << setup;
  EXPECT_EQ(g1_refused.code(), StatusCode::kResourceExhausted) << g1_refused;
  EXPECT_NE(g1_refused.message().find("quota of requests in flight"), std::string_view::npos) << g1_refused;
  EXPECT_EQ(g0_refused.code(), StatusCode::kResourceExhausted) << g0_refused;
  EXPECT_NE(g0_refused.message().find("refused its request before running it"), std::string_view::npos)
      << g0_refused;
  EXPECT_TRUE(h0.ok()) << h0;
  EXPECT_TRUE(h1.ok()) << h1;
  EXPECT_TRUE(g0_next.ok()) << g0_next;
  EXPECT_TRUE(g1_next.ok()) << g1_next;
  EXPECT_EQ(d0.stop(), 0) << d0.log();
  EXPECT_EQ(d1.stop(), 0) << d1.log();
}

// A daemon that dies turns its group's collectives into errors naming the peer within the
// collective timeout; the surviving daemon keeps serving its other layers.
TEST(ExpertParallelGroups, ADeadPeerFailsTheGroupNotTheDaemon) {
  DaemonProcess d0(DaemonOptions{}), d1(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  ASSERT_TRUE(d1.start());
  const uint16_t port = free_port();
  std::optional<client::Client> c0, c1;
  std::optional<client::Layer> l0, l1;
  std::thread peer([&] {
    auto c = client::Client::connect(d1.client_socket());
    ASSERT_TRUE(c.ok());
    c1.emplace(std::move(*c));
    auto l = c1->create_layer(group_spec("job_r1", port, 1, 2000));
    ASSERT_TRUE(l.ok()) << l.status();
    l1.emplace(std::move(*l));
  });
  auto c = client::Client::connect(d0.client_socket());
  ASSERT_TRUE(c.ok());
  c0.emplace(std::move(*c));
  auto l = c0->create_layer(group_spec("job_r0", port, 0, 2000));
  ASSERT_TRUE(l.ok()) << l.status();
  l0.emplace(std::move(*l));
  peer.join();
  ASSERT_TRUE(l1.has_value());

  d1.kill_hard();  // a crash: SIGKILL, reaped
  std::vector<float> x(8 * 16, 0.5f), y(8 * 16);
  const Status st = l0->infer(x.data(), 8, y.data());
  EXPECT_FALSE(st.ok());
  EXPECT_NE(st.message().find("rank 1"), std::string_view::npos) << st;
  // tutelctl peers and the metrics report the group as down, with the reason.
  {
    auto [code, out] = run_command(std::string(TUTELCTL_BIN) + " --socket " + d0.admin_socket() + " --json peers", false);
    EXPECT_EQ(code, 0) << out;
    EXPECT_NE(out.find("\"state\": \"down\""), std::string::npos) << out;
    EXPECT_NE(out.find("rank 1"), std::string::npos) << out;
    out = run_command(std::string(TUTELCTL_BIN) + " --socket " + d0.admin_socket() + " metrics", false).second;
    EXPECT_NE(out.find("tuteld_group_up{layer=\"default/job_r0\"} 0"), std::string::npos) << out;
  }
  // The daemon is alive and serves a layer of its own.
  auto local = c0->create_layer("name = \"solo\"\nexperts = 4\nmodel_dim = 16\nhidden = 32\nk = 2\ninit_seed = 1\n");
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_TRUE(local->infer(x.data(), 8, y.data()).ok());
  EXPECT_TRUE(d0.alive());
  l1.reset();
  c1.reset();
  EXPECT_EQ(d0.stop(), 0) << d0.log();
}

}  // namespace
}  // namespace tutel::testing

namespace tutel::testing {
namespace {

// A group whose other ranks never come: the create fails after the bootstrap timeout naming the
// missing rank, and meanwhile the daemon keeps answering (the wait runs off the event loop).
TEST(ExpertParallelGroups, AnIncompleteGroupTimesOutNamingTheMissingRankWhileTheDaemonServes) {
  DaemonProcess d0(DaemonOptions{});
  ASSERT_TRUE(d0.start());
  const uint16_t port = free_port();
  Status created;
  std::thread creator([&] {
    auto c = client::Client::connect(d0.client_socket());
    ASSERT_TRUE(c.ok());
    auto layer = c->create_layer("name = \"lonely\"\nexperts = 4\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n"
                                 "[group]\ncoordinator = \"127.0.0.1:" + std::to_string(port) +
                                 "\"\nsize = 2\nrank = 0\nbootstrap_timeout_ms = 3000\n");
    created = layer.status();
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  // While the create waits for rank 1, another client and the admin socket are served.
  auto other = client::Client::connect(d0.client_socket());
  ASSERT_TRUE(other.ok()) << other.status();
  auto solo = other->create_layer("name = \"solo\"\nexperts = 2\nmodel_dim = 8\nhidden = 8\ninit_seed = 1\n");
  EXPECT_TRUE(solo.ok()) << solo.status();
  EXPECT_TRUE(other->ping().ok());
  creator.join();
  EXPECT_FALSE(created.ok());
  EXPECT_EQ(created.code(), StatusCode::kTimeout) << created;
  EXPECT_NE(created.message().find("rank 1 never reached the coordinator"), std::string_view::npos) << created;
  EXPECT_TRUE(d0.alive());
  EXPECT_EQ(d0.stop(), 0) << d0.log();
}

}  // namespace
}  // namespace tutel::testing
