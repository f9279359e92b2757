// The CUDA backend's small f32 ops (Backend::add, add_row_bias, add_column_sums): checked like
// every backend's (check_add, check_column_slice), then queued on `stream`, whose device the
// caller has made current. Kernels in expert_kernels.cu.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>

#include "tutel/kernels/backend.hpp"

namespace tutel::cuda {

Status add(TensorView dst, TensorView src, cudaStream_t stream);
Status add_row_bias(TensorView out, TensorView bias, int64_t column, cudaStream_t stream);
// Sums fixed blocks of rows, then the blocks in order (as the expert bias gradients), in device
// memory from `scratch`, asked for once the arguments are known to be good.
Status add_column_sums(TensorView src, int64_t column, TensorView dst,
                       const std::function<Result<void*>(size_t bytes)>& scratch,
                       cudaStream_t stream);

// The partial sums in device memory from `scratch`, asked for once the arguments are good.
Status add_sum_squares(TensorView src, TensorView dst, const std::function<Result<void*>(size_t bytes)>& scratch,
                       cudaStream_t stream);
Status scale(TensorView t, float factor, cudaStream_t stream);

}  // namespace tutel::cuda
