// Backend::allocate_shareable on the CPU backend: memory another process maps through the
// exported memfd, freed (unmapped) through the backend like any buffer. The CUDA backend's
// cuda_ipc export runs in tools/gpu-check.sh (device_region_cuda_test).
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include "tutel/kernels/backend.hpp"

namespace tutel {
namespace {

TEST(CpuShareableMemory, AnotherProcessSeesTheSameBytesBothWays) {
  auto backend = make_backend("cpu", BackendOptions{1, 0});
  ASSERT_TRUE(backend.ok()) << backend.status();
  auto shared = (*backend)->allocate_shareable(12345 * 4);
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->exported.kind, "host_memfd");
  EXPECT_EQ(shared->exported.device_id, "cpu");
  EXPECT_TRUE(shared->exported.handle.empty());
  ASSERT_TRUE(shared->exported.fd.valid());
  // Whole pages: what the other process maps, so what the region really takes.
  EXPECT_GE(shared->buffer.bytes(), 12345u * 4);
  EXPECT_EQ(shared->buffer.bytes() % page_bytes(), 0u);
  EXPECT_FALSE(shared->exported.keep_until_exit);  // its pages outlive this side's unmap
  auto* data = static_cast<float*>(shared->buffer.data());
  for (int i = 0; i < 12345; ++i) ASSERT_EQ(data[i], 0.f);  // never another tenant's bytes
  data[7] = 3.5f;

  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    auto mapped = SharedMemory::attach(std::move(shared->exported.fd), "the exported memfd", shared->buffer.bytes());
    if (!mapped.ok() || mapped->bytes() < 12345 * 4) _exit(2);
    float* p = reinterpret_cast<float*>(mapped->data());
    if (p[7] != 3.5f) _exit(3);
    p[12344] = -1.25f;
    _exit(0);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  EXPECT_EQ(data[12344], -1.25f);

  // Ops take it like any buffer of the backend's.
  ASSERT_TRUE((*backend)->fill_zero(TensorView(data, DType::kF32, {12345})).ok());
  EXPECT_EQ(data[7], 0.f);
  shared->buffer.reset();  // unmapped through the backend's release
  // Ordinary buffers still come and go after it.
  auto plain = (*backend)->allocate(4096);
  ASSERT_TRUE(plain.ok());
}

TEST(CpuShareableMemory, EmptyIsRefused) {
  auto backend = make_backend("cpu", BackendOptions{1, 0});
  ASSERT_TRUE(backend.ok());
  EXPECT_EQ((*backend)->allocate_shareable(0).status().code(), StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tutel
