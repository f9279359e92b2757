// The CPU backend's small f32 ops (Backend::add, add_row_bias, add_column_sums,
// add_sum_squares, scale) against a float64 reference on fresh random inputs, and the arguments
// they refuse.
//
// Tolerances (all_close: |got − want| <= atol·max|want| + rtol·|want|): one f32 rounding per
// element for add and add_row_bias (rtol 1e-6); add_column_sums is a running f32 sum over up to
// 700 rows (rtol 1e-5, atol 1e-5). add_column_sums must also give the bits of the plain f32 loop
// that adds row after row into dst (the order graphs::ExpertParallelLayer relies on to keep its
// results), whatever the thread count. add_sum_squares gathers 8 squares per f32 lane, then
// sums in double and rounds once into dst (all positive terms: within 9 · 2^-24, rtol 1e-6),
// with the same bits on one thread and on two; scale rounds once per element (rtol 1e-6).
#include <gtest/gtest.h>

#include <cmath>

#include <random>
#include <string>
#include <vector>

#include "bf16_copy_checks.hpp"
#include "layer_test_util.hpp"
#include "tutel/kernels/backend.hpp"

namespace tutel::testing {
namespace {

std::unique_ptr<Backend> cpu_backend(int threads) {
  auto b = make_backend("cpu", {.threads = threads});
  EXPECT_TRUE(b.ok()) << b.status();
  return b.ok() ? std::move(b).value() : nullptr;
}

struct Matrix {
  int64_t rows, cols, column, n;  // a [rows, cols] matrix and its columns [column, column + n)
};

// Shapes with a slice at the start, in the middle, at the end, of every column and of none;
// rows from none to several hundred, columns below and above the CPU's strip of 64.
std::vector<Matrix> matrices() {
  return {{1, 1, 0, 1}, {7, 15, 8, 7}, {300, 40, 0, 40}, {700, 130, 3, 100}, {64, 96, 32, 64},
          {5, 6, 6, 0}, {0, 9, 2, 4},  {257, 17, 16, 1}, {33, 200, 0, 65},   {129, 48, 24, 24}};
}

TEST(ElementwiseOps, AddMatchesTheReference) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend(2);
  ASSERT_TRUE(b);
  for (const Shape& shape : {Shape{1}, Shape{17}, Shape{3, 5, 7}, Shape{4096, 33}, Shape{0, 4}}) {
    SCOPED_TRACE(shape.to_string());
    const size_t n = static_cast<size_t>(shape.numel());
    const std::vector<float> d0 = to_f32(randn(rng, n, 2.0)), s = to_f32(randn(rng, n, 1.0));
    DeviceTensor dst(*b, DType::kF32, shape), src(*b, DType::kF32, shape);
    dst.upload(d0);
    src.upload(s);
    const Status st = b->add(dst.view(), src.view());
    ASSERT_TRUE(st.ok()) << st;
    std::vector<double> want(n);
    for (size_t i = 0; i < n; ++i) want[i] = double(d0[i]) + double(s[i]);
    EXPECT_TRUE(all_close("dst", dst.download(), want, 1e-6, 0.0));
    EXPECT_TRUE(same_bits("src", src.download(), s)) << "add wrote to its source";
  }
}

TEST(ElementwiseOps, AddRowBiasMatchesTheReference) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto b = cpu_backend(2);
  ASSERT_TRUE(b);
  for (const Matrix& m : matrices()) {
    SCOPED_TRACE("[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "] columns " +
                 std::to_string(m.column) + " + " + std::to_string(m.n));
    const std::vector<float> o0 = to_f32(randn(rng, m.rows * m.cols, 2.0)),
                             bias = to_f32(randn(rng, m.n, 1.0));
    DeviceTensor out(*b, DType::kF32, {m.rows, m.cols}), bv(*b, DType::kF32, {m.n});
    out.upload(o0);
    bv.upload(bias);
    const Status st = b->add_row_bias(out.view(), bv.view(), m.column);
    ASSERT_TRUE(st.ok()) << st;
    std::vector<double> want(o0.begin(), o0.end());
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t c = 0; c < m.n; ++c) want[r * m.cols + m.column + c] += bias[c];
    // Columns outside the slice are compared too: they must keep their values exactly.
    EXPECT_TRUE(all_close("out", out.download(), want, 1e-6, 0.0));
  }
}

TEST(ElementwiseOps, AddColumnSumsMatchesTheReferenceAndTheRowOrderLoop) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto one = cpu_backend(1), two = cpu_backend(2);
  ASSERT_TRUE(one && two);
  for (const Matrix& m : matrices()) {
    SCOPED_TRACE("[" + std::to_string(m.rows) + ", " + std::to_string(m.cols) + "] columns " +
                 std::to_string(m.column) + " + " + std::to_string(m.n));
    const std::vector<float> src = to_f32(randn(rng, m.rows * m.cols, 1.0)),
                             d0 = to_f32(randn(rng, m.n, 3.0));
    std::vector<double> want(d0.begin(), d0.end()), magnitude(m.n);
    std::vector<float> loop = d0;  // the host loop the layer ran before this op existed
    for (int64_t c = 0; c < m.n; ++c) magnitude[c] = std::abs(d0[c]);
    for (int64_t r = 0; r < m.rows; ++r)
      for (int64_t c = 0; c < m.n; ++c) {
        want[c] += src[r * m.cols + m.column + c];
        loop[c] += src[r * m.cols + m.column + c];
        magnitude[c] += std::abs(src[r * m.cols + m.column + c]);
      }
    for (Backend* b : {one.get(), two.get()}) {
      DeviceTensor sv(*b, DType::kF32, {m.rows, m.cols}), dst(*b, DType::kF32, {m.n});
      sv.upload(src);
      dst.upload(d0);
      const Status st = b->add_column_sums(sv.view(), m.column, dst.view());
      ASSERT_TRUE(st.ok()) << st;
      const std::vector<float> got = dst.download();
      // A running f32 sum of R terms is within R·u·Σ|terms| of the exact sum (u = 2^-24): the
      // tolerance per column, so long columns that cancel to near zero are judged fairly.
      for (int64_t c = 0; c < m.n; ++c) {
        const double bound = (m.rows + 1) * std::ldexp(1.0, -24) * magnitude[c] + 1e-30;
        EXPECT_LE(std::abs(got[c] - want[c]), bound) << "column " << c << ": " << got[c] << " vs " << want[c];
      }
      EXPECT_TRUE(same_bits("dst against the row-order loop", got, loop));
    }
  }
}

TEST(ElementwiseOps, AddSumSquaresAndScaleMatchTheReference) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937_64 rng(seed);
  auto one = cpu_backend(1), two = cpu_backend(2);
  ASSERT_TRUE(one && two);
  // Sizes around the CPU's block of 2^16 elements, and none.
  for (const Shape& shape : {Shape{1}, Shape{17, 3}, Shape{65536}, Shape{65537}, Shape{3, 100000}, Shape{0, 4}}) {
    SCOPED_TRACE(shape.to_string());
    const size_t n = static_cast<size_t>(shape.numel());
    const std::vector<float> x = to_f32(randn(rng, n, 1.5));
    const float start = to_f32(randn(rng, 1, 2.0))[0];
    const float factor = to_f32(randn(rng, 1, 1.0))[0];
    double squares = 0;
    for (float v : x) squares += double(v) * double(v);
    std::vector<float> sums;
    for (Backend* b : {one.get(), two.get()}) {
      DeviceTensor src(*b, DType::kF32, shape), dst(*b, DType::kF32, {1});
      src.upload(x);
      dst.upload({start});
      const Status st = b->add_sum_squares(src.view(), dst.view());
      ASSERT_TRUE(st.ok()) << st;
      sums.push_back(dst.download()[0]);
      EXPECT_TRUE(all_close("sum of squares", {sums.back()}, {double(start) + squares}, 1e-6, 0.0));
      EXPECT_TRUE(same_bits("src", src.download(), x)) << "add_sum_squares wrote to its source";
      const Status scaled = b->scale(src.view(), factor);
      ASSERT_TRUE(scaled.ok()) << scaled;
      std::vector<double> want(n);
      for (size_t i = 0; i < n; ++i) want[i] = double(x[i]) * double(factor);
      EXPECT_TRUE(all_close("scaled", src.download(), want, 1e-6, 0.0));
    }
    EXPECT_TRUE(same_bits("the sum on one thread and on two", {sums[0]}, {sums[1]}));
  }
}

// One refused call: its status is InvalidArgument and names `needle`.
void expect_refused(const Status& st, const std::string& needle) {
  EXPECT_EQ(st.code(), StatusCode::kInvalidArgument) << st;
  EXPECT_NE(std::string(st.message()).find(needle), std::string::npos) << st;
}

TEST(ElementwiseOps, MalformedArgumentsAreRefusedAndNothingIsWritten) {
  auto b = cpu_backend(1);
  ASSERT_TRUE(b);
  DeviceTensor a(*b, DType::kF32, {4, 6}), other(*b, DType::kF32, {6, 4}),
      ints(*b, DType::kI32, {4, 6}), slice(*b, DType::kF32, {3}), flat(*b, DType::kF32, {24}),
      wide(*b, DType::kF32, {2, 3}), islice(*b, DType::kI32, {3});
  const std::vector<float> ones(24, 1.f);
  a.upload(ones);
  slice.upload({1.f, 1.f, 1.f});

  expect_refused(b->add(a.view(), other.view()), "same shape");
  expect_refused(b->add(a.view(), flat.view()), "[24]");
  expect_refused(b->add(a.view(), ints.view()), "i32");
  expect_refused(b->add(ints.view(), a.view()), "both must be f32");

  expect_refused(b->add_row_bias(flat.view(), slice.view(), 0), "expected f32 [rows, columns]");
  expect_refused(b->add_row_bias(ints.view(), slice.view(), 0), "i32");
  expect_refused(b->add_row_bias(a.view(), wide.view(), 0), "expected f32 [n]");
  expect_refused(b->add_row_bias(a.view(), islice.view(), 0), "column slice");
  expect_refused(b->add_row_bias(a.view(), slice.view(), 4), "columns [4, 7)");
  expect_refused(b->add_row_bias(a.view(), slice.view(), -1), "columns [-1, 2)");

  expect_refused(b->add_column_sums(flat.view(), 0, slice.view()), "expected f32 [rows, columns]");
  expect_refused(b->add_column_sums(a.view(), 0, islice.view()), "expected f32 [n]");
  expect_refused(b->add_column_sums(a.view(), 5, slice.view()), "6 columns");
  expect_refused(b->add_column_sums(a.view(), -2, slice.view()), "columns [-2, 1)");

  expect_refused(b->add_sum_squares(a.view(), slice.view()), "dst f32 of one element");
  expect_refused(b->add_sum_squares(ints.view(), slice.view()), "src must be f32");
  expect_refused(b->scale(ints.view(), 2.f), "it must be f32");

  EXPECT_TRUE(same_bits("a", a.download(), ones));
  EXPECT_TRUE(same_bits("slice", slice.download(), {1.f, 1.f, 1.f}));
}

}  // namespace
}  // namespace tutel::testing
