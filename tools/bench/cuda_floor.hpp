// The ceilings the CUDA layer bench is measured against, on the device and stream the layer
// runs on (compiled only with CUDA):
//   - the expert GEMMs alone at cuBLAS's rate, for exactly the shapes and layouts the step uses
//     (bf16 or f32 inputs, f32 accumulation and output, as the backend's GEMMs);
//   - the device's copy bandwidth, cudaMemcpyAsync device-to-device of one large buffer.
// Thread-safety: like the Backend whose stream and memory they use, one thread at a time.
#pragma once

#include <cstddef>
#include <vector>

#include "gemm_floor.hpp"
#include "tutel/core/status.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::bench {

// For each GEMM the better of one cublasGemmStridedBatchedEx over the experts and one
// cublasGemmEx per expert, median of `repeats` runs timed with events; the times summed.
// Operands hold random N(0, 1) numbers (not zeros: the tensor cores' clocks depend on the data).
Result<GemmTiming> time_cuda_gemms(Backend& backend, const std::vector<GemmShape>& gemms, bool bf16,
                                   int repeats);

struct CopyBandwidth {
  double bytes_per_second = 0;  // bytes read + bytes written, per second
  size_t buffer_bytes = 0;      // the size of the copy measured
};

// The median of `repeats` device-to-device copies of one buffer of up to 1 GiB.
Result<CopyBandwidth> measure_device_copy(Backend& backend, int repeats);

}  // namespace tutel::bench
