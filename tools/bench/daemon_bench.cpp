// tutel-bench ipc and tutel-bench layer --via-daemon: the shared-memory path and the daemon's
// overhead, each next to its ceiling measured in the same run (memcpy bandwidth; the same layer
// in-process), through the arena (copied) and through a device region (zero-copy).
#include "daemon_bench.hpp"


#include <sys/mman.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <random>
#include <thread>
#include <vector>

#include "bench_daemon.hpp"
#include "bench_util.hpp"
#include "tutel/client.hpp"
#include "tutel/core/safetensors.hpp"
#include "tutel/kernels/moe_layer.hpp"

namespace tutel::bench {
namespace {

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * v.size()))];
}

}  // namespace

int run_ipc_bench(const std::string& self, int repeats, int spin_us) {
  BenchDaemon daemon(self, "cpu", 1, "64MiB", spin_us);
  if (!daemon.running()) {
    std::fprintf(stderr, "tutel-bench ipc: could not start tuteld next to %s\n", self.c_str());
    return 1;
  }
  auto client = client::Client::connect(daemon.socket());
  if (!client.ok()) {
    std::fprintf(stderr, "tutel-bench ipc: %s\n", client.status().to_string().c_str());
    return 1;
  }
  std::printf("tutel-bench ipc: one client, one tuteld, unix socket + memfd arena, spin %s before sleeping\n",
              spin_us >= 0 ? (std::to_string(spin_us) + " us").c_str() : "the default 50 us");

  // Round trip of an empty request.
  for (int i = 0; i < 2000; ++i) (void)client->ping();
  std::vector<double> rtt;
  for (int i = 0; i < 20000 * repeats / 5; ++i) {
    const double t0 = now_seconds();
    if (!client->ping().ok()) return 1;
    rtt.push_back(now_seconds() - t0);
  }
  std::printf("round trip (empty request)   median %7.2f us   p99 %7.2f us   (target: median <= 5 us)\n",
              percentile(rtt, 0.5) * 1e6, percentile(rtt, 0.99) * 1e6);

  // Bulk transfer: the client copies a chunk into the arena, the daemon reads every word.
  for (size_t mib : {1, 8, 16}) {
    const size_t bytes = mib << 20;
    std::vector<uint32_t> data(bytes / 4), copy(bytes / 4);
    std::mt19937 rng(1);
    uint64_t want = 0;
    for (auto& w : data) want += (w = rng());
    std::memcpy(copy.data(), data.data(), bytes);  // touch both
    const double memcpy_s = median_seconds(2, repeats * 4, [&] { std::memcpy(copy.data(), data.data(), bytes); });
    bool ok = true;
    const double transfer_s = median_seconds(2, repeats * 4, [&] {
      auto sum = client->transfer_checksum(data.data(), bytes);
      ok &= sum.ok() && *sum == want;
    });
    if (!ok) {
      std::fprintf(stderr, "tutel-bench ipc: the daemon read different bytes than were sent\n");
      return 1;
    }
    const double memcpy_gbs = bytes / memcpy_s / 1e9, transfer_gbs = bytes / transfer_s / 1e9;
    std::printf("bulk %2zu MiB: client->daemon %6.2f GB/s   memcpy %6.2f GB/s   ratio %.2f   (target >= 0.50)\n", mib,
                transfer_gbs, memcpy_gbs, transfer_gbs / memcpy_gbs);
  }
  return 0;
}

namespace {

// A layer's parameters held by the benchmark for layer_forward in-process (E experts, M, H, k = 2),
// drawn from N(0, 0.02²). Not copied: `weights` points into the vectors.
struct HostLayer {
  LayerSpec spec;
  std::vector<float> gate, fc1, fc1_bias, fc2, fc2_bias;
  LayerWeights weights;

  HostLayer(int64_t E, int64_t M, int64_t H, std::mt19937& rng)
      : gate(E * M), fc1(E * H * M), fc1_bias(E * H), fc2(E * H * M), fc2_bias(E * M) {
    spec.experts = E;
    spec.model_dim = M;
    spec.hidden = H;
    spec.k = 2;
    std::normal_distribution<float> n(0.f, 1.f);
    for (auto* v : {&gate, &fc1, &fc1_bias, &fc2, &fc2_bias})
      for (float& f : *v) f = n(rng) * 0.02f;
    weights.gate_weight = TensorView(gate.data(), DType::kF32, {E, M});
    weights.experts.fc1_weight = TensorView(fc1.data(), DType::kF32, {E, H, M});
    weights.experts.fc1_bias = TensorView(fc1_bias.data(), DType::kF32, {E, H});
    weights.experts.fc2_weight = TensorView(fc2.data(), DType::kF32, {E, H, M});
    weights.experts.fc2_bias = TensorView(fc2_bias.data(), DType::kF32, {E, M});
  }
  HostLayer(const HostLayer&) = delete;
  HostLayer& operator=(const HostLayer&) = delete;
};

// Copies the daemon's layer's weights into `host`, so that the two route alike: at decode sizes
// a request's cost is the experts its tokens reach.
Status copy_weights(client::Layer& layer, HostLayer& host) {
  TUTEL_ASSIGN_OR_RETURN(client::ExportedState state, layer.export_state());
  // The exported memfd may run past the file: a copy of the file alone, for the reader.
  const int fd = ::memfd_create("tutel-bench-state", MFD_CLOEXEC);
  if (fd < 0) return Status::IOError("memfd_create failed");
  Result<SafetensorsFile> file = Status::IOError("cannot copy the exported state");
  if (::write(fd, state.data(), state.size()) == static_cast<ssize_t>(state.size()))
    file = SafetensorsFile::read(fd, "the daemon layer's state", state.size());
  ::close(fd);
  TUTEL_RETURN_IF_ERROR(file.status());
  const std::pair<const char*, std::vector<float>*> tensors[] = {{kGateWeightName, &host.gate},
                                                                  {kFc1WeightName, &host.fc1},
                                                                  {kFc1BiasName, &host.fc1_bias},
                                                                  {kFc2WeightName, &host.fc2},
                                                                  {kFc2BiasName, &host.fc2_bias}};
  for (const auto& [name, values] : tensors) {
    const SafetensorsTensor* t = file->find(name);
    if (t == nullptr || t->dtype != DType::kF32 || t->nbytes != values->size() * sizeof(float))
      return Status::Internal(std::string("the daemon's layer has no f32 ") + name + " of the bench's shape");
    std::memcpy(values->data(), t->data, t->nbytes);
  }
  return Status::OK();
}

// Context switches of every thread of `pid` so far (the daemon's threads live as long as it does).
uint64_t context_switches(pid_t pid) {
  uint64_t total = 0;
  std::error_code ec;
  for (const auto& task : std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/task", ec)) {
    std::ifstream status(task.path() / "status");
    for (std::string line; std::getline(status, line);)
      if (line.find("ctxt_switches:") != std::string::npos) total += std::stoull(line.substr(line.find(':') + 1));
  }
  return total;
}

// Decode-sized inferences (S = 1 to 128 at M = 256, H = 512), where what the daemon adds to a
// request (the rings' wake-ups, the hand-over to the rank's thread, OpenMP's teams) is not lost
// in the compute: through tuteld against the same forward (the daemon layer's own weights) in
// process, with the daemon's context switches per request.
int run_decode_via_daemon(client::Client& client, pid_t daemon_pid, Backend& b, int threads, int repeats) {
  const int64_t M = 256, H = 512, E = 8;
  auto layer = client.create_layer("name = \"decode\"\nexperts = 8\nmodel_dim = 256\nhidden = 512\nk = 2\n"
                                   "capacity_factor = 1.0\ninit_seed = 7\n");
  if (!layer.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", layer.status().to_string().c_str());
    return 1;
  }
  std::mt19937 rng(5);
  std::normal_distribution<float> n(0.f, 1.f);
  HostLayer local_layer(E, M, H, rng);
  if (Status st = copy_weights(*layer, local_layer); !st.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", st.to_string().c_str());
    return 1;
  }
  const LayerSpec& spec = local_layer.spec;
  const LayerWeights& w = local_layer.weights;
  const int calls = 100 * repeats;  // per measurement: a median of this many single requests
  std::printf("decode-sized inference, M=%lld H=%lld E=%lld k=2 f=1, %d threads, median of %d requests\n",
              (long long)M, (long long)H, (long long)E, threads, calls);
  for (const int64_t S : {1, 8, 32, 128}) {
    std::vector<float> x(S * M), y(S * M), y_local(S * M);
    for (float& v : x) v = n(rng);
    LayerWorkspace ws;
    Status st;
    const double local = median_seconds(3, calls, [&] {
      if (st.ok()) st = layer_forward(b, spec, w, TensorView(x.data(), DType::kF32, {S, M}), 0, false, ws,
                                      TensorView(y_local.data(), DType::kF32, {S, M}), nullptr);
    });
    const uint64_t switches_before = context_switches(daemon_pid);
    const double remote = median_seconds(3, calls, [&] {
      if (st.ok()) st = layer->infer(x.data(), S, y.data());
    });
    const double switches =
        static_cast<double>(context_switches(daemon_pid) - switches_before) / static_cast<double>(calls + 3);
    if (!st.ok()) {
      std::fprintf(stderr, "tutel-bench: %s\n", st.to_string().c_str());
      return 1;
    }
    for (size_t i = 0; i < y.size(); ++i)
      if (!(std::abs(y[i] - y_local[i]) <= 1e-5f * (1.f + std::abs(y_local[i])))) {
        std::fprintf(stderr, "tutel-bench: S=%lld: the daemon's y[%zu] = %g, in-process %g: not the same layer\n",
                     (long long)S, i, y[i], y_local[i]);
        return 1;
      }
    std::printf("S=%-4lld in-process %8.1f us   through tuteld %8.1f us   added %7.1f us   daemon context switches "
                "per request %5.1f\n",
                (long long)S, local * 1e6, remote * 1e6, (remote - local) * 1e6, switches);
  }
  return 0;
}

}  // namespace

int run_layer_via_daemon_bench(const std::string& self, int threads, int repeats) {
  if (threads == 0) threads = static_cast<int>(std::thread::hardware_concurrency());
  BenchDaemon daemon(self, "cpu", threads, "256MiB");
  if (!daemon.running()) {
    std::fprintf(stderr, "tutel-bench layer --via-daemon: could not start tuteld next to %s\n", self.c_str());
    return 1;
  }
  auto client = client::Client::connect(daemon.socket());
  if (!client.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", client.status().to_string().c_str());
    return 1;
  }
  const int64_t S = 4096, M = 1024, H = 2048, E = 8;
  auto layer = client->create_layer("name = \"bench\"\nexperts = 8\nmodel_dim = 1024\nhidden = 2048\nk = 2\n"
                                    "capacity_factor = 1.0\ninit_seed = 7\n");
  if (!layer.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", layer.status().to_string().c_str());
    return 1;
  }
  // The same shape in-process. With f = 1 the capacity is fixed by the shape, so both sides run
  // identical GEMMs whatever their (different) random weights route.
  std::vector<float> x(S * M), y(S * M), y_local(S * M);
  std::mt19937 rng(3);
  std::normal_distribution<float> n(0.f, 1.f);
  for (float& v : x) v = n(rng);

  auto backend = make_backend("cpu", {.threads = threads});
  if (!backend.ok()) return 1;
  Backend& b = **backend;
  const HostLayer local_layer(E, M, H, rng);
  const LayerSpec& spec = local_layer.spec;
  const LayerWeights& w = local_layer.weights;
  LayerWorkspace ws;
  Status st;
  const double local = median_seconds(1, repeats, [&] {
    if (st.ok()) st = layer_forward(b, spec, w, TensorView(x.data(), DType::kF32, {S, M}), 0, false, ws,
                                    TensorView(y_local.data(), DType::kF32, {S, M}), nullptr);
  });
  const double remote = median_seconds(1, repeats, [&] {
    if (st.ok()) st = layer->infer(x.data(), S, y.data());
  });
  // Zero-copy: the trainer's x already lies in a device region (written there once, as a model
  // would produce it), and y is read there.
  auto region = client->map_device_region(layer->info().rank, 2 * S * M * 4);
  if (!region.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", region.status().to_string().c_str());
    return 1;
  }
  float* rx = static_cast<float*>(region->data());
  std::memcpy(rx, x.data(), S * M * 4);
  const double in_place = median_seconds(1, repeats, [&] {
    if (st.ok()) st = layer->infer_device(rx, S, rx + S * M);
  });
  if (!st.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", st.to_string().c_str());
    return 1;
  }
  if (std::memcmp(rx + S * M, y.data(), S * M * 4) != 0) {
    std::fprintf(stderr, "tutel-bench: the in-place forward gave other results than the copied one\n");
    return 1;
  }
  std::printf("tutel-bench layer --via-daemon: S=%lld M=%lld H=%lld E=%lld k=2 f=1, %d threads, median of %d\n",
              (long long)S, (long long)M, (long long)H, (long long)E, threads, repeats);
  std::printf("forward in-process %8.2f ms   through tuteld %8.2f ms   overhead %5.1f %%   (target <= 10 %%)\n",
              local * 1e3, remote * 1e3, (remote / local - 1) * 100);
  std::printf("forward in a device region (zero-copy) %8.2f ms   overhead %5.1f %%   (saves the arena's two copies)\n",
              in_place * 1e3, (in_place / local - 1) * 100);
  return run_decode_via_daemon(*client, daemon.pid(), b, threads, repeats);
}

}  // namespace tutel::bench
