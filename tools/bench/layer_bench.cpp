#include "layer_bench.hpp"

#include <cmath>
#include <cstdio>
#include <random>
#include <string_view>
#include <vector>

#include "bench_util.hpp"
#include "gemm_floor.hpp"
#include "tutel/kernels/moe_layer.hpp"
#include "weight_copies.hpp"

namespace tutel::bench {
namespace {

// Allowed time / floor on the CPU (0: no target), by shape name; "all" runs the shapes listed.
struct CpuTargets {
  const char* shape;
  double forward, train;
};
constexpr CpuTargets kCpuTargets[] = {{"small", 2.0, 0}, {"large", 1.15, 1.3}};

struct BenchShape : LayerShape {
  double forward_target = 0, train_target = 0;
};

// A buffer on the backend filled with N(0, scale) values.
Result<DeviceBuffer> random_buffer(Backend& b, int64_t n, double scale, std::mt19937& rng) {
  std::vector<float> host(n);
  std::normal_distribution<float> d(0.f, static_cast<float>(scale));
  for (auto& v : host) v = d(rng);
  TUTEL_ASSIGN_OR_RETURN(DeviceBuffer buf, b.allocate(n * 4));
  TUTEL_RETURN_IF_ERROR(b.copy(buf.data(), host.data(), n * 4, CopyKind::kHostToDevice));
  return buf;
}

void print_row(const BenchShape& s, const char* step, double seconds, const GemmTiming& floor,
               double target) {
  const double ratio = seconds / floor.seconds;
  std::printf("%-6s %-16s %10.2f ms %10.2f ms %10.1f GFLOP/s %8.3f x", s.name, step, seconds * 1e3,
              floor.seconds * 1e3, floor.gflops(), ratio);
  if (target > 0) std::printf("   (target <= %.2f x: %s)", target, ratio <= target ? "met" : "MISSED");
  std::printf("\n");
}

Status bench_shape(const BenchShape& s, const LayerBenchOptions& o) {
  auto dtype = parse_dtype(o.matmul_dtype);
  if (!dtype) return Status::InvalidArgument("unknown matmul dtype '" + o.matmul_dtype + "'");
  TUTEL_ASSIGN_OR_RETURN(auto backend, make_backend(o.backend, {.threads = o.threads}));
  Backend& b = *backend;
  LayerSpec spec;
  spec.experts = s.E;
  spec.model_dim = s.M;
  spec.hidden = s.H;
  spec.k = s.k;
  spec.capacity_factor = 1.0;
  spec.matmul_dtype = *dtype;
  TUTEL_RETURN_IF_ERROR(spec.validate());
  const int64_t E = s.E, M = s.M, H = s.H, O = s.M, S = s.S;

  std::mt19937 rng(2024);
  TUTEL_ASSIGN_OR_RETURN(auto wg, random_buffer(b, E * M, 1.0 / std::sqrt(M), rng));
  TUTEL_ASSIGN_OR_RETURN(auto w1, random_buffer(b, E * H * M, 1.0 / std::sqrt(M), rng));
  TUTEL_ASSIGN_OR_RETURN(auto b1, random_buffer(b, E * H, 0.1, rng));
  TUTEL_ASSIGN_OR_RETURN(auto w2, random_buffer(b, E * H * O, 1.0 / std::sqrt(H), rng));
  TUTEL_ASSIGN_OR_RETURN(auto b2, random_buffer(b, E * O, 0.1, rng));
  TUTEL_ASSIGN_OR_RETURN(auto x, random_buffer(b, S * M, 1.0, rng));
  TUTEL_ASSIGN_OR_RETURN(auto dy, random_buffer(b, S * O, 1.0, rng));
  TUTEL_ASSIGN_OR_RETURN(auto y, b.allocate(S * O * 4));
  TUTEL_ASSIGN_OR_RETURN(auto dx, b.allocate(S * M * 4));
  std::vector<DeviceBuffer> grad_bufs;
  for (int64_t n : {E * M, E * H * M, E * H, E * H * O, E * O}) {
    TUTEL_ASSIGN_OR_RETURN(auto g, b.allocate(n * 4));
    grad_bufs.push_back(std::move(g));
  }
  const Device dev = b.device();
  auto weights_of = [&](void* g, void* f1, void* fb1, void* f2, void* fb2) {
    LayerWeights w;
    w.gate_weight = TensorView(g, DType::kF32, {E, M}, dev);
    w.experts.fc1_weight = TensorView(f1, DType::kF32, {E, H, M}, dev);
    w.experts.fc1_bias = TensorView(fb1, DType::kF32, {E, H}, dev);
    w.experts.fc2_weight = TensorView(f2, DType::kF32, {E, H, O}, dev);
    w.experts.fc2_bias = TensorView(fb2, DType::kF32, {E, O}, dev);
    return w;
  };
  LayerWeights weights = weights_of(wg.data(), w1.data(), b1.data(), w2.data(), b2.data());
  const bool bf16 = *dtype == DType::kBF16;
  WeightCopies copies;
  if (bf16 && o.weights_bf16 == "on") TUTEL_RETURN_IF_ERROR(copies.attach(b, weights.experts));
  const LayerWeights grads = weights_of(grad_bufs[0].data(), grad_bufs[1].data(), grad_bufs[2].data(),
                                        grad_bufs[3].data(), grad_bufs[4].data());
  for (const auto& g : grad_bufs) TUTEL_RETURN_IF_ERROR(b.fill_zero(TensorView(g.data(), DType::kU8, {int64_t(g.bytes())})));
  const TensorView xv(x.data(), DType::kF32, {S, M}, dev), yv(y.data(), DType::kF32, {S, O}, dev);
  const TensorView dyv(dy.data(), DType::kF32, {S, O}, dev), dxv(dx.data(), DType::kF32, {S, M}, dev);

  LayerWorkspace ws;
  Status status;
  auto forward = [&] {
    if (status.ok()) status = layer_forward(b, spec, weights, xv, 0, true, ws, yv, nullptr);
  };
  auto train = [&] {
    forward();
    if (status.ok()) status = layer_backward(b, spec, weights, xv, ws, dyv, 1.f, dxv, grads);
  };
  auto train_step = [&] {
    train();
    if (status.ok()) status = sgd_step_all(b, weights, grads);
  };
  const double fwd = median_seconds(1, o.repeats, forward);
  const double fwd_bwd = median_seconds(1, o.repeats, train);
  const double fwd_bwd_step = median_seconds(1, o.repeats, train_step);
  TUTEL_RETURN_IF_ERROR(status);

  const int64_t C = ws.capacity();
  const auto fwd_gemms = expert_forward_gemms(E, C, M, H, O);
  auto all_gemms = fwd_gemms;
  for (const auto& g : expert_backward_gemms(E, C, M, H, O)) all_gemms.push_back(g);
  const GemmTiming fwd_floor = time_gemms(fwd_gemms, bf16, o.repeats);
  const GemmTiming train_floor = time_gemms(all_gemms, bf16, o.repeats);

  std::printf("%-6s S=%lld M=%lld H=%lld E=%lld k=%d f=1 C=%lld  expert GEMMs: %.1f GFLOP forward, %.1f GFLOP forward+backward\n",
              s.name, (long long)S, (long long)M, (long long)H, (long long)E, s.k, (long long)C,
              fwd_floor.flops / 1e9, train_floor.flops / 1e9);
  print_row(s, "forward", fwd, fwd_floor, s.forward_target);
  print_row(s, "forward+backward", fwd_bwd, train_floor, s.train_target);
  print_row(s, "fwd+bwd+step", fwd_bwd_step, train_floor, 0);
  return Status::OK();
}

}  // namespace

int run_layer_bench(const LayerBenchOptions& options) {
  if (options.backend == "cuda") {
#if defined(TUTEL_HAVE_CUDA)
    return run_cuda_layer_bench(options);
#else
    std::fprintf(stderr,
                 "tutel-bench layer: --backend cuda: this tutel-bench was built without CUDA "
                 "(TUTEL_CUDA=OFF, or no nvcc at configure time); rebuild with -DTUTEL_CUDA=ON\n");
    return kExitNoCuda;
#endif
  }
  if (options.graph) {
    std::fprintf(stderr, "tutel-bench layer: --graph measures CUDA graphs; use it with --backend cuda\n");
    return 2;
  }
  LayerBenchOptions o = options;
  if (o.matmul_dtype.empty()) o.matmul_dtype = "f32";
  std::printf("tutel-bench layer: backend=%s matmul=%s threads=%d, median of %d runs\n", o.backend.c_str(),
              o.matmul_dtype.c_str(), o.threads, o.repeats);
  std::printf("floor = the step's expert GEMMs alone, timed with oneDNN %s matmul for the same shapes in this run\n",
              o.matmul_dtype.c_str());
  std::printf(
      "step = SGD over every parameter (lr 1e-6); fwd+bwd+step is measured against "
      "forward+backward's floor\n");
  if (o.matmul_dtype == "bf16")
    std::printf(
        "expert weights: %s\n",
        o.weights_bf16 == "on"
            ? "bf16 copies made once, refreshed by the step's SGD (param_bf16) (--weights-bf16 on)"
            : "converted from f32 on every matmul (--weights-bf16 off)");
  std::printf("%-6s %-16s %13s %13s %18s %10s\n", "shape", "step", "time", "floor", "GEMM rate", "time/floor");
  bool any = false;
  for (const LayerShape& shape : kLayerShapes) {
    BenchShape s{shape};
    bool listed = false;
    for (const CpuTargets& t : kCpuTargets) {
      if (std::string_view(t.shape) != s.name) continue;
      listed = true;
      s.forward_target = t.forward;
      s.train_target = t.train;
    }
    if (o.shapes == "all" ? !listed : o.shapes != s.name) continue;
    any = true;
    if (Status st = bench_shape(s, o); !st.ok()) {
      std::fprintf(stderr, "tutel-bench layer: %s\n", st.to_string().c_str());
      return 1;
    }
  }
  if (!any) {
    std::fprintf(stderr, "tutel-bench layer: unknown shape '%s'; use small, large, gpu or all\n", o.shapes.c_str());
    return 2;
  }
  return 0;
}

}  // namespace tutel::bench
