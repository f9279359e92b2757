// The expert-parallel layer on a backend whose memory the host must not touch: the
// SimulatedDevice of tests/daemon/simulated_device.hpp, which reports a CUDA device, hands out
// allocations of its own filled with garbage, and refuses (and records) every op on memory that
// is not its own and every copy of the wrong kind. Guarded, its memory is closed to the host
// outside its own ops and copies, so a direct host read or write faults. It is host memory
// underneath, so the UCX communicator (and a LocalExchange) still carries it, as NCCL carries a
// GPU's: the memory is open during the collectives (DeviceCollectives).
//
// Every rank of the group (threads of this process) runs the same steps twice over its one
// communicator, first on the plain CPU backend, then on a SimulatedDevice wrapping another:
// two training forwards, an inference forward, the two backwards in reverse order and the gate
// gradient's all-reduce. Every output (y, capacity, dropped, l_aux, dx, every gradient) must be
// the CPU backend's bits, and the device must have recorded no violation: the layer reaches its
// backend's memory only through the Backend. The cases cover experts split over the ranks and
// experts sharded along H with an fc2 bias whose slices are padded or empty (O not divisible by
// s), k = 2, both all-to-all algorithms and the in-process exchange.
#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "../kernels/bf16_copy_checks.hpp"
#include "../kernels/layer_test_util.hpp"
#include "expert_parallel_test_util.hpp"
#include "forwarding_communicator.hpp"
#include "graph_tape.hpp"
#include "graphs_test_util.hpp"
#include "simulated_device.hpp"
#include "tutel/comm/local_exchange.hpp"
#include "tutel/comm/nccl.hpp"
#include "tutel/comm/ucx.hpp"
#include "tutel/graphs/expert_parallel.hpp"
#include "tutel/kernels/cuda_devices.hpp"

namespace tutel::testing {
namespace {

using daemon::testing::SimulatedDevice;
using graphs::ExpertParallelLayer;
using graphs::HostLayerParams;

constexpr int kMicroBatches = 2;

// A communicator whose collectives may touch the device's memory, as NCCL's touch a GPU's: each
// runs with the memory open to the host.
class DeviceCollectives final : public ForwardingCommunicator {
 public:
  DeviceCollectives(comm::Communicator& inner, SimulatedDevice& device)
      : ForwardingCommunicator(inner), device_(device) {}

  using Communicator::all_to_all;
  Status all_to_all(const void* send, const comm::BlockLayout& send_layout, void* recv,
                    const comm::BlockLayout& recv_layout, comm::AllToAllAlgo algo) override {
    SimulatedDevice::Access open(device_);
    return inner_.all_to_all(send, send_layout, recv, recv_layout, algo);
  }
  Status all_gather(const void* send, void* recv, size_t bytes_per_rank) override {
    SimulatedDevice::Access open(device_);
    return inner_.all_gather(send, recv, bytes_per_rank);
  }
  Status reduce_scatter(const float* send, float* recv, size_t count_per_rank,
                        comm::ReduceOp op) override {
    SimulatedDevice::Access open(device_);
    return inner_.reduce_scatter(send, recv, count_per_rank, op);
  }
  Status all_reduce(float* data, size_t count, comm::ReduceOp op) override {
    SimulatedDevice::Access open(device_);
    return inner_.all_reduce(data, count, op);
  }
  Status all_reduce(int64_t* data, size_t count, comm::ReduceOp op) override {
    SimulatedDevice::Access open(device_);
    return inner_.all_reduce(data, count, op);
  }
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<Communicator> inner, inner_.split(color, key));
    if (inner == nullptr) return std::unique_ptr<Communicator>();
    auto child = std::make_unique<DeviceCollectives>(*inner, device_);
    child->owned_ = std::move(inner);
    return std::unique_ptr<Communicator>(std::move(child));
  }

 private:
  SimulatedDevice& device_;
};

struct DeviceCase {
  std::string name;
  int world;
  int64_t experts, hidden, output_dim;  // output_dim 0: M
  int k;
  double f;
  Activation activation;
  std::vector<std::vector<int64_t>> tokens;  // [micro-batch][rank]
  comm::AllToAllAlgo algo = comm::AllToAllAlgo::kLinear;
  int local_size = 1;
  bool local_exchange = false;  // the group's ranks exchange through memory, not UCX
  bool is_postscore = true;
  // d: on the CPU backend the chunks' exchanges overlap the GEMMs (a worker thread); on the
  // device they run in order (and inside the graphs): the same bits either way.
  int pipeline = 1;
  int r = 1;  // 0: the weights gathered (all-gather), the gradients reduce-scattered
  // Tuned over these instead (no warm-up, one trial). The runs on the two backends may choose
  // differently, so only candidates whose results are the same bits (the all-to-all algorithm)
  // are compared.
  std::vector<graphs::ExchangeConfig> tune;
  DType matmul = DType::kF32;  // bf16: bf16 dispatched rows on the wire (LayerSpec::dispatch_dtype)
};
void PrintTo(const DeviceCase& c, std::ostream* os) { *os << c.name; }

// The case under bf16 matmuls: the device path's exchanges then move bf16 rows (whole, chunked,
// 2DH) or gather the weights, and must still give the CPU backend's bits.
DeviceCase with_bf16_matmuls(DeviceCase c) {
  c.name = "Bf16" + c.name;
  c.matmul = DType::kBF16;
  return c;
}

std::vector<DeviceCase> device_cases() {
  std::vector<DeviceCase> cases = {
      {"TwoRanksTwoExpertsEach", 2, 4, 32, 0, 2, 1.0, Activation::kRelu, {{40, 29}, {17, 33}}},
      // O = 15 over s = 2: slices of 8 columns, the second padded with one.
      {"FourRanksShardedInTwoPaddedBiasDropless",
       4,
       2,
       48,
       15,
       2,
       0.0,
       Activation::kGelu,
       {{30, 22, 35, 18}, {12, 40, 25, 31}}},
      // O = 6 over s = 4: slices of 2 columns; the fourth shard's lies wholly beyond O.
      {"FourRanksOneExpertShardedInFourEmptyBiasSlice",
       4,
       1,
       32,
       6,
       1,
       -0.8,
       Activation::kSilu,
       {{10, 20, 30, 40}, {33, 8, 21, 15}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       /*is_postscore=*/false},
      {"TwoDhFourRanksTwoNodesShardedInTwoOverflow",
       4,
       2,
       32,
       0,
       2,
       0.5,
       Activation::kRelu,
       {{26, 34, 19, 30}, {41, 23, 28, 36}},
       comm::AllToAllAlgo::k2DH,
       2},
      {"FourRanksShardedInTwoLocalExchange",
       4,
       2,
       32,
       0,
       2,
       1.0,
       Activation::kRelu,
       {{21, 30, 27, 18}, {35, 12, 24, 29}},
       comm::AllToAllAlgo::kLinear,
       1,
       /*local_exchange=*/true},
      {"PipelinedTwoChunksTwoRanks",
       2,
       4,
       32,
       0,
       2,
       1.0,
       Activation::kGelu,
       {{40, 29}, {17, 33}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       /*pipeline=*/2},
      {"PipelinedThreeChunksTwoDhShardedPaddedBias",
       4,
       2,
       48,
       15,
       2,
       0.0,
       Activation::kSilu,
       {{30, 22, 35, 18}, {12, 40, 25, 31}},
       comm::AllToAllAlgo::k2DH,
       2,
       false,
       true,
       /*pipeline=*/3},
      // The tuner choosing between the two all-to-alls (two nodes of two ranks): every
      // candidate's phases get keys, and graphs, of their own.
      {"TunedAllToAllTwoNodes",
       4,
       8,
       32,
       0,
       2,
       1.0,
       Activation::kRelu,
       {{26, 34, 19, 30}, {41, 23, 28, 36}},
       comm::AllToAllAlgo::kLinear,
       2,
       false,
       true,
       1,
       1,
       {{comm::AllToAllAlgo::kLinear, 1, 1}, {comm::AllToAllAlgo::k2DH, 1, 1}}},
      // O = 15 over s = 2, data parallel: the padded bias slices gathered and scattered back.
      {"DataParallelShardedPaddedBias",
       4,
       2,
       48,
       15,
       2,
       0.0,
       Activation::kGelu,
       {{30, 22, 35, 18}, {12, 40, 25, 31}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       1,
       /*r=*/0},
      // Sharded experts under r = s (each shard its own H-slice; the cases above run r = 1, the
      // shards gathered through a group of their own) and 1 < r < s, pipelined.
      {"ModelParallelShardedPaddedBias",
       4,
       2,
       48,
       15,
       2,
       0.0,
       Activation::kGelu,
       {{30, 22, 35, 18}, {12, 40, 25, 31}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       1,
       /*r=*/2},
      {"TwoPartsPipelinedOneExpertShardedInFourEmptyBiasSlice",
       4,
       1,
       32,
       6,
       1,
       -0.8,
       Activation::kSilu,
       {{10, 20, 30, 40}, {33, 8, 21, 15}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       /*pipeline=*/2,
       /*r=*/2},
      // A rank without tokens in a micro-batch (S = 0; its phases are keys and graphs of
      // their own), pipelined, and data parallel.
      {"PipelinedTwoRanksOneWithoutTokens",
       2,
       4,
       32,
       0,
       2,
       1.0,
       Activation::kGelu,
       {{40, 0}, {0, 33}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       /*pipeline=*/2},
      {"DataParallelFourRanksShardedWithoutTokens",
       4,
       2,
       48,
       15,
       2,
       0.0,
       Activation::kGelu,
       {{30, 0, 35, 18}, {0, 40, 0, 31}},
       comm::AllToAllAlgo::kLinear,
       1,
       false,
       true,
       1,
       /*r=*/0},
  };
  // Whole experts; three chunks over 2DH with H-shards; data parallel.
  for (const size_t i : {size_t{0}, size_t{6}, size_t{8}}) cases.push_back(with_bf16_matmuls(cases[i]));
  return cases;
}

LayerSpec spec_of(const DeviceCase& c) {
  LayerSpec spec = base_spec(c.experts, 16, c.hidden, c.k, c.f);
  spec.output_dim = c.output_dim;
  spec.activation = c.activation;
  spec.is_postscore = c.is_postscore;
  spec.matmul_dtype = c.matmul;
  return spec;
}

// What one rank's steps produced, downloaded to the host.
struct StepResults {
  Status status;
  RoutingStats stats[kMicroBatches];
  std::vector<float> y[kMicroBatches], dx[kMicroBatches], y_inference;
  std::vector<float> d_wg, d_fc1, d_b1, d_fc2, d_b2;
  std::vector<graphs::TunerEntry> tuner;  // tuned: the dictionary at the end
};

// This rank's parameters (or gradients, zeroed) in the backend's memory.
struct LocalTensors {
  DeviceTensor gate, fc1, fc1_bias, fc2, fc2_bias;

  LocalTensors(Backend& b, const LayerSpec& spec, const graphs::ExpertShard& shard)
      : gate(b, DType::kF32, {spec.experts, spec.model_dim}),
        fc1(b, DType::kF32, graphs::local_fc1_shape(spec, shard)),
        fc1_bias(b, DType::kF32, graphs::local_fc1_bias_shape(spec, shard)),
        fc2(b, DType::kF32, graphs::local_fc2_shape(spec, shard)),
        fc2_bias(b, DType::kF32, graphs::local_fc2_bias_shape(spec, shard)) {}
  // A rank's parameters: its slice of the whole layer's.
  LocalTensors(Backend& b, const LayerSpec& spec, const graphs::ExpertShard& shard,
               const HostLayerParams& whole)
      : LocalTensors(b, spec, shard) {
    upload(graphs::slice_for_rank(spec, shard, whole));
  }

  void upload(const HostLayerParams& p) {
    gate.upload(p.gate);
    fc1.upload(p.fc1);
    fc1_bias.upload(p.fc1_bias);
    fc2.upload(p.fc2);
    fc2_bias.upload(p.fc2_bias);
  }
  LayerWeights weights() const {
    LayerWeights w;
    w.gate_weight = gate.view();
    w.experts.fc1_weight = fc1.view();
    w.experts.fc1_bias = fc1_bias.view();
    w.experts.fc2_weight = fc2.view();
    w.experts.fc2_bias = fc2_bias.view();
    return w;
  }
};

void append(std::vector<float>& to, const std::vector<float>& more) {
  to.insert(to.end(), more.begin(), more.end());
}

// The steps of one rank on `b`, `rounds` times: two training forwards, an inference forward, the
// backwards in reverse order; then the gate gradient's all-reduce. Every round's outputs are
// kept, the gradients add up over the rounds. Collective: every rank runs it at once. With a
// runner, the layer's phases run through it (and its collectives enqueue on the backend's queue).
StepResults run_steps(Backend& b, comm::Communicator& comm, const DeviceCase& c,
                      const LayerSpec& spec, const HostLayerParams& whole,
                      const std::vector<std::vector<float>>& xs,
                      const std::vector<std::vector<float>>& dys, int rounds = 1,
                      graphs::PhaseRunner* runner = nullptr) {
  StepResults out;
  graphs::ExpertParallelOptions options;
  options.algo = c.algo;
  options.pipeline = c.pipeline;
  options.r = c.r;
  options.tune.candidates = c.tune;
  options.tune.warmups = 0;
  options.tune.trials = 1;
  options.runner = runner;
  options.comm_on_backend_queue = runner != nullptr;
  auto layer = ExpertParallelLayer::create(b, comm, spec, options);
  if (!layer.ok()) {
    out.status = layer.status();
    return out;
  }
  const int64_t M = spec.model_dim, O = spec.out_dim();
  LocalTensors params(b, spec, layer->shard(), whole), grads(b, spec, layer->shard());
  // Two sets of the step's tensors and saved states, taken in turns by the rounds: they stay in
  // place, as the daemon's staging buffers do, so later rounds may replay graphs of earlier ones,
  // and the turns make sure a graph never runs on another set's addresses.
  constexpr int kSets = 2;
  ExpertParallelLayer::Saved saved_sets[kSets][kMicroBatches];
  std::vector<std::unique_ptr<DeviceTensor>> x_sets[kSets], y_sets[kSets], dy_sets[kSets],
      dx_sets[kSets], x_inference_sets, y_inference_sets;
  const int64_t S0 = static_cast<int64_t>(xs[0].size()) / M;
  for (int set = 0; set < kSets; ++set) {
    for (int m = 0; m < kMicroBatches; ++m) {
      const int64_t S = static_cast<int64_t>(xs[m].size()) / M;
      x_sets[set].push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, M}));
      y_sets[set].push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, O}));
      dy_sets[set].push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, O}));
      dx_sets[set].push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S, M}));
    }
    x_inference_sets.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S0, M}));
    y_inference_sets.push_back(std::make_unique<DeviceTensor>(b, DType::kF32, Shape{S0, O}));
  }
  for (int round = 0; round < rounds; ++round) {
    const int set = round % kSets;
    auto &x = x_sets[set], &y = y_sets[set], &dy = dy_sets[set], &dx = dx_sets[set];
    ExpertParallelLayer::Saved* saved = saved_sets[set];
    DeviceTensor &x_inference = *x_inference_sets[set], &y_inference = *y_inference_sets[set];
    for (int m = 0; m < kMicroBatches; ++m) {
      const int64_t S = static_cast<int64_t>(xs[m].size()) / M;
      x[m]->upload(xs[m]);
      out.status =
          layer->forward(params.weights(), x[m]->view(), y[m]->view(), &out.stats[m], &saved[m]);
      if (!out.status.ok()) return out;
      append(out.y[m], y[m]->download());
      // The caller may reuse x's memory: backward must read the forward's own copy.
      x[m]->upload(std::vector<float>(S * M, 1e3f));
    }
    x_inference.upload(xs[0]);
    out.status = layer->forward(params.weights(), x_inference.view(), y_inference.view(), nullptr);
    if (!out.status.ok()) return out;
    append(out.y_inference, y_inference.download());
    for (int m = kMicroBatches - 1; m >= 0; --m) {
      dy[m]->upload(dys[m]);
      out.status = layer->backward(params.weights(), dy[m]->view(), 0.25f * (m + 1), dx[m]->view(),
                                   grads.weights(), saved[m]);
      if (!out.status.ok()) return out;
      append(out.dx[m], dx[m]->download());
    }
  }
  out.status = layer->all_reduce_gate_grad(grads.gate.view());
  if (!out.status.ok()) return out;
  out.d_wg = grads.gate.download();
  out.d_fc1 = grads.fc1.download();
  out.d_b1 = grads.fc1_bias.download();
  out.d_fc2 = grads.fc2.download();
  out.d_b2 = grads.fc2_bias.download();
  if (layer->tuner()) out.tuner = layer->tuner()->entries();
  return out;
}

// How the device run of a case goes: op by op, or with its phases captured as graphs; skewed:
// rank 0's runner keeps a single graph, so it is seldom ready when its peers are; failing: every
// capture of rank 0's fails.
enum class DeviceRun { kOpByOp, kGraphs, kGraphsSkewed, kGraphsCaptureFails };

// With graphs every run makes eight rounds, four on each set of tensors (run_steps): the first
// two grow the buffers (moving the epoch), then each set's phases run op by op, are captured,
// and are launched from what was captured.
constexpr int kGraphRounds = 8;

void run_case(const DeviceCase& c, DeviceRun how) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);

  const LayerSpec spec = spec_of(c);
  const int W = c.world;
  const int64_t M = spec.model_dim, O = spec.out_dim();
  ASSERT_EQ(static_cast<int>(c.tokens.size()), kMicroBatches);

  const ref::Params p = random_params(rng, spec);
  const HostLayerParams whole = to_host(p);
  // [rank][micro-batch]
  std::vector<std::vector<std::vector<float>>> xs(W), dys(W);
  for (int r = 0; r < W; ++r)
    for (int m = 0; m < kMicroBatches; ++m) {
      const int64_t S = c.tokens[m][r];
      xs[r].push_back(to_f32(randn(rng, S * M, 1.0)));
      dys[r].push_back(to_f32(randn(rng, S * O, 1.0)));
    }

  struct RankResult {
    Status status;
    StepResults cpu, device;
    std::vector<std::string> violations;
    graphs::ExpertShard shard;
    graphs::PhaseRunnerStats graphs;
    int64_t recorded_ops = 0, waits = 0;
    std::string collectives;                          // TapeCollectives::log()
    uint64_t traffic_counted = 0, traffic_moved = 0;  // TapeCollectives' per peer
  };
  const int rounds = how == DeviceRun::kOpByOp ? 1 : kGraphRounds;
  std::vector<RankResult> results(W);
  std::shared_ptr<comm::LocalExchange> exchange;
  if (c.local_exchange) exchange = std::make_shared<comm::LocalExchange>();
  const uint16_t port = free_port();
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      RankResult& out = results[r];
      comm::BootstrapOptions o = rank_options(port, r, W, c.local_size);
      o.local_exchange = exchange;
      auto comm = comm::ucx_bootstrap(o);
      if (!comm.ok()) return void(out.status = comm.status());
      auto cpu = make_backend("cpu", {.threads = 1});
      auto inner = make_backend("cpu", {.threads = 1});
      if (!cpu.ok() || !inner.ok())
        return void(out.status = cpu.ok() ? inner.status() : cpu.status());
      out.cpu = run_steps(**cpu, **comm, c, spec, whole, xs[r], dys[r], rounds);
      // Both runs are collectives: a rank whose CPU run failed still joins the device run, so
      // that no peer waits for it until the timeout.
      SimulatedDevice device(std::move(inner).value());
      device.guard_host_access();
      DeviceCollectives device_comm(**comm, device);
      if (how == DeviceRun::kOpByOp) {
        out.device = run_steps(device, device_comm, c, spec, whole, xs[r], dys[r]);
      } else {
        Tape tape;
        TapeBackend tape_backend(device, tape);
        TapeCollectives tape_comm(device_comm, tape);
        const size_t max_graphs = how == DeviceRun::kGraphsSkewed && r == 0 ? 1 : 64;
        const bool fail = how == DeviceRun::kGraphsCaptureFails && r == 0;
        graphs::GraphPhaseRunner runner(std::make_unique<TapeCapture>(tape, fail), max_graphs);
        out.device =
            run_steps(tape_backend, tape_comm, c, spec, whole, xs[r], dys[r], rounds, &runner);
        out.graphs = runner.stats();
        out.recorded_ops = tape.recorded_ops();
        out.waits = tape_comm.waits();
        out.collectives = tape_comm.log();
        out.traffic_counted = tape_comm.counted_traffic();
        out.traffic_moved = tape_comm.moved_traffic();
        for (const std::string& v : tape.violations()) out.violations.push_back(v);
      }
      for (const std::string& v : device.violations()) out.violations.push_back(v);
      auto shard = graphs::expert_shard(spec, W, r);
      if (shard.ok()) out.shard = *shard;
      out.status = (*comm)->barrier();  // every rank is done before any destroys its endpoint
    });
  }
  for (auto& t : threads) t.join();

  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const RankResult& got = results[r];
    ASSERT_TRUE(got.status.ok()) << got.status;
    ASSERT_TRUE(got.cpu.status.ok()) << "cpu backend: " << got.cpu.status;
    for (const std::string& v : got.violations) ADD_FAILURE() << "device violation: " << v;
    ASSERT_TRUE(got.device.status.ok()) << "simulated device: " << got.device.status;
    const StepResults &want = got.cpu, &dev = got.device;
    if (how != DeviceRun::kOpByOp) {
      // Every collective ran the same way on every rank (NCCL's rule for captured ones).
      EXPECT_EQ(got.collectives, results[0].collectives);
      // The traffic tutelctl peers shows is what moved: launches count what their graphs replay,
      // and a capture nobody launched counts nothing.
      EXPECT_GT(got.traffic_moved, 0u);
      EXPECT_EQ(got.traffic_counted, got.traffic_moved);
      if (how == DeviceRun::kGraphsCaptureFails) {
        // Captures were tried, and since rank 0's failed, nobody launched one.
        EXPECT_NE(got.collectives.find('C'), std::string::npos) << got.collectives;
        EXPECT_EQ(got.collectives.find('L'), std::string::npos) << got.collectives;
        if (r == 0) {
          EXPECT_GT(got.graphs.capture_failures, 0u);
        }
      } else {
        EXPECT_NE(got.collectives.find('L'), std::string::npos) << got.collectives;
      }
    }
    if (how == DeviceRun::kGraphs) {
      // Two phases per forward (route, experts) and one per backward, a key of their own per set
      // once the buffers stopped growing: each is captured exactly once (the next time after it
      // ran op by op) and launched then and every later time, the set's last round included.
      const uint64_t phases = 2 * (kMicroBatches + 1) + kMicroBatches;
      // Tuned, the same: each candidate's phases have keys of their own, run op by op the first
      // time; only the chosen one's come back, to be captured and launched.
      EXPECT_EQ(got.graphs.captures, 2 * phases);
      EXPECT_EQ(got.graphs.capture_failures, 0u);
      EXPECT_GE(got.graphs.launches, 2 * got.graphs.captures);
      EXPECT_EQ(got.graphs.evictions, 0u);
      EXPECT_GT(got.recorded_ops, 0);
      EXPECT_GT(got.waits, 0);  // the host waited for the enqueued collectives
    }
    for (int m = 0; m < kMicroBatches; ++m) {
      SCOPED_TRACE("micro-batch " + std::to_string(m));
      EXPECT_GT(want.stats[m].capacity, 0);
      EXPECT_EQ(dev.stats[m].capacity, want.stats[m].capacity);
      EXPECT_EQ(dev.stats[m].dropped, want.stats[m].dropped);
      EXPECT_TRUE(same_bits("l_aux", {dev.stats[m].l_aux}, {want.stats[m].l_aux}));
      EXPECT_TRUE(same_bits("y", dev.y[m], want.y[m]));
      EXPECT_TRUE(same_bits("dx", dev.dx[m], want.dx[m]));
    }
    EXPECT_TRUE(same_bits("inference y", dev.y_inference, want.y_inference));
    if (!c.tune.empty()) {
      // Every bucket measured both candidates and decided, on the device as on the CPU.
      ASSERT_FALSE(dev.tuner.empty());
      for (const graphs::TunerEntry& e : dev.tuner) EXPECT_TRUE(e.decided) << e.capacity_bucket;
      EXPECT_EQ(dev.tuner.size(), want.tuner.size());
    }
    EXPECT_TRUE(same_bits("d_wg (all-reduced)", dev.d_wg, want.d_wg));
    EXPECT_TRUE(same_bits("d_fc1_w", dev.d_fc1, want.d_fc1));
    EXPECT_TRUE(same_bits("d_fc1_b", dev.d_b1, want.d_b1));
    EXPECT_TRUE(same_bits("d_fc2_w", dev.d_fc2, want.d_fc2));
    EXPECT_TRUE(same_bits("d_fc2_b", dev.d_b2, want.d_b2));
    // A sharded fc2 bias's gradient comes from add_column_sums: non-zero exactly on the shard's
    // columns within O (every token reaches every expert here), zero on the padding.
    if (got.shard.shards > 1) {
      const int64_t o0 = got.shard.shard_index * got.shard.out_shard;
      for (int64_t col = 0; col < got.shard.out_shard; ++col)
        EXPECT_EQ(want.d_b2[col] != 0.f, o0 + col < O) << "d_fc2_b[" << col << "]";
    }
  }
}

class ExpertParallelOnDevice : public ::testing::TestWithParam<DeviceCase> {};

TEST_P(ExpertParallelOnDevice, MatchesTheCpuBackendBitForBitWithoutTouchingDeviceMemory) {
  run_case(GetParam(), DeviceRun::kOpByOp);
}

// The phases captured as graphs, the collectives inside them (graph_tape.hpp: a capture records
// the device's ops and the collectives without running them, a launch replays them with the
// addresses they were recorded with): every round's outputs equal the CPU backend's op-by-op
// run bit for bit, nothing a capture may not contain happened inside one, and the later rounds
// ran on captured graphs.
TEST_P(ExpertParallelOnDevice, GraphsOfThePhasesMatchOpByOpBitForBit) {
  run_case(GetParam(), DeviceRun::kGraphs);
}

// One rank's runner keeps a single graph, so its peers are often ready to launch when it must
// capture or run op by op: the group agrees on the least ready, and every collective still runs
// the same way on every rank, with the same results.
TEST(ExpertParallelOnDeviceSkewed, RanksThatDisagreeRunEveryCollectiveTheSameWay) {
  run_case(device_cases()[1], DeviceRun::kGraphsSkewed);
}

// Every capture of rank 0's fails (its peers' work): nobody launches a graph, every rank runs
// the phases op by op, in step, with the CPU's results, and the failed keys stay op by op.
TEST(ExpertParallelOnDeviceSkewed, ACaptureThatFailsOnOneRankIsRunOpByOpOnEveryRank) {
  run_case(device_cases()[0], DeviceRun::kGraphsCaptureFails);
}

// Runs body(rank, device, collectives) on W ranks, each a thread with its own UCX communicator
// (loopback) and simulated device over a one-thread CPU backend. Each rank's status: its
// set-up's or body's failure, else the closing barrier's.
std::vector<Status> run_simulated_ranks(
    int W, const std::function<Status(int, SimulatedDevice&, DeviceCollectives&)>& body) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint16_t port = free_port();
  std::vector<Status> out(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r)
    threads.emplace_back([&, r] {
      auto comm = comm::ucx_bootstrap(rank_options(port, r, W, 1));
      if (!comm.ok()) return void(out[r] = comm.status());
      auto inner = make_backend("cpu", {.threads = 1});
      if (!inner.ok()) return void(out[r] = inner.status());
      SimulatedDevice device(std::move(inner).value());
      DeviceCollectives device_comm(**comm, device);
      out[r] = body(r, device, device_comm);
      if (out[r].ok()) out[r] = (*comm)->barrier();
    });
  for (auto& t : threads) t.join();
  return out;
}

// One rank's side of run_simulated_layers: its layer, its slice of the parameters, zeroed
// gradients of the same shapes, and its own generator.
struct RankLayer {
  ExpertParallelLayer& layer;
  LocalTensors& params;
  LocalTensors& grads;
  std::mt19937_64& rng;
};

// run_simulated_ranks on rank_seeds.size() ranks, each with its layer of `spec` created and its
// slice of `whole` uploaded; rank r draws from rank_seeds[r].
std::vector<Status> run_simulated_layers(
    const LayerSpec& spec, const HostLayerParams& whole, const std::vector<uint64_t>& rank_seeds,
    const std::function<Status(int, SimulatedDevice&, RankLayer&)>& body) {
  return run_simulated_ranks(
      static_cast<int>(rank_seeds.size()),
      [&](int r, SimulatedDevice& device, DeviceCollectives& device_comm) -> Status {
        std::mt19937_64 rng(rank_seeds[r]);
        auto layer = ExpertParallelLayer::create(device, device_comm, spec);
        if (!layer.ok()) return layer.status();
        LocalTensors params(device, spec, layer->shard(), whole), grads(device, spec, layer->shard());
        RankLayer rank{*layer, params, grads, rng};
        return body(r, device, rank);
      });
}

// The small two-rank case of the tests below: fresh parameters, and one generator seed per rank.
struct TwoRankCase {
  LayerSpec spec = base_spec(4, 16, 32, 2, 1.0);
  uint64_t seed = std::random_device{}();
  HostLayerParams whole;
  std::vector<uint64_t> rank_seeds;
  TwoRankCase() {
    std::mt19937_64 rng(seed);
    whole = to_host(random_params(rng, spec));
    rank_seeds = {rng(), rng()};
  }
};

// One rank's step tensors for TwoRankCase's spec: x [kTokens, M] and dy [kTokens, O] drawn from
// its generator, y and dx to write.
struct RankIo {
  static constexpr int64_t kTokens = 24, kM = 16, kO = 16;
  DeviceTensor x, y, dy, dx;
  RankIo(Backend& device, std::mt19937_64& rng)
      : x(device, DType::kF32, {kTokens, kM}), y(device, DType::kF32, {kTokens, kO}),
        dy(device, DType::kF32, {kTokens, kO}), dx(device, DType::kF32, {kTokens, kM}) {
    x.upload(to_f32(randn(rng, kTokens * kM, 1.0)));
    dy.upload(to_f32(randn(rng, kTokens * kO, 1.0)));
  }
};

// A rank that cannot allocate what a step needs (its tenant's quota, a full device) must not
// leave its peers waiting in a collective: the group agrees, every rank refuses the step with
// ResourceExhausted (never a timeout), and the group goes on. Rank 1 is refused where its
// route's buffers do not fit, where only its experts' do (its peer brings more tokens, so the
// agreed capacity grows), and in a backward; each time the limit is lifted the steps run again.
TEST(ExpertParallelLimits, ARankThatCannotAllocateRefusesTheStepOnEveryRank) {
  const LayerSpec spec = base_spec(4, 16, 32, 2, 1.0);
  constexpr int W = 2;
  const int64_t M = 16, O = 16;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const ref::Params p = random_params(rng, spec);
  const HostLayerParams whole = to_host(p);
  const std::vector<uint64_t> rank_seeds = {rng(), rng()};  // a generator per rank's thread
  std::vector<std::vector<Status>> steps(W);
  const std::vector<Status> setup = run_simulated_layers(
      spec, whole, rank_seeds, [&](int r, SimulatedDevice& device, RankLayer& rank) -> Status {
        // The caller's tensors for every step, made before any limit: they are not the layer's.
        struct Io {
          std::unique_ptr<DeviceTensor> x, y, dy, dx;
        };
        std::map<int64_t, Io> io;
        for (int64_t S : {8, 64, 256}) {
          Io& t = io[S];
          t.x = std::make_unique<DeviceTensor>(device, DType::kF32, Shape{S, M});
          t.y = std::make_unique<DeviceTensor>(device, DType::kF32, Shape{S, O});
          t.dy = std::make_unique<DeviceTensor>(device, DType::kF32, Shape{S, O});
          t.dx = std::make_unique<DeviceTensor>(device, DType::kF32, Shape{S, M});
          t.x->upload(to_f32(randn(rank.rng, S * M, 1.0)));
          t.dy->upload(to_f32(randn(rank.rng, S * O, 1.0)));
        }
        ExpertParallelLayer::Saved small, big;
        auto forward = [&](int64_t S, ExpertParallelLayer::Saved& saved) {
          steps[r].push_back(rank.layer.forward(rank.params.weights(), io[S].x->view(),
                                                io[S].y->view(), nullptr, &saved));
        };
        auto backward = [&](int64_t S, ExpertParallelLayer::Saved& saved) {
          steps[r].push_back(rank.layer.backward(rank.params.weights(), io[S].dy->view(), 0.f,
                                                 io[S].dx->view(), rank.grads.weights(), saved));
        };
        // Rank 1 can allocate nothing more; lifted again after the step.
        auto full = [&] {
          if (r == 1) device.limit_memory(device.live_bytes());
        };
        auto lift = [&] { device.limit_memory(~size_t{0}); };
        const int64_t peer_more = r == 0 ? 256 : 64;  // rank 0 brings more tokens
        forward(8, small);                            // 0
        full();
        forward(256, big);  // 1: refused, rank 1's route buffers
        lift();
        forward(64, big);   // 2
        backward(64, big);  // 3
        full();
        forward(peer_more, big);  // 4: refused, rank 1's experts' buffers (C grew with rank 0's S)
        lift();
        forward(peer_more, big);  // 5
        full();
        backward(peer_more, big);  // 6: refused, rank 1's backward buffers
        lift();
        forward(peer_more, big);   // 7
        backward(peer_more, big);  // 8
        return Status::OK();
      });
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 9u);
    for (size_t i : {0, 2, 3, 5, 7, 8})
      EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    for (size_t i : {1, 4, 6}) {
      EXPECT_EQ(steps[r][i].code(), StatusCode::kResourceExhausted)
          << "step " << i << ": " << steps[r][i];
      const std::string why(steps[r][i].message());
      const char* expected = r == 0 ? "another rank of the expert-parallel group could not allocate"
                                    : "would pass its limit";
      EXPECT_NE(why.find(expected), std::string::npos) << "step " << i << ": " << why;
    }
  }
}

// A step its owner refuses on one rank before the layer runs it (a daemon that cannot stage the
// request) is refused on every rank through the step's first agreement, instead of leaving the
// peers in a collective until the timeout; a refused backward consumes the forward on every
// rank; and the group's next steps run.
TEST(ExpertParallelLimits, AStepOneRanksOwnerRefusesIsRefusedOnEveryRank) {
  const TwoRankCase c;
  SCOPED_TRACE("seed " + std::to_string(c.seed));
  constexpr int W = 2;
  std::vector<std::vector<Status>> steps(W);
  const std::vector<Status> setup = run_simulated_layers(
      c.spec, c.whole, c.rank_seeds, [&](int r, SimulatedDevice& device, RankLayer& rank) -> Status {
        RankIo io(device, rank.rng);
        DeviceTensor &x = io.x, &y = io.y, &dy = io.dy, &dx = io.dx;
        ExpertParallelLayer::Saved saved;
        const Status cannot_stage = Status::Unavailable("cannot stage the request");
        auto forward = [&](bool refuse) {
          steps[r].push_back(refuse ? rank.layer.refuse_forward(cannot_stage)
                                    : rank.layer.forward(rank.params.weights(), x.view(), y.view(),
                                                         nullptr, &saved));
        };
        auto backward = [&](bool refuse) {
          steps[r].push_back(refuse ? rank.layer.refuse_backward(saved, cannot_stage)
                                    : rank.layer.backward(rank.params.weights(), dy.view(), 0.f,
                                                          dx.view(), rank.grads.weights(), saved));
        };
        const bool one = r == 1;
        forward(false);   // 0
        backward(false);  // 1
        forward(one);     // 2: refused by rank 1's owner
        forward(false);   // 3
        backward(one);    // 4: refused by rank 1's owner; consumed on both
        backward(false);  // 5: nothing left to run a backward of, on either rank
        forward(false);   // 6
        backward(false);  // 7
        return Status::OK();
      });
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 8u);
    for (size_t i : {0, 1, 3, 6, 7})
      EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    for (size_t i : {2, 4}) {
      if (r == 1) {
        EXPECT_EQ(steps[r][i].code(), StatusCode::kUnavailable)
            << "step " << i << ": " << steps[r][i];
      } else {
        EXPECT_EQ(steps[r][i].code(), StatusCode::kResourceExhausted)
            << "step " << i << ": " << steps[r][i];
        EXPECT_NE(steps[r][i].message().find("another rank of the expert-parallel group"),
                  std::string_view::npos)
            << steps[r][i];
      }
    }
    EXPECT_EQ(steps[r][5].code(), StatusCode::kInvalidArgument) << steps[r][5];
  }
}

// A backward for dx alone is the group's choice, not one rank's: an expert's gradient sums every
// rank's tokens, so where one rank asks for dx alone and another does not, every rank refuses
// the backward (InvalidArgument, naming the disagreement), before it runs: no gradient moves,
// and the forward is consumed on both. Asked alike, the backward runs, and its dx is the plain
// backward's bit for bit (the layer computes the same; keeping the gradients is the caller's).
TEST(ExpertParallelLimits, ABackwardForDxAloneMustBeAskedByEveryRank) {
  const TwoRankCase c;
  SCOPED_TRACE("seed " + std::to_string(c.seed));
  constexpr int W = 2;
  std::vector<std::vector<Status>> steps(W);
  std::vector<std::vector<float>> grads_after_refusal(W), dx_alone(W), dx_plain(W);
  const std::vector<Status> setup = run_simulated_layers(
      c.spec, c.whole, c.rank_seeds, [&](int r, SimulatedDevice& device, RankLayer& rank) -> Status {
        RankIo io(device, rank.rng);
        DeviceTensor &x = io.x, &y = io.y, &dy = io.dy, &dx = io.dx;
        ExpertParallelLayer::Saved saved;
        auto forward = [&] {
          steps[r].push_back(rank.layer.forward(rank.params.weights(), x.view(), y.view(), nullptr, &saved));
        };
        auto backward = [&](bool dx_only) {
          steps[r].push_back(rank.layer.backward(rank.params.weights(), dy.view(), 0.f, dx.view(),
                                                 rank.grads.weights(), saved, dx_only));
        };
        forward();          // 0
        backward(r == 1);   // 1: rank 1 asks for dx alone, rank 0 does not
        for (const DeviceTensor* g : {&rank.grads.gate, &rank.grads.fc1, &rank.grads.fc1_bias,
                                      &rank.grads.fc2, &rank.grads.fc2_bias})
          for (float v : g->download()) grads_after_refusal[r].push_back(v);
        backward(false);    // 2: the refused backward consumed the forward
        forward();          // 3
        backward(true);     // 4: both ask for dx alone
        dx_alone[r] = dx.download();
        forward();          // 5
        backward(false);    // 6: both ask for the gradients too
        dx_plain[r] = dx.download();
        return Status::OK();
      });
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 7u);
    for (size_t i : {0, 3, 4, 5, 6}) EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    EXPECT_EQ(steps[r][1].code(), StatusCode::kInvalidArgument) << steps[r][1];
    EXPECT_NE(steps[r][1].message().find("disagree on this backward"), std::string_view::npos) << steps[r][1];
    EXPECT_EQ(steps[r][2].code(), StatusCode::kInvalidArgument) << steps[r][2];
    EXPECT_TRUE(graphs::testing::bits_equal("gradients after the refused backward", grads_after_refusal[r],
                           std::vector<float>(grads_after_refusal[r].size(), 0.f)));
    EXPECT_TRUE(graphs::testing::bits_equal("dx alone", dx_alone[r], dx_plain[r]));
  }
}

// The group's gradient norm is the whole layer's, the same on every rank: every rank's expert
// slices and the gate's gradient summed over the group (rtol 1e-5 of a double sum of the ranks'
// downloaded gradients, the same bits on both ranks). The two control collectives called out of
// order (one rank the norm, the other the gate's sum) are refused on both, naming them, and run
// neither: the gate's gradient is summed once, by the step that follows (rtol 1e-6).
TEST(ExpertParallelLimits, TheGradientNormIsTheGroupsAndControlCallsOutOfOrderAreRefused) {
  const TwoRankCase c;
  SCOPED_TRACE("seed " + std::to_string(c.seed));
  constexpr int W = 2;
  std::vector<std::vector<Status>> steps(W);
  std::vector<double> norms(W, -1);
  std::vector<std::vector<float>> experts(W), gate_before(W), gate_after(W);
  const std::vector<Status> setup = run_simulated_layers(
      c.spec, c.whole, c.rank_seeds, [&](int r, SimulatedDevice& device, RankLayer& rank) -> Status {
        RankIo io(device, rank.rng);
        DeviceTensor &x = io.x, &y = io.y, &dy = io.dy, &dx = io.dx;
        ExpertParallelLayer::Saved saved;
        steps[r].push_back(rank.layer.forward(rank.params.weights(), x.view(), y.view(), nullptr, &saved));
        steps[r].push_back(rank.layer.backward(rank.params.weights(), dy.view(), 0.3f, dx.view(),
                                               rank.grads.weights(), saved));
        for (const DeviceTensor* g : {&rank.grads.fc1, &rank.grads.fc1_bias, &rank.grads.fc2, &rank.grads.fc2_bias})
          for (float v : g->download()) experts[r].push_back(v);
        gate_before[r] = rank.grads.gate.download();
        // 2: out of order.
        steps[r].push_back(r == 0 ? rank.layer.grad_sum_squares(rank.grads.weights()).status()
                                  : rank.layer.all_reduce_gate_grad(rank.grads.gate.view()));
        Result<double> squares = rank.layer.grad_sum_squares(rank.grads.weights());  // 3
        steps[r].push_back(squares.status());
        if (squares.ok()) norms[r] = std::sqrt(*squares);
        steps[r].push_back(rank.layer.all_reduce_gate_grad(rank.grads.gate.view()));  // 4
        gate_after[r] = rank.grads.gate.download();
        return Status::OK();
      });
  double squares = 0;
  std::vector<double> gate_sum(gate_before[0].size(), 0.0);
  for (int r = 0; r < W; ++r) {
    for (float v : experts[r]) squares += double(v) * double(v);
    for (size_t i = 0; i < gate_sum.size() && i < gate_before[r].size(); ++i) gate_sum[i] += gate_before[r][i];
  }
  for (double v : gate_sum) squares += v * v;
  const double want = std::sqrt(squares);
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 5u);
    for (size_t i : {0, 1, 3, 4}) EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    EXPECT_EQ(steps[r][2].code(), StatusCode::kInvalidArgument) << steps[r][2];
    EXPECT_NE(steps[r][2].message().find(r == 0 ? "this rank grad_norm, another step" : "this rank step, another grad_norm"),
              std::string_view::npos)
        << steps[r][2];
    EXPECT_NEAR(norms[r], want, 1e-5 * want);
    EXPECT_TRUE(all_close("the gate's gradient after the step's sum", gate_after[r], gate_sum, 1e-6, 1e-7));
  }
  EXPECT_EQ(norms[0], norms[1]);
}

// Calls out of step across the ranks (one rank's forward meeting another's step, a backward
// meeting a grad_norm, a refused forward meeting a step, backwards of two micro-batches in
// opposite orders) meet in one agreement of one width: both ranks refuse the call they are in,
// naming both (the group's forwards by number), and the group goes on in step: after a forward
// one rank refuses and the other runs (counted alike by both), the next forward, backward and
// step run on both, and the gate's gradient is summed once, by that step (a step whose ranks
// pass different values they must pass alike, say learning rates, is refused on both first, and
// one told not to sum sums nothing; each rank's y of the last forward equals its y of the first
// that ran, bit for bit).
TEST(ExpertParallelLimits, CallsOutOfStepAreRefusedOnEveryRankNamingBothAndTheGroupGoesOn) {
  const TwoRankCase c;
  SCOPED_TRACE("seed " + std::to_string(c.seed));
  constexpr int W = 2;
  std::vector<std::vector<Status>> steps(W);
  std::vector<std::vector<float>> first_y(W), last_y(W), gate_before(W), gate_after(W);
  const std::vector<Status> setup = run_simulated_layers(
      c.spec, c.whole, c.rank_seeds, [&](int r, SimulatedDevice& device, RankLayer& rank) -> Status {
        RankIo io(device, rank.rng);
        ExpertParallelLayer::Saved first, second, a, b, refused;
        auto forward = [&](ExpertParallelLayer::Saved& saved) {
          return rank.layer.forward(rank.params.weights(), io.x.view(), io.y.view(), nullptr, &saved);
        };
        auto backward = [&](ExpertParallelLayer::Saved& saved) {
          return rank.layer.backward(rank.params.weights(), io.dy.view(), 0.3f, io.dx.view(),
                                     rank.grads.weights(), saved);
        };
        auto step = [&] { return rank.layer.all_reduce_gate_grad(rank.grads.gate.view()); };
        auto grad_norm = [&] { return rank.layer.grad_sum_squares(rank.grads.weights()).status(); };
        steps[r].push_back(r == 0 ? forward(first) : step());  // 0: out of step
        steps[r].push_back(forward(first));                     // 1
        first_y[r] = io.y.download();
        steps[r].push_back(r == 0 ? backward(first) : grad_norm());  // 2: out of step
        steps[r].push_back(r == 0 ? rank.layer.refuse_forward(Status::ResourceExhausted("refused here"))
                                  : step());  // 3: out of step
        // The group's forwards 2 and 3, backwarded in opposite orders: both backwards refused.
        steps[r].push_back(forward(a));                     // 4
        steps[r].push_back(forward(b));                     // 5
        steps[r].push_back(backward(r == 0 ? a : b));       // 6: out of step
        steps[r].push_back(backward(r == 0 ? b : a));       // 7: out of step
        // 8: the group's forward 4, refused by rank 0 before it runs: refused on both.
        steps[r].push_back(r == 0 ? rank.layer.refuse_forward(Status::ResourceExhausted("refused here"))
                                  : forward(refused));
        steps[r].push_back(forward(second));  // 9: the group's forward 5 on both
        last_y[r] = io.y.download();
        steps[r].push_back(backward(second));  // 10
        gate_before[r] = rank.grads.gate.download();
        // 11: a step whose ranks pass different values they must pass alike: refused on both,
        // nothing summed; 12: alike, and told not to sum: nothing summed either.
        const ExpertParallelLayer::Alike differ[] = {{"weight decays", 0}, {"learning rates", r == 0 ? 5 : 7}};
        steps[r].push_back(rank.layer.all_reduce_gate_grad(rank.grads.gate.view(), differ));
        const ExpertParallelLayer::Alike same[] = {{"learning rates", 5}};
        steps[r].push_back(rank.layer.all_reduce_gate_grad(rank.grads.gate.view(), same, /*sum=*/false));
        steps[r].push_back(step());  // 13
        gate_after[r] = rank.grads.gate.download();
        return Status::OK();
      });
  const char* want[W][5] = {{"this rank forward, another step", "this rank backward, another grad_norm",
                             "this rank forward, another step", "this rank the group's forward 2, another forward 3",
                             "this rank the group's forward 3, another forward 2"},
                            {"this rank step, another forward", "this rank grad_norm, another backward",
                             "this rank step, another forward", "this rank the group's forward 3, another forward 2",
                             "this rank the group's forward 2, another forward 3"}};
  std::vector<double> gate_sum;
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), 14u);
    for (size_t i : {1, 4, 5, 9, 10, 12, 13}) EXPECT_TRUE(steps[r][i].ok()) << "step " << i << ": " << steps[r][i];
    EXPECT_EQ(steps[r][11].code(), StatusCode::kInvalidArgument) << steps[r][11];
    EXPECT_NE(steps[r][11].message().find("stepped with different learning rates"), std::string_view::npos)
        << steps[r][11];
    EXPECT_EQ(steps[r][8].code(), StatusCode::kResourceExhausted) << steps[r][8];
    const std::array<size_t, 5> refused = {0, 2, 3, 6, 7};
    for (size_t j = 0; j < refused.size(); ++j) {
      const Status& st = steps[r][refused[j]];
      EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
      EXPECT_NE(st.message().find(want[r][j]), std::string_view::npos) << st;
    }
    EXPECT_TRUE(graphs::testing::bits_equal("y of the forward after the refusals", last_y[r], first_y[r]));
    gate_sum.resize(gate_before[r].size(), 0.0);
    for (size_t i = 0; i < gate_sum.size(); ++i) gate_sum[i] += gate_before[r][i];
  }
  for (int r = 0; r < W; ++r) EXPECT_TRUE(all_close("the gate's gradient after the step", gate_after[r], gate_sum, 1e-6, 1e-7));
}

// A tuning candidate the group cannot allocate (r = 0 gathers every expert's weights; rank 1 has
// room for r = 1's buffers only) is refused by the group together, dropped from the bucket on
// both ranks, and the same forward runs the next candidate: no forward fails, the bucket
// decides r = 1 with r = 0 marked refused, and every y equals an untuned r = 1 layer's.
TEST(ExpertParallelLimits, ATuningCandidateTheGroupCannotAllocateIsDroppedNotOfferedAgain) {
  const LayerSpec spec = base_spec(4, 16, 4096, 2, 1.0);  // r = 0 gathers ~2 MiB of weights
  constexpr int W = 2;
  const int64_t S = 8, M = 16, O = 16;
  constexpr int kForwards = 6;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const HostLayerParams whole = to_host(random_params(rng, spec));
  const std::vector<uint64_t> rank_seeds = {rng(), rng()};
  std::vector<std::vector<Status>> steps(W);
  std::vector<std::vector<bool>> same_y(W);
  std::vector<std::vector<graphs::TunerEntry>> entries(W);
  const std::vector<Status> setup = run_simulated_ranks(
      W, [&](int r, SimulatedDevice& device, DeviceCollectives& device_comm) -> Status {
        std::mt19937_64 rank_rng(rank_seeds[r]);
        graphs::ExpertParallelOptions tuned;
        tuned.tune.candidates = {graphs::kDataParallel, {comm::AllToAllAlgo::kLinear, 1, 1}};
        tuned.tune.warmups = 0;
        tuned.tune.trials = 1;
        auto layer = ExpertParallelLayer::create(device, device_comm, spec, tuned);
        if (!layer.ok()) return layer.status();
        auto fixed = ExpertParallelLayer::create(device, device_comm, spec);  // r = 1
        if (!fixed.ok()) return fixed.status();
        LocalTensors params(device, spec, layer->shard(), whole);
        DeviceTensor x(device, DType::kF32, {S, M}), y(device, DType::kF32, {S, O}),
            y_fixed(device, DType::kF32, {S, O});
        x.upload(to_f32(randn(rank_rng, S * M, 1.0)));
        ExpertParallelLayer::Saved fixed_saved, saved;
        if (Status s =
                fixed->forward(params.weights(), x.view(), y_fixed.view(), nullptr, &fixed_saved);
            !s.ok())
          return s;
        const std::vector<float> want = y_fixed.download();
        if (r == 1) device.limit_memory(device.live_bytes() + (size_t{1} << 20));
        for (int i = 0; i < kForwards; ++i) {
          steps[r].push_back(layer->forward(params.weights(), x.view(), y.view(), nullptr, &saved));
          same_y[r].push_back(steps[r].back().ok() && y.download() == want);
        }
        device.limit_memory(~size_t{0});
        entries[r] = layer->tuner()->entries();
        return Status::OK();
      });
  for (int r = 0; r < W; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    ASSERT_TRUE(setup[r].ok()) << setup[r];
    ASSERT_EQ(steps[r].size(), size_t{kForwards});
    for (int i = 0; i < kForwards; ++i) {
      EXPECT_TRUE(steps[r][i].ok()) << "forward " << i << ": " << steps[r][i];
      EXPECT_TRUE(same_y[r][i]) << "forward " << i << ": y differs from the r = 1 layer's";
    }
    ASSERT_EQ(entries[r].size(), 1u);
    const graphs::TunerEntry& e = entries[r][0];
    EXPECT_TRUE(e.decided);
    EXPECT_EQ(e.chosen.r, 1);
    EXPECT_EQ(e.excluded, (std::vector<bool>{true, false}));
  }
}

// A refusal for want of memory that every way of running the phase needs (a rank near its limit
// when the capacity grows), or with no way of another parallelism left, is the step's alone: the
// tuner keeps offering every candidate, and once the memory is back the bucket runs and is tuned
// as usual. (Dropping the way that happened to be running made the bucket run the others, or
// nothing, from then on.)
TEST(ExpertParallelLimits, AStepRefusedForMemoryEveryWayNeedsDropsNoTuningCandidate) {
  const LayerSpec spec = base_spec(4, 16, 32, 2, 1.0);
  constexpr int W = 2;
  const int64_t M = 16, O = 16, kSmall = 8, kLarge = 64;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const HostLayerParams whole = to_host(random_params(rng, spec));
  const std::vector<uint64_t> rank_seeds = {rng(), rng()};
  for (const bool with_data_parallel : {false, true}) {
    SCOPED_TRACE(with_data_parallel ? "candidates r=1 d=1, r=0" : "candidates r=1 d=1, r=1 d=2");
    std::vector<Status> refused(W), recovered(W);
    std::vector<std::vector<graphs::TunerEntry>> entries(W);
    const std::vector<Status> setup = run_simulated_ranks(
        W, [&](int r, SimulatedDevice& device, DeviceCollectives& device_comm) -> Status {
          std::mt19937_64 rank_rng(rank_seeds[r]);
          graphs::ExpertParallelOptions tuned;
          const graphs::ExchangeConfig one{comm::AllToAllAlgo::kLinear, 1, 1},
              two{comm::AllToAllAlgo::kLinear, 2, 1};
          tuned.tune.candidates = {one, with_data_parallel ? graphs::kDataParallel : two};
          tuned.tune.warmups = 0;
          tuned.tune.trials = 1;
          auto layer = ExpertParallelLayer::create(device, device_comm, spec, tuned);
          if (!layer.ok()) return layer.status();
          LocalTensors params(device, spec, layer->shard(), whole);
          DeviceTensor x(device, DType::kF32, {kLarge, M}), y(device, DType::kF32, {kLarge, O});
          x.upload(to_f32(randn(rank_rng, kLarge * M, 1.0)));
          ExpertParallelLayer::Saved saved;
          const TensorView small_x(x.view().data(), DType::kF32, {kSmall, M}, x.view().device()),
              small_y(y.view().data(), DType::kF32, {kSmall, O}, y.view().device());
          if (Status s = layer->forward(params.weights(), small_x, small_y, nullptr, &saved); !s.ok()) return s;
          // Rank 1 can allocate nothing more, and rank 0 brings more tokens: the agreed capacity
          // (a new bucket) needs larger buffers on both.
          if (r == 1) device.limit_memory(device.live_bytes());
          const TensorView x_r = r == 0 ? x.view() : small_x, y_r = r == 0 ? y.view() : small_y;
          refused[r] = layer->forward(params.weights(), x_r, y_r, nullptr, &saved);
          device.limit_memory(~size_t{0});
          recovered[r] = layer->forward(params.weights(), x_r, y_r, nullptr, &saved);
          entries[r] = layer->tuner()->entries();
          return Status::OK();
        });
    for (int r = 0; r < W; ++r) {
      SCOPED_TRACE("rank " + std::to_string(r));
      ASSERT_TRUE(setup[r].ok()) << setup[r];
      EXPECT_EQ(refused[r].code(), StatusCode::kResourceExhausted) << refused[r];
      EXPECT_TRUE(recovered[r].ok()) << recovered[r];
      ASSERT_EQ(entries[r].size(), 2u);
      for (const graphs::TunerEntry& e : entries[r])
        EXPECT_EQ(e.excluded, (std::vector<bool>{false, false})) << "bucket " << e.capacity_bucket;
    }
  }
}

// NCCL's abort waits until every graph that captured the communicator's collectives is
// destroyed (forever, while their owner keeps them): a layer on a capturing runner has the
// communicator drop the runner's graphs before a failed collective aborts it, and unregisters
// when it goes.
TEST(ExpertParallelGraphs, ACollectiveThatFailsDropsTheGraphsBeforeTheCommunicatorAborts) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const LayerSpec spec = base_spec(4, 16, 32, 2, 1.0);
  const int64_t S = 24, M = 16, O = 16;
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const ref::Params p = random_params(rng, spec);
  auto comm = comm::ucx_bootstrap(rank_options(free_port(), 0, 1, 1));
  ASSERT_TRUE(comm.ok()) << comm.status();
  auto inner = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(inner.ok()) << inner.status();
  SimulatedDevice device(std::move(inner).value());
  DeviceCollectives device_comm(**comm, device);
  Tape tape;
  TapeBackend tape_backend(device, tape);
  TapeCollectives tape_comm(device_comm, tape);
  graphs::GraphPhaseRunner runner(std::make_unique<TapeCapture>(tape));
  {
    graphs::ExpertParallelOptions options;
    options.runner = &runner;
    options.comm_on_backend_queue = true;
    auto layer = ExpertParallelLayer::create(tape_backend, tape_comm, spec, options);
    ASSERT_TRUE(layer.ok()) << layer.status();
    EXPECT_EQ(tape_comm.graph_releases(), 1u);
    LocalTensors params(tape_backend, spec, layer->shard(), to_host(p)),
        grads(tape_backend, spec, layer->shard());
    DeviceTensor x(tape_backend, DType::kF32, {S, M}), y(tape_backend, DType::kF32, {S, O});
    DeviceTensor dy(tape_backend, DType::kF32, {S, O}), dx(tape_backend, DType::kF32, {S, M});
    x.upload(to_f32(randn(rng, S * M, 1.0)));
    dy.upload(to_f32(randn(rng, S * O, 1.0)));
    ExpertParallelLayer::Saved saved;
    for (int round = 0; round < 3; ++round) {
      ASSERT_TRUE(layer->forward(params.weights(), x.view(), y.view(), nullptr, &saved).ok());
      ASSERT_TRUE(
          layer->backward(params.weights(), dy.view(), 0.f, dx.view(), grads.weights(), saved)
              .ok());
    }
    ASSERT_GT(runner.graphs(), 0u) << "the rounds should have captured the phases";
    size_t graphs_at_abort = ~size_t{0};
    tape_comm.fail_next([&] { graphs_at_abort = runner.graphs(); });
    const Status failed = layer->forward(params.weights(), x.view(), y.view(), nullptr, &saved);
    EXPECT_EQ(failed.code(), StatusCode::kAborted) << failed;
    EXPECT_EQ(graphs_at_abort, 0u) << "graphs left for NCCL's abort to wait for";
    EXPECT_EQ(runner.graphs(), 0u);
  }
  EXPECT_EQ(tape_comm.graph_releases(), 0u) << "the layer is gone: its release must be too";
  EXPECT_TRUE(tape.violations().empty());
}

// Records the key of every phase (and runs it op by op): what a graph of the phase would bake.
class KeyRecorder final : public graphs::PhaseRunner {
 public:
  bool captures() const override { return false; }
  Status run(const graphs::PhaseKey& key, const std::function<Status()>& ops) override {
    last_[key.phase] = key;
    return ops();
  }
  graphs::PhaseProposal propose(const graphs::PhaseKey&) const override { return {}; }
  Status run_as(const graphs::PhaseKey& key, graphs::PhaseMode, uint64_t,
                const std::function<Status()>& ops) override {
    return run(key, ops);
  }
  Status capture(const graphs::PhaseKey&, uint64_t, const std::function<Status()>&,
                 const std::function<uint64_t()>&) override {
    return Status::Internal("never asked: captures() is false");
  }
  void drop(const graphs::PhaseKey&) override {}
  void clear() override {}
  const graphs::PhaseRunnerStats& stats() const override { return stats_; }
  const graphs::PhaseKey& last(int phase) { return last_[phase]; }

 private:
  std::map<int, graphs::PhaseKey> last_;
  graphs::PhaseRunnerStats stats_;
};

// Every address and scalar a phase's ops use is in its key, each on its own: a graph captured
// for one set of them can never be launched for another. (The tape test changes them all at
// once; this one, one at a time.)
TEST(ExpertParallelPhaseKeys, EachAddressAndScalarChangesTheKeysOfThePhasesThatUseIt) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  // f > 0: C follows S, so every variant below runs at the same C.
  const LayerSpec spec = base_spec(4, 16, 32, 2, 1.0);
  auto comm = comm::ucx_bootstrap(rank_options(free_port(), 0, 1, 1));
  ASSERT_TRUE(comm.ok()) << comm.status();
  auto cpu = make_backend("cpu", {.threads = 1});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  Backend& b = **cpu;
  KeyRecorder keys;
  graphs::ExpertParallelOptions options;
  options.runner = &keys;
  auto layer = ExpertParallelLayer::create(b, **comm, spec, options);
  ASSERT_TRUE(layer.ok()) << layer.status();
  const ref::Params p = random_params(rng, spec);
  const HostLayerParams whole = to_host(p);
  LocalTensors params1(b, spec, layer->shard(), whole), params2(b, spec, layer->shard(), whole),
      grads1(b, spec, layer->shard()), grads2(b, spec, layer->shard());
  const int64_t S = 24, M = 16, O = 16;
  DeviceTensor x1(b, DType::kF32, {S, M}), x2(b, DType::kF32, {S, M}), y1(b, DType::kF32, {S, O}),
      y2(b, DType::kF32, {S, O}), dy1(b, DType::kF32, {S, O}), dy2(b, DType::kF32, {S, O}),
      dx1(b, DType::kF32, {S, M}), dx2(b, DType::kF32, {S, M});
  for (DeviceTensor* t : {&x1, &x2}) t->upload(to_f32(randn(rng, S * M, 1.0)));
  for (DeviceTensor* t : {&dy1, &dy2}) t->upload(to_f32(randn(rng, S * O, 1.0)));
  ExpertParallelLayer::Saved saved_a, saved_b;
  constexpr int kRoute = 1, kExperts = 2, kBackward = 3;  // ExpertParallelLayer's phases

  auto forward = [&](LocalTensors& w, DeviceTensor& x, DeviceTensor& y,
                     ExpertParallelLayer::Saved* saved) {
    ASSERT_TRUE(layer->forward(w.weights(), x.view(), y.view(), nullptr, saved).ok());
  };
  auto backward = [&](LocalTensors& w, DeviceTensor& dy, float dl_aux, DeviceTensor& dx,
                      LocalTensors& g) {
    forward(w, x1, y1, &saved_a);
    ASSERT_TRUE(
        layer->backward(w.weights(), dy.view(), dl_aux, dx.view(), g.weights(), saved_a).ok());
  };
  // Warm up: every buffer at its size (a reallocation moves every key).
  forward(params1, x1, y1, &saved_b);
  ASSERT_TRUE(
      layer->backward(params1.weights(), dy1.view(), 0.5f, dx1.view(), grads1.weights(), saved_b)
          .ok());
  backward(params1, dy1, 0.5f, dx1, grads1);
  forward(params1, x1, y1, nullptr);

  forward(params1, x1, y1, &saved_a);
  const graphs::PhaseKey route = keys.last(kRoute), experts = keys.last(kExperts);
  forward(params1, x1, y1, &saved_a);
  EXPECT_EQ(keys.last(kRoute), route) << "the same step must keep its keys";
  EXPECT_EQ(keys.last(kExperts), experts);
  forward(params1, x1, y2, &saved_a);
  EXPECT_EQ(keys.last(kRoute), route) << "route does not touch y";
  EXPECT_NE(keys.last(kExperts), experts) << "y";
  forward(params1, x2, y1, &saved_a);
  EXPECT_NE(keys.last(kRoute), route) << "x";
  EXPECT_NE(keys.last(kExperts), experts) << "x";
  forward(params1, x1, y1, &saved_b);
  EXPECT_NE(keys.last(kRoute), route) << "the Saved";
  EXPECT_NE(keys.last(kExperts), experts) << "the Saved";
  forward(params1, x1, y1, nullptr);
  EXPECT_NE(keys.last(kRoute), route) << "inference";
  EXPECT_NE(keys.last(kExperts), experts) << "inference";
  forward(params2, x1, y1, &saved_a);
  EXPECT_NE(keys.last(kRoute), route) << "the weights";
  EXPECT_NE(keys.last(kExperts), experts) << "the weights";
  // The objects stay where they are, their buffers trade places: a key that named the Saved by
  // its address would replay saved_a's old buffers.
  std::swap(saved_a, saved_b);
  forward(params1, x1, y1, &saved_a);
  EXPECT_NE(keys.last(kRoute), route) << "the Saved's buffers";
  EXPECT_NE(keys.last(kExperts), experts) << "the Saved's buffers";

  backward(params1, dy1, 0.5f, dx1, grads1);
  const graphs::PhaseKey back = keys.last(kBackward);
  backward(params1, dy1, 0.5f, dx1, grads1);
  EXPECT_EQ(keys.last(kBackward), back) << "the same step must keep its key";
  backward(params1, dy2, 0.5f, dx1, grads1);
  EXPECT_NE(keys.last(kBackward), back) << "dy";
  backward(params1, dy1, 0.5f, dx2, grads1);
  EXPECT_NE(keys.last(kBackward), back) << "dx";
  backward(params1, dy1, 0.25f, dx1, grads1);
  EXPECT_NE(keys.last(kBackward), back) << "dl_aux";
  backward(params1, dy1, 0.5f, dx1, grads2);
  EXPECT_NE(keys.last(kBackward), back) << "the gradients";
  backward(params2, dy1, 0.5f, dx1, grads1);
  EXPECT_NE(keys.last(kBackward), back) << "the weights";
  EXPECT_TRUE((*comm)->barrier().ok());
}

INSTANTIATE_TEST_SUITE_P(Groups, ExpertParallelOnDevice, ::testing::ValuesIn(device_cases()),
                         [](const ::testing::TestParamInfo<DeviceCase>& info) {
                           return info.param.name;
                         });

// On a real GPU (skipped without one, or without NCCL): the CUDA backend over an NCCL
// communicator made as the daemon makes one (nccl_from_host over the UCX group, on the
// backend's stream) against the CPU backend over that UCX communicator. One rank, as a machine
// has one GPU per rank and NCCL one rank per GPU: the exchanges stay local, but every step runs
// on the device (the counts brought to the host, the capacity agreed through device memory,
// the all-to-alls and the gate gradient's all-reduce through NCCL). Tolerances as the CUDA
// layer parity: forward rtol 1e-4 / atol 1e-5, gradients rtol 1e-3 / atol 1e-4; capacity and
// dropped counts exactly (inputs are redrawn until no routing decision is near a tie).
// kGraphs: the daemon's way on a GPU: NCCL enqueues on the backend's stream without waiting, and
// the layer's phases are CUDA graphs with the NCCL calls captured inside (make_phase_runner),
// over kGraphRounds rounds so that graphs are captured and launched again.
void run_on_cuda(DeviceRun how, int pipeline = 1, int r = 1, DType matmul = DType::kF32,
                 std::vector<std::vector<int64_t>> tokens = {{40}, {27}}) {
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  DeviceCase c{"OneRank", 1, 4, 32, 0, 2, 1.0, Activation::kGelu, std::move(tokens)};
  c.pipeline = pipeline;
  c.r = r;
  c.matmul = matmul;
  const LayerSpec spec = spec_of(c);
  const int64_t M = spec.model_dim, O = spec.out_dim();
  ref::Params p;
  std::vector<std::vector<float>> xs, dys;
  for (int attempt = 0;; ++attempt) {
    ASSERT_LT(attempt, 100) << "could not draw inputs without near-ties";
    p = random_params(rng, spec);
    xs.clear();
    dys.clear();
    bool ties = false;
    for (int m = 0; m < kMicroBatches; ++m) {
      const int64_t S = c.tokens[m][0];
      const std::vector<double> x = round_f32(randn(rng, S * M, 1.0));
      ties |= ref::forward(to_ref(spec, S), p, x, nullptr).min_order_margin < 1e-6;
      xs.push_back(to_f32(x));
      dys.push_back(to_f32(randn(rng, S * O, 1.0)));
    }
    if (!ties) break;
  }
  const HostLayerParams whole = to_host(p);

  auto host = comm::ucx_bootstrap(rank_options(free_port(), 0, 1, 1));
  ASSERT_TRUE(host.ok()) << host.status();
  auto cpu = make_backend("cpu", {.threads = 2});
  auto gpu = make_backend("cuda", {});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  comm::NcclOptions nccl;
  nccl.device = 0;
  nccl.stream = (*gpu)->native_stream();
  nccl.synchronize = how == DeviceRun::kOpByOp;
  auto device_comm = comm::nccl_from_host(**host, nccl, std::chrono::seconds(20));
  ASSERT_TRUE(device_comm.ok()) << device_comm.status();

  const int rounds = how == DeviceRun::kGraphs ? kGraphRounds : 1;
  std::unique_ptr<graphs::PhaseRunner> runner;
  if (how == DeviceRun::kGraphs) {
    runner = graphs::make_phase_runner(**gpu);
    ASSERT_TRUE(runner->captures()) << "the CUDA backend has no stream to capture";
  }
  const StepResults want = run_steps(**cpu, **host, c, spec, whole, xs, dys, rounds);
  const StepResults got =
      run_steps(**gpu, **device_comm, c, spec, whole, xs, dys, rounds, runner.get());
  ASSERT_TRUE(want.status.ok()) << "cpu: " << want.status;
  ASSERT_TRUE(got.status.ok()) << "cuda: " << got.status;
  if (runner) {
    // Every phase was captured: a failed capture runs op by op with the same results, so only
    // these counts tell that the NCCL calls really ran inside graphs.
    EXPECT_GT(runner->stats().captures, 0u);
    EXPECT_EQ(runner->stats().capture_failures, 0u);
    EXPECT_GE(runner->stats().launches, 2 * runner->stats().captures);
    EXPECT_GT((*device_comm)->captured_traffic(), 0u) << "no collective was issued into a graph";
  }
  auto wide = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  // bf16 matmuls on two backends: the CPU layer's bf16 tolerances (GELU here, no ReLU kink).
  const bool bf16 = matmul == DType::kBF16;
  const double y_rtol = bf16 ? 3e-2 : 1e-4, y_atol = bf16 ? 3e-2 : 1e-5,
               g_rtol = bf16 ? 3e-2 : 1e-3, g_atol = bf16 ? 3e-2 : 1e-4;
  for (int m = 0; m < kMicroBatches; ++m) {
    SCOPED_TRACE("micro-batch " + std::to_string(m));
    EXPECT_EQ(got.stats[m].capacity, want.stats[m].capacity);
    EXPECT_EQ(got.stats[m].dropped, want.stats[m].dropped);
    EXPECT_NEAR(got.stats[m].l_aux, want.stats[m].l_aux, 1e-5);
    EXPECT_TRUE(all_close("y", got.y[m], wide(want.y[m]), y_rtol, y_atol));
    EXPECT_TRUE(all_close("dx", got.dx[m], wide(want.dx[m]), g_rtol, g_atol));
  }
  EXPECT_TRUE(all_close("inference y", got.y_inference, wide(want.y_inference), y_rtol, y_atol));
  EXPECT_TRUE(all_close("d_wg", got.d_wg, wide(want.d_wg), g_rtol, g_atol));
  EXPECT_TRUE(all_close("d_fc1_w", got.d_fc1, wide(want.d_fc1), g_rtol, g_atol));
  EXPECT_TRUE(all_close("d_fc1_b", got.d_b1, wide(want.d_b1), g_rtol, g_atol));
  EXPECT_TRUE(all_close("d_fc2_w", got.d_fc2, wide(want.d_fc2), g_rtol, g_atol));
  EXPECT_TRUE(all_close("d_fc2_b", got.d_b2, wide(want.d_b2), g_rtol, g_atol));
}

TEST(ExpertParallelOnCuda, OneRankOverNcclMatchesTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  run_on_cuda(DeviceRun::kOpByOp);
}

TEST(ExpertParallelOnCuda, OneRankInCudaGraphsWithNcclInsideMatchesTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  run_on_cuda(DeviceRun::kGraphs);
}

// Three chunks (d = 3: their NCCL all-to-alls in order on the stream, inside the graphs), and
// r = 0 (an NCCL all-gather of the weights and a reduce-scatter of their gradients, captured).
TEST(ExpertParallelOnCuda, OneRankPipelinedAndDataParallelInCudaGraphsMatchTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  {
    SCOPED_TRACE("d = 3");
    run_on_cuda(DeviceRun::kGraphs, /*pipeline=*/3);
  }
  {
    SCOPED_TRACE("r = 0");
    run_on_cuda(DeviceRun::kGraphs, /*pipeline=*/1, /*r=*/0);
  }
}

// bf16 matmuls, the GPU's default: bf16 dispatched rows through NCCL (whole and in three chunks)
// and r = 0's gathered weights, in CUDA graphs, against the CPU backend at bf16 tolerances.
TEST(ExpertParallelOnCuda, OneRankBf16InCudaGraphsMatchesTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  for (const int pipeline : {1, 3}) {
    SCOPED_TRACE("d = " + std::to_string(pipeline));
    run_on_cuda(DeviceRun::kGraphs, pipeline, /*r=*/1, DType::kBF16);
  }
  SCOPED_TRACE("r = 0");
  run_on_cuda(DeviceRun::kGraphs, /*pipeline=*/1, /*r=*/0, DType::kBF16);
}

// An empty micro-batch (S = 0; alone, the group's capacity is 0): the routing kernels are not
// asked to run, the NCCL exchanges move nothing, in graphs and op by op, r = 1 and r = 0.
TEST(ExpertParallelOnCuda, OneRankWithAnEmptyMicroBatchMatchesTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  for (const DeviceRun how : {DeviceRun::kOpByOp, DeviceRun::kGraphs})
    for (const int r : {1, 0}) {
      SCOPED_TRACE(std::string(how == DeviceRun::kGraphs ? "graphs" : "op by op") + ", r = " + std::to_string(r));
      run_on_cuda(how, /*pipeline=*/1, r, DType::kF32, {{40}, {0}});
    }
}

}  // namespace
}  // namespace tutel::testing
