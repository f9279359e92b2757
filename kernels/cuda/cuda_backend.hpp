// The CUDA backend: cuBLAS for every matmul, our kernels (kernels/cuda/*.cu) for the rest, all
// queued on one non-blocking stream per backend.
//
// Same algorithm and semantics as the CPU backend (kernels/cpu): routing ties go to the lower
// expert, all choice-0 locations precede choice-1 ones, batch-prioritized routing is a stable
// sort by decreasing max score, decode sums choices in j order. Every reduction runs over fixed
// blocks combined in a fixed order, so results do not depend on the GPU's size; they are
// bit-identical from run to run on one GPU model.
//
// This header includes no CUDA header: backend.cpp (plain C++) includes it.
#pragma once

#include <memory>

#include "tutel/kernels/backend.hpp"

namespace tutel::cuda {

// Unavailable (with the driver's reason) where no driver or device is present; never crashes.
Result<std::unique_ptr<Backend>> make_cuda_backend(const BackendOptions& options);

// Devices the runtime reports; 0 where cudaGetDeviceCount fails (no driver, no device).
int device_count();

}  // namespace tutel::cuda
