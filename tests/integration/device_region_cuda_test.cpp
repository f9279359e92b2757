// Zero-copy submission on a GPU daemon: the region is device memory the daemon exports as a CUDA
// IPC handle and this process opens (through libtutel_client's dlopen'd runtime). The results
// of requests made in place must equal those of the same requests staged through the arena
// (same GPU, same kernels, same inputs). Skipped without a CUDA device; run by tools/gpu-check.sh.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "daemon_fixture.hpp"
#include "tutel/client.hpp"

namespace tutel::testing {
namespace {

constexpr const char* kSpec =
    "name = \"zc\"\nexperts = 8\nmodel_dim = 64\nhidden = 128\nk = 2\ncapacity_factor = 1.0\ninit_seed = 5\n"
    "[optimizer]\nkind = \"sgd\"\nlr = 0.01\n";
constexpr int64_t kDim = 64, kTokens = 256;

bool has_cuda_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

TEST(DeviceRegionOnCuda, InPlaceRequestsEqualTheStagedPath) {
  if (!has_cuda_device()) GTEST_SKIP() << "no CUDA device";
  DaemonOptions options;
  options.backend = "cuda";
  DaemonProcess daemon(options);
  ASSERT_TRUE(daemon.start());
  auto client = client::Client::connect(daemon.client_socket());
  ASSERT_TRUE(client.ok()) << client.status();
  auto layer = client->create_layer(kSpec);
  ASSERT_TRUE(layer.ok()) << layer.status();
  EXPECT_EQ(layer->info().device, "cuda:0");

  const size_t tensor = kTokens * kDim;
  auto region = client->map_device_region(layer->info().rank, 4 * tensor * 4);
  ASSERT_TRUE(region.ok()) << region.status();
  EXPECT_EQ(region->kind(), "cuda_ipc");
  cudaPointerAttributes attributes{};
  ASSERT_EQ(cudaPointerGetAttributes(&attributes, region->data()), cudaSuccess);
  EXPECT_EQ(attributes.type, cudaMemoryTypeDevice);
  float* p = static_cast<float*>(region->data());

  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> normal;
  std::vector<float> x(tensor), dy(tensor);
  for (float& v : x) v = normal(rng);
  for (float& v : dy) v = normal(rng);
  ASSERT_EQ(cudaMemcpy(p, x.data(), tensor * 4, cudaMemcpyHostToDevice), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(p + 2 * tensor, dy.data(), tensor * 4, cudaMemcpyHostToDevice), cudaSuccess);
  // A copy from pageable memory may return before its DMA lands; the daemon reads the region
  // from its own process, so x and dy must be complete on the device first (client.h).
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);

  std::vector<float> want_y(tensor), want_dx(tensor), got_y(tensor), got_dx(tensor);
  client::ForwardInfo want, got;
  ASSERT_TRUE(layer->forward(x.data(), kTokens, want_y.data(), &want).ok());
  ASSERT_TRUE(layer->backward(want.sequence, dy.data(), 0.01f, want_dx.data()).ok());
  ASSERT_TRUE(layer->forward_device(p, kTokens, p + tensor, &got).ok());
  ASSERT_TRUE(layer->backward_device(got.sequence, p + 2 * tensor, 0.01f, p + 3 * tensor).ok());
  // The results are complete on the device when the calls return.
  ASSERT_EQ(cudaMemcpy(got_y.data(), p + tensor, tensor * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(got_dx.data(), p + 3 * tensor, tensor * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(got.capacity, want.capacity);
  EXPECT_EQ(got.l_aux, want.l_aux);
  EXPECT_EQ(std::memcmp(got_y.data(), want_y.data(), tensor * 4), 0);
  // Gradient accumulation may use atomics: equal within f32 rounding of a few additions.
  for (size_t i = 0; i < tensor; ++i)
    ASSERT_NEAR(got_dx[i], want_dx[i], 1e-5f * (1.f + std::abs(want_dx[i]))) << i;

  // Host pointers are refused by the in-place calls, and the region goes back on unmap.
  EXPECT_FALSE(layer->infer_device(x.data(), kTokens, want_y.data()).ok());
  ASSERT_TRUE(region->unmap().ok());
  EXPECT_EQ(daemon.stop(), 0) << daemon.log();
}

}  // namespace
}  // namespace tutel::testing
