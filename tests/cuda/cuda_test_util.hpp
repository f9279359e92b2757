// Shared by the CUDA tests: skipping without a device, and tensors mirrored on the CPU and the
// CUDA backend so an op can run on both from identical inputs.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "layer_test_util.hpp"
#include "tutel/kernels/backend.hpp"
#include "tutel/kernels/cuda_devices.hpp"

namespace tutel::testing {

inline std::string no_cuda_device_reason() {
  const auto names = available_backends();
  const bool built = std::find(names.begin(), names.end(), "cuda") != names.end();
  return built ? "cuda_device_count() = 0: this build has the CUDA backend, but the driver reports no "
                 "usable device (no GPU or no driver here); run tools/gpu-check.sh on a GPU machine"
               : "this build has no CUDA backend (configure with -DTUTEL_CUDA=ON)";
}

// Skips the current test (from a test body or a fixture's SetUp) where no GPU can be used.
#define TUTEL_REQUIRE_CUDA_DEVICE()                                                    \
  do {                                                                                 \
    if (::tutel::cuda_device_count() == 0)                                             \
      GTEST_SKIP() << ::tutel::testing::no_cuda_device_reason();                       \
  } while (0)

// One tensor on each of two backends, set from the same host values.
class Mirror {
 public:
  Mirror(Backend& cpu, Backend& gpu, DType dtype, Shape shape)
      : cpu_(&cpu), gpu_(&gpu), dtype_(dtype), shape_(shape) {
    const size_t bytes = std::max<size_t>(1, nbytes());
    auto a = cpu.allocate(bytes);
    auto b = gpu.allocate(bytes);
    EXPECT_TRUE(a.ok()) << a.status();
    EXPECT_TRUE(b.ok()) << b.status();
    if (a.ok()) cpu_buf_ = std::move(a).value();
    if (b.ok()) gpu_buf_ = std::move(b).value();
    EXPECT_TRUE(cpu.fill_zero(this->cpu()).ok());
    EXPECT_TRUE(gpu.fill_zero(this->gpu()).ok());
  }

  size_t nbytes() const { return static_cast<size_t>(shape_.numel()) * dtype_size(dtype_); }
  TensorView cpu() const { return TensorView(cpu_buf_.data(), dtype_, shape_, cpu_->device()); }
  TensorView gpu() const { return TensorView(gpu_buf_.data(), dtype_, shape_, gpu_->device()); }

  template <typename T>
  void set(const std::vector<T>& host) {
    ASSERT_EQ(host.size() * sizeof(T), nbytes());
    if (host.empty()) return;
    ASSERT_TRUE(cpu_->copy(cpu_buf_.data(), host.data(), nbytes(), CopyKind::kHostToDevice).ok());
    Status s = gpu_->copy(gpu_buf_.data(), host.data(), nbytes(), CopyKind::kHostToDevice);
    ASSERT_TRUE(s.ok()) << s;
  }
  template <typename T = float>
  std::vector<T> cpu_values() const {
    return read<T>(*cpu_, cpu_buf_);
  }
  template <typename T = float>
  std::vector<T> gpu_values() const {
    return read<T>(*gpu_, gpu_buf_);
  }

 private:
  template <typename T>
  std::vector<T> read(Backend& b, const DeviceBuffer& buf) const {
    std::vector<T> host(nbytes() / sizeof(T));
    if (!host.empty()) {
      Status s = b.copy(host.data(), buf.data(), nbytes(), CopyKind::kDeviceToHost);
      EXPECT_TRUE(s.ok()) << s;
    }
    return host;
  }

  Backend* cpu_;
  Backend* gpu_;
  DType dtype_;
  Shape shape_;
  DeviceBuffer cpu_buf_, gpu_buf_;
};

// The CUDA result against the CPU backend's, with all_close's tolerance rule.
inline ::testing::AssertionResult matches_cpu(const std::string& what, const Mirror& t, double rtol,
                                              double atol_frac) {
  const std::vector<float> want = t.cpu_values();
  return all_close(what, t.gpu_values(), std::vector<double>(want.begin(), want.end()), rtol, atol_frac);
}

// A CPU backend and a CUDA one side by side, with a fresh seed per test (print seed_ on failure).
// Skips the test without a CUDA device.
class CpuAndCudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    TUTEL_REQUIRE_CUDA_DEVICE();
    auto cpu = make_backend("cpu", {.threads = 2});
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    cpu_ = std::move(cpu).value();
    auto gpu = make_backend("cuda", {});
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    gpu_ = std::move(gpu).value();
    rng_.seed(seed_);
  }

  const uint64_t seed_ = std::random_device{}();
  std::mt19937_64 rng_;
  std::unique_ptr<Backend> cpu_, gpu_;
};

}  // namespace tutel::testing
