#include "cuda/cuda_check.hpp"

#include <cstddef>
#include <string>
#include <string_view>

namespace tutel::cuda {
namespace {

// "kernels/cuda/cuda_backend.cpp" rather than the build machine's absolute path.
std::string_view short_path(std::string_view file) {
  const size_t at = file.rfind("kernels/");
  return at == std::string_view::npos ? file : file.substr(at);
}

}  // namespace

// The errors driver_types.h says leave the process in an inconsistent state ("any further CUDA
// work will return the same error"; the process must be relaunched), and the uncorrectable
// hardware faults.
bool is_sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorHardwareStackError:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
    case cudaErrorNvlinkUncorrectable:
    case cudaErrorMpsClientTerminated:
    case cudaErrorExternalDevice:
#if CUDART_VERSION >= 12080  // named from CUDA 12.8 on (the project builds with 13)
    case cudaErrorContained:
    case cudaErrorTensorMemoryLeak:
#endif
      return true;
    default:
      return false;
  }
}

Status cuda_error(cudaError_t err, const char* expr, const char* file, int line) {
  // A runtime call's error stays the thread's last error, and the kernel launchers report
  // cudaGetLastError(): cleared here, or the next unrelated launch would fail with it. (A sticky
  // error cannot be cleared: every later call reports it, as it should.)
  if (!is_sticky(err)) (void)cudaGetLastError();
  std::string msg = std::string(expr) + " failed at " + std::string(short_path(file)) + ":" +
                    std::to_string(line) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
  switch (err) {
    case cudaErrorMemoryAllocation:
      return Status::ResourceExhausted(std::move(msg));
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice:
    case cudaErrorDevicesUnavailable:
      return Status::Unavailable(std::move(msg));
    default:
      break;
  }
  if (is_sticky(err))
    msg += "; the CUDA context is lost (sticky error): nothing more can run on this device in this process";
  return Status::Internal(std::move(msg));
}

Status cublas_error(cublasStatus_t st, const char* expr, const char* file, int line) {
  std::string msg = std::string(expr) + " failed at " + std::string(short_path(file)) + ":" +
                    std::to_string(line) + ": " + cublasGetStatusName(st) + " (" + cublasGetStatusString(st) + ")";
  if (st == CUBLAS_STATUS_ALLOC_FAILED) return Status::ResourceExhausted(std::move(msg));
  if (st == CUBLAS_STATUS_INVALID_VALUE) return Status::InvalidArgument(std::move(msg));
  return Status::Internal(std::move(msg));
}

}  // namespace tutel::cuda
