// Strided-batched GEMMs through cuBLASLt with the bias (and ReLU) in the GEMM's epilogue, so the
// expert FFN does not pass over its [E, C, H] and [E, C, O] activations again to add them, and
// the first GEMM can write the second's bf16 operand itself.
//
// Why cuBLASLt: cublasGemmStridedBatchedEx has no epilogue. At the GPU shape of tutel-bench layer
// each pass over [E, C, H] f32 moves 1.9 GB (~0.45 ms on an H200, ~5 % of the forward).
// cuBLASLt's GELU epilogue is the tanh form (ours is the erf form) and it has no SiLU, so only
// the bias and ReLU go into the epilogue; gelu and silu keep their own pass.
//
// A problem cuBLASLt offers no algorithm for (a data type, an alignment, a bias type it does not
// take) is remembered as such, and the caller runs it the plain way: this is an optimisation,
// never a requirement.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <unordered_map>

#include "tutel/core/status.hpp"

namespace tutel::cuda {

// D[b] = epilogue(op(A[b]) · op(B[b])) for b < batch, column-major, as cuBLAS sees it (m × n
// output, inner dimension k); A and B are ab_type, D is d_type, accumulation is f32.
struct LtProblem {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  int64_t lda = 0, ldb = 0, ldd = 0;
  int64_t stride_a = 0, stride_b = 0, stride_d = 0;  // elements between batches
  int64_t batch = 1;
  cudaDataType ab_type = CUDA_R_32F;
  cudaDataType d_type = CUDA_R_32F;
  bool bias = false;         // f32 bias[b][0..m) added to every column, before the ReLU
  int64_t bias_stride = 0;   // elements between the batches' bias vectors
  bool relu = false;
  // What the algorithm may assume of the pointers (bytes; powers of two up to 256), from the
  // pointers and the batch strides: cuBLASLt picks its kernels by alignment.
  uint32_t align_a = 256, align_b = 256, align_d = 256, align_bias = 256;

  bool operator==(const LtProblem&) const = default;
};

// The largest power of two, at most 256, dividing the address and every byte offset given.
uint32_t lt_alignment(const void* p, std::initializer_list<int64_t> byte_offsets = {});

// Not thread-safe: one backend's ops run one at a time (its stream's order), and so do its calls
// here; run() also sets the bias pointer on a cached descriptor.
class LtGemm {
 public:
  LtGemm();  // out of line, as ~LtGemm: Plan is complete only in lt_gemm.cpp
  ~LtGemm();
  LtGemm(const LtGemm&) = delete;
  LtGemm& operator=(const LtGemm&) = delete;

  // `workspace` (device memory, `workspace_bytes` long) serves every call; calls run on one
  // stream at a time, so one workspace is enough. It may be shared with cuBLAS on that stream.
  Status init(void* workspace, size_t workspace_bytes);

  // Whether cuBLASLt has an algorithm for `p` (looked up once per problem, then cached).
  Result<bool> supports(const LtProblem& p);
  // Queues `p` on `stream`. False, with nothing queued, where cuBLASLt has no algorithm for it
  // (the caller runs it another way); an error only for a real failure.
  Result<bool> run(const LtProblem& p, const void* a, const void* b, void* d, const float* bias,
                   cudaStream_t stream);

 private:
  struct Plan;
  struct ProblemHash {
    size_t operator()(const LtProblem& p) const;
  };
  Result<Plan*> plan_for(const LtProblem& p);
  void warn_refused(const LtProblem& p, const char* why);

  // A capacity that changes with the routing (f <= 0) makes new problems: the cache is dropped
  // whole when it reaches this (plans cost a heuristic query each, microseconds).
  static constexpr size_t kMaxPlans = 512;

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::unordered_map<LtProblem, std::unique_ptr<Plan>, ProblemHash> plans_;
  uint32_t warned_ = 0;  // the kinds of problem (types, epilogue) a refusal was logged for
};

}  // namespace tutel::cuda
