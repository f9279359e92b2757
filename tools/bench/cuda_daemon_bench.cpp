// tutel-bench layer --via-daemon --backend cuda (compiled only with CUDA): a layer served by a
// tuteld on the GPU, forward through the arena (the client's buffers are host memory: the daemon
// stages x in and y out over PCIe) vs in a device region (x and y stay in GPU memory the client
// maps through CUDA IPC: nothing is copied). Beside them, the ceiling of what the region saves:
// the same H2D + D2H copies from pinned memory, measured in the same run.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench_daemon.hpp"
#include "bench_util.hpp"
#include "cuda_timing.hpp"
#include "daemon_bench.hpp"
#include "layer_bench.hpp"
#include "tutel/client.hpp"

namespace tutel::bench {
namespace {

constexpr int64_t kModel = 1024, kHidden = 2048, kExperts = 8;

struct Row {
  int64_t tokens;
  double arena_s, region_s, copies_s;
};

// The pinned-memory H2D of x and D2H of y one arena request adds on the daemon's side.
Result<double> staging_copies_seconds(size_t bytes, int repeats) {
  void *host = nullptr, *device = nullptr;
  TUTEL_BENCH_CUDA_CHECK(cudaMallocHost(&host, 2 * bytes));
  TUTEL_BENCH_CUDA_CHECK(cudaMalloc(&device, 2 * bytes));
  std::memset(host, 0, 2 * bytes);
  Status st;
  const double s = median_seconds(2, repeats, [&] {
    if (!st.ok()) return;
    if (cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice) != cudaSuccess ||
        cudaMemcpy(static_cast<char*>(host) + bytes, static_cast<char*>(device) + bytes, bytes,
                   cudaMemcpyDeviceToHost) != cudaSuccess)
      st = Status::Internal("cudaMemcpy failed while timing the staging copies");
  });
  (void)cudaFree(device);
  (void)cudaFreeHost(host);
  TUTEL_RETURN_IF_ERROR(st);
  return s;
}

Result<Row> measure(client::Client& client, client::Layer& layer, int64_t S, int repeats) {
  const size_t bytes = static_cast<size_t>(S * kModel) * 4;
  std::vector<float> x(S * kModel), y(S * kModel), y_region(S * kModel);
  std::mt19937 rng(3);
  std::normal_distribution<float> n;
  for (float& v : x) v = n(rng);
  Status st;
  Row row{S, 0, 0, 0};
  row.arena_s = median_seconds(2, repeats, [&] {
    if (st.ok()) st = layer.infer(x.data(), S, y.data());
  });
  TUTEL_RETURN_IF_ERROR(st);
  TUTEL_ASSIGN_OR_RETURN(client::DeviceRegion region, client.map_device_region(layer.info().rank, 2 * bytes));
  float* rx = static_cast<float*>(region.data());
  float* ry = rx + S * kModel;
  TUTEL_BENCH_CUDA_CHECK(cudaMemcpy(rx, x.data(), bytes, cudaMemcpyHostToDevice));
  // Complete on the device before the daemon reads it (a pageable copy may return earlier).
  TUTEL_BENCH_CUDA_CHECK(cudaDeviceSynchronize());
  row.region_s = median_seconds(2, repeats, [&] {
    if (st.ok()) st = layer.infer_device(rx, S, ry);
  });
  TUTEL_RETURN_IF_ERROR(st);
  TUTEL_BENCH_CUDA_CHECK(cudaMemcpy(y_region.data(), ry, bytes, cudaMemcpyDeviceToHost));
  if (std::memcmp(y.data(), y_region.data(), bytes) != 0)
    return Status::Internal("the forward in the device region gave other results than through the arena");
  TUTEL_ASSIGN_OR_RETURN(row.copies_s, staging_copies_seconds(bytes, repeats));
  return row;
}

}  // namespace

int run_cuda_layer_via_daemon_bench(const std::string& self, int repeats) {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("tutel-bench layer: no CUDA device\nnothing was measured (exit code %d)\n", kExitNoCuda);
    return kExitNoCuda;
  }
  BenchDaemon daemon(self, "cuda", 1, "256MiB");
  if (!daemon.running()) {
    std::fprintf(stderr, "tutel-bench layer --via-daemon: could not start tuteld (cuda) next to %s\n", self.c_str());
    return 1;
  }
  auto client = client::Client::connect(daemon.socket());
  if (!client.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", client.status().to_string().c_str());
    return 1;
  }
  auto layer = client->create_layer("name = \"bench\"\nexperts = 8\nmodel_dim = 1024\nhidden = 2048\nk = 2\n"
                                    "capacity_factor = 1.0\ndtype = \"bf16\"\ninit_seed = 7\n");
  if (!layer.ok()) {
    std::fprintf(stderr, "tutel-bench: %s\n", layer.status().to_string().c_str());
    return 1;
  }
  std::printf("tutel-bench layer --via-daemon --backend cuda: M=%lld H=%lld E=%lld k=2 f=1 bf16, median of %d\n",
              (long long)kModel, (long long)kHidden, (long long)kExperts, repeats);
  for (int64_t S : {int64_t{128}, int64_t{4096}}) {
    Result<Row> row = measure(*client, *layer, S, repeats);
    if (!row.ok()) {
      std::fprintf(stderr, "tutel-bench: S=%lld: %s\n", (long long)S, row.status().to_string().c_str());
      return 1;
    }
    std::printf("via-daemon S=%-5lld through the arena %8.3f ms   in a device region %8.3f ms   saved %5.1f %%   "
                "(staging copies alone %7.3f ms)\n",
                (long long)S, row->arena_s * 1e3, row->region_s * 1e3, (1 - row->region_s / row->arena_s) * 100,
                row->copies_s * 1e3);
  }
  return 0;
}

}  // namespace tutel::bench
