// The expert-parallel layer across W ranks (threads of this process, each with its own CPU
// backend and its own UCX communicator on loopback) against the float64 reference of one
// process holding all E experts, run on each rank's tokens with the group's capacity.
//
// For every rank: y, l_aux, capacity and dx match; each rank's expert gradients match the
// sum over ranks of the reference's (sliced to the rank's experts or H-shard); the gate
// gradient after all_reduce_gate_grad matches the sum over ranks. Tolerances as the CPU layer
// test: forward rtol 1e-4 / atol 1e-5, gradients rtol 1e-3 / atol 1e-4 (of max|ref|); l_aux
// atol 1e-5, or rtol 1e-5 past 1 (it grows with E: about 18 at E = 514, where an f32 sum of 514
// terms differs from float64 by ~5 ULPs, 1e-5, and an absolute 1e-5 failed now and then).
//
// The same checks hold with the 2DH all-to-all (ranks laid out node by node, local_size per
// node): the layer's result does not depend on the algorithm. And with several training
// forwards in flight, their backwards run in reverse order (ExpertParallelInFlight).
#include "tutel/graphs/expert_parallel.hpp"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <thread>

#include "../common/loopback.hpp"
#include "../kernels/bf16_copy_checks.hpp"
#include "../kernels/layer_test_util.hpp"
#include "expert_parallel_test_util.hpp"
#include "forwarding_communicator.hpp"
#include "tutel/comm/ucx.hpp"
#include "tutel/kernels/forwarding_backend.hpp"

namespace tutel::testing {
namespace {

double l_aux_tolerance(double want) { return 1e-5 * std::max(1.0, std::abs(want)); }

using graphs::ExpertParallelLayer;
using graphs::ExpertShard;
using graphs::HostLayerParams;

struct EpCase {
  std::string name;
  int world;
  int64_t experts, hidden;
  int k;
  double f;
  std::vector<int64_t> tokens;  // per rank
  Activation activation = Activation::kRelu;
  bool batch_prioritized = false;
  comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear;
  int local_size = 1;  // ranks per node (the 2DH all-to-all's intra-node group)
  int pipeline = 1;    // d: chunks of the expert phase
  int r = 1;           // 0: data parallel (weights gathered, tokens stay)
  int64_t output_dim = 0;  // O (0: M)
  DType matmul = DType::kF32;  // bf16: the dispatched tokens travel in bf16
};

void PrintTo(const EpCase& c, std::ostream* os) { *os << c.name; }

// Counts the all-to-alls issued from a thread other than the one that made it (the rank's): a
// pipelined layer on the CPU must exchange its chunks on its worker thread. Keeps the bytes per
// peer of each all-to-all, in the order issued.
class ExchangeThreads final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;
  using Communicator::all_to_all;
  Status all_to_all(const void* send, const comm::BlockLayout& send_layout, void* recv,
                    const comm::BlockLayout& recv_layout, comm::AllToAllAlgo algo) override {
    if (std::this_thread::get_id() != owner_) ++elsewhere_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      chunk_bytes_.push_back(send_layout.block_bytes());
      pieces_.push_back(send_layout.pieces);
    }
    return inner_.all_to_all(send, send_layout, recv, recv_layout, algo);
  }
  int elsewhere() const { return elsewhere_.load(); }
  std::vector<size_t> chunk_bytes() const {
    std::lock_guard<std::mutex> lock(mu_);
    return chunk_bytes_;
  }
  std::vector<size_t> pieces() const {
    std::lock_guard<std::mutex> lock(mu_);
    return pieces_;
  }

 private:
  const std::thread::id owner_ = std::this_thread::get_id();
  std::atomic<int> elsewhere_{0};
  mutable std::mutex mu_;
  std::vector<size_t> chunk_bytes_;
  std::vector<size_t> pieces_;  // of each all-to-all's blocks
};

// Keeps, for every inference's expert_forward (keep_hidden false), which experts it was told are
// in use (ExpertForwardArgs::expert_count > 0); an empty list where it was told nothing.
class InUseRecorder final : public ForwardingBackend {
 public:
  explicit InUseRecorder(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  Status expert_forward(const ExpertForwardArgs& a) override {
    if (!a.keep_hidden) {
      std::vector<bool> in_use;
      const int32_t* count = a.expert_count.empty() ? nullptr : a.expert_count.data_as<int32_t>();
      for (int64_t e = 0; count && e < a.expert_count.dim(0); ++e) in_use.push_back(count[e] > 0);
      calls_.push_back(std::move(in_use));
    }
    return ForwardingBackend::expert_forward(a);
  }
  const std::vector<std::vector<bool>>& calls() const { return calls_; }

 private:
  std::vector<std::vector<bool>> calls_;
};

EpCase two_dh(int local_size, EpCase c) {
  c.algo = comm::AllToAllAlgo::k2DH;
  c.local_size = local_size;
  return c;
}

EpCase pipelined(int d, EpCase c) {
  c.pipeline = d;
  return c;
}

EpCase data_parallel(EpCase c) {
  c.r = 0;
  return c;
}

// r >= 1 where s = W / E ranks share each expert: r of them split its H (r = s: each its own
// slice over all of the expert's slots; r < s: groups of s / r gather their slices and split
// the slots). The cases above run r = 1 (each group gathers the whole expert).
EpCase parallelism(int r, EpCase c) {
  c.r = r;
  return c;
}

EpCase output_dim(int64_t O, EpCase c) {
  c.output_dim = O;
  return c;
}

// bf16 matmuls, so bf16 dispatched tokens on the wire. ReLU becomes GELU, as in the CPU layer's
// bf16 test: bf16 moves pre-activations by ~1e-2, and relu's kink would flip derivatives.
EpCase bf16_matmuls(EpCase c) {
  c.matmul = DType::kBF16;
  if (c.activation == Activation::kRelu) c.activation = Activation::kGelu;
  return c;
}

std::vector<EpCase> cases() {
  return {
      {"OneRank", 1, 4, 32, 2, 1.0, {40}},
      {"TwoRanksTwoExpertsEach", 2, 4, 32, 2, 1.0, {40, 40}},
      // One expert per rank: the exchange lands where the experts read (no reordering pass).
      {"FourRanksOneExpertEachUnequal", 4, 4, 32, 2, 1.0, {31, 40, 22, 37}, Activation::kGelu},
      {"TwoRanksDroplessUnequalTokens", 2, 4, 32, 1, 0.0, {37, 50}},
      {"FourRanksCappedDropless", 4, 8, 32, 2, -0.8, {20, 33, 41, 28}},
      {"FourRanksTwoExpertsShardedInTwo", 4, 2, 48, 2, 1.0, {30, 30, 30, 30}},
      {"FourRanksOneExpertShardedInFour", 4, 1, 64, 1, 0.0, {10, 20, 30, 40}},
      {"TwoRanksGeluBatchPrioritizedOverflow", 2, 4, 32, 2, 0.5, {48, 30}, Activation::kGelu, true},
      {"TwoRanksShardedSiluUnequal", 2, 1, 32, 1, 1.0, {25, 41}, Activation::kSilu},
      // 2DH: two nodes of two ranks, four nodes of two, two nodes of four; one node (where 2DH
      // is the linear exchange).
      two_dh(2, {"TwoDhFourRanksTwoNodesTwoExpertsEach", 4, 8, 32, 2, 1.0, {30, 41, 25, 36}}),
      two_dh(2,
             {"TwoDhFourRanksTwoNodesShardedDroplessUnequal", 4, 2, 48, 1, 0.0, {22, 35, 17, 40}}),
      two_dh(2, {"TwoDhEightRanksFourNodesShardedCappedDropless",
                 8,
                 4,
                 32,
                 2,
                 -0.8,
                 {18, 27, 33, 12, 40, 21, 29, 25},
                 Activation::kGelu}),
      two_dh(4, {"TwoDhEightRanksTwoNodesOneExpertEachOverflow",
                 8,
                 8,
                 32,
                 2,
                 0.5,
                 {26, 34, 19, 30, 41, 23, 28, 36},
                 Activation::kSilu,
                 true}),
      two_dh(2, {"TwoDhTwoRanksOneNode", 2, 4, 32, 2, 1.0, {33, 27}}),
      // Pipelined (d chunks of the capacity, uneven where d does not divide it; exchanged on the
      // layer's worker thread beside the GEMMs): the same results as d = 1.
      pipelined(2, {"PipelinedTwoRanksTwoExpertsEach", 2, 4, 32, 2, 1.0, {40, 40}}),
      pipelined(3, {"PipelinedThreeChunksTwoRanksOneExpertEach", 2, 2, 32, 1, 0.0, {35, 26}}),
      pipelined(3, {"PipelinedThreeChunksFourRanksCappedDroplessGelu",
                    4,
                    8,
                    32,
                    2,
                    -0.8,
                    {20, 33, 41, 28},
                    Activation::kGelu}),
      pipelined(4,
                {"PipelinedFourRanksOneExpertShardedInFour", 4, 1, 64, 1, 0.0, {10, 20, 30, 40}}),
      pipelined(2, two_dh(2, {"PipelinedTwoDhFourRanksShardedSilu",
                              4,
                              2,
                              48,
                              1,
                              0.0,
                              {22, 35, 17, 40},
                              Activation::kSilu})),
      // O != M with sharded experts: the fc2 bias's column slices are uneven (O = 15 over s = 2)
      // or partly padding (O = 6 over s = 4), under r = 1, pipelined, and r = 0.
      output_dim(15, {"OutputDim15FourRanksTwoExpertsShardedInTwo", 4, 2, 48, 2, 1.0, {30, 30, 30, 30}}),
      pipelined(2, output_dim(6, {"PipelinedOutputDim6FourRanksOneExpertShardedInFour",
                                  4, 1, 64, 1, 0.0, {10, 20, 30, 40}})),
      data_parallel(output_dim(6, {"DataParallelOutputDim6FourRanksOneExpertShardedInFour",
                                   4, 1, 64, 1, 0.0, {10, 20, 30, 40}})),
      // More chunks than the capacity holds slots: one slot per chunk.
      pipelined(64, {"PipelinedMoreChunksThanSlots", 2, 4, 32, 1, 1.0, {9, 7}}),
      // r = 0: every expert's weights gathered on every rank, the gradients reduce-scattered
      // back into the ranks' slices (also of experts sharded along H, and their fc2 bias).
      data_parallel({"DataParallelTwoRanksTwoExpertsEach", 2, 4, 32, 2, 1.0, {40, 31}}),
      data_parallel({"DataParallelFourRanksCappedDroplessGelu",
                     4,
                     8,
                     32,
                     2,
                     -0.8,
                     {20, 33, 41, 28},
                     Activation::kGelu}),
      data_parallel({"DataParallelFourRanksOneExpertShardedInFourSilu",
                     4,
                     1,
                     64,
                     1,
                     0.0,
                     {10, 20, 30, 40},
                     Activation::kSilu}),
      // bf16 matmuls: the dispatch travels as bf16 rows (half the bytes), the combine in f32;
      // whole experts, H-shards, pipelined chunks (staged through the send buffer), 2DH, r = 0.
      bf16_matmuls({"Bf16TwoRanksTwoExpertsEach", 2, 4, 32, 2, 1.0, {40, 31}}),
      bf16_matmuls(pipelined(2, {"Bf16PipelinedTwoRanksOneExpertEach", 2, 2, 32, 2, 1.0, {29, 40}})),
      bf16_matmuls({"Bf16FourRanksOneExpertShardedInFour", 4, 1, 64, 1, 0.0, {10, 20, 30, 40}}),
      bf16_matmuls(pipelined(3, {"Bf16PipelinedThreeChunksFourRanksCappedDropless",
                                 4, 8, 32, 2, -0.8, {20, 33, 41, 28}})),
      bf16_matmuls(two_dh(2, {"Bf16TwoDhFourRanksTwoNodesShardedSilu",
                              4, 2, 48, 1, 0.0, {22, 35, 17, 40}, Activation::kSilu})),
      bf16_matmuls(data_parallel({"Bf16DataParallelTwoRanksTwoExpertsEach",
                                  2, 4, 32, 2, 1.0, {40, 31}})),
      // r = s (expert + model parallel: every shard computes its H-slice over all of its expert's
      // slots, the partial sums added on the way back) and 1 < r < s (groups of s / r gather).
      parallelism(2, {"ModelParallelFourRanksTwoExpertsShardedInTwo", 4, 2, 48, 2, 1.0, {30, 30, 30, 30}}),
      parallelism(4, {"ModelParallelFourRanksOneExpertShardedInFour", 4, 1, 64, 1, 0.0, {10, 20, 30, 40}}),
      parallelism(2, {"TwoPartsFourRanksOneExpertShardedInFour", 4, 1, 64, 1, 0.0, {10, 20, 30, 40}}),
      parallelism(2, output_dim(6, {"TwoPartsOutputDim6FourRanksOneExpertShardedInFour",
                                    4, 1, 64, 1, 1.0, {19, 33, 26, 30}, Activation::kGelu})),
      parallelism(2, output_dim(15, {"ModelParallelOutputDim15FourRanksTwoExpertsShardedInTwo",
                                     4, 2, 48, 2, 1.0, {30, 30, 30, 30}})),
      parallelism(2, pipelined(3, {"TwoPartsPipelinedThreeChunksFourRanksShardedInFour",
                                   4, 1, 64, 1, -0.8, {20, 33, 41, 28}, Activation::kSilu})),
      parallelism(2, two_dh(2, {"ModelParallelTwoDhFourRanksTwoNodesSharded",
                                4, 2, 48, 1, 0.0, {22, 35, 17, 40}})),
      parallelism(2, two_dh(2, {"TwoPartsTwoDhEightRanksTwoNodesShardedInFour",
                                8, 2, 64, 2, 1.0, {18, 27, 33, 12, 40, 21, 29, 25}})),
      bf16_matmuls(parallelism(2, {"Bf16TwoPartsFourRanksOneExpertShardedInFour",
                                   4, 1, 64, 1, 0.0, {10, 20, 30, 40}})),
      bf16_matmuls(parallelism(2, pipelined(2, {"Bf16ModelParallelPipelinedTwoRanksSharded",
                                                2, 1, 32, 1, 1.0, {25, 41}}))),
      // Ranks with an empty batch (S = 0) run their part of every collective for their peers'
      // tokens: y and dx without rows, l_aux 0, nothing added to any gradient. Under every
      // way of exchanging, and a group where no rank has a token (capacity 0).
      {"TwoRanksOneWithoutTokens", 2, 4, 32, 2, 1.0, {40, 0}},
      {"FourRanksTwoWithoutTokensCappedDroplessGelu", 4, 8, 32, 2, -0.8, {0, 33, 0, 28},
       Activation::kGelu},
      {"FourRanksOneExpertShardedInFourOneWithoutTokens", 4, 1, 64, 1, 0.0, {10, 0, 30, 40}},
      data_parallel({"DataParallelTwoRanksOneWithoutTokens", 2, 4, 32, 2, 1.0, {0, 31}}),
      data_parallel({"DataParallelFourRanksShardedOneWithoutTokens", 4, 1, 64, 1, 0.0, {10, 20, 0, 40}}),
      pipelined(3, {"PipelinedThreeChunksTwoRanksOneWithoutTokens", 2, 2, 32, 1, 0.0, {0, 26}}),
      two_dh(2, {"TwoDhFourRanksTwoNodesOneWithoutTokens", 4, 8, 32, 2, 1.0, {30, 0, 25, 36}}),
      bf16_matmuls({"Bf16TwoRanksOneWithoutTokens", 2, 4, 32, 2, 1.0, {40, 0}}),
      parallelism(2, {"ModelParallelFourRanksShardedTwoWithoutTokens", 4, 2, 48, 2, 1.0, {0, 30, 30, 0}}),
      parallelism(2, {"TwoPartsFourRanksShardedInFourOneWithoutTokens", 4, 1, 64, 1, 0.0, {10, 20, 0, 40}}),
      {"TwoRanksWithoutTokens", 2, 4, 32, 2, 1.0, {0, 0}},
      data_parallel({"DataParallelTwoRanksWithoutTokens", 2, 4, 32, 2, 1.0, {0, 0}}),
      // Decode-sized steps: a few tokens among many experts, so that an inference leaves out the
      // experts no rank routed a token to (whole experts, chunks, r = 0, H-shards, bf16).
      {"FewTokensSixteenExpertsTwoRanks", 2, 16, 32, 1, 1.0, {3, 2}},
      pipelined(2, {"PipelinedFewTokensSixteenExpertsTwoRanks", 2, 16, 32, 2, 1.0, {2, 3}}),
      data_parallel({"DataParallelFewTokensSixteenExpertsTwoRanks", 2, 16, 32, 1, 1.0, {3, 1}}),
      // One token among sharded experts: the other expert is always left out (r = 1, r = s and
      // 1 < r < s).
      {"OneTokenFourRanksTwoExpertsShardedInTwo", 4, 2, 48, 1, 1.0, {1, 0, 0, 0}},
      parallelism(2, {"ModelParallelOneTokenFourRanksTwoExpertsShardedInTwo", 4, 2, 48, 1, 1.0, {0, 1, 0, 0}}),
      parallelism(2, {"TwoPartsOneTokenEightRanksTwoExpertsShardedInFour", 8, 2, 64, 1, 1.0,
                      {0, 0, 0, 0, 0, 1, 0, 0}}),
      bf16_matmuls(two_dh(2, {"Bf16TwoDhFewTokensSixteenExpertsFourRanks", 4, 16, 32, 1, 0.0, {1, 2, 0, 1}})),
      // Many experts, few in use (the decode of a fine-grained layer).
      {"FewTokensSixtySixExpertsTwoRanks", 2, 66, 16, 1, 1.0, {3, 2}},
      // More experts than the forward's agreement carries counts for: r >= 1 computes every
      // expert (no flags), r = 0 still skips on the rank's own counts.
      {"FewTokensFiveHundredFourteenExpertsTwoRanks", 2, 514, 16, 1, 1.0, {3, 2}},
      data_parallel({"DataParallelFewTokensFiveHundredFourteenExpertsTwoRanks", 2, 514, 16, 1, 1.0, {3, 2}}),
  };
}

class ExpertParallel : public ::testing::TestWithParam<EpCase> {};

std::vector<float> sum_over_ranks(const std::vector<std::vector<double>>& per_rank) {
  std::vector<float> out(per_rank[0].size(), 0.f);
  for (size_t i = 0; i < out.size(); ++i) {
    double s = 0;
    for (const auto& r : per_rank) s += r[i];
    out[i] = static_cast<float>(s);
  }
  return out;
}

std::vector<double> widen(const std::vector<float>& v) {
  return std::vector<double>(v.begin(), v.end());
}

TEST_P(ExpertParallel, EveryRankMatchesTheSingleProcessLayer) {
  const EpCase& c = GetParam();
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);

  LayerSpec spec;
  spec.experts = c.experts;
  spec.model_dim = 16;
  spec.hidden = c.hidden;
  spec.k = c.k;
  spec.capacity_factor = c.f;
  spec.activation = c.activation;
  spec.batch_prioritized = c.batch_prioritized;
  spec.output_dim = c.output_dim;
  spec.matmul_dtype = c.matmul;
  const int W = c.world;
  const int64_t M = spec.model_dim, O = spec.out_dim(), E = spec.experts;
  auto shard0 = graphs::expert_shard(spec, W, 0);
  ASSERT_TRUE(shard0.ok()) << shard0.status();

  // Inputs without near-ties, and the group's capacity, from the reference.
  ref::Params whole;
  std::vector<std::vector<double>> xs(W), dys(W);
  std::vector<ref::Forward> first(W);
  int64_t capacity = 0;
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 100) << "could not draw inputs without near-ties";
    whole = random_params(rng, spec);
    bool ties = false;
    int64_t max_tokens = 0, max_count = 0;
    for (int r = 0; r < W; ++r) {
      const int64_t S = c.tokens[r];
      xs[r] = round_f32(randn(rng, S * M, 1.0));
      dys[r] = round_f32(randn(rng, S * O, 1.0));
      ref::Config cfg = to_ref(spec, S);
      first[r] = ref::forward(cfg, whole, xs[r], nullptr);
      ties |= first[r].min_order_margin < 1e-6 ||
              (c.batch_prioritized && first[r].min_priority_margin < 1e-6) ||
              (c.activation == Activation::kRelu && first[r].min_abs_pre < 1e-6);
      std::vector<int64_t> counts(E, 0);
      for (int64_t i : first[r].idx) ++counts[i];
      max_tokens = std::max(max_tokens, S);
      max_count = std::max(max_count, *std::max_element(counts.begin(), counts.end()));
    }
    LayerSpec aligned = spec;
    aligned.alignment = shard0->shards;
    capacity = layer_capacity(aligned, max_tokens, max_count);
    if (!ties) break;
  }
  const float dl_aux = 0.3f;
  std::vector<ref::Forward> want(W);
  std::vector<ref::Grads> want_grads(W);
  for (int r = 0; r < W; ++r) {
    ref::Config cfg = to_ref(spec, c.tokens[r]);
    cfg.capacity_override = capacity;
    want[r] = ref::forward(cfg, whole, xs[r], nullptr);
    want_grads[r] = ref::backward(cfg, whole, xs[r], nullptr, dys[r], dl_aux);
  }
  const HostLayerParams whole_host{to_f32(whole.wg), to_f32(whole.fc1_w), to_f32(whole.fc1_b),
                                   to_f32(whole.fc2_w), to_f32(whole.fc2_b)};

  struct RankResult {
    Status status;
    ExpertShard shard;
    RoutingStats stats;
    std::vector<float> y, dx, d_wg, d_fc1, d_b1, d_fc2, d_b2;
    int exchanges_elsewhere = -1;  // all-to-alls not issued by the rank's own thread
    std::vector<size_t> exchange_bytes;  // bytes per peer of each all-to-all, in order
    std::vector<size_t> exchange_pieces;  // pieces per block of each all-to-all, in order
    std::vector<float> y_infer;  // an inference of the same tokens
    RoutingStats stats_infer;
    std::vector<std::vector<bool>> in_use_calls;  // InUseRecorder's
  };
  std::vector<RankResult> results(W);
  const uint16_t port = free_port();
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankResult& out = results[r];
      auto fail = [&](Status st) { out.status = std::move(st); };
      auto ucx = comm::ucx_bootstrap(rank_options(port, r, W, c.local_size));
      if (!ucx.ok()) return fail(ucx.status());
      ExchangeThreads comm(**ucx);
      auto cpu = make_backend("cpu", {.threads = 1});
      if (!cpu.ok()) return fail(cpu.status());
      InUseRecorder b(std::move(cpu).value());
      graphs::ExpertParallelOptions options;
      options.algo = c.algo;
      options.pipeline = c.pipeline;
      options.r = c.r;
      auto layer = ExpertParallelLayer::create(b, comm, spec, options);
      if (!layer.ok()) return fail(layer.status());
      if (layer->all_to_all_algo() != c.algo || layer->pipeline() != c.pipeline ||
          layer->parallelism() != c.r || !layer->overlaps_chunks())
        return fail(Status::Internal("the layer runs another configuration than it was given"));
      out.shard = layer->shard();
      HostLayerParams local = graphs::slice_for_rank(spec, out.shard, whole_host);
      HostLayerParams grads{
          std::vector<float>(local.gate.size()), std::vector<float>(local.fc1.size()),
          std::vector<float>(local.fc1_bias.size()), std::vector<float>(local.fc2.size()),
          std::vector<float>(local.fc2_bias.size())};
      auto weights_of = [&](HostLayerParams& p) {
        LayerWeights w;
        w.gate_weight = TensorView(p.gate.data(), DType::kF32, {E, M});
        w.experts.fc1_weight =
            TensorView(p.fc1.data(), DType::kF32, graphs::local_fc1_shape(spec, out.shard));
        w.experts.fc1_bias = TensorView(p.fc1_bias.data(), DType::kF32,
                                        graphs::local_fc1_bias_shape(spec, out.shard));
        w.experts.fc2_weight =
            TensorView(p.fc2.data(), DType::kF32, graphs::local_fc2_shape(spec, out.shard));
        w.experts.fc2_bias = TensorView(p.fc2_bias.data(), DType::kF32,
                                        graphs::local_fc2_bias_shape(spec, out.shard));
        return w;
      };
      const int64_t S = c.tokens[r];
      std::vector<float> x = to_f32(xs[r]), dy = to_f32(dys[r]);
      out.y.resize(S * O);
      out.dx.resize(S * M);
      ExpertParallelLayer::Saved saved;
      Status st = layer->forward(weights_of(local), TensorView(x.data(), DType::kF32, {S, M}),
                                 TensorView(out.y.data(), DType::kF32, {S, O}), &out.stats, &saved);
      if (st.ok())
        st = layer->backward(weights_of(local), TensorView(dy.data(), DType::kF32, {S, O}), dl_aux,
                             TensorView(out.dx.data(), DType::kF32, {S, M}), weights_of(grads),
                             saved);
      if (st.ok())
        st = layer->all_reduce_gate_grad(TensorView(grads.gate.data(), DType::kF32, {E, M}));
      // An inference of the same tokens (with the parameters as they were: nothing stepped).
      out.y_infer.resize(S * O);
      if (st.ok())
        st = layer->forward(weights_of(local), TensorView(x.data(), DType::kF32, {S, M}),
                            TensorView(out.y_infer.data(), DType::kF32, {S, O}), &out.stats_infer, nullptr);
      if (!st.ok()) return fail(st);
      out.in_use_calls = b.calls();
      out.d_wg = grads.gate;
      out.d_fc1 = grads.fc1;
      out.d_b1 = grads.fc1_bias;
      out.d_fc2 = grads.fc2;
      out.d_b2 = grads.fc2_bias;
      out.exchanges_elsewhere = comm.elsewhere();
      out.exchange_bytes = comm.chunk_bytes();
      out.exchange_pieces = comm.pieces();
    });
  }
  for (auto& t : threads) t.join();

  // The whole layer's gradients summed over ranks, sliced like each rank's parameters.
  std::vector<std::vector<double>> per_rank_wg, per_rank_fc1, per_rank_b1, per_rank_fc2,
      per_rank_b2;
  for (int r = 0; r < W; ++r) {
    per_rank_wg.push_back(want_grads[r].d_wg);
    per_rank_fc1.push_back(want_grads[r].d_fc1_w);
    per_rank_b1.push_back(want_grads[r].d_fc1_b);
    per_rank_fc2.push_back(want_grads[r].d_fc2_w);
    per_rank_b2.push_back(want_grads[r].d_fc2_b);
  }
  const HostLayerParams grad_sum{sum_over_ranks(per_rank_wg), sum_over_ranks(per_rank_fc1),
                                 sum_over_ranks(per_rank_b1), sum_over_ranks(per_rank_fc2),
                                 sum_over_ranks(per_rank_b2)};
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const RankResult& got = results[r];
    ASSERT_TRUE(got.status.ok()) << got.status;
    // Pipelined chunks are exchanged on the layer's worker thread (the CPU backend overlaps
    // them with the GEMMs); everything else on the rank's own.
    // (Each chunk is cut in units of the s / r ranks that split an expert's slots.)
    if (c.pipeline > 1 && c.r >= 1 && capacity / (shard0->shards / std::max(c.r, 1)) > 1) {
      EXPECT_GT(got.exchanges_elsewhere, 0);
    } else {
      EXPECT_EQ(got.exchanges_elsewhere, 0);
    }
    EXPECT_EQ(got.stats.capacity, capacity);
    EXPECT_EQ(got.stats.dropped, want[r].dropped);
    EXPECT_NEAR(got.stats.l_aux, want[r].l_aux, l_aux_tolerance(want[r].l_aux));
    // The forward's first all-to-all is the dispatch (of the whole capacity when d = 1): each
    // peer gets E_l experts' rows (with s > 1 one expert's share of C / (s / r) slots) in the
    // dispatch dtype.
    if (c.r >= 1 && c.pipeline == 1) {
      ASSERT_FALSE(got.exchange_bytes.empty());
      const int64_t experts_per_peer = got.shard.shards == 1 ? got.shard.local_experts : 1;
      const int64_t slots_per_peer = capacity / (got.shard.shards / c.r);
      EXPECT_EQ(got.exchange_bytes[0], static_cast<size_t>(experts_per_peer * slots_per_peer * M) *
                                           dtype_size(spec.dispatch_dtype()));
    }
    // Whole experts travel as a piece per local expert, straight into the experts' [E_l][W·C]
    // (no staging and reordering pass); sharded ones as one piece through the staging.
    if (c.r >= 1) {
      ASSERT_FALSE(got.exchange_pieces.empty());
      const size_t want_pieces = got.shard.shards == 1 ? size_t(got.shard.local_experts) : 1;
      for (size_t pieces : got.exchange_pieces) EXPECT_EQ(pieces, want_pieces);
    }
    // bf16 matmuls round every GEMM input: the CPU layer's bf16 tolerances.
    const bool bf16 = c.matmul == DType::kBF16;
    const double y_rtol = bf16 ? 3e-2 : 1e-4, y_atol = bf16 ? 3e-2 : 1e-5,
                 g_rtol = bf16 ? 3e-2 : 1e-3, g_atol = bf16 ? 3e-2 : 1e-4;
    EXPECT_TRUE(all_close("y", got.y, want[r].y, y_rtol, y_atol));
    // The inference gives the training forward's y, computing only the experts in use: with
    // r >= 1 the rank's own experts that some rank routed a token to (the group's agreed counts),
    // with r = 0 every expert that one of this rank's tokens was routed to.
    EXPECT_TRUE(all_close("inference y", got.y_infer, want[r].y, y_rtol, y_atol));
    EXPECT_EQ(got.stats_infer.capacity, capacity);
    EXPECT_EQ(got.stats_infer.dropped, want[r].dropped);
    EXPECT_NEAR(got.stats_infer.l_aux, want[r].l_aux, l_aux_tolerance(want[r].l_aux));
    std::vector<bool> in_use;
    if (c.r == 0) {
      in_use.assign(E, false);
      for (int64_t e : first[r].idx) in_use[e] = true;
    } else if (E > ExpertParallelLayer::kMaxAgreedCounts) {
      // No counts agreed: every expert_forward is told nothing (an empty list).
    } else {
      for (int64_t l = 0; l < got.shard.local_experts; ++l) {
        bool routed = false;
        for (int q = 0; q < W; ++q)
          for (int64_t e : first[q].idx) routed |= e == got.shard.first_expert + l;
        in_use.push_back(routed);
      }
    }
    for (const std::vector<bool>& call : got.in_use_calls) EXPECT_EQ(call, in_use);
    if (capacity > 0 && (c.r >= 1 || c.tokens[r] > 0)) {
      EXPECT_FALSE(got.in_use_calls.empty());
    }
    EXPECT_TRUE(all_close("dx", got.dx, want_grads[r].dx, g_rtol, g_atol));
    EXPECT_TRUE(all_close("d_wg (all-reduced)", got.d_wg, widen(grad_sum.gate), g_rtol, g_atol));
    const HostLayerParams want_local = graphs::slice_for_rank(spec, got.shard, grad_sum);
    EXPECT_TRUE(all_close("d_fc1_w", got.d_fc1, widen(want_local.fc1), g_rtol, g_atol));
    EXPECT_TRUE(all_close("d_fc1_b", got.d_b1, widen(want_local.fc1_bias), g_rtol, g_atol));
    EXPECT_TRUE(all_close("d_fc2_w", got.d_fc2, widen(want_local.fc2), g_rtol, g_atol));
    // Padding columns of a sharded fc2 bias (O not divisible by s) have no gradient.
    EXPECT_TRUE(all_close("d_fc2_b", got.d_b2, widen(want_local.fc2_bias), g_rtol, g_atol));
  }
}

INSTANTIATE_TEST_SUITE_P(Groups, ExpertParallel, ::testing::ValuesIn(cases()),
                         [](const ::testing::TestParamInfo<EpCase>& info) {
                           return info.param.name;
                         });

// Pipelined micro-batches: every rank runs three training forwards (different inputs; token
// counts unequal across ranks and across micro-batches, so each forward agrees on its own
// capacity), then an inference forward (which must not disturb what the training forwards
// saved), then the three backwards in reverse order. Each micro-batch's y, l_aux, capacity,
// dropped count and dx match the reference run with that micro-batch's capacity; the gradients
// accumulated over the micro-batches match the reference's summed over ranks and micro-batches.
// The round runs three times on the same Saved objects: round 0 gives micro-batch m saved[m],
// rounds 1 and 2 saved[(m + 1) % 3] (a Saved that held a larger batch now holds a smaller one,
// and the reverse); round 2 allocates nothing (every Saved's bytes() as after round 1), and the
// gradients add up to three times the sum. Tolerances as above.
struct InFlightCase {
  std::string name;
  int world;
  int64_t experts, hidden;
  int k;
  double f;
  std::vector<std::vector<int64_t>> tokens;  // [micro-batch][rank]
  Activation activation = Activation::kRelu;
  comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear;
  int local_size = 1;
  int pipeline = 1;
  // Tuned instead (no warm-up, one trial): the forwards of a bucket run the candidates in turn,
  // each backward the way its forward ran, and every rank decides the same.
  std::vector<graphs::ExchangeConfig> tune;
  int r = 1;
};
void PrintTo(const InFlightCase& c, std::ostream* os) { *os << c.name; }

std::vector<InFlightCase> in_flight_cases() {
  return {
      {"TwoRanksTwoExpertsEach", 2, 4, 32, 2, 1.0, {{40, 31}, {17, 52}, {29, 23}}},
      {"TwoRanksDroplessGelu", 2, 4, 32, 1, 0.0, {{37, 50}, {12, 20}, {44, 9}}, Activation::kGelu},
      {"FourRanksShardedInTwoOverflowSilu",
       4,
       2,
       48,
       2,
       0.5,
       {{30, 22, 35, 18}, {12, 40, 25, 31}, {26, 14, 19, 38}},
       Activation::kSilu},
      {"FourRanksOneExpertShardedInFourDropless",
       4,
       1,
       64,
       1,
       0.0,
       {{10, 20, 30, 40}, {33, 8, 21, 15}, {18, 27, 6, 24}}},
      {"TwoDhFourRanksTwoNodesCappedDropless",
       4,
       8,
       32,
       2,
       -0.8,
       {{30, 41, 25, 36}, {22, 15, 38, 19}, {27, 33, 12, 29}},
       Activation::kRelu,
       comm::AllToAllAlgo::k2DH,
       2},
      {"PipelinedThreeChunksTwoRanksGelu",
       2,
       4,
       32,
       2,
       1.0,
       {{40, 31}, {17, 52}, {29, 23}},
       Activation::kGelu,
       comm::AllToAllAlgo::kLinear,
       1,
       3},
      {"TunedTwoRanksPipelineDegrees",
       2,
       4,
       32,
       1,
       0.0,
       {{37, 50}, {12, 20}, {44, 9}},
       Activation::kRelu,
       comm::AllToAllAlgo::kLinear,
       1,
       1,
       {{comm::AllToAllAlgo::kLinear, 1},
        {comm::AllToAllAlgo::kLinear, 2},
        {comm::AllToAllAlgo::kLinear, 3}}},
      {"TunedTwoDhFourRanksTwoNodesShardedSilu",
       4,
       2,
       48,
       2,
       0.5,
       {{30, 22, 35, 18}, {12, 40, 25, 31}, {26, 14, 19, 38}},
       Activation::kSilu,
       comm::AllToAllAlgo::kLinear,
       2,
       1,
       {graphs::kDataParallel,
        {comm::AllToAllAlgo::k2DH, 1},
        {comm::AllToAllAlgo::k2DH, 2},
        {comm::AllToAllAlgo::kLinear, 4}}},
      {"DataParallelFourRanksShardedInTwoOverflowSilu",
       4,
       2,
       48,
       2,
       0.5,
       {{30, 22, 35, 18}, {12, 40, 25, 31}, {26, 14, 19, 38}},
       Activation::kSilu,
       comm::AllToAllAlgo::kLinear,
       1,
       1,
       {},
       0},
      // Every parallelism of one expert sharded in four, tuned: micro-batches in flight ran
      // different r (each backward the way its forward ran, through its own gather group).
      {"TunedEveryParallelismFourRanksShardedInFourGelu",
       4,
       1,
       64,
       1,
       0.0,
       {{10, 20, 30, 40}, {33, 8, 21, 15}, {18, 27, 6, 24}},
       Activation::kGelu,
       comm::AllToAllAlgo::kLinear,
       1,
       1,
       {graphs::kDataParallel,
        {comm::AllToAllAlgo::kLinear, 1, 1},
        {comm::AllToAllAlgo::kLinear, 2, 2},
        {comm::AllToAllAlgo::kLinear, 1, 4}}},
      {"ModelParallelFourRanksShardedInTwoOverflowSilu",
       4,
       2,
       48,
       2,
       0.5,
       {{30, 22, 35, 18}, {12, 40, 25, 31}, {26, 14, 19, 38}},
       Activation::kSilu,
       comm::AllToAllAlgo::kLinear,
       1,
       1,
       {},
       2},
  };
}

class ExpertParallelInFlight : public ::testing::TestWithParam<InFlightCase> {};

TEST_P(ExpertParallelInFlight, BackwardsInReverseOrderMatchTheReference) {
  const InFlightCase& c = GetParam();
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr int kMicroBatches = 3, kRounds = 3;
  ASSERT_EQ(static_cast<int>(c.tokens.size()), kMicroBatches);

  LayerSpec spec;
  spec.experts = c.experts;
  spec.model_dim = 16;
  spec.hidden = c.hidden;
  spec.k = c.k;
  spec.capacity_factor = c.f;
  spec.activation = c.activation;
  const int W = c.world;
  const int64_t M = spec.model_dim, O = spec.out_dim(), E = spec.experts;
  auto shard0 = graphs::expert_shard(spec, W, 0);
  ASSERT_TRUE(shard0.ok()) << shard0.status();
  LayerSpec aligned = spec;
  aligned.alignment = shard0->shards;

  // [micro-batch][rank]: inputs away from near-ties, each micro-batch's group capacity, and the
  // reference run with it.
  ref::Params whole;
  std::vector<std::vector<std::vector<double>>> xs(kMicroBatches), dys(kMicroBatches);
  std::vector<std::vector<ref::Forward>> want(kMicroBatches);
  std::vector<int64_t> capacity(kMicroBatches);
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 100) << "could not draw inputs without near-ties";
    whole = random_params(rng, spec);
    bool ties = false;
    for (int m = 0; m < kMicroBatches; ++m) {
      ASSERT_EQ(static_cast<int>(c.tokens[m].size()), W);
      xs[m].assign(W, {});
      dys[m].assign(W, {});
      int64_t max_tokens = 0, max_count = 0;
      for (int r = 0; r < W; ++r) {
        const int64_t S = c.tokens[m][r];
        xs[m][r] = round_f32(randn(rng, S * M, 1.0));
        dys[m][r] = round_f32(randn(rng, S * O, 1.0));
        const ref::Forward f = ref::forward(to_ref(spec, S), whole, xs[m][r], nullptr);
        std::vector<int64_t> counts(E, 0);
        for (int64_t i : f.idx) ++counts[i];
        max_tokens = std::max(max_tokens, S);
        max_count = std::max(max_count, *std::max_element(counts.begin(), counts.end()));
      }
      capacity[m] = layer_capacity(aligned, max_tokens, max_count);
      want[m].assign(W, {});
      for (int r = 0; r < W; ++r) {
        ref::Config cfg = to_ref(spec, c.tokens[m][r]);
        cfg.capacity_override = capacity[m];
        want[m][r] = ref::forward(cfg, whole, xs[m][r], nullptr);
        ties |= want[m][r].min_order_margin < 1e-6 ||
                (c.activation == Activation::kRelu && want[m][r].min_abs_pre < 1e-6);
      }
    }
    if (!ties) break;
  }
  const float dl_aux[kMicroBatches] = {0.3f, -0.2f, 0.15f};
  std::vector<std::vector<ref::Grads>> want_grads(kMicroBatches, std::vector<ref::Grads>(W));
  for (int m = 0; m < kMicroBatches; ++m)
    for (int r = 0; r < W; ++r) {
      ref::Config cfg = to_ref(spec, c.tokens[m][r]);
      cfg.capacity_override = capacity[m];
      want_grads[m][r] = ref::backward(cfg, whole, xs[m][r], nullptr, dys[m][r], dl_aux[m]);
    }
  const HostLayerParams whole_host{to_f32(whole.wg), to_f32(whole.fc1_w), to_f32(whole.fc1_b),
                                   to_f32(whole.fc2_w), to_f32(whole.fc2_b)};

  struct RankResult {
    Status status;
    ExpertShard shard;
    // [round][micro-batch]
    std::vector<std::vector<RoutingStats>> stats;
    std::vector<std::vector<std::vector<float>>> y, dx;
    std::vector<std::vector<float>> y_infer;       // [round]: micro-batch 0's input, inference
    std::vector<std::vector<size_t>> saved_bytes;  // [round][saved]
    Status reused_backward;                        // backward of a consumed Saved
    std::vector<float> d_wg, d_fc1, d_b1, d_fc2, d_b2;
    std::vector<graphs::TunerEntry> tuner;  // when tuned: the dictionary at the end
  };
  std::vector<RankResult> results(W);
  const uint16_t port = free_port();
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankResult& out = results[r];
      auto fail = [&](Status st) { out.status = std::move(st); };
      auto comm = comm::ucx_bootstrap(rank_options(port, r, W, c.local_size));
      if (!comm.ok()) return fail(comm.status());
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return fail(backend.status());
      graphs::ExpertParallelOptions options;
      options.algo = c.algo;
      options.pipeline = c.pipeline;
      options.tune.candidates = c.tune;
      options.r = c.r;
      options.tune.warmups = 0;
      options.tune.trials = 1;
      auto layer = ExpertParallelLayer::create(**backend, **comm, spec, options);
      if (!layer.ok()) return fail(layer.status());
      if ((layer->tuner() != nullptr) != !c.tune.empty())
        return fail(Status::Internal("tuning is not as asked"));
      out.shard = layer->shard();
      HostLayerParams local = graphs::slice_for_rank(spec, out.shard, whole_host);
      HostLayerParams grads{
          std::vector<float>(local.gate.size()), std::vector<float>(local.fc1.size()),
          std::vector<float>(local.fc1_bias.size()), std::vector<float>(local.fc2.size()),
          std::vector<float>(local.fc2_bias.size())};
      auto weights_of = [&](HostLayerParams& p) {
        LayerWeights w;
        w.gate_weight = TensorView(p.gate.data(), DType::kF32, {E, M});
        w.experts.fc1_weight =
            TensorView(p.fc1.data(), DType::kF32, graphs::local_fc1_shape(spec, out.shard));
        w.experts.fc1_bias = TensorView(p.fc1_bias.data(), DType::kF32,
                                        graphs::local_fc1_bias_shape(spec, out.shard));
        w.experts.fc2_weight =
            TensorView(p.fc2.data(), DType::kF32, graphs::local_fc2_shape(spec, out.shard));
        w.experts.fc2_bias = TensorView(p.fc2_bias.data(), DType::kF32,
                                        graphs::local_fc2_bias_shape(spec, out.shard));
        return w;
      };
      std::vector<ExpertParallelLayer::Saved> saved(kMicroBatches);
      out.stats.assign(kRounds, std::vector<RoutingStats>(kMicroBatches));
      out.y.assign(kRounds, std::vector<std::vector<float>>(kMicroBatches));
      out.dx.assign(kRounds, std::vector<std::vector<float>>(kMicroBatches));
      out.y_infer.assign(kRounds, {});
      out.saved_bytes.assign(kRounds, std::vector<size_t>(kMicroBatches));
      for (int round = 0; round < kRounds; ++round) {
        auto saved_of = [&](int m) -> ExpertParallelLayer::Saved& {
          return saved[round == 0 ? m : (m + 1) % kMicroBatches];
        };
        for (int m = 0; m < kMicroBatches; ++m) {
          const int64_t S = c.tokens[m][r];
          // A fresh copy each time, overwritten after the forward: backward must use its own.
          std::vector<float> x = to_f32(xs[m][r]);
          std::vector<float>& y = out.y[round][m];
          y.resize(S * O);
          Status st = layer->forward(weights_of(local), TensorView(x.data(), DType::kF32, {S, M}),
                                     TensorView(y.data(), DType::kF32, {S, O}),
                                     &out.stats[round][m], &saved_of(m));
          if (!st.ok()) return fail(st);
          std::fill(x.begin(), x.end(), 1e3f);
          if (!saved_of(m).holds_forward() || saved_of(m).tokens() != S)
            return fail(Status::Internal("a training forward left no state for its backward"));
        }
        {
          const int64_t S = c.tokens[0][r];
          std::vector<float> x = to_f32(xs[0][r]);
          out.y_infer[round].resize(S * O);
          Status st =
              layer->forward(weights_of(local), TensorView(x.data(), DType::kF32, {S, M}),
                             TensorView(out.y_infer[round].data(), DType::kF32, {S, O}), nullptr);
          if (!st.ok()) return fail(st);
        }
        for (int m = kMicroBatches - 1; m >= 0; --m) {
          const int64_t S = c.tokens[m][r];
          std::vector<float> dy = to_f32(dys[m][r]);
          std::vector<float>& dx = out.dx[round][m];
          dx.resize(S * M);
          Status st = layer->backward(weights_of(local), TensorView(dy.data(), DType::kF32, {S, O}),
                                      dl_aux[m], TensorView(dx.data(), DType::kF32, {S, M}),
                                      weights_of(grads), saved_of(m));
          if (!st.ok()) return fail(st);
          if (saved_of(m).holds_forward())
            return fail(Status::Internal("backward did not consume its saved state"));
        }
        for (int i = 0; i < kMicroBatches; ++i) out.saved_bytes[round][i] = saved[i].bytes();
        if (round == 0) {
          // Refused before any collective, so every rank may try it.
          const int64_t S = c.tokens[0][r];
          std::vector<float> dy(S * O), dx(S * M);
          out.reused_backward = layer->backward(
              weights_of(local), TensorView(dy.data(), DType::kF32, {S, O}), 0.f,
              TensorView(dx.data(), DType::kF32, {S, M}), weights_of(grads), saved[0]);
        }
      }
      Status st = layer->all_reduce_gate_grad(TensorView(grads.gate.data(), DType::kF32, {E, M}));
      if (!st.ok()) return fail(st);
      out.d_wg = grads.gate;
      out.d_fc1 = grads.fc1;
      out.d_b1 = grads.fc1_bias;
      out.d_fc2 = grads.fc2;
      out.d_b2 = grads.fc2_bias;
      if (layer->tuner()) out.tuner = layer->tuner()->entries();
    });
  }
  for (auto& t : threads) t.join();

  if (!c.tune.empty()) {
    // Every rank holds the same dictionary: the same buckets, measured as far, decided alike
    // from the same agreed totals. Micro-batch 0's bucket ran twice per round (its training and
    // its inference forward), enough for every candidate's one trial.
    ASSERT_TRUE(results[0].status.ok()) << results[0].status;
    const auto& first = results[0].tuner;
    ASSERT_FALSE(first.empty());
    bool any_decided = false;
    for (const graphs::TunerEntry& e : first) {
      any_decided |= e.decided;
      // A decided bucket ran and timed every candidate.
      for (int64_t ns : e.total_ns) EXPECT_GT(ns, 0) << e.capacity_bucket;
    }
    EXPECT_TRUE(any_decided);
    for (int r = 1; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_EQ(results[r].tuner.size(), first.size());
      for (size_t i = 0; i < first.size(); ++i) {
        const graphs::TunerEntry &a = first[i], &b = results[r].tuner[i];
        EXPECT_EQ(a.capacity_bucket, b.capacity_bucket);
        EXPECT_EQ(a.decided, b.decided);
        EXPECT_EQ(a.rounds_done, b.rounds_done);
        EXPECT_EQ(a.total_ns, b.total_ns);
        if (a.decided) {
          EXPECT_EQ(a.chosen, b.chosen) << a.chosen.to_string();
        }
      }
    }
  }

  // The whole layer's gradients summed over ranks and micro-batches, times the rounds.
  auto summed = [&](auto member) {
    std::vector<double> sum((want_grads[0][0].*member).size(), 0.0);
    for (int m = 0; m < kMicroBatches; ++m)
      for (int r = 0; r < W; ++r)
        for (size_t i = 0; i < sum.size(); ++i) sum[i] += (want_grads[m][r].*member)[i];
    std::vector<float> out(sum.size());
    for (size_t i = 0; i < sum.size(); ++i) out[i] = static_cast<float>(kRounds * sum[i]);
    return out;
  };
  const HostLayerParams grad_sum{summed(&ref::Grads::d_wg), summed(&ref::Grads::d_fc1_w),
                                 summed(&ref::Grads::d_fc1_b), summed(&ref::Grads::d_fc2_w),
                                 summed(&ref::Grads::d_fc2_b)};
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const RankResult& got = results[r];
    ASSERT_TRUE(got.status.ok()) << got.status;
    for (int round = 0; round < kRounds; ++round) {
      for (int m = 0; m < kMicroBatches; ++m) {
        SCOPED_TRACE("round " + std::to_string(round) + ", micro-batch " + std::to_string(m));
        EXPECT_EQ(got.stats[round][m].capacity, capacity[m]);
        EXPECT_EQ(got.stats[round][m].dropped, want[m][r].dropped);
        EXPECT_NEAR(got.stats[round][m].l_aux, want[m][r].l_aux, l_aux_tolerance(want[m][r].l_aux));
        EXPECT_TRUE(all_close("y", got.y[round][m], want[m][r].y, 1e-4, 1e-5));
        EXPECT_TRUE(all_close("dx", got.dx[round][m], want_grads[m][r].dx, 1e-3, 1e-4));
      }
      EXPECT_TRUE(all_close("inference y", got.y_infer[round], want[0][r].y, 1e-4, 1e-5));
    }
    EXPECT_EQ(got.saved_bytes[2], got.saved_bytes[1]) << "round 2 grew a Saved";
    EXPECT_EQ(got.reused_backward.code(), StatusCode::kInvalidArgument) << got.reused_backward;
    EXPECT_TRUE(all_close("d_wg (all-reduced)", got.d_wg, widen(grad_sum.gate), 1e-3, 1e-4));
    const HostLayerParams want_local = graphs::slice_for_rank(spec, got.shard, grad_sum);
    EXPECT_TRUE(all_close("d_fc1_w", got.d_fc1, widen(want_local.fc1), 1e-3, 1e-4));
    EXPECT_TRUE(all_close("d_fc1_b", got.d_b1, widen(want_local.fc1_bias), 1e-3, 1e-4));
    EXPECT_TRUE(all_close("d_fc2_w", got.d_fc2, widen(want_local.fc2), 1e-3, 1e-4));
    EXPECT_TRUE(all_close("d_fc2_b", got.d_b2, widen(want_local.fc2_bias), 1e-3, 1e-4));
  }
}

INSTANTIATE_TEST_SUITE_P(Groups, ExpertParallelInFlight, ::testing::ValuesIn(in_flight_cases()),
                         [](const ::testing::TestParamInfo<InFlightCase>& info) {
                           return info.param.name;
                         });

// 2DH needs whole nodes: three ranks in nodes of two are refused on every rank, with a message
// naming both numbers; the linear all-to-all on the same communicators is accepted.
TEST(ExpertParallelAllToAll, TwoDhRefusedWhenLocalSizeDoesNotDivideTheGroup) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  LayerSpec spec;
  spec.experts = 3;
  spec.model_dim = 8;
  spec.hidden = 8;
  spec.k = 1;
  constexpr int W = 3;
  const uint16_t port = free_port();
  std::vector<Status> bootstrapped(W), two_dh(W), linear(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      auto comm = comm::ucx_bootstrap(rank_options(port, r, W, /*local_size=*/2));
      bootstrapped[r] = comm.status();
      if (!comm.ok()) return;
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return void(bootstrapped[r] = backend.status());
      two_dh[r] =
          ExpertParallelLayer::create(**backend, **comm, spec, comm::AllToAllAlgo::k2DH).status();
      linear[r] = ExpertParallelLayer::create(**backend, **comm, spec, comm::AllToAllAlgo::kLinear)
                      .status();
      // Every rank is done with the communicator before any destroys it.
      Status st = (*comm)->barrier();
      if (!st.ok()) bootstrapped[r] = st;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(bootstrapped[r].ok()) << bootstrapped[r];
    EXPECT_EQ(two_dh[r].code(), StatusCode::kInvalidArgument) << two_dh[r];
    EXPECT_NE(two_dh[r].message().find("local_size (2) to divide its size (3)"),
              std::string_view::npos)
        << two_dh[r];
    EXPECT_TRUE(linear[r].ok()) << linear[r];
  }
}

// Pipeline degrees outside [1, 64] and a 2DH candidate the group cannot run are refused, each
// naming the value; one candidate is what runs (no tuner); two or more make a tuner.
TEST(ExpertParallelOptionsCheck, RefusesWhatCannotRunAndRunsASingleCandidate) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  LayerSpec spec;
  spec.experts = 3;
  spec.model_dim = 8;
  spec.hidden = 8;
  spec.k = 1;
  constexpr int W = 3;
  const uint16_t port = free_port();
  struct Out {
    Status bootstrapped;
    std::vector<Status> refused;
    int single_pipeline = 0;
    bool single_tuned = true, pair_tuned = false;
  };
  std::vector<Out> out(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      auto comm = comm::ucx_bootstrap(rank_options(port, r, W, /*local_size=*/2));
      out[r].bootstrapped = comm.status();
      if (!comm.ok()) return;
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return void(out[r].bootstrapped = backend.status());
      for (int d : {0, -2, graphs::kMaxPipeline + 1}) {
        graphs::ExpertParallelOptions o;
        o.pipeline = d;
        out[r].refused.push_back(ExpertParallelLayer::create(**backend, **comm, spec, o).status());
      }
      graphs::ExpertParallelOptions bad_candidate;
      bad_candidate.tune.candidates = {{comm::AllToAllAlgo::kLinear, 2},
                                       {comm::AllToAllAlgo::k2DH, 1}};
      out[r].refused.push_back(
          ExpertParallelLayer::create(**backend, **comm, spec, bad_candidate).status());
      graphs::ExpertParallelOptions single;
      single.pipeline = 1;
      single.tune.candidates = {{comm::AllToAllAlgo::kLinear, 5}};
      auto one = ExpertParallelLayer::create(**backend, **comm, spec, single);
      if (one.ok()) {
        out[r].single_pipeline = one->pipeline();
        out[r].single_tuned = one->tuner() != nullptr;
      }
      graphs::ExpertParallelOptions pair;
      pair.tune.candidates = {{comm::AllToAllAlgo::kLinear, 1}, {comm::AllToAllAlgo::kLinear, 2}};
      auto two = ExpertParallelLayer::create(**backend, **comm, spec, pair);
      out[r].pair_tuned = two.ok() && two->tuner() != nullptr;
      Status st = (*comm)->barrier();
      if (!st.ok()) out[r].bootstrapped = st;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(out[r].bootstrapped.ok()) << out[r].bootstrapped;
    ASSERT_EQ(out[r].refused.size(), 4u);
    for (size_t i = 0; i < 3; ++i) {
      EXPECT_EQ(out[r].refused[i].code(), StatusCode::kInvalidArgument) << out[r].refused[i];
      EXPECT_NE(out[r].refused[i].message().find("is outside [1, 64]"), std::string_view::npos)
          << out[r].refused[i];
    }
    EXPECT_NE(out[r].refused[3].message().find("local_size (2) to divide its size (3)"),
              std::string_view::npos)
        << out[r].refused[3];
    EXPECT_EQ(out[r].single_pipeline, 5);
    EXPECT_FALSE(out[r].single_tuned);
    EXPECT_TRUE(out[r].pair_tuned);
  }
}

// A communicator whose split() fails on one rank after the collective part (its new group could
// not start there), as NCCL's may when the child's CUDA set-up fails on one device.
class SplitFailsOnOneRank final : public ForwardingCommunicator {
 public:
  SplitFailsOnOneRank(comm::Communicator& inner, int failing_rank)
      : ForwardingCommunicator(inner), failing_rank_(failing_rank) {}
  Result<std::unique_ptr<comm::Communicator>> split(int color, int key) override {
    auto made = inner_.split(color, key);
    if (rank() == failing_rank_) return Status::Internal("simulated: the new group did not start");
    return made;
  }

 private:
  int failing_rank_;
};

// Gather groups are split after the ranks have compared their layers: a rank whose split failed
// alone still joins the rest, and every rank refuses the layer (none keeps one whose steps would
// wait for the missing rank); the communicator stays usable.
TEST(ExpertParallelOptionsCheck, AGatherGroupThatFailsOnOneRankIsRefusedByEveryRank) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  LayerSpec spec;
  spec.experts = 1;  // one expert sharded over both ranks: r = 1 gathers it in a group of two
  spec.model_dim = 8;
  spec.hidden = 8;
  spec.k = 1;
  constexpr int W = 2;
  const uint16_t port = free_port();
  std::vector<Status> bootstrapped(W), created(W), after(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      auto ucx = comm::ucx_bootstrap(rank_options(port, r, W, 1));
      bootstrapped[r] = ucx.status();
      if (!ucx.ok()) return;
      SplitFailsOnOneRank comm(**ucx, /*failing_rank=*/1);
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return void(bootstrapped[r] = backend.status());
      created[r] = ExpertParallelLayer::create(**backend, comm, spec, graphs::ExpertParallelOptions{})
                       .status();
      after[r] = (*ucx)->barrier();
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(bootstrapped[r].ok()) << bootstrapped[r];
    EXPECT_FALSE(created[r].ok());
    EXPECT_TRUE(after[r].ok()) << after[r];
  }
  EXPECT_NE(created[1].message().find("the new group did not start"), std::string_view::npos)
      << created[1];
  EXPECT_EQ(created[0].code(), StatusCode::kUnavailable) << created[0];
  EXPECT_NE(created[0].message().find("could not make its gather groups"), std::string_view::npos)
      << created[0];
}

// Views of a rank's slice of the parameters (host memory: the CPU backend's), for its layer.
LayerWeights host_weights(const LayerSpec& spec, const ExpertShard& shard, graphs::HostLayerParams& local) {
  LayerWeights w;
  w.gate_weight = TensorView(local.gate.data(), DType::kF32, {spec.experts, spec.model_dim});
  w.experts.fc1_weight = TensorView(local.fc1.data(), DType::kF32, graphs::local_fc1_shape(spec, shard));
  w.experts.fc1_bias = TensorView(local.fc1_bias.data(), DType::kF32, graphs::local_fc1_bias_shape(spec, shard));
  w.experts.fc2_weight = TensorView(local.fc2.data(), DType::kF32, graphs::local_fc2_shape(spec, shard));
  w.experts.fc2_bias = TensorView(local.fc2_bias.data(), DType::kF32, graphs::local_fc2_bias_shape(spec, shard));
  return w;
}

// A group of W ranks (threads, UCX on loopback) whose backends `wrap` may replace, each running
// `body` with its layer (created with options_of(rank)) and a training forward of `x` through its
// slice of `whole`. Returns what each rank's set-up came to: the creation's status, or the
// bootstrap's where that failed.
using WrapBackend = std::function<std::unique_ptr<Backend>(int rank, std::unique_ptr<Backend> cpu)>;
using FailureBody = std::function<void(int rank, ExpertParallelLayer& layer, const std::function<Status()>& forward)>;
using OptionsOf = std::function<graphs::ExpertParallelOptions(int rank)>;
std::vector<Status> run_failure_ranks(int W, const LayerSpec& spec, const OptionsOf& options_of,
                                      const WrapBackend& wrap, const FailureBody& body) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const int64_t S = 16, M = spec.model_dim, O = spec.out_dim();
  const uint64_t seed = std::random_device{}();
  std::mt19937_64 rng(seed);
  const graphs::HostLayerParams whole = to_host(random_params(rng, spec));
  const std::vector<float> x = to_f32(randn(rng, S * M, 1.0));
  const uint16_t port = free_port();
  std::vector<Status> setup(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      auto ucx = comm::ucx_bootstrap(rank_options(port, r, W, 1));
      if (!ucx.ok()) return void(setup[r] = ucx.status());
      auto cpu = make_backend("cpu", {.threads = 1});
      if (!cpu.ok()) return void(setup[r] = cpu.status());
      std::unique_ptr<Backend> backend = wrap(r, std::move(*cpu));
      auto layer = ExpertParallelLayer::create(*backend, **ucx, spec, options_of(r));
      if (!layer.ok()) return void(setup[r] = layer.status());
      const ExpertShard shard = layer->shard();
      graphs::HostLayerParams local = graphs::slice_for_rank(spec, shard, whole);
      const LayerWeights w = host_weights(spec, shard, local);
      std::vector<float> xr = x, y(S * O);
      body(r, *layer, [&] {
        ExpertParallelLayer::Saved saved;
        return layer->forward(w, TensorView(xr.data(), DType::kF32, {S, M}), TensorView(y.data(), DType::kF32, {S, O}),
                              nullptr, &saved);
      });
    });
  for (auto& t : threads) t.join();
  return setup;
}

std::vector<Status> run_failure_ranks(int W, const LayerSpec& spec, const graphs::ExpertParallelOptions& options,
                                      const WrapBackend& wrap, const FailureBody& body) {
  return run_failure_ranks(W, spec, [&](int) { return options; }, wrap, body);
}

LayerSpec small_failure_spec(int64_t experts, DType matmul = DType::kF32) {
  LayerSpec spec;
  spec.experts = experts;
  spec.model_dim = 16;
  spec.hidden = 16;
  spec.k = 1;
  spec.matmul_dtype = matmul;
  return spec;
}

// A communicator whose rank states `value` as the next forward's agreed value `index` (0: its
// token count, 1: its fullest expert's) instead of its own: another build's, or a hostile
// member's. (Only a value above every rank's own gets through the MAX.)
class StatesOnce final : public ForwardingCommunicator {
 public:
  StatesOnce(comm::Communicator& inner, size_t index, int64_t value)
      : ForwardingCommunicator(inner), index_(index), value_(value) {}
  using ForwardingCommunicator::all_reduce;
  Status all_reduce(int64_t* data, size_t n, comm::ReduceOp op) override {
    // [tag, -tag, values...], the forward's tag 1 (Agreement::kForward).
    if (value_ != 0 && n == ExpertParallelLayer::agreement_width(small_failure_spec(2)) && data[0] == 1)
      data[2 + index_] = std::exchange(value_, 0);
    return inner_.all_reduce(data, n, op);
  }

 private:
  size_t index_;
  int64_t value_;
};

// What the ranks agree on sizes their buffers, so it is checked first: a rank that states 2^62
// or 2^31 tokens, or more in one expert than any rank has tokens, makes every rank refuse the
// step with InvalidArgument, and the group's next forward runs. (Every rank wrote its tokens
// past a 64-byte buffer: the buffer sizes wrapped.)
TEST(ExpertParallelFailures, AnAgreedTokenCountOutOfRangeIsRefusedByEveryRank) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const LayerSpec spec = small_failure_spec(2);
  constexpr int W = 2;
  const int64_t S = 8, M = spec.model_dim, O = spec.out_dim();
  std::mt19937_64 rng(std::random_device{}());
  const graphs::HostLayerParams whole = to_host(random_params(rng, spec));
  const std::vector<float> x = to_f32(randn(rng, S * M, 1.0));
  for (const auto& [index, stated] : {std::pair<size_t, int64_t>{0, int64_t{1} << 62}, {0, int64_t{1} << 31},
                                      {1, int64_t{1} << 40}}) {
    SCOPED_TRACE("stated " + std::to_string(stated) + " as value " + std::to_string(index));
    const uint16_t port = free_port();
    std::vector<Status> setup(W), lied(W), next(W);
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r)
      threads.emplace_back([&, r] {
        auto ucx = comm::ucx_bootstrap(rank_options(port, r, W, 1));
        if (!ucx.ok()) return void(setup[r] = ucx.status());
        StatesOnce comm(**ucx, index, r == 1 ? stated : 0);
        auto backend = make_backend("cpu", {.threads = 1});
        if (!backend.ok()) return void(setup[r] = backend.status());
        auto layer = ExpertParallelLayer::create(**backend, comm, spec, graphs::ExpertParallelOptions{});
        if (!layer.ok()) return void(setup[r] = layer.status());
        const ExpertShard shard = layer->shard();
        graphs::HostLayerParams local = graphs::slice_for_rank(spec, shard, whole);
        const LayerWeights w = host_weights(spec, shard, local);
        std::vector<float> xr = x, y(S * O);
        auto forward = [&] {
          return layer->forward(w, TensorView(xr.data(), DType::kF32, {S, M}), TensorView(y.data(), DType::kF32, {S, O}),
                                nullptr, nullptr);
        };
        lied[r] = forward();
        next[r] = forward();
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_TRUE(setup[r].ok()) << setup[r];
      EXPECT_EQ(lied[r].code(), StatusCode::kInvalidArgument) << lied[r];
      EXPECT_NE(lied[r].message().find("out of range"), std::string_view::npos) << lied[r];
      EXPECT_TRUE(next[r].ok()) << next[r];
    }
  }
}

// A rank whose expert kernel fails once: its own work failing between a phase's collectives.
class ExpertForwardFailsOnce final : public ForwardingBackend {
 public:
  explicit ExpertForwardFailsOnce(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  Status expert_forward(const ExpertForwardArgs& a) override {
    if (fail_.exchange(false)) return Status::Internal("simulated: the expert kernel failed");
    return ForwardingBackend::expert_forward(a);
  }

 private:
  std::atomic<bool> fail_{true};
};

// Rank 1's kernel fails between the dispatch and the combine: rank 0 waits in the combine for
// rank 1's rows, which will never come. Rank 1 gives the group's communicator up and tells rank
// 0, whose step fails at once saying so; both refuse every later step. (Before, rank 1 went on
// to its next step, whose first agreement paired with rank 0's combine: a size mismatch, or
// where the sizes agreed, rank 1's agreement taken for expert outputs.)
// Two ranks, rank 1's backend made by `fails_once` over its CPU backend: its first forward
// fails with Internal `rank1_says`; rank 0's fails at once saying rank 1 gave the group up; the
// second forward is refused on both (the communicator failed earlier).
void expect_rank1_gives_the_group_up(const std::function<std::unique_ptr<Backend>(std::unique_ptr<Backend>)>& fails_once,
                                     std::string_view rank1_says) {
  constexpr int W = 2;
  graphs::ExpertParallelOptions options;
  options.pipeline = 1;
  std::vector<Status> first(W), second(W);
  const std::vector<Status> setup = run_failure_ranks(
      W, small_failure_spec(2), options,
      [&](int r, std::unique_ptr<Backend> cpu) { return r == 1 ? fails_once(std::move(cpu)) : std::move(cpu); },
      [&](int r, ExpertParallelLayer&, const std::function<Status()>& forward) {
        first[r] = forward();
        second[r] = forward();
      });
  for (int r = 0; r < W; ++r) ASSERT_TRUE(setup[r].ok()) << "rank " << r << ": " << setup[r];
  EXPECT_EQ(first[1].code(), StatusCode::kInternal) << first[1];
  EXPECT_NE(first[1].message().find(rank1_says), std::string_view::npos) << first[1];
  ASSERT_FALSE(first[0].ok());
  EXPECT_NE(first[0].message().find("gave up on its step: rank 1's own work failed between collectives"), std::string_view::npos) << first[0];
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(second[r].code(), StatusCode::kAborted) << second[r];
    EXPECT_NE(second[r].message().find("failed earlier"), std::string_view::npos) << second[r];
  }
}

TEST(ExpertParallelFailures, AKernelThatFailsMidPhaseTakesTheGroupOutOfStepAndSaysSo) {
  expect_rank1_gives_the_group_up(
      [](std::unique_ptr<Backend> cpu) { return std::make_unique<ExpertForwardFailsOnce>(std::move(cpu)); },
      "simulated: the expert kernel failed");
}

// A rank that makes an agreement but cannot read its result back (the copy to the host fails
// once): it gives the group up, rather than go on a forward behind its peers (which counted the
// forward it did not), and its peer's step fails at once saying so; both refuse every later step.
class AgreementReadBackFailsOnce final : public ForwardingBackend {
 public:
  explicit AgreementReadBackFailsOnce(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  Status copy(void* dst, const void* src, size_t bytes, CopyKind kind) override {
    if (kind == CopyKind::kDeviceToHost &&
        bytes == ExpertParallelLayer::agreement_width(small_failure_spec(2)) * sizeof(int64_t) &&
        fail_.exchange(false))
      return Status::Internal("simulated: the agreement's result could not be read");
    return ForwardingBackend::copy(dst, src, bytes, kind);
  }

 private:
  std::atomic<bool> fail_{true};
};

TEST(ExpertParallelFailures, ARankThatCannotReadAnAgreementGivesTheGroupUp) {
  expect_rank1_gives_the_group_up(
      [](std::unique_ptr<Backend> cpu) { return std::make_unique<AgreementReadBackFailsOnce>(std::move(cpu)); },
      "simulated: the agreement's result could not be read");
}

// A backend that cannot allocate buffers of exactly `bytes` (one small buffer of the creation).
class RefusesAllocationsOf final : public ForwardingBackend {
 public:
  RefusesAllocationsOf(std::unique_ptr<Backend> inner, size_t bytes) : ForwardingBackend(std::move(inner)), bytes_(bytes) {}
  Result<DeviceBuffer> allocate(size_t bytes) override {
    if (bytes == bytes_) return Status::ResourceExhausted("simulated: no memory for " + std::to_string(bytes) + " bytes");
    return ForwardingBackend::allocate(bytes);
  }

 private:
  size_t bytes_;
};

// A rank that cannot stage its layer's fingerprint cannot join the creation's all-gather: it
// gives the communicator up, and its peers' creation fails at once, saying so, instead of
// waiting out the collective timeout.
TEST(ExpertParallelFailures, ARankThatCannotStageItsFingerprintFailsTheCreationEverywhereAtOnce) {
  constexpr int W = 2;
  const std::vector<Status> created = run_failure_ranks(
      W, small_failure_spec(2), graphs::ExpertParallelOptions{},
      [](int r, std::unique_ptr<Backend> cpu) -> std::unique_ptr<Backend> {
        // The fingerprint's buffer: W ranks' 8 words, and this rank's 8.
        if (r == 1) return std::make_unique<RefusesAllocationsOf>(std::move(cpu), (8 * W + 8) * sizeof(uint64_t));
        return cpu;
      },
      [](int, ExpertParallelLayer&, const std::function<Status()>&) {});
  EXPECT_EQ(created[1].code(), StatusCode::kResourceExhausted) << created[1];
  EXPECT_NE(created[1].message().find("staging this rank's layer fingerprint"), std::string_view::npos) << created[1];
  ASSERT_FALSE(created[0].ok());
  EXPECT_NE(created[0].message().find("gave up on its step: rank 1's own work failed between collectives"), std::string_view::npos)
      << created[0];
}

// A backend whose first expert workspace (the allocation right after the layer asked for its
// size) fails: a rank briefly at its memory limit when the capacity grows.
class FirstWorkspaceFails final : public ForwardingBackend {
 public:
  explicit FirstWorkspaceFails(std::unique_ptr<Backend> inner) : ForwardingBackend(std::move(inner)) {}
  size_t expert_workspace_bytes(const ExpertShape& shape, DType matmul_dtype) const override {
    const size_t bytes = ForwardingBackend::expert_workspace_bytes(shape, matmul_dtype);
    if (!failed_ && bytes > 0) armed_ = bytes;
    return bytes;
  }
  Result<DeviceBuffer> allocate(size_t bytes) override {
    if (!failed_ && armed_ != 0 && bytes == armed_) {
      failed_ = true;
      return Status::ResourceExhausted("simulated: no memory for the expert workspace");
    }
    return ForwardingBackend::allocate(bytes);
  }

 private:
  mutable size_t armed_ = 0;
  bool failed_ = false;
};

// With whole experts every parallelism needs the same workspace (E_l·W·C rows = E·C): a rank that
// cannot allocate it refuses the step, but the tuner drops no candidate for it (it once dropped
// r = 1 for good, leaving the bucket to r = 0).
TEST(ExpertParallelFailures, AWorkspaceEveryParallelismNeedsDropsNoTuningCandidate) {
  constexpr int W = 2;
  graphs::ExpertParallelOptions options;
  options.tune.candidates = {{comm::AllToAllAlgo::kLinear, 1, 1}, graphs::kDataParallel};
  options.tune.warmups = 0;
  options.tune.trials = 1;
  std::vector<Status> refused(W), recovered(W);
  std::vector<std::vector<graphs::TunerEntry>> entries(W);
  const std::vector<Status> setup = run_failure_ranks(
      W, small_failure_spec(4, DType::kBF16), options,
      [](int r, std::unique_ptr<Backend> cpu) -> std::unique_ptr<Backend> {
        if (r == 1) return std::make_unique<FirstWorkspaceFails>(std::move(cpu));
        return cpu;
      },
      [&](int r, ExpertParallelLayer& layer, const std::function<Status()>& forward) {
        refused[r] = forward();
        recovered[r] = forward();
        entries[r] = layer.tuner()->entries();
      });
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    EXPECT_EQ(refused[r].code(), StatusCode::kResourceExhausted) << refused[r];
    EXPECT_TRUE(recovered[r].ok()) << recovered[r];
    ASSERT_FALSE(entries[r].empty());
    for (const graphs::TunerEntry& e : entries[r])
      EXPECT_EQ(e.excluded, (std::vector<bool>{false, false})) << "bucket " << e.capacity_bucket;
  }
}

// A backend whose allocations from `limit` bytes up fail (a quota r = 0's gathered weights no
// longer fit), and whose `transient_left` allocations of `transient_bytes` fail once each, after
// `transient_skip` of that size went through (a rank briefly short of the exchange buffers).
class TightBackend final : public ForwardingBackend {
 public:
  explicit TightBackend(Backend& inner) : ForwardingBackend(inner) {}
  Result<DeviceBuffer> allocate(size_t bytes) override {
    if (limit != 0 && bytes >= limit) return Status::ResourceExhausted("simulated: over the quota");
    if (bytes == transient_bytes && transient_left > 0 && --transient_skip < 0) {
      --transient_left;
      return Status::ResourceExhausted("simulated: no memory for an exchange buffer, this once");
    }
    return ForwardingBackend::allocate(bytes);
  }
  size_t limit = 0, transient_bytes = 0;
  int transient_skip = 0, transient_left = 0;
};

// A forward whose every way was refused leaves its bucket's tuning as it found it. A passing
// failure of an exchange buffer (which every r >= 1 needs) dropped every r >= 1 from the bucket
// for good when r = 0, tried next in the same forward, did not fit either: the bucket was left to
// r = 0 alone, and every later forward of it was refused on every rank, though r = 1 fit again.
// Now the step is refused once and r = 1 runs after it, whether the bucket's decision was
// restored or measured.
TEST(ExpertParallelTuner, AFailureOfEveryWayInOneForwardExcludesNothing) {
  for (const bool restored : {true, false}) {
    SCOPED_TRACE(restored ? "a restored decision" : "a measured decision");
    const uint64_t seed = std::random_device{}();
    SCOPED_TRACE("seed " + std::to_string(seed));
    LayerSpec spec;
    spec.experts = 4;
    spec.model_dim = 16;
    spec.hidden = 256;
    spec.output_dim = 8;
    spec.k = 2;
    spec.capacity_factor = 1.0;
    constexpr int W = 2;
    const int64_t E = 4, M = 16, H = 256, O = 8, S = 40;
    std::mt19937_64 rng(seed);
    const graphs::HostLayerParams host = to_host(random_params(rng, spec));
    const int64_t C = 20;  // k * floor(f * S / E)
    const int64_t bucket = graphs::ExchangeTuner::bucket_for(C);
    const size_t gathered = static_cast<size_t>(E * H * M + E * H * O + E * H + E * O) * 4;  // r = 0's weights
    const size_t dispatched = static_cast<size_t>(E * C * M) * 4;  // also a fresh Saved's expert_in_, just before
    std::vector<std::vector<Status>> statuses(W);
    std::vector<std::vector<graphs::TunerEntry>> entries(W);
    // The parallelism the measured forwards decided: the faster of the two on this machine now.
    std::vector<int> measured_r(W, 1);
    const uint16_t port = free_port();
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r)
      threads.emplace_back([&, r] {
        std::mt19937_64 rank_rng(seed + 1 + static_cast<uint64_t>(r));
        auto comm = comm::ucx_bootstrap(rank_options(port, r, W, 1));
        ASSERT_TRUE(comm.ok()) << comm.status();
        auto inner = make_backend("cpu", {.threads = 1});
        ASSERT_TRUE(inner.ok());
        TightBackend b(**inner);
        graphs::ExpertParallelOptions options;
        options.tune.candidates = {graphs::kDataParallel, {comm::AllToAllAlgo::kLinear, 1, 1}};
        options.tune.warmups = 1;
        options.tune.trials = 2;
        if (restored) options.tune.decided = {{bucket, 1, {900, 400}, {false, false}}};
        auto layer = ExpertParallelLayer::create(b, **comm, spec, options);
        ASSERT_TRUE(layer.ok()) << layer.status();
        graphs::HostLayerParams local = graphs::slice_for_rank(spec, layer->shard(), host);
        LayerWeights w;
        w.gate_weight = TensorView(local.gate.data(), DType::kF32, {E, M});
        w.experts.fc1_weight = TensorView(local.fc1.data(), DType::kF32, graphs::local_fc1_shape(spec, layer->shard()));
        w.experts.fc1_bias =
            TensorView(local.fc1_bias.data(), DType::kF32, graphs::local_fc1_bias_shape(spec, layer->shard()));
        w.experts.fc2_weight = TensorView(local.fc2.data(), DType::kF32, graphs::local_fc2_shape(spec, layer->shard()));
        w.experts.fc2_bias =
            TensorView(local.fc2_bias.data(), DType::kF32, graphs::local_fc2_bias_shape(spec, layer->shard()));
        std::vector<float> x = to_f32(randn(rank_rng, S * M, 1.0)), y(S * O);
        auto forward = [&] {
          RoutingStats stats;
          Status st = layer->forward(w, TensorView(x.data(), DType::kF32, {S, M}), TensorView(y.data(), DType::kF32, {S, O}),
                                     &stats, nullptr);
          if (st.ok() && stats.capacity != C) st = Status::Internal("capacity " + std::to_string(stats.capacity));
          statuses[r].push_back(st);
        };
        if (!restored) {
          for (int i = 0; i < 6; ++i) forward();  // both measured with memory to spare
          for (const graphs::TunerEntry& e : layer->tuner()->entries())
            if (e.capacity_bucket == bucket && e.decided) measured_r[r] = e.chosen.r;
        }
        if (r == 1) {
          b.limit = gathered;
          b.transient_bytes = dispatched;
          b.transient_skip = restored ? 1 : 0;  // restored: a fresh Saved's expert_in_ comes first
          b.transient_left = 1;
        }
        // The measured layer's scratch is grown: a refused step frees it, so the next forward
        // grows its exchange buffers again.
        if (!restored) (void)layer->refuse_forward(Status::ResourceExhausted("a refused request"));
        for (int i = 0; i < 5; ++i) forward();
        entries[r] = layer->tuner()->entries();
      });
    for (auto& t : threads) t.join();
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_FALSE(statuses[r].empty());
      const size_t first_after = restored ? 0 : 6;
      ASSERT_GT(statuses[r].size(), first_after);
      EXPECT_EQ(statuses[r][first_after].code(), StatusCode::kResourceExhausted) << statuses[r][first_after];
      for (size_t i = first_after + 1; i < statuses[r].size(); ++i)
        EXPECT_TRUE(statuses[r][i].ok()) << "forward " << i << ": " << statuses[r][i];
      const auto it = std::find_if(entries[r].begin(), entries[r].end(),
                                   [&](const graphs::TunerEntry& e) { return e.capacity_bucket == bucket; });
      ASSERT_NE(it, entries[r].end());
      EXPECT_TRUE(it->decided);
      EXPECT_EQ(it->chosen.r, 1);
      // Where the measurement chose r = 0 (it was the faster; timing decides), r = 0 no longer
      // fits once memory is short, and the forward after the refused one excludes it, rightly:
      // r = 1 then ran. What the refused forward excluded must be undone either way.
      EXPECT_EQ(it->excluded, (std::vector<bool>{measured_r[r] == 0, false})) << "measured r = " << measured_r[r];
    }
  }
}

// Tuner decisions restored on every rank alike (a checkpoint's) run from the first forward
// without measuring; where one rank restored others, or none, every rank forgets its own, says
// why, and measures afresh, so no two ranks run a bucket two ways. The layer is made either way.
TEST(ExpertParallelTuner, RestoredDecisionsHoldOnlyWhereEveryRankRestoredTheSame) {
  constexpr int W = 2;
  enum Case { kSame, kOther, kNone };
  for (const Case c : {kSame, kOther, kNone}) {
    SCOPED_TRACE(c == kSame ? "the same decisions" : c == kOther ? "rank 1 restored others" : "rank 1 restored none");
    // Every bucket a forward of this layer can reach, decided for r = 0 (candidate 1); rank 1's
    // other decisions choose r = 1 in bucket 8.
    auto decided_on = [&](int r) {
      std::vector<graphs::TunerDecision> decided;
      if (r == 1 && c == kNone) return decided;
      for (int64_t bucket = 1; bucket <= 64; bucket *= 2)
        decided.push_back({bucket, size_t{1}, {700, 300}, {false, false}});
      if (r == 1 && c == kOther) decided[3] = {8, size_t{0}, {200, 300}, {false, false}};
      return decided;
    };
    std::vector<Status> forwarded(W), restored(W);
    std::vector<std::vector<graphs::TunerEntry>> entries(W);
    const std::vector<Status> setup = run_failure_ranks(
        W, small_failure_spec(4),
        [&](int r) {
          graphs::ExpertParallelOptions options;
          options.tune.candidates = {{comm::AllToAllAlgo::kLinear, 1, 1}, graphs::kDataParallel};
          options.tune.warmups = 0;
          options.tune.trials = 1;
          options.tune.decided = decided_on(r);
          return options;
        },
        [](int, std::unique_ptr<Backend> cpu) { return cpu; },
        [&](int r, ExpertParallelLayer& layer, const std::function<Status()>& forward) {
          restored[r] = layer.restored_tuning();
          forwarded[r] = forward();
          entries[r] = layer.tuner()->entries();
        });
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_TRUE(setup[r].ok()) << setup[r];
      ASSERT_TRUE(forwarded[r].ok()) << forwarded[r];
      if (c == kSame) {
        EXPECT_TRUE(restored[r].ok()) << restored[r];
        ASSERT_EQ(entries[r].size(), 7u);
        for (const graphs::TunerEntry& e : entries[r]) {
          EXPECT_TRUE(e.decided && e.restored) << e.capacity_bucket;
          EXPECT_EQ(e.chosen, graphs::kDataParallel);
          // Not timed: the restored totals stand.
          EXPECT_EQ(e.total_ns, (std::vector<int64_t>{700, 300})) << e.capacity_bucket;
        }
        continue;
      }
      EXPECT_EQ(restored[r].code(), StatusCode::kAborted) << restored[r];
      EXPECT_EQ(restored[r].message(),
                "compared with rank 0, rank(s) 1 restored other tuner decisions (another checkpoint, or none): "
                "every rank measures again");
      // Only the bucket the forward ran, measuring its first candidate.
      ASSERT_EQ(entries[r].size(), 1u);
      EXPECT_FALSE(entries[r][0].decided);
      EXPECT_FALSE(entries[r][0].restored);
    }
    if (c != kSame) {
      EXPECT_EQ(entries[0][0].capacity_bucket, entries[1][0].capacity_bucket);
    }
  }
}

// Ranks given different layers refuse them together at creation, naming who differs and in
// what (the spec, or how it runs), or which rank could not create its layer at all (which says
// why itself); the communicator stays usable, and layers that agree are made.
TEST(ExpertParallelOptionsCheck, RanksGivenDifferentLayersRefuseThemTogether) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  constexpr int W = 3;
  LayerSpec base;
  base.experts = 3;
  base.model_dim = 8;
  base.hidden = 8;
  base.k = 1;
  const uint16_t port = free_port();
  struct Out {
    Status bootstrapped, pipeline, spec, both, tuned, invalid, same;
  };
  std::vector<Out> out(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      auto comm = comm::ucx_bootstrap(rank_options(port, r, W, 1));
      out[r].bootstrapped = comm.status();
      if (!comm.ok()) return;
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return void(out[r].bootstrapped = backend.status());
      auto create = [&](const LayerSpec& spec, const graphs::ExpertParallelOptions& o) {
        return ExpertParallelLayer::create(**backend, **comm, spec, o).status();
      };
      graphs::ExpertParallelOptions o;
      o.pipeline = r == 2 ? 2 : 1;  // rank 2 pipelines
      out[r].pipeline = create(base, o);
      LayerSpec wider = base;
      wider.hidden = r == 1 ? 16 : 8;  // rank 1 has wider experts
      out[r].spec = create(wider, {});
      o.r = r == 1 ? 0 : 1;  // rank 1 data parallel, rank 2 pipelined
      out[r].both = create(wider, o);
      graphs::ExpertParallelOptions tuned;
      tuned.tune.candidates = {{comm::AllToAllAlgo::kLinear, 1, 1}, graphs::kDataParallel};
      tuned.tune.trials = r == 0 ? 3 : 2;  // rank 0 measures longer
      out[r].tuned = create(base, tuned);
      graphs::ExpertParallelOptions bad;
      bad.pipeline = r == 1 ? 0 : 1;  // rank 1 alone refuses its layer
      out[r].invalid = create(base, bad);
      out[r].same = create(base, {});
      Status st = (*comm)->barrier();
      if (!st.ok()) out[r].bootstrapped = st;
    });
  }
  for (auto& t : threads) t.join();
  const std::string none = "no rank of this expert-parallel group creates the layer: ";
  const std::string how = " differ in how it runs (r, all_to_all, pipeline or tuning)";
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const Out& o = out[r];
    ASSERT_TRUE(o.bootstrapped.ok()) << o.bootstrapped;
    for (const Status* st : {&o.pipeline, &o.spec, &o.both, &o.tuned, &o.invalid})
      EXPECT_EQ(st->code(), StatusCode::kInvalidArgument) << *st;
    EXPECT_EQ(o.pipeline.message(), none + "compared with rank 0, rank(s) 2" + how +
                                        ". Every rank must be given the same layer");
    EXPECT_EQ(o.spec.message(), none + "compared with rank 0, rank(s) 1 differ in the layer spec" +
                                    ". Every rank must be given the same layer");
    EXPECT_NE(o.both.message().find("rank(s) 1 differ in the layer spec; compared with rank 0, "
                                    "rank(s) 1, 2" + how),
              std::string_view::npos)
        << o.both;
    EXPECT_NE(o.tuned.message().find("rank(s) 1, 2" + how), std::string_view::npos) << o.tuned;
    // The rank that refused says why; the others name it (their own options were fine).
    if (r == 1) {
      EXPECT_NE(o.invalid.message().find("pipeline degree 0 is outside [1, 64]"),
                std::string_view::npos)
          << o.invalid;
    } else {
      EXPECT_NE(o.invalid.message().find("rank(s) 1 could not create it"), std::string_view::npos)
          << o.invalid;
    }
    EXPECT_TRUE(o.same.ok()) << o.same;
  }
}

// Stands in for a rank whose tuteld build speaks another group protocol: its layer fingerprint
// (the all-gather of eight words per rank at creation) carries another third word, the build's.
class OtherProtocolBuild final : public ForwardingCommunicator {
 public:
  using ForwardingCommunicator::ForwardingCommunicator;
  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    if (bytes_per_rank != 8 * sizeof(uint64_t)) return ForwardingCommunicator::all_gather(send, recv, bytes_per_rank);
    uint64_t words[8];
    std::memcpy(words, send, sizeof words);
    words[2] ^= 1;
    return ForwardingCommunicator::all_gather(words, recv, bytes_per_rank);
  }
};

// Ranks whose builds differ in the group protocol refuse the layer together and say that alone
// (another build may fingerprint the spec and the options otherwise).
TEST(ExpertParallelOptionsCheck, RanksOfAnotherGroupProtocolRefuseTheLayerSayingSo) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  constexpr int W = 2;
  const LayerSpec spec = small_failure_spec(2);
  const uint16_t port = free_port();
  std::vector<Status> created(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      auto ucx = comm::ucx_bootstrap(rank_options(port, r, W, 1));
      if (!ucx.ok()) return void(created[r] = ucx.status());
      auto backend = make_backend("cpu", {.threads = 1});
      if (!backend.ok()) return void(created[r] = backend.status());
      OtherProtocolBuild other(**ucx);
      comm::Communicator& comm = r == 1 ? static_cast<comm::Communicator&>(other) : **ucx;
      graphs::ExpertParallelOptions options;
      options.pipeline = r == 1 ? 2 : 1;  // would be named too, were the builds the same
      created[r] = ExpertParallelLayer::create(**backend, comm, spec, options).status();
    });
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_EQ(created[r].code(), StatusCode::kInvalidArgument) << created[r];
    EXPECT_EQ(created[r].message(),
              "no rank of this expert-parallel group creates the layer: compared with rank 0, rank(s) 1 run a "
              "tuteld whose group protocol differs (upgrade every daemon of the group alike). Every rank must be "
              "given the same layer");
  }
}

// bf16 copies of each rank's local expert weights (its experts, or its H-shard of one) pass
// through the layer: forward and backward with them give the bits of the same steps converting
// the weights on the fly, expert parallel (r = 1) and data parallel (r = 0, where the ranks
// gather the copies instead of the f32 weights). A copy of the whole layer's weight, not the
// rank's slice, is refused.
TEST(ExpertParallelBf16Copies, LocalSlicesMatchOnTheFlyBitForBit) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  constexpr int W = 2;
  // Two experts per rank, or one sharded in halves: gathered whole (r = 1), each half on its own
  // (r = 2), and r = 0.
  const std::pair<int, int64_t> ways[] = {{1, 4}, {1, 1}, {2, 1}, {0, 4}, {0, 1}};
  for (const auto& way : ways) {
    const int parallel = way.first;
    const int64_t experts = way.second;
    SCOPED_TRACE(std::to_string(experts) + " experts over " + std::to_string(W) + " ranks, r = " +
                 std::to_string(parallel));
    LayerSpec spec;
    spec.experts = experts;
    spec.model_dim = 16;
    spec.hidden = 32;
    spec.k = 1;
    spec.activation = Activation::kGelu;
    spec.matmul_dtype = DType::kBF16;
    const int64_t M = spec.model_dim, O = spec.out_dim(), E = spec.experts, S = 24;
    const ref::Params p = random_params(rng, spec);
    const HostLayerParams whole = to_host(p);
    std::vector<std::vector<float>> xs, dys;
    for (int r = 0; r < W; ++r) {
      xs.push_back(to_f32(randn(rng, S * M, 1.0)));
      dys.push_back(to_f32(randn(rng, S * O, 1.0)));
    }
    struct RankResult {
      Status status, whole_copy_refused;
      std::vector<std::vector<float>> outputs[2];  // without, with the copies
      std::vector<float> y_zero_fc2_copy;          // forward with fc2's copy zeroed
    };
    std::vector<RankResult> results(W);
    const uint16_t port = free_port();
    std::vector<std::thread> threads;
    for (int r = 0; r < W; ++r) {
      threads.emplace_back([&, r] {
        RankResult& out = results[r];
        auto comm = comm::ucx_bootstrap(rank_options(port, r, W, 1));
        if (!comm.ok()) return void(out.status = comm.status());
        auto backend = make_backend("cpu", {.threads = 1});
        if (!backend.ok()) return void(out.status = backend.status());
        Backend& b = **backend;
        graphs::ExpertParallelOptions options;
        options.r = parallel;
        auto layer = ExpertParallelLayer::create(b, **comm, spec, options);
        if (!layer.ok()) return void(out.status = layer.status());
        const ExpertShard shard = layer->shard();
        HostLayerParams local = graphs::slice_for_rank(spec, shard, whole);
        const Shape fc1_shape = graphs::local_fc1_shape(spec, shard),
                    fc2_shape = graphs::local_fc2_shape(spec, shard);
        auto weights_of = [&](HostLayerParams& h) {
          LayerWeights w;
          w.gate_weight = TensorView(h.gate.data(), DType::kF32, {E, M});
          w.experts.fc1_weight = TensorView(h.fc1.data(), DType::kF32, fc1_shape);
          w.experts.fc1_bias =
              TensorView(h.fc1_bias.data(), DType::kF32, graphs::local_fc1_bias_shape(spec, shard));
          w.experts.fc2_weight = TensorView(h.fc2.data(), DType::kF32, fc2_shape);
          w.experts.fc2_bias =
              TensorView(h.fc2_bias.data(), DType::kF32, graphs::local_fc2_bias_shape(spec, shard));
          return w;
        };
        std::vector<uint16_t> fc1_copy(local.fc1.size()), fc2_copy(local.fc2.size()),
            whole_fc1_copy(whole.fc1.size());
        LayerWeights with_copies = weights_of(local);
        with_copies.experts.fc1_weight_bf16 = TensorView(fc1_copy.data(), DType::kBF16, fc1_shape);
        with_copies.experts.fc2_weight_bf16 = TensorView(fc2_copy.data(), DType::kBF16, fc2_shape);
        Status st = b.convert(with_copies.experts.fc1_weight, with_copies.experts.fc1_weight_bf16);
        if (st.ok())
          st = b.convert(with_copies.experts.fc2_weight, with_copies.experts.fc2_weight_bf16);
        if (!st.ok()) return void(out.status = st);
        std::vector<float> x = xs[r], dy = dys[r], y(S * O), dx(S * M);
        // Refused before any collective, so every rank may try it alone.
        LayerWeights whole_copy = with_copies;
        whole_copy.experts.fc1_weight_bf16 =
            TensorView(whole_fc1_copy.data(), DType::kBF16, {E, spec.hidden, M});
        out.whole_copy_refused =
            layer->forward(whole_copy, TensorView(x.data(), DType::kF32, {S, M}),
                           TensorView(y.data(), DType::kF32, {S, O}), nullptr);
        for (int copies : {0, 1}) {
          HostLayerParams grads{
              std::vector<float>(local.gate.size()), std::vector<float>(local.fc1.size()),
              std::vector<float>(local.fc1_bias.size()), std::vector<float>(local.fc2.size()),
              std::vector<float>(local.fc2_bias.size())};
          const LayerWeights w = copies ? with_copies : weights_of(local);
          ExpertParallelLayer::Saved saved;
          st = layer->forward(w, TensorView(x.data(), DType::kF32, {S, M}),
                              TensorView(y.data(), DType::kF32, {S, O}), nullptr, &saved);
          if (st.ok())
            st = layer->backward(w, TensorView(dy.data(), DType::kF32, {S, O}), 0.3f,
                                 TensorView(dx.data(), DType::kF32, {S, M}), weights_of(grads),
                                 saved);
          if (!st.ok()) return void(out.status = st);
          out.outputs[copies] = {
              y, dx, grads.gate, grads.fc1, grads.fc1_bias, grads.fc2, grads.fc2_bias};
        }
        // The copies are what the experts read: zero fc2's and y changes.
        std::fill(fc2_copy.begin(), fc2_copy.end(), uint16_t{0});
        st = layer->forward(with_copies, TensorView(x.data(), DType::kF32, {S, M}),
                            TensorView(y.data(), DType::kF32, {S, O}), nullptr);
        if (!st.ok()) return void(out.status = st);
        out.y_zero_fc2_copy = y;
      });
    }
    for (auto& t : threads) t.join();
    const char* names[] = {"y", "dx", "d_wg", "d_fc1_w", "d_fc1_b", "d_fc2_w", "d_fc2_b"};
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      const RankResult& got = results[r];
      ASSERT_TRUE(got.status.ok()) << got.status;
      EXPECT_EQ(got.whole_copy_refused.code(), StatusCode::kInvalidArgument)
          << got.whole_copy_refused;
      EXPECT_NE(got.whole_copy_refused.message().find("fc1_weight_bf16"), std::string_view::npos)
          << got.whole_copy_refused;
      for (size_t i = 0; i < std::size(names); ++i)
        EXPECT_TRUE(same_bits(names[i], got.outputs[1][i], got.outputs[0][i]));
      EXPECT_FALSE(same_bits("y", got.y_zero_fc2_copy, got.outputs[0][0]))
          << "a zeroed fc2 copy left y as it was: the layer did not read the copies";
    }
  }
}

TEST(ExpertShardRules, RefuseUnevenSplits) {
  LayerSpec spec;
  spec.experts = 6;
  spec.model_dim = 8;
  spec.hidden = 10;
  spec.k = 2;
  EXPECT_NE(graphs::expert_shard(spec, 4, 0).status().message().find("do not split evenly"),
            std::string_view::npos);
  spec.experts = 3;
  EXPECT_NE(graphs::expert_shard(spec, 4, 0).status().message().find("cannot shard"),
            std::string_view::npos);
  spec.experts = 2;
  spec.k = 1;
  spec.hidden = 9;
  EXPECT_NE(graphs::expert_shard(spec, 4, 0).status().message().find("hidden = 9"),
            std::string_view::npos);
  spec.hidden = 12;
  auto s = graphs::expert_shard(spec, 4, 3);
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->first_expert, 1);
  EXPECT_EQ(s->shard_index, 1);
  EXPECT_EQ(s->hidden_shard, 6);
}

}  // namespace
}  // namespace tutel::testing
