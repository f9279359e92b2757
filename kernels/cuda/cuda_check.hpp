// CUDA and cuBLAS errors as Status, with the failing expression and its file:line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "tutel/core/status.hpp"

namespace tutel::cuda {

// ResourceExhausted for out-of-memory, Unavailable for a missing driver or device, Internal
// otherwise; a sticky error (the context is lost) says so.
Status cuda_error(cudaError_t err, const char* expr, const char* file, int line);
Status cublas_error(cublasStatus_t st, const char* expr, const char* file, int line);
// Whether `err` destroyed the context: every later call on the device fails with it.
bool is_sticky(cudaError_t err);

}  // namespace tutel::cuda

// Returns the error of a CUDA runtime call (or kernel launcher) from the enclosing function.
#define TUTEL_CUDA_CHECK(expr)                                                          \
  do {                                                                                  \
    const cudaError_t _tutel_cuda_err = (expr);                                         \
    if (_tutel_cuda_err != cudaSuccess)                                                 \
      return ::tutel::cuda::cuda_error(_tutel_cuda_err, #expr, __FILE__, __LINE__);     \
  } while (0)

#define TUTEL_CUBLAS_CHECK(expr)                                                        \
  do {                                                                                  \
    const cublasStatus_t _tutel_cublas_st = (expr);                                     \
    if (_tutel_cublas_st != CUBLAS_STATUS_SUCCESS)                                      \
      return ::tutel::cuda::cublas_error(_tutel_cublas_st, #expr, __FILE__, __LINE__);  \
  } while (0)
