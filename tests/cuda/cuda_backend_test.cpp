// The CUDA backend op by op against the CPU backend on identical random inputs, and the
// registry's behaviour without a device (the one part that runs on machines without a GPU).
//
// Tolerances (|cuda − cpu| <= atol·max|cpu| + rtol·|cpu|): f32 elementwise and short sums
// rtol 1e-5; f32 GEMMs rtol 1e-4; bf16 GEMMs 1e-2 (both backends round the same inputs to bf16,
// only the accumulation order differs). Routing (expert indices, locations, counts, slot maps)
// and pure copies must match exactly.
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "cuda_test_util.hpp"
#include "tutel/kernels/gate_noise.hpp"

#if defined(TUTEL_TEST_CUDA_BUILD)
#include <cuda_runtime_api.h>

#include "cuda/cuda_check.hpp"
#include "cuda/lt_gemm.hpp"
#endif

namespace tutel::testing {
namespace {

TEST(CudaBackendRegistry, ListsCudaInACudaBuild) {
  const auto names = available_backends();
  const bool listed = std::find(names.begin(), names.end(), "cuda") != names.end();
#if defined(TUTEL_TEST_CUDA_BUILD)
  EXPECT_TRUE(listed) << "a build with TUTEL_HAVE_CUDA must offer the cuda backend";
#else
  EXPECT_FALSE(listed);
  EXPECT_EQ(cuda_device_count(), 0);
#endif
}

TEST(CudaBackendRegistry, WithoutDeviceMakeBackendFailsClearly) {
  auto backend = make_backend("cuda", {});
  if (cuda_device_count() > 0) {
    ASSERT_TRUE(backend.ok()) << backend.status();
    EXPECT_EQ((*backend)->name(), "cuda");
    EXPECT_EQ((*backend)->device().kind, DeviceKind::kCuda);
    return;
  }
  ASSERT_FALSE(backend.ok());
  const std::string msg(backend.status().message());
  std::cout << "make_backend(\"cuda\") without a device: " << backend.status() << "\n";
#if defined(TUTEL_TEST_CUDA_BUILD)
  EXPECT_EQ(backend.status().code(), StatusCode::kUnavailable) << backend.status();
  EXPECT_NE(msg.find("cuda"), std::string::npos) << msg;
  EXPECT_NE(msg.find("'cpu'"), std::string::npos) << "the message should point to the cpu backend: " << msg;
#else
  EXPECT_EQ(backend.status().code(), StatusCode::kInvalidArgument) << backend.status();
  EXPECT_NE(msg.find("cpu"), std::string::npos) << msg;
#endif
  // Asking again, and for another device, fails the same way: nothing sticky, nothing crashes.
  EXPECT_FALSE(make_backend("cuda", {.device_index = 3}).ok());
  EXPECT_FALSE(make_backend("cuda", {}).ok());
  EXPECT_EQ(cuda_device_count(), 0);
}

TEST(CudaBackendRegistry, RejectsBadDeviceIndex) {
  auto negative = make_backend("cuda", {.device_index = -1});
  EXPECT_FALSE(negative.ok());
  auto beyond = make_backend("cuda", {.device_index = 4096});
  ASSERT_FALSE(beyond.ok());
  if (cuda_device_count() > 0) {
    EXPECT_EQ(beyond.status().code(), StatusCode::kInvalidArgument) << beyond.status();
    EXPECT_NE(beyond.status().message().find("4096"), std::string_view::npos) << beyond.status();
  }
}

// A sticky error loses the device for the whole process: device_health() says so, as
// Unavailable, after one and not before (nor after an error that is not sticky). Here a kernel
// writes through a pointer nothing maps, in a child process (a death test), so the lost
// context cannot fail the tests after this one.
TEST(CudaDeviceLoss, HealthReportsALostDeviceAndOnlyThen) {
  if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  GTEST_FLAG_SET(death_test_style, "threadsafe");  // a fresh process: CUDA does not survive fork
  EXPECT_EXIT(
      {
        auto gpu = make_backend("cuda", {});
        if (!gpu.ok()) _exit(2);
        Backend& b = **gpu;
        if (!b.device_health().ok()) _exit(3);
        // Out of memory is an error the device survives.
        if (b.allocate(size_t{1} << 50).ok() || !b.device_health().ok()) _exit(4);
        auto src = b.allocate(4096);
        if (!src.ok() || !b.fill_zero(TensorView(src->data(), DType::kF32, {1024}, b.device())).ok()) _exit(5);
        const TensorView unmapped(reinterpret_cast<void*>(uintptr_t{0x1000}), DType::kF32, {1024}, b.device());
        (void)b.add(unmapped, TensorView(src->data(), DType::kF32, {1024}, b.device()));
        const Status synced = b.synchronize();
        if (synced.ok()) _exit(6);
        const Status health = b.device_health();
        std::fprintf(stderr, "synchronize: %s\nhealth: %s\n", synced.to_string().c_str(), health.to_string().c_str());
        if (health.code() != StatusCode::kUnavailable || b.device_health().ok()) _exit(7);  // and for good
        _exit(0);
      },
      ::testing::ExitedWithCode(0), "health: Unavailable: CUDA device 0 is lost");
}

class CudaOps : public CpuAndCudaTest {
 protected:

  Mirror make(DType dtype, Shape shape) { return Mirror(*cpu_, *gpu_, dtype, shape); }
  Mirror make(Shape shape) { return make(DType::kF32, shape); }
  std::vector<float> normal(size_t n, double scale) { return to_f32(randn(rng_, n, scale)); }
  std::vector<float> uniform(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng_);
    return v;
  }
  // k distinct experts per token, in random order.
  std::vector<int32_t> random_routing(int64_t S, int64_t E, int k) {
    std::vector<int32_t> idx(S * k), perm(E);
    for (int64_t s = 0; s < S; ++s) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng_);
      std::copy(perm.begin(), perm.begin() + k, idx.begin() + s * k);
    }
    return idx;
  }
  // Runs an op on the CPU backend, then on the CUDA one, and waits for the device.
  void run_both(const std::function<Status(Backend&, bool /*is_gpu*/)>& op) {
    Status c = op(*cpu_, false);
    ASSERT_TRUE(c.ok()) << "cpu: " << c;
    Status g = op(*gpu_, true);
    ASSERT_TRUE(g.ok()) << "cuda: " << g;
    ASSERT_TRUE(gpu_->synchronize().ok());
  }

};

TEST_F(CudaOps, MemoryRoundTrips) {
  for (size_t bytes : {size_t{1}, size_t{100}, size_t{4096}, size_t{3} << 20}) {
    SCOPED_TRACE("bytes " + std::to_string(bytes));
    std::vector<uint8_t> host(bytes), back(bytes, 0xab);
    for (size_t i = 0; i < bytes; ++i) host[i] = static_cast<uint8_t>(i * 7 + 3);
    auto a = gpu_->allocate(bytes);
    auto b = gpu_->allocate(bytes);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(reinterpret_cast<uintptr_t>(a->data()) % 64, 0u);
    ASSERT_TRUE(gpu_->copy(a->data(), host.data(), bytes, CopyKind::kHostToDevice).ok());
    ASSERT_TRUE(gpu_->copy(b->data(), a->data(), bytes, CopyKind::kDeviceToDevice).ok());
    ASSERT_TRUE(gpu_->copy(back.data(), b->data(), bytes, CopyKind::kDeviceToHost).ok());
    EXPECT_EQ(back, host);
    ASSERT_TRUE(gpu_->fill_zero(TensorView(b->data(), DType::kU8, {static_cast<int64_t>(bytes)}, gpu_->device())).ok());
    ASSERT_TRUE(gpu_->copy(back.data(), b->data(), bytes, CopyKind::kDeviceToHost).ok());
    EXPECT_EQ(back, std::vector<uint8_t>(bytes, 0));
  }
  // Released blocks come back from the pool; many cycles neither leak nor fail.
  for (int i = 0; i < 200; ++i) {
    auto buf = gpu_->allocate(size_t{1} << (10 + i % 12));
    ASSERT_TRUE(buf.ok()) << buf.status();
  }
  EXPECT_TRUE(gpu_->copy(nullptr, nullptr, 0, CopyKind::kDeviceToHost).ok());
  EXPECT_TRUE(gpu_->synchronize().ok());
}

#if defined(TUTEL_TEST_CUDA_BUILD)
// The alignment cuBLASLt's heuristic is told to assume: the largest power of two up to 256 that
// divides the pointer and every batch offset (host only: runs without a device).
TEST(LtGemmAlignment, IsTheLargestPowerOfTwoDividingPointerAndOffsets) {
  auto at = [](uintptr_t address) { return reinterpret_cast<const void*>(address); };
  EXPECT_EQ(cuda::lt_alignment(at(0x10000)), 256u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10100)), 256u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10080)), 128u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10002)), 2u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10001)), 1u);
  // A batch stride of 100 bf16 (200 bytes) leaves every other batch 8-byte aligned only.
  EXPECT_EQ(cuda::lt_alignment(at(0x10000), {200}), 8u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10000), {4096, 0}), 256u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10010), {4096}), 16u);
  EXPECT_EQ(cuda::lt_alignment(at(0x10000), {-24}), 8u);  // the sign plays no part
}

// Which errors lose the device for good (a rank out of service, device_health() says so) and
// how each reads as a Status (host only: runs without a device).
TEST(CudaErrors, StickyOnesLoseTheContextOthersAreOrdinary) {
  for (cudaError_t err : {cudaErrorIllegalAddress, cudaErrorLaunchFailure, cudaErrorECCUncorrectable,
                          cudaErrorNvlinkUncorrectable, cudaErrorMpsClientTerminated, cudaErrorExternalDevice,
#if CUDART_VERSION >= 12080
                          cudaErrorContained, cudaErrorTensorMemoryLeak,
#endif
                          cudaErrorLaunchTimeout}) {
    SCOPED_TRACE(cudaGetErrorName(err));
    EXPECT_TRUE(cuda::is_sticky(err));
    const Status s = cuda::cuda_error(err, "kernel<<<...>>>", "/build/x/kernels/cuda/k.cu", 7);
    EXPECT_EQ(s.code(), StatusCode::kInternal);
    EXPECT_NE(s.message().find("the CUDA context is lost"), std::string::npos) << s;
    EXPECT_NE(s.message().find("kernels/cuda/k.cu:7"), std::string::npos) << s;
  }
  for (cudaError_t err : {cudaErrorInvalidValue, cudaErrorMemoryAllocation, cudaErrorNotReady,
                          cudaErrorStreamCaptureInvalidated}) {
    SCOPED_TRACE(cudaGetErrorName(err));
    EXPECT_FALSE(cuda::is_sticky(err));
    const Status s = cuda::cuda_error(err, "call()", "k.cu", 1);
    EXPECT_EQ(s.message().find("the CUDA context is lost"), std::string::npos) << s;
  }
  EXPECT_EQ(cuda::cuda_error(cudaErrorMemoryAllocation, "cudaMalloc", "k.cu", 1).code(),
            StatusCode::kResourceExhausted);
  EXPECT_EQ(cuda::cuda_error(cudaErrorNoDevice, "cudaSetDevice", "k.cu", 1).code(), StatusCode::kUnavailable);
}

// Two backends on one device (a daemon makes one per group layer): what one keeps cached when
// its buffers go back is freed for the other's allocation when the device runs out. The device
// is filled to within kLeft of its end by one plain cudaMalloc, so that the second backend's
// block fits only once the first one's idle block is freed.
TEST_F(CudaOps, AnotherBackendsIdleCacheIsFreedWhenTheDeviceRunsOut) {
  constexpr size_t kLeft = size_t{1} << 30, kBlock = size_t{768} << 20;
  auto other = make_backend("cuda", {});
  ASSERT_TRUE(other.ok()) << other.status();
  ASSERT_TRUE(gpu_->synchronize().ok());
  size_t free_bytes = 0, total = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
  ASSERT_GT(free_bytes, 2 * kLeft);
  void* filler = nullptr;
  ASSERT_EQ(cudaMalloc(&filler, free_bytes - kLeft), cudaSuccess);
  // Freed on every way out: a failed assertion below must not leave the device full for the
  // tests after this one.
  const std::unique_ptr<void, void (*)(void*)> free_filler(filler, [](void* p) { (void)cudaFree(p); });
  size_t free_while_held = 0, free_after = 0;
  {
    auto cached = gpu_->allocate(kBlock);
    ASSERT_TRUE(cached.ok()) << cached.status();
    ASSERT_EQ(cudaMemGetInfo(&free_while_held, &total), cudaSuccess);
  }  // back to gpu_'s cache, not to the device
  ASSERT_EQ(cudaMemGetInfo(&free_after, &total), cudaSuccess);
  ASSERT_LT(free_after, free_while_held + kBlock)
      << "the block went back to the device, not to gpu_'s cache: nothing left to test";
  {
    auto second = (*other)->allocate(kBlock);
    EXPECT_TRUE(second.ok()) << second.status()
                             << " (the first backend's idle block was not freed for it)";
  }
}

// Inside a graph capture the gate loss is a branch the rest of the step does not wait for: a
// captured gate_forward + locations has two leaves (the loss's last node and locations' last).
// A copy of l_aux captured after join_forked_work() waits for both: one leaf. Either graph,
// replayed, gives the eager ops' results bit for bit, l_aux (and its copy) included.
TEST_F(CudaOps, CapturedGateLossIsABranchTheStepDoesNotWaitFor) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  constexpr int64_t S = 96, E = 8, M = 32;
  constexpr int k = 2;
  auto x = make({S, M}), wg = make({E, M}), scores = make({S, E}), gates = make({S, k}), l_aux = make({1});
  auto idx = make(DType::kI32, {S, k}), loc = make(DType::kI32, {S, k}), count = make(DType::kI32, {E});
  auto l_aux_copy = make({1});
  x.set(normal(S * M, 1.0));
  wg.set(normal(E * M, 2.0 / std::sqrt(double(M))));
  auto step = [&]() -> Status {
    TUTEL_RETURN_IF_ERROR(gpu_->gate_forward(
        {x.gpu(), wg.gpu(), {}, k, true, scores.gpu(), idx.gpu(), gates.gpu(), l_aux.gpu()}));
    return gpu_->locations({scores.gpu(), idx.gpu(), false, loc.gpu(), count.gpu()});
  };
  const std::vector<Mirror*> outputs = {&scores, &gates, &l_aux, &idx, &loc, &count};
  auto bits = [&] {
    std::vector<std::vector<uint32_t>> all;
    for (Mirror* m : outputs) all.push_back(m->gpu_values<uint32_t>());
    return all;
  };
  ASSERT_TRUE(step().ok());
  ASSERT_TRUE(gpu_->synchronize().ok());
  const auto want = bits();
  auto stream = static_cast<cudaStream_t>(gpu_->native_stream());
  for (bool join : {false, true}) {
    SCOPED_TRACE(join ? "joined before the capture ends" : "left forked");
    ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    Status captured = step();
    const Status joined = join ? gpu_->join_forked_work() : Status::OK();
    if (join && captured.ok() && joined.ok())
      captured = gpu_->copy(l_aux_copy.gpu().data(), l_aux.gpu().data(), 4, CopyKind::kDeviceToDevice);
    cudaGraph_t graph = nullptr;
    const cudaError_t ended = cudaStreamEndCapture(stream, &graph);
    ASSERT_TRUE(captured.ok()) << captured;
    ASSERT_TRUE(joined.ok()) << joined;
    ASSERT_EQ(ended, cudaSuccess) << cudaGetErrorString(ended);
    size_t n = 0;
    ASSERT_EQ(cudaGraphGetNodes(graph, nullptr, &n), cudaSuccess);
    std::vector<cudaGraphNode_t> nodes(n);
    ASSERT_EQ(cudaGraphGetNodes(graph, nodes.data(), &n), cudaSuccess);
    int leaves = 0;
    for (cudaGraphNode_t node : nodes) {
      size_t dependents = 0;
      ASSERT_EQ(cudaGraphNodeGetDependentNodes(node, nullptr, nullptr, &dependents), cudaSuccess);
      leaves += dependents == 0 ? 1 : 0;
    }
    EXPECT_EQ(leaves, join ? 1 : 2) << "of " << n << " nodes";
    cudaGraphExec_t exec = nullptr;
    ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
    for (Mirror* m : outputs) ASSERT_TRUE(gpu_->fill_zero(m->gpu()).ok());
    ASSERT_TRUE(gpu_->fill_zero(l_aux_copy.gpu()).ok());
    ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
    ASSERT_TRUE(gpu_->synchronize().ok());
    EXPECT_EQ(bits(), want) << "the replayed graph's outputs differ from the eager ops'";
    if (join) {
      EXPECT_EQ(l_aux_copy.gpu_values<uint32_t>(), want[2]) << "the copy did not wait for the loss";
    }
    (void)cudaGraphExecDestroy(exec);
    (void)cudaGraphDestroy(graph);
  }
}

// A shared mapping (as a session arena is) registered by two backends, as the daemon registers
// an arena with every rank: page-locked while either holds it, copies through it exact, and
// unlocked once both let go.
TEST_F(CudaOps, RegisteredHostMemoryIsPinnedWhileAnyBackendHoldsIt) {
  constexpr size_t kBytes = size_t{4} << 20;
  void* map = ::mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(map, MAP_FAILED);
  auto* host = static_cast<uint8_t*>(map);
  auto pinned = [&] {
    cudaPointerAttributes attr{};
    const cudaError_t err = cudaPointerGetAttributes(&attr, host);
    EXPECT_EQ(err, cudaSuccess) << cudaGetErrorString(err);
    return attr.type == cudaMemoryTypeHost;
  };
  auto other = make_backend("cuda", {});
  ASSERT_TRUE(other.ok()) << other.status();
  EXPECT_FALSE(pinned());

  ASSERT_TRUE(gpu_->register_host(host, kBytes).ok());
  EXPECT_TRUE(pinned());
  EXPECT_EQ(gpu_->register_host(host, kBytes).code(), StatusCode::kAlreadyExists);
  Status st = (*other)->register_host(host, kBytes);
  ASSERT_TRUE(st.ok()) << st;

  for (size_t i = 0; i < kBytes; ++i) host[i] = static_cast<uint8_t>(i * 13 + 1);
  const std::vector<uint8_t> sent(host, host + kBytes);
  auto dev = gpu_->allocate(kBytes);
  ASSERT_TRUE(dev.ok()) << dev.status();
  ASSERT_TRUE(gpu_->copy(dev->data(), host, kBytes, CopyKind::kHostToDevice).ok());
  ASSERT_TRUE(gpu_->synchronize().ok());  // from pinned memory the upload may still be reading
  std::fill(host, host + kBytes, 0);
  ASSERT_TRUE(gpu_->copy(host, dev->data(), kBytes, CopyKind::kDeviceToHost).ok());
  EXPECT_TRUE(std::equal(sent.begin(), sent.end(), host))
      << "a copy through registered memory changed the data";

  ASSERT_TRUE(gpu_->unregister_host(host).ok());
  EXPECT_TRUE(pinned()) << "the other backend still holds the range";
  EXPECT_EQ(gpu_->unregister_host(host).code(), StatusCode::kNotFound);
  ASSERT_TRUE((*other)->unregister_host(host).ok());
  EXPECT_FALSE(pinned()) << "the last unregistration must unlock the pages";
  // Registered again after a full release; the backend's destructor drops what is left.
  ASSERT_TRUE((*other)->register_host(host, kBytes).ok());
  EXPECT_TRUE(pinned());
  other->reset();
  EXPECT_FALSE(pinned());
  EXPECT_EQ(cudaGetLastError(), cudaSuccess);
  ::munmap(map, kBytes);
}
#endif

TEST_F(CudaOps, GateNoiseMatchesHostGenerator) {
  auto out = make({1001});
  run_both([&](Backend& b, bool gpu) { return b.gate_noise(1234, 7, 0.25f, gpu ? out.gpu() : out.cpu()); });
  EXPECT_TRUE(matches_cpu("noise", out, 1e-5, 1e-6));
  const auto v = out.gpu_values();
  double mean = 0, sq = 0;
  for (float x : v) mean += x, sq += double(x) * x;
  mean /= v.size();
  EXPECT_NEAR(mean, 0.0, 0.05);
  EXPECT_NEAR(std::sqrt(sq / v.size()), 0.25, 0.03);
}

// Smallest relative gap between adjacent sorted scores among each row's top k+1: where it is
// tiny, the two backends' last-ulp differences could legitimately reorder the choices.
double min_topk_gap(const std::vector<float>& scores, int64_t S, int64_t E, int k) {
  double gap = INFINITY;
  std::vector<float> row(E);
  for (int64_t s = 0; s < S; ++s) {
    std::copy(scores.begin() + s * E, scores.begin() + (s + 1) * E, row.begin());
    std::sort(row.begin(), row.end(), std::greater<>());
    for (int64_t i = 0; i < std::min<int64_t>(k, E - 1); ++i)
      gap = std::min(gap, double(row[i] - row[i + 1]) / std::max(double(row[i]), 1e-30));
  }
  return gap;
}

TEST_F(CudaOps, GateForwardMatchesCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  struct C {
    int64_t S, E, M;
    int k;
    bool normalize, noise;
  };
  for (const C& c : {C{64, 4, 32, 2, true, false}, C{37, 5, 24, 2, true, true}, C{20, 3, 16, 3, true, false},
                     C{19, 1, 16, 1, true, false}, C{1, 4, 16, 2, true, false}, C{300, 64, 48, 4, false, false},
                     C{100, 40, 8, 8, true, true}, C{6, 40, 16, 40, true, false}, C{700, 8, 20, 1, true, false}}) {
    SCOPED_TRACE("S " + std::to_string(c.S) + " E " + std::to_string(c.E) + " k " + std::to_string(c.k));
    auto x = make({c.S, c.M}), wg = make({c.E, c.M}), noise = make({c.S, c.E}), scores = make({c.S, c.E}),
         gates = make({c.S, c.k}), l_aux = make({1});
    auto idx = make(DType::kI32, {c.S, c.k});
    auto args = [&](bool gpu) {
      auto v = [&](const Mirror& m) { return gpu ? m.gpu() : m.cpu(); };
      return GateForwardArgs{v(x), v(wg), c.noise ? v(noise) : TensorView(), c.k, c.normalize, v(scores),
                             v(idx), v(gates), v(l_aux)};
    };
    bool drawn = false;
    for (int attempt = 0; attempt < 100 && !drawn; ++attempt) {
      x.set(normal(c.S * c.M, 1.0));
      wg.set(normal(c.E * c.M, 2.0 / std::sqrt(double(c.M))));
      if (c.noise) run_both([&](Backend& b, bool gpu) {
          return b.gate_noise(99, attempt, 1.f / c.E, gpu ? noise.gpu() : noise.cpu());
        });
      ASSERT_TRUE(cpu_->gate_forward(args(false)).ok());
      drawn = min_topk_gap(scores.cpu_values(), c.S, c.E, c.k) > 1e-5;
    }
    ASSERT_TRUE(drawn) << "no draw without near-ties";
    ASSERT_TRUE(gpu_->gate_forward(args(true)).ok());
    EXPECT_EQ(idx.gpu_values<int32_t>(), idx.cpu_values<int32_t>());
    EXPECT_TRUE(matches_cpu("scores", scores, 1e-5, 1e-6));
    EXPECT_TRUE(matches_cpu("gates", gates, 1e-5, 1e-6));
    EXPECT_TRUE(matches_cpu("l_aux", l_aux, 1e-5, 1e-6));
  }
}

TEST_F(CudaOps, LocationsAndSlotMapMatchCpuExactly) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  struct C {
    int64_t S, E;
    int k;
    bool prioritized;
  };
  // E = 8192 is the most a chunk's histogram counts in shared memory (E = 600: more experts than
  // a block has threads, not a multiple of them); E = 9000 takes the zeroed global histogram
  // instead. S = 0: no assignment, yet every count is written.
  for (const C& c : {C{1000, 7, 2, false}, C{1000, 7, 2, true}, C{3, 4, 2, true}, C{1, 1, 1, false},
                     C{1, 3, 2, true}, C{2000, 64, 4, true}, C{513, 2, 1, false}, C{4097, 33, 3, false},
                     C{300, 5, 5, true}, C{1100, 600, 2, false}, C{1100, 8192, 2, false},
                     C{700, 9000, 2, true}, C{0, 5, 2, false}, C{0, 5, 2, true}}) {
    SCOPED_TRACE("S " + std::to_string(c.S) + " E " + std::to_string(c.E) + " k " + std::to_string(c.k) +
                 (c.prioritized ? " batch-prioritized" : ""));
    auto scores = make({c.S, c.E});
    auto idx = make(DType::kI32, {c.S, c.k}), loc = make(DType::kI32, {c.S, c.k}),
         count = make(DType::kI32, {c.E});
    std::vector<float> sc = uniform(c.S * c.E, 0.01f, 1.f);
    // Equal priorities on purpose: every third token repeats the previous one's scores, so the
    // sort's stability decides their order.
    for (int64_t s = 1; s < c.S; s += 3) std::copy_n(sc.begin() + (s - 1) * c.E, c.E, sc.begin() + s * c.E);
    // Tokens whose scores are NaN (their input was) rank last on both, in token order.
    for (int64_t s = 5; s < c.S; s += 97)
      std::fill_n(sc.begin() + s * c.E, c.E, std::numeric_limits<float>::quiet_NaN());
    scores.set(sc);
    idx.set(random_routing(c.S, c.E, c.k));
    // Outputs poisoned first: every location and every count (most are 0 here) must be written.
    loc.set(std::vector<int32_t>(c.S * c.k, -5));
    count.set(std::vector<int32_t>(c.E, -5));
    run_both([&](Backend& b, bool gpu) {
      auto v = [&](const Mirror& m) { return gpu ? m.gpu() : m.cpu(); };
      return b.locations({v(scores), v(idx), c.prioritized, v(loc), v(count)});
    });
    ASSERT_EQ(loc.gpu_values<int32_t>(), loc.cpu_values<int32_t>());
    ASSERT_EQ(count.gpu_values<int32_t>(), count.cpu_values<int32_t>());

    const auto counts = count.cpu_values<int32_t>();
    const int64_t max_count = *std::max_element(counts.begin(), counts.end());
    for (int64_t C_ : {int64_t{0}, int64_t{1}, max_count / 2, max_count, max_count + 3}) {
      SCOPED_TRACE("capacity " + std::to_string(C_));
      auto slots = make(DType::kI32, {c.E, C_});
      run_both([&](Backend& b, bool gpu) {
        auto v = [&](const Mirror& m) { return gpu ? m.gpu() : m.cpu(); };
        return b.slot_map({v(idx), v(loc), C_, v(slots)});
      });
      EXPECT_EQ(slots.gpu_values<int32_t>(), slots.cpu_values<int32_t>());
    }
  }
}

// Routing state for the dispatch tests: expert index, locations, capacity and slot map, made on
// the CPU and mirrored.
struct Routing {
  int64_t S, E, C;
  int k;
  Mirror idx, loc, slots, gates;
};

class CudaDispatch : public CudaOps {
 protected:
  Routing routing(int64_t S, int64_t E, int k, int64_t C) {
    Routing r{S, E, C, k, make(DType::kI32, {S, k}), make(DType::kI32, {S, k}), make(DType::kI32, {E, C}),
              make({S, k})};
    auto scores = make({S, E});
    auto count = make(DType::kI32, {E});
    r.idx.set(random_routing(S, E, k));
    r.gates.set(uniform(S * k, 0.1f, 1.f));
    EXPECT_TRUE(cpu_->locations({scores.cpu(), r.idx.cpu(), false, r.loc.cpu(), count.cpu()}).ok());
    r.loc.set(r.loc.cpu_values<int32_t>());
    EXPECT_TRUE(cpu_->slot_map({r.idx.cpu(), r.loc.cpu(), C, r.slots.cpu()}).ok());
    r.slots.set(r.slots.cpu_values<int32_t>());
    return r;
  }
};

TEST_F(CudaDispatch, EncodeDecodeAndBackwardMatchCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  // Widths divisible by 4 take the float4 path, the others the scalar one; capacities below the
  // largest count drop assignments.
  for (int64_t width : {32, 13, 4, 1}) {
    for (bool postscore : {true, false}) {
      const int64_t S = 150, E = 6, C = 40;
      const int k = 2;
      SCOPED_TRACE("width " + std::to_string(width) + (postscore ? " postscore" : " prescore"));
      Routing r = routing(S, E, k, C);
      auto v = [&](const Mirror& m, bool gpu) { return gpu ? m.gpu() : m.cpu(); };

      auto x = make({S, width}), disp = make({E, C, width});
      x.set(normal(S * width, 1.0));
      run_both([&](Backend& b, bool gpu) {
        return b.encode({v(x, gpu), v(r.gates, gpu), v(r.slots, gpu), postscore, v(disp, gpu)});
      });
      EXPECT_EQ(disp.gpu_values(), disp.cpu_values()) << "encode is a copy (or one product) per element";

      auto expert_out = make({E, C, width}), y = make({S, width});
      expert_out.set(normal(E * C * width, 1.0));
      run_both([&](Backend& b, bool gpu) {
        return b.decode({v(expert_out, gpu), v(r.gates, gpu), v(r.idx, gpu), v(r.loc, gpu), C, postscore, v(y, gpu)});
      });
      EXPECT_TRUE(matches_cpu("decode y", y, 1e-5, 1e-6));

      auto dy = make({S, width}), d_out = make({E, C, width}), d_gates = make({S, k});
      dy.set(normal(S * width, 1.0));
      d_gates.set(normal(S * k, 1.0));  // overwritten by decode'
      run_both([&](Backend& b, bool gpu) {
        return b.decode_backward({v(dy, gpu), v(expert_out, gpu), v(r.gates, gpu), v(r.idx, gpu), v(r.loc, gpu),
                                  v(r.slots, gpu), postscore, v(d_out, gpu), v(d_gates, gpu)});
      });
      EXPECT_TRUE(matches_cpu("decode' d_expert_out", d_out, 1e-6, 1e-7));
      EXPECT_TRUE(matches_cpu("decode' d_gates", d_gates, 1e-5, 1e-6));

      auto d_disp = make({E, C, width}), dx = make({S, width});
      d_disp.set(normal(E * C * width, 1.0));
      dx.set(normal(S * width, 1.0));  // overwritten by encode'
      run_both([&](Backend& b, bool gpu) {
        return b.encode_backward({v(d_disp, gpu), v(x, gpu), v(r.gates, gpu), v(r.idx, gpu), v(r.loc, gpu), C,
                                  postscore, v(dx, gpu), v(d_gates, gpu)});
      });
      EXPECT_TRUE(matches_cpu("encode' dx", dx, 1e-5, 1e-6));
      EXPECT_TRUE(matches_cpu("encode' d_gates", d_gates, 1e-5, 1e-6));
    }
  }
}

TEST_F(CudaOps, GateBackwardMatchesCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  struct C {
    int64_t S, E, M;
    int k;
    bool normalize;
  };
  for (const C& c : {C{64, 4, 32, 2, true}, C{64, 4, 32, 2, false}, C{30, 1, 16, 1, true}, C{300, 40, 24, 3, true},
                     C{9, 35, 8, 35, true}, C{1, 3, 8, 2, true}}) {
    SCOPED_TRACE("S " + std::to_string(c.S) + " E " + std::to_string(c.E) + " k " + std::to_string(c.k));
    auto x = make({c.S, c.M}), wg = make({c.E, c.M}), scores = make({c.S, c.E}), gates = make({c.S, c.k}),
         l_aux = make({1}), d_gates = make({c.S, c.k}), d_logits = make({c.S, c.E}), dx = make({c.S, c.M}),
         d_wg = make({c.E, c.M});
    auto idx = make(DType::kI32, {c.S, c.k});
    x.set(normal(c.S * c.M, 1.0));
    wg.set(normal(c.E * c.M, 1.0 / std::sqrt(double(c.M))));
    ASSERT_TRUE(cpu_->gate_forward({x.cpu(), wg.cpu(), {}, c.k, c.normalize, scores.cpu(), idx.cpu(), gates.cpu(),
                                    l_aux.cpu()}).ok());
    scores.set(scores.cpu_values());
    idx.set(idx.cpu_values<int32_t>());
    d_gates.set(normal(c.S * c.k, 1.0));
    dx.set(normal(c.S * c.M, 1.0));    // accumulated into
    d_wg.set(normal(c.E * c.M, 1.0));  // accumulated into
    run_both([&](Backend& b, bool gpu) {
      auto v = [&](const Mirror& m) { return gpu ? m.gpu() : m.cpu(); };
      return b.gate_backward({v(x), v(wg), v(scores), v(idx), v(d_gates), 0.7f, c.normalize, v(d_logits), v(dx),
                              v(d_wg)});
    });
    EXPECT_TRUE(matches_cpu("d_logits", d_logits, 1e-4, 1e-5));
    EXPECT_TRUE(matches_cpu("dx", dx, 1e-4, 1e-5));
    EXPECT_TRUE(matches_cpu("d_wg", d_wg, 1e-4, 1e-5));
  }
}

TEST_F(CudaOps, ExpertForwardBackwardMatchCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  struct Shape5 {
    int64_t E, C, M, H, O;
  };
  for (const Shape5& sh : {Shape5{3, 5, 12, 20, 7}, Shape5{2, 600, 8, 16, 8}, Shape5{1, 1, 3, 5, 2}}) {
    for (Activation act : {Activation::kRelu, Activation::kGelu, Activation::kSilu}) {
      for (bool biases : {true, false}) {
        for (DType dt : {DType::kF32, DType::kBF16}) {
          const int64_t E = sh.E, C = sh.C, M = sh.M, H = sh.H, O = sh.O;
          SCOPED_TRACE("E " + std::to_string(E) + " C " + std::to_string(C) + " " +
                       std::string(activation_name(act)) + (biases ? " biases " : " no biases ") +
                       std::string(dtype_name(dt)));
          const double tol = dt == DType::kF32 ? 1e-4 : 1e-2;
          auto disp = make({E, C, M}), fc1 = make({E, H, M}), b1 = make({E, H}), fc2 = make({E, H, O}),
               b2 = make({E, O}), pre = make({E, C, H}), hidden = make({E, C, H}), out = make({E, C, O});
          const ExpertShape shape{E, C, M, H, O};
          auto cpu_ws = make(DType::kU8, {static_cast<int64_t>(cpu_->expert_workspace_bytes(shape, dt)) + 1});
          auto gpu_ws_bytes = static_cast<int64_t>(gpu_->expert_workspace_bytes(shape, dt));
          if (dt == DType::kF32) {
            EXPECT_EQ(gpu_ws_bytes, 0);
          }
          auto gpu_ws = make(DType::kU8, {gpu_ws_bytes + 1});
          auto v = [&](const Mirror& m, bool gpu) { return gpu ? m.gpu() : m.cpu(); };
          auto weights = [&](bool gpu) {
            return ExpertWeights{v(fc1, gpu), biases ? v(b1, gpu) : TensorView(), v(fc2, gpu),
                                 biases ? v(b2, gpu) : TensorView()};
          };
          auto ws = [&](bool gpu) {
            return gpu ? TensorView(gpu_ws.gpu().data(), DType::kU8, {gpu_ws_bytes}, gpu_->device()) : cpu_ws.cpu();
          };
          auto forward = [&](Backend& b, bool gpu) {
            return b.expert_forward({v(disp, gpu), weights(gpu), act, dt, v(pre, gpu), v(hidden, gpu), v(out, gpu),
                                     ws(gpu)});
          };
          // relu's derivative jumps at 0: redraw until no pre-activation is within float noise of it.
          bool drawn = false;
          for (int attempt = 0; attempt < 50 && !drawn; ++attempt) {
            disp.set(normal(E * C * M, 1.0));
            fc1.set(normal(E * H * M, 1.0 / std::sqrt(double(M))));
            fc2.set(normal(E * H * O, 1.0 / std::sqrt(double(H))));
            b1.set(normal(E * H, 0.1));
            b2.set(normal(E * O, 0.1));
            ASSERT_TRUE(forward(*cpu_, false).ok());
            float closest = INFINITY;
            for (float p : pre.cpu_values()) closest = std::min(closest, std::abs(p));
            drawn = act != Activation::kRelu || closest > 1e-5f;
          }
          ASSERT_TRUE(drawn) << "no draw without pre-activations near 0";
          ASSERT_TRUE(forward(*gpu_, true).ok());
          ASSERT_TRUE(gpu_->synchronize().ok());
          EXPECT_TRUE(matches_cpu("pre_activation", pre, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("hidden", hidden, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("expert_out", out, tol, tol / 10));

          auto d_out = make({E, C, O}), d_hidden = make({E, C, H}), d_disp = make({E, C, M}),
               g_fc1 = make({E, H, M}), g_b1 = make({E, H}), g_fc2 = make({E, H, O}), g_b2 = make({E, O});
          d_out.set(normal(E * C * O, 1.0));
          for (Mirror* g : {&g_fc1, &g_b1, &g_fc2, &g_b2})  // gradients accumulate onto what is there
            g->set(normal(g->nbytes() / 4, 1.0));
          run_both([&](Backend& b, bool gpu) {
            ExpertWeights grads{v(g_fc1, gpu), biases ? v(g_b1, gpu) : TensorView(), v(g_fc2, gpu),
                                biases ? v(g_b2, gpu) : TensorView()};
            return b.expert_backward({v(disp, gpu), v(pre, gpu), v(hidden, gpu), weights(gpu), act, dt, v(d_out, gpu),
                                      v(d_hidden, gpu), v(d_disp, gpu), grads, ws(gpu)});
          });
          EXPECT_TRUE(matches_cpu("d_pre", d_hidden, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("d_dispatched", d_disp, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("d_fc1_w", g_fc1, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("d_fc2_w", g_fc2, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("d_fc1_b", g_b1, tol, tol / 10));
          EXPECT_TRUE(matches_cpu("d_fc2_b", g_b2, tol, tol / 10));
        }
      }
    }
  }
}

// The expert forward on both CUDA paths (the GEMMs' bias and ReLU in cuBLASLt's epilogue, the
// default, and in passes of their own), as a training forward (keep_hidden) and as an inference
// one, against the CPU backend: expert_out always, hidden where kept. Around that, what the
// paths promise of their buffers:
// - under bf16, an inference forward does not write the f32 hidden;
// - under bf16, a training forward leaves in the workspace's first room the bf16 operand its
//   second GEMM read: the kept f32 hidden as the host rounds it;
// - inference and training give the same expert_out bits, except the fused inference ReLU
//   forward under bf16, whose first GEMM writes the second's bf16 operand itself (a kernel of
//   its own, which may accumulate in another order): that one is held to the CPU's tolerance.
// Widths divisible by 4 take the 16-byte paths, the others the scalar ones.
TEST_F(CudaOps, ExpertForwardPathsMatchCpuAndKeepWhatTheyPromise) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  auto separate = make_backend("cuda", {.device_index = gpu_->device().index, .fused_epilogues = false});
  ASSERT_TRUE(separate.ok()) << separate.status();
  struct Shape5 {
    int64_t E, C, M, H, O;
  };
  for (const Shape5& sh :
       {Shape5{3, 5, 12, 20, 7}, Shape5{2, 33, 16, 48, 8}, Shape5{1, 3, 3, 5, 2}}) {
    for (Activation act : {Activation::kRelu, Activation::kGelu, Activation::kSilu}) {
      for (bool biases : {true, false}) {
        for (DType dt : {DType::kF32, DType::kBF16}) {
          const int64_t E = sh.E, C = sh.C, M = sh.M, H = sh.H, O = sh.O;
          SCOPED_TRACE("E " + std::to_string(E) + " C " + std::to_string(C) + " H " +
                       std::to_string(H) + " " + std::string(activation_name(act)) +
                       (biases ? " biases " : " no biases ") + std::string(dtype_name(dt)));
          const double tol = dt == DType::kF32 ? 1e-4 : 1e-2;
          auto disp = make({E, C, M}), fc1 = make({E, H, M}), b1 = make({E, H}),
               fc2 = make({E, H, O}), b2 = make({E, O}), pre = make({E, C, H}),
               hidden = make({E, C, H}), out = make({E, C, O});
          disp.set(normal(E * C * M, 1.0));
          fc1.set(normal(E * H * M, 1.0 / std::sqrt(double(M))));
          fc2.set(normal(E * H * O, 1.0 / std::sqrt(double(H))));
          b1.set(normal(E * H, 0.1));
          b2.set(normal(E * O, 0.1));
          const ExpertShape shape{E, C, M, H, O};
          auto cpu_ws = make(DType::kU8, {static_cast<int64_t>(cpu_->expert_workspace_bytes(shape, dt)) + 1});
          const ExpertWeights wc{fc1.cpu(), biases ? b1.cpu() : TensorView(), fc2.cpu(),
                                 biases ? b2.cpu() : TensorView()};
          Status s = cpu_->expert_forward(
              {disp.cpu(), wc, act, dt, pre.cpu(), hidden.cpu(), out.cpu(), cpu_ws.cpu()});
          ASSERT_TRUE(s.ok()) << s;
          const std::vector<float> cpu_out = out.cpu_values(), cpu_hidden = hidden.cpu_values(),
                                   cpu_pre = pre.cpu_values();
          const std::vector<double> want_out(cpu_out.begin(), cpu_out.end()),
              want_hidden(cpu_hidden.begin(), cpu_hidden.end()), want_pre(cpu_pre.begin(), cpu_pre.end());

          const auto ws_bytes = static_cast<int64_t>(gpu_->expert_workspace_bytes(shape, dt));
          auto ws = make(DType::kU8, {std::max<int64_t>(ws_bytes, 1)});
          const TensorView gpu_ws(ws.gpu().data(), DType::kU8, {ws_bytes}, gpu_->device());
          const ExpertWeights wg{fc1.gpu(), biases ? b1.gpu() : TensorView(), fc2.gpu(),
                                 biases ? b2.gpu() : TensorView()};
          for (Backend* b : {gpu_.get(), separate->get()}) {
            const bool fused = b == gpu_.get();
            SCOPED_TRACE(fused ? "fused epilogues" : "separate epilogues");
            std::vector<uint32_t> outs[2], hiddens[2];  // bits, by keep_hidden
            for (bool keep : {true, false}) {
              SCOPED_TRACE(keep ? "training forward" : "inference forward");
              hidden.set(std::vector<float>(E * C * H, -7.f));
              // The tensors live on gpu_'s stream; the other backend runs on its own.
              ASSERT_TRUE(gpu_->synchronize().ok());
              s = b->expert_forward({disp.gpu(), wg, act, dt, {}, hidden.gpu(), out.gpu(), gpu_ws, keep});
              ASSERT_TRUE(s.ok()) << s;
              ASSERT_TRUE(b->synchronize().ok());
              EXPECT_TRUE(all_close("expert_out", out.gpu_values(), want_out, tol, tol / 10));
              if (keep) {
                EXPECT_TRUE(all_close("hidden", hidden.gpu_values(), want_hidden, tol, tol / 10));
              }
              outs[keep] = out.gpu_values<uint32_t>();
              hiddens[keep] = hidden.gpu_values<uint32_t>();
              if (!keep && fused && dt == DType::kBF16 && act == Activation::kRelu) {
                // hidden's memory holds the second GEMM's operand: bf16(relu(pre)) packed from its
                // start where cuBLASLt fused the epilogue, else pre in f32 (bias in the epilogue,
                // ReLU in the pass that writes only the bf16 copy).
                std::vector<uint16_t> packed(E * C * H);
                std::memcpy(packed.data(), hiddens[0].data(), packed.size() * sizeof(uint16_t));
                std::vector<float> as_bf16(packed.size());
                for (size_t i = 0; i < packed.size(); ++i) as_bf16[i] = bf16_to_f32(packed[i]);
                const bool packed_hidden = all_close("bf16 hidden", as_bf16, want_hidden, tol, tol / 10);
                // Neither epilogue fused (cuBLASLt refused both): the GEMM's output, pre less b1.
                std::vector<double> gemm_out = want_pre;
                const std::vector<float> bias = b1.cpu_values();
                for (size_t i = 0; biases && i < gemm_out.size(); ++i)
                  gemm_out[i] -= bias[(i / (C * H)) * H + i % H];
                const std::vector<float> f32_view = hidden.gpu_values();
                EXPECT_TRUE(packed_hidden || all_close("pre", f32_view, want_pre, tol, tol / 10) ||
                            all_close("pre less b1", f32_view, gemm_out, tol, tol / 10))
                    << "hidden holds neither the bf16 operand nor pre";
                std::cout << "  [" << (packed_hidden ? "fused: the first GEMM wrote the bf16 operand"
                                                     : "cuBLASLt did not fuse the bf16 output")
                          << "]\n";
              }
              if (!keep || dt != DType::kBF16) continue;
              const std::vector<uint8_t> room = ws.gpu_values<uint8_t>();
              std::vector<uint16_t> read(E * C * H);
              std::memcpy(read.data(), room.data(), read.size() * sizeof(uint16_t));
              EXPECT_TRUE(rounded_as_reference(hidden.gpu_values(), read))
                  << "the second GEMM's bf16 operand is not the kept hidden rounded";
            }
            if (!(fused && dt == DType::kBF16 && act == Activation::kRelu)) {
              EXPECT_EQ(outs[0], outs[1]) << "expert_out of an inference forward differs from a training one";
            }
            if (dt == DType::kBF16 && biases) {
              // Not act(pre) in f32: the GEMM's output before the activation, or its bf16 copy.
              EXPECT_NE(hiddens[0], hiddens[1]) << "an inference forward wrote the f32 hidden";
            } else if (dt == DType::kF32) {
              EXPECT_EQ(hiddens[0], hiddens[1]) << "f32 matmuls read the f32 hidden: always written";
            }
          }
        }
      }
    }
  }
}

TEST_F(CudaOps, ExpertOpsRefuseWhatTheyCannotDo) {
  const int64_t E = 2, C = 4, M = 8, H = 8, O = 8;
  DeviceTensor disp(*gpu_, DType::kF32, {E, C, M}), fc1(*gpu_, DType::kF32, {E, H, M}),
      fc2(*gpu_, DType::kF32, {E, H, O}), hidden(*gpu_, DType::kF32, {E, C, H}), out(*gpu_, DType::kF32, {E, C, O}),
      small_ws(*gpu_, DType::kU8, {16}), d_hidden(*gpu_, DType::kF32, {E, C, H}),
      d_disp(*gpu_, DType::kF32, {E, C, M});
  const ExpertWeights w{fc1.view(), {}, fc2.view(), {}};
  Status s = gpu_->expert_forward({disp.view(), w, Activation::kGelu, DType::kBF16, {}, hidden.view(), out.view(),
                                   small_ws.view()});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("expert_workspace_bytes"), std::string_view::npos) << s;
  s = gpu_->expert_backward({disp.view(), {}, hidden.view(), w, Activation::kGelu, DType::kF32, out.view(),
                             d_hidden.view(), d_disp.view(), w, {}});
  EXPECT_EQ(s.code(), StatusCode::kInvalidArgument) << s;
  DeviceTensor p(*gpu_, DType::kF32, {10}), g(*gpu_, DType::kF32, {10});
  EXPECT_FALSE(gpu_->sgd_step({p.view(), g.view(), {}, 0.1f, 0.9f}).ok());
  EXPECT_FALSE(gpu_->adamw_step({p.view(), g.view(), p.view(), p.view(), 1e-3f, 0.9f, 0.999f, 1e-8f, 0.f, 0}).ok());
  // An empty expert batch (capacity 0) is a no-op, as on the CPU.
  DeviceTensor empty(*gpu_, DType::kF32, {E, 0, M});
  EXPECT_TRUE(gpu_->expert_forward({TensorView(empty.view().data(), DType::kF32, {E, 0, M}, gpu_->device()), w,
                                    Activation::kRelu, DType::kF32, {}, hidden.view(), out.view(), {}}).ok());
  EXPECT_TRUE(gpu_->synchronize().ok());
}

TEST_F(CudaOps, OptimizersMatchCpu) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  const int64_t n = 10007;
  struct Sgd {
    float momentum, weight_decay;
    bool nesterov;
  };
  for (const Sgd& c : {Sgd{0.f, 0.f, false}, Sgd{0.9f, 0.f, false}, Sgd{0.9f, 1e-2f, true}, Sgd{0.5f, 1e-3f, false}}) {
    SCOPED_TRACE("sgd momentum " + std::to_string(c.momentum) + (c.nesterov ? " nesterov" : ""));
    auto p = make({n}), g = make({n}), buf = make({n});
    p.set(normal(n, 1.0));
    for (int step = 0; step < 3; ++step) {
      g.set(normal(n, 1.0));
      run_both([&](Backend& b, bool gpu) {
        auto v = [&](const Mirror& m) { return gpu ? m.gpu() : m.cpu(); };
        return b.sgd_step({v(p), v(g), c.momentum != 0.f ? v(buf) : TensorView(), 0.05f, c.momentum,
                           c.weight_decay, c.nesterov, step == 0});
      });
    }
    EXPECT_TRUE(matches_cpu("sgd param", p, 1e-5, 1e-6));
    if (c.momentum != 0.f) {
      EXPECT_TRUE(matches_cpu("sgd momentum buffer", buf, 1e-5, 1e-6));
    }
  }
  auto p = make({n}), g = make({n}), m = make({n}), v2 = make({n});
  p.set(normal(n, 1.0));
  for (int64_t step = 1; step <= 4; ++step) {
    g.set(normal(n, 1.0));
    run_both([&](Backend& b, bool gpu) {
      auto v = [&](const Mirror& t) { return gpu ? t.gpu() : t.cpu(); };
      return b.adamw_step({v(p), v(g), v(m), v(v2), 1e-2f, 0.9f, 0.999f, 1e-8f, 0.01f, step});
    });
  }
  EXPECT_TRUE(matches_cpu("adamw param", p, 1e-5, 1e-6));
  EXPECT_TRUE(matches_cpu("adamw exp_avg", m, 1e-5, 1e-6));
  EXPECT_TRUE(matches_cpu("adamw exp_avg_sq", v2, 1e-5, 1e-6));
}

}  // namespace
}  // namespace tutel::testing
