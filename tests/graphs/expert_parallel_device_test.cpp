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

#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "../common/loopback.hpp"
#include "../kernels/bf16_copy_checks.hpp"
#include "../kernels/layer_test_util.hpp"
#include "expert_parallel_test_util.hpp"
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
class DeviceCollectives final : public comm::Communicator {
 public:
  DeviceCollectives(comm::Communicator& inner, SimulatedDevice& device)
      : inner_(inner), device_(device) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  int local_size() const override { return inner_.local_size(); }
  Status all_to_all(const void* send, void* recv, size_t chunk_bytes,
                    comm::AllToAllAlgo algo) override {
    SimulatedDevice::Access open(device_);
    return inner_.all_to_all(send, recv, chunk_bytes, algo);
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
  Status barrier() override { return inner_.barrier(); }
  Result<std::unique_ptr<Communicator>> split(int color, int key) override {
    return Status::Unimplemented("not needed by the layer");
  }
  std::vector<comm::PeerStatus> peers() const override { return inner_.peers(); }

 private:
  comm::Communicator& inner_;
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
};
void PrintTo(const DeviceCase& c, std::ostream* os) { *os << c.name; }

std::vector<DeviceCase> device_cases() {
  return {
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
  };
}

// What one rank's steps produced, downloaded to the host.
struct StepResults {
  Status status;
  RoutingStats stats[kMicroBatches];
  std::vector<float> y[kMicroBatches], dx[kMicroBatches], y_inference;
  std::vector<float> d_wg, d_fc1, d_b1, d_fc2, d_b2;
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

// The steps of one rank on `b`: two training forwards, an inference forward, the backwards in
// reverse order, the gate gradient's all-reduce. Collective: every rank runs it at once.
StepResults run_steps(Backend& b, comm::Communicator& comm, const DeviceCase& c,
                      const LayerSpec& spec, const HostLayerParams& whole,
                      const std::vector<std::vector<float>>& xs,
                      const std::vector<std::vector<float>>& dys) {
  StepResults out;
  auto layer = ExpertParallelLayer::create(b, comm, spec, c.algo);
  if (!layer.ok()) {
    out.status = layer.status();
    return out;
  }
  const int64_t M = spec.model_dim, O = spec.out_dim();
  LocalTensors params(b, spec, layer->shard()), grads(b, spec, layer->shard());
  params.upload(graphs::slice_for_rank(spec, layer->shard(), whole));
  ExpertParallelLayer::Saved saved[kMicroBatches];
  for (int m = 0; m < kMicroBatches; ++m) {
    const int64_t S = static_cast<int64_t>(xs[m].size()) / M;
    DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O});
    x.upload(xs[m]);
    out.status = layer->forward(params.weights(), x.view(), y.view(), &out.stats[m], &saved[m]);
    if (!out.status.ok()) return out;
    out.y[m] = y.download();
    // The caller may reuse x's memory: backward must read the forward's own copy.
    x.upload(std::vector<float>(S * M, 1e3f));
  }
  {
    const int64_t S = static_cast<int64_t>(xs[0].size()) / M;
    DeviceTensor x(b, DType::kF32, {S, M}), y(b, DType::kF32, {S, O});
    x.upload(xs[0]);
    out.status = layer->forward(params.weights(), x.view(), y.view(), nullptr);
    if (!out.status.ok()) return out;
    out.y_inference = y.download();
  }
  for (int m = kMicroBatches - 1; m >= 0; --m) {
    const int64_t S = static_cast<int64_t>(xs[m].size()) / M;
    DeviceTensor dy(b, DType::kF32, {S, O}), dx(b, DType::kF32, {S, M});
    dy.upload(dys[m]);
    out.status = layer->backward(params.weights(), dy.view(), 0.25f * (m + 1), dx.view(),
                                 grads.weights(), saved[m]);
    if (!out.status.ok()) return out;
    out.dx[m] = dx.download();
  }
  out.status = layer->all_reduce_gate_grad(grads.gate.view());
  if (!out.status.ok()) return out;
  out.d_wg = grads.gate.download();
  out.d_fc1 = grads.fc1.download();
  out.d_b1 = grads.fc1_bias.download();
  out.d_fc2 = grads.fc2.download();
  out.d_b2 = grads.fc2_bias.download();
  return out;
}

class ExpertParallelOnDevice : public ::testing::TestWithParam<DeviceCase> {};

TEST_P(ExpertParallelOnDevice, MatchesTheCpuBackendBitForBitWithoutTouchingDeviceMemory) {
  const DeviceCase& c = GetParam();
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);

  LayerSpec spec;
  spec.experts = c.experts;
  spec.model_dim = 16;
  spec.hidden = c.hidden;
  spec.output_dim = c.output_dim;
  spec.k = c.k;
  spec.capacity_factor = c.f;
  spec.activation = c.activation;
  spec.is_postscore = c.is_postscore;
  const int W = c.world;
  const int64_t M = spec.model_dim, O = spec.out_dim();
  ASSERT_EQ(static_cast<int>(c.tokens.size()), kMicroBatches);

  const ref::Params p = random_params(rng, spec);
  const HostLayerParams whole{to_f32(p.wg), to_f32(p.fc1_w), to_f32(p.fc1_b), to_f32(p.fc2_w),
                              to_f32(p.fc2_b)};
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
  };
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
      out.cpu = run_steps(**cpu, **comm, c, spec, whole, xs[r], dys[r]);
      // Both runs are collectives: a rank whose CPU run failed still joins the device run, so
      // that no peer waits for it until the timeout.
      SimulatedDevice device(std::move(inner).value());
      device.guard_host_access();
      DeviceCollectives device_comm(**comm, device);
      out.device = run_steps(device, device_comm, c, spec, whole, xs[r], dys[r]);
      out.violations = device.violations();
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
TEST(ExpertParallelOnCuda, OneRankOverNcclMatchesTheCpuBackend) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device: compiled, not run";
  if (!comm::nccl_available()) GTEST_SKIP() << "this build has no NCCL";
  ::setenv("UCX_NET_DEVICES", "lo", 1);
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  const DeviceCase c{"OneRank", 1, 4, 32, 0, 2, 1.0, Activation::kGelu, {{40}, {27}}};
  LayerSpec spec;
  spec.experts = c.experts;
  spec.model_dim = 16;
  spec.hidden = c.hidden;
  spec.k = c.k;
  spec.capacity_factor = c.f;
  spec.activation = c.activation;
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
      ties |= ref::forward(to_ref(spec, S), p, x, nullptr).min_topk_margin < 1e-6;
      xs.push_back(to_f32(x));
      dys.push_back(to_f32(randn(rng, S * O, 1.0)));
    }
    if (!ties) break;
  }
  const HostLayerParams whole{to_f32(p.wg), to_f32(p.fc1_w), to_f32(p.fc1_b), to_f32(p.fc2_w),
                              to_f32(p.fc2_b)};

  auto host = comm::ucx_bootstrap(rank_options(free_port(), 0, 1, 1));
  ASSERT_TRUE(host.ok()) << host.status();
  auto cpu = make_backend("cpu", {.threads = 2});
  auto gpu = make_backend("cuda", {});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  comm::NcclOptions nccl;
  nccl.device = 0;
  nccl.stream = (*gpu)->native_stream();
  auto device_comm = comm::nccl_from_host(**host, nccl, std::chrono::seconds(20));
  ASSERT_TRUE(device_comm.ok()) << device_comm.status();

  const StepResults want = run_steps(**cpu, **host, c, spec, whole, xs, dys);
  const StepResults got = run_steps(**gpu, **device_comm, c, spec, whole, xs, dys);
  ASSERT_TRUE(want.status.ok()) << "cpu: " << want.status;
  ASSERT_TRUE(got.status.ok()) << "cuda: " << got.status;
  auto wide = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  for (int m = 0; m < kMicroBatches; ++m) {
    SCOPED_TRACE("micro-batch " + std::to_string(m));
    EXPECT_EQ(got.stats[m].capacity, want.stats[m].capacity);
    EXPECT_EQ(got.stats[m].dropped, want.stats[m].dropped);
    EXPECT_NEAR(got.stats[m].l_aux, want.stats[m].l_aux, 1e-5);
    EXPECT_TRUE(all_close("y", got.y[m], wide(want.y[m]), 1e-4, 1e-5));
    EXPECT_TRUE(all_close("dx", got.dx[m], wide(want.dx[m]), 1e-3, 1e-4));
  }
  EXPECT_TRUE(all_close("inference y", got.y_inference, wide(want.y_inference), 1e-4, 1e-5));
  EXPECT_TRUE(all_close("d_wg", got.d_wg, wide(want.d_wg), 1e-3, 1e-4));
  EXPECT_TRUE(all_close("d_fc1_w", got.d_fc1, wide(want.d_fc1), 1e-3, 1e-4));
  EXPECT_TRUE(all_close("d_fc1_b", got.d_b1, wide(want.d_b1), 1e-3, 1e-4));
  EXPECT_TRUE(all_close("d_fc2_w", got.d_fc2, wide(want.d_fc2), 1e-3, 1e-4));
  EXPECT_TRUE(all_close("d_fc2_b", got.d_b2, wide(want.d_b2), 1e-3, 1e-4));
}

}  // namespace
}  // namespace tutel::testing
