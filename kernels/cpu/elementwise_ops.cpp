#include "cpu/elementwise_ops.hpp"

#include "cpu/parallel_work.hpp"

#include <algorithm>
#include <vector>

namespace tutel::cpu {

Status add(TensorView dst, TensorView src) {
  TUTEL_RETURN_IF_ERROR(check_add(dst, src, "add"));
  float* d = dst.data_as<float>();
  const float* s = src.data_as<float>();
  const int64_t n = dst.numel();
#pragma omp parallel for simd schedule(static) if (parallel: worth_a_team(n))
  for (int64_t i = 0; i < n; ++i) d[i] += s[i];
  return Status::OK();
}

Status add_row_bias(TensorView out, TensorView bias, int64_t column) {
  TUTEL_RETURN_IF_ERROR(check_column_slice(out, bias, column, "add_row_bias"));
  const int64_t R = out.dim(0), O = out.dim(1), n = bias.dim(0);
  float* o = out.data_as<float>() + column;
  const float* b = bias.data_as<float>();
#pragma omp parallel for schedule(static) if (parallel: worth_a_team(R * n))
  for (int64_t r = 0; r < R; ++r) {
    float* row = o + r * O;
#pragma omp simd
    for (int64_t c = 0; c < n; ++c) row[c] += b[c];
  }
  return Status::OK();
}

Status add_column_sums(TensorView src, int64_t column, TensorView dst) {
  TUTEL_RETURN_IF_ERROR(check_column_slice(src, dst, column, "add_column_sums"));
  const int64_t R = src.dim(0), O = src.dim(1), n = dst.dim(0);
  const float* s = src.data_as<float>() + column;
  float* d = dst.data_as<float>();
  // Threads split the columns, never the rows: each column is one running sum from d[c] down
  // the rows, in the order the layer's host loop always used. A strip of columns stays in
  // registers while the rows stream past; the lanes of the simd loop are distinct columns.
  constexpr int64_t kCols = 64;
  const int64_t strips = (n + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if (parallel: worth_a_team(R * n))
  for (int64_t t = 0; t < strips; ++t) {
    const int64_t c0 = t * kCols, width = std::min(kCols, n - c0);
    float acc[kCols];
    for (int64_t c = 0; c < width; ++c) acc[c] = d[c0 + c];
    for (int64_t r = 0; r < R; ++r) {
      const float* row = s + r * O + c0;
#pragma omp simd
      for (int64_t c = 0; c < width; ++c) acc[c] += row[c];
    }
    for (int64_t c = 0; c < width; ++c) d[c0 + c] = acc[c];
  }
  return Status::OK();
}

// Fixed blocks of kSquareBlock elements, each a sum of its own; then the blocks in order (on
// this thread), so the threads only decide who sums which block. Within a block, pieces of
// kPiece elements: kLanes f32 lanes each gather kPiece / kLanes squares (8: a relative error
// of at most 8 · 2^-24), then the lanes and the pieces add up in double. Converting every
// element to double instead runs at ~0.8 of the memory's read rate on two cores here; the f32
// lanes at ~0.95 (docs/performance.md, "The gradient norm").
Status add_sum_squares(TensorView src, TensorView dst) {
  TUTEL_RETURN_IF_ERROR(check_sum_squares(src, dst));
  constexpr int64_t kSquareBlock = 1 << 16, kPiece = 256, kLanes = 32;
  const int64_t n = src.numel(), blocks = (n + kSquareBlock - 1) / kSquareBlock;
  const float* s = src.data_as<float>();
  std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (parallel: blocks > 1)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t end = std::min(n, (b + 1) * kSquareBlock);
    double acc = 0;
    int64_t i = b * kSquareBlock;
    for (; i + kPiece <= end; i += kPiece) {
      float lanes[kLanes] = {};
      for (int64_t j = 0; j < kPiece; j += kLanes)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) lanes[l] += s[i + j + l] * s[i + j + l];
      double piece = 0;
      for (int64_t l = 0; l < kLanes; ++l) piece += lanes[l];
      acc += piece;
    }
    for (; i < end; ++i) acc += double(s[i]) * double(s[i]);
    partial[static_cast<size_t>(b)] = acc;
  }
  double sum = 0;
  for (double p : partial) sum += p;
  float* d = dst.data_as<float>();
  d[0] = static_cast<float>(double(d[0]) + sum);
  return Status::OK();
}

Status scale(TensorView t, float factor) {
  TUTEL_RETURN_IF_ERROR(check_scale(t));
  float* d = t.data_as<float>();
  const int64_t n = t.numel();
#pragma omp parallel for simd schedule(static) if (parallel: worth_a_team(n))
  for (int64_t i = 0; i < n; ++i) d[i] *= factor;
  return Status::OK();
}

}  // namespace tutel::cpu
