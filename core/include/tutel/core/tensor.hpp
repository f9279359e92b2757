// TensorView: a non-owning view of typed memory on some device.
//
// Shapes have at most kMaxDims dimensions; strides are in elements. Views are cheap
// values; they never own or free memory.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "tutel/core/dtype.hpp"
#include "tutel/core/status.hpp"

namespace tutel {

enum class DeviceKind : uint8_t { kCpu, kCuda };

struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;
  bool operator==(const Device&) const = default;
  std::string to_string() const;
};

inline constexpr int kMaxDims = 6;

class Shape {
 public:
  Shape() = default;
  Shape(std::initializer_list<int64_t> dims);
  template <typename It>
  Shape(It begin, It end) {
    for (; begin != end; ++begin) push_back(static_cast<int64_t>(*begin));
  }

  int rank() const { return rank_; }
  int64_t operator[](int i) const { return dims_[i]; }
  int64_t& operator[](int i) { return dims_[i]; }
  int64_t numel() const;
  void push_back(int64_t d);
  const int64_t* begin() const { return dims_.data(); }
  const int64_t* end() const { return dims_.data() + rank_; }
  bool operator==(const Shape& o) const;
  // "[4096, 1024]"
  std::string to_string() const;

 private:
  std::array<int64_t, kMaxDims> dims_{};
  int rank_ = 0;
};

class TensorView {
 public:
  TensorView() = default;
  // A contiguous (row-major) view.
  TensorView(void* data, DType dtype, Shape shape, Device device = {});

  void* data() const { return data_; }
  template <typename T>
  T* data_as() const { return static_cast<T*>(data_); }
  DType dtype() const { return dtype_; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[i]; }
  int rank() const { return shape_.rank(); }
  int64_t stride(int i) const { return strides_[i]; }
  const Device& device() const { return device_; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }
  bool is_contiguous() const;
  bool empty() const { return data_ == nullptr; }

  // OK when this view has the dtype and shape given; otherwise an error naming `what`.
  Status expect(std::string_view what, DType dtype, const Shape& shape) const;

 private:
  void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  Shape shape_;
  std::array<int64_t, kMaxDims> strides_{};
  Device device_;
};

}  // namespace tutel
