#include "cuda_floor.hpp"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <type_traits>

#include "cuda_timing.hpp"

namespace tutel::bench {
namespace {

#define TUTEL_BENCH_CUBLAS_CHECK(expr)                                              \
  do {                                                                              \
    const cublasStatus_t _bench_cublas_st = (expr);                                 \
    if (_bench_cublas_st != CUBLAS_STATUS_SUCCESS)                                  \
      return Status::Internal(std::string(#expr) + " failed at " + __FILE__ + ":" + \
                              std::to_string(__LINE__) + ": " +                     \
                              cublasGetStatusString(_bench_cublas_st));             \
  } while (0)

struct CublasDeleter {
  void operator()(cublasHandle_t h) const { (void)cublasDestroy(h); }
};
using CublasPtr = std::unique_ptr<std::remove_pointer_t<cublasHandle_t>, CublasDeleter>;

// What the backend gives cuBLAS (kernels/cuda), so both pick their kernels with the same room.
constexpr size_t kCublasWorkspaceBytes = size_t{32} << 20;
constexpr size_t kPatternBytes = size_t{4} << 20;
constexpr size_t kMaxCopyBytes = size_t{1} << 30;

// N(0, 1) numbers as bf16 (an f32's upper half) or f32 bytes, from a fixed seed.
std::vector<uint8_t> random_pattern(bool bf16) {
  std::vector<uint8_t> bytes(kPatternBytes);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t width = bf16 ? 2 : 4;
  for (size_t i = 0; i + width <= bytes.size(); i += width) {
    const float v = normal(rng);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if (bf16) {
      const uint16_t upper = static_cast<uint16_t>(bits >> 16);
      std::memcpy(&bytes[i], &upper, 2);
    } else {
      std::memcpy(&bytes[i], &bits, 4);
    }
  }
  return bytes;
}

// `pattern` repeated over [data, data + bytes): one host-to-device copy, then device-to-device
// copies that double the filled part.
Status fill_tiled(Backend& b, void* data, size_t bytes, const std::vector<uint8_t>& pattern) {
  auto* dst = static_cast<char*>(data);
  size_t filled = std::min(bytes, pattern.size());
  TUTEL_RETURN_IF_ERROR(b.copy(dst, pattern.data(), filled, CopyKind::kHostToDevice));
  while (filled < bytes) {
    const size_t n = std::min(filled, bytes - filled);
    TUTEL_RETURN_IF_ERROR(b.copy(dst + filled, dst, n, CopyKind::kDeviceToDevice));
    filled += n;
  }
  return b.synchronize();
}

}  // namespace

Result<GemmTiming> time_cuda_gemms(Backend& backend, const std::vector<GemmShape>& gemms, bool bf16,
                                   int repeats) {
  auto stream = static_cast<cudaStream_t>(backend.native_stream());
  if (!stream) return Status::InvalidArgument("the GEMM floor needs the cuda backend's stream");
  // The workspace outlives the handle that uses it.
  TUTEL_ASSIGN_OR_RETURN(DeviceBuffer cublas_workspace, backend.allocate(kCublasWorkspaceBytes));
  cublasHandle_t raw = nullptr;
  TUTEL_BENCH_CUBLAS_CHECK(cublasCreate(&raw));
  CublasPtr handle(raw);
  TUTEL_BENCH_CUBLAS_CHECK(cublasSetStream(raw, stream));
  TUTEL_BENCH_CUBLAS_CHECK(cublasSetWorkspace(raw, cublas_workspace.data(), kCublasWorkspaceBytes));

  const std::vector<uint8_t> pattern = random_pattern(bf16);
  const cudaDataType in_type = bf16 ? CUDA_R_16BF : CUDA_R_32F;
  const size_t in_size = bf16 ? 2 : 4;
  const float alpha = 1.f, beta = 0.f;
  GemmTiming total;
  for (const GemmShape& g : gemms) {
    const int64_t a_elems = g.m * g.k, b_elems = g.k * g.n, c_elems = g.m * g.n;
    TUTEL_ASSIGN_OR_RETURN(DeviceBuffer a, backend.allocate(g.batch * a_elems * in_size));
    TUTEL_ASSIGN_OR_RETURN(DeviceBuffer b, backend.allocate(g.batch * b_elems * in_size));
    TUTEL_ASSIGN_OR_RETURN(DeviceBuffer c, backend.allocate(g.batch * c_elems * 4));
    TUTEL_RETURN_IF_ERROR(fill_tiled(backend, a.data(), a.bytes(), pattern));
    TUTEL_RETURN_IF_ERROR(fill_tiled(backend, b.data(), b.bytes(), pattern));
    // Row-major C[m, n] = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B goes first, as in
    // the backend's gemm(). Leading dimensions are the stored matrices' row strides.
    const cublasOperation_t op_b = g.b_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_a = g.a_transposed ? CUBLAS_OP_T : CUBLAS_OP_N;
    const int m = static_cast<int>(g.n), n = static_cast<int>(g.m), k = static_cast<int>(g.k);
    const int ldb = static_cast<int>(g.b_transposed ? g.k : g.n);
    const int lda = static_cast<int>(g.a_transposed ? g.m : g.k);
    const int ldc = static_cast<int>(g.n);
    auto batched = [&]() -> Status {
      TUTEL_BENCH_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          raw, op_b, op_a, m, n, k, &alpha, b.data(), in_type, ldb, b_elems, a.data(), in_type, lda,
          a_elems, &beta, c.data(), CUDA_R_32F, ldc, c_elems, static_cast<int>(g.batch),
          CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      return Status::OK();
    };
    auto per_expert = [&]() -> Status {
      for (int64_t e = 0; e < g.batch; ++e) {
        const char* pb = static_cast<const char*>(b.data()) + e * b_elems * in_size;
        const char* pa = static_cast<const char*>(a.data()) + e * a_elems * in_size;
        float* pc = static_cast<float*>(c.data()) + e * c_elems;
        TUTEL_BENCH_CUBLAS_CHECK(cublasGemmEx(raw, op_b, op_a, m, n, k, &alpha, pb, in_type, ldb,
                                              pa, in_type, lda, &beta, pc, CUDA_R_32F, ldc,
                                              CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      }
      return Status::OK();
    };
    TUTEL_ASSIGN_OR_RETURN(const double batched_s,
                           median_stream_seconds(stream, 1, repeats, batched));
    TUTEL_ASSIGN_OR_RETURN(const double per_expert_s,
                           median_stream_seconds(stream, 1, repeats, per_expert));
    total.flops += g.flops();
    total.seconds += std::min(batched_s, per_expert_s);
  }
  TUTEL_RETURN_IF_ERROR(backend.synchronize());
  return total;
}

Result<CopyBandwidth> measure_device_copy(Backend& backend, int repeats) {
  auto stream = static_cast<cudaStream_t>(backend.native_stream());
  if (!stream) return Status::InvalidArgument("the copy ceiling needs the cuda backend's stream");
  size_t free_bytes = 0, total_bytes = 0;
  TUTEL_BENCH_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  // Far beyond the L2 (50 MiB on an H200) so the copy runs at memory speed.
  const size_t bytes = std::min(kMaxCopyBytes, free_bytes / 4) / 4096 * 4096;
  if (bytes < (size_t{64} << 20))
    return Status::ResourceExhausted("under 256 MiB of device memory free for the copy ceiling");
  TUTEL_ASSIGN_OR_RETURN(DeviceBuffer src, backend.allocate(bytes));
  TUTEL_ASSIGN_OR_RETURN(DeviceBuffer dst, backend.allocate(bytes));
  TUTEL_RETURN_IF_ERROR(fill_tiled(backend, src.data(), bytes, random_pattern(false)));
  TUTEL_ASSIGN_OR_RETURN(
      const double secs, median_stream_seconds(stream, 1, repeats, [&]() -> Status {
        TUTEL_BENCH_CUDA_CHECK(
            cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, stream));
        return Status::OK();
      }));
  return CopyBandwidth{2.0 * static_cast<double>(bytes) / secs, bytes};
}

}  // namespace tutel::bench
