#include "tutel/core/tensor.hpp"

#include "tutel/core/logging.hpp"

namespace tutel {

std::string Device::to_string() const {
  return (kind == DeviceKind::kCpu ? "cpu:" : "cuda:") + std::to_string(index);
}

Shape::Shape(std::initializer_list<int64_t> dims) {
  for (int64_t d : dims) push_back(d);
}

int64_t Shape::numel() const {
  int64_t n = 1;
  for (int i = 0; i < rank_; ++i) n *= dims_[i];
  return n;
}

void Shape::push_back(int64_t d) {
  TUTEL_CHECK(rank_ < kMaxDims) << "tensor rank exceeds kMaxDims = " << kMaxDims;
  dims_[rank_++] = d;
}

bool Shape::operator==(const Shape& o) const {
  if (rank_ != o.rank_) return false;
  for (int i = 0; i < rank_; ++i)
    if (dims_[i] != o.dims_[i]) return false;
  return true;
}

std::string Shape::to_string() const {
  std::string s = "[";
  for (int i = 0; i < rank_; ++i) {
    if (i) s += ", ";
    s += std::to_string(dims_[i]);
  }
  return s + "]";
}

TensorView::TensorView(void* data, DType dtype, Shape shape, Device device)
    : data_(data), dtype_(dtype), shape_(shape), device_(device) {
  int64_t stride = 1;
  for (int i = shape_.rank() - 1; i >= 0; --i) {
    strides_[i] = stride;
    stride *= shape_[i];
  }
}

bool TensorView::is_contiguous() const {
  int64_t stride = 1;
  for (int i = shape_.rank() - 1; i >= 0; --i) {
    if (shape_[i] != 1 && strides_[i] != stride) return false;
    stride *= shape_[i];
  }
  return true;
}

Status TensorView::expect(std::string_view what, DType dtype, const Shape& shape) const {
  if (data_ == nullptr && shape.numel() > 0)
    return Status::InvalidArgument(std::string(what) + " is missing (null data)");
  if (dtype_ != dtype)
    return Status::InvalidArgument(std::string(what) + " has dtype " + std::string(dtype_name(dtype_)) +
                                   ", expected " + std::string(dtype_name(dtype)));
  if (!(shape_ == shape))
    return Status::InvalidArgument(std::string(what) + " has shape " + shape_.to_string() +
                                   ", expected " + shape.to_string());
  return Status::OK();
}

}  // namespace tutel
