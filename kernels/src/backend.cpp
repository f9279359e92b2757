#include "tutel/kernels/backend.hpp"

#include "cpu/cpu_backend.hpp"
#if defined(TUTEL_HAVE_CUDA)
#include "cuda/cuda_backend.hpp"
#endif

namespace tutel {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    owner_ = std::exchange(o.owner_, nullptr);
    data_ = std::exchange(o.data_, nullptr);
    bytes_ = std::exchange(o.bytes_, 0);
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (owner_ && data_) owner_->release(data_, bytes_);
  owner_ = nullptr;
  data_ = nullptr;
  bytes_ = 0;
}

Status check_dispatched(const TensorView& dispatched, DType matmul_dtype, std::string_view op) {
  const DType d = dispatched.dtype();
  if (d == DType::kF32 || (d == DType::kBF16 && matmul_dtype == DType::kBF16)) return Status::OK();
  return Status::InvalidArgument(
      std::string(op) + " dispatched has dtype " + std::string(dtype_name(d)) + " under " +
      std::string(dtype_name(matmul_dtype)) +
      " matmuls; give f32, or bf16 with matmul_dtype bf16 (LayerSpec::dispatch_dtype)");
}

Status check_bf16_copy(const TensorView& source, const TensorView& copy, std::string_view what) {
  const std::string name(what);
  const std::string hint =
      "; a bf16 copy holds its f32 tensor's values rounded to bf16, in the same shape (fill it "
      "with Backend::convert)";
  if (source.dtype() != DType::kF32)
    return Status::InvalidArgument(name + ": its source has dtype " +
                                   std::string(dtype_name(source.dtype())) +
                                   "; only f32 tensors have bf16 copies");
  if (copy.empty() && source.numel() > 0)
    return Status::InvalidArgument(name + " is missing (null data)" + hint);
  if (copy.dtype() != DType::kBF16)
    return Status::InvalidArgument(name + " has dtype " + std::string(dtype_name(copy.dtype())) +
                                   ", expected bf16" + hint);
  if (!(copy.shape() == source.shape()))
    return Status::InvalidArgument(name + " has shape " + copy.shape().to_string() + ", expected " +
                                   source.shape().to_string() + hint);
  return Status::OK();
}

namespace {

std::string describe(const TensorView& t) {
  return std::string(dtype_name(t.dtype())) + " " + t.shape().to_string();
}

}  // namespace

Status check_add(const TensorView& dst, const TensorView& src, std::string_view op) {
  const std::string p(op);
  if (dst.dtype() != DType::kF32 || src.dtype() != DType::kF32 || !(dst.shape() == src.shape()))
    return Status::InvalidArgument(p + ": dst is " + describe(dst) + " and src " + describe(src) +
                                   "; both must be f32 of the same shape");
  if (dst.numel() > 0 && (dst.empty() || src.empty()))
    return Status::InvalidArgument(p + ": dst or src has no data (null) for " +
                                   std::to_string(dst.numel()) + " elements");
  return Status::OK();
}

Status check_sum_squares(const TensorView& src, const TensorView& dst) {
  if (src.dtype() != DType::kF32 || dst.dtype() != DType::kF32 || dst.numel() != 1)
    return Status::InvalidArgument("add_sum_squares: src is " + describe(src) + " and dst " + describe(dst) +
                                   "; src must be f32, dst f32 of one element");
  if (dst.empty() || (src.numel() > 0 && src.empty()))
    return Status::InvalidArgument("add_sum_squares: src or dst has no data (null)");
  return Status::OK();
}

Status check_scale(const TensorView& t) {
  if (t.dtype() != DType::kF32) return Status::InvalidArgument("scale: t is " + describe(t) + "; it must be f32");
  if (t.numel() > 0 && t.empty()) return Status::InvalidArgument("scale: t has no data (null)");
  return Status::OK();
}

Status check_column_slice(const TensorView& matrix, const TensorView& slice, int64_t column,
                          std::string_view op) {
  const std::string p(op);
  if (matrix.dtype() != DType::kF32 || matrix.rank() != 2)
    return Status::InvalidArgument(p + ": the matrix is " + describe(matrix) +
                                   ", expected f32 [rows, columns]");
  if (slice.dtype() != DType::kF32 || slice.rank() != 1)
    return Status::InvalidArgument(p + ": the column slice is " + describe(slice) +
                                   ", expected f32 [n]");
  const int64_t O = matrix.dim(1), n = slice.dim(0);
  if (column < 0 || column > O - n)
    return Status::InvalidArgument(p + ": columns [" + std::to_string(column) + ", " +
                                   std::to_string(column + n) + ") do not lie within the " +
                                   std::to_string(O) + " columns of the matrix " +
                                   matrix.shape().to_string());
  if ((matrix.numel() > 0 && matrix.empty()) || (n > 0 && slice.empty()))
    return Status::InvalidArgument(p + ": the matrix or the column slice has no data (null)");
  return Status::OK();
}

Status ExpertWeights::check_bf16_copies(std::string_view what) const {
  const std::string p = what.empty() ? "" : std::string(what) + " ";
  if (!fc1_weight_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(fc1_weight, fc1_weight_bf16, p + "fc1_weight_bf16"));
  if (!fc2_weight_bf16.empty())
    TUTEL_RETURN_IF_ERROR(check_bf16_copy(fc2_weight, fc2_weight_bf16, p + "fc2_weight_bf16"));
  return Status::OK();
}

std::string_view activation_name(Activation a) {
  switch (a) {
    case Activation::kRelu: return "relu";
    case Activation::kGelu: return "gelu";
    case Activation::kSilu: return "silu";
  }
  return "?";
}

std::optional<Activation> parse_activation(std::string_view name) {
  if (name == "relu") return Activation::kRelu;
  if (name == "gelu") return Activation::kGelu;
  if (name == "silu" || name == "swish") return Activation::kSilu;
  return std::nullopt;
}

// The registry: the one place that knows which backends exist.
Result<std::unique_ptr<Backend>> make_backend(std::string_view name, const BackendOptions& options) {
  if (name == "cpu") return cpu::make_cpu_backend(options);
#if defined(TUTEL_HAVE_CUDA)
  if (name == "cuda") return cuda::make_cuda_backend(options);
#endif
  std::string known;
  for (const auto& b : available_backends()) known += (known.empty() ? "" : ", ") + b;
  return Status::InvalidArgument("unknown backend '" + std::string(name) + "'; this build has: " + known);
}

std::vector<std::string> available_backends() {
  std::vector<std::string> names{"cpu"};
#if defined(TUTEL_HAVE_CUDA)
  names.push_back("cuda");
#endif
  return names;
}

}  // namespace tutel
