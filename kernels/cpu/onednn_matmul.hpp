// A thin wrapper over oneDNN's batched matmul for the CPU backend:
// dst[b] (+)= act(A[b]·B[b] + bias[b]), any strides, f32 or bf16 inputs, f32 output.
#pragma once

#include <oneapi/dnnl/dnnl.hpp>

#include <cstdint>
#include <optional>

#include "tutel/core/status.hpp"

namespace tutel::cpu {

// One operand: a batch of matrices [batch, rows, cols] with element strides.
struct MatOperand {
  const void* data = nullptr;
  dnnl::memory::dims dims;     // {batch, rows, cols}
  dnnl::memory::dims strides;  // in elements
  dnnl::memory::data_type type = dnnl::memory::data_type::f32;
};

// [batch, rows, cols] row-major.
inline MatOperand row_major(const void* data, int64_t batch, int64_t rows, int64_t cols) {
  return {data, {batch, rows, cols}, {rows * cols, cols, 1}};
}
// The transpose of a row-major [batch, rows, cols] buffer, seen as [batch, cols, rows].
inline MatOperand transposed(const void* data, int64_t batch, int64_t rows, int64_t cols) {
  return {data, {batch, cols, rows}, {rows * cols, 1, cols}};
}

struct MatmulOptions {
  const float* bias = nullptr;  // [batch, cols of dst], broadcast over rows
  bool accumulate = false;      // dst += result instead of dst = result
  std::optional<dnnl::algorithm> activation;  // eltwise post-op
};

class OneDnnMatmul {
 public:
  OneDnnMatmul();
  // dst: row-major f32 [batch, a.rows, b.cols].
  Status run(const MatOperand& a, const MatOperand& b, float* dst, const MatmulOptions& options);
  // Elementwise forward (training) of `alg` over n floats: dst = act(src).
  Status eltwise_forward(dnnl::algorithm alg, const float* src, float* dst, int64_t n);
  // Elementwise backward: diff_src = diff_dst · act'(data) where data is src (or dst for the
  // *_use_dst_for_bwd algorithms). In place is allowed (diff_src == diff_dst).
  Status eltwise_backward(dnnl::algorithm alg, const float* data, const float* diff_dst,
                          float* diff_src, int64_t n);

 private:
  dnnl::engine engine_;
  dnnl::stream stream_;
};

}  // namespace tutel::cpu
