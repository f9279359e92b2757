// tutel-bench ep: the expert-parallel layer, pipelined (d) and tuned, against its floors.
#include "ep_bench.hpp"

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>

#include "bench_util.hpp"
#include "forked_ranks.hpp"
#include "gemm_floor.hpp"
#include "tutel/comm/ucx.hpp"
#include "tutel/graphs/exchange_tuner.hpp"
#include "tutel/graphs/expert_parallel.hpp"
#include "weight_copies.hpp"

namespace tutel::bench {
namespace {

using Clock = std::chrono::steady_clock;

struct EpShape {
  const char* name;
  int64_t S, M, H, E;  // S per rank
  int k;
};

constexpr EpShape kShapes[] = {
    {"comm", 4096, 1024, 256, 8, 2},      // the exchange is ~1/4 of the GEMMs' time here
    {"compute", 2048, 1024, 2048, 8, 2},  // the GEMMs dominate
};

// The group's value of a per-rank time: its slowest rank's.
Result<int64_t> group_max(comm::Communicator& comm, int64_t mine) {
  TUTEL_RETURN_IF_ERROR(comm.all_reduce(&mine, 1, comm::ReduceOp::kMax));
  return mine;
}

// Median over `repeats` runs of `run`, each started together by every rank (a barrier), as the
// group's slowest rank saw it.
Result<int64_t> time_group(comm::Communicator& comm, int repeats,
                           const std::function<Status()>& run) {
  TUTEL_RETURN_IF_ERROR(run());  // warm-up: first-time allocations, oneDNN primitives
  std::vector<int64_t> ns;
  for (int i = 0; i < repeats; ++i) {
    TUTEL_RETURN_IF_ERROR(comm.barrier());
    const auto t0 = Clock::now();
    TUTEL_RETURN_IF_ERROR(run());
    ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count());
  }
  return group_max(comm, median(ns));
}

std::vector<float> random_vector(std::mt19937& rng, int64_t n, double scale) {
  std::normal_distribution<float> d(0.f, static_cast<float>(scale));
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

std::string ms(int64_t ns) {
  char b[32];
  std::snprintf(b, sizeof b, "%8.2f ms", ns / 1e6);
  return b;
}

Status ep_rank(int rank, int W, int threads, uint16_t port, const EpShape& shape,
               const std::vector<int>& pipelines, int repeats, DType matmul_dtype,
               const ReportPipe& report) {
  omp_set_num_threads(threads);
  comm::BootstrapOptions o;
  o.coordinator_host = "127.0.0.1";
  o.coordinator_port = port;
  o.rank = rank;
  o.size = W;
  o.timeout = std::chrono::seconds(30);
  o.collective_timeout = std::chrono::seconds(120);
  TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<comm::Communicator> comm, comm::ucx_bootstrap(o));
  TUTEL_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                         make_backend("cpu", {.threads = threads}));
  Backend& b = *backend;

  LayerSpec spec;
  spec.experts = shape.E;
  spec.model_dim = shape.M;
  spec.hidden = shape.H;
  spec.k = shape.k;
  spec.capacity_factor = 1.0;
  spec.matmul_dtype = matmul_dtype;
  const bool bf16 = matmul_dtype == DType::kBF16;
  TUTEL_ASSIGN_OR_RETURN(graphs::ExpertShard shard, graphs::expert_shard(spec, W, rank));
  const int64_t S = shape.S, M = shape.M, O = spec.out_dim(), E = shape.E, El = shard.local_experts,
                Hs = shard.hidden_shard;
  std::mt19937 rng(1234 + rank);
  graphs::HostLayerParams local;
  local.gate = random_vector(rng, E * M, 1.0 / std::sqrt(double(M)));
  local.fc1 = random_vector(rng, El * Hs * M, 1.0 / std::sqrt(double(M)));
  local.fc1_bias = random_vector(rng, El * Hs, 0.1);
  local.fc2 = random_vector(rng, El * Hs * O, 1.0 / std::sqrt(double(Hs)));
  local.fc2_bias = random_vector(rng, El * shard.out_shard, 0.1);
  graphs::HostLayerParams grads{
      std::vector<float>(local.gate.size()), std::vector<float>(local.fc1.size()),
      std::vector<float>(local.fc1_bias.size()), std::vector<float>(local.fc2.size()),
      std::vector<float>(local.fc2_bias.size())};
  auto weights_of = [&](graphs::HostLayerParams& p) {
    LayerWeights w;
    w.gate_weight = TensorView(p.gate.data(), DType::kF32, {E, M});
    w.experts.fc1_weight =
        TensorView(p.fc1.data(), DType::kF32, graphs::local_fc1_shape(spec, shard));
    w.experts.fc1_bias =
        TensorView(p.fc1_bias.data(), DType::kF32, graphs::local_fc1_bias_shape(spec, shard));
    w.experts.fc2_weight =
        TensorView(p.fc2.data(), DType::kF32, graphs::local_fc2_shape(spec, shard));
    w.experts.fc2_bias =
        TensorView(p.fc2_bias.data(), DType::kF32, graphs::local_fc2_bias_shape(spec, shard));
    return w;
  };
  // The weights the layer runs with: under bf16 with their bf16 copies, made once, as the
  // daemon keeps them.
  LayerWeights weights = weights_of(local);
  WeightCopies copies;
  if (bf16) TUTEL_RETURN_IF_ERROR(copies.attach(b, weights.experts));
  std::vector<float> x = random_vector(rng, S * M, 1.0), dy = random_vector(rng, S * O, 1.0),
                     y(S * O), dx(S * M);
  const TensorView xv(x.data(), DType::kF32, {S, M}), yv(y.data(), DType::kF32, {S, O}),
      dyv(dy.data(), DType::kF32, {S, O}), dxv(dx.data(), DType::kF32, {S, M});

  // f > 0: the capacity does not depend on the routing.
  LayerSpec aligned = spec;
  aligned.alignment = shard.shards;
  const int64_t C = layer_capacity(aligned, S, 0), R = W * C;

  // Floor 1: the expert GEMMs of this rank's forward alone (every rank at once, as in the step).
  TUTEL_RETURN_IF_ERROR(comm->barrier());
  const GemmTiming gemms = time_gemms(expert_forward_gemms(El, R, M, Hs, O), bf16, repeats);
  TUTEL_ASSIGN_OR_RETURN(const int64_t gemm_ns, group_max(*comm, int64_t(gemms.seconds * 1e9)));
  // Floor 2: the forward's two all-to-alls alone (dispatch [E, C, M] in the dispatch dtype,
  // combine [E, C, O] in f32), each slot travelling once: E·C/W slots to each peer (with E < W,
  // r = 1's share of an expert; r > 1 sends each slot to r ranks).
  std::vector<float> send(E * C * std::max(M, O), 1.f), recv(send.size());
  const size_t dispatch_size = dtype_size(spec.dispatch_dtype());
  TUTEL_ASSIGN_OR_RETURN(
      const int64_t a2a_ns, time_group(*comm, repeats, [&]() -> Status {
        const size_t chunk = size_t(E * C / W);
        TUTEL_RETURN_IF_ERROR(comm->all_to_all(send.data(), recv.data(), chunk * M * dispatch_size,
                                               comm::AllToAllAlgo::kLinear));
        return comm->all_to_all(send.data(), recv.data(), chunk * O * 4,
                                comm::AllToAllAlgo::kLinear);
      }));
  if (rank == 0) {
    // One line per report: the pipe turns newlines into spaces.
    char line[256];
    std::snprintf(line, sizeof line,
                  "%s: S=%lld/rank M=%lld H=%lld E=%lld k=%d f=1 C=%lld, %s matmuls, %d ranks x "
                  "%d thread(s)",
                  shape.name, (long long)S, (long long)M, (long long)shape.H, (long long)E, shape.k,
                  (long long)C, dtype_name(matmul_dtype).data(), W, threads);
    report.line(line);
    std::snprintf(line, sizeof line,
                  "  floor: expert GEMMs %s (%.0f GFLOP/s per rank), all-to-alls there and back %s",
                  ms(gemm_ns).c_str(), gemms.gflops(), ms(a2a_ns).c_str());
    report.line(line);
    std::snprintf(line, sizeof line,
                  "         their sum %s (d = 1's best), the larger %s (perfect overlap)",
                  ms(gemm_ns + a2a_ns).c_str(), ms(std::max(gemm_ns, a2a_ns)).c_str());
    report.line(line);
  }

  // r = 0 first (its floor is the GEMMs of all E experts over this rank's C slots, about the
  // same FLOPs, plus all-gathering the weights), then every r >= 1 (the divisors of s, the ranks
  // per expert: only 1 where E >= W) at each d.
  std::vector<graphs::ExchangeConfig> configs{graphs::kDataParallel};
  for (int r = 1; r <= shard.shards; ++r)
    if (shard.shards % r == 0)
      for (int d : pipelines) configs.push_back({comm::AllToAllAlgo::kLinear, d, r});
  for (const graphs::ExchangeConfig& config : configs) {
    graphs::ExpertParallelOptions options;
    options.r = config.r;
    options.pipeline = config.pipeline;
    TUTEL_ASSIGN_OR_RETURN(graphs::ExpertParallelLayer layer,
                           graphs::ExpertParallelLayer::create(b, *comm, spec, options));
    graphs::ExpertParallelLayer::Saved saved;
    TUTEL_ASSIGN_OR_RETURN(const int64_t fwd_ns, time_group(*comm, repeats, [&] {
                             return layer.forward(weights, xv, yv, nullptr);
                           }));
    TUTEL_ASSIGN_OR_RETURN(
        const int64_t train_ns, time_group(*comm, repeats, [&]() -> Status {
          TUTEL_RETURN_IF_ERROR(layer.forward(weights, xv, yv, nullptr, &saved));
          return layer.backward(weights, dyv, 1.f, dxv, weights_of(grads), saved);
        }));
    if (rank == 0) {
      char line[256];
      std::snprintf(line, sizeof line,
                    "  %-16s%s  forward %s  / sum %.2f  / larger %.2f    forward+backward %s",
                    config.to_string().c_str(),
                    layer.overlaps_chunks() || config.pipeline == 1 ? "" : " (in order)",
                    ms(fwd_ns).c_str(), double(fwd_ns) / double(gemm_ns + a2a_ns),
                    double(fwd_ns) / double(std::max(gemm_ns, a2a_ns)), ms(train_ns).c_str());
      report.line(line);
    }
  }

  // The tuner: what "auto" would choose here.
  graphs::ExpertParallelOptions options;
  options.tune.candidates = graphs::auto_candidates(
      {}, {}, {}, W, 1, graphs::ExpertParallelLayer::chunks_overlap(b, options),
      static_cast<int>(shard.shards));
  TUTEL_ASSIGN_OR_RETURN(graphs::ExpertParallelLayer tuned,
                         graphs::ExpertParallelLayer::create(b, *comm, spec, options));
  const int64_t bucket = graphs::ExchangeTuner::bucket_for(C);
  int forwards = 0;
  while (tuned.tuner()->measuring(bucket) && forwards < 200) {
    TUTEL_RETURN_IF_ERROR(tuned.forward(weights, xv, yv, nullptr));
    ++forwards;
  }
  if (rank == 0) {
    std::string line = "  tuner (r, a and d auto, " + std::to_string(options.tune.warmups) +
                       " warm-up and " + std::to_string(options.tune.trials) + " counted rounds): ";
    for (const graphs::TunerEntry& e : tuned.tuner()->entries()) {
      if (!e.decided) {
        line += "undecided after " + std::to_string(forwards) + " forwards";
        continue;
      }
      line += "chose " + e.chosen.to_string() + " after " + std::to_string(forwards) +
              " forwards; agreed totals:";
      const auto& c = tuned.tuner()->candidates();
      for (size_t i = 0; i < c.size(); ++i) {
        char part[64];
        std::snprintf(part, sizeof part, "%s %s %.1f ms", i == 0 ? "" : ";",
                      c[i].to_string().c_str(), e.total_ns[i] / 1e6);
        line += part;
      }
    }
    report.line(line);
  }
  return Status::OK();
}

}  // namespace

int run_ep_bench(const EpBenchOptions& options) {
  std::vector<int> pipelines;
  for (const std::string& item : split_list(options.pipelines)) {
    const int d = std::atoi(item.c_str());
    if (d < 1 || d > graphs::kMaxPipeline || std::to_string(d) != item) {
      std::fprintf(stderr, "tutel-bench ep: --pipelines '%s': each must be a pipeline degree, 1..%d\n",
                   item.c_str(), graphs::kMaxPipeline);
      return 2;
    }
    pipelines.push_back(d);
  }
  if (pipelines.empty()) {
    std::fprintf(stderr, "tutel-bench ep: --pipelines needs at least one pipeline degree\n");
    return 2;
  }
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  const int threads = std::max(1, cores / options.ranks);
  std::printf(
      "tutel-bench ep: the expert-parallel layer (%s matmuls, CPU backend) on %d forked ranks, "
      "UCX over tcp/lo with peer memory (two daemons' ranks on one host), medians of %d runs; the "
      "floors are measured by the same ranks in the same run. / sum: forward over (GEMMs + "
      "all-to-alls); / larger: over the larger of the two.\n\n",
      options.matmul_dtype.c_str(), options.ranks, options.repeats);
  const DType matmul_dtype = options.matmul_dtype == "bf16" ? DType::kBF16 : DType::kF32;
  int exit_code = 0;
  for (const std::string& name : split_list(options.shapes)) {
    const EpShape* shape = nullptr;
    for (const EpShape& s : kShapes)
      if (name == s.name) shape = &s;
    if (shape == nullptr) {
      std::fprintf(stderr, "tutel-bench ep: unknown shape '%s' (comm, compute)\n", name.c_str());
      return 2;
    }
    EpShape chosen = *shape;
    if (options.experts > 0) chosen.E = options.experts;
    chosen.k = static_cast<int>(std::min<int64_t>(chosen.k, chosen.E));
    shape = &chosen;
    const uint16_t port = free_loopback_port();
    const Status st = run_ranks(
        options.ranks, "tcp,self",
        [&](int rank, const ReportPipe& report) {
          return ep_rank(rank, options.ranks, threads, port, *shape, pipelines, options.repeats,
                         matmul_dtype, report);
        },
        [](const std::string& line) {
          std::printf("%s\n", line.c_str());
          std::fflush(stdout);
        });
    if (!st.ok()) {
      std::printf("%s: failed: %s\n", name.c_str(), st.to_string().c_str());
      exit_code = 1;
    }
    std::printf("\n");
  }
  return exit_code;
}

}  // namespace tutel::bench
