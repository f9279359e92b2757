#include "cuda/elementwise_ops.hpp"

#include "cuda/cuda_check.hpp"
#include "cuda/cuda_kernels.hpp"

namespace tutel::cuda {

Status add(TensorView dst, TensorView src, cudaStream_t stream) {
  TUTEL_RETURN_IF_ERROR(check_add(dst, src, "add"));
  TUTEL_CUDA_CHECK(launch_add(dst.data_as<float>(), src.data_as<float>(), dst.numel(), stream));
  return Status::OK();
}

Status add_row_bias(TensorView out, TensorView bias, int64_t column, cudaStream_t stream) {
  TUTEL_RETURN_IF_ERROR(check_column_slice(out, bias, column, "add_row_bias"));
  TUTEL_CUDA_CHECK(launch_add_row_bias(out.data_as<float>() + column, out.dim(0), out.dim(1),
                                       bias.data_as<float>(), bias.dim(0), stream));
  return Status::OK();
}

Status add_column_sums(TensorView src, int64_t column, TensorView dst,
                       const std::function<Result<void*>(size_t bytes)>& scratch,
                       cudaStream_t stream) {
  TUTEL_RETURN_IF_ERROR(check_column_slice(src, dst, column, "add_column_sums"));
  const int64_t R = src.dim(0), n = dst.dim(0);
  if (R == 0 || n == 0) return Status::OK();
  TUTEL_ASSIGN_OR_RETURN(void* partial, scratch(bias_grad_scratch_bytes(1, R, n)));
  TUTEL_CUDA_CHECK(launch_column_sums(src.data_as<float>() + column, R, src.dim(1), n, partial,
                                      dst.data_as<float>(), stream));
  return Status::OK();
}

Status add_sum_squares(TensorView src, TensorView dst, const std::function<Result<void*>(size_t bytes)>& scratch,
                       cudaStream_t stream) {
  TUTEL_RETURN_IF_ERROR(check_sum_squares(src, dst));
  if (src.numel() == 0) return Status::OK();
  TUTEL_ASSIGN_OR_RETURN(void* partial, scratch(sum_squares_scratch_bytes()));
  TUTEL_CUDA_CHECK(launch_sum_squares(src.data_as<float>(), src.numel(), partial, dst.data_as<float>(), stream));
  return Status::OK();
}

Status scale(TensorView t, float factor, cudaStream_t stream) {
  TUTEL_RETURN_IF_ERROR(check_scale(t));
  TUTEL_CUDA_CHECK(launch_scale(t.data_as<float>(), t.numel(), factor, stream));
  return Status::OK();
}

}  // namespace tutel::cuda
